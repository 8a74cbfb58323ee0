"""
The fused path for ddl.py's expanded residual state (d_v > 1) with the channel compressor (DDL-CC, and
the write-only control): Triton kernels, forward and backward, for what the (B, T, d, d_v) state goes
through between two sublayers. Optional: ddl.py never imports this file, and nothing changes unless
you ask for it:

    python train.py --preset=124m --d_v=4 --fused=true        # or: bench.py ... --fused=true
    import fused; fused.install(model)                        # replaces model.body, nothing else

Per token, one kernel takes the state X_l, the sublayer's output k~ and the gates v, beta, and gives

    k = k~ / sqrt(|k~|^2 + eps_k^2)                      (§3.1, as ddl.py's unit_direction)
    X_{l+1} = X_l - beta k e^T,  e = k^T X_l - v^T      (Eq. 2.2, Eq. 2.4; the write-only control: e = -v^T)
    x_in[i] = sum_j W[i, j] X_{l+1}[i, j],  c = RMSNorm(x_in)      (§3.2: the *next* sublayer's CC read)

so a sublayer boundary reads the state once and writes it once, where ddl.py's compiled reference
passes over it four times. The backward takes the gradients of X_{l+1} and c; one kernel returns those
of X_l, k~, v and beta,

    g = dL/dx_in (RMSNorm's backward),  G = dL/dX_{l+1} + W g,  u = k^T G,  dX_l = G - beta k u^T,
    dk = -beta (G e + X_l u),  dv = beta u,  dbeta = -u . e   (write-only: dX_l = G, dk = -beta G e)

and dk~ from dk (unit_direction's backward); a second reduces over tokens for W's and the norm gain's
gradients, dW[i, j] = sum_t g[t, i] X_{l+1}[t, i, j]. X_{l+1}, x_in and g are recomputed from X_l, so
the op keeps X_l, k~, beta, e and two norms per token for its backward; taking k~ and giving c, it
spares torch.compile keeping k and x_in around it (1.1 GiB at the 124m size, measured). TC's read spans
neighbouring tokens and is not fused. Measured on H100/H200, with what still costs: docs/performance.md.

Everything is computed in fp32 and rounded to the state's dtype where ddl.py's functions return a
value in it: k (twice, as unit_direction), X_{l+1}, x_in and c. ddl.py's eager products (beta e,
X * mix) round more often, so in bf16 the kernels are slightly closer to exact than eager ddl.py.
The kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before
importing this file), which is how the tests pin them to ddl.py.
"""
import math
import os
import types
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ddl import ConfigError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The tile is one token's whole (d, d_v) state, since k^T X and the norms reduce over all of d; a
# program walks TOKENS tokens. d and d_v are compile-time constants, so that Triton sees the state's
# rows as contiguous and loads them in wide vectors. Autotuned on the GPU over tokens and warps.
def _tuned(tokens, warps):
    configs = [triton.Config(dict(TOKENS=t), num_warps=w) for t in tokens for w in warps]
    return triton.autotune(configs[:1] if INTERPRET else configs, key=["d", "dv", "NORM"])

@triton.jit
def _rounded(x, like):
    """x as stored in like's dtype, back in fp32: where ddl.py holds a value in the autocast dtype."""
    return x.to(like.dtype.element_ty).to(tl.float32)

@triton.jit
def _direction(kt, rk, k_scale, KT):
    """k = RMSNorm(k~) / sqrt(d) (k_scale = 1 / sqrt(d)), rounded as unit_direction's two steps are."""
    return _rounded(_rounded(kt * rk, KT) * k_scale, KT)

@triton.jit
def _new_state(x, k, e, beta, X):
    """X_{l+1} = X_l - beta k e^T (Eq. 2.2), as stored."""
    return _rounded(x - beta * k * e, X)

