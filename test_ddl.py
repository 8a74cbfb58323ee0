"""Tests for ddl.py, prepare_data.py and train.py: CPU, offline, deterministic.
In CI the GPT-2 vocabulary comes from TIKTOKEN_CACHE_DIR (see .ci/run)."""
import dataclasses
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
from contextlib import nullcontext

os.environ.setdefault("TRITON_INTERPRET", "1")  # fused.py's kernels on the CPU; Triton reads it when first imported
import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import bench
import ddl
import prepare_data
import train
from ddl import GPT, ConfigError, GPTConfig, delta_operator, delta_update, unit_direction

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(vocab_size=97, n_layer=2, n_head=2, head_dim=8, n_embd=16, block_size=32)
VARIANTS = {
    "additive": dict(residual="additive"),
    "delta1": dict(residual="delta", d_v=1),
    "cc_ec": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=False),
    "tc_ec": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=False),
    "write1": dict(residual="write", d_v=1),
    "write4": dict(residual="write", d_v=4, compressor="cc", embed_conv=True),
}


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def random_unit(d, gen):
    k = torch.randn(d, dtype=torch.float64, generator=gen)
    return k / k.norm()


# ---------------------------------------------------------------------------- independent oracles
# Every formula below is written out from the paper / the docstrings with plain torch ops; the tests
# compare ddl.py's modules against them on a model whose every parameter is random (scrambled()).

F64 = torch.float64


def scrambled(seed=0, **kw):
    """A tiny float64 model with every parameter random and away from its init (gains != 1, mixes
    != 1/d_v, taps != identity, beta gates and v projections random), so no bug hides at init."""
    m = tiny_model(seed, **kw).double()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=F64)
            p.copy_(noise * 0.3 if p.dim() == 2 and not name.endswith("mix") else p + 0.5 * noise)
    return m


def o_rms(x, gain):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * gain


def o_rope(x):
    """x (B, T, H, D): the pair (x_i, x_{i+D/2}) at position t turns by t * 10000^(-2i/D)."""
    T, D = x.shape[1], x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        angle = torch.arange(T, dtype=F64)[:, None] * 10000.0 ** (-2 * i / D)
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i], out[..., i + D // 2] = a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()
    return out


def o_attn(a, x):
    B, T, C = x.shape
    W = a.c_attn.weight
    q, k, v = ((x @ W[i * C:(i + 1) * C].T).view(B, T, a.n_head, a.head_dim) for i in range(3))
    q, k = o_rms(o_rope(q), a.q_norm), o_rms(o_rope(k), a.k_norm)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(a.head_dim)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = scores.masked_fill(future, -math.inf).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, C) @ a.c_proj.weight.T


def o_mlp(m, x):
    h = math.floor(8 * x.shape[-1] / 3)
    gate, up = x @ m.c_fc.weight[:h].T, x @ m.c_fc.weight[h:].T
    return (gate * torch.sigmoid(gate) * up) @ m.c_proj.weight.T


def o_compress(kind, comp, X):
    """CC: x[i] = sum_j mix_ij X[i, j]. TC: x[t, i] = sum_s sum_j read_j conv_ijs X[t - s, i, j]."""
    if kind == "cc":
        return torch.einsum("btij,ij->bti", X, comp.mix)
    out = torch.zeros(X.shape[:-1], dtype=X.dtype)
    for t in range(X.shape[1]):
        for s in range(min(t + 1, comp.conv.shape[-1])):
            out[:, t] += (comp.conv[:, :, s] * comp.read * X[:, t - s]).sum(-1)
    return out


def o_embed_conv(ec, x):
    """X[t, i, j] = sum_s w_ijs x[t - s, i]."""
    out = torch.zeros(*x.shape, ec.weight.shape[1], dtype=x.dtype)
    for t in range(x.shape[1]):
        for s in range(min(t + 1, ec.weight.shape[-1])):
            out[:, t] += ec.weight[:, :, s] * x[:, t - s, :, None]
    return out


def o_branch(br, X):
    """One residual branch from its formulas; returns the new state and (beta, |k~|, |k^T X - v|)."""
    cfg = br.cfg
    c = o_rms(X if cfg.d_v == 1 else o_compress(cfg.compressor, br.compressor, X), br.norm)
    f = o_attn(br.f, c) if br.name.endswith("attn") else o_mlp(br.f, c)
    if cfg.residual == "additive":
        return X + f, None
    k = f / torch.sqrt((f * f).sum(-1, keepdim=True) + cfg.k_eps ** 2)
    z = c @ br.W_v.T + br.b_v
    v = z if cfg.v_scale == 0 else cfg.v_scale * torch.sigmoid(z)
    beta = 2 * torch.sigmoid(c @ br.w_beta + br.b_beta)
    S = X.reshape(*X.shape[:3], cfg.d_v)                                 # (B, T, d, d_v)
    kX = torch.einsum("bti,btij->btj", k, S)                             # k^T X, (B, T, d_v)
    bk = beta[..., None, None] * k[..., :, None]
    if cfg.residual == "delta":
        new = S + bk * (v - kX)[..., None, :]                            # X + beta k (v^T - k^T X)
    else:
        new = S + bk * v[..., None, :]                                   # X + beta k v^T
    return new.reshape(X.shape), (beta, f.norm(dim=-1), (kX - v).abs())


def o_logits(m, idx):
    cfg = m.config
    x = m.wte.weight[idx]
    if cfg.d_v > 1:
        x = o_embed_conv(m.embed_conv, x) if cfg.embed_conv else x[..., None].repeat(1, 1, 1, cfg.d_v)
    for block in m.blocks:
        x = o_branch(block.mlp, o_branch(block.attn, x)[0])[0]
    if cfg.d_v > 1:
        x = o_compress(cfg.compressor, m.readout, x)
    return o_rms(x, m.norm_f) @ m.wte.weight.T


def o_loss(logits, targets):
    """Mean over the positions with targets != -1 of -log softmax(logits)[target]."""
    logp = logits - torch.log(torch.exp(logits).sum(-1, keepdim=True))
    keep = targets != -1
    return -logp[keep].gather(-1, targets[keep][:, None]).mean()


# ============================================================================ Prop. 2.1: the spectrum of A = I - beta k k^T

@pytest.mark.parametrize("d", [2, 7, 64])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 1.5, 2.0])
def test_proposition_2_1_spectrum(d, beta):
    gen = torch.Generator().manual_seed(d)
    k, b = random_unit(d, gen), torch.tensor(beta, dtype=torch.float64)
    A = delta_operator(k, b)
    eig = torch.linalg.eigvalsh(A)
    want = torch.tensor(sorted([1 - beta] + [1.0] * (d - 1)), dtype=torch.float64)
    assert torch.allclose(eig, want, atol=1e-12)
    assert torch.allclose(A @ k, (1 - beta) * k, atol=1e-12)
    u = torch.randn(d, dtype=torch.float64, generator=gen)
    u = u - (u @ k) * k  # u orthogonal to k
    assert torch.allclose(A @ u, u, atol=1e-12)
    assert math.isclose(torch.linalg.det(A).item(), 1 - beta, abs_tol=1e-12)
    I = torch.eye(d, dtype=torch.float64)
    if beta == 1.0:  # projection onto k's orthogonal complement
        assert torch.allclose(A @ A, A, atol=1e-12)
        assert torch.linalg.matrix_rank(A).item() == d - 1
    if beta == 2.0:  # Householder reflection
        assert torch.allclose(A.T @ A, I, atol=1e-12)
        assert torch.allclose(A @ A, I, atol=1e-12)
    # the d_v columns of X each see A: vec(A X) = (I_dv kron A) vec(X), and the write adds beta k v^T
    X = torch.randn(d, 3, dtype=torch.float64, generator=gen)
    v = torch.randn(3, dtype=torch.float64, generator=gen)
    kron = torch.kron(torch.eye(3, dtype=torch.float64), A)
    vec = lambda M: M.T.reshape(-1)
    assert torch.allclose(vec(delta_update(X, k, torch.zeros(3, dtype=torch.float64), b)), kron @ vec(X), atol=1e-12)
    assert torch.allclose(delta_update(X, k, v, b), A @ X + beta * torch.outer(k, v), atol=1e-12)


# ============================================================================ Eq. 2.2-2.4: the update and its readout error

def test_eq_2_4_readout_error_contracts_by_one_minus_beta():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 32, 4, dtype=torch.float64, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(5, 32, dtype=torch.float64, generator=gen), dim=-1)
    v = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    beta = torch.rand(5, dtype=torch.float64, generator=gen) * 2
    readout = lambda M: torch.einsum("nd,ndv->nv", k, M)
    e_pre, e_post = readout(X) - v, readout(delta_update(X, k, v, beta)) - v
    assert torch.allclose(e_post, (1 - beta)[:, None] * e_pre, atol=1e-12)
    assert e_pre.abs().min() > 1e-3  # the check above is not vacuous
    assert torch.allclose(readout(delta_update(X, k, v, torch.ones(5, dtype=torch.float64))), v, atol=1e-12)
    assert torch.equal(delta_update(X, k, v, torch.zeros(5, dtype=torch.float64)), X)


def test_eq_2_2_delta_update_gradcheck():
    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(2, 6, 3, dtype=torch.float64, generator=gen), torch.randn(2, 6, dtype=torch.float64, generator=gen),
            torch.randn(2, 3, dtype=torch.float64, generator=gen), torch.rand(2, dtype=torch.float64, generator=gen) * 2]
    assert torch.autograd.gradcheck(delta_update, [a.requires_grad_() for a in args])


def test_eq_2_2_model_d_v_1_is_the_scalar_rule():
    """With d_v = 1 the branch computes x + beta k (v - k.x) with a scalar v, no compressor."""
    m = tiny_model(residual="delta", d_v=1)
    br = m.blocks[0].attn
    assert br.compressor is None and m.embed_conv is None and m.readout is None
    x = torch.randn(2, 5, 16)
    c = torch.nn.functional.rms_norm(x, (16,), br.norm, eps=1e-5)
    k = unit_direction(br.f(c), 1e-5)
    v, beta = br.value(c)[..., 0], br.beta(c)
    want = x + (beta * (v - (k * x).sum(-1)))[..., None] * k
    assert torch.allclose(br(x), want, atol=1e-6)


def test_eq_2_2_write_control_has_no_erase_term_and_readout_error_sign():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3, 7, 2, dtype=F64, generator=gen)
    k = torch.randn(3, 7, dtype=F64, generator=gen)
    v = torch.randn(3, 2, dtype=F64, generator=gen)
    beta = torch.rand(3, dtype=F64, generator=gen) * 2
    want = X + beta[:, None, None] * k[:, :, None] * v[:, None, :]
    assert torch.allclose(ddl.write_update(X, k, v, beta), want, atol=1e-12)
    assert torch.allclose(ddl.readout_error(X, k, v), torch.einsum("ni,nij->nj", k, X) - v, atol=1e-12)


def test_eq_2_2_value_and_gate_projections():
    """v = v_scale sigmoid(W_v c + b_v) (v_scale = 0: W_v c + b_v), beta = 2 sigmoid(w.c + b)."""
    gen = torch.Generator().manual_seed(6)
    c = torch.randn(2, 5, 16, dtype=F64, generator=gen)
    for v_scale in (2.5, 0.0):
        br = scrambled(residual="delta", d_v=4, v_scale=v_scale).blocks[1].mlp
        z = c @ br.W_v.T + br.b_v
        assert torch.allclose(br.value(c), 2.5 * torch.sigmoid(z) if v_scale else z, atol=1e-6)
        assert torch.allclose(br.beta(c), 2 * torch.sigmoid(c @ br.w_beta + br.b_beta), atol=1e-6)


BRANCH_CASES = [("additive", 1, "cc", 4.0), ("delta", 1, "cc", 2.5), ("write", 1, "cc", 0.0),
                ("delta", 4, "cc", 2.5), ("delta", 4, "tc", 0.0), ("write", 4, "cc", 2.5), ("write", 4, "tc", 4.0)]


@pytest.mark.parametrize("residual,d_v,compressor,v_scale", BRANCH_CASES)
def test_eq_2_2_each_residual_kind_follows_its_own_formula(residual, d_v, compressor, v_scale):
    """additive: X + F(c); delta: X + beta k (v^T - k^T X); write: X + beta k v^T, with
    c = RMSNorm(compress(X)) * gain, k = F(c) / sqrt(|F(c)|^2 + eps^2), on random parameters."""
    m = scrambled(residual=residual, d_v=d_v, compressor=compressor, v_scale=v_scale, k_eps=0.5, conv_kernel=3)
    gen = torch.Generator().manual_seed(7)
    for br in (m.blocks[0].attn, m.blocks[1].mlp):
        X = torch.randn(2, 9, 16, d_v, dtype=F64, generator=gen)
        X = X[..., 0] if d_v == 1 else X
        want, _ = o_branch(br, X)
        assert torch.allclose(br(X), want, rtol=1e-5, atol=1e-6), br.name


# ============================================================================ §3.1: the unit direction k

def test_section_3_1_unit_direction_is_the_eps_regularised_normalisation():
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-6, 1e-3, 1.0, 1e3):
        kt = torch.randn(4, 64, dtype=torch.float64, generator=gen) * scale
        want = kt / torch.sqrt((kt * kt).sum(-1, keepdim=True) + 1e-5 ** 2)
        assert torch.allclose(unit_direction(kt, 1e-5), want, rtol=1e-10, atol=1e-14)
    kt = torch.randn(4, 64, dtype=torch.float64, generator=gen)
    assert torch.allclose(unit_direction(kt, 0.0).norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-12)


# ============================================================================ §3.2 and App. A.2: the expanded state, compressors, EC

