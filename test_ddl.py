"""The paper's claims and ddl.py's components, each against an oracle written out here. CPU, offline.

Reading order: the oracles (each formula with plain torch ops), then one group per claim of the paper
(Prop. 2.1, Eq. 2.2-2.4, §3.1, §3.2 and App. A.2), then the model (gradients, causality, the whole
forward, init, the gate audit of §5, check_spectrum, config errors) and cached generation. The pipeline
has its own files: test_data.py, test_train.py, test_bench.py, test_fused.py, test_docs.py."""
import math

import pytest
import torch

import ddl
from ddl import GPT, ConfigError, GPTConfig, delta_update, unit_direction

TINY = dict(vocab_size=97, n_layer=2, n_head=2, head_dim=8, n_embd=16, block_size=32)
# The "any variant" battery runs on each of these: every parameter gets a gradient, the uniform start,
# causality, the explicit model, cached forward and generation equal to full recompute, check_spectrum,
# weight-decay roles (here); one graph under torch.compile (test_train.py); fused.py equal or refusing by
# name (test_fused.py). A new variant (a new GPTConfig setting) is one entry here.
VARIANTS = {
    "additive": dict(residual="additive"),
    "delta1": dict(residual="delta", d_v=1),
    "cc_ec": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=False),
    "tc_ec": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=False),
    "write1": dict(residual="write", d_v=1),
    "write4": dict(residual="write", d_v=4, compressor="cc", embed_conv=True),
    "cc_ec_no_reflection": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True, beta_bound=1.0),
}
F64 = torch.float64


def check_tensor(name, got, want, atol, rtol=0.0):
    """got == want within atol + rtol |want| everywhere; a failure names the quantity and its largest
    error (as llm.c's check_tensor), not a dump of both tensors."""
    __tracebackhide__ = True  # pytest shows the caller's line
    if tuple(got.shape) != tuple(want.shape):
        pytest.fail(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = (got.double() - want.double()).abs()
    bad = err > atol + rtol * want.double().abs()
    if bad.any():
        pytest.fail(f"{name}: max error {err.max().item():.3g} (tolerance {atol:g} + {rtol:g} |want|), "
                    f"{bad.sum().item()} of {err.numel()} entries off")


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def random_unit(d, gen):
    k = torch.randn(d, dtype=F64, generator=gen)
    return k / k.norm()


# ---------------------------------------------------------------------------- independent oracles
# Every formula below is written out from the paper / the docstrings with plain torch ops; the tests
# compare ddl.py's modules against them on a model whose every parameter is random (scrambled()).

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


def o_rope(x, offset=0):
    """x (B, T, H, D): the pair (x_i, x_{i+D/2}) at position t turns by t * 10000^(-2i/D)."""
    T, D = x.shape[1], x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        angle = torch.arange(offset, offset + T, dtype=F64)[:, None] * 10000.0 ** (-2 * i / D)
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i], out[..., i + D // 2] = (
            a * angle.cos() - b * angle.sin(),
            a * angle.sin() + b * angle.cos(),
        )
    return out


def o_attn(a, x):
    B, T, C = x.shape
    W = a.c_attn.weight
    q, k, v = ((x @ W[i * C:(i + 1) * C].T).view(B, T, a.n_head, a.head_dim) for i in range(3))
    q, k = o_rms(o_rope(q), a.q_norm_gain), o_rms(o_rope(k), a.key_norm_gain)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(a.head_dim)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = scores.masked_fill(future, -math.inf).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, C) @ a.c_proj.weight.T


def o_mlp(m, x):
    h = math.floor(8 * x.shape[-1] / 3)
    gate, up = x @ m.c_fc.weight[:h].T, x @ m.c_fc.weight[h:].T
    return (gate * torch.sigmoid(gate) * up) @ m.c_proj.weight.T


def o_cc(comp, X):
    """CC: x[i] = sum_j mix_ij X[i, j]."""
    return torch.einsum("btij,ij->bti", X, comp.mix)


def o_tc(comp, X):
    """TC: x[t, i] = sum_s sum_j channel_mix_j taps_ijs X[t - s, i, j]."""
    out = torch.zeros(X.shape[:-1], dtype=X.dtype)
    for t in range(X.shape[1]):
        for s in range(min(t + 1, comp.taps.shape[-1])):
            out[:, t] += (comp.taps[:, :, s] * comp.channel_mix * X[:, t - s]).sum(-1)
    return out


O_COMPRESSORS = {"cc": o_cc, "tc": o_tc}  # one oracle per name: a name without one fails here, by name


def o_compress(kind, comp, X):
    return O_COMPRESSORS[kind](comp, X)


def o_embed_conv(ec, x):
    """X[t, i, j] = sum_s w_ijs x[t - s, i]."""
    out = torch.zeros(*x.shape, ec.weight.shape[1], dtype=x.dtype)
    for t in range(x.shape[1]):
        for s in range(min(t + 1, ec.weight.shape[-1])):
            out[:, t] += ec.weight[:, :, s] * x[:, t - s, :, None]
    return out


def o_branch(br, X):
    """One residual branch from its formulas; returns the new state and (beta, |k~|, |k^T X - v|, k)."""
    cfg = br.cfg
    c = o_rms(X if cfg.d_v == 1 else o_compress(cfg.compressor, br.compressor, X), br.norm_gain)
    f = o_attn(br.sublayer, c) if br.name.endswith("attn") else o_mlp(br.sublayer, c)
    if cfg.residual == "additive":
        return X + f, None
    k = f / torch.sqrt((f * f).sum(-1, keepdim=True) + cfg.k_eps ** 2)
    z = c @ br.W_v.T + br.b_v
    v = z if cfg.v_scale == 0 else cfg.v_scale * torch.sigmoid(z)
    beta = cfg.beta_bound * torch.sigmoid(c @ br.w_beta[0] + br.b_beta[0])  # one gate per token, (B, T)
    S = X.reshape(*X.shape[:3], cfg.d_v)                                 # (B, T, d, d_v)
    kX = torch.einsum("bti,btij->btj", k, S)                             # k^T X, (B, T, d_v)
    bk = beta[..., None, None] * k[..., :, None]
    if cfg.residual == "delta":
        new = S + bk * (v - kX)[..., None, :]                            # X + beta k (v^T - k^T X)
    else:
        new = S + bk * v[..., None, :]                                   # X + beta k v^T
    return new.reshape(X.shape), (beta, f.norm(dim=-1), (kX - v).abs(), k)