@_tuned(tokens=(1, 4), warps=(4, 8, 16))
@triton.jit
def _step_fwd(X, KT, V, BETA, W, GAMMA, XN, C, E, RK, RSTD, n_tok, k_eps2, k_scale, d: tl.constexpr, dv: tl.constexpr,
              ERASE: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]  # feature index, (BLOCK_D, 1)
    j = tl.arange(0, BLOCK_V)[None, :]  # value channel, (1, BLOCK_V)
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < dv) & live
        m = mi & mj
        x = tl.load(X + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        rk = tl.rsqrt(tl.sum(kt * kt) / d + k_eps2)  # unit_direction's RMSNorm, eps = eps_k^2 / d
        k = _direction(kt, rk, k_scale, KT)
        v = tl.load(V + t * dv + j, mask=mj, other=0.0).to(tl.float32)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        if ERASE:
            e = tl.sum(k * x, axis=0, keep_dims=True) - v  # Eq. 2.4's readout error
        else:
            e = -v
        xn = _new_state(x, k, e, beta, X)  # Eq. 2.2
        tl.store(XN + (t * d + i) * dv + j, xn.to(XN.dtype.element_ty), mask=m)
        tl.store(E + t * dv + j, e, mask=mj)
        tl.store(RK + t, rk, mask=live)
        w = tl.load(W + i * dv + j, mask=(i < d) & (j < dv), other=0.0).to(tl.float32)
        c = _rounded(tl.sum(w * xn, axis=1, keep_dims=True), X)  # x_in, the next CC read
        if NORM:  # c = RMSNorm(x_in) with gain gamma (eps 1e-5, as ddl.py's read)
            r = tl.rsqrt(tl.sum(c * c) / d + 1e-5)
            c = c * r * tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32)
        else:
            r = 1.0
        tl.store(RSTD + t, r, mask=live)
        tl.store(C + t * d + i, c.to(C.dtype.element_ty), mask=mi)

@_tuned(tokens=(1, 4), warps=(4, 8, 16))
@triton.jit
def _step_bwd(GXN, GC, X, KT, E, BETA, W, GAMMA, RK, RSTD, DX, DKT, DV, DBETA, S, n_tok, k_scale, d: tl.constexpr,
              dv: tl.constexpr, ERASE: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
              TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]
    j = tl.arange(0, BLOCK_V)[None, :]
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < dv) & live
        m = mi & mj
        x = tl.load(X + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        rk = tl.load(RK + t, mask=live, other=0.0)
        k = _direction(kt, rk, k_scale, KT)
        e = tl.load(E + t * dv + j, mask=mj, other=0.0)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        w = tl.load(W + i * dv + j, mask=(i < d) & (j < dv), other=0.0).to(tl.float32)
        g = tl.load(GC + t * d + i, mask=mi, other=0.0).to(tl.float32)  # dL/dc, (BLOCK_D, 1)
        if NORM:  # RMSNorm's backward: g = r gamma dc - x_in r^3 (sum gamma dc x_in) / d
            xin = _rounded(tl.sum(w * _new_state(x, k, e, beta, X), axis=1, keep_dims=True), X)
            r = tl.load(RSTD + t, mask=live, other=0.0)
            gg = g * tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32)
            s = tl.sum(gg * xin) * r * r * r / d
            g = r * gg - xin * s
            tl.store(S + t, s, mask=live)  # for the weight kernel's recompute of g
        G = tl.load(GXN + (t * d + i) * dv + j, mask=m, other=0.0).to(tl.float32) + w * g
        u = tl.sum(k * G, axis=0, keep_dims=True)  # k^T G, (1, BLOCK_V)
        if ERASE:
            dx = G - beta * k * u
            dk = -beta * tl.sum(G * e + x * u, axis=1, keep_dims=True)
        else:
            dx = G
            dk = -beta * tl.sum(G * e, axis=1, keep_dims=True)
        dkt = k_scale * rk * (dk - kt * rk * rk * tl.sum(dk * kt) / d)  # unit_direction's backward
        tl.store(DX + (t * d + i) * dv + j, dx.to(DX.dtype.element_ty), mask=m)
        tl.store(DKT + t * d + i, dkt.to(DKT.dtype.element_ty), mask=mi)
        tl.store(DV + t * dv + j, (beta * u).to(DV.dtype.element_ty), mask=mj)
        tl.store(DBETA + t, (-tl.sum(u * e)).to(DBETA.dtype.element_ty), mask=live)

CHUNK = 64  # tokens per program of the weight's gradient: partial sums (n_tok / CHUNK, d, d_v), added up after

@triton.autotune([triton.Config(dict(BLOCK_I=bi, BLOCK_T=bt), num_warps=w) for bi in (16, 32, 64) for bt in (8, 16)
                  for w in (2, 4)][:1 if INTERPRET else None], key=["d", "dv", "NORM", "CHUNK"])
