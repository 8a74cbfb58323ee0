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
import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(X, KT, V, BETA, W, XN, TAPS, n_tok, d, DV, S, eps2,
                    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                    TOK: tl.constexpr, HAS_W: tl.constexpr):
    i, j, s = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_S)
    ij = i[:, None] * DV + j[None, :]                      # the (d, d_v) state of one token
    isr = i[:, None] * S + s[None, :]                      # the (d, S) taps of one token
    mw = ((i < d)[:, None] & (j < DV)[None, :])[:, :, None] & (s < S)[None, None, :]
    if HAS_W:
        w = tl.load(W + ij[:, :, None] * S + s[None, None, :], mask=mw, other=0.0).to(tl.float32)
    for n in range(TOK):
        t = tl.program_id(0) * TOK + n
        mi, mj = (i < d) & (t < n_tok), (j < DV) & (t < n_tok)
        mij = mi[:, None] & mj[None, :]
        x = tl.load(X + t * d * DV + ij, mask=mij, other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        k = kt / tl.sqrt(tl.sum(kt * kt, 0) + eps2)                            # §3.1
        v = tl.load(V + t * DV + j, mask=mj, other=0.0).to(tl.float32)
        beta = tl.load(BETA + t, mask=t < n_tok, other=0.0).to(tl.float32)
        delta = beta * (v - tl.sum(k[:, None] * x, 0))                         # beta (v - k^T X)
        xn = (x + k[:, None] * delta[None, :]).to(XN.dtype.element_ty)         # Eq. 2.2
        tl.store(XN + t * d * DV + ij, xn, mask=mij)
        if HAS_W:
            taps = tl.sum(xn.to(tl.float32)[:, :, None] * w, 1)               # sum_j X'[i, j] W[i, j, s]
            tl.store(TAPS + t * d * S + isr, taps.to(TAPS.dtype.element_ty), mask=mi[:, None] & (s < S)[None, :])


@triton.jit
def _backward_kernel(GX, GT, X, KT, V, BETA, W, DX, DKT, DVAL, DBETA, DW, n_tok, d, DV, S, eps2,
                     BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                     TOK: tl.constexpr, HAS_W: tl.constexpr):
    i, j, s = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_S)
    ij = i[:, None] * DV + j[None, :]
    isr = i[:, None] * S + s[None, :]
    ijs = ij[:, :, None] * S + s[None, None, :]
    mw = ((i < d)[:, None] & (j < DV)[None, :])[:, :, None] & (s < S)[None, None, :]
    if HAS_W:
        w = tl.load(W + ijs, mask=mw, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D, BLOCK_V, BLOCK_S), dtype=tl.float32)
    for n in range(TOK):
        t = tl.program_id(0) * TOK + n
        mi, mj = (i < d) & (t < n_tok), (j < DV) & (t < n_tok)
        mij = mi[:, None] & mj[None, :]
        x = tl.load(X + t * d * DV + ij, mask=mij, other=0.0).to(tl.float32)
        kt = tl.load(KT + t * d + i, mask=mi, other=0.0).to(tl.float32)
        rinv = 1.0 / tl.sqrt(tl.sum(kt * kt, 0) + eps2)
        k = kt * rinv
        beta = tl.load(BETA + t, mask=t < n_tok, other=0.0).to(tl.float32)
        e = tl.load(V + t * DV + j, mask=mj, other=0.0).to(tl.float32) - tl.sum(k[:, None] * x, 0)
        delta = beta * e
        G = tl.load(GX + t * d * DV + ij, mask=mij, other=0.0).to(tl.float32)
        if HAS_W:  # the next compressor's read: its gradient joins G, and dW = sum_t X' gtaps
            gt = tl.load(GT + t * d * S + isr, mask=mi[:, None] & (s < S)[None, :], other=0.0).to(tl.float32)
            G += tl.sum(w * gt[:, None, :], 2)
            xn = (x + k[:, None] * delta[None, :]).to(DX.dtype.element_ty).to(tl.float32)
            dw += xn[:, :, None] * gt[:, None, :]
        g = tl.sum(k[:, None] * G, 0)                                          # k^T G
        bg = beta * g
        tl.store(DX + t * d * DV + ij, (G - k[:, None] * bg[None, :]).to(DX.dtype.element_ty), mask=mij)
        dk = tl.sum(G * delta[None, :] - x * bg[None, :], 1)                   # G delta - X beta g
        dkt = rinv * (dk - k * tl.sum(k * dk, 0))                              # through k = k~ / |k~|_eps
        tl.store(DKT + t * d + i, dkt.to(DKT.dtype.element_ty), mask=mi)
        tl.store(DVAL + t * DV + j, bg, mask=mj)
        tl.store(DBETA + t, tl.sum(g * e, 0), mask=t < n_tok)
    if HAS_W:  # one partial sum per program, added up by the caller
        tl.store(DW + tl.program_id(0) * d * DV * S + ijs, dw, mask=mw)