def o_logits(m, idx):
    cfg = m.config
    x = m.wte.weight[idx]
    if cfg.d_v > 1:
        x = o_embed_conv(m.embed_conv, x) if cfg.embed_conv else x[..., None].repeat(1, 1, 1, cfg.d_v)
    for block in m.blocks:
        x = o_branch(block.mlp, o_branch(block.attn, x)[0])[0]
    if cfg.d_v > 1:
        x = o_compress(cfg.compressor, m.final_compressor, x)
    return o_rms(x, m.final_norm_gain) @ m.wte.weight.T


def o_loss(logits, targets):
    """Mean over the positions with targets != -1 of -log softmax(logits)[target]."""
    logp = logits - torch.log(torch.exp(logits).sum(-1, keepdim=True))
    keep = targets != -1
    return -logp[keep].gather(-1, targets[keep][:, None]).mean()


# ======================================================= Prop. 2.1: the spectrum of A = I - beta k k^T

@pytest.mark.parametrize("d", [2, 7, 64])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 1.5, 2.0])
def test_proposition_2_1_spectrum(d, beta):
    gen = torch.Generator().manual_seed(d)
    k, b = random_unit(d, gen), torch.tensor(beta, dtype=F64)
    A = torch.eye(d, dtype=F64) - beta * torch.outer(k, k)  # Eq. 2.2's shortcut (the model never builds it)
    want = torch.tensor(sorted([1 - beta] + [1.0] * (d - 1)), dtype=F64)
    check_tensor("eigenvalues of A", torch.linalg.eigvalsh(A), want, atol=1e-12)
    check_tensor("A k", A @ k, (1 - beta) * k, atol=1e-12)
    u = torch.randn(d, dtype=F64, generator=gen)
    u = u - (u @ k) * k  # u orthogonal to k
    check_tensor("A u, u orthogonal to k", A @ u, u, atol=1e-12)
    assert math.isclose(torch.linalg.det(A).item(), 1 - beta, abs_tol=1e-12)
    I = torch.eye(d, dtype=F64)
    if beta == 1.0:  # projection onto k's orthogonal complement
        check_tensor("A A (projection)", A @ A, A, atol=1e-12)
        assert torch.linalg.matrix_rank(A).item() == d - 1
    if beta == 2.0:  # Householder reflection
        check_tensor("A^T A (reflection)", A.T @ A, I, atol=1e-12)
        check_tensor("A A (reflection)", A @ A, I, atol=1e-12)
    # what the model runs, delta_update, is A X + beta k v^T: each of the d_v columns of X sees A
    X = torch.randn(d, 3, dtype=F64, generator=gen)
    v = torch.randn(3, dtype=F64, generator=gen)
    kron = torch.kron(torch.eye(3, dtype=F64), A)
    vec = lambda M: M.T.reshape(-1)
    check_tensor(
        "vec(A X)", vec(delta_update(X, k, torch.zeros(3, dtype=F64), b[None])), kron @ vec(X), atol=1e-12
    )
    check_tensor("delta_update", delta_update(X, k, v, b[None]), A @ X + beta * torch.outer(k, v), atol=1e-12)


# ======================================================= Eq. 2.2-2.4: the update and its readout error

def test_eq_2_4_readout_error_contracts_by_one_minus_beta():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 32, 4, dtype=F64, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(5, 32, dtype=F64, generator=gen), dim=-1)
    v = torch.randn(5, 4, dtype=F64, generator=gen)
    beta = torch.rand(5, 1, dtype=F64, generator=gen) * 2
    readout = lambda M: torch.einsum("nd,ndv->nv", k, M)
    e_pre, e_post = readout(X) - v, readout(delta_update(X, k, v, beta)) - v
    check_tensor("e_post", e_post, (1 - beta) * e_pre, atol=1e-12)
    assert e_pre.abs().min() > 1e-3  # the check above is not vacuous
    check_tensor(
        "k^T X at beta = 1", readout(delta_update(X, k, v, torch.ones(5, 1, dtype=F64))), v, atol=1e-12
    )
    assert torch.equal(delta_update(X, k, v, torch.zeros(5, 1, dtype=F64)), X)


def test_eq_2_4_for_any_k_the_error_contracts_by_one_minus_beta_k_squared():
    """k^T X_{l+1} - v^T = (1 - beta |k|^2)(k^T X_l - v^T) for any k, unit or not (|k| < 1 where
    |k~| is comparable to eps_k, §3.1)."""
    gen = torch.Generator().manual_seed(21)
    X = torch.randn(6, 16, 3, dtype=F64, generator=gen)
    k = torch.randn(6, 16, dtype=F64, generator=gen) * torch.rand(6, 1, dtype=F64, generator=gen)
    v = torch.randn(6, 3, dtype=F64, generator=gen)
    beta = torch.rand(6, 1, dtype=F64, generator=gen) * 2
    e_pre, e_post = ddl.readout_error(X, k, v), ddl.readout_error(delta_update(X, k, v, beta), k, v)
    check_tensor("e_post", e_post, (1 - beta * (k * k).sum(-1, keepdim=True)) * e_pre, atol=1e-12)


