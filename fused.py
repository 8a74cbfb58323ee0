"""
The fused path for ddl.py's expanded residual state (d_v > 1: DDL-CC, DDL-TC and the write-only
control): Triton kernels, forward and backward, for what the (B, T, d, d_v) state goes
through between two sublayers. Optional: ddl.py never imports this file, and nothing changes unless
you ask for it:

    python train.py --preset=124m --d_v=4 --fused=true        # or: bench.py ... --fused=true
    import fused; fused.install(model)                        # replaces model.body, nothing else

install() refuses a config value it has not declared (SUPPORTED; an undeclared field runs at its default
only) and first runs one forward and backward of a perturbed copy of the model through both bodies (and
ddl.py's in fp64): if any quantity differs by more than rounding, it refuses, naming the first, so the
fast path never trains what ddl.py does not.

Per token, one kernel takes the state X_l, the sublayer's output k~ and the gates v, beta, and gives

    k = k~ / sqrt(|k~|^2 + eps_k^2)                      (§3.1, as ddl.py's unit_direction)
    X_{l+1} = X_l - beta k e^T,  e = k^T X_l - v^T      (Eq. 2.2, Eq. 2.4; the write-only control: e = -v^T)
    x_in[i] = sum_j W[i, j] X_{l+1}[i, j],  c = RMSNorm(x_in)      (§3.2: the *next* sublayer's CC read)

so a sublayer boundary reads the state once and writes it once, where ddl.py's compiled reference
passes over it four times. The backward takes the gradients of X_{l+1} and c; one kernel returns those
of X_l, k~, v and beta,

    g = dL/dx_in (RMSNorm's backward),  G = dL/dX_{l+1} + W g,  u = k^T G,  g_X = G - beta k u^T,
    g_k = -beta (G e + X_l u),  g_v = beta u,  g_beta = -u . e   (write-only: g_X = G, g_k = -beta G e)

(g_ names a gradient: g_X = dL/dX_l) and g_k~ from g_k (unit_direction's backward); a second kernel
reduces over tokens for W's and the norm gain's gradients, g_W[i, j] = sum_t g[t, i] X_{l+1}[t, i, j].
X_{l+1}, x_in and g are recomputed from X_l, so the op keeps k~, beta, e and two norms per token for its
backward, and the state X_l only at every SEGMENT-th boundary: the others replay X_l from that one
through Eq. 2.2 (the forward's own arithmetic and rounding, on the saved values); taking k~ and giving
c, it spares torch.compile keeping k and x_in around it.

TC's read spans the last K = conv_kernel tokens, x_in[t, i] = sum_s sum_j w[i, j, s] X_{l+1}[t - s, i, j],
so a token's kernel cannot finish it alone: it writes each tap's sum over d_v, c[s, t, i] = sum_j
w[i, j, s] X_{l+1}[t, i, j] (W and c tap-major, K of CC's one), and the op adds them across tokens
(sum_taps; the norm follows in ddl.py's code, compiled around the op). Its backward reads each tap's
dL/dc[s, t, i] = dL/dx_in[t + s, i] from x_in's gradient, in place of CC's dL/dc, so that no (K, ..., d)
gradient is written. CC is the case K = 1 (the kernels compile as they did before TC).
Measured on H100/H200, with what still costs: docs/performance.md.

Everything is computed in fp32 and rounded to the state's dtype where ddl.py's functions return a
value in it: k (twice, as unit_direction), X_{l+1}, x_in and c. ddl.py's eager products (beta e,
X * mix) round more often, so in bf16 the kernels are slightly closer to exact than eager ddl.py.
The kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before
importing this file), which is how the tests pin them to ddl.py.
"""
import copy
import dataclasses
import math
import os
import re
import types
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from ddl import ConfigError, TokenCompressor, shift_tokens

try:
    import triton
    import triton.language as tl
except ImportError as e:  # train.py and bench.py print a ConfigError as one line
    raise ConfigError(f"--fused=true needs Triton ({e}): pip install triton, or use --fused=false") from e

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The tile is one token's whole (d, d_v) state, since k^T X and the norms reduce over all of d; a
# program walks TOKENS tokens. d and d_v are compile-time constants, so that Triton sees the state's
# rows as contiguous and loads them in wide vectors. Autotuned on the GPU over tokens and warps.
def _tuned(tokens, warps, key=("d", "d_v", "NORM")):
    configs = [triton.Config(dict(TOKENS=t), num_warps=w) for t in tokens for w in warps]
    return triton.autotune(configs[:1] if INTERPRET else configs, key=list(key))

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

@triton.jit
def _replay_one(x, K, RK, E, BETA, t, i, j, mi, mj, live, k_scale, X, d: tl.constexpr, d_v: tl.constexpr):
    """X_{c+1} from X_c (x) through Eq. 2.2 again, from boundary c's saved k~, 1/rms(k~), e and beta."""
    kt = tl.load(K + t * d + i, mask=mi, other=0.0).to(tl.float32)
    k = _direction(kt, tl.load(RK + t, mask=live, other=0.0), k_scale, K)
    e = tl.load(E + t * d_v + j, mask=mj, other=0.0)
    return _new_state(x, k, e, tl.load(BETA + t, mask=live, other=0.0).to(tl.float32), X)

