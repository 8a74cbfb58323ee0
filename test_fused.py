"""fused.py: the Triton path pinned to ddl.py and to the written-out rule. The kernels run in Triton's CPU
interpreter (TRITON_INTERPRET=1, set in conftest.py before anything imports Triton); without Triton they
skip."""
import dataclasses
import importlib
import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import ddl
import train
from ddl import GPT, ConfigError, GPTConfig, delta_update, unit_direction
from test_bench import BENCH_KINDS
from test_ddl import F64, VARIANTS, o_rms, scrambled, tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


# -------------------------------------------------- fused.py: the Triton path, pinned to the reference
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
    c = RMSNorm(x_in) with gain gamma (x_in itself when gamma is None). TC's taps, W (K, d, d_v): one
    x_in[s, ..., i] = sum_j W[s, i, j] X'[i, j] per tap s, tap-major, no norm."""
    k = k_tilde / torch.sqrt((k_tilde * k_tilde).sum(-1, keepdim=True) + EPS_K ** 2)
    e = (k[..., :, None] * X).sum(-2) - v if erase else -v
    Xn = X - beta[..., None, None] * k[..., :, None] * e[..., None, :]
    if W.dim() == 3:
        return Xn, torch.stack([(Xn * W[s]).sum(-1) for s in range(W.shape[0])])
    x_in = (Xn * W).sum(-1)
    return Xn, x_in if gamma is None else o_rms(x_in, gamma)