def test_eq_2_2_delta_update_gradcheck():
    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(2, 6, 3, dtype=F64, generator=gen), torch.randn(2, 6, dtype=F64, generator=gen),
            torch.randn(2, 3, dtype=F64, generator=gen), torch.rand(2, 1, dtype=F64, generator=gen) * 2]
    assert torch.autograd.gradcheck(delta_update, [a.requires_grad_() for a in args])


def test_eq_2_2_model_d_v_1_is_the_scalar_rule():
    """With d_v = 1 the branch computes x + beta k (v - k.x) with a scalar v, no compressor."""
    m = tiny_model(residual="delta", d_v=1)
    br = m.blocks[0].attn
    assert br.compressor is None and m.embed_conv is None and m.final_compressor is None
    x = torch.randn(2, 5, 16)
    c = torch.nn.functional.rms_norm(x, (16,), br.norm_gain, eps=1e-5)
    k = unit_direction(br.sublayer(c), 1e-5)
    v, beta = br.value(c)[..., 0], br.gate(c)[..., 0]
    check_tensor("d_v = 1 branch", br(x), x + (beta * (v - (k * x).sum(-1)))[..., None] * k, atol=1e-6)


def test_eq_2_2_write_control_has_no_erase_term_and_readout_error_sign():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3, 7, 2, dtype=F64, generator=gen)
    k = torch.randn(3, 7, dtype=F64, generator=gen)
    v = torch.randn(3, 2, dtype=F64, generator=gen)
    beta = torch.rand(3, 1, dtype=F64, generator=gen) * 2
    want = X + beta[..., None] * k[:, :, None] * v[:, None, :]
    check_tensor("write_update", ddl.write_update(X, k, v, beta), want, atol=1e-12)
    check_tensor(
        "readout_error", ddl.readout_error(X, k, v), torch.einsum("ni,nij->nj", k, X) - v, atol=1e-12
    )


@pytest.mark.parametrize("beta_bound", [2.0, 1.0, 1.5])
def test_eq_2_2_value_and_gate_projections(beta_bound):
    """v = v_scale sigmoid(W_v c + b_v) (v_scale = 0: W_v c + b_v); beta = beta_bound sigmoid(w.c + b), one
    per token (the paper: beta_bound = 2; 1: no reflection)."""
    gen = torch.Generator().manual_seed(6)
    c = torch.randn(2, 5, 16, dtype=F64, generator=gen)
    for v_scale in (2.5, 0.0):
        br = scrambled(residual="delta", d_v=4, v_scale=v_scale, beta_bound=beta_bound).blocks[1].mlp
        z = c @ br.W_v.T + br.b_v
        check_tensor("v", br.value(c), 2.5 * torch.sigmoid(z) if v_scale else z, atol=1e-6)
        want = beta_bound / (1 + torch.exp(-(c @ br.w_beta[0] + br.b_beta[0])))
        check_tensor("beta", br.gate(c), want[..., None], atol=1e-6)


BRANCH_CASES = [
    ("additive", 1, "cc", 4.0),
    ("delta", 1, "cc", 2.5),
    ("write", 1, "cc", 0.0),
    ("delta", 4, "cc", 2.5),
    ("delta", 4, "tc", 0.0),
    ("write", 4, "cc", 2.5),
    ("write", 4, "tc", 4.0),
]


@pytest.mark.parametrize("residual,d_v,compressor,v_scale", BRANCH_CASES)
def test_eq_2_2_each_residual_kind_follows_its_own_formula(residual, d_v, compressor, v_scale):
    """additive: X + F(c); delta: X + beta k (v^T - k^T X); write: X + beta k v^T, with
    c = RMSNorm(compress(X)) * gain, k = F(c) / sqrt(|F(c)|^2 + eps^2), on random parameters."""
    m = scrambled(
        residual=residual, d_v=d_v, compressor=compressor, v_scale=v_scale, k_eps=0.5, conv_kernel=3
    )
    gen = torch.Generator().manual_seed(7)
    for br in (m.blocks[0].attn, m.blocks[1].mlp):
        X = torch.randn(2, 9, 16, d_v, dtype=F64, generator=gen)
        X = X[..., 0] if d_v == 1 else X
        check_tensor(f"{br.name}: new state", br(X), o_branch(br, X)[0], atol=1e-6, rtol=1e-5)


# ============================================================================ §3.1: the unit direction k

def test_section_3_1_unit_direction_is_the_eps_regularised_normalisation():
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-6, 1e-3, 1.0, 1e3):
        kt = torch.randn(4, 64, dtype=F64, generator=gen) * scale
        want = kt / torch.sqrt((kt * kt).sum(-1, keepdim=True) + 1e-5 ** 2)
        check_tensor(f"k at |k~| ~ {scale:g}", unit_direction(kt, 1e-5), want, atol=1e-14, rtol=1e-10)
    kt = torch.randn(4, 64, dtype=F64, generator=gen)
    check_tensor("|k| at eps 0", unit_direction(kt, 0.0).norm(dim=-1), torch.ones(4, dtype=F64), atol=1e-12)


# ============================================== §3.2 and App. A.2: the expanded state, compressors, EC

def test_section_3_2_token_compressor_equals_convolution_then_read():
    """DDL-TC sums over d_v before shifting tokens; that must equal the conv-then-read definition."""
    m = tiny_model(residual="delta", d_v=4, compressor="tc", conv_kernel=3)
    tc = m.blocks[0].attn.compressor.double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        tc.taps.copy_(torch.randn(tc.taps.shape, generator=gen))
        tc.channel_mix.copy_(torch.randn(4, generator=gen))
    X = torch.randn(2, 10, 16, 4, dtype=F64, generator=gen)
    want = torch.zeros(2, 10, 16, dtype=F64)
    for t in range(10):
        for s in range(3):
            if t - s >= 0:
                want[:, t] += (tc.taps[:, :, s] * X[:, t - s] * tc.channel_mix).sum(-1)
    check_tensor("TC read", tc(X), want, atol=1e-12)