def test_section_3_2_token_compressor_equals_convolution_then_read():
    """DDL-TC sums over d_v before shifting tokens; that must equal the conv-then-read definition."""
    tc = tiny_model(residual="delta", d_v=4, compressor="tc", conv_kernel=3).blocks[0].attn.compressor.double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        tc.conv.copy_(torch.randn(tc.conv.shape, generator=gen))
        tc.read.copy_(torch.randn(4, generator=gen))
    X = torch.randn(2, 10, 16, 4, dtype=torch.float64, generator=gen)
    want = torch.zeros(2, 10, 16, dtype=torch.float64)
    for t in range(10):
        for s in range(3):
            if t - s >= 0:
                want[:, t] += (tc.conv[:, :, s] * X[:, t - s] * tc.read).sum(-1)
    assert torch.allclose(tc(X), want, atol=1e-12)


def test_section_3_2_channel_compressor_mixes_the_d_v_channels_of_each_feature():
    cc = scrambled(residual="delta", d_v=4, compressor="cc").blocks[0].attn.compressor
    X = torch.randn(2, 5, 16, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    want = torch.stack([sum(cc.mix[i, j] * X[:, :, i, j] for j in range(4)) for i in range(16)], dim=-1)
    assert torch.allclose(cc(X), want, atol=1e-12)


def test_app_a_2_embed_conv_is_a_causal_depthwise_token_convolution():
    ec = scrambled(residual="delta", d_v=4, conv_kernel=3).embed_conv
    x = torch.randn(2, 7, 16, dtype=F64, generator=torch.Generator().manual_seed(9))
    want = torch.zeros(2, 7, 16, 4, dtype=F64)
    for t in range(7):
        for s in range(3):
            if t - s >= 0:
                want[:, t] += ec.weight[:, :, s] * x[:, t - s, :, None]
    assert torch.allclose(ec(x), want, atol=1e-12)


def test_app_a_2_expanded_state_uses_the_autocast_dtype():
    m = tiny_model(residual="delta", d_v=4)
    seen = []
    m.blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


# ============================================================================ the model: variants, init, gate audit (§5), errors

@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_starts_at_uniform_loss(name):
    m = tiny_model(**VARIANTS[name])
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 32, 97)
    assert abs(loss.item() - math.log(97)) < 0.1
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name != "additive":
        assert m.blocks[0].attn.w_beta.grad.abs().sum() > 0  # the gate learns


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    m = tiny_model(**VARIANTS[name])
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 97, (1, 20), generator=gen)
    for t in (1, 7, 19):
        b = a.clone()
        b[:, t:] = torch.randint(0, 97, (1, 20 - t), generator=gen)
        la, _ = m(a, a)
        lb, _ = m(b, b)
        assert torch.equal(la[:, :t], lb[:, :t])
        assert not torch.allclose(la[:, t:], lb[:, t:])


@pytest.mark.parametrize("n_layer,n_head,n_embd,paper", [(12, 6, 768, 124e6), (24, 8, 1024, 353e6)])
def test_parameter_counts_match_the_paper(n_layer, n_head, n_embd, paper):
    """The tied embedding / LM head matrix is counted once."""
    with torch.device("meta"):
        for res in ("additive", "delta"):
            m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, residual=res))
            assert abs(m.num_params() - paper) / paper < 0.02