@triton.jit
def _replay(x, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN: tl.constexpr, t, i, j, mi, mj,
            live, k_scale, X, d: tl.constexpr, d_v: tl.constexpr):
    """X_l from its segment's stored state X_c (x): Eq. 2.2 again for the N_CHAIN boundaries c..l-1, from
    each one's saved (k~, 1/rms(k~), e, beta), rounded as the forward rounded: X_l as the forward made it
    (bit for bit in the interpreter; on the GPU where the compiler contracts x - beta k e alike). The
    boundaries come as separate arguments, not a tuple, which torch.compile's kernel capture does not take."""
    if N_CHAIN >= 1:
        x = _replay_one(x, K1, RK1, E1, B1, t, i, j, mi, mj, live, k_scale, X, d, d_v)
    if N_CHAIN >= 2:
        x = _replay_one(x, K2, RK2, E2, B2, t, i, j, mi, mj, live, k_scale, X, d, d_v)
    if N_CHAIN >= 3:
        x = _replay_one(x, K3, RK3, E3, B3, t, i, j, mi, mj, live, k_scale, X, d, d_v)
    return x

@_tuned(tokens=(1, 4), warps=(4, 8, 16), key=("d", "d_v", "NORM", "TAPS"))
@triton.jit
def _step_fwd(X, KT, V, BETA, W, GAMMA, XN, C, E, RK, RSTD, n_tok, k_eps2, k_scale,
              d: tl.constexpr, d_v: tl.constexpr, ERASE: tl.constexpr, NORM: tl.constexpr, TAPS: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]  # feature index, (BLOCK_D, 1)
    j = tl.arange(0, BLOCK_V)[None, :]  # value channel, (1, BLOCK_V)
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < d_v) & live
        m = mi & mj
        x = tl.load(X + (t * d + i) * d_v + j, mask=m, other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        rk = tl.rsqrt(tl.sum(kt * kt) / d + k_eps2)  # unit_direction's RMSNorm, eps = eps_k^2 / d
        k = _direction(kt, rk, k_scale, KT)
        v = tl.load(V + t * d_v + j, mask=mj, other=0.0).to(tl.float32)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        if ERASE:
            e = tl.sum(k * x, axis=0, keep_dims=True) - v  # Eq. 2.4's readout error
        else:
            e = -v
        xn = _new_state(x, k, e, beta, X)  # Eq. 2.2
        tl.store(XN + (t * d + i) * d_v + j, xn.to(XN.dtype.element_ty), mask=m)
        tl.store(E + t * d_v + j, e, mask=mj)
        tl.store(RK + t, rk, mask=live)
        for s in tl.static_range(TAPS):  # CC: one tap; TC: each tap's sum, summed over tokens by torch
            w = tl.load(W + s * d * d_v + i * d_v + j, mask=(i < d) & (j < d_v), other=0.0).to(tl.float32)
            c = _rounded(tl.sum(w * xn, axis=1, keep_dims=True), X)  # x_in, the next read (TC: one tap's)
            if NORM:  # c = RMSNorm(x_in) with gain gamma (eps 1e-5, as ddl.py's read; CC only)
                r = tl.rsqrt(tl.sum(c * c) / d + 1e-5)
                c = c * r * tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32)
            else:
                r = 1.0
            tl.store(RSTD + t, r, mask=live)
            tl.store(C + s * n_tok * d + t * d + i, c.to(C.dtype.element_ty), mask=mi)

@triton.jit
def _tap_row(t, tap, n_tok, SUMMED: tl.constexpr):
    """The row of dL/dc that tap `tap` of token t reads: TC's summed read x_in[t + tap] (SUMMED), else its
    own tap's c[tap, t]."""
    if SUMMED:
        return t + tap
    return tap * n_tok + t

@triton.jit
def _tap_mask(mask, t, tap, seq_len, SUMMED: tl.constexpr):
    """mask, and (SUMMED) whether token t's tap reaches a read of its own sequence, x_in[t + tap]."""
    if SUMMED:
        return mask & (t % seq_len + tap < seq_len)
    return mask