def test_section_3_2_channel_compressor_mixes_the_d_v_channels_of_each_feature():
    cc = scrambled(residual="delta", d_v=4, compressor="cc").blocks[0].attn.compressor
    X = torch.randn(2, 5, 16, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    want = torch.stack([sum(cc.mix[i, j] * X[:, :, i, j] for j in range(4)) for i in range(16)], dim=-1)
    check_tensor("CC read", cc(X), want, atol=1e-12)


def test_app_a_2_embed_conv_is_a_causal_depthwise_token_convolution():
    ec = scrambled(residual="delta", d_v=4, conv_kernel=3).embed_conv
    x = torch.randn(2, 7, 16, dtype=F64, generator=torch.Generator().manual_seed(9))
    want = torch.zeros(2, 7, 16, 4, dtype=F64)
    for t in range(7):
        for s in range(3):
            if t - s >= 0:
                want[:, t] += ec.weight[:, :, s] * x[:, t - s, :, None]
    check_tensor("EC state", ec(x), want, atol=1e-12)


def test_app_a_2_expanded_state_uses_the_autocast_dtype():
    m = tiny_model(residual="delta", d_v=4)
    seen = []
    m.blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


# ================================================== the model: gradients, causality, the whole forward

@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_of_every_variant_receives_a_gradient(name):
    """A change that cuts a parameter off the loss (k taken from the sublayer's input, say, leaves
    attention and the MLP without gradient) fails here, naming the parameters."""
    m = scrambled(**VARIANTS[name]).float()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(20))
    m(idx[:, :-1], idx[:, 1:]).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: no gradient reaches {', '.join(dead)}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_starts_at_uniform_loss(name):
    m = tiny_model(**VARIANTS[name])
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    assert m(idx).shape == (2, 32, 97)
    assert abs(m(idx, idx).item() - math.log(97)) < 0.1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    m = tiny_model(**VARIANTS[name])
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 97, (1, 20), generator=gen)
    for t in (1, 7, 19):
        b = a.clone()
        b[:, t:] = torch.randint(0, 97, (1, 20 - t), generator=gen)
        la, lb = m(a), m(b)
        assert torch.equal(la[:, :t], lb[:, :t]), f"position < {t} sees a later token"
        assert not torch.allclose(la[:, t:], lb[:, t:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_loss_equal_the_explicit_model(name):
    """The whole forward (embedding, EC, blocks, final compressor, final RMSNorm, tied head) and the
    cross-entropy, against the oracles, on a model with random parameters."""
    m = scrambled(block_size=12, v_scale=2.5 if name.endswith("1") else 4.0, **VARIANTS[name])
    assert m.lm_head.weight is m.wte.weight
    gen = torch.Generator().manual_seed(13)
    idx, targets = torch.randint(0, 97, (2, 10), generator=gen), torch.randint(0, 97, (2, 10), generator=gen)
    want = o_logits(m, idx)
    check_tensor("logits", m(idx), want, atol=1e-5, rtol=1e-5)
    assert m(idx, targets).item() == pytest.approx(o_loss(want, targets).item(), rel=1e-6)


def test_rope_turns_each_pair_by_position_times_base_10000():
    cos, sin = ddl.rope_table(12, 8)
    angles = torch.tensor([[t * 10000.0 ** (-2 * i / 8) for i in range(4)] for t in range(12)], dtype=F64)
    check_tensor("cos", cos, angles.cos(), atol=1e-6)
    check_tensor("sin", sin, angles.sin(), atol=1e-6)
    x = torch.randn(2, 12, 3, 8, dtype=F64, generator=torch.Generator().manual_seed(10))
    check_tensor("RoPE", ddl.apply_rope(x, cos, sin), o_rope(x), atol=1e-5)


def test_attention_is_causal_softmax_of_rotated_qk_normed_heads():
    """q, k, v from c_attn; RoPE on q and k; RMSNorm with the q_norm_gain / key_norm_gain gains; causal
    softmax(q k^T / sqrt(D)) v; c_proj. The gains are random, so a dropped or swapped gain shows."""
    a = scrambled(block_size=12).blocks[1].attn.sublayer
    x = torch.randn(2, 12, 16, dtype=F64, generator=torch.Generator().manual_seed(11))
    check_tensor("attention", a(x), o_attn(a, x), atol=1e-6, rtol=1e-5)


def test_swiglu_is_silu_of_gate_times_up():
    m = scrambled().blocks[0].mlp.sublayer
    assert m.hidden == 42  # floor(8/3 * 16)
    x = torch.randn(2, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(12))
    check_tensor("SwiGLU", m(x), o_mlp(m, x), atol=1e-10)


@pytest.mark.parametrize("n_layer,n_head,n_embd,paper", [(12, 6, 768, 124e6), (24, 8, 1024, 353e6)])
def test_parameter_counts_match_the_paper(n_layer, n_head, n_embd, paper):
    """The tied embedding / LM head matrix is counted once."""
    with torch.device("meta"):
        for res in ("additive", "delta"):
            m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, residual=res))
            assert abs(m.num_params() - paper) / paper < 0.02


