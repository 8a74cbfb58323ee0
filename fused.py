"""
The fused path for ddl.py's expanded residual state (d_v > 1): Triton kernels, forward and backward,
for what the (B, T, d, d_v) state goes through between two sublayers. Optional: ddl.py never imports
this file, and nothing changes unless you ask for it:

    python train.py --preset=124m --d_v=4 --fused=true        # or: bench.py ... --fused=true
    import fused; fused.install(model)                        # replaces model.body, nothing else

Per sublayer, ddl.py's reference passes over the state four times in the forward (the compressor's
read, the readout k^T X, the rewrite's read and its write). Here one kernel reads X_l once and writes

    X_{l+1} = X_l - beta k e^T,  e = k^T X_l - v^T      (Eq. 2.2, Eq. 2.4; the write-only control: e = -v^T)
    taps[i, s] = sum_j W[i, j, s] X_{l+1}[i, j]          (the *next* sublayer's compressor read)

so the sublayer boundary costs one read and one write of the state. W is the next compressor's weight:
CC's channel mix (K = 1 tap) or TC's conv * read (K taps, summed over shifted tokens in PyTorch). The
backward takes the gradients of X_{l+1} and of the taps; one kernel returns those of X_l, k, v, beta,

    G = dL/dX_{l+1} + W dL/dtaps,  u = k^T G,  dX_l = G - beta k u^T,  dk = -beta (G e + X_l u),
    dv = beta u,  dbeta = -u . e          (write-only: dX_l = G, dk = -beta G e)

and a second reduces over tokens for W's: dW[i, j, s] = sum_t dL/dtaps[t, i, s] X_{l+1}[t, i, j],
with X_{l+1} recomputed from X_l, so the op keeps only X_l, k, e and beta for its backward.
Measured on an H100 (docs/performance.md): DDL-CC trains faster than ddl.py's compiled path but
uses more memory, so train.py and bench.py leave it off unless asked.

Everything is computed in fp32 and rounded once when stored. The kernels run on CUDA, or on the CPU
under Triton's interpreter (TRITON_INTERPRET=1, set before importing this file), which is how the
tests pin them to ddl.py's delta_update, write_update and compressors.
"""
import os
import types

import torch
import triton
import triton.language as tl
from torch import Tensor

from ddl import ChannelCompressor, ConfigError, shift_tokens, unit_direction

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The tile is one token's whole (d, d_v) state, since k^T X reduces over all of d; a program walks
# TOKENS tokens. d and d_v are compile-time constants, so that Triton sees the state's rows as
# contiguous and loads them in wide vectors. Autotuned on the GPU over tokens per program and warps.
def _tuned(tokens, warps):
    configs = [triton.Config(dict(TOKENS=t), num_warps=w) for t in tokens for w in warps]
    return triton.autotune(configs[:1] if INTERPRET else configs, key=["d", "dv", "KW"])