def _launch(X, W, tok):
    n_tok, d, dv = X.shape
    S = W.shape[-1] if W is not None else 1
    return dict(grid=(triton.cdiv(n_tok, tok),), n_tok=n_tok, d=d, DV=dv, S=S,
                BLOCK_D=triton.next_power_of_2(d), BLOCK_V=triton.next_power_of_2(dv),
                BLOCK_S=triton.next_power_of_2(S), TOK=tok, HAS_W=W is not None,
                num_warps=8 if S == 1 else 16)


def delta_step_forward(X, k_tilde, v, beta, W, k_eps):
    """ddl.delta_step_forward on the GPU. X (..., d, d_v), k_tilde (..., d), v (..., d_v), beta (...),
    W (d, d_v, S) or None; returns X' and the taps (..., d, S) (empty without W)."""
    lead, (d, dv) = X.shape[:-2], X.shape[-2:]
    Xf, kt = X.reshape(-1, d, dv).contiguous(), k_tilde.reshape(-1, d).contiguous()
    Vf, Bf = v.reshape(-1, dv).contiguous(), beta.reshape(-1).contiguous()
    XN = torch.empty_like(Xf)
    S = W.shape[-1] if W is not None else 0
    TAPS = X.new_empty(Xf.shape[0], d, S)
    p = _launch(Xf, W, tok=4)
    _forward_kernel[p.pop("grid")](Xf, kt, Vf, Bf, W.contiguous() if W is not None else Xf, XN, TAPS,
                                   eps2=k_eps * k_eps, **p)
    return XN.view(X.shape), TAPS.view(*lead, d, S)


def delta_step_backward(gX, gtaps, X, k_tilde, v, beta, W, k_eps):
    """ddl.delta_step_backward on the GPU: the gradients of X, k_tilde, v, beta and W."""
    lead, (d, dv) = X.shape[:-2], X.shape[-2:]
    Xf, kt = X.reshape(-1, d, dv).contiguous(), k_tilde.reshape(-1, d).contiguous()
    Vf, Bf = v.reshape(-1, dv).contiguous(), beta.reshape(-1).contiguous()
    GX = gX.reshape(Xf.shape).contiguous()
    dX, dkt = torch.empty_like(Xf), torch.empty_like(kt)
    dval = torch.empty(Vf.shape, dtype=torch.float32, device=X.device)
    dbeta = torch.empty(Bf.shape, dtype=torch.float32, device=X.device)
    p = _launch(Xf, W, tok=32)
    grid = p.pop("grid")
    dW_parts = torch.empty(grid[0], d, dv, p["S"], dtype=torch.float32, device=X.device) if W is not None else dX
    GT = gtaps.reshape(Xf.shape[0], d, -1).contiguous() if W is not None else GX
    _backward_kernel[grid](GX, GT, Xf, kt, Vf, Bf, W.contiguous() if W is not None else Xf,
                           dX, dkt, dval, dbeta, dW_parts, eps2=k_eps * k_eps, **p)
    dW = dW_parts.sum(0).to(W.dtype) if W is not None else X.new_empty(0)
    return (dX.view(X.shape), dkt.view(k_tilde.shape), dval.view(v.shape).to(v.dtype),
            dbeta.view(beta.shape).to(beta.dtype), dW)