def test_forward_errors_and_ignored_targets():
    m = scrambled()
    with pytest.raises(ValueError, match="sequence length 0"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="block_size=32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    idx = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(14))
    for bad in (97, -2):
        with pytest.raises(ValueError, match=r"targets must lie in \[-1, 97\)"):
            m(idx, idx.clone().fill_(bad))
    targets = idx.clone()
    targets[0, :4] = -1
    targets[1, 2] = -1
    assert m(idx, targets).item() == pytest.approx(o_loss(o_logits(m, idx), targets).item(), rel=1e-6)


def test_section_3_2_every_compressor_name_builds_its_own_module_with_its_own_oracle():
    """Each name GPTConfig accepts is a key of ddl.COMPRESSORS and builds that class, before every sublayer
    and at the end, and has an oracle here; an unknown name is refused naming the allowed ones."""
    assert set(O_COMPRESSORS) == set(ddl.COMPRESSORS), "a compressor without its oracle (or the reverse)"
    for name, cls in ddl.COMPRESSORS.items():
        m = tiny_model(d_v=4, compressor=name)
        built = [m.final_compressor] + [getattr(b, s).compressor for b in m.blocks for s in ("attn", "mlp")]
        assert all(type(c) is cls for c in built), name
        X = torch.randn(2, 5, 16, 4, generator=torch.Generator().manual_seed(3))
        check_tensor(f"{name} read", m.final_compressor(X), O_COMPRESSORS[name](m.final_compressor, X),
                     atol=1e-6)
    with pytest.raises(ConfigError, match=r"^GPTConfig.compressor='xx' is invalid: allowed: cc, tc$"):
        GPTConfig(d_v=4, compressor="xx")


def test_check_spectrum_checks_each_rank_1_step_of_a_two_step_update(monkeypatch):
    """A modification with two rank-1 steps per sublayer (two directions) that calls rank1_step for each
    passes check_spectrum; checking the two steps as one against one step's identity fails, as it should."""
    def two_steps(self, X, k_in, v_in, beta_in):
        k, v, beta = unit_direction(k_in, self.cfg.k_eps), self.value(v_in), self.gate(beta_in)
        k2_in = k_in.roll(1, dims=-1)
        half = self.rank1_step(X, k_in, k, v, beta)
        return self.rank1_step(half, k2_in, unit_direction(k2_in, self.cfg.k_eps), v, beta)

    monkeypatch.setattr(ddl.ResidualBranch, "update", two_steps)
    m = tiny_model(d_v=4, check_spectrum=True)
    idx = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    m(idx)  # each step checked against its own premises: no alarm
    br, gen = m.blocks[0].attn, torch.Generator().manual_seed(5)
    X, k_in = torch.randn(2, 6, 16, 4, generator=gen), torch.randn(2, 6, 16, generator=gen)
    k, k2 = unit_direction(k_in, 1e-5), unit_direction(k_in.roll(1, dims=-1), 1e-5)
    v, beta = torch.rand(2, 6, 4, generator=gen), 1.5 * torch.ones(2, 6, 1)
    both = delta_update(delta_update(X, k, v, beta), k2, v, beta)
    with pytest.raises(AssertionError, match=r"e_post != \(1 - beta \|k\|\^2\) e_pre"):
        br.check_spectrum(k_in, k, v, beta, X, both)


# ============================================================================ init, weight decay, config

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
    assert std([b.sublayer.c_attn.weight for b in br[::2]]) == pytest.approx(0.5 / 16, rel=0.05)
    assert std([b.sublayer.c_fc.weight for b in br[1::2]]) == pytest.approx(0.5 / 16, rel=0.05)
    assert std([b.sublayer.c_proj.weight for b in br[::2]]) == pytest.approx(0.5 / 16 / 2, rel=0.05)
    assert std([b.sublayer.c_proj.weight for b in br[1::2]]) == pytest.approx(0.5 / 16 / 2, rel=0.05)
    assert std([b.W_v for b in br]) == pytest.approx(0.5 / 16, rel=0.05)
    c = torch.randn(3, 256)
    for b in br:
        assert torch.equal(b.b_v, torch.zeros(4)) and torch.equal(b.norm_gain, torch.ones(256))
        check_tensor("beta at init", b.gate(c), torch.full((3, 1), 0.7), atol=1e-6)
    for a in [b.sublayer for b in br[::2]]:
        assert torch.equal(a.q_norm_gain, torch.ones(128)) and torch.equal(a.key_norm_gain, torch.ones(128))
    assert torch.equal(m.final_norm_gain, torch.ones(256))
    ident = torch.zeros(256, 4, 4)
    ident[..., 0] = 1
    for tc in [b.compressor for b in br] + [m.final_compressor]:
        assert torch.equal(tc.taps, ident) and torch.equal(tc.channel_mix, torch.full((4,), 0.25))
    assert torch.equal(m.embed_conv.weight, ident)
    cc = tiny_model(residual="delta", d_v=4, compressor="cc")
    for comp in [cc.blocks[0].attn.compressor, cc.blocks[1].mlp.compressor, cc.final_compressor]:
        assert torch.equal(comp.mix, torch.full((16, 4), 0.25))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_of_every_variant_has_a_weight_decay_role_and_one_group(name):
    m = tiny_model(**VARIANTS[name])
    groups = m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu").param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in m.parameters())


@pytest.mark.parametrize("beta_init,beta_bound", [(0.5, 2.0), (1.0, 2.0), (1.7, 2.0), (0.3, 1.0), (0.9, 1.0)])
def test_special_initialisations_survive_the_global_init(beta_init, beta_bound):
    m = tiny_model(residual="delta", d_v=4, compressor="tc", beta_init=beta_init, beta_bound=beta_bound)
    m.record_gates()
    m(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)))
    for row in m.gate_stats():
        assert row["beta_min"] == pytest.approx(beta_init, abs=1e-5)
        assert row["beta_max"] == pytest.approx(beta_init, abs=1e-5)
        assert sum(row["beta_hist"]) == 32
    x = torch.randn(2, 9, 16)
    assert torch.equal(m.embed_conv(x), x.unsqueeze(-1).expand(-1, -1, -1, 4))
    X = torch.randn(2, 9, 16, 4)
    check_tensor("TC read at init", m.blocks[1].mlp.compressor(X), X.mean(-1), atol=1e-6)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # GPT._init_weights sets no bias: a Linear with one would keep torch's default init
    assert all(l.bias is None for l in m.modules() if isinstance(l, torch.nn.Linear))