@_tuned(tokens=(1, 4), warps=(4, 8, 16))
@triton.jit
def _step_fwd(X, K, V, BETA, W, XN, TAPS, E, n_tok, d: tl.constexpr, dv: tl.constexpr, KW: tl.constexpr, ERASE: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]  # feature index, (BLOCK_D, 1)
    j = tl.arange(0, BLOCK_V)[None, :]  # value channel, (1, BLOCK_V)
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < dv) & live
        m = mi & mj
        x = tl.load(X + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
        k = tl.load(K + t * d + i, mask=mi, other=0.0).to(tl.float32)
        v = tl.load(V + t * dv + j, mask=mj, other=0.0).to(tl.float32)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        if ERASE:
            e = tl.sum(k * x, axis=0, keep_dims=True) - v  # Eq. 2.4's readout error, (1, BLOCK_V)
        else:
            e = -v
        xn = (x - beta * k * e).to(XN.dtype.element_ty)  # Eq. 2.2
        tl.store(XN + (t * d + i) * dv + j, xn, mask=m)
        tl.store(E + t * dv + j, e, mask=mj)
        xn = xn.to(tl.float32)  # the next compressor reads the state as stored
        for s in tl.static_range(KW):
            w = tl.load(W + (i * dv + j) * KW + s, mask=m, other=0.0).to(tl.float32)
            tap = tl.sum(w * xn, axis=1, keep_dims=True)
            tl.store(TAPS + (t * d + i) * KW + s, tap.to(TAPS.dtype.element_ty), mask=mi)

@_tuned(tokens=(1, 4), warps=(4, 8, 16))
@triton.jit
def _step_bwd(GXN, GTAPS, X, K, E, BETA, W, DX, DK, DV, DBETA, n_tok, d: tl.constexpr, dv: tl.constexpr,
              KW: tl.constexpr, ERASE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
              TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]
    j = tl.arange(0, BLOCK_V)[None, :]
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < dv) & live
        m = mi & mj
        g = tl.load(GXN + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
        for s in tl.static_range(KW):  # G = dL/dX_{l+1} + W dL/dtaps
            w = tl.load(W + (i * dv + j) * KW + s, mask=m, other=0.0).to(tl.float32)
            g += w * tl.load(GTAPS + (t * d + i) * KW + s, mask=mi, other=0.0).to(tl.float32)
        k = tl.load(K + t * d + i, mask=mi, other=0.0).to(tl.float32)
        e = tl.load(E + t * dv + j, mask=mj, other=0.0)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        u = tl.sum(k * g, axis=0, keep_dims=True)  # k^T G, (1, BLOCK_V)
        if ERASE:
            x = tl.load(X + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
            dx = g - beta * k * u
            dk = -beta * tl.sum(g * e + x * u, axis=1, keep_dims=True)
        else:
            dx = g
            dk = -beta * tl.sum(g * e, axis=1, keep_dims=True)
        tl.store(DX + (t * d + i) * dv + j, dx.to(DX.dtype.element_ty), mask=m)
        tl.store(DK + t * d + i, dk.to(DK.dtype.element_ty), mask=mi)
        tl.store(DV + t * dv + j, (beta * u).to(DV.dtype.element_ty), mask=mj)
        tl.store(DBETA + t, (-tl.sum(u * e)).to(DBETA.dtype.element_ty), mask=live)

SPLITS = 32  # token ranges of the weight's gradient: partial sums (SPLITS, d, d_v, K), added up after

@triton.autotune([triton.Config(dict(BLOCK_I=bi, BLOCK_T=bt), num_warps=w) for bi in (64, 32, 16) for bt in (8, 4)
                  for w in (2, 4)][:1 if INTERPRET else None], key=["d", "dv", "KW"])
@triton.jit
def _weight_bwd(GTAPS, X, K, E, BETA, DW, n_tok, CHUNK: tl.constexpr, d: tl.constexpr, dv: tl.constexpr, KW: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    # dW[i, j, s] = sum over tokens of dL/dtaps[t, i, s] X_{l+1}[t, i, j], X_{l+1} recomputed from X_l as
    # the forward stored it; this program: features [i0, i0 + BLOCK_I), tokens [t0, t0 + CHUNK)
    i0, t0 = tl.program_id(0) * BLOCK_I, tl.program_id(1) * CHUNK
    tt = tl.arange(0, BLOCK_T)[:, None, None]             # token, (BLOCK_T, 1, 1)
    i = i0 + tl.arange(0, BLOCK_I)[None, :, None]         # feature, (1, BLOCK_I, 1)
    j = tl.arange(0, BLOCK_V)[None, None, :]              # value channel, (1, 1, BLOCK_V)
    s3 = tl.arange(0, BLOCK_K)[None, None, :]             # tap, (1, 1, BLOCK_K)
    dw = tl.zeros((BLOCK_I, BLOCK_V, BLOCK_K), dtype=tl.float32)
    for b in tl.range(0, CHUNK, BLOCK_T):
        t = t0 + b + tt
        live = (t < n_tok) & (b + tt < CHUNK)
        mi = live & (i < d)
        m = mi & (j < dv)
        x = tl.load(X + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
        k = tl.load(K + t * d + i, mask=mi, other=0.0).to(tl.float32)
        e = tl.load(E + t * dv + j, mask=live & (j < dv), other=0.0)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        xn = (x - beta * k * e).to(X.dtype.element_ty).to(tl.float32)  # (BLOCK_T, BLOCK_I, BLOCK_V)
        for s in tl.static_range(KW):
            gt = tl.load(GTAPS + (t * d + i) * KW + s, mask=mi, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_I, 1)
            dw += tl.where(s3 == s, tl.sum(xn * gt, axis=0)[:, :, None], 0.0)
    ii = i0 + tl.arange(0, BLOCK_I)[:, None, None]
    jj = tl.arange(0, BLOCK_V)[None, :, None]
    tl.store(DW + ((tl.program_id(1) * d + ii) * dv + jj) * KW + s3, dw, mask=(ii < d) & (jj < dv) & (s3 < KW))

def _blocks(d, dv):
    return dict(BLOCK_D=triton.next_power_of_2(d), BLOCK_V=triton.next_power_of_2(dv))

@torch.library.custom_op("ddl_fused::step", mutates_args=())
def step(X: Tensor, k: Tensor, v: Tensor, beta: Tensor, W: Tensor,
         erase: bool) -> tuple[Tensor, Tensor, Tensor]:
    """X (..., d, d_v), k (..., d), v (..., d_v), beta (...), W (d, d_v, K) -> X_{l+1}, taps (..., d, K)
    in X's dtype and e (..., d_v) in fp32 (kept for the backward)."""
    X, k, v, beta, W = (t.contiguous() for t in (X, k, v, beta, W))
    d, dv, KW = W.shape
    Xn, taps, e = torch.empty_like(X), X.new_empty(*X.shape[:-1], KW), v.new_empty(v.shape, dtype=torch.float32)
    n_tok = beta.numel()
    _step_fwd[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        X, k, v, beta, W, Xn, taps, e, n_tok, d, dv, KW=KW, ERASE=erase, **_blocks(d, dv))
    return Xn, taps, e

@step.register_fake
def _(X, k, v, beta, W, erase):
    return torch.empty_like(X), X.new_empty(*X.shape[:-1], W.shape[-1]), v.new_empty(v.shape, dtype=torch.float32)

@torch.library.custom_op("ddl_fused::step_backward", mutates_args=())
def step_backward(g_Xn: Tensor, g_taps: Tensor, X: Tensor, k: Tensor, e: Tensor,
                  beta: Tensor, W: Tensor, erase: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of X_l, k, v, beta and W (the module docstring's formulas), in their dtypes;
    dW[i, j, s] = sum over tokens of dL/dtaps[i, s] X_{l+1}[i, j], X_{l+1} recomputed from X_l."""
    g_Xn, g_taps, X, k, e, beta, W = (t.contiguous() for t in (g_Xn, g_taps, X, k, e, beta, W))
    d, dv, KW = W.shape
    dX, dk, dv_, dbeta = torch.empty_like(X), torch.empty_like(k), torch.empty_like(e), torch.empty_like(beta)
    n_tok = beta.numel()
    _step_bwd[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        g_Xn, g_taps, X, k, e, beta, W, dX, dk, dv_, dbeta, n_tok, d, dv, KW=KW, ERASE=erase, **_blocks(d, dv))
    chunk = triton.cdiv(n_tok, SPLITS)  # a compile-time constant (the interpreter needs constant loop
    # bounds): one compile of _weight_bwd per batch shape, as torch.compile does for the model
    parts = torch.empty(SPLITS, d, dv, KW, device=X.device)
    _weight_bwd[lambda meta: (triton.cdiv(d, meta["BLOCK_I"]), SPLITS)](
        g_taps, X, k, e, beta, parts, n_tok, chunk, d, dv, KW, BLOCK_V=triton.next_power_of_2(dv),
        BLOCK_K=triton.next_power_of_2(KW))
    return dX, dk, dv_, dbeta, parts.sum(0).to(W.dtype)

@step_backward.register_fake
def _(g_Xn, g_taps, X, k, e, beta, W, erase):
    return torch.empty_like(X), torch.empty_like(k), torch.empty_like(e), torch.empty_like(beta), torch.empty_like(W)

def _save(ctx, inputs, output):
    X, k, v, beta, W, ctx.erase = inputs
    ctx.v_dtype = v.dtype
    ctx.save_for_backward(X, k, output[2], beta, W)  # X_{l+1} is recomputed, not kept

def _backward(ctx, g_Xn, g_taps, g_e):
    X, k, e, beta, W = ctx.saved_tensors
    dX, dk, dv, dbeta, dW = step_backward(g_Xn, g_taps, X, k, e, beta, W, ctx.erase)
    return dX, dk, dv.to(ctx.v_dtype), dbeta, dW, None

step.register_autograd(_backward, setup_context=_save)

def taps_weight(compressor, dtype):
    """The compressor as a (d, d_v, K) weight: CC's channel mix with K = 1, or TC's conv * read."""
    if isinstance(compressor, ChannelCompressor):
        return compressor.mix.to(dtype).unsqueeze(-1)
    return (compressor.conv * compressor.read[:, None]).to(dtype)

def sum_taps(taps):
    """x_in[t] = sum_s taps[t - s, :, s]: TC's causal sum over shifted tokens (K = 1: CC's output)."""
    return sum(shift_tokens(taps[..., s], s) for s in range(taps.shape[-1]))

def fused_body(model, X):
    """GPT.body with each sublayer boundary as one fused step: the same parameters and equations."""
    branches = [b for block in model.blocks for b in (block.attn, block.mlp)]
    if any(b.record for b in branches):  # gate audits record in ddl.py's own forward
        return type(model).body(model, X)
    reads = [b.compressor for b in branches[1:]] + [model.readout]
    x_in = branches[0].compressor(X)
    for branch, nxt in zip(branches, reads):
        c, k_tilde = branch.read(x_in)
        k, v, beta = unit_direction(k_tilde, model.config.k_eps), branch.value(c), branch.beta(c)
        X, taps, _ = step(X, k, v, beta, taps_weight(nxt, X.dtype), model.config.residual == "delta")
        x_in = sum_taps(taps)
    return x_in

def install(model):
    """Run model's state updates through the fused kernels (replaces model.body, nothing else)."""
    gpt = getattr(model, "_orig_mod", model)  # torch.compile(model): install on the GPT it wraps
    cfg = gpt.config
    for ok, key, value, allowed in (
            (cfg.d_v > 1, "d_v", cfg.d_v, "> 1 (the fused path is for the expanded state)"),
            (cfg.residual in ("delta", "write"), "residual", cfg.residual, "delta or write"),
            (not cfg.check_spectrum, "check_spectrum", cfg.check_spectrum, "False (it checks ddl.py's own forward)"),
            (gpt.wte.weight.dtype != torch.float64, "dtype", gpt.wte.weight.dtype,
             "float32 or bfloat16 (the kernels compute in fp32)"),
            (INTERPRET or gpt.wte.weight.is_cuda, "device", gpt.wte.weight.device.type,
             "cuda (or TRITON_INTERPRET=1 on the CPU)")):
        if not ok:
            raise ConfigError(f"fused: {key}={value!r} is not supported: must be {allowed}")
    gpt.body = types.MethodType(fused_body, gpt)
    return model