def step_inputs(dtype, B=2, T=5, d=24, d_v=3, seed=5, taps=None):
    """X, k~ (not unit: the kernel normalises it), v in (0, 4), beta in (0, 2), the mix W and the gain
    gamma away from their inits, with d and d_v off a power of 2 (the kernels' padded lanes); and the
    gradients of X' and c. With taps, W (taps, d, d_v) and c (taps, B, T, d): TC's read."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, d, d_v, generator=gen, dtype=F64)
    k_tilde = torch.randn(B, T, d, generator=gen, dtype=F64) * torch.rand(B, T, 1, generator=gen, dtype=F64)
    v, beta = (
        4 * torch.rand(B, T, d_v, generator=gen, dtype=F64),
        2 * torch.rand(B, T, generator=gen, dtype=F64),
    )
    lead = () if taps is None else (taps,)
    W, gamma = (
        torch.randn(*lead, d, d_v, generator=gen, dtype=F64) / 2,
        1 + torch.randn(d, generator=gen, dtype=F64) / 2,
    )
    grads = (
        torch.randn(B, T, d, d_v, generator=gen, dtype=F64),
        torch.randn(*lead, B, T, d, generator=gen, dtype=F64),
    )
    return [X.to(dtype), k_tilde.to(dtype), v.float(), beta.float(), W.to(dtype), gamma.to(dtype)], grads


def outputs_and_grads(f, inputs, grads):
    ins = [t.clone().requires_grad_() for t in inputs]
    outs = f(*ins)[:2]
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + [t.grad for t in ins]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fused_step(fused, erase, norm=True, summed=False):
    """fused.step on step_inputs' list; without the norm, gamma is not passed (and gets no gradient);
    summed: TC's taps summed across each sequence's tokens in the op."""
    return lambda X, kt, v, beta, W, gamma: fused.step(
        X, kt, v, beta, W, gamma if norm else None, EPS_K, erase, seq_len=X.shape[1] if summed else 0
    )


def o_sum_taps(c):
    """TC's read from each tap's sums c (K, B, T, d): x_in[b, t] = sum over taps s <= t of c[s, b, t - s]."""
    K, _, T, _ = c.shape
    return torch.stack([sum(c[s, :, t - s] for s in range(min(K, t + 1))) for t in range(T)], 1)


def oracle_step(erase, norm=True, summed=False):
    def step(X, kt, v, beta, W, gamma):
        Xn, c = o_step(X, kt, v, beta, W, gamma if norm else None, erase)
        return Xn, o_sum_taps(c) if summed else c
    return step


STEP_NAMES = ["X'", "c", "dX", "dk~", "dv", "dbeta", "dW", "dgamma"]


def check_step(got, want, tol):
    for name, g, w in zip(STEP_NAMES, got, want):
        if w is None:
            assert g is None, name
        else:
            assert rel_err(g, w) < tol, name


@pytest.mark.parametrize("norm,taps,summed", [(True, None, False), (False, None, False), (False, 3, False),
                                               (False, 3, True)], ids=["norm", "last", "tc", "tc_summed"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write"])
def test_fused_step_equals_the_written_out_rule_in_fp32(fused, erase, norm, taps, summed):
    """Outputs and the gradients of X, k~, v, beta, W and gamma: the kernels (fp32) against the float64
    oracle, with the next sublayer's norm and without it (the last boundary, before the final compressor),
    and with TC's read, 3 taps, W (3, d, d_v): each tap's sums, or x_in, their sum across tokens."""
    inputs, grads = step_inputs(torch.float32, taps=taps)
    if summed:  # x_in's gradient (B, T, d)
        grads = grads[0], grads[1][0]
    got = outputs_and_grads(fused_step(fused, erase, norm, summed), inputs, grads)
    want = outputs_and_grads(oracle_step(erase, norm, summed), [t.double() for t in inputs], grads)
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
        Xn = delta_update(X, unit_direction(k_tilde, EPS_K), v, beta[..., None])
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
        assert torch.equal(
            Xn.float(), R(X.float() - beta[..., None, None] * k[..., :, None] * e[..., None, :])
        )
        x_in = R((W * Xn.float()).sum(-1))
        r = torch.rsqrt((x_in * x_in).mean(-1, keepdim=True) + 1e-5)
        assert (R(x_in * r * gamma) == c.float()).float().mean() > 0.99
        s = (gamma * dc * x_in).sum(-1, keepdim=True) * r**3 / 40
        assert rel_err(W.grad, ((r * gamma * dc - x_in * s)[..., None] * Xn.float()).sum((0, 1))) < 1e-5
        assert rel_err(gamma.grad, (dc * x_in * r).sum((0, 1))) < 1e-5


@pytest.mark.parametrize("taps", [None, 3], ids=["cc", "tc"])
def test_fused_kernels_read_nothing_past_their_inputs(fused, taps):
    """Every input a view of a longer buffer whose tail is NaN: a load that escapes its mask (the padded
    lanes of d and d_v, a token past the last, TC: a tap past the last) turns an output or a gradient into
    NaN."""
    inputs, grads = step_inputs(torch.float32, taps=taps)
    norm = taps is None

    def nan_tailed(t):
        return torch.cat([t.flatten(), torch.full((256,), float("nan"), dtype=t.dtype)])[: t.numel()].view(
            t.shape
        )

    got = outputs_and_grads(fused_step(fused, True, norm), inputs, grads)  # clean copies
    ins = [nan_tailed(t).requires_grad_() for t in inputs]
    outs = fused_step(fused, True, norm)(*ins)[:2]
    torch.autograd.backward(outs, [nan_tailed(g.float()) for g in grads])
    for name, a, b in zip(STEP_NAMES[:7 + norm], [o.detach() for o in outs] + [t.grad for t in ins], got):
        assert torch.equal(a, b), name


def test_fused_op_passes_torch_library_opcheck(fused):
    """What torch.compile relies on: the fake implementation's shapes, dtypes and strides (a non-contiguous
    X), every output defined (no norm included), and the autograd registration, with and without gamma,
    with a state replayed in the backward (origin and chain), and with TC's taps (c is (K, ..., d), or with
    seq_len their sum across tokens (..., d))."""
    inputs, _ = step_inputs(torch.float32, B=2, T=2, d=20, d_v=3)  # few tokens: opcheck runs the op often
    X, k_tilde, v, beta, W, gamma = (t.requires_grad_() for t in inputs)
    X = X.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    with torch.no_grad():  # a boundary before: its output X_1 is replayed from X_0 through one step
        X_0 = torch.randn_like(X)
        k_0 = torch.randn_like(k_tilde)
        X_1, _, e, rk, _ = fused.step(X_0, k_0, v, beta, W, gamma, EPS_K, True)
    X_1.requires_grad_()
    for g, x, origin, chain in ((gamma, X, None, []), (None, X_1, X_0, [k_0, rk, e, beta.detach()])):
        torch.library.opcheck(fused.step_op, (x, k_tilde, v, beta, W, g, EPS_K, True, origin, chain, 0))
    taps = torch.randn(2, *W.shape, generator=torch.Generator().manual_seed(6)).requires_grad_()  # TC's read
    for seq_len in (0, X.shape[1]):  # each tap's sums; their sum across tokens
        args = X, k_tilde, v, beta, taps, None, EPS_K, True, None, [], seq_len
        torch.library.opcheck(fused.step_op, args)
    with torch.no_grad():  # the backward's own fake: g_gamma is (d,) without a norm, TC's K taps too
        Xn, c, e, rk, rstd = fused.step(X, k_tilde, v, beta, taps, None, EPS_K, True)
    grads = torch.randn_like(Xn), torch.randn_like(c)
    torch.library.opcheck(fused.step_backward, (*grads, X.detach(), [], k_tilde.detach(), e, beta.detach(),
                                                taps.detach(), None, rk, rstd, True, 0))
    with pytest.raises(ValueError, match="fused: a norm gain with 2 taps: the kernels norm only CC's read"):
        fused.step(X, k_tilde, v, beta, taps, gamma, EPS_K, True)
    with pytest.raises(ValueError, match="fused: seq_len=2 with CC's read: only TC's taps are summed"):
        fused.step(X, k_tilde, v, beta, W, gamma, EPS_K, True, seq_len=2)


def fused_pair(fused, monkeypatch, **kw):
    """A scrambled fp32 model and its copy with the fused body installed. install()'s own comparison with
    ddl.py is skipped here (1.5 s in the interpreter): the tests that use this pair are that comparison,
    on more shapes; install()'s check has its own tests below."""
    m = scrambled(**kw).float()
    twin = scrambled(**kw).float()
    monkeypatch.setattr(fused, "check_against_ddl", lambda gpt: None)
    return m, fused.install(twin)