@triton.jit
def _weight_bwd(GC, X, KT, E, BETA, W, GAMMA, RK, RSTD, S, DW, DGAMMA, n_tok, k_scale, CHUNK: tl.constexpr, d: tl.constexpr,
                dv: tl.constexpr, NORM: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    # dW[i, j] = sum over tokens of g[t, i] X_{l+1}[t, i, j] and dgamma[i] = sum of dc[t, i] x_in[t, i] r[t],
    # with X_{l+1}, x_in and g recomputed; this program: features [i0, i0 + BLOCK_I), tokens [t0, t0 + CHUNK)
    i0, t0 = tl.program_id(0) * BLOCK_I, tl.program_id(1) * CHUNK
    tt = tl.arange(0, BLOCK_T)[:, None, None]             # token, (BLOCK_T, 1, 1)
    i = i0 + tl.arange(0, BLOCK_I)[None, :, None]         # feature, (1, BLOCK_I, 1)
    j = tl.arange(0, BLOCK_V)[None, None, :]              # value channel, (1, 1, BLOCK_V)
    w = tl.load(W + i * dv + j, mask=(i < d) & (j < dv), other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_T, BLOCK_I, BLOCK_V), dtype=tl.float32)  # summed over its BLOCK_T rows at the end
    dgamma = tl.zeros((BLOCK_T, BLOCK_I, 1), dtype=tl.float32)
    for b in tl.range(0, CHUNK, BLOCK_T):
        t = t0 + b + tt
        live = (t < n_tok) & (b + tt < CHUNK)
        mi = live & (i < d)
        x = tl.load(X + (t * d + i) * dv + j, mask=mi & (j < dv), other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        e = tl.load(E + t * dv + j, mask=live & (j < dv), other=0.0)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        rk = tl.load(RK + t, mask=live, other=0.0)
        xn = _new_state(x, _direction(kt, rk, k_scale, KT), e, beta, X)  # (BLOCK_T, BLOCK_I, BLOCK_V)
        g = tl.load(GC + t * d + i, mask=mi, other=0.0).to(tl.float32)  # dL/dc, (BLOCK_T, BLOCK_I, 1)
        if NORM:
            xin = _rounded(tl.sum(w * xn, axis=2, keep_dims=True), X)
            r = tl.load(RSTD + t, mask=live, other=0.0)
            dgamma += g * xin * r
            g = r * g * tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32) - xin * tl.load(S + t, mask=live, other=0.0)
        dw += xn * g
    ii = i0 + tl.arange(0, BLOCK_I)[:, None]
    jj = tl.arange(0, BLOCK_V)[None, :]
    tl.store(DW + (tl.program_id(1) * d + ii) * dv + jj, tl.sum(dw, axis=0), mask=(ii < d) & (jj < dv))
    tl.store(DGAMMA + tl.program_id(1) * d + ii, tl.sum(dgamma, axis=0), mask=ii < d)

def _blocks(d, dv):
    return dict(BLOCK_D=triton.next_power_of_2(d), BLOCK_V=triton.next_power_of_2(dv))

def _fp32_per_token(beta, *trailing):
    return beta.new_empty(*beta.shape, *trailing, dtype=torch.float32)