def test_weight_decay_by_role_and_a_new_parameter_must_declare_one():
    """Decayed: the matrices (Linear and embedding weights, W_v, CC's mix, TC's taps, EC's weight); not
    decayed: gains, biases, the gate's w_beta (2-D, decided by name, not rank) and TC's channel mix."""
    for compressor in ("cc", "tc"):  # CC's mix and TC's taps / channel_mix: both compressors' roles
        m = tiny_model(residual="delta", d_v=4, compressor=compressor)
        groups = m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu").param_groups
        decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))  # each once, tied too
        names = {n: decay[id(p)] for n, p in m.named_parameters()}  # every parameter in one group
        for n, wd in names.items():
            assert wd == (0.1 if n.rsplit(".", 1)[-1] in ("weight", "W_v", "mix", "taps") else 0.0), n
    assert names["blocks.0.attn.w_beta"] == 0.0 and m.blocks[0].attn.w_beta.dim() == 2
    m.blocks[0].attn.register_parameter("w_new", torch.nn.Parameter(torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"blocks.0.attn.w_new \(ResidualBranch.w_new\) has no weight-decay"):
        m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")
    # a new module's 1-D parameter that reuses a decayed name (CC's "mix") inherits nothing

    class NewCompressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Parameter(torch.ones(4))

    m = tiny_model(residual="delta", d_v=4, compressor="cc")
    m.blocks[0].attn.compressor = NewCompressor()
    with pytest.raises(ValueError, match=r"blocks.0.attn.compressor.mix \(NewCompressor.mix\) has no"):
        m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(n_embd=20), "n_embd"),
        (dict(d_v=0), "d_v"),
        (dict(residual="sum"), "residual"),
        (dict(compressor="xx"), "compressor"),
        (dict(beta_init=2.5), "beta_init"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(residual="additive", d_v=4), "d_v"),
        (dict(k_eps=0.0), "k_eps"),
        (dict(v_scale=-1.0), "v_scale"),
        (dict(embed_conv="no"), "embed_conv"),
        (dict(n_layer=True), "n_layer"),
        (dict(d_v=2.0), "d_v"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=0), "block_size"),
        (dict(n_head=4, head_dim=3, n_embd=12), "head_dim"),
        (dict(beta_init=-0.1), "beta_init"),
        (dict(beta_bound=2.5), "beta_bound"),
        (dict(beta_bound=0.0), "beta_bound"),
        (dict(beta_bound=1.0, beta_init=1.5), "beta_init"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ddl.ConfigError, match=f"GPTConfig.{field}="):
        GPTConfig(**{**TINY, **kw})
    assert issubclass(ddl.ConfigError, ValueError)


def test_config_accepts_the_edges_of_its_ranges_and_ints_for_floats():
    for kw in (
        dict(beta_init=0.0),
        dict(beta_init=2),
        dict(beta_bound=1, beta_init=1),
        dict(v_scale=0),
        dict(d_v=1, conv_kernel=1, n_layer=1),
    ):
        GPTConfig(**{**TINY, **kw})


# ============================================================== §5: the gate audit, and check_spectrum

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
    assert all(
        r["k_tilde_norm_min"] > 0 and r["e_pre_max"] >= r["e_pre_mean"] >= r["e_pre_min"] >= 0 for r in rows
    )
    with pytest.raises(ValueError, match="additive"):
        tiny_model(residual="additive").gate_stats()


def test_gate_stats_equal_a_hand_computation():
    """beta min/mean/max and its 10-bin histogram over [0, 2], |k~| and |e_pre| = |k^T X - v|,
    per layer and sublayer, from the inputs each branch saw; the mean cosine, over the first sequence's
    tokens, of the block's attention and MLP k, and of each k and its token's k in an earlier audit's."""
    m = scrambled(residual="delta", d_v=4, compressor="tc", block_size=12)
    inputs = {}
    for blk in m.blocks:
        for br in (blk.attn, blk.mlp):
            br.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.name, args[0]))
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(15))
    m.record_gates()
    m(idx)
    branches = [br for blk in m.blocks for br in (blk.attn, blk.mlp)]
    k_before = {br.name: o_branch(br, inputs[br.name])[1][3][0] for br in branches}
    k_earlier = m.recorded_k()
    with torch.no_grad():  # training moves every k a little
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    m(idx)
    rows = m.gate_stats(k_before=k_earlier)
    rows_step = m.gate_stats(k_step=k_earlier)  # the same cosine under k_step's name
    assert len(rows) == 4
    cos = lambda a, b: ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()
    for row, row_step in zip(rows, rows_step):
        br = getattr(m.blocks[row["layer"]], row["sublayer"])
        beta, k_tilde_norm, e_pre, k = o_branch(br, inputs[br.name])[1]
        assert row["k_cos_before"] == pytest.approx(cos(k[0], k_before[br.name]), abs=1e-6)  # k kept in fp32
        assert row["k_cos_before"] < 0.999 and row["k_cos_step"] is None  # k moved: not 1 by construction
        assert (row_step["k_cos_step"], row_step["k_cos_before"]) == (row["k_cos_before"], None)
        blk = m.blocks[row["layer"]]
        k_attn, k_mlp = (o_branch(b, inputs[b.name])[1][3][0] for b in (blk.attn, blk.mlp))
        assert row["k_cos_attn_mlp"] == pytest.approx(cos(k_attn, k_mlp), abs=1e-6)
        assert beta.max() - beta.min() > 0.5  # a spread of gates, so the histogram is not one bin
        hist = torch.bincount((beta / 0.2).floor().long().clamp(max=9).flatten(), minlength=10)
        assert row["beta_hist"] == hist.tolist()
        for key, t in (("beta", beta), ("k_tilde_norm", k_tilde_norm), ("e_pre", e_pre)):
            got = [row[f"{key}_{s}"] for s in ("min", "mean", "max")]
            want = [t.min().item(), t.mean().item(), t.max().item()]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    m.record_gates(False)
    assert all(blk.attn.stats is None and not blk.mlp.record for blk in m.blocks)