@_tuned(tokens=(1, 4), warps=(4, 8, 16), key=("d", "d_v", "NORM", "TAPS", "N_CHAIN", "SUMMED"))
@triton.jit
def _step_bwd(GXN, GC, X, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3,
              KT, E, BETA, W, GAMMA, RK, RSTD, G_X, G_KT, G_V, G_BETA, S, n_tok, seq_len, k_scale,
              d: tl.constexpr, d_v: tl.constexpr, ERASE: tl.constexpr, NORM: tl.constexpr, TAPS: tl.constexpr,
              N_CHAIN: tl.constexpr, SUMMED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
              TOKENS: tl.constexpr):
    i = tl.arange(0, BLOCK_D)[:, None]
    j = tl.arange(0, BLOCK_V)[None, :]
    for n in tl.range(0, TOKENS):
        t = tl.program_id(0) * TOKENS + n
        live = t < n_tok
        mi, mj = (i < d) & live, (j < d_v) & live
        m = mi & mj
        x = tl.load(X + (t * d + i) * d_v + j, mask=m, other=0.0).to(tl.float32)  # the segment's stored state
        x = _replay(x, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN, t, i, j, mi, mj, live,
                    k_scale, X, d, d_v)  # X_l
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        rk = tl.load(RK + t, mask=live, other=0.0)
        k = _direction(kt, rk, k_scale, KT)
        e = tl.load(E + t * d_v + j, mask=mj, other=0.0)
        beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
        for tap in tl.static_range(TAPS):  # CC: one tap; TC: one per tap, each read's part of dL/dX_{l+1}
            w = tl.load(W + tap * d * d_v + i * d_v + j, mask=(i < d) & (j < d_v), other=0.0).to(tl.float32)
            g = tl.load(GC + _tap_row(t, tap, n_tok, SUMMED) * d + i,
                        mask=_tap_mask(mi, t, tap, seq_len, SUMMED), other=0.0).to(tl.float32)  # dL/dc
            if NORM:  # RMSNorm's backward: g = r gamma dc - x_in r^3 (sum gamma dc x_in) / d
                xin = _rounded(tl.sum(w * _new_state(x, k, e, beta, X), axis=1, keep_dims=True), X)
                r = tl.load(RSTD + t, mask=live, other=0.0)
                gg = g * tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32)
                s = tl.sum(gg * xin) * r * r * r / d
                g = r * gg - xin * s
                tl.store(S + t, s, mask=live)  # for the weight kernel's recompute of g
            if tap == 0:  # G = dL/dX_{l+1}: the state's own gradient, then each tap's read
                G = tl.load(GXN + (t * d + i) * d_v + j, mask=m, other=0.0).to(tl.float32) + w * g
            else:
                G += w * g
        u = tl.sum(k * G, axis=0, keep_dims=True)  # k^T G, (1, BLOCK_V)
        if ERASE:
            g_x = G - beta * k * u
            g_k = -beta * tl.sum(G * e + x * u, axis=1, keep_dims=True)
        else:
            g_x = G
            g_k = -beta * tl.sum(G * e, axis=1, keep_dims=True)
        g_kt = k_scale * rk * (g_k - kt * rk * rk * tl.sum(g_k * kt) / d)  # unit_direction's backward
        tl.store(G_X + (t * d + i) * d_v + j, g_x.to(G_X.dtype.element_ty), mask=m)
        tl.store(G_KT + t * d + i, g_kt.to(G_KT.dtype.element_ty), mask=mi)
        tl.store(G_V + t * d_v + j, (beta * u).to(G_V.dtype.element_ty), mask=mj)
        tl.store(G_BETA + t, (-tl.sum(u * e)).to(G_BETA.dtype.element_ty), mask=live)

@triton.jit
def _state_again(X, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN: tl.constexpr, KT, E, BETA, RK,
                 t, i, j, live, k_scale, d: tl.constexpr, d_v: tl.constexpr):
    """X_{l+1} of tokens t (features i, channels j) recomputed in fp32: X_l from the kept state through the
    replayed chain, then the step from the kept k~, e and beta."""
    mi = live & (i < d)
    x = tl.load(X + (t * d + i) * d_v + j, mask=mi & (j < d_v), other=0.0).to(tl.float32)
    x = _replay(x, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN, t, i, j, mi, live & (j < d_v),
                live, k_scale, X, d, d_v)  # X_l
    kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
    e = tl.load(E + t * d_v + j, mask=live & (j < d_v), other=0.0)
    beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
    rk = tl.load(RK + t, mask=live, other=0.0)
    return _new_state(x, _direction(kt, rk, k_scale, KT), e, beta, X)  # (BLOCK_T, BLOCK_I, BLOCK_V)

# Tokens per program of the weight's gradient: partial sums (TC: K, n_tok / CHUNK, d, d_v), summed after. The
# interpreter computes every token of a chunk, those past the end too: 8 there, one tile of the first config.
CHUNK = 8 if INTERPRET else 64
WEIGHT_TILES = [triton.Config(dict(BLOCK_I=bi, BLOCK_T=bt), num_warps=w)
                for bi in (16, 32, 64) for bt in (8, 16) for w in (2, 4)]

@triton.autotune(WEIGHT_TILES[:1] if INTERPRET else WEIGHT_TILES,
                 key=["d", "d_v", "NORM", "TAPS", "CHUNK", "N_CHAIN", "SUMMED"])
