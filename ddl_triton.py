"""
Triton kernels for ddl.delta_step on the GPU: the delta rewrite of Eq. 2.2 fused with the unit
normalisation of k and with the next compressor's read of the new state, forward and backward.

Why a kernel: torch.compile reduces the (d, d_v) state over d with a stride of d_v (it indexes the
reductions by (token, j)), re-reads the state for every reduction and runs the compressor's backward
as separate passes; on an H100 that cost DDL-CC about 0.7 ms per sublayer in the backward alone.
Here one program owns whole tokens, so every reduction reads the state once, contiguously:
forward 1 read + 1 write of the state, backward 2 reads + 1 write.

The functions mirror ddl.delta_step_forward / ddl.delta_step_backward line by line (the CPU
implementation, which test_ddl.py checks against autograd in float64); test_ddl.py runs these
kernels against them in Triton's interpreter, train.py --mode=bench on the GPU.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


# One program owns whole tokens: the (d, d_v) state of a token is a (d, d_v) tile (padded to powers
# of 2 and masked) with j, the contiguous axis, inside each thread, so sums over j stay in registers
# and each sum over d is one reduction for all d_v channels at once.

@triton.jit
def _forward_kernel(X, KT, V, BETA, W, XN, TAPS, d, eps2, DV: tl.constexpr, S: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    t = tl.program_id(0)                                                    # one token per program
    i, j, s = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_S)
    mi, mj = i < d, j < DV
    m, ij = mi[:, None] & mj[None, :], i[:, None] * DV + j[None, :]
    x = tl.load(X + t * d * DV + ij, mask=m, other=0.0).to(tl.float32)
    kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
    k = kt / tl.sqrt(tl.sum(kt * kt, 0) + eps2)                              # §3.1
    v = tl.load(V + t * DV + j, mask=mj, other=0.0)
    delta = tl.load(BETA + t) * (v - tl.sum(k[:, None] * x, 0))               # beta (v - k^T X)
    xn = (x + k[:, None] * delta[None, :]).to(XN.dtype.element_ty)           # Eq. 2.2
    tl.store(XN + t * d * DV + ij, xn, mask=m)
    if S > 0:                                                               # the next compressor's taps
        ms = m[:, :, None] & (s < S)[None, None, :]
        w = tl.load(W + ij[:, :, None] * S + s[None, None, :], mask=ms, other=0.0).to(tl.float32)
        taps = tl.sum(xn.to(tl.float32)[:, :, None] * w, 1)
        tl.store(TAPS + (t * d + i[:, None]) * S + s[None, :], taps.to(TAPS.dtype.element_ty),
                 mask=mi[:, None] & (s < S)[None, :])


@triton.jit
def _backward_kernel(GX, GT, X, KT, V, BETA, W, DX, DKT, DVAL, DBETA, d, eps2, DV: tl.constexpr,
                     S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    t = tl.program_id(0)                                                    # one token per program
    i, j = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V)
    mi, mj = i < d, j < DV
    m, ij = mi[:, None] & mj[None, :], i[:, None] * DV + j[None, :]
    x = tl.load(X + t * d * DV + ij, mask=m, other=0.0).to(tl.float32)
    kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
    rinv = 1.0 / tl.sqrt(tl.sum(kt * kt, 0) + eps2)
    k = kt * rinv
    beta = tl.load(BETA + t)
    e = tl.load(V + t * DV + j, mask=mj, other=0.0) - tl.sum(k[:, None] * x, 0)
    delta = beta * e
    G = tl.load(GX + t * d * DV + ij, mask=m, other=0.0).to(tl.float32)
    for s in tl.static_range(S):  # the next compressor's read: its gradient joins G
        w = tl.load(W + ij * S + s, mask=m, other=0.0).to(tl.float32)
        G += w * tl.load(GT + (t * d + i) * S + s, mask=mi, other=0.0).to(tl.float32)[:, None]
    g = tl.sum(k[:, None] * G, 0)                                            # k^T G
    bg = beta * g
    tl.store(DX + t * d * DV + ij, (G - k[:, None] * bg[None, :]).to(DX.dtype.element_ty), mask=m)
    dk = tl.sum(G * delta[None, :] - x * bg[None, :], 1)                     # G delta - X beta g
    dkt = rinv * (dk - k * tl.sum(k * dk, 0))                                # through k = k~ / |k~|_eps
    tl.store(DKT + t * d + i, dkt.to(DKT.dtype.element_ty), mask=mi)
    tl.store(DVAL + t * DV + j, bg, mask=mj)
    tl.store(DBETA + t, tl.sum(g * e, 0))


@triton.jit
def _dW_kernel(XN, GT, DW, n_tok, d, DV: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_F: tl.constexpr, CHUNK: tl.constexpr):
    # partial sums of dW[i, j, s] = sum_t X'[t, i, j] gtaps[t, i, s] over a chunk of tokens, for a block
    # of the flattened (i, j) features: (token, feature) tiles, contiguous along the features
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    mf = f < d * DV
    for s in tl.static_range(S):
        acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for n in range(0, CHUNK, BLOCK_N):
            t = tl.program_id(1) * CHUNK + n + tl.arange(0, BLOCK_N)
            mt = (t < n_tok)[:, None] & mf[None, :]
            xn = tl.load(XN + t[:, None] * d * DV + f[None, :], mask=mt, other=0.0).to(tl.float32)
            gt = tl.load(GT + (t[:, None] * d + f[None, :] // DV) * S + s, mask=mt, other=0.0).to(tl.float32)
            acc += tl.sum(xn * gt, 0)
        tl.store(DW + (tl.program_id(1) * d * DV + f) * S + s, acc, mask=mf)


# Launch shapes, measured on an H100: see README.
FORWARD_WARPS, BACKWARD_WARPS = 4, 4
DW_SHAPE = dict(BLOCK_N=8, BLOCK_F=1024, CHUNK=256, num_warps=4)


def _blocks(d, dv):
    return dict(BLOCK_D=triton.next_power_of_2(d), BLOCK_V=triton.next_power_of_2(dv))


@triton_op("ddl::delta_step_triton", mutates_args=())
def delta_step(X: torch.Tensor, k_tilde: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               W: Optional[torch.Tensor], k_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ddl.delta_step_forward as one kernel. X (..., d, d_v), k_tilde (..., d), v (..., d_v), beta (...),
    W (d, d_v, S) or None; returns X' and the taps (..., d, S) (empty without W). A triton_op, so
    torch.compile traces into it and launches the kernel from its own compiled code."""
    lead, (d, dv) = X.shape[:-2], X.shape[-2:]
    Xf, kt = X.reshape(-1, d, dv).contiguous(), k_tilde.reshape(-1, d).contiguous()
    Vf, Bf = v.reshape(-1, dv).float().contiguous(), beta.reshape(-1).float().contiguous()
    n, S = Xf.shape[0], W.shape[-1] if W is not None else 0
    XN, TAPS = torch.empty_like(Xf), X.new_empty(n, d, S)
    wrap_triton(_forward_kernel)[(n,)](
        Xf, kt, Vf, Bf, W.contiguous() if S else Xf, XN, TAPS, d, k_eps * k_eps, DV=dv, S=S,
        **_blocks(d, dv), BLOCK_S=triton.next_power_of_2(max(S, 1)), num_warps=FORWARD_WARPS)
    return XN.view(X.shape), TAPS.view(*lead, d, S)