@pytest.mark.parametrize("beta_init", [0.5, 1.0, 1.7])
def test_special_initialisations_survive_the_global_init(beta_init):
    m = tiny_model(residual="delta", d_v=4, compressor="tc", beta_init=beta_init)
    m.record_gates()
    m(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)))
    for row in m.gate_stats():
        assert row["beta_min"] == pytest.approx(beta_init, abs=1e-5)
        assert row["beta_max"] == pytest.approx(beta_init, abs=1e-5)
        assert sum(row["beta_hist"]) == 32
    x = torch.randn(2, 9, 16)
    assert torch.equal(m.embed_conv(x), x.unsqueeze(-1).expand(-1, -1, -1, 4))
    X = torch.randn(2, 9, 16, 4)
    assert torch.allclose(m.blocks[1].mlp.compressor(X), X.mean(-1), atol=1e-6)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_gate_stats_costs_nothing_when_off_and_reports_when_on():
    m = tiny_model(residual="delta", d_v=4)
    m(torch.zeros(1, 4, dtype=torch.long))
    assert all(b.attn.stats is None for b in m.blocks)
    with pytest.raises(RuntimeError, match="record_gates"):
        m.gate_stats()
    m.record_gates()
    m(torch.randint(0, 97, (1, 8)))
    rows = m.gate_stats()
    assert [(r["layer"], r["sublayer"]) for r in rows] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    assert all(r["k_norm_min"] > 0 and r["e_pre_max"] >= r["e_pre_mean"] >= r["e_pre_min"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="additive"):
        tiny_model(residual="additive").gate_stats()


@pytest.mark.parametrize("name", ["delta1", "cc_ec", "tc_ec", "write4"])
def test_check_spectrum_passes_on_a_random_model(name):
    m = tiny_model(check_spectrum=True, **VARIANTS[name])
    _, loss = m(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
    assert torch.isfinite(loss)


def test_check_spectrum_catches_a_broken_gate_and_a_broken_rule(monkeypatch):
    m = tiny_model(check_spectrum=True, residual="delta", d_v=4)
    idx = torch.randint(0, 97, (1, 8))
    br = m.blocks[1].mlp
    monkeypatch.setattr(br, "beta", lambda c: torch.full(c.shape[:-1], 2.5))
    with pytest.raises(AssertionError, match="layer 1 mlp: beta outside"):
        m(idx)
    monkeypatch.undo()
    monkeypatch.setattr(ddl, "delta_update", ddl.write_update)  # no erase term: Eq. 2.4 breaks
    with pytest.raises(AssertionError, match=r"layer 0 attn: e_post != \(1 - beta\) e_pre"):
        m(idx)


def test_compiles_as_one_graph_when_check_spectrum_is_off():
    m = tiny_model(residual="delta", d_v=4, compressor="tc")
    idx = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(idx, idx)[1], m(idx, idx)[1])


@pytest.mark.parametrize("kw,field", [
    (dict(n_embd=20), "n_embd"), (dict(d_v=0), "d_v"), (dict(residual="sum"), "residual"),
    (dict(compressor="xx"), "compressor"), (dict(beta_init=2.5), "beta_init"), (dict(conv_kernel=0), "conv_kernel"),
    (dict(residual="additive", d_v=4), "d_v"), (dict(k_eps=0.0), "k_eps"), (dict(v_scale=-1.0), "v_scale"),
    (dict(embed_conv="no"), "embed_conv"), (dict(n_layer=True), "n_layer"), (dict(d_v=2.0), "d_v"),
    (dict(vocab_size=0), "vocab_size"), (dict(n_layer=0), "n_layer"), (dict(block_size=0), "block_size"),
    (dict(n_head=4, head_dim=3, n_embd=12), "head_dim"), (dict(beta_init=-0.1), "beta_init"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ddl.ConfigError, match=f"GPTConfig.{field}="):
        GPTConfig(**{**TINY, **kw})
    assert issubclass(ddl.ConfigError, ValueError)


def test_config_accepts_the_edges_of_its_ranges_and_ints_for_floats():
    for kw in (dict(beta_init=0.0), dict(beta_init=2), dict(v_scale=0), dict(d_v=1, conv_kernel=1, n_layer=1)):
        GPTConfig(**{**TINY, **kw})


def test_forward_rejects_bad_tokens_and_long_sequences():
    m = tiny_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        m(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="block_size=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_generate_and_v_scale_zero_linear_form():
    m = tiny_model(residual="delta", d_v=4, v_scale=0.0)
    c = torch.randn(3, 16)
    br = m.blocks[0].attn
    assert torch.allclose(br.value(c), c @ br.W_v.T + br.b_v)
    out = m.generate(torch.zeros(2, 3, dtype=torch.long), 40, top_k=5)
    assert out.shape == (2, 43) and out.max() < 97  # longer than block_size: context is cropped


def test_rope_turns_each_pair_by_position_times_base_10000():
    cos, sin = ddl.rope_table(12, 8)
    angles = torch.tensor([[t * 10000.0 ** (-2 * i / 8) for i in range(4)] for t in range(12)], dtype=F64)
    assert torch.allclose(cos.double(), angles.cos(), atol=1e-6)
    assert torch.allclose(sin.double(), angles.sin(), atol=1e-6)
    x = torch.randn(2, 12, 3, 8, dtype=F64, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(ddl.apply_rope(x, cos, sin), o_rope(x), atol=1e-5)


def test_attention_is_causal_softmax_of_rotated_qk_normed_heads():
    """q, k, v from c_attn; RoPE on q and k; RMSNorm with the q_norm / k_norm gains; causal
    softmax(q k^T / sqrt(D)) v; c_proj. The gains are random, so a dropped or swapped gain shows."""
    a = scrambled(block_size=12).blocks[1].attn.f
    x = torch.randn(2, 12, 16, dtype=F64, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(a(x), o_attn(a, x), rtol=1e-5, atol=1e-6)


def test_swiglu_is_silu_of_gate_times_up():
    m = scrambled().blocks[0].mlp.f
    assert m.hidden == 42  # floor(8/3 * 16)
    x = torch.randn(2, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(12))
    assert torch.allclose(m(x), o_mlp(m, x), atol=1e-10)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_loss_equal_the_explicit_model(name):
    """The whole forward (embedding, EC, blocks, readout, final RMSNorm, tied head) and the
    cross-entropy, against the oracles, on a model with random parameters."""
    m = scrambled(block_size=12, v_scale=2.5 if name.endswith("1") else 4.0, **VARIANTS[name])
    assert m.lm_head.weight is m.wte.weight
    gen = torch.Generator().manual_seed(13)
    idx, targets = torch.randint(0, 97, (2, 10), generator=gen), torch.randint(0, 97, (2, 10), generator=gen)
    want = o_logits(m, idx)
    logits, loss = m(idx, targets)
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(o_loss(want, targets).item(), rel=1e-6)
    last, none = m(idx)  # without targets: the last position's logits only
    assert none is None and last.shape == (2, 1, 97)
    assert torch.allclose(last[:, 0].double(), want[:, -1], rtol=1e-5, atol=1e-5)


def test_forward_errors_and_ignored_targets():
    m = scrambled()
    with pytest.raises(ValueError, match="sequence length 0"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        m(torch.tensor([[-1, 3]]))
    idx = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(14))
    for bad in (97, -2):
        with pytest.raises(ValueError, match=r"targets must lie in \[-1, 97\)"):
            m(idx, idx.clone().fill_(bad))
    targets = idx.clone()
    targets[0, :4] = -1
    targets[1, 2] = -1
    logits, loss = m(idx, targets)
    assert loss.item() == pytest.approx(o_loss(o_logits(m, idx), targets).item(), rel=1e-6)


def test_init_std_of_every_matrix_kind_and_identity_inits():
    """At d = 256, L = 4 (depth factor 2): embedding 0.02, matrices and W_v 0.5/sqrt(d), output
    projections 0.5/sqrt(d)/sqrt(L); gains 1, b_v 0, beta exactly beta_init, mixes 1/d_v, taps identity."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, n_layer=4, n_head=2, head_dim=128, n_embd=256, block_size=8,
                      d_v=4, compressor="tc", beta_init=0.7))
    std = lambda ts: torch.cat([t.detach().flatten() for t in ts]).std().item()
    br = [b for blk in m.blocks for b in (blk.attn, blk.mlp)]
    assert m.lm_head.weight is m.wte.weight
    assert std([m.wte.weight]) == pytest.approx(0.02, rel=0.05)
    assert std([b.f.c_attn.weight for b in br[::2]]) == pytest.approx(0.5 / 16, rel=0.05)
    assert std([b.f.c_fc.weight for b in br[1::2]]) == pytest.approx(0.5 / 16, rel=0.05)
    assert std([b.f.c_proj.weight for b in br[::2]]) == pytest.approx(0.5 / 16 / 2, rel=0.05)
    assert std([b.f.c_proj.weight for b in br[1::2]]) == pytest.approx(0.5 / 16 / 2, rel=0.05)
    assert std([b.W_v for b in br]) == pytest.approx(0.5 / 16, rel=0.05)
    c = torch.randn(3, 256)
    for b in br:
        assert torch.equal(b.b_v, torch.zeros(4)) and torch.equal(b.norm, torch.ones(256))
        assert torch.allclose(b.beta(c), torch.full((3,), 0.7), atol=1e-6)
    for a in [b.f for b in br[::2]]:
        assert torch.equal(a.q_norm, torch.ones(128)) and torch.equal(a.k_norm, torch.ones(128))
    assert torch.equal(m.norm_f, torch.ones(256))
    ident = torch.zeros(256, 4, 4)
    ident[..., 0] = 1
    for tc in [b.compressor for b in br] + [m.readout]:
        assert torch.equal(tc.conv, ident) and torch.equal(tc.read, torch.full((4,), 0.25))
    assert torch.equal(m.embed_conv.weight, ident)
    cc = tiny_model(residual="delta", d_v=4, compressor="cc")
    for comp in [cc.blocks[0].attn.compressor, cc.blocks[1].mlp.compressor, cc.readout]:
        assert torch.equal(comp.mix, torch.full((16, 4), 0.25))


def test_gate_stats_equal_a_hand_computation():
    """beta min/mean/max and its 10-bin histogram over [0, 2], |k~| and |e_pre| = |k^T X - v|,
    per layer and sublayer, from the inputs each branch saw."""
    m = scrambled(residual="delta", d_v=4, compressor="tc", block_size=12)
    inputs = {}
    for blk in m.blocks:
        for br in (blk.attn, blk.mlp):
            br.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.name, args[0]))
    m.record_gates()
    m(torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(15)))
    rows = m.gate_stats()
    assert len(rows) == 4
    for row in rows:
        br = getattr(m.blocks[row["layer"]], row["sublayer"])
        beta, k_norm, e_pre = o_branch(br, inputs[br.name])[1]
        assert beta.max() - beta.min() > 0.5  # a spread of gates, so the histogram is not one bin
        hist = torch.bincount((beta / 0.2).floor().long().clamp(max=9).flatten(), minlength=10)
        assert row["beta_hist"] == hist.tolist()
        for key, t in (("beta", beta), ("k_norm", k_norm), ("e_pre", e_pre)):
            got = [row[f"{key}_{s}"] for s in ("min", "mean", "max")]
            assert got == pytest.approx([t.min().item(), t.mean().item(), t.max().item()], rel=1e-5, abs=1e-6), key
    m.record_gates(False)
    assert all(blk.attn.stats is None and not blk.mlp.record for blk in m.blocks)


@pytest.mark.parametrize("factor", [1.05, 0.95])
def test_check_spectrum_catches_a_five_percent_error_in_k(monkeypatch, factor):
    m = scrambled(check_spectrum=True, residual="delta", d_v=4).float()
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(18))
    m(idx)  # passes as it is
    real = ddl.unit_direction
    monkeypatch.setattr(ddl, "unit_direction", lambda kt, eps: factor * real(kt, eps))
    with pytest.raises(AssertionError, match=r"layer 0 attn: \|k\| != 1"):
        m(idx)


def test_check_spectrum_catches_a_gate_below_zero_and_a_contraction_off_by_ten_percent(monkeypatch):
    m = scrambled(check_spectrum=True, residual="delta", d_v=4).float()
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(19))
    monkeypatch.setattr(m.blocks[0].mlp, "beta", lambda c: torch.full(c.shape[:-1], -0.5))
    with pytest.raises(AssertionError, match="layer 0 mlp: beta outside"):
        m(idx)
    monkeypatch.undo()
    real = ddl.delta_update
    monkeypatch.setattr(ddl, "delta_update", lambda X, k, v, beta: real(X, k, v, 0.9 * beta))
    with pytest.raises(AssertionError, match=r"layer 0 attn: e_post != \(1 - beta\) e_pre"):
        m(idx)


def fixed_logits_model(logits):
    """A GPT whose next-token logits are `logits` (V,) at every step, whatever the input."""
    m = tiny_model()
    m.forward = lambda idx, targets=None: (logits.expand(idx.shape[0], 1, -1), None)
    return m


def test_generate_greedy_paths_equal_an_explicit_argmax_loop():
    m = scrambled(block_size=8).float()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(16))

    def greedy(n_vocab):
        idx = prompt
        for _ in range(9):  # past block_size: the context is cropped to the last 8 tokens
            idx = torch.cat([idx, m(idx[:, -8:])[0][:, -1, :n_vocab].argmax(-1, keepdim=True)], dim=1)
        return idx
    assert torch.equal(m.generate(prompt, 9, top_k=1), greedy(97))
    assert torch.equal(m.generate(prompt, 9, temperature=0), greedy(97))
    assert torch.equal(m.generate(prompt, 9, temperature=0, n_vocab=20), greedy(20))


def test_generate_top_k_restricts_the_support_to_the_k_largest_logits():
    m = scrambled(block_size=8).float()
    prompt = torch.randint(0, 97, (64, 3), generator=torch.Generator().manual_seed(17))
    torch.manual_seed(0)
    out = m.generate(prompt, 3, temperature=3.0, top_k=3)
    for t in range(3, 6):
        top3 = m(out[:, :t])[0][:, -1].topk(3).indices
        assert (top3 == out[:, t:t + 1]).any(-1).all()
    # not trivially greedy: some draws are not the argmax
    assert (out[:, 3:] != torch.stack([m(out[:, :t])[0][:, -1].argmax(-1) for t in range(3, 6)], 1)).any()


def test_generate_divides_the_logits_by_the_temperature_within_top_k_and_n_vocab():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0])  # ids 5 and 6 lie beyond n_vocab = 5
    m = fixed_logits_model(torch.cat([logits, torch.full((90,), -5.0)]))
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    torch.manual_seed(0)
    freq = lambda **kw: torch.bincount(m.generate(prompt, 1, n_vocab=5, **kw)[:, 1], minlength=97).float() / 4000
    want = torch.zeros(97)
    want[2:5] = torch.softmax(logits[2:5] / 2.0, dim=0)  # top_k = 3 of the first 5, temperature 2
    assert torch.allclose(freq(temperature=2.0, top_k=3), want, atol=0.03)
    want[2:5] = 1 / 3
    assert torch.allclose(freq(temperature=1e6, top_k=3), want, atol=0.03)
    want[:] = 0
    want[4] = 1
    assert torch.equal(freq(temperature=1e-3, top_k=3), want)
    want[:5] = torch.softmax(logits[:5], dim=0)
    assert torch.allclose(freq(), want, atol=0.03)
    assert torch.allclose(freq(top_k=50), want, atol=0.03)  # top_k above n_vocab keeps all n_vocab ids


@pytest.mark.parametrize("kw,name", [(dict(top_k=0), "top_k=0"), (dict(temperature=-1.0), "temperature=-1.0"),
                                     (dict(n_vocab=0), "n_vocab=0"), (dict(n_vocab=98), "n_vocab=98")])
def test_generate_refuses_bad_settings_naming_them(kw, name):
    with pytest.raises(ddl.ConfigError, match=f"generate: {name} is invalid"):
        tiny_model().generate(torch.zeros(1, 1, dtype=torch.long), 1, **kw)


# ============================================================================ prepare_data.py

DOCS = ["Größe und Maß: naïve café ☕", "日本語のテキスト。", "plain <|endoftext|> inside text",
        "emoji 🙂 and more words " * 20, "last one,\nover two lines\n"]  # the last is a .txt: one document


def eot_tokens(docs):
    """The oracle: per document, 50256 then tiktoken's ordinary GPT-2 encoding, in order."""
    enc = tiktoken.get_encoding("gpt2")
    return [t for d in docs for t in [50256] + enc.encode_ordinary(d)]


def write_inputs(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.jsonl"), "w", encoding="utf-8") as f:
        for d in DOCS[:2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(os.path.join(folder, "b.jsonl.gz"), "wt", encoding="utf-8") as f:
        for d in DOCS[2:4]:
            f.write(json.dumps({"text": d}) + "\n")
    with open(os.path.join(folder, "c.txt"), "w", encoding="utf-8") as f:
        f.write(DOCS[4])


def run_prepare(src, out, *extra):
    return prepare_data.prepare(prepare_data.parse_args(["--input", str(src), "--out", str(out), *extra]))


def all_tokens(out):
    files = sorted(f for f in os.listdir(out) if f.endswith(".bin"))
    val = [f for f in files if "_val_" in f]
    return np.concatenate([prepare_data.read_shard(os.path.join(out, f)) for f in val + [f for f in files if f not in val]])


def test_round_trip_split_sizes_and_header(tmp_path):
    write_inputs(tmp_path / "in")
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "10", "--shard_tokens", "25", "--workers", "2")
    want = eot_tokens(DOCS)
    # the val shard is exactly the first 10 tokens, then train shards of exactly 25 but the last
    cuts = [0, 10] + list(range(35, len(want), 25)) + [len(want)]
    names = ["local_val_000000.bin"] + [f"local_train_{k:06d}.bin" for k in range(len(cuts) - 2)]
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".bin")) == sorted(names)
    for name, a, b in zip(names, cuts, cuts[1:]):
        assert prepare_data.read_shard(tmp_path / "out" / name).tolist() == want[a:b], name
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    assert m["shards"] == [{"file": n, "split": n.split("_")[1], "tokens": size} for n, size in zip(names, sizes)]
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode(all_tokens(tmp_path / "out").tolist()) == "".join("<|endoftext|>" + d for d in DOCS)
    assert m["total_tokens"] == len(want) and m["documents"] == 5
    header = np.fromfile(tmp_path / "out" / "local_val_000000.bin", dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 10] and not header[3:].any()


def test_document_order_kept_by_two_workers_with_short_and_long_documents(tmp_path):
    # 16 long documents, then short and long ones alternating: a worker that finishes a short document or
    # a light chunk early must not move it ahead (imap_unordered, or any reordering of chunks, would)
    docs = [f"long {i}" + " x" * 5000 for i in range(16)]
    docs += [str(i) if i % 2 else f"long {i}" + " x" * 5000 for i in range(16, 48)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "100", "--workers", "2")
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(docs)


def test_prepare_max_tokens_is_exact(tmp_path):
    write_inputs(tmp_path / "in")
    want = eot_tokens(DOCS)
    for cap in (37, len(eot_tokens(DOCS[:2])) + 1):  # inside a document; the first token of the third
        m = run_prepare(tmp_path / "in", tmp_path / str(cap), "--val_tokens", "10", "--shard_tokens", "8",
                        "--max_tokens", str(cap))
        assert all_tokens(tmp_path / str(cap)).tolist() == want[:cap]
        assert m["total_tokens"] == cap and m["documents"] == want[:cap].count(50256)


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    write_inputs(tmp_path / "in")
    pq.write_table(pa.table({"text": DOCS, "n": list(range(5))}), tmp_path / "d.parquet", row_group_size=2)
    run_prepare(tmp_path / "d.parquet", tmp_path / "pq", "--val_tokens", "8")
    run_prepare(tmp_path / "in", tmp_path / "js", "--val_tokens", "8")
    assert all_tokens(tmp_path / "pq").tolist() == all_tokens(tmp_path / "js").tolist()


def test_same_bytes_with_one_and_two_workers(tmp_path):
    write_inputs(tmp_path / "in")
    for w in ("1", "2"):
        run_prepare(tmp_path / "in", tmp_path / w, "--val_tokens", "7", "--shard_tokens", "30", "--workers", w)
    files = sorted(os.listdir(tmp_path / "1"))
    assert files == sorted(os.listdir(tmp_path / "2")) and len(files) > 3
    for f in files:
        if f.endswith(".bin"):
            assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes()


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": x}\n', "bad.jsonl line 2: not valid JSON: Expecting value at column 10$"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"nofield.jsonl line 2: no 'text' field"),
    ("num.jsonl", '{"text": 42}\n', r"num.jsonl line 1: the text field is int"),
    ("surrogate.jsonl", '{"text": "bad \\ud800 half"}\n', r"surrogate.jsonl line 1: text is not valid UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', r"latin1.jsonl line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("latin1.txt", b"ok\nfine\ncaf\xe9\n", r"latin1.txt line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("x.csv", "a,b", r"x.csv has an unsupported extension \(allowed: .txt, .jsonl, .jsonl.gz, .parquet"),
])
def test_bad_input_errors_and_leaves_no_shard(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(prepare_data.DataError, match=message):
        run_prepare(path, tmp_path / "out", "--val_tokens", "2", "--workers", "1")
    out = tmp_path / "out"
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".bin") or f == "manifest.json"]


def test_prepare_missing_optional_packages_are_data_errors(tmp_path, monkeypatch):
    # documents() runs in the pool's feeder thread, which hands on Exceptions only: a SystemExit there would hang
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"never read")
    for argv, message in ([[], r"FineWeb-Edu from the hub needs `pip install datasets`"],
                          [["--input", str(tmp_path / "d.parquet")], r"d.parquet: reading .parquet needs pyarrow"]):
        args = prepare_data.parse_args(argv)
        with pytest.raises(prepare_data.DataError, match=message):
            next(prepare_data.documents(args, args.input))


def test_input_without_training_tokens_is_refused(tmp_path):
    write_inputs(tmp_path / "in")
    n = len(eot_tokens(DOCS))
    with pytest.raises(prepare_data.DataError, match=f"the input gave {n:,} tokens: --val_tokens={n} leaves none"):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n))
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n - 1), "--force")  # one token to train on
    assert [(s["split"], s["tokens"]) for s in m["shards"]] == [("val", n - 1), ("train", 1)]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(prepare_data.DataError, match="the input gave 0 tokens: --val_tokens=0 leaves none"):
        run_prepare(tmp_path / "empty.jsonl", tmp_path / "out2", "--val_tokens", "0")
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_val_shard_spanning_input_files_is_reported(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    a, b = str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.jsonl.gz")
    n_a = len(eot_tokens(DOCS[:2]))
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", str(n_a + 3))
    assert m["val_sources"] == {a: n_a, b: 3}
    note = (f"note: the val shard drew from 2 input files (tokens from each: {{'{a}': {n_a}, '{b}': 3}}); "
            "to hold out the first one alone, lower --val_tokens")
    assert note in capsys.readouterr().err.splitlines()
    m = run_prepare(tmp_path / "in", tmp_path / "out2", "--val_tokens", str(n_a))
    assert m["val_sources"] == {a: n_a} and "note:" not in capsys.readouterr().err


def test_missing_path_and_foreign_output(tmp_path):
    with pytest.raises(prepare_data.DataError, match="nope does not exist"):
        run_prepare(tmp_path / "nope", tmp_path / "out")
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5")
    with pytest.raises(prepare_data.DataError, match="holds another run's output .*--force replaces it"):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "6")
    assert run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "6", "--force")["shards"][0]["tokens"] == 6


def test_complete_output_is_not_redone_unless_force(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1")
    with open(tmp_path / "in" / "c.txt", "w", encoding="utf-8") as f:
        f.write("changed text")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "2")  # workers: the same run
    assert "already complete" in capsys.readouterr().err
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(DOCS)
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--force")
    assert all_tokens(tmp_path / "out").tolist() == eot_tokens(DOCS[:4] + ["changed text"])
    assert m["total_tokens"] == len(eot_tokens(DOCS[:4] + ["changed text"]))