def check_fused_model(ref, fast, B, T):
    """One forward and backward of both models on the same batch: equal losses and, per parameter,
    gradients equal to 1e-5 of their scale."""
    idx, tgt = (torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    losses = []
    for m in (ref, fast):
        loss = m(idx, tgt)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-5 * (1 + p.grad.abs().max()), n


@pytest.mark.parametrize("name", ["cc_ec", "write4", "cc_ec_no_reflection", "tc_ec"])  # w/o EC: FUSED_SHAPES
def test_fused_model_equals_ddl_forward_and_gradients(fused, name, monkeypatch):
    """The whole model through the fused body (one step per sublayer boundary, the next compressor read
    and norm in the kernel; TC: its taps' sums, then their sum over tokens and the norm in ddl.py's code):
    loss and every parameter's gradient equal to ddl.py's forward, in fp32."""
    ref, fast = fused_pair(fused, monkeypatch, **VARIANTS[name])
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


def test_fused_gate_audit_records_through_ddl_forward(fused, monkeypatch):
    ref, fast = fused_pair(fused, monkeypatch, **VARIANTS["cc_ec"])
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    check_same_gates(ref.gate_audit(idx)[0], fast.gate_audit(idx)[0])
    assert fast.blocks[0].attn.stats is None  # and recording is off again


def test_fused_install_refuses_what_it_does_not_run(fused, monkeypatch):
    for kw, message in (
        (dict(d_v=1), "fused: d_v=1 is not supported: must be > 1"),
        (dict(d_v=4, check_spectrum=True), "fused: check_spectrum=True is not supported"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            fused.install(tiny_model(**kw))
    monkeypatch.setattr(fused, "SEGMENT", 5)  # 4 boundaries to replay: the kernels take 3
    with pytest.raises(ConfigError, match=re.escape("fused: SEGMENT=5 is not supported: must be 1 to 4")):
        fused.install(tiny_model(d_v=4))
    monkeypatch.setattr(fused, "SEGMENT", 4)
    monkeypatch.setattr(fused, "INTERPRET", False)  # a CPU model without the interpreter
    with pytest.raises(ConfigError, match=re.escape("fused: device='cpu' is not supported: must be cuda")):
        fused.install(tiny_model(d_v=4))


# -------------------------------------------------------------- the fast path cannot drift from ddl.py
# Changes a reader of the paper would make in ddl.py: install() must refuse each, never train the old rule.

def test_fused_install_runs_an_undeclared_field_at_its_default_only_and_names_a_generic_reason(fused,
                                                                                              monkeypatch):
    """A new option off by default leaves today's model, so install() runs it (after its numerical check);
    any other value is refused by name. A declared field without a WHY entry gets a generic reason."""
    @dataclasses.dataclass
    class WithNewOption(GPTConfig):
        per_channel_gate: bool = False
    model = tiny_model(d_v=4)
    model.config = WithNewOption(**dataclasses.asdict(model.config))
    assert fused.install(model).body.__func__ is fused.fused_body
    model = tiny_model(d_v=4)
    model.config = WithNewOption(**{**dataclasses.asdict(model.config), "per_channel_gate": True})
    with pytest.raises(ConfigError, match=r"^fused: GPTConfig.per_channel_gate=True is not declared in "
                                          r"fused.SUPPORTED, so fused.py runs it only at its default False"):
        fused.install(model)
    monkeypatch.setitem(fused.SUPPORTED, "conv_kernel", (2, 3))
    with pytest.raises(ConfigError, match=r"^fused: conv_kernel=4 is not supported: must be one of \(2, 3\) "
                                          r"\(fused.SUPPORTED\)$"):
        fused.install(tiny_model(d_v=4))


def test_fused_install_refuses_when_k_comes_from_another_input(fused, monkeypatch):
    """k from the sublayer's input c instead of its output: the loss and every gradient change."""
    def forward(self, X, cache=None):
        c = self.input_norm(self.compressor(X))
        self.sublayer(c, cache)
        return self.update(X, k_in=c, v_in=c, beta_in=c)
    monkeypatch.setattr(ddl.ResidualBranch, "forward", forward)
    model = tiny_model(d_v=4)
    with pytest.raises(ConfigError, match="fused.py disagrees with ddl.py on this model: .* off by"):
        fused.install(model)
    assert model.body.__func__ is GPT.body  # nothing was replaced


def test_fused_install_refuses_a_changed_update_rule_and_a_per_channel_gate(fused, monkeypatch):
    real = ddl.delta_update
    monkeypatch.setattr(ddl, "delta_update", lambda X, k, v, beta: real(X, k, v, 0.5 * beta))
    with pytest.raises(ConfigError, match="fused.py disagrees with ddl.py"):
        fused.install(tiny_model(d_v=4))
    monkeypatch.undo()
    # beta per value channel, (..., d_v): the kernels take one beta per token and say so
    monkeypatch.setattr(ddl.ResidualBranch, "gate",
                        lambda self, c, *a, **kw: 2 * torch.sigmoid(c.float()[..., :4] + self.b_beta))
    shape = r"fused: beta has shape \(\d+, \d+, 4\), the kernels take \(\d+, \d+\)"
    with pytest.raises(ValueError, match=shape):
        fused.install(tiny_model(d_v=4))


def test_train_with_fused_logs_the_losses_of_the_reference(fused, tmp_path, monkeypatch):
    """--fused=true changes the kernels, not the run: the same train and val losses, step by step."""
    calls, step = [], fused.step
    monkeypatch.setattr(fused, "step", lambda *a: calls.append(1) or step(*a))
    logs, steps_run = [], []
    for on in ("false", "true"):
        out = tmp_path / on
        train.main(
            [
                "--preset=smoke",
                "--n_embd=16",
                "--head_dim=8",
                "--block_size=8",
                "--max_steps=1",
                "--eval_interval=1",
                "--val_tokens=16",
                "--log_interval=1",
                "--batch_size=2",
                "--total_batch=2",
                "--sample_tokens=0",
                "--device=cpu",
                f"--fused={on}",
                f"--out_dir={out}",
            ]
        )
        logs.append(
            [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if r["type"] in ("train", "val")]
        )
        steps_run.append(len(calls))
    assert steps_run[0] == 0 and steps_run[1] > 0  # the kernels ran in the fused run only
    assert len(logs[0]) == 3 and logs[1] == pytest.approx(logs[0], rel=1e-5)  # val 0, train 1, val 1


def test_bench_reference_step_is_the_written_out_rule():
    """bench.py's float64 reference for the fast-path check (k, Eq. 2.2, the next read and norm) against
    o_step."""
    inputs, _ = step_inputs(F64)
    for got, want in zip(bench.reference_step(*inputs, EPS_K), o_step(*inputs, True)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bench_fast_path_check_compiles_the_fused_step_and_its_replay(fused, monkeypatch):
    """With compile on, bench.py checks fused.step inside torch.compile (on CUDA its kernels then launch
    from the graph) on a state made by three earlier fused steps, which the compiled step's backward
    replays; fused.step stands in as the rule itself (the interpreter is too slow for 2048 tokens)."""
    compiling, calls = [False], []

    def fake_compile(f, fullgraph):
        def compiled(*a):
            compiling[0] = True
            try:
                return f(*a)
            finally:
                compiling[0] = False
        return compiled if fullgraph else pytest.fail("a graph break would pass unseen")

    def fake_step(X, kt, v, beta, W, gamma, k_eps, erase, origin=None, chain=()):
        calls.append((compiling[0], origin is not None, len(chain)))
        Xn, c = bench.reference_step(X, kt, v, beta, W, gamma, k_eps)
        return Xn, c, torch.zeros(*beta.shape, W.shape[1]), torch.ones_like(beta), None

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fused, "step", fake_step)
    bench.check_fast_path(torch.device("cpu"), True, True)
    earlier = [(False, False, 0)] * 3  # the three steps that make the state, not compiled
    assert calls == (earlier + [(True, True, 12)]) * 2  # bf16, fp32: the checked step compiled, replayed


def test_bench_with_fused_labels_the_fused_rows(fused, monkeypatch):
    monkeypatch.setattr(bench, "check_fast_path", lambda dev, use_compile, fused: None)
    monkeypatch.setattr(bench, "WARM_UP", 1)
    rows = bench.bench(
        *train.parse_args(
            [
                "--n_layer=1",
                "--n_head=2",
                "--head_dim=8",
                "--n_embd=16",
                "--block_size=8",
                "--vocab_size=64",
                "--bench_batch=2",
                "--bench_steps=1",
                "--bench_variants=additive,tc",
                "--fused=true",
                "--device=cpu",
            ],
            BENCH_KINDS,
        )
    )
    assert [r["variant"] for r in rows] == ["additive", "tc+fused"]  # every d_v > 1 variant, TC too
    # by name, beside ddl.py's path in one table
    args = ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
            "--bench_batch=2", "--bench_steps=1", "--bench_variants=cc,cc+fused", "--device=cpu"]
    calls = []
    monkeypatch.setattr(fused, "install", lambda model: calls.append(model.config.d_v) or model)
    rows = bench.bench(*train.parse_args(args, BENCH_KINDS))
    assert [r["variant"] for r in rows] == ["cc", "cc+fused"] and calls == [4]


FUSED_SHAPES = {  # d_v off a power of 2, one layer, d = 24, a large k_eps
    "dv2": dict(residual="delta", d_v=2, compressor="cc", embed_conv=False),
    "dv3_ec": dict(residual="delta", d_v=3, compressor="cc", embed_conv=True),
    "dv8": dict(residual="delta", d_v=8, compressor="cc", embed_conv=False, n_layer=1),
    "write_dv3": dict(residual="write", d_v=3, compressor="cc", embed_conv=False),
    "d24": dict(residual="delta", d_v=3, compressor="cc", n_head=3, head_dim=8, n_embd=24, n_layer=1),
    "k_eps": dict(
        residual="delta", d_v=3, compressor="cc", embed_conv=False, n_layer=1, k_eps=0.5
    ),  # config.k_eps reaches the op
    "write_tc3": dict(residual="write", d_v=3, compressor="tc", embed_conv=False, conv_kernel=3),
    "tc1": dict(residual="delta", d_v=2, compressor="tc", embed_conv=False, conv_kernel=1, n_layer=1),
}


@pytest.mark.parametrize("name", list(FUSED_SHAPES))
def test_fused_model_equals_ddl_across_shapes(fused, name, monkeypatch):
    check_fused_model(*fused_pair(fused, monkeypatch, **FUSED_SHAPES[name]), 2, 5)


@pytest.mark.parametrize("name", ["cc_ec", "tc_ec"])  # TC: the cache keeps each tap's last sums
def test_fused_eval_and_generate_equal_ddl(fused, monkeypatch, name):
    ref, fast = fused_pair(fused, monkeypatch, **VARIANTS[name])
    ref.eval(), fast.eval()
    idx = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    origins, step = [], fused.step
    monkeypatch.setattr(fused, "step", lambda *a: origins.append(a[8]) or step(*a))
    with torch.no_grad():
        a, b = ref(idx), fast(idx)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert len(origins) == 4 and all(o is None for o in origins)  # no backward: no earlier state kept
    assert torch.equal(ref.generate(idx, 4, temperature=0), fast.generate(idx, 4, temperature=0))


def test_fused_backward_keeps_one_state_per_segment(fused, monkeypatch):
    """What the fused body keeps for its backward, on a 6-boundary model: with SEGMENT 1 every boundary's
    (B, T, d, d_v) state, with SEGMENT 4 only those entering boundaries 0 and 4 (ceil(6 / SEGMENT)
    distinct states); in bf16 the replay gives the very gradients of SEGMENT 1, bit for bit."""
    monkeypatch.setattr(fused, "check_against_ddl", lambda gpt: None)
    model = fused.install(scrambled(residual="delta", d_v=3, compressor="cc", n_layer=3).bfloat16())
    idx, tgt = (torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    counts, grads = [], []
    for segment in (1, 4):
        monkeypatch.setattr(fused, "SEGMENT", segment)
        states = {}

        def keep(t):
            if tuple(t.shape) == (1, 4, model.config.n_embd, model.config.d_v):
                states[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(idx, tgt)
        counts.append(len(states))
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert counts == [6, 2]
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert torch.equal(a, b), name


def test_fused_frozen_parameters_and_two_forwards_before_backward(fused, monkeypatch):
    ref, fast = fused_pair(fused, monkeypatch, **VARIANTS["cc"], n_layer=1)
    for m in (ref, fast):
        for n, p in m.named_parameters():
            if "compressor" in n or "final_compressor" in n or "norm" in n or n == "wte.weight":
                p.requires_grad_(False)
    idx, tgt = (torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for m in (ref, fast):
        (m(idx, tgt) + m(idx.flip(1), tgt)).backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).abs().max() <= 1e-5 * (1 + p.grad.abs().max()), n
        else:
            assert q.grad is None


def test_fused_step_takes_non_contiguous_inputs(fused):
    inputs, grads = step_inputs(torch.float32, d=20, d_v=3)
    X, k_tilde, v, beta, W, gamma = inputs
    # transposed or strided storage: same values, other strides
    nc = [
        X.transpose(0, 1).contiguous().transpose(0, 1),
        k_tilde.transpose(0, 1).contiguous().transpose(0, 1),
        v.transpose(0, 1).contiguous().transpose(0, 1),
        beta.t().contiguous().t(),
        W.t().contiguous().t(),
        torch.stack([gamma, gamma], -1)[:, 0],
    ]
    assert not any(t.is_contiguous() for t in nc)
    got = outputs_and_grads(fused_step(fused, True), nc, grads)
    check_step(got, outputs_and_grads(oracle_step(True), [t.double() for t in inputs], grads), 1e-5)


@pytest.mark.parametrize("tokens,block_i,block_t,taps,summed", [
    (4, 16, 4, None, False), (4, 32, 8, None, False), (1, 64, 4, None, False), (4, 16, 4, 4, False),
    (4, 16, 4, 4, True)])
def test_fused_step_under_the_gpu_tile_configs(fused, monkeypatch, tokens, block_i, block_t, taps, summed):
    """The autotuner's other configs (the interpreter runs only the first): tokens per program not dividing
    the token count, feature blocks not dividing d, weight-gradient chunks longer than BLOCK_T and not a
    multiple, across sequences (19 tokens); CC's read and TC's (4 taps), each tap's sums or summed."""
    for kern in (fused._step_fwd, fused._step_bwd):
        monkeypatch.setattr(kern, "configs", [fused.triton.Config(dict(TOKENS=tokens), num_warps=4)])
    monkeypatch.setattr(
        fused._weight_bwd,
        "configs",
        [fused.triton.Config(dict(BLOCK_I=block_i, BLOCK_T=block_t), num_warps=2)],
    )
    monkeypatch.setattr(fused, "CHUNK", 10)  # 38 tokens: chunks of 10 (> BLOCK_T, not a multiple), the last 8
    inputs, grads = step_inputs(torch.float32, B=2, T=19, d=40, d_v=3, seed=9, taps=taps)
    if summed:
        grads = grads[0], grads[1][0]
    got = outputs_and_grads(fused_step(fused, True, taps is None, summed), inputs, grads)
    want = outputs_and_grads(oracle_step(True, taps is None, summed), [t.double() for t in inputs], grads)
    check_step(got, want, 1e-5)


def test_fused_install_on_a_compiled_model(fused):
    """install(torch.compile(model)): the fused body goes on the wrapped model, bound to it, so the compiled
    forward runs it and the gate audit's fallback to ddl.py's body finds GPT.body."""
    ref = scrambled(**VARIANTS["cc"]).float()
    inner = scrambled(**VARIANTS["cc"]).float()
    fast = fused.install(torch.compile(inner, backend="eager"))
    assert inner.body.__func__ is fused.fused_body and inner.body.__self__ is inner
    idx, tgt = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert fast(idx, tgt).item() == pytest.approx(ref(idx, tgt).item(), rel=1e-6)
    check_same_gates(ref.gate_audit(idx)[0], fast.gate_audit(idx)[0])


def test_fused_install_refuses_a_float64_model(fused):
    """The kernels compute in fp32: a float64 model would get fp32-accurate results, silently; and only
    the two dtypes the refusal names (float32, bfloat16) are taken."""
    for model, dtype in (
        (scrambled(**VARIANTS["cc"]), "float64"),
        (tiny_model(**VARIANTS["cc"]).half(), "float16"),
    ):
        with pytest.raises(
            ConfigError, match=re.escape(f"fused: dtype=torch.{dtype} is not supported: must be")
        ):
            fused.install(model)


def test_fused_install_checks_in_true_fp32_and_restores_tf32(fused, monkeypatch):
    """On a GPU train.py turns TF32 on; the self-check must compare in fp32 (TF32 alone differs by 1e-3)."""
    seen, body = [], fused.fused_body
    flag = lambda: torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(fused, "fused_body", lambda *a: seen.append(flag()) or body(*a))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fused.install(tiny_model(d_v=4))
        assert seen[0] is False and flag() is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_fused_without_triton_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    monkeypatch.delitem(sys.modules, "fused", raising=False)
    with pytest.raises(ConfigError, match="--fused=true needs Triton .*pip install triton"):
        importlib.import_module("fused")


@pytest.mark.parametrize("name", ["cc_ec", "tc_ec"])
def test_fused_model_compiles_as_one_graph(fused, monkeypatch, capture_query_as_on_cuda, name):
    """The fused body under torch.compile(fullgraph=True) (a graph break raises), training and no-grad, with
    CUDA's capture query untraceable as on a GPU: the op is one node of the graph (TC: with sum_taps and the
    norm around it), with the eager model's loss and gradients."""
    ref, fast = fused_pair(fused, monkeypatch, **VARIANTS[name])
    one_graph = torch.compile(fast, fullgraph=True, backend="eager")
    check_fused_model(ref, one_graph, 2, 5)
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(one_graph(idx, idx), ref(idx, idx), rtol=1e-6)


# from a mutation audit of install()'s check: each test fails on a one-line bug the rest let through

def test_fused_install_refuses_a_non_finite_disagreement(fused, monkeypatch):
    body = fused.fused_body
    monkeypatch.setattr(fused, "fused_body", lambda self, X, cache=None: body(self, X, cache) * float("nan"))
    model = tiny_model(d_v=4)
    with pytest.raises(ConfigError, match="fused.py disagrees with ddl.py on this model: loss off by nan"):
        fused.install(model)
    assert model.body.__func__ is GPT.body


def test_fused_install_refuses_a_rule_that_changes_only_the_gradients_or_agrees_only_at_init(fused,
                                                                                             monkeypatch):
    """beta's gradient halved at the same value; and beta + (beta - 1)^2, equal in value and gradient where
    beta = 1 exactly, as at the init (w_beta = 0, b_beta = 0): only the perturbed copy tells them apart."""
    real = ddl.delta_update
    half_grad = lambda b: b.detach() + 0.5 * (b - b.detach())
    for rule in (lambda X, k, v, beta: real(X, k, v, half_grad(beta)),
                 lambda X, k, v, beta: real(X, k, v, beta + (beta - 1) ** 2)):
        monkeypatch.setattr(ddl, "delta_update", rule)
        with pytest.raises(ConfigError, match="fused.py disagrees with ddl.py on this model"):
            fused.install(tiny_model(d_v=4))


def scale_grad(body, factor, calls, layer, when=lambda self: True):
    """body, with blocks.<layer>.mlp.b_beta's gradient times factor in the backward of each call where
    when(self) holds; calls counts the calls of every body so scaled: the hook of an earlier call does
    nothing (the check runs its bodies on one model copy)."""
    def scaled(self, X, cache=None):
        calls.append(None)
        n = len(calls)
        if when(self):
            self.blocks[layer].mlp.b_beta.register_hook(lambda g: g * factor if n == len(calls) else g)
        return body(self, X, cache)
    return scaled


@pytest.mark.parametrize("own, fused_off, fused_layer, accepted", [
    (1e-3, 5e-3, 0, True), (1e-3, 5e-3, 1, True), (1e-3, 2e-2, 1, False), (0.0, 5e-4, 0, False),
    (math.inf, 5e-3, 1, False)])
def test_fused_install_allows_ten_times_ddls_own_fp32_rounding_on_the_kind_or_1e_4(fused, monkeypatch, own,
                                                                                  fused_off, fused_layer,
                                                                                  accepted):
    """A gradient off from ddl.py's fp64 by 5e-3 passes where ddl.py's own fp32 is off by 1e-3 on that kind
    of parameter in any layer (as where terms nearly cancel; here simulated on layer 0's b_beta gradient),
    2e-2 does not, and 5e-4 does not where ddl.py's fp32 is exact to rounding (the 1e-4 floor), nor where
    ddl.py's fp32 overflows (an infinite error sets no limit)."""
    is_fp32 = lambda self: self.wte.weight.dtype == torch.float32
    calls = []
    monkeypatch.setattr(GPT, "body", scale_grad(GPT.body, 1 + own, calls, 0, is_fp32))
    monkeypatch.setattr(fused, "fused_body", scale_grad(fused.fused_body, 1 + fused_off, calls, fused_layer))
    model = tiny_model(d_v=4)
    if accepted:
        assert fused.install(model).body.__func__ is fused.fused_body
        return
    message = (rf"blocks.{fused_layer}.mlp.b_beta gradient off by (\S+) \(relative to ddl.py in fp64\), over "
               r"its limit (\S+) \(0.0001, or 10 times ddl.py's own fp32 error on blocks.mlp.b_beta in any "
               r"layer, (\S+)\)")
    with pytest.raises(ConfigError, match=message) as e:
        fused.install(model)
    err, limit, rounding = map(float, re.search(r"off by (\S+) .* limit (\S+) .*, (\S+)\);",
                                                str(e.value)).groups())
    assert err == pytest.approx(fused_off, rel=0.01)
    assert rounding == pytest.approx(own if own < math.inf else 0, abs=1e-5)
    assert limit == pytest.approx(max(1e-4, 10 * rounding), rel=0.01)


def test_fused_install_under_autocast_checks_in_fp64_and_fp32_all_the_same(fused):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.install(tiny_model(d_v=4)).body.__func__ is fused.fused_body


def test_fused_install_clears_the_tiles_tuned_on_its_check(fused):
    kernels = (fused._step_fwd, fused._step_bwd, fused._weight_bwd)
    for k in kernels:
        k.cache[("stale",)] = "a tile tuned elsewhere"  # the interpreter caches nothing by itself
    fused.install(tiny_model(d_v=4))
    assert [dict(k.cache) for k in kernels] == [{}, {}, {}]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_install_on_any_variant_runs_it_as_ddl_does_or_refuses_it_by_name(fused, name):
    """The battery's fused part: install() either passes its own comparison with ddl.py (the kernels run
    this variant) or refuses with one ConfigError naming the setting."""
    model = tiny_model(**VARIANTS[name])
    try:
        fused.install(model)
    except ConfigError as e:
        assert re.match(r"fused: (residual|d_v|compressor)=.* is not supported: must be ", str(e)), str(e)
        assert model.body.__func__ is GPT.body
    else:
        assert VARIANTS[name]["d_v"] > 1 and model.body.__func__ is fused.fused_body