@triton_op("ddl::delta_step_grad_triton", mutates_args=())
def delta_step_grad(gX: torch.Tensor, gtaps: torch.Tensor, X: torch.Tensor, k_tilde: torch.Tensor,
                    v: torch.Tensor, beta: torch.Tensor, W: Optional[torch.Tensor], Xn: torch.Tensor, k_eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ddl.delta_step_backward as two kernels: the gradients of X, k_tilde, v, beta, and of W."""
    lead, (d, dv) = X.shape[:-2], X.shape[-2:]
    Xf, kt = X.reshape(-1, d, dv).contiguous(), k_tilde.reshape(-1, d).contiguous()
    Vf, Bf = v.reshape(-1, dv).float().contiguous(), beta.reshape(-1).float().contiguous()
    n, S = Xf.shape[0], W.shape[-1] if W is not None else 0
    GX, GT = gX.reshape(Xf.shape).contiguous(), gtaps.reshape(n, d, S).contiguous()
    dX, dkt = torch.empty_like(Xf), torch.empty_like(kt)
    dval, dbeta = torch.empty_like(Vf), torch.empty_like(Bf)
    wrap_triton(_backward_kernel)[(n,)](
        GX, GT, Xf, kt, Vf, Bf, W.contiguous() if S else Xf, dX, dkt, dval, dbeta, d, k_eps * k_eps,
        DV=dv, S=S, **_blocks(d, dv), num_warps=BACKWARD_WARPS)
    dW = X.new_empty(0)
    if S:
        chunks = triton.cdiv(n, DW_SHAPE["CHUNK"])
        parts = torch.empty(chunks, d, dv, S, dtype=torch.float32, device=X.device)
        wrap_triton(_dW_kernel)[(triton.cdiv(d * dv, DW_SHAPE["BLOCK_F"]), chunks)](
            Xn.reshape(Xf.shape).contiguous(), GT, parts, n, d, DV=dv, S=S, **DW_SHAPE)
        dW = parts.sum(0).to(W.dtype)
    return (dX.view(X.shape), dkt.view(k_tilde.shape), dval.view(v.shape).to(v.dtype),
            dbeta.view(beta.shape).to(beta.dtype), dW)