@pytest.mark.parametrize("name", [n for n, kw in VARIANTS.items() if kw["residual"] != "additive"])
def test_check_spectrum_passes_on_a_random_model(name):
    m = tiny_model(check_spectrum=True, **VARIANTS[name])
    assert torch.isfinite(m(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))))


def test_check_spectrum_holds_at_a_large_k_eps():
    """At k_eps = 0.5, |k| < 1 wherever |k~| is small: the general identity (1 - beta |k|^2) holds, and
    |k| = 1 is only asked where |k~| >> eps_k."""
    m = scrambled(check_spectrum=True, residual="delta", d_v=4, k_eps=0.5).float()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(22))
    m.record_gates()
    assert torch.isfinite(m(idx[:, :-1], idx[:, 1:]))
    assert min(r["k_tilde_norm_min"] for r in m.gate_stats()) < 5  # |k| visibly below 1 somewhere


def test_check_spectrum_catches_a_broken_gate_and_a_broken_rule(monkeypatch):
    m = tiny_model(check_spectrum=True, residual="delta", d_v=4)
    idx = torch.randint(0, 97, (1, 8))
    # stand-ins take any further arguments a changed gate() may have: they fail for their own reason only
    monkeypatch.setattr(m.blocks[1].mlp, "gate", lambda c, *a, **kw: torch.full((*c.shape[:-1], 1), 2.5))
    with pytest.raises(AssertionError, match="layer 1 mlp: beta outside"):
        m(idx)
    monkeypatch.undo()
    monkeypatch.setattr(ddl, "delta_update", ddl.write_update)  # no erase term: Eq. 2.4 breaks
    with pytest.raises(AssertionError, match=r"layer 0 attn: e_post != \(1 - beta \|k\|\^2\) e_pre"):
        m(idx)


@pytest.mark.parametrize("factor", [1.05, 0.95])
def test_check_spectrum_catches_a_five_percent_error_in_k(monkeypatch, factor):
    m = scrambled(check_spectrum=True, residual="delta", d_v=4).float()
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(18))
    m(idx)  # passes as it is
    real = ddl.unit_direction
    monkeypatch.setattr(ddl, "unit_direction", lambda kt, eps: factor * real(kt, eps))
    with pytest.raises(AssertionError, match=r"layer 0 attn: \|k\| != 1"):
        m(idx)


@pytest.mark.parametrize("beta_bound", [1.0, 2.0])
def test_check_spectrum_bounds_beta_by_beta_bound(monkeypatch, beta_bound):
    """Prop. 2.1's range as configured: a gate of 1.5 is within (0, 2) and outside (0, 1)."""
    m = tiny_model(check_spectrum=True, residual="delta", d_v=4, beta_bound=beta_bound)
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(20))
    m(idx)  # passes as it is
    monkeypatch.setattr(m.blocks[0].mlp, "gate", lambda c, *a, **kw: torch.full((*c.shape[:-1], 1), 1.5))
    if beta_bound == 2.0:
        m(idx)
    else:
        with pytest.raises(AssertionError, match=r"layer 0 mlp: beta outside \(0, 1\): min 1.5"):
            m(idx)


def test_check_spectrum_catches_a_gate_below_zero_and_a_contraction_off_by_ten_percent(monkeypatch):
    m = scrambled(check_spectrum=True, residual="delta", d_v=4).float()
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(19))
    monkeypatch.setattr(m.blocks[0].mlp, "gate", lambda c, *a, **kw: torch.full((*c.shape[:-1], 1), -0.5))
    with pytest.raises(AssertionError, match="layer 0 mlp: beta outside"):
        m(idx)
    monkeypatch.undo()
    real = ddl.delta_update
    monkeypatch.setattr(ddl, "delta_update", lambda X, k, v, beta: real(X, k, v, 0.9 * beta))
    with pytest.raises(AssertionError, match=r"layer 0 attn: e_post != \(1 - beta \|k\|\^2\) e_pre"):
        m(idx)


# ============================================================================ cached generation

@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_forward_equals_the_full_forward_token_by_token(name):
    """A prompt (shorter and longer than conv_kernel = 3), then three tokens at once, then one token at a
    time through a Cache: every step's logits equal those of a full forward over the sequence so far, in
    float64 (where a different but correct order of sums differs by about 1e-14)."""
    m = scrambled(block_size=16, conv_kernel=3, **VARIANTS[name])
    gen = torch.Generator().manual_seed(23)
    for prompt_len in (1, 2, 5):
        seq = torch.randint(0, 97, (3, 16), generator=gen)
        cache = ddl.Cache(16)
        ends = [prompt_len, prompt_len + 3, *range(prompt_len + 4, 17)]
        for start, end in zip([0] + ends, ends):
            got, want = m(seq[:, start:end], cache=cache), m(seq[:, :end])[:, -1:]
            check_tensor(f"{name}: cached logits at length {end}", got, want, atol=1e-10, rtol=1e-10)
        assert cache.length == 16 and cache.pos.item() == 16
        with pytest.raises(ValueError, match="cached sequence length 17 exceeds block_size=16"):
            m(seq[:, :1], cache=cache)