@triton.jit
def _weight_bwd(GC, X, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3,
                KT, E, BETA, W, GAMMA, RK, RSTD, S, G_W, G_GAMMA, n_tok, seq_len, k_scale,
                CHUNK: tl.constexpr, d: tl.constexpr, d_v: tl.constexpr, NORM: tl.constexpr,
                TAPS: tl.constexpr, N_CHAIN: tl.constexpr, SUMMED: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    # dW[s, i, j] = sum over tokens of g[s, t, i] X_{l+1}[t, i, j] (CC: one tap) and g_gamma[i] = sum of
    # dc[t, i] x_in[t, i] r[t], with X_{l+1}, x_in and g recomputed; this program: features
    # [i0, i0 + BLOCK_I), tokens [t0, t0 + CHUNK)
    i0, t0 = tl.program_id(0) * BLOCK_I, tl.program_id(1) * CHUNK
    tt = tl.arange(0, BLOCK_T)[:, None, None]             # token, (BLOCK_T, 1, 1)
    i = i0 + tl.arange(0, BLOCK_I)[None, :, None]         # feature, (1, BLOCK_I, 1)
    j = tl.arange(0, BLOCK_V)[None, None, :]              # value channel, (1, 1, BLOCK_V)
    if TAPS == 1:  # CC (the loop runs once: the code as before TC's own branch, so the same machine code)
        for tap in tl.static_range(TAPS):
            w = tl.load(W + tap * d * d_v + i * d_v + j, mask=(i < d) & (j < d_v), other=0.0).to(tl.float32)
            g_w = tl.zeros((BLOCK_T, BLOCK_I, BLOCK_V), dtype=tl.float32)  # summed over BLOCK_T at the end
            g_gamma = tl.zeros((BLOCK_T, BLOCK_I, 1), dtype=tl.float32)
            for b in tl.range(0, CHUNK, BLOCK_T):
                t = t0 + b + tt
                live = (t < n_tok) & (b + tt < CHUNK)
                mi = live & (i < d)
                x = tl.load(X + (t * d + i) * d_v + j, mask=mi & (j < d_v), other=0.0).to(tl.float32)
                x = _replay(x, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN, t, i, j, mi,
                            live & (j < d_v), live, k_scale, X, d, d_v)  # X_l
                kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
                e = tl.load(E + t * d_v + j, mask=live & (j < d_v), other=0.0)
                beta = tl.load(BETA + t, mask=live, other=0.0).to(tl.float32)
                rk = tl.load(RK + t, mask=live, other=0.0)
                xn = _new_state(x, _direction(kt, rk, k_scale, KT), e, beta, X)  # (BLOCK_T, BLOCK_I, BLOCK_V)
                g = tl.load(GC + tap * n_tok * d + t * d + i, mask=mi, other=0.0).to(tl.float32)  # dL/dc
                if NORM:
                    xin = _rounded(tl.sum(w * xn, axis=2, keep_dims=True), X)
                    r = tl.load(RSTD + t, mask=live, other=0.0)
                    g_gamma += g * xin * r
                    gamma = tl.load(GAMMA + i, mask=i < d, other=0.0).to(tl.float32)
                    g = r * g * gamma - xin * tl.load(S + t, mask=live, other=0.0)
                g_w += xn * g
            ii = i0 + tl.arange(0, BLOCK_I)[:, None]
            jj = tl.arange(0, BLOCK_V)[None, :]
            tl.store(G_W + tap * tl.num_programs(1) * d * d_v + (tl.program_id(1) * d + ii) * d_v + jj,
                     tl.sum(g_w, axis=0), mask=(ii < d) & (jj < d_v))
            tl.store(G_GAMMA + tl.program_id(1) * d + ii, tl.sum(g_gamma, axis=0), mask=ii < d)
    else:  # TC (no norm): X_{l+1} recomputed once for all taps, a (BLOCK_S, BLOCK_T, BLOCK_I, BLOCK_V) sum
        tl.static_assert(not NORM)
        s = tl.arange(0, BLOCK_S)[:, None, None, None]       # tap, (BLOCK_S, 1, 1, 1)
        g_w = tl.zeros((BLOCK_S, BLOCK_T, BLOCK_I, BLOCK_V), dtype=tl.float32)
        for b in tl.range(0, CHUNK, BLOCK_T):
            t = t0 + b + tt
            live = (t < n_tok) & (b + tt < CHUNK)
            xn = _state_again(X, K1, RK1, E1, B1, K2, RK2, E2, B2, K3, RK3, E3, B3, N_CHAIN, KT, E, BETA, RK,
                              t, i, j, live, k_scale, d, d_v)
            mi = _tap_mask((s < TAPS) & live[None] & (i[None] < d), t[None], s, seq_len, SUMMED)
            g = tl.load(GC + _tap_row(t[None], s, n_tok, SUMMED) * d + i[None], mask=mi,
                        other=0.0)  # each tap's dL/dc
            g_w += xn[None] * g.to(tl.float32)
        ss = tl.arange(0, BLOCK_S)[:, None, None]
        ii = i0 + tl.arange(0, BLOCK_I)[None, :, None]
        jj = tl.arange(0, BLOCK_V)[None, None, :]
        tl.store(G_W + ss * tl.num_programs(1) * d * d_v + (tl.program_id(1) * d + ii) * d_v + jj,
                 tl.sum(g_w, axis=1), mask=(ss < TAPS) & (ii < d) & (jj < d_v))
        i1 = i0 + tl.arange(0, BLOCK_I)
        tl.store(G_GAMMA + tl.program_id(1) * d + i1, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=i1 < d)

def _read_shape(W):
    """d, d_v and the taps of the next read's weights: CC's mix (d, d_v) is one tap; TC's (K, d, d_v)."""
    return (*W.shape, 1) if W.dim() == 2 else (*W.shape[1:], W.shape[0])

def _c_shape(X, W, seq_len=0):
    """c's shape: (..., d) for CC and TC's summed read (seq_len > 0), (K, ..., d) for TC's K tap sums
    (tap-major, as W)."""
    return (*W.shape[:-2 - (seq_len > 0)], *X.shape[:-1])

def sum_taps(c, seq_len):
    """TC's read x_in[t] = sum_s c[s, t - s] from each tap's sums c (K, ..., d), within sequences of seq_len
    tokens (TokenCompressor.sum_taps, on the kernels' tap-major layout)."""
    c = c.reshape(c.shape[0], -1, seq_len, c.shape[-1])  # (K, sequences, T, d)
    return sum(shift_tokens(c[s], s) for s in range(c.shape[0])).reshape(-1, c.shape[-1])

def _blocks(d, d_v):
    return dict(BLOCK_D=triton.next_power_of_2(d), BLOCK_V=triton.next_power_of_2(d_v))

# On CUDA the ops are triton_ops: torch.compile sees their kernels and launches them from its own graph, with
# no Python dispatch per call (a custom op's dispatch and Triton's launcher took about 136 us a call, 48
# calls a step at the 124m size; launched from the graph, the GPU idles for 6% of fused DDL-CC's step, as
# for 5% of the baseline's: docs/performance.md). wrap_triton cannot capture a kernel that Triton's CPU
# interpreter runs, so under it (the tests) they are custom ops, opaque to torch.compile; both use the
# fake implementations below.
_op = torch.library.custom_op if INTERPRET else torch.library.triton_op

def _fp32_per_token(beta, *trailing):
    return beta.new_empty(*beta.shape, *trailing, dtype=torch.float32)

@_op("ddl_fused::step", mutates_args=())
def step_op(X: Tensor, k_tilde: Tensor, v: Tensor, beta: Tensor, W: Tensor, gamma: Optional[Tensor],
            k_eps: float, erase: bool, origin: Optional[Tensor], chain: list[Tensor],
            seq_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """X (..., d, d_v), k~ (..., d), v (..., d_v), beta (...), W (d, d_v) the next CC mix, gamma (d) the next
    norm's gain (None: no norm, c = x_in) -> X_{l+1}, c (..., d) in X's dtype, and in fp32 for the
    backward: e (..., d_v), 1 / rms(k~) and 1 / rms(x_in) (...). For TC's read, W (K, d, d_v) holds the
    K taps' weights (TokenCompressor.tap_weights, tap first), gamma is None and c (K, ..., d) each tap's sum,
    or with seq_len > 0 (the tokens' sequence length) their sum across tokens, x_in (..., d) (sum_taps):
    the backward then reads each tap's dL/dc from x_in's gradient, tokens ahead, not a (K, ..., d) copy.
    origin and chain are for the backward alone (fused_body): the backward keeps origin, the stored state
    of X's segment, instead of X, and replays X from it through chain, the (k~, 1/rms(k~), e, beta) of each
    boundary in between (origin None: it keeps X)."""
    X, k_tilde, v, beta, W = (t.contiguous() for t in (X, k_tilde, v, beta, W))
    d, d_v, taps = _read_shape(W)
    if gamma is not None and taps > 1:  # the kernels norm one read per token, as CC's; TC's is summed after
        raise ValueError(f"fused: a norm gain with {taps} taps: the kernels norm only CC's read, W (d, d_v)")
    if seq_len and W.dim() == 2:
        raise ValueError(f"fused: seq_len={seq_len} with CC's read: only TC's taps are summed across tokens")
    n_tok = beta.numel()
    Xn, c = torch.empty_like(X), X.new_empty(_c_shape(X, W))  # TC: each tap's sum, summed below
    e, rk, rstd = _fp32_per_token(beta, d_v), _fp32_per_token(beta), _fp32_per_token(beta)
    wrap_triton(_step_fwd)[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        X, k_tilde, v, beta, W, W if gamma is None else gamma.contiguous(), Xn, c, e, rk, rstd, n_tok,
        k_eps * k_eps / d, 1 / math.sqrt(d), d, d_v, ERASE=erase, NORM=gamma is not None, TAPS=taps,
        **_blocks(d, d_v))
    if seq_len:
        c = sum_taps(c, seq_len).view(_c_shape(X, W, seq_len))
    return Xn, c, e, rk, rstd

@step_op.register_fake
def _(X, k_tilde, v, beta, W, gamma, k_eps, erase, origin, chain, seq_len):
    d_v = W.shape[-1]  # contiguous outputs, as the op's (it makes its inputs contiguous first)
    per_token = _fp32_per_token(beta, d_v), _fp32_per_token(beta), _fp32_per_token(beta)
    return (X.new_empty(X.shape), X.new_empty(_c_shape(X, W, seq_len)), *per_token)

@_op("ddl_fused::step_backward", mutates_args=())
def step_backward(g_Xn: Tensor, g_c: Tensor, X: Tensor, chain: list[Tensor], k_tilde: Tensor, e: Tensor,
                  beta: Tensor, W: Tensor, gamma: Optional[Tensor], rk: Tensor, rstd: Tensor,
                  erase: bool, seq_len: int) -> list[Tensor]:
    """The gradients of X_l, k~, v, beta, W and gamma (the module docstring's formulas), in their dtypes
    (gamma = None: W's dtype, unused); X_l is replayed from X, its segment's stored state, through chain
    (as step's), and X_{l+1} and x_in are recomputed from X_l; seq_len > 0: g_c is the gradient of TC's
    summed read (step's seq_len)."""
    g_Xn, g_c, X, k_tilde, e, beta, W = (t.contiguous() for t in (g_Xn, g_c, X, k_tilde, e, beta, W))
    n_chain = len(chain) // 4  # the kernels' fixed chain arguments: those past n_chain are never read
    chain = [t.contiguous() for t in chain] + [X] * (4 * MAX_REPLAY - len(chain))
    d, d_v, taps = _read_shape(W)
    n_tok, k_scale = beta.numel(), 1 / math.sqrt(d)
    norm, gamma = gamma is not None, W if gamma is None else gamma.contiguous()  # W: a pointer never read
    g_X, g_k, g_v, g_beta, s = (torch.empty_like(t) for t in (X, k_tilde, e, beta, rk))
    wrap_triton(_step_bwd)[lambda meta: (triton.cdiv(n_tok, meta["TOKENS"]),)](
        g_Xn, g_c, X, *chain, k_tilde, e, beta, W, gamma, rk, rstd, g_X, g_k, g_v, g_beta, s, n_tok, seq_len,
        k_scale, d, d_v, ERASE=erase, NORM=norm, TAPS=taps, N_CHAIN=n_chain, SUMMED=seq_len > 0,
        **_blocks(d, d_v))
    splits = triton.cdiv(n_tok, CHUNK)
    g_W = torch.empty(*W.shape[:-2], splits, d, d_v, device=X.device)  # TC: (K, splits, d, d_v)
    g_gamma = torch.empty(splits, d, device=X.device)
    wrap_triton(_weight_bwd)[lambda meta: (triton.cdiv(d, meta["BLOCK_I"]), splits)](
        g_c, X, *chain, k_tilde, e, beta, W, gamma, rk, rstd, s, g_W, g_gamma, n_tok, seq_len, k_scale, CHUNK,
        d, d_v, norm, taps, n_chain, seq_len > 0, BLOCK_V=triton.next_power_of_2(d_v),
        BLOCK_S=triton.next_power_of_2(taps))
    return [g_X, g_k, g_v, g_beta, g_W.sum(-3).to(W.dtype), g_gamma.sum(0).to(gamma.dtype)]

@step_backward.register_fake
def _(g_Xn, g_c, X, chain, k_tilde, e, beta, W, gamma, rk, rstd, erase, seq_len):
    g_gamma = W.new_empty(W.shape[-2]) if gamma is None else gamma.new_empty(gamma.shape)  # (d,), as the op's
    return [t.new_empty(t.shape) for t in (g_Xn, k_tilde, e, beta, W)] + [g_gamma]

def _save(ctx, inputs, output):
    X, k_tilde, v, beta, W, gamma, _, ctx.erase, origin, chain, ctx.seq_len = inputs
    ctx.v_dtype, ctx.norm, ctx.n_chain = v.dtype, gamma is not None, len(chain)
    _, _, e, rk, rstd = output
    # X_{l+1} and c are recomputed, not kept; X itself is kept only where no origin is given
    ctx.save_for_backward(X if origin is None else origin, k_tilde, e, beta, W, gamma, rk, rstd, *chain)

def _backward(ctx, g_Xn, g_c, *_):
    X, k_tilde, e, beta, W, gamma, rk, rstd, *chain = ctx.saved_tensors
    g_X, g_k, g_v, g_beta, g_W, g_gamma = step_backward(g_Xn, g_c, X, chain, k_tilde, e, beta, W, gamma,
                                                        rk, rstd, ctx.erase, ctx.seq_len)
    return (g_X, g_k, g_v.to(ctx.v_dtype), g_beta, g_W, g_gamma if ctx.norm else None, None, None, None,
            [None] * ctx.n_chain, None)

step_op.register_autograd(_backward, setup_context=_save)

def step(X, k_tilde, v, beta, W, gamma, k_eps, erase, origin=None, chain=(), seq_len=0):
    """The op (step_op), with no segment by default (the backward keeps X) and TC's taps not summed."""
    return step_op(X, k_tilde, v, beta, W, gamma, k_eps, erase, origin, list(chain), seq_len)

def checked_step(X, k_tilde, v, beta, W, gamma, k_eps, erase, origin, chain, seq_len):
    """step() after checking that its inputs have the shapes its kernels assume: one beta per token, a
    state (..., d, d_v) with W's (d, d_v) (TC: (K, d, d_v)). A change in ddl.py that breaks these is refused
    here, by name."""
    d, d_v = W.shape[-2:]
    tokens = tuple(X.shape[:-2])
    for name, t, shape in (("X", X, (*tokens, d, d_v)), ("k_tilde", k_tilde, (*tokens, d)),
                           ("v", v, (*tokens, d_v)), ("beta", beta, tokens)):
        if tuple(t.shape) != shape:
            raise ValueError(f"fused: {name} has shape {tuple(t.shape)}, the kernels take {shape} "
                             "(one beta per token, a (d, d_v) state): fused.py does not run this variant")
    return step(X, k_tilde, v, beta, W, gamma, k_eps, erase, origin, chain, seq_len)

def fused_body(model, X, cache=None):
    """GPT.body with each sublayer boundary as one fused step: the same parameters and equations as
    ResidualBranch.forward (k from the sublayer's output, v and beta from its normed input c)."""
    branches = [b for block in model.blocks for b in (block.attn, block.mlp)]
    if any(b.record for b in branches):  # gate audits record in ddl.py's own forward
        return type(model).body(model, X, cache)
    c = branches[0].input_norm(branches[0].compressor(X, cache))
    k_tilde = branches[0].sublayer(c, cache)
    for n, branch in enumerate(branches):
        nxt = branches[n + 1] if n + 1 < len(branches) else None
        # the next sublayer's compressor and norm; after the last sublayer, the final compressor, no norm
        compressor, gamma = (nxt.compressor, nxt.norm_gain) if nxt else (model.final_compressor, None)
        tc = isinstance(compressor, TokenCompressor)  # TC: the kernels give each tap's sum, and no norm
        W = compressor.tap_weights(X.dtype).permute(2, 0, 1) if tc else compressor.mix.to(X.dtype)
        gamma = None if gamma is None or tc else gamma.to(X.dtype)
        if n % SEGMENT == 0 or not torch.is_grad_enabled():  # keep this state; the next ones replay theirs
            origin, chain = None, []
        beta = branch.gate(c).squeeze(-1)
        # TC's read across tokens, x_in[t] = sum_s c[t - s, :, s]: in the op, or with a cache (generation,
        # whose earlier tokens' sums the cache holds) in ddl.py's code; then the norm, in ddl.py's code
        seq_len = X.shape[1] if tc and cache is None else 0
        Xn, c, e, rk, _ = checked_step(X, k_tilde, branch.value(c), beta, W, gamma, model.config.k_eps,
                                       model.config.residual == "delta", origin, chain, seq_len)
        if tc:
            c = c if seq_len else compressor.sum_taps(c.movedim(0, -1), cache)
            c = nxt.input_norm(c) if nxt else c
        origin = X.detach() if origin is None else origin
        chain = chain + [k_tilde.detach(), rk, e, beta.detach()]
        X = Xn
        if nxt:
            k_tilde = nxt.sublayer(c, cache)
    return c

# Sublayer boundaries per stored state: the backward keeps the state entering every SEGMENT-th boundary
# and replays the others from it (step's origin and chain), so that the fused path keeps ceil(2 L /
# SEGMENT) of the 2 L (B, T, d, d_v) states for its backward; each backward kernel of a boundary reads
# again the k~ of every boundary it replays (a quarter of a state each at d_v = 4). 1 keeps every state.
# Measured in docs/performance.md: at the 124m size, micro-batch 16, one H200, 4 took DDL-CC's peak from
# 13.90 to 12.21 GiB and added 1.9 ms of kernel time per step.
SEGMENT = 4
MAX_REPLAY = 3  # boundaries a backward kernel replays at most (its chain arguments): SEGMENT <= 4

# GPTConfig's fields with the values the fused path runs (None: any; WHY says why where it can). A field
# missing here runs only at its default, so that a new option of ddl.py, once used, is never trained through
# kernels that do not know it, while at its default it costs nothing (install's numerical check still runs).
SUPPORTED = dict(vocab_size=None, n_layer=None, n_head=None, head_dim=None, n_embd=None, block_size=None,
                 residual=("delta", "write"), d_v=range(2, 1 << 16), compressor=("cc", "tc"), embed_conv=None,
                 conv_kernel=None, beta_bound=None, beta_init=None, k_eps=None, v_scale=None,
                 check_spectrum=(False,))  # beta_bound: the kernels take beta as made by ddl.py's gate()
WHY = dict(d_v="> 1 (the fused path is for the expanded state)", residual="delta or write",
           check_spectrum="False (it checks ddl.py's own forward)")

def check_config(gpt):
    """Refuse a config value that the kernels have not been declared to run: one outside SUPPORTED, or a
    field missing there at another value than its default; and a SEGMENT longer than they replay."""
    if not 1 <= SEGMENT <= MAX_REPLAY + 1:
        raise ConfigError(f"fused: SEGMENT={SEGMENT!r} is not supported: must be 1 to {MAX_REPLAY + 1} (the "
                          f"backward kernels take the values of {MAX_REPLAY} boundaries at most to replay)")
    for f in dataclasses.fields(gpt.config):
        value = getattr(gpt.config, f.name)
        if f.name not in SUPPORTED and value != f.default:
            raise ConfigError(f"fused: GPTConfig.{f.name}={value!r} is not declared in fused.SUPPORTED, so "
                              f"fused.py runs it only at its default {f.default!r}: declare it there, with a "
                              "test, or run unfused")
        allowed = SUPPORTED.get(f.name)
        if allowed is not None and value not in allowed:
            why = WHY.get(f.name, f"one of {allowed!r} (fused.SUPPORTED)")
            raise ConfigError(f"fused: {f.name}={value!r} is not supported: must be {why}")
    dtype, device = gpt.wte.weight.dtype, gpt.wte.weight.device
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"fused: dtype={dtype!r} is not supported: must be float32 or bfloat16 "
                          "(the kernels compute in fp32)")
    if not (INTERPRET or device.type == "cuda"):
        raise ConfigError(f"fused: device={device.type!r} is not supported: must be cuda (or "
                          "TRITON_INTERPRET=1 on the CPU: for tests, over 100 s a step at the smoke size)")

def loss_and_grads(model, body, idx):
    """model's loss on idx and every parameter's gradient (zero where body leaves none: compared, not
    skipped), in fp64, with model.body replaced by body."""
    model.body = types.MethodType(body, model)
    model.zero_grad(set_to_none=True)
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    return {"loss": loss.detach().double(), **{n: g.double() for n, g in grads.items()}}

def kind(name):
    """A parameter's name without its layer index: blocks.5.mlp.b_beta -> blocks.mlp.b_beta."""
    return re.sub(r"\.\d+\.", ".", name)

def check_against_ddl(gpt, tol=1e-4, noise=10):
    """Run a perturbed copy of gpt on a few tokens through ddl.py's body in fp64 and in fp32, and through
    fused_body in fp32; refuse the fused path if the loss or any parameter's gradient is further from
    ddl.py's fp64 (relative) than tol and than noise times ddl.py's own fp32 error on that kind of
    parameter in any layer: ddl.py's update then runs a rule that the kernels do not. The second bound is
    for rounding: a gradient that sums terms which nearly cancel, as a scalar b_beta's over three tokens,
    is off by 1e-3 in ddl.py's own fp32, and by how much varies from layer to layer. (ddl.py's fp64 is not
    exact: it computes the gate, v, RoPE and the loss's logits in fp32, an error of 1e-5 on that b_beta.)"""
    gen = torch.Generator().manual_seed(0)
    ref = copy.deepcopy(gpt).float()
    with torch.no_grad():  # away from the identity-style inits, where a changed input could hide
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    exact, device = copy.deepcopy(ref).double(), gpt.wte.weight.device
    idx = torch.randint(0, gpt.config.vocab_size, (1, min(4, gpt.config.block_size)), generator=gen)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: TF32 alone differs by 1e-3
    try:
        with torch.autocast(device.type, enabled=False):  # install() called inside autocast: fp64 stays fp64
            want, own, got = (loss_and_grads(m, body, idx.to(device)) for m, body in
                              ((exact, type(gpt).body), (ref, type(gpt).body), (ref, fused_body)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for kernel in (_step_fwd, _step_bwd, _weight_bwd):
        kernel.cache.clear()  # tiles autotuned on the check's few tokens must not serve the real run
    off = lambda x, name: (x[name] - want[name]).abs().max().item() / (want[name].abs().max().item() + 1e-12)
    rounding = {}
    for name in want:  # an fp32 overflow that fp64 escapes (inf) sets no limit
        r = off(own, name)
        rounding[kind(name)] = max(rounding.get(kind(name), 0.0), r if math.isfinite(r) else 0.0)
    for name in want:
        err, limit = off(got, name), max(tol, noise * rounding[kind(name)])
        if not err <= limit:
            raise ConfigError(f"fused: fused.py disagrees with ddl.py on this model: {name} "
                              f"{'' if name == 'loss' else 'gradient '}off by {err:.3g} (relative to ddl.py "
                              f"in fp64), over its limit {limit:.2g} ({tol:g}, or {noise:g} times ddl.py's "
                              f"own fp32 error on {kind(name)} in any layer, {rounding[kind(name)]:.2g}); "
                              "the first quantity that differs, the loss first, then parameters in order: "
                              "make fused.py compute what ddl.py does, or run unfused")

def install(model):
    """Run model's state updates through the fused kernels (replaces model.body, nothing else), after
    checking its config and one forward and backward against ddl.py's own."""
    gpt = getattr(model, "_orig_mod", model)  # torch.compile(model): install on the GPT it wraps
    check_config(gpt)
    check_against_ddl(gpt)
    gpt.body = types.MethodType(fused_body, gpt)
    return model