def test_read_shard_refuses_truncated_and_foreign_files(tmp_path):
    prepare_data.write_shard(str(tmp_path / "ok.bin"), np.arange(100, dtype=np.uint16))
    assert prepare_data.read_shard(tmp_path / "ok.bin").tolist() == list(range(100))
    prepare_data.write_shard(str(tmp_path / "empty.bin"), np.arange(0, dtype=np.uint16))  # the header alone
    assert (tmp_path / "empty.bin").stat().st_size == 1024 and prepare_data.read_shard(tmp_path / "empty.bin").tolist() == []
    data = (tmp_path / "ok.bin").read_bytes()
    assert len(data) == 1024 + 200
    for name, content, message in [
            ("cut.bin", data[:-10], "cut.bin: header says 100 tokens \\(1224 bytes\\), the file has 1214: corrupt"),
            ("long.bin", data + b"\0\0", "long.bin: header says 100 tokens \\(1224 bytes\\), the file has 1226"),
            ("short.bin", data[:1000], "short.bin: 1000 bytes is shorter than the 1024-byte shard header"),
            ("magic.bin", b"\x01\x02\x03\x04" + data[4:], "magic.bin: magic 67305985, version 1 .*not a token shard"),
            ("version.bin", data[:4] + b"\x02\0\0\0" + data[8:], "version.bin: magic 20240520, version 2 ")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(prepare_data.DataError, match=message):
            prepare_data.read_shard(tmp_path / name)


def test_val_tokens_0_writes_train_shards_only(tmp_path):
    write_inputs(tmp_path / "in")
    want = eot_tokens(DOCS)
    m = run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "0", "--shard_tokens", "40", "--workers", "1")
    sizes = [40] * (len(want) // 40) + [len(want) % 40]
    assert m["shards"] == [{"file": f"local_train_{k:06d}.bin", "split": "train", "tokens": n} for k, n in enumerate(sizes)]
    assert all_tokens(tmp_path / "out").tolist() == want and m["val_sources"] == {}


def test_prepare_option_defaults_and_bounds():
    a = prepare_data.parse_args(["--input", "x"])
    assert (a.out, a.prefix, a.input) == (os.path.join("data", "local"), "local", ["x"])
    a = prepare_data.parse_args([])
    assert (a.out, a.prefix, a.input, a.name, a.text_field, a.val_tokens, a.shard_tokens, a.max_tokens, a.force) == (
        os.path.join("data", "fineweb_edu"), "fineweb_edu", None, "sample-10BT", "text", 10_485_760, 100_000_000, 0, False)
    a = prepare_data.parse_args(["--val_tokens=0", "--max_tokens=0", "--workers=1", "--shard_tokens=1", "--out=o", "--prefix=p"])
    assert (a.val_tokens, a.max_tokens, a.workers, a.shard_tokens, a.out, a.prefix) == (0, 0, 1, 1, "o", "p")
    for key, low in (("workers", 1), ("shard_tokens", 1), ("val_tokens", 0), ("max_tokens", 0)):
        with pytest.raises(prepare_data.DataError, match=f"^--{key}={low - 1} is invalid: must be >= {low}$"):
            prepare_data.parse_args([f"--{key}={low - 1}"])


def test_forced_rerun_first_clears_the_old_manifest_and_stray_temporaries(tmp_path, monkeypatch):
    """Between the claim and the new manifest the folder must read as unfinished: run.json, no old manifest.json."""
    write_inputs(tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1")
    (tmp_path / "out" / "local_train_000042.bin.tmp").write_bytes(b"left by a crash")

    def interrupted(path, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "in", tmp_path / "out", "--val_tokens", "5", "--workers", "1", "--force")
    assert sorted(os.listdir(tmp_path / "out")) == ["run.json"]


class FullDisk:
    """A file that takes the first `room` bytes written to it, then fails as a full disk would."""
    def __init__(self, f, room):
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data[:self.room])
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)


def test_shard_write_dying_mid_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "open", lambda path, mode="r": FullDisk(open(path, mode), 1024), raising=False)
    with pytest.raises(OSError, match="No space left"):
        prepare_data.write_shard(str(tmp_path / "s.bin"), np.arange(100, dtype=np.uint16))
    assert not (tmp_path / "s.bin").exists()
    assert [(f.name, f.stat().st_size) for f in tmp_path.iterdir()] == [("s.bin.tmp", 1024)]  # died after the header


def test_interrupted_run_leaves_no_partial_shard_and_reruns_identically(tmp_path, monkeypatch):
    write_inputs(tmp_path / "in")
    args = ("--val_tokens", "10", "--shard_tokens", "20", "--workers", "1")
    run_prepare(tmp_path / "in", tmp_path / "ref", *args)
    real, calls = prepare_data.write_shard, []

    def crashing(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # die half-way through writing the third shard
            with open(path + ".tmp", "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path / "in", tmp_path / "out", *args)
    done = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".bin"))
    assert len(done) == 2 and os.path.basename(calls[2]) not in done
    # the contract train.py relies on: run.json marks the folder unfinished, manifest.json is absent
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.undo()
    run_prepare(tmp_path / "in", tmp_path / "out", *args)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "ref"))
    assert "run.json" not in os.listdir(tmp_path / "out")
    assert all_tokens(tmp_path / "out").tolist() == all_tokens(tmp_path / "ref").tolist()


REAL_TOKENIZE = prepare_data.tokenize


def tokenize_checking_sigint(item):  # at module level, so that pool workers can unpickle it
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        raise RuntimeError("a pool worker does not ignore SIGINT")
    return REAL_TOKENIZE(item)


def test_ctrl_c_workers_ignore_it_and_the_main_process_exits_130_in_one_line(tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path / "in")
    monkeypatch.setattr(prepare_data, "tokenize", tokenize_checking_sigint)
    run_prepare(tmp_path / "in", tmp_path / "ok", "--val_tokens", "5", "--workers", "2")
    capsys.readouterr()

    def interrupted(path, tokens):  # Ctrl-C reaches the main process while it writes a shard
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "write_shard", interrupted)
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--val_tokens", "5"])
    assert e.value.code == 130
    assert capsys.readouterr().err == ("prepare_data.py: interrupted: the output is incomplete; "
                                       "rerun to restart from scratch\n")
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_only_data_errors_end_in_one_line(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--input", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"prepare_data.py: error: --input: {tmp_path / 'nope'} does not exist "
                        "(allowed: .txt, .jsonl, .jsonl.gz, .parquet, or folders of them)\n")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--val_tokens=-1"])
    assert e.value.code == "prepare_data.py: error: --val_tokens=-1 is invalid: must be >= 0"
    assert issubclass(prepare_data.DataError, ValueError)  # train.py's one-line handler catches it too

    def buggy(paths):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(prepare_data, "local_files", buggy)
    with pytest.raises(ValueError, match="a bug") as e:
        prepare_data.main(["--input", "x"])
    assert type(e.value) is ValueError  # not turned into a one-line exit: its traceback stays


def test_prepare_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("val_tokens", "10485760"), ("shard_tokens", "100000000"), ("name", "sample-10BT"),
                            ("text_field", "text"), ("max_tokens", "0")]:
        described = text.split(f"--{option} {option.upper()} ")[-1].split(" --")[0]
        assert f"(default: {default}" in described, option


class FakeDatasets:
    """Stands in for the datasets package: the hub's FineWeb-Edu rows, offline."""
    def __init__(self, rows):
        self.rows = rows

    def load_dataset(self, path, name, split, streaming):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        return iter(self.rows)


def test_fineweb_path_uses_the_same_code(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"text": d, "score": 3.1} for d in DOCS]))
    m = prepare_data.prepare(prepare_data.parse_args(["--out", str(tmp_path / "fw"), "--val_tokens", "8", "--workers", "2"]))
    assert m["source"] == "HuggingFaceFW/fineweb-edu:sample-10BT"
    assert m["val_sources"] == {"HuggingFaceFW/fineweb-edu:sample-10BT": 8}
    assert os.path.exists(tmp_path / "fw" / "fineweb_edu_val_000000.bin")
    assert all_tokens(tmp_path / "fw").tolist() == eot_tokens(DOCS)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"text": "ok"}, {"body": "x"}]))
    with pytest.raises(prepare_data.DataError, match="fineweb-edu:sample-10BT row 1: no 'text' field"):
        prepare_data.prepare(prepare_data.parse_args(["--out", str(tmp_path / "fw2"), "--workers", "1"]))


# ============================================================================ train.py

TRAIN_TINY = ["--n_layer=2", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--batch_size=2",
              "--total_batch=4", "--warmup_steps=2", "--lr=3e-3", "--eval_interval=4", "--val_tokens=128",
              "--log_interval=1", "--sample_tokens=0", "--d_v=2", "--compressor=tc", "--device=cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    gen = np.random.default_rng(0)
    words = ["delta", "rule", "state", "gate", "erase", "write", "the", "a", "of", "token"]
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(gen.choice(words, size=40))}) + "\n")
    run_prepare(folder / "docs.jsonl", folder / "out", "--val_tokens", "512", "--shard_tokens", "3000", "--workers", "1")
    return str(folder / "out")


def run_train(shards, out, *extra):
    train.main([*TRAIN_TINY, f"--data_dir={shards}", f"--out_dir={out}", *extra])
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_writes_checkpoint_and_log(shards, tmp_path):
    log = run_train(shards, tmp_path / "o", "--max_steps=5")
    assert log[0]["type"] == "config" and log[0]["model_config"]["d_v"] == 2 and log[0]["torch"] == torch.__version__
    tr = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in tr] == [1, 2, 3, 4, 5]
    assert set(tr[-1]) >= {"loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "mfu", "train_time_s"}
    assert tr[0]["ms_per_step"] is None and tr[-1]["ms_per_step"] > 0 and tr[-1]["train_time_s"] > 0
    assert [r["step"] for r in log if r["type"] == "val"] == [0, 4, 5]
    gates = [r for r in log if r["type"] == "gates"][-1]["gates"]
    assert len(gates) == 4 and {"beta_mean", "beta_hist", "k_norm_mean", "e_pre_mean"} <= set(gates[0])
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 5 and ckpt["model_config"]["compressor"] == "tc"
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "data", "rng"}


def test_tiny_model_overfits_a_fixed_batch():
    m = tiny_model(residual="delta", d_v=4, compressor="cc")
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m(idx[:, :-1], idx[:, 1:])[1].item()
    for _ in range(60):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_resume_is_exact(shards, tmp_path):
    straight = run_train(shards, tmp_path / "a", "--max_steps=8", "--decay_steps=8")
    run_train(shards, tmp_path / "b", "--max_steps=3", "--decay_steps=8")
    resumed = run_train(shards, tmp_path / "b", "--max_steps=8", "--decay_steps=8", "--resume")
    losses = lambda log: {r["step"]: r["loss"] for r in log if r["type"] == "train"}
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in range(1, 9))  # bit-exact on CPU
    vals = lambda log: [(r["step"], r["loss"]) for r in log if r["type"] == "val"]
    assert vals(straight)[-1] == vals(resumed)[-1]


def test_two_gloo_processes_equal_one_with_double_accumulation(shards, tmp_path):
    common = [*TRAIN_TINY, f"--data_dir={shards}", "--max_steps=4", "--decay_steps=4", "--total_batch=8", "--peak_tflops=1e-9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "train.py"), *common, f"--out_dir={tmp_path / 'ddp'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    train.main([*common, f"--out_dir={tmp_path / 'one'}"])
    read = lambda d: [json.loads(line) for line in open(tmp_path / d / "log.jsonl")]
    ddp, one = read("ddp"), read("one")
    assert ddp[0]["world_size"] == 2 and ddp[0]["grad_accum"] == 2 and one[0]["grad_accum"] == 4
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)["world_size"] == 2  # a resume checks it
    lt = lambda log: [r["loss"] for r in log if r["type"] in ("train", "val")]
    assert len(lt(ddp)) == len(lt(one)) == 4 + 2
    assert np.allclose(lt(ddp), lt(one), rtol=1e-5, atol=1e-6)
    # tokens_per_s counts the whole step (total_batch x block_size over all processes); mfu is per GPU
    flops = 6 * one[0]["params"] + 12 * 2 * 16 * 16
    for log, world in ((ddp, 2), (one, 1)):
        timed = [r for r in log if r["type"] == "train" and r["ms_per_step"]]
        assert len(timed) == 3
        for r in timed:
            assert r["tokens_per_s"] * r["ms_per_step"] / 1000 == pytest.approx(8 * 16, rel=1e-9)
            assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / world / 1000.0, rel=1e-9)


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    keys = [f.name for kind in (train.TrainConfig, GPTConfig) for f in dataclasses.fields(kind)]
    assert len(keys) == 42
    for key in keys:
        line = next(l for l in out.splitlines() if l.startswith(f"  --{key}="))
        assert len(line.split(None, 1)) == 2, f"--{key} has no description"