@torch.library.custom_op("ddl_fused::step", mutates_args=())
def step(X: Tensor, k_tilde: Tensor, v: Tensor, beta: Tensor, W: Tensor, gamma: Optional[Tensor], k_eps: float,
         erase: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """X (..., d, d_v), k~ (..., d), v (..., d_v), beta (...), W (d, d_v) the next CC mix, gamma (d) the next
    norm's gain (None: no norm, c = x_in) -> X_{l+1}, c (..., d) in X's dtype, and in fp32 for the
    backward: e (..., d_v), 1 / rms(k~) and 1 / rms(x_in) (...)."""
    X, k_tilde, v, beta, W = (t.contiguous() for t in (X, k_tilde, v, beta, W))
    d, dv = W.shape
    n_tok = beta.numel()
    Xn, c = torch.empty_like(X), X.new_empty(X.shape[:-1])
    e, rk, rstd = _fp32_per_token(beta, dv), _fp32_per_token(beta), _fp32_per_token(beta)
    _step_fwd[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        X, k_tilde, v, beta, W, W if gamma is None else gamma.contiguous(), Xn, c, e, rk, rstd, n_tok,
        k_eps * k_eps / d, 1 / math.sqrt(d), d, dv, ERASE=erase, NORM=gamma is not None, **_blocks(d, dv))
    return Xn, c, e, rk, rstd

@step.register_fake
def _(X, k_tilde, v, beta, W, gamma, k_eps, erase):
    dv = W.shape[1]  # contiguous outputs, as the op's (it makes its inputs contiguous first)
    return (X.new_empty(X.shape), X.new_empty(X.shape[:-1]), _fp32_per_token(beta, dv), _fp32_per_token(beta),
            _fp32_per_token(beta))

@torch.library.custom_op("ddl_fused::step_backward", mutates_args=())
def step_backward(g_Xn: Tensor, g_c: Tensor, X: Tensor, k_tilde: Tensor, e: Tensor, beta: Tensor, W: Tensor,
                  gamma: Optional[Tensor], rk: Tensor, rstd: Tensor, erase: bool) -> list[Tensor]:
    """The gradients of X_l, k~, v, beta, W and gamma (the module docstring's formulas), in their dtypes
    (gamma = None: W's dtype, unused); X_{l+1} and x_in are recomputed from X_l."""
    g_Xn, g_c, X, k_tilde, e, beta, W = (t.contiguous() for t in (g_Xn, g_c, X, k_tilde, e, beta, W))
    d, dv = W.shape
    n_tok, k_scale = beta.numel(), 1 / math.sqrt(d)
    norm, gamma = gamma is not None, W if gamma is None else gamma.contiguous()  # W: a pointer never read
    dX, dk, dv_, dbeta, s = (torch.empty_like(t) for t in (X, k_tilde, e, beta, rk))
    _step_bwd[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        g_Xn, g_c, X, k_tilde, e, beta, W, gamma, rk, rstd, dX, dk, dv_, dbeta, s, n_tok, k_scale, d, dv,
        ERASE=erase, NORM=norm, **_blocks(d, dv))
    splits = triton.cdiv(n_tok, CHUNK)
    dW, dgamma = torch.empty(splits, d, dv, device=X.device), torch.empty(splits, d, device=X.device)
    _weight_bwd[lambda meta: (triton.cdiv(d, meta["BLOCK_I"]), splits)](
        g_c, X, k_tilde, e, beta, W, gamma, rk, rstd, s, dW, dgamma, n_tok, k_scale, CHUNK, d, dv, norm,
        BLOCK_V=triton.next_power_of_2(dv))
    return [dX, dk, dv_, dbeta, dW.sum(0).to(W.dtype), dgamma.sum(0).to(gamma.dtype)]

@step_backward.register_fake
def _(g_Xn, g_c, X, k_tilde, e, beta, W, gamma, rk, rstd, erase):
    dgamma = W.new_empty(W.shape[0]) if gamma is None else gamma.new_empty(gamma.shape)
    return [t.new_empty(t.shape) for t in (X, k_tilde, e, beta, W)] + [dgamma]

def _save(ctx, inputs, output):
    X, k_tilde, v, beta, W, gamma, _, ctx.erase = inputs
    ctx.v_dtype, ctx.norm = v.dtype, gamma is not None
    _, _, e, rk, rstd = output
    ctx.save_for_backward(X, k_tilde, e, beta, W, gamma, rk, rstd)  # X_{l+1} and c are recomputed, not kept

def _backward(ctx, g_Xn, g_c, *_):
    dX, dk, dv, dbeta, dW, dgamma = step_backward(g_Xn, g_c, *ctx.saved_tensors, ctx.erase)
    return dX, dk, dv.to(ctx.v_dtype), dbeta, dW, dgamma if ctx.norm else None, None, None

step.register_autograd(_backward, setup_context=_save)

def fused_body(model, X):
    """GPT.body with each sublayer boundary as one fused step: the same parameters and equations."""
    branches = [b for block in model.blocks for b in (block.attn, block.mlp)]
    if any(b.record for b in branches):  # gate audits record in ddl.py's own forward
        return type(model).body(model, X)
    c, k_tilde = branches[0].read(branches[0].compressor(X))
    for n, branch in enumerate(branches):
        nxt = branches[n + 1] if n + 1 < len(branches) else None
        # the next sublayer's read and norm; after the last sublayer, the readout's read without a norm
        read, gamma = (nxt.compressor, nxt.norm.to(X.dtype)) if nxt else (model.readout, None)
        X, c, *_ = step(X, k_tilde, branch.value(c), branch.beta(c), read.mix.to(X.dtype), gamma,
                        model.config.k_eps, model.config.residual == "delta")
        if nxt:
            k_tilde = nxt.f(c)
    return c

def install(model):
    """Run model's state updates through the fused kernels (replaces model.body, nothing else)."""
    gpt = getattr(model, "_orig_mod", model)  # torch.compile(model): install on the GPT it wraps
    cfg = gpt.config
    for ok, key, value, allowed in (
            (cfg.d_v > 1, "d_v", cfg.d_v, "> 1 (the fused path is for the expanded state)"),
            (cfg.compressor == "cc", "compressor", cfg.compressor, "cc (TC's read spans tokens; it runs in ddl.py)"),
            (cfg.residual in ("delta", "write"), "residual", cfg.residual, "delta or write"),
            (not cfg.check_spectrum, "check_spectrum", cfg.check_spectrum, "False (it checks ddl.py's own forward)"),
            (gpt.wte.weight.dtype in (torch.float32, torch.bfloat16), "dtype", gpt.wte.weight.dtype,
             "float32 or bfloat16 (the kernels compute in fp32)"),
            (INTERPRET or gpt.wte.weight.is_cuda, "device", gpt.wte.weight.device.type,
             "cuda (or TRITON_INTERPRET=1 on the CPU)")):
        if not ok:
            raise ConfigError(f"fused: {key}={value!r} is not supported: must be {allowed}")
    gpt.body = types.MethodType(fused_body, gpt)
    return model