def test_cached_forward_with_one_tap_convolutions_keeps_no_past_tokens():
    """conv_kernel = 1: EC and TC read the current token alone, and the cache keeps none before it."""
    m = scrambled(block_size=8, conv_kernel=1, **VARIANTS["tc_ec"]).float()
    seq = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(26))
    cache = ddl.Cache(8)
    for start, end in ((0, 3), (3, 4), (4, 8)):
        got, want = m(seq[:, start:end], cache=cache), m(seq[:, :end])[:, -1:]
        check_tensor(f"cached logits at length {end}", got, want, atol=1e-5, rtol=1e-5)


def full_recompute_generate(m, prompt, steps, temperature, top_k):
    """The oracle: every new token from a full forward over the last block_size tokens (nanoGPT's loop)."""
    idx = prompt
    for _ in range(steps):
        logits = m(idx[:, -m.config.block_size:])[:, -1]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:  # a draw among the top_k, with probabilities softmax(logits / temperature) over them
            top, ids = logits.topk(top_k)
            p = torch.exp(top / temperature - (top / temperature).logsumexp(-1, keepdim=True))
            nxt = ids.gather(-1, torch.multinomial(p, 1))
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generation_equals_full_recompute_greedy_and_sampled_past_block_size(name):
    m = scrambled(block_size=10, conv_kernel=3, **VARIANTS[name]).float()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(24))
    for temperature, top_k in ((0, None), (1.5, 5)):
        torch.manual_seed(1)
        want = full_recompute_generate(m, prompt, 14, temperature, top_k)  # 18 tokens: past block_size
        torch.manual_seed(1)
        assert torch.equal(m.generate(prompt, 14, temperature=temperature, top_k=top_k), want), temperature


def test_generation_from_a_prompt_longer_than_block_size_keeps_its_last_block_size_tokens():
    m = scrambled(block_size=8).float()
    prompt = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(25))
    out = m.generate(prompt, 3, temperature=0)
    assert torch.equal(out, full_recompute_generate(m, prompt, 3, 0, None)) and out.shape == (2, 16)


def fixed_logits_model(logits):
    """A GPT whose next-token logits are `logits` (V,) at every step, whatever the input."""
    m = tiny_model()
    m.forward = lambda idx, targets=None, cache=None: logits.expand(idx.shape[0], idx.shape[1], -1)
    return m


def test_generate_greedy_paths_equal_an_explicit_argmax_loop():
    m = scrambled(block_size=8).float()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(16))

    def greedy(n_vocab):
        idx = prompt
        for _ in range(9):  # past block_size: the context is cropped to the last 8 tokens
            idx = torch.cat([idx, m(idx[:, -8:])[:, -1, :n_vocab].argmax(-1, keepdim=True)], dim=1)
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
        top3 = m(out[:, :t])[:, -1].topk(3).indices
        assert (top3 == out[:, t:t + 1]).any(-1).all()
    # not trivially greedy: some draws are not the argmax
    assert (out[:, 3:] != torch.stack([m(out[:, :t])[:, -1].argmax(-1) for t in range(3, 6)], 1)).any()


def test_generate_divides_the_logits_by_the_temperature_within_top_k_and_n_vocab():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0])  # ids 5 and 6 lie beyond n_vocab = 5
    m = fixed_logits_model(torch.cat([logits, torch.full((90,), -5.0)]))
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    torch.manual_seed(0)
    freq = lambda **kw: (
        torch.bincount(m.generate(prompt, 1, n_vocab=5, **kw)[:, 1], minlength=97).float() / 4000
    )
    want = torch.zeros(97)
    want[2:5] = torch.softmax(logits[2:5] / 2.0, dim=0)  # top_k = 3 of the first 5, temperature 2
    check_tensor("frequencies at temperature 2, top_k 3", freq(temperature=2.0, top_k=3), want, atol=0.03)
    want[2:5] = 1 / 3
    check_tensor("frequencies at temperature 1e6, top_k 3", freq(temperature=1e6, top_k=3), want, atol=0.03)
    want[:] = 0
    want[4] = 1
    assert torch.equal(freq(temperature=1e-3, top_k=3), want)
    want[:5] = torch.softmax(logits[:5], dim=0)
    check_tensor("frequencies at temperature 1", freq(), want, atol=0.03)
    check_tensor("frequencies, top_k above n_vocab", freq(top_k=50), want, atol=0.03)
    want[:5] = torch.softmax(logits[:5] / 2.0, dim=0)  # no top_k: all of n_vocab, at temperature 2
    check_tensor("frequencies at temperature 2, no top_k", freq(temperature=2.0), want, atol=0.03)


@pytest.mark.parametrize("kw,name", [(dict(top_k=0), "top_k=0"), (dict(temperature=-1.0), "temperature=-1.0"),
                                     (dict(n_vocab=0), "n_vocab=0"), (dict(n_vocab=98), "n_vocab=98")])
def test_generate_refuses_bad_settings_naming_them(kw, name):
    with pytest.raises(ddl.ConfigError, match=f"generate: {name} is invalid"):
        tiny_model().generate(torch.zeros(1, 1, dtype=torch.long), 1, **kw)


def test_cache_positions_live_on_the_device_where_a_replayed_cuda_graph_reads_them():
    """A CUDA graph replays kernels, not Python: the positions must be computed from the device tensor
    cache.pos, moved on in place (a new tensor, or positions from the Python count, would freeze)."""
    cache = ddl.Cache(16)
    cache.advance(3, "cpu")
    pos = cache.pos
    cache.advance(2, "cpu")
    assert cache.pos is pos and pos.item() == 5 and cache.positions.tolist() == [3, 4]
    pos.fill_(9)  # what a replay of one more step would have done to it, without Python running
    cache.advance(1, "cpu")
    assert cache.positions.tolist() == [9] and pos.item() == 10