def test_training_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="no \\*_train_\\*.bin"):
        train.main([*TRAIN_TINY, f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="unknown key --n_layers; did you mean --n_layer"):
        train.main(["--n_layers=3"])
    with pytest.raises(ValueError, match="--max_steps='ten': expected a int"):
        train.main(["--max_steps=ten"])
    with pytest.raises(ValueError, match="--preset='1b'"):
        train.main(["--preset=1b"])
    with pytest.raises(ValueError, match="--eval_interval=0: must be >= 1"):
        train.main(["--eval_interval=0"])
    with pytest.raises(ValueError, match="--mode='tune': allowed: train, sample"):
        train.main(["--mode=tune"])
    run_train(shards, tmp_path / "c", "--max_steps=1")
    before = (tmp_path / "c" / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="the checkpoint's n_layer was 2, asked: 3"):
        run_train(shards, tmp_path / "c", "--max_steps=2", "--n_layer=3", "--resume")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        run_train(shards, tmp_path / "d", "--max_steps=2", "--resume")
    assert (tmp_path / "c" / "ckpt.pt").read_bytes() == before
    assert (tmp_path / "d" / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_token_stream_is_seeded_disjoint_and_resumable():
    shard = [np.arange(1000, dtype=np.uint16), np.arange(1000, 1600, dtype=np.uint16)]
    firsts = lambda s, n: [s.next_batch()[0][:, 0].tolist() for _ in range(n)]
    a, b = train.TokenStream(shard, 10, 4, seed=1), train.TokenStream(shard, 10, 4, seed=2)
    assert firsts(a, 3) != firsts(b, 3)
    r0, r1 = train.TokenStream(shard, 10, 2, 1, 0, 2), train.TokenStream(shard, 10, 2, 1, 1, 2)
    seen0, seen1 = set(sum(firsts(r0, 10), [])), set(sum(firsts(r1, 10), []))
    assert not seen0 & seen1
    s = train.TokenStream(shard, 10, 4, seed=1)
    firsts(s, 5)
    state = s.state()
    rest = firsts(s, 30)  # crosses shards and epochs
    t = train.TokenStream(shard, 10, 4, seed=1)
    t.load_state(state)
    assert firsts(t, 30) == rest


def test_token_stream_windows_cover_each_shard_once_per_epoch_in_a_new_order():
    """Shards A = 0..960 (96 windows of T=10: 24 batches of 4), B = 1000..1599 (59 windows: 14 batches, 3
    left out) and C = 2000..2024 (2 windows: fewer than a batch, never drawn). x is a window, y the same
    window one token on; an epoch is 38 batches, each shard's batches in one run of distinct windows."""
    shards = [np.arange(0, 961, dtype=np.uint16), np.arange(1000, 1600, dtype=np.uint16), np.arange(2000, 2025, dtype=np.uint16)]
    s = train.TokenStream(shards, 10, 4, seed=3)
    epochs, shard_orders, states = [], set(), {}
    for e in range(4):
        starts = []
        for b in range(38):
            states[38 * e + b] = s.state()
            x, y = s.next_batch()
            assert s.state()["epoch"] == e  # every shard of the order read before the epoch ends
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 10)
            assert torch.equal(y, x + 1) and torch.equal(x - x[:, :1], torch.arange(10).expand(4, 10))
            starts.append(x[:, 0].tolist())
        kinds = [{v // 1000 for v in b} for b in starts]
        assert all(len(k) == 1 for k in kinds)  # a batch comes from one shard
        runs = [k.pop() for k in kinds]
        shard_orders.add(tuple(dict.fromkeys(runs)))
        assert sorted(runs) == [0] * 24 + [1] * 14 and runs in ([0] * 24 + [1] * 14, [1] * 14 + [0] * 24)
        flat = sum(starts, [])
        assert sorted(v for v in flat if v < 1000) == list(range(0, 960, 10))
        b_windows = [v for v in flat if v >= 1000]
        assert len(set(b_windows)) == 56 and set(b_windows) <= set(range(1000, 1590, 10))
        epochs.append(flat)
    assert len(shard_orders) == 2  # the shards' order is shuffled per epoch, and so is each shard's window order:
    for lo, hi in ((0, 1000), (1000, 2000)):
        assert len({tuple(v for v in e if lo <= v < hi) for e in epochs}) == 4
    for at in (30, 45, 100):  # inside the second shard of an epoch, in the next epoch
        t = train.TokenStream(shards, 10, 4, seed=3)
        t.load_state(states[at])
        assert [t.next_batch()[0][:, 0].tolist() for _ in range(40)] == [sum(epochs, [])[4 * i:4 * i + 4] for i in range(at, at + 40)]
    # two ranks: disjoint halves of A's windows that together cover it
    r0, r1 = (train.TokenStream(shards[:1], 10, 4, 3, r, 2) for r in (0, 1))
    w0, w1 = (sum((st.next_batch()[0][:, 0].tolist() for _ in range(12)), []) for st in (r0, r1))
    assert sorted(w0 + w1) == list(range(0, 960, 10))


def test_token_stream_needs_one_batch_of_windows_per_process():
    train.TokenStream([np.arange(41, dtype=np.uint16)], 10, 4, seed=0)  # 4 windows of 10 + 1 tokens: one batch
    train.TokenStream([np.arange(81, dtype=np.uint16)], 10, 4, 0, 1, 2)  # 8 windows: 4 for each of 2 processes
    for tokens, world in ((40, 1), (80, 2)):
        with pytest.raises(prepare_data.DataError, match=f"too few tokens for batch_size=4 x block_size=10 x {world} processes"):
            train.TokenStream([np.arange(tokens, dtype=np.uint16)], 10, 4, 0, 0, world)


def test_bench_runs_on_cpu(capsys):
    rows = bench.bench(*train.parse_args(
        ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
         "--bench_batch=2", "--bench_steps=2", "--device=cpu"], (train.TrainConfig, GPTConfig, bench.BenchConfig)))
    assert [r["variant"] for r in rows] == ["additive", "delta", "cc", "tc", "write"]
    assert all(r["train_tps"] > 0 and r["infer_tps"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out


def test_smoke_preset_trains_on_the_repository_text_and_samples(tmp_path, capsys):
    out = tmp_path / "smoke"
    train.main(["--preset=smoke", "--max_steps=2", "--decay_steps=200", "--eval_interval=2", "--val_tokens=1024",
                "--sample_tokens=5", "--device=cpu", f"--data_dir={tmp_path / 'none'}", f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert "sample: " in printed and "val loss" in printed
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["model_config"]["d_v"] == 4 and [r["step"] for r in log if r["type"] == "val"] == [0, 2]
    train.main(["--mode=sample", f"--out_dir={out}", "--prompt=def", "--sample_tokens=6", "--device=cpu"])
    text = capsys.readouterr().out
    assert text.startswith("def") and len(tiktoken.get_encoding("gpt2").encode_ordinary(text.strip())) >= 3


# ---------------------------------------------------------------------------- fused.py: the Triton path, pinned to the reference
# The kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before fused.py is imported).
# CI installs Triton for these tests (.ci/run); without it they are skipped.

@pytest.fixture(scope="module")
def fused():
    pytest.importorskip("triton", reason="fused.py needs Triton (pip install triton; CI installs it)")
    import fused
    assert fused.INTERPRET
    return fused


EPS_K = 0.3  # large enough that eps_k shows in k = k~ / sqrt(|k~|^2 + eps_k^2)


def o_step(X, k_tilde, v, beta, W, gamma, erase):
    """The fused step written out: k = k~ / sqrt(|k~|^2 + eps_k^2) (§3.1), e = k^T X - v (Eq. 2.4; -v without
    the erase term), X' = X - beta k e^T (Eq. 2.2), x_in[i] = sum_j W[i, j] X'[i, j] (the next CC read) and
    c = RMSNorm(x_in) with gain gamma (x_in itself when gamma is None)."""
    k = k_tilde / torch.sqrt((k_tilde * k_tilde).sum(-1, keepdim=True) + EPS_K ** 2)
    e = (k[..., :, None] * X).sum(-2) - v if erase else -v
    Xn = X - beta[..., None, None] * k[..., :, None] * e[..., None, :]
    x_in = (Xn * W).sum(-1)
    return Xn, x_in if gamma is None else o_rms(x_in, gamma)


def step_inputs(dtype, B=2, T=5, d=24, d_v=3, seed=5):
    """X, k~ (not unit: the kernel normalises it), v in (0, 4), beta in (0, 2), the mix W and the gain
    gamma away from their inits, with d and d_v off a power of 2 (the kernels' padded lanes); and the
    gradients of X' and c."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, d, d_v, generator=gen, dtype=F64)
    k_tilde = torch.randn(B, T, d, generator=gen, dtype=F64) * torch.rand(B, T, 1, generator=gen, dtype=F64)
    v, beta = 4 * torch.rand(B, T, d_v, generator=gen, dtype=F64), 2 * torch.rand(B, T, generator=gen, dtype=F64)
    W, gamma = torch.randn(d, d_v, generator=gen, dtype=F64) / 2, 1 + torch.randn(d, generator=gen, dtype=F64) / 2
    grads = torch.randn(B, T, d, d_v, generator=gen, dtype=F64), torch.randn(B, T, d, generator=gen, dtype=F64)
    return [X.to(dtype), k_tilde.to(dtype), v.float(), beta.float(), W.to(dtype), gamma.to(dtype)], grads


def outputs_and_grads(f, inputs, grads):
    ins = [t.clone().requires_grad_() for t in inputs]
    outs = f(*ins)[:2]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + [t.grad for t in ins]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fused_step(fused, erase, norm=True):
    """fused.step on step_inputs' list; without the norm, gamma is not passed (and gets no gradient)."""
    return lambda X, kt, v, beta, W, gamma: fused.step(X, kt, v, beta, W, gamma if norm else None, EPS_K, erase)


def oracle_step(erase, norm=True):
    return lambda X, kt, v, beta, W, gamma: o_step(X, kt, v, beta, W, gamma if norm else None, erase)


STEP_NAMES = ["X'", "c", "dX", "dk~", "dv", "dbeta", "dW", "dgamma"]


def check_step(got, want, tol):
    for name, g, w in zip(STEP_NAMES, got, want):
        if w is None:
            assert g is None, name
        else:
            assert rel_err(g, w) < tol, name


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "readout"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write"])
def test_fused_step_equals_the_written_out_rule_in_fp32(fused, erase, norm):
    """Outputs and the gradients of X, k~, v, beta, W and gamma: the kernels (fp32) against the float64
    oracle, with the next sublayer's norm and without it (the last boundary, before the readout)."""
    inputs, grads = step_inputs(torch.float32)
    got = outputs_and_grads(fused_step(fused, erase, norm), inputs, grads)
    want = outputs_and_grads(oracle_step(erase, norm), [t.double() for t in inputs], grads)
    assert [got[i].dtype for i in range(2, 7 + norm)] == [t.dtype for t in inputs][:5 + norm]
    check_step(got, want, 1e-5)


def test_fused_step_in_bf16_is_within_bf16_rounding_of_the_rule(fused):
    """bf16 state, k~, W and gamma: within 3x the distance of ddl.py's own functions in bf16 from the float64
    oracle. Not 1x: Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU, like torch, to nearest),
    which about doubles each rounding's error (here X': 0.0050, ddl.py 0.0024); bench.py checks the GPU."""
    inputs, grads = step_inputs(torch.bfloat16, d=40, d_v=4)
    want = outputs_and_grads(oracle_step(True), [t.double() for t in inputs], grads)
    got = outputs_and_grads(fused_step(fused, True), inputs, grads)

    def ddl_step(X, k_tilde, v, beta, W, gamma):
        Xn = delta_update(X, unit_direction(k_tilde, EPS_K), v, beta)
        x_in = torch.sum(Xn * W, dim=-1)
        return Xn, F.rms_norm(x_in, (x_in.shape[-1],), gamma, eps=1e-5)

    ref = outputs_and_grads(ddl_step, inputs, grads)
    for name, g, r, w in zip(STEP_NAMES, got, ref, want):
        assert rel_err(g, w) <= 3 * rel_err(r, w), name


def bf16_toward_zero(x):
    """fp32 -> bf16 -> fp32 as Triton 3.6's interpreter rounds: toward zero (drop the low 16 bits)."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def test_fused_step_rounds_where_ddl_rounds_in_bf16(fused):
    """bf16 state and k~, fp32 W and gamma (their gradients come back unrounded): k rounded twice (RMSNorm,
    then 1/sqrt(d)), X' rounded, x_in rounded before the norm, in the forward and in both backward
    kernels' recomputes. Written out from the op's own e and 1/rms(k~), with the interpreter's rounding."""
    inputs, grads = step_inputs(torch.bfloat16, d=40, d_v=4)
    ins = [t.clone().requires_grad_() for t in inputs[:4]] + [t.float().requires_grad_() for t in inputs[4:]]
    X, kt, v, beta, W, gamma = ins
    Xn, c, e, rk, rstd = fused.step(*ins, EPS_K, True)
    dc = grads[1].to(torch.bfloat16)
    torch.autograd.backward([Xn, c], [grads[0].to(torch.bfloat16), dc])
    R, dc = bf16_toward_zero, dc.float()
    with torch.no_grad():
        k = R(R(kt.float() * rk[..., None]) * (1 / math.sqrt(40)))
        assert torch.equal(Xn.float(), R(X.float() - beta[..., None, None] * k[..., :, None] * e[..., None, :]))
        x_in = R((W * Xn.float()).sum(-1))
        r = torch.rsqrt((x_in * x_in).mean(-1, keepdim=True) + 1e-5)
        assert (R(x_in * r * gamma) == c.float()).float().mean() > 0.99
        s = (gamma * dc * x_in).sum(-1, keepdim=True) * r ** 3 / 40
        assert rel_err(W.grad, ((r * gamma * dc - x_in * s)[..., None] * Xn.float()).sum((0, 1))) < 1e-5
        assert rel_err(gamma.grad, (dc * x_in * r).sum((0, 1))) < 1e-5


def test_fused_kernels_read_nothing_past_their_inputs(fused):
    """Every input a view of a longer buffer whose tail is NaN: a load that escapes its mask (the padded
    lanes of d and d_v, a token past the last) turns an output or a gradient into NaN."""
    inputs, grads = step_inputs(torch.float32)

    def nan_tailed(t):
        return torch.cat([t.flatten(), torch.full((256,), float("nan"), dtype=t.dtype)])[:t.numel()].view(t.shape)

    got = outputs_and_grads(fused_step(fused, True), inputs, grads)  # clean copies
    ins = [nan_tailed(t).requires_grad_() for t in inputs]
    outs = fused.step(*ins, EPS_K, True)[:2]
    torch.autograd.backward(outs, [nan_tailed(g.float()) for g in grads])
    for name, a, b in zip(STEP_NAMES, [o.detach() for o in outs] + [t.grad for t in ins], got):
        assert torch.equal(a, b), name


def test_fused_op_passes_torch_library_opcheck(fused):
    """What torch.compile relies on: the fake implementation's shapes, dtypes and strides (a non-contiguous
    X), every output defined (no norm included), and the autograd registration, with and without gamma."""
    inputs, _ = step_inputs(torch.float32, d=20, d_v=3)
    X, k_tilde, v, beta, W, gamma = (t.requires_grad_() for t in inputs)
    X = X.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    for g in (gamma, None):
        torch.library.opcheck(fused.step, (X, k_tilde, v, beta, W, g, EPS_K, True))

def fused_pair(fused, **kw):
    """A scrambled fp32 model and its copy with the fused body installed."""
    m = scrambled(**kw).float()
    twin = scrambled(**kw).float()
    return m, fused.install(twin)


def check_fused_model(ref, fast, B, T):
    """One forward and backward of both models on the same batch: equal losses and, per parameter,
    gradients equal to 1e-5 of their scale."""
    idx, tgt = (torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    losses = []
    for m in (ref, fast):
        loss = m(idx, tgt)[1]
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-5 * (1 + p.grad.abs().max()), n


@pytest.mark.parametrize("name", ["cc_ec", "cc", "write4"])
def test_fused_model_equals_ddl_forward_and_gradients(fused, name):
    """The whole model through the fused body (one step per sublayer boundary, the next compressor read
    and norm in the kernel): loss and every parameter's gradient equal to ddl.py's forward, in fp32."""
    ref, fast = fused_pair(fused, **VARIANTS[name])
    check_fused_model(ref, fast, 2, 7)
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fast = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert rel_err(g_fast, g_ref) < 1e-5


def check_same_gates(want, got):
    """Two gate audits equal: the beta histograms exactly, every statistic to 1e-6 (pytest.approx takes
    no nested lists in pytest 9, so the rows are compared key by key)."""
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if isinstance(a[key], (list, str, int)) else pytest.approx(b[key])), key


def test_fused_gate_audit_records_through_ddl_forward(fused):
    ref, fast = fused_pair(fused, **VARIANTS["cc_ec"])
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    check_same_gates(ref.gate_audit(idx), fast.gate_audit(idx))
    assert fast.blocks[0].attn.stats is None  # and recording is off again


def test_fused_install_refuses_what_it_does_not_run(fused, monkeypatch):
    for kw, message in ((dict(d_v=1), "fused: d_v=1 is not supported: must be > 1"),
                        (dict(d_v=4, check_spectrum=True), "fused: check_spectrum=True is not supported"),
                        (dict(d_v=4, compressor="tc"), "fused: compressor='tc' is not supported: must be cc")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            fused.install(tiny_model(**kw))
    monkeypatch.setattr(fused, "INTERPRET", False)  # a CPU model without the interpreter
    with pytest.raises(ConfigError, match=re.escape("fused: device='cpu' is not supported: must be cuda")):
        fused.install(tiny_model(d_v=4))


def test_train_with_fused_logs_the_losses_of_the_reference(fused, tmp_path, monkeypatch):
    """--fused=true changes the kernels, not the run: the same train and val losses, step by step."""
    calls, step = [], fused.step
    monkeypatch.setattr(fused, "step", lambda *a: calls.append(1) or step(*a))
    logs, steps_run = [], []
    for on in ("false", "true"):
        out = tmp_path / on
        train.main(["--preset=smoke", "--n_embd=16", "--head_dim=8", "--block_size=16", "--max_steps=1", "--eval_interval=1",
                    "--val_tokens=32", "--log_interval=1", "--batch_size=2", "--total_batch=2", "--sample_tokens=0",
                    "--device=cpu", f"--fused={on}",
                    f"--data_dir={tmp_path / 'none'}", f"--out_dir={out}"])
        logs.append([r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if r["type"] in ("train", "val")])
        steps_run.append(len(calls))
    assert steps_run[0] == 0 and steps_run[1] > 0  # the kernels ran in the fused run only
    assert len(logs[0]) == 3 and logs[1] == pytest.approx(logs[0], rel=1e-5)  # val 0, train 1, val 1


def test_bench_reference_step_is_the_written_out_rule():
    """bench.py's float64 reference for the fast-path check (k, Eq. 2.2, the next read and norm) against o_step."""
    inputs, _ = step_inputs(F64)
    for got, want in zip(bench.reference_step(*inputs, EPS_K), o_step(*inputs, True)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bench_with_fused_labels_the_fused_rows(fused, monkeypatch):
    monkeypatch.setattr(bench, "check_fast_path", lambda dev, use_compile, fused: None)
    monkeypatch.setattr(bench, "time_ms", lambda fn, steps, dev: (fn(), 1.0)[1])  # one call each, untimed
    rows = bench.bench(*train.parse_args(
        ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
         "--bench_batch=2", "--bench_steps=1", "--bench_variants=additive,cc,tc", "--fused=true", "--device=cpu"], BENCH_KINDS))
    assert [r["variant"] for r in rows] == ["additive", "cc+fused", "tc"]  # TC runs ddl.py's read


FUSED_SHAPES = {  # d_v off a power of 2, one layer, d = 24, a large k_eps
    "dv2": dict(residual="delta", d_v=2, compressor="cc", embed_conv=False),
    "dv3_ec": dict(residual="delta", d_v=3, compressor="cc", embed_conv=True),
    "dv8": dict(residual="delta", d_v=8, compressor="cc", embed_conv=False, n_layer=1),
    "write_dv3": dict(residual="write", d_v=3, compressor="cc", embed_conv=False),
    "d24": dict(residual="delta", d_v=3, compressor="cc", n_head=3, head_dim=8, n_embd=24, n_layer=1),
    "k_eps": dict(residual="delta", d_v=3, compressor="cc", embed_conv=False, n_layer=1, k_eps=0.5),  # config.k_eps reaches the op
}


@pytest.mark.parametrize("name", list(FUSED_SHAPES))
def test_fused_model_equals_ddl_across_shapes(fused, name):
    check_fused_model(*fused_pair(fused, **FUSED_SHAPES[name]), 2, 5)


def test_fused_eval_and_generate_equal_ddl(fused):
    ref, fast = fused_pair(fused, **VARIANTS["cc_ec"])
    ref.eval(), fast.eval()
    idx = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ref(idx)[0], fast(idx)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.generate(idx, 4, temperature=0), fast.generate(idx, 4, temperature=0))


def test_fused_frozen_parameters_and_two_forwards_before_backward(fused):
    ref, fast = fused_pair(fused, **VARIANTS["cc"], n_layer=1)
    for m in (ref, fast):
        for n, p in m.named_parameters():
            if "compressor" in n or "readout" in n or "norm" in n or n == "wte.weight":
                p.requires_grad_(False)
    idx, tgt = (torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for m in (ref, fast):
        (m(idx, tgt)[1] + m(idx.flip(1), tgt)[1]).backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).abs().max() <= 1e-5 * (1 + p.grad.abs().max()), n
        else:
            assert q.grad is None


def test_fused_step_takes_non_contiguous_inputs(fused):
    inputs, grads = step_inputs(torch.float32, d=20, d_v=3)
    X, k_tilde, v, beta, W, gamma = inputs
    # transposed or strided storage: same values, other strides
    nc = [X.transpose(0, 1).contiguous().transpose(0, 1), k_tilde.transpose(0, 1).contiguous().transpose(0, 1),
          v.transpose(0, 1).contiguous().transpose(0, 1), beta.t().contiguous().t(), W.t().contiguous().t(),
          torch.stack([gamma, gamma], -1)[:, 0]]
    assert not any(t.is_contiguous() for t in nc)
    got = outputs_and_grads(fused_step(fused, True), nc, grads)
    check_step(got, outputs_and_grads(oracle_step(True), [t.double() for t in inputs], grads), 1e-5)


@pytest.mark.parametrize("tokens,block_i,block_t", [(4, 16, 4), (4, 32, 8), (1, 64, 4)])
def test_fused_step_under_the_gpu_tile_configs(fused, monkeypatch, tokens, block_i, block_t):
    """The autotuner's other configs (the interpreter runs only the first): tokens per program not dividing
    the token count, feature blocks not dividing d, weight-gradient chunks longer than BLOCK_T and not a multiple."""
    for kern in (fused._step_fwd, fused._step_bwd):
        monkeypatch.setattr(kern, "configs", [fused.triton.Config(dict(TOKENS=tokens), num_warps=4)])
    monkeypatch.setattr(fused._weight_bwd, "configs", [fused.triton.Config(dict(BLOCK_I=block_i, BLOCK_T=block_t), num_warps=2)])
    monkeypatch.setattr(fused, "CHUNK", 10)  # 38 tokens: chunks of 10 (> BLOCK_T, not a multiple), the last 8
    inputs, grads = step_inputs(torch.float32, B=2, T=19, d=40, d_v=3, seed=9)
    got = outputs_and_grads(fused_step(fused, True), inputs, grads)
    check_step(got, outputs_and_grads(oracle_step(True), [t.double() for t in inputs], grads), 1e-5)


def test_fused_install_on_a_compiled_model(fused):
    """install(torch.compile(model)): the fused body goes on the wrapped model, bound to it, so the compiled
    forward runs it and the gate audit's fallback to ddl.py's body finds GPT.body."""
    ref = scrambled(**VARIANTS["cc"]).float()
    inner = scrambled(**VARIANTS["cc"]).float()
    fast = fused.install(torch.compile(inner, backend="eager"))
    assert inner.body.__func__ is fused.fused_body and inner.body.__self__ is inner
    idx, tgt = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert fast(idx, tgt)[1].item() == pytest.approx(ref(idx, tgt)[1].item(), rel=1e-6)
    check_same_gates(ref.gate_audit(idx), fast.gate_audit(idx))


def test_fused_install_refuses_a_float64_model(fused):
    """The kernels compute in fp32: a float64 model would get fp32-accurate results, silently; and only
    the two dtypes the refusal names (float32, bfloat16) are taken."""
    for model, dtype in ((scrambled(**VARIANTS["cc"]), "float64"), (tiny_model(**VARIANTS["cc"]).half(), "float16")):
        with pytest.raises(ConfigError, match=re.escape(f"fused: dtype=torch.{dtype} is not supported: must be")):
            fused.install(model)


# ---------------------------------------------------------------------------- train.py against oracles

def train_cfg(**kw):
    return train.TrainConfig(**{"device": "cpu", **kw})


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    """Linear warm-up reaches lr at step warmup_steps - 1; cosine from lr (step warmup_steps) to min_lr
    (step decay_steps), then flat. Expected values written out."""
    cfg = train_cfg(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, max_steps=200)
    want = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 5.5e-4, 35: 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2,
            110: 1e-4, 150: 1e-4, 199: 1e-4}
    for step, lr in want.items():
        assert train.lr_at(step, cfg) == pytest.approx(lr, rel=1e-12), step
    cfg = train_cfg(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=0, max_steps=100)  # decay_steps 0: max_steps
    assert train.lr_at(0, cfg) == pytest.approx(1e-3) and train.lr_at(50, cfg) == pytest.approx(5e-4)
    assert train.lr_at(100, cfg) == pytest.approx(0.0, abs=1e-15)


def test_weight_decay_only_on_matrices_by_name():
    m = tiny_model(residual="delta", d_v=4, compressor="cc", embed_conv=True)
    opt = m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    want = {"wte.weight", "embed_conv.weight", "readout.mix"}
    for i in range(2):
        for s, mats in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            want |= {f"blocks.{i}.{s}.compressor.mix", f"blocks.{i}.{s}.W_v"} | {f"blocks.{i}.{s}.f.{w}.weight" for w in mats}
    assert decayed == want
    assert plain == {n for n, _ in m.named_parameters()} - want
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_gradient_accumulation_equals_one_batch_of_the_same_tokens():
    """Two micro-batches of 3 with accumulation give the update of one batch of 6: with plain SGD
    (no clipping at this size) the parameters after the step must agree, and the returned loss is the mean."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 97, (6, 12), generator=gen), torch.randint(0, 97, (6, 12), generator=gen)
    cfg = train_cfg(grad_clip=1e9)
    results = []
    for accum, batches in ((2, [(x[:3], y[:3]), (x[3:], y[3:])]), (1, [(x, y)])):
        m = tiny_model(residual="delta", d_v=4, compressor="tc")
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        it = iter(batches)
        loss, _ = train.train_step(m, m, opt, lambda: next(it), accum, 0.5, cfg, nullcontext())
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    (la, pa), (lb, pb) = results
    assert la == pytest.approx(lb, rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(pa, pb)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(pa, tiny_model(residual="delta", d_v=4, compressor="tc").parameters())) > 1e-3


def test_validation_is_the_mean_over_exactly_val_tokens_over_T_windows():
    m = tiny_model(residual="delta", d_v=2, compressor="cc").eval()
    T = m.config.block_size
    val = np.random.default_rng(3).integers(0, 97, 8 * T).astype(np.uint16)
    cfg = train_cfg(val_tokens=5 * T + 3, batch_size=2)  # 5 whole windows, not 6 (the shard holds 7)
    got, gates = train.evaluate(m, m, val, cfg, nullcontext(), torch.device("cpu"), 0, 1)
    windows = [torch.from_numpy(val[w * T:(w + 1) * T + 1].astype(np.int64))[None] for w in range(5)]
    with torch.no_grad():
        want = sum(m(w[:, :-1], w[:, 1:])[1].item() for w in windows) / 5
    assert got == pytest.approx(want, rel=1e-6)
    assert len(gates) == 4
    # a budget beyond the shard: every whole window, 7 of the 8 T tokens (the 8th lacks its last target)
    got, _ = train.evaluate(m, m, val, train_cfg(val_tokens=100 * T, batch_size=4), nullcontext(), torch.device("cpu"), 0, 1)
    windows = [torch.from_numpy(val[w * T:(w + 1) * T + 1].astype(np.int64))[None] for w in range(7)]
    with torch.no_grad():
        assert got == pytest.approx(sum(m(w[:, :-1], w[:, 1:])[1].item() for w in windows) / 7, rel=1e-6)


def test_adamw_takes_the_configured_betas_and_every_group_the_step_lr():
    cfg = train_cfg(beta1=0.8, beta2=0.99, weight_decay=0.07)
    m, _, opt = train.build(cfg, GPTConfig(**{**TINY, "d_v": 2, "compressor": "cc"}), torch.device("cpu"))
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.99), (0.8, 0.99)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.0]
    x = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    train.train_step(m, m, opt, lambda: (x, x), 1, 0.0123, train_cfg(), nullcontext())
    assert [g["lr"] for g in opt.param_groups] == [0.0123, 0.0123]


def test_train_step_clips_the_accumulated_gradient_to_grad_clip_and_returns_the_unclipped_norm():
    """Two plain-SGD steps of two micro-batches each against a hand-written step: the gradient of the
    mean of the micro-batch losses, scaled by grad_clip / norm (torch's clip, with its 1e-6), fresh every step."""
    gen = torch.Generator().manual_seed(11)
    data = [(torch.randint(0, 97, (2, 12), generator=gen), torch.randint(0, 97, (2, 12), generator=gen)) for _ in range(4)]
    clip, lr = 0.05, 0.5
    m, ref = tiny_model(seed=3, residual="delta", d_v=4, compressor="cc"), tiny_model(seed=3, residual="delta", d_v=4, compressor="cc")
    opt, it = torch.optim.SGD(m.parameters(), lr=lr), iter(data)
    for step in range(2):
        loss, norm = train.train_step(m, m, opt, lambda: next(it), 2, lr, train_cfg(grad_clip=clip), nullcontext())
        losses = [ref(x, y)[1] for x, y in data[2 * step:2 * step + 2]]
        grads = torch.autograd.grad((losses[0] + losses[1]) / 2, list(ref.parameters()))
        want_norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
        assert norm.item() == pytest.approx(want_norm, rel=1e-5) and want_norm > 4 * clip  # the clip bites
        assert loss.item() == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= lr * clip / (want_norm + 1e-6) * g
        assert max((a - b).abs().max().item() for a, b in zip(m.parameters(), ref.parameters())) < 1e-6, step


def test_flops_per_token_is_6n_plus_12_layers_t_d():
    m = tiny_model(residual="delta", d_v=2, compressor="cc")
    n = sum(p.numel() for p in m.parameters())
    assert m.flops_per_token(32) == 6 * n + 12 * 2 * 32 * 16
    assert m.flops_per_token(7) == 6 * n + 12 * 2 * 7 * 16


class FakeClock:
    """train.py's clock: one second per training step, 100 seconds per evaluation."""
    def __init__(self, monkeypatch):
        self.now = 0.0
        real_step, real_eval = train.train_step, train.evaluate
        monkeypatch.setattr(train, "time", self)
        monkeypatch.setattr(train, "train_step", lambda *a: (setattr(self, "now", self.now + 1.0), real_step(*a))[1])
        monkeypatch.setattr(train, "evaluate", lambda *a: (setattr(self, "now", self.now + 100.0), real_eval(*a))[1])

    def perf_counter(self):
        return self.now


def test_log_lines_timing_tokens_per_s_and_mfu_on_a_fake_clock(shards, tmp_path, monkeypatch):
    """Train records at the first step, every log_interval and the last; the clock starts after the first
    step and pauses for evaluations, so with 1 s per step: ms_per_step 1000, train_time_s step - 1,
    tokens_per_s total_batch x block_size = 64, mfu flops_per_token x 64 / peak."""
    FakeClock(monkeypatch)
    log = run_train(shards, tmp_path / "t", "--max_steps=7", "--log_interval=3", "--eval_interval=2",
                    "--ckpt_interval=100", "--peak_tflops=1e-9")
    tr = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in tr] == [1, 3, 6, 7]
    assert [r["train_time_s"] for r in tr] == [0.0, 2.0, 5.0, 6.0]
    assert tr[0]["ms_per_step"] is None and tr[0]["tokens_per_s"] is None and tr[0]["mfu"] is None
    flops = 6 * sum(p.numel() for p in GPT(GPTConfig(**log[0]["model_config"])).parameters()) + 12 * 2 * 16 * 16
    for r in tr[1:]:
        assert (r["ms_per_step"], r["tokens_per_s"]) == (1000.0, 64.0), r
        assert r["mfu"] == pytest.approx(flops * 64 / 1000.0, rel=1e-12)
    assert [r["step"] for r in log if r["type"] == "val"] == [0, 2, 4, 6, 7]
    # the record of step s carries the lr its update used, lr_at(s - 1): warm-up 2 steps to 3e-3, cosine to 1e-4 at 7
    cosine = lambda done: 1e-4 + 0.5 * (1 + math.cos(math.pi * done / 5)) * 2.9e-3
    assert [r["lr"] for r in tr] == pytest.approx([1.5e-3, 3e-3, cosine(3), cosine(4)], rel=1e-12)


def test_validation_loss_is_the_seeded_initial_model_on_the_val_shard(shards, tmp_path):
    """max_steps=0: the one val record is the model as torch.manual_seed(seed) builds it, on the first
    val_tokens // block_size windows of the val shard (not a train shard)."""
    log = run_train(shards, tmp_path / "v", "--max_steps=0", "--seed=5")
    assert [(r["type"], r["step"]) for r in log if r["type"] != "config"] == [("val", 0), ("gates", 0)]
    torch.manual_seed(5)
    m = GPT(GPTConfig(**log[0]["model_config"])).eval()
    val = prepare_data.read_shard(os.path.join(shards, "local_val_000000.bin"))
    rows = torch.from_numpy(np.stack([val[16 * w:16 * w + 17] for w in range(128 // 16)]).astype(np.int64))
    with torch.no_grad():
        want = m(rows[:, :-1], rows[:, 1:])[1].item()
    assert log[-2]["loss"] == pytest.approx(want, rel=1e-5) and log[-2]["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_resume_changes_lists_the_new_settings_and_refuses_another_world_seed_data_or_model():
    cfg, mcfg = train_cfg(), GPTConfig(**TINY)
    ckpt = dict(config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg), world_size=1)
    assert train.resume_changes(ckpt, dataclasses.replace(cfg, resume=True), mcfg, 1) == {}
    assert train.resume_changes(ckpt, dataclasses.replace(cfg, resume=True, batch_size=4, lr=2e-3), mcfg, 1) == {
        "batch_size": [16, 4], "lr": [1e-3, 2e-3]}
    for new_cfg, new_mcfg, world, key in [(cfg, mcfg, 2, "world_size"), (dataclasses.replace(cfg, seed=1), mcfg, 1, "seed"),
                                          (dataclasses.replace(cfg, data_dir="x"), mcfg, 1, "data_dir"),
                                          (cfg, dataclasses.replace(mcfg, d_v=2), 1, "d_v")]:
        with pytest.raises(ConfigError, match=f"the checkpoint's {key} was"):
            train.resume_changes(ckpt, new_cfg, new_mcfg, world)


def test_checkpoint_write_that_dies_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_atomic({"step": 1}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        train.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_training_checkpoint_that_dies_mid_write_leaves_the_previous_one(shards, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_second_save(obj, f):
        calls.append(f)
        real_save(obj, f)
        if len(calls) == 2:
            with open(f, "r+b") as fh:
                fh.truncate(10)
            raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_second_save)
    with pytest.raises(OSError, match="disk full"):
        run_train(shards, tmp_path / "c", "--max_steps=3", "--ckpt_interval=1", "--eval_interval=100")
    monkeypatch.undo()
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)["step"] == 1


# ---------------------------------------------------------------------------- train.py: failures a user can hit

def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def poisoned(model, raw, *args):
        calls.append(1)
        if len(calls) == 5:  # step 5's weights go non-finite
            with torch.no_grad():
                raw.wte.weight[0, 0] = float("nan")
        return real_step(model, raw, *args)

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="not finite at step 5"):
        run_train(shards, tmp_path / "nan", "--max_steps=8", "--ckpt_interval=2", "--log_interval=3")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    log = [json.loads(line) for line in open(tmp_path / "nan" / "log.jsonl")]
    assert log[-1] == {"type": "diverged", "step": 5}


@pytest.mark.parametrize("ckpt_interval,log_interval,last_train,ckpt_step", [
    (2, 7, 1, 4),      # found by the check before the step-6 checkpoint, which is not written
    (100, 3, 6, None),  # found at the step-6 log line, not only at the final checkpoint
])
def test_an_infinite_gradient_norm_alone_stops_training(shards, tmp_path, monkeypatch, ckpt_interval, log_interval,
                                                        last_train, ckpt_step):
    real_step, calls = train.train_step, []

    def inf_norm_at_step_5(*args):
        calls.append(1)
        loss, norm = real_step(*args)
        return loss, norm + float("inf") if len(calls) == 5 else norm

    monkeypatch.setattr(train, "train_step", inf_norm_at_step_5)
    with pytest.raises(FloatingPointError, match="not finite at step 5"):
        run_train(shards, tmp_path / "inf", "--max_steps=8", f"--ckpt_interval={ckpt_interval}",
                  f"--log_interval={log_interval}", "--eval_interval=100")
    log = [json.loads(line) for line in open(tmp_path / "inf" / "log.jsonl")]
    assert log[-1] == {"type": "diverged", "step": 5} and [r["step"] for r in log if r["type"] == "train"][-1] == last_train
    ckpt = tmp_path / "inf" / "ckpt.pt"
    assert (torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else None) == ckpt_step


def test_resume_after_a_crash_continues_the_log_without_duplicates(shards, tmp_path, monkeypatch):
    args = ("--max_steps=7", "--decay_steps=7", "--ckpt_interval=3", "--eval_interval=2")
    straight = run_train(shards, tmp_path / "a", *args)
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: real_lr(step, cfg) if step < 5 else 1 / 0)  # dies in step 6
    with pytest.raises(ZeroDivisionError):
        run_train(shards, tmp_path / "b", *args)
    monkeypatch.undo()
    crashed = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert max(r["step"] for r in crashed if "step" in r) == 5  # records after the step-3 checkpoint exist
    resumed = run_train(shards, tmp_path / "b", *args, "--resume")
    key = lambda log: [(r["type"], r["step"], r["loss"]) for r in log if r["type"] in ("train", "val")]
    assert key(resumed) == key(straight)
    assert [r["type"] for r in resumed].count("config") == 2 and resumed[-1]["type"] == "gates"


def test_resume_allows_and_records_a_new_batch_size_and_refuses_other_data(shards, tmp_path):
    run_train(shards, tmp_path / "r", "--max_steps=2")
    log = run_train(shards, tmp_path / "r", "--max_steps=3", "--batch_size=4", "--resume")
    config = [r for r in log if r["type"] == "config"][-1]
    assert config["resumed_from"] == 2 and config["changed"]["batch_size"] == [2, 4]
    for flag, key in ((f"--data_dir={tmp_path / 'r'}", "data_dir"), ("--seed=5", "seed")):
        with pytest.raises(ConfigError, match=f"checkpoint's {key} was"):
            train.main([*TRAIN_TINY, f"--data_dir={shards}", f"--out_dir={tmp_path / 'r'}", "--max_steps=4",
                        "--resume", flag])
    torch.save({"model": {}}, tmp_path / "r" / "ckpt.pt")
    with pytest.raises(ConfigError, match="no optimizer, step, config, model_config"):
        run_train(shards, tmp_path / "r", "--max_steps=4", "--resume")
    with pytest.raises(ConfigError, match="it has no optimizer, .*model_config"):
        train.main(["--mode=sample", f"--out_dir={tmp_path / 'r'}", "--device=cpu"])


@pytest.mark.parametrize("flag,message", [
    ("--lr=-1", "--lr=-1.0: must be > 0"), ("--grad_clip=-1", "--grad_clip=-1.0: must be > 0"),
    ("--weight_decay=-0.1", "--weight_decay=-0.1: must be >= 0"), ("--seed=-1", "--seed=-1: must be >= 0"),
    ("--min_lr=0.1", "--min_lr=0.1: must lie in"), ("--beta2=1", "--beta2=1.0: must lie in"),
    ("--val_tokens=8", "--val_tokens=8: must be >= block_size=16"), ("--embed_conv=no", "--embed_conv='no': expected a bool"),
    ("--n_layer=2.5", "--n_layer='2.5': expected a int"), ("--resume=maybe", "--resume='maybe': expected a bool"),
    ("--total_batch=5", "--total_batch=5 must be a multiple of batch_size x processes = 2"),
])
def test_bad_settings_are_refused_naming_the_key(shards, tmp_path, flag, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_train(shards, tmp_path / "x", "--max_steps=1", flag)


def test_data_dir_unfinished_or_with_a_val_shard_shorter_than_one_window(shards, tmp_path):
    """A val shard of block_size + 1 = 17 tokens and --val_tokens=block_size is the smallest accepted."""
    data = tmp_path / "data"
    data.mkdir()
    for f in os.listdir(shards):
        if "_train_" in f:
            (data / f).write_bytes(open(os.path.join(shards, f), "rb").read())
    for n in (16, 17):
        prepare_data.write_shard(str(data / "local_val_000000.bin"), np.arange(n, dtype=np.uint16))
        if n == 16:
            with pytest.raises(prepare_data.DataError, match="the val shard holds 16 tokens, fewer than block_size \\+ 1 = 17"):
                run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16")
    log = run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16", "--seed=2")
    torch.manual_seed(2)
    m = GPT(GPTConfig(**log[0]["model_config"]))
    with torch.no_grad():
        want = m(torch.arange(16)[None], torch.arange(1, 17)[None])[1].item()
    assert [r["type"] for r in log] == ["config", "val", "gates"] and log[1]["loss"] == pytest.approx(want, rel=1e-5)
    (data / "run.json").write_text("{}")  # prepare_data.py still running, or died
    with pytest.raises(prepare_data.DataError, match="prepare_data.py did not finish there; rerun it"):
        run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16")


GOOD_SETTINGS = dict(batch_size=1, total_batch=1, val_tokens=1, eval_interval=1, log_interval=1, ckpt_interval=1, seed=0,
                     max_steps=0, decay_steps=0, warmup_steps=0, sample_tokens=0, weight_decay=0.0, peak_tflops=0.0,
                     beta1=0.0, beta2=0.999, lr=1e-9, grad_clip=1e-9, min_lr=1e-9, mode="sample", device="auto")


@pytest.mark.parametrize("key,bad", [
    *((k, 0) for k in ("batch_size", "total_batch", "val_tokens", "eval_interval", "log_interval", "ckpt_interval")),
    *((k, -1) for k in ("seed", "max_steps", "decay_steps", "warmup_steps", "sample_tokens")),
    ("weight_decay", -1e-9), ("peak_tflops", -1.0), ("beta1", 1.0), ("beta2", 1.0), ("beta1", -0.1), ("lr", 0.0),
    ("grad_clip", 0.0), ("min_lr", -1e-9), ("min_lr", 2e-9), ("mode", "bench"), ("device", "mps")])
def test_train_config_refuses_just_outside_each_bound_and_takes_the_bound(key, bad):
    train.TrainConfig(**GOOD_SETTINGS)
    with pytest.raises(ConfigError, match=f"^--{key}={re.escape(repr(bad))}: "):
        train.TrainConfig(**{**GOOD_SETTINGS, key: bad})


def test_parse_args_bools_preset_first_and_the_argument_form():
    for text, value in (("true", True), ("True", True), ("1", True), ("false", False), ("FALSE", False), ("0", False)):
        cfg, _ = train.parse_args([f"--compile={text}", f"--resume={text}"])
        assert cfg.compile is value and cfg.resume is value, text
    assert train.parse_args(["--resume"])[0].resume is True and train.parse_args([])[0].resume is False
    cfg, mcfg = train.parse_args(["--max_steps=3", "--preset=smoke", "--n_layer=3"])  # the keys given win over the preset
    assert (cfg.max_steps, mcfg.n_layer, cfg.lr, cfg.batch_size, mcfg.d_v, cfg.out_dir) == (3, 3, 3e-3, 16, 4, "out-smoke")
    cfg, mcfg = train.parse_args(["--lr=2e-3"])
    assert (cfg.max_steps, mcfg.n_layer, cfg.lr, cfg.batch_size, mcfg.d_v) == (100_000, 12, 2e-3, 16, 1)
    for arg in ("lr=0.1", "--lr", "-lr=0.1"):
        with pytest.raises(ConfigError, match=f"^argument {re.escape(repr(arg))} is not of the form --key=value$"):
            train.parse_args([arg])


def test_124m_preset_runs_the_papers_480_sequences_per_step_on_1_to_16_gpus():
    """Table 6's 480 x 1024 tokens per step, split into whole micro-batches on 1, 2, 4, 8 or 16 GPUs
    (train.py refuses a total_batch that is not a multiple of batch_size x processes)."""
    cfg, _ = train.parse_args(["--preset=124m"])
    assert cfg.total_batch == 480
    for world in (1, 2, 4, 8, 16):
        assert cfg.total_batch % (cfg.batch_size * world) == 0, world


def test_device_cpu_stays_on_the_cpu_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank, world, dev, ctx = train.setup(train_cfg(device="cpu"))
    assert (rank, world, dev) == (0, 1, torch.device("cpu")) and isinstance(ctx, nullcontext)


def test_cuda_asked_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device='cuda': this torch finds no CUDA device"):
        train.setup(train_cfg(device="cuda"))


def test_sampling_never_emits_padding_ids(capsys):
    """A model whose padding rows dominate the logits: unrestricted generation picks padding ids, which
    tiktoken cannot decode; train.sample restricts to the 50257 real ids and decodes."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, head_dim=8, n_embd=16, block_size=16, residual="additive"))
    with torch.no_grad():
        m.wte.weight[50257:] = 50.0 * torch.randn(50304 - 50257, 16)
    idx = torch.full((1, 1), 50256)
    assert m.generate(idx, 4, top_k=5).max() >= 50257  # the restriction below is not vacuous
    text = train.sample(m, train_cfg(sample_tokens=8, prompt="Hi"), torch.device("cpu"), nullcontext())
    assert isinstance(text, str) and text.startswith("Hi")
    torch.rand(7)  # the sample is seeded by --seed: the global generator's state does not matter
    assert train.sample(m, train_cfg(sample_tokens=8, prompt="Hi"), torch.device("cpu"), nullcontext()) == text


def test_sample_asks_for_sample_tokens_after_eot_and_the_prompt_and_decodes_them():
    enc, calls = tiktoken.get_encoding("gpt2"), []

    class Echo:  # generate appends " x" (id 2124) max_new_tokens times
        def generate(self, idx, max_new_tokens, **kw):
            calls.append((idx.tolist(), max_new_tokens, kw.get("n_vocab")))
            return torch.cat([idx, torch.full((1, max_new_tokens), 2124)], 1)

    assert enc.decode([2124]) == " x"
    text = train.sample(Echo(), train_cfg(sample_tokens=3, prompt="Deep delta"), torch.device("cpu"), nullcontext())
    assert text == "Deep delta x x x"
    assert calls == [([[50256] + enc.encode_ordinary("Deep delta")], 3, 50257)]


def test_sample_mode_continues_the_prompt_with_the_checkpoints_weights(shards, tmp_path, capsys):
    """--mode=sample from the final checkpoint gives the sample that ended training (same seed and prompt)."""
    run_train(shards, tmp_path / "s", "--max_steps=2", "--sample_tokens=6", "--prompt=The gate")
    trained = capsys.readouterr().out.split("sample: ", 1)[1][:-1]
    train.main(["--mode=sample", f"--out_dir={tmp_path / 's'}", "--sample_tokens=6", "--prompt=The gate", "--device=cpu"])
    assert capsys.readouterr().out[:-1] == trained and trained.startswith("The gate")
    assert len(tiktoken.get_encoding("gpt2").encode_ordinary(trained)) >= 3


def run_script(*argv, code=None):
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, os.path.join(HERE, "train.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=120)


def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path):
    r = run_script("--lr=-1")
    assert r.returncode == 1 and r.stderr == "train.py: error: --lr=-1.0: must be > 0\n"
    # a ValueError from inside a (modified) model is not the user's setting: its traceback must show
    code = ("import runpy, sys, ddl\n"
            "def broken(self, idx, targets=None): raise ValueError('inside the model')\n"
            "ddl.GPT.forward = broken\nsys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')")
    r = run_script("--preset=smoke", "--device=cpu", "--max_steps=1", f"--out_dir={tmp_path}", code=code)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: inside the model" in r.stderr


BENCH_KINDS = (train.TrainConfig, GPTConfig, bench.BenchConfig)


def test_bench_table_ratios_are_against_additive_wherever_it_stands(capsys):
    rows = [dict(variant="cc", params=1000, train_ms=20.0, train_tps=500.0, infer_tps=3000.0, mem_gib=3.0, mfu=0.25),
            dict(variant="additive", params=900, train_ms=10.0, train_tps=1000.0, infer_tps=2000.0, mem_gib=2.0, mfu=0.5)]
    bench.print_table(rows, torch.device("cpu"), 1.5, 4, 8, False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("| micro-batch 4 x 8 | compile False | ratios against additive")
    assert lines[3].split() == ["cc", "1,000", "20.0", "500", "0.500", "3,000", "1.500", "3.00", "1.500", "25.0%"]
    assert lines[4].split() == ["additive", "900", "10.0", "1,000", "1.000", "2,000", "1.000", "2.00", "1.000", "50.0%"]


def test_time_ms_is_the_median_after_three_warm_up_calls(monkeypatch):
    clock, durations = [0.0], iter([50, 50, 50, 2, 9, 1, 40])  # ms; the timed three: 2, 9, 1

    def fn():
        clock[0] += next(durations) / 1000

    monkeypatch.setattr(bench, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    assert bench.time_ms(fn, 3, torch.device("cpu")) == pytest.approx(2.0)


def test_bench_rows_throughput_and_mfu_from_the_timed_ms(monkeypatch, capsys):
    """The CPU peak: 2 x 512^3 flops in 10 ms; a training step of 2 x 16 tokens in 10 ms: 3200 tok/s and
    mfu (6 params + 12 L T d) x 3200 / peak; an inference forward in 4 ms: 8000 tok/s."""
    times = iter([10.0] + [10.0, 4.0] * 2)  # the matmul peak, then per variant a training step and an inference forward
    monkeypatch.setattr(bench, "time_ms", lambda fn, steps, dev: next(times))
    monkeypatch.setattr(bench, "check_fast_path", lambda dev, use_compile, fused: None)
    rows = bench.bench(*train.parse_args(
        ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
         "--bench_batch=2", "--bench_variants=cc,additive", "--device=cpu"], BENCH_KINDS))
    peak = 2 * 512 ** 3 / 10.0 / 1e9  # TFLOP/s
    assert [r["variant"] for r in rows] == ["cc", "additive"] and rows[0]["params"] > rows[1]["params"]
    for r in rows:
        assert (r["train_ms"], r["mem_gib"]) == (10.0, None)
        assert r["train_tps"] == pytest.approx(3200.0) and r["infer_tps"] == pytest.approx(8000.0)
        assert r["mfu"] == pytest.approx((6 * r["params"] + 12 * 1 * 16 * 16) * 3200.0 / 1e12 / peak)
    lines = capsys.readouterr().out.splitlines()  # each variant's line comes as soon as it is measured
    assert lines[:2] == ["cc: 10.0 ms/step, 4.0 ms/forward", "additive: 10.0 ms/step, 4.0 ms/forward"]


def test_bench_cpu_memory_estimate_at_its_boundary(monkeypatch):
    """smoke at micro-batch 2 (n = 128 tokens, L = 2, d = 64, V = 50304) with cc's d_v = 4: 16 x 12 L d^2
    (1,572,864) + 16 V d (51,511,296) + 8 n V (51,511,296) + 160 n L d d_v (10,485,760) = 115,081,216 bytes."""
    class Fits(Exception):
        pass

    def fits(dev):
        raise Fits

    monkeypatch.setattr(bench, "matmul_peak_tflops", fits)
    cfg, mcfg, bcfg = train.parse_args(["--preset=smoke", "--device=cpu", "--bench_variants=additive,cc",
                                        "--bench_batch=2"], BENCH_KINDS)
    for free, outcome in ((115_081_216, Fits), (115_081_215, ConfigError)):
        monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": free, "SC_PAGE_SIZE": 1}[name])
        with pytest.raises(outcome):
            bench.bench(cfg, mcfg, bcfg)


def test_bench_fast_path_check_fails_beyond_1e_2_in_bf16_and_1e_5_in_fp32(monkeypatch, capsys):
    """The check against a stand-in rule whose bf16 / fp32 results are off by a known relative amount."""
    def stand_in(off_bf16, off_fp32):
        def rule(X, k, v, beta):
            scale = {torch.float64: 1.0, torch.bfloat16: 1 + off_bf16, torch.float32: 1 + off_fp32}[X.dtype]
            return (scale * (X + k[..., None] + v[:, :, None, :] + beta[..., None, None])).to(X.dtype)
        return rule

    for off_bf16, off_fp32, failing in ((2e-2, 0.0, "torch.bfloat16"), (0.0, 5e-5, "torch.float32")):
        monkeypatch.setattr(bench, "delta_update", stand_in(off_bf16, off_fp32))
        with pytest.raises(RuntimeError, match=f"the {failing} rewrite disagrees with the reference"):
            bench.check_fast_path(torch.device("cpu"), False, False)
    assert "torch.bfloat16: max relative error" in capsys.readouterr().out  # passed with its rounding alone


def test_bench_config_bounds():
    bench.BenchConfig(bench_batch=1, bench_steps=1, bench_variants="write")
    for kw, message in ((dict(bench_batch=0), "--bench_batch=0: must be >= 1"), (dict(bench_steps=0), "--bench_steps=0: must be >= 1"),
                        (dict(bench_variants="cc,ddl"), "--bench_variants: unknown variant 'ddl'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench.BenchConfig(**kw)


def test_bench_refuses_a_cpu_size_that_cannot_fit_and_prints_no_nan(monkeypatch, capsys):
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 2**20, "SC_PAGE_SIZE": 4096}[name])  # 4 GiB
    cfg, mcfg, bcfg = train.parse_args(["--preset=124m", "--device=cpu"], (train.TrainConfig, GPTConfig, bench.BenchConfig))
    with pytest.raises(ConfigError, match="needs about .* GiB and 4 GiB are free: use --preset=smoke"):
        bench.bench(cfg, mcfg, bcfg)


def test_memorization_probe_ablations_run_and_unit_k_is_the_normalised_update():
    import importlib.util
    spec = importlib.util.spec_from_file_location("memorize", os.path.join(HERE, "docs", "memorize.py"))
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    branch = tiny_model(residual="additive").blocks[1].mlp
    with torch.no_grad():
        branch.norm.copy_(torch.rand(16) + 0.5)
    X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    c = X / torch.sqrt((X * X).mean(-1, keepdim=True) + 1e-5) * branch.norm
    out = branch.f(c)
    want = X + out / torch.sqrt((out * out).sum(-1, keepdim=True) + 1e-10)
    assert torch.allclose(mem.additive_with_unit_k(branch, X), want, atol=1e-5)
    cfg, mcfg = train.parse_args(["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=8",
                                  "--vocab_size=97", "--device=cpu"])
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    for name in ("additive-unit-k", "delta-frozen-beta", "delta-linear-v"):
        losses = mem.probe(cfg, mcfg, name, 1e-2, 4, torch.device("cpu"), nullcontext(), x, y)
        assert len(losses) == 4 and losses[-1] < losses[0]

