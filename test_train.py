"""train.py: the training loop against oracles, checkpoints and resume, torchrun, sampling, and the failures
a user can hit. CPU, offline; the GPT-2 vocabulary comes from TIKTOKEN_CACHE_DIR in CI (.ci/run)."""
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import tiktoken
import torch

import prepare_data
import rundir
import train
from ddl import GPT, ConfigError, GPTConfig
from test_ddl import TINY, VARIANTS, tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================================================ train.py

TRAIN_TINY = ["--n_layer=2", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--batch_size=2",
              "--total_batch=4", "--warmup_steps=2", "--lr=3e-3", "--eval_interval=4", "--val_tokens=128",
              "--log_interval=1", "--sample_tokens=0", "--d_v=2", "--compressor=tc", "--device=cpu"]


def run_train(shards, out, *extra):
    train.main([*TRAIN_TINY, f"--data_dir={shards}", f"--out_dir={out}", *extra])
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_writes_checkpoint_and_log(shards, tmp_path):
    log = run_train(shards, tmp_path / "o", "--max_steps=5")
    assert log[0]["type"] == "config" and log[0]["model_config"]["d_v"] == 2
    assert log[0]["resumed_from"] is None and log[0]["changed"] is None  # a fresh run
    assert log[0]["torch"] == torch.__version__
    tr = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in tr] == [1, 2, 3, 4, 5]
    assert set(tr[-1]) >= {"loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "mfu", "train_time_s"}
    assert tr[0]["ms_per_step"] is None and tr[-1]["ms_per_step"] > 0 and tr[-1]["train_time_s"] > 0
    assert [r["step"] for r in log if r["type"] == "val"] == [0, 4, 5]
    gates = [r for r in log if r["type"] == "gates"][-1]["gates"]
    assert len(gates) == 4 and {"beta_mean", "beta_hist", "k_tilde_norm_mean", "e_pre_mean"} <= set(gates[0])
    # k's stability: against the previous eval's k from the second eval on (the first has none)
    before = [[row["k_cos_before"] for row in r["gates"]] for r in log if r["type"] == "gates"]
    assert before[0] == [None] * 4 and all(-1 <= c < 1 for c in before[1] + before[2])
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 5 and ckpt["model_config"]["compressor"] == "tc"
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "data", "rng"}
    assert log[0]["source_sha256"] == rundir.provenance()["source_sha256"] and "git_dirty" in log[0]


def test_k_cos_step_compares_each_evals_k_with_the_step_befores_on_the_audits_fixed_rows(shards, tmp_path):
    """k_cos_step at an eval: the mean cosine of each token's k on the audit's rows (the last val batch: of
    val_tokens 128 in windows of 16, windows 6 and 7 at batch 2) with its k one optimizer step earlier,
    here from runs stopped at steps 3, 4 and 5 (the same lr schedule through --decay_steps): at the
    interval's eval (4) and the last one (5); None at step 0."""
    for steps in (3, 4, 5):
        log = run_train(shards, tmp_path / str(steps), f"--max_steps={steps}", "--decay_steps=6")
    val = prepare_data.read_shard(os.path.join(shards, "local_val_000000.bin"))
    idx = torch.from_numpy(np.stack([val[6 * 16:7 * 16], val[7 * 16:8 * 16]]).astype(np.int64))

    def k_first_sequence(folder):  # each sublayer's k = k~ / sqrt(|k~|^2 + eps^2) on idx's first row
        model = rundir.load_model(os.path.join(folder, "ckpt.pt"), torch.device("cpu"))[0]
        k_tilde = []
        for block in model.blocks:
            for branch in (block.attn, block.mlp):
                branch.sublayer.register_forward_hook(lambda mod, args, out: k_tilde.append(out[0]))
        with torch.no_grad():
            model(idx)
        eps = model.config.k_eps
        return [kt / torch.sqrt(kt.square().sum(-1, keepdim=True) + eps ** 2) for kt in k_tilde]

    k = {steps: k_first_sequence(tmp_path / str(steps)) for steps in (3, 4, 5)}
    audits = {r["step"]: r["gates"] for r in log if r["type"] == "gates"}  # the 5-step run's
    assert [row["k_cos_step"] for row in audits[0]] == [None] * 4
    for step in (4, 5):
        want = [((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()
                for a, b in zip(k[step], k[step - 1])]
        assert [row["k_cos_step"] for row in audits[step]] == pytest.approx(want, abs=1e-5)
        assert max(want) < 0.99999  # one step moved k: a comparison with the eval's own k would give 1
    steps_apart = [[row[key] for row in audits[4]] for key in ("k_cos_step", "k_cos_before")]
    assert steps_apart[0] != pytest.approx(steps_apart[1], abs=1e-3)  # 1 step against 4 (the step-0 eval's)


def test_tiny_model_overfits_a_fixed_batch():
    m = tiny_model(residual="delta", d_v=4, compressor="cc")
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m(idx[:, :-1], idx[:, 1:]).item()
    for _ in range(60):
        loss = m(idx[:, :-1], idx[:, 1:])
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


# A failure of the launcher alone, never of train.py: torchrun's rendezvous or its connections
LAUNCH_ERRORS = ("RendezvousConnectionError|RendezvousTimeoutError|Address already in use|"
                 "Connection (refused|reset)")


def test_two_gloo_processes_equal_one_with_double_accumulation(shards, tmp_path):
    """Not by chance: torchrun's rendezvous store binds port 0 itself (the OS reserves the port it picks:
    nothing to race for, as an unreserved "free port" is), on 127.0.0.1 (--local-addr: no host-name lookup,
    which can stall or resolve off-machine); a launch that fails in the launcher alone is retried in a fresh
    out_dir, up to 3 times. Both runs use one thread each, so neither's rounding depends on the load. One val
    window for two processes: rank 1 evaluates none and must still meet rank 0 in the val loss's all_reduce
    (through DDP, rank 0's evaluation forward waited for a buffer broadcast that rank 1 never joined)."""
    common = [*TRAIN_TINY, f"--data_dir={shards}", "--max_steps=4", "--decay_steps=4", "--total_batch=8",
              "--peak_tflops=1e-9", "--val_tokens=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        ddp_dir = tmp_path / f"ddp{attempt}"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                              "--nproc_per_node=2",
                              "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
                              os.path.join(HERE, "train.py"), *common, f"--out_dir={ddp_dir}"],
                             env=env, capture_output=True, text=True, timeout=240)
        if run.returncode == 0 or not re.search(LAUNCH_ERRORS, run.stderr):
            break
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*common, f"--out_dir={tmp_path / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    read = lambda d: [json.loads(line) for line in open(d / "log.jsonl")]
    ddp, one = read(ddp_dir), read(tmp_path / "one")
    assert ddp[0]["world_size"] == 2 and ddp[0]["grad_accum"] == 2 and one[0]["grad_accum"] == 4
    assert torch.load(ddp_dir / "ckpt.pt", weights_only=False)["world_size"] == 2  # a resume checks it
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
    assert {"out_dir", "overwrite", "resume", "num_samples", "temperature", "top_k", "d_v",
            "compressor"} < set(keys)
    for key in keys:
        line = next(l for l in out.splitlines() if l.startswith(f"  --{key}="))
        assert len(line.split(None, 1)) == 2, f"--{key} has no description"


def test_training_errors(shards, tmp_path):
    with pytest.raises(ValueError,
                       match=f"--data_dir={re.escape(str(tmp_path / 'empty'))}: no \\*_train_\\*.bin"):
        train.main([*TRAIN_TINY, f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="unknown key --n_layers; did you mean --n_layer"):
        train.main(["--n_layers=3"])
    with pytest.raises(ValueError, match="--max_steps='ten': expected an int"):
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
    shards = [np.arange(0, 961, dtype=np.uint16), np.arange(1000, 1600, dtype=np.uint16),
              np.arange(2000, 2025, dtype=np.uint16)]
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
    # the shards' order is shuffled per epoch, and so is each shard's window order:
    assert len(shard_orders) == 2
    for lo, hi in ((0, 1000), (1000, 2000)):
        assert len({tuple(v for v in e if lo <= v < hi) for e in epochs}) == 4
    for at in (30, 45, 100):  # inside the second shard of an epoch, in the next epoch
        t = train.TokenStream(shards, 10, 4, seed=3)
        t.load_state(states[at])
        flat = sum(epochs, [])
        assert [t.next_batch()[0][:, 0].tolist() for _ in range(40)] == [flat[4 * i:4 * i + 4]
                                                                         for i in range(at, at + 40)]
    # two ranks: disjoint halves of A's windows that together cover it
    r0, r1 = (train.TokenStream(shards[:1], 10, 4, 3, r, 2) for r in (0, 1))
    w0, w1 = (sum((st.next_batch()[0][:, 0].tolist() for _ in range(12)), []) for st in (r0, r1))
    assert sorted(w0 + w1) == list(range(0, 960, 10))


def test_token_stream_needs_one_batch_of_windows_per_process():
    # 4 windows of 10 + 1 tokens: one batch
    train.TokenStream([np.arange(41, dtype=np.uint16)], 10, 4, seed=0)
    # 8 windows: 4 for each of 2 processes
    train.TokenStream([np.arange(81, dtype=np.uint16)], 10, 4, 0, 1, 2)
    for tokens, world in ((40, 1), (80, 2)):
        message = (f"^too few train tokens: no shard holds batch_size=4 x {world} processes windows of "
                   r"block_size \+ 1 = 11 tokens \(a window never crosses two shards\)$")
        with pytest.raises(prepare_data.DataError, match=message):
            train.TokenStream([np.arange(tokens, dtype=np.uint16)], 10, 4, 0, 0, world)


def test_smoke_preset_trains_on_its_fixed_text_and_samples(tmp_path, capsys):
    out = tmp_path / "smoke"
    train.main(["--preset=smoke", "--max_steps=2", "--decay_steps=200", "--eval_interval=2",
                "--val_tokens=1024",
                "--sample_tokens=5", "--device=cpu", f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert "sample: " in printed and "val loss" in printed
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["model_config"]["d_v"] == 4 and [r["step"] for r in log if r["type"] == "val"] == [0, 2]
    assert log[0]["config"]["data_dir"] == "smoke/kjv.txt"  # the data it used
    train.main(["--mode=sample", f"--out_dir={out}", "--prompt=def", "--sample_tokens=6", "--device=cpu"])
    text = capsys.readouterr().out
    assert text.startswith("def") and len(tiktoken.get_encoding("gpt2").encode_ordinary(text.strip())) >= 3


# ---------------------------------------------------------------------------- train.py against oracles

def train_cfg(**kw):
    return train.TrainConfig(**{"device": "cpu", **kw})


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    """Linear warm-up reaches lr at step warmup_steps - 1; cosine from lr (step warmup_steps) to min_lr
    (step decay_steps), then flat. Expected values written out."""
    cfg = train_cfg(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, max_steps=200)
    want = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 5.5e-4,
            35: 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2,
            110: 1e-4, 150: 1e-4, 199: 1e-4}
    for step, lr in want.items():
        assert train.lr_at(step, cfg) == pytest.approx(lr, rel=1e-12), step
    # decay_steps 0: max_steps
    cfg = train_cfg(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=0, max_steps=100)
    assert train.lr_at(0, cfg) == pytest.approx(1e-3) and train.lr_at(50, cfg) == pytest.approx(5e-4)
    assert train.lr_at(100, cfg) == pytest.approx(0.0, abs=1e-15)


def test_weight_decay_only_on_matrices_by_name():
    m = tiny_model(residual="delta", d_v=4, compressor="cc", embed_conv=True)
    opt = m.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    want = {"wte.weight", "embed_conv.weight", "final_compressor.mix"}
    for i in range(2):
        for s, mats in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            want |= {f"blocks.{i}.{s}.compressor.mix", f"blocks.{i}.{s}.W_v"}
            want |= {f"blocks.{i}.{s}.sublayer.{w}.weight" for w in mats}
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
    fresh = tiny_model(residual="delta", d_v=4, compressor="tc").parameters()
    assert max((a - b).abs().max().item() for a, b in zip(pa, fresh)) > 1e-3


def test_cuda_graph_steps_mark_every_micro_step_and_accumulate_into_gradients_made_at_build(monkeypatch):
    """Under CUDA graphs a replay may overwrite the last one's outputs, the backward's gradients among them:
    build() makes every gradient (zeros), and each step marks a new replay before every micro-batch and
    accumulates into those same tensors, zeroing them after AdamW; the step equals the usual one."""
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 97, (2, 12), generator=gen), torch.randint(0, 97, (2, 12), generator=gen))
               for _ in range(3)]
    cfg, mcfg = train_cfg(lr=1e-2), GPTConfig(**TINY, d_v=2, compressor="cc")
    marks, results = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for graphs in (False, True):
        monkeypatch.setattr(train, "cuda_graphs", lambda cfg, dev: graphs)
        raw, model, opt = train.build(cfg, mcfg, torch.device("cpu"))
        made = [p.grad for p in raw.parameters()]
        assert all(g is not None and not g.any() for g in made) if graphs else all(g is None for g in made)
        it = iter(batches)
        loss, _ = train.train_step(model, raw, opt, lambda: next(it), 3, cfg.lr, cfg, nullcontext())
        if graphs:
            assert len(marks) == 3
            assert all(p.grad is g and not g.any() for p, g in zip(raw.parameters(), made))
        results.append((loss.item(), [p.detach().clone() for p in raw.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(results[0][1], results[1][1])) < 1e-6


def test_validation_is_the_mean_over_exactly_val_tokens_over_T_windows(monkeypatch):
    m = tiny_model(residual="delta", d_v=2, compressor="cc").eval()
    T = m.config.block_size
    val = np.random.default_rng(3).integers(0, 97, 8 * T).astype(np.uint16)
    cfg = train_cfg(val_tokens=5 * T + 3, batch_size=2)  # 5 whole windows, not 6 (the shard holds 7)
    audit = train.probe_batch(val, cfg, T, 0, 1)  # the last batch of 2: window 4 alone
    assert torch.equal(audit, torch.from_numpy(val[4 * T:5 * T].astype(np.int64))[None])
    got, gates, _ = train.evaluate(m, m, val, cfg, nullcontext(), torch.device("cpu"), 0, 1, audit)
    windows = [torch.from_numpy(val[w * T:(w + 1) * T + 1].astype(np.int64))[None] for w in range(5)]
    with torch.no_grad():
        want = sum(m(w[:, :-1], w[:, 1:]).item() for w in windows) / 5
    assert got == pytest.approx(want, rel=1e-6)
    assert len(gates) == 4
    # a budget beyond the shard: every whole window, 7 of the 8 T tokens (the 8th lacks its last target)
    got, _, _ = train.evaluate(m, m, val, train_cfg(val_tokens=100 * T, batch_size=4), nullcontext(),
                            torch.device("cpu"), 0, 1)
    windows = [torch.from_numpy(val[w * T:(w + 1) * T + 1].astype(np.int64))[None] for w in range(7)]
    with torch.no_grad():
        losses = [m(w[:, :-1], w[:, 1:]).item() for w in windows]
    assert got == pytest.approx(sum(losses) / 7, rel=1e-6)
    # rank 0 of 2 holds windows 0, 2, 4, 6; the all-reduce adds rank 1's sum (1, 3, 5): the mean over all 7
    monkeypatch.setattr(train.dist, "all_reduce", lambda t: t.add_(losses[1] + losses[3] + losses[5]))
    got, _, _ = train.evaluate(m, m, val, train_cfg(val_tokens=100 * T, batch_size=4), nullcontext(),
                               torch.device("cpu"), 0, 2)
    assert got == pytest.approx(sum(losses) / 7, rel=1e-6)


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
    mean of the micro-batch losses, scaled by grad_clip / norm (torch's clip, with its 1e-6), fresh every
    step."""
    gen = torch.Generator().manual_seed(11)
    data = [(torch.randint(0, 97, (2, 12), generator=gen),
             torch.randint(0, 97, (2, 12), generator=gen)) for _ in range(4)]
    clip, lr = 0.05, 0.5
    m, ref = (tiny_model(seed=3, residual="delta", d_v=4, compressor="cc") for _ in range(2))
    opt, it = torch.optim.SGD(m.parameters(), lr=lr), iter(data)
    for step in range(2):
        loss, norm = train.train_step(m, m, opt, lambda: next(it), 2, lr, train_cfg(grad_clip=clip),
                                      nullcontext())
        losses = [ref(x, y) for x, y in data[2 * step:2 * step + 2]]
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
    """train.py's clock: one second per training step, 100 seconds per evaluation and 1000 per gate audit
    (the eval's own, and the probe of k the step before, which the clock must not count either)."""
    def __init__(self, monkeypatch):
        self.now = 0.0
        real_step, real_eval, real_audit = train.train_step, train.evaluate, GPT.gate_audit
        monkeypatch.setattr(train, "time", self)
        monkeypatch.setattr(train, "train_step",
                            lambda *a: (setattr(self, "now", self.now + 1.0), real_step(*a))[1])
        monkeypatch.setattr(train, "evaluate",
                            lambda *a: (setattr(self, "now", self.now + 100.0), real_eval(*a))[1])
        monkeypatch.setattr(GPT, "gate_audit",
                            lambda *a: (setattr(self, "now", self.now + 1000.0), real_audit(*a))[1])

    def perf_counter(self):
        return self.now


def test_log_lines_timing_tokens_per_s_and_mfu_on_a_fake_clock(shards, tmp_path, monkeypatch, capsys):
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
    n_params = sum(p.numel() for p in GPT(GPTConfig(**log[0]["model_config"])).parameters())
    flops = 6 * n_params + 12 * 2 * 16 * 16
    for r in tr[1:]:
        assert (r["ms_per_step"], r["tokens_per_s"]) == (1000.0, 64.0), r
        assert r["mfu"] == pytest.approx(flops * 64 / 1000.0, rel=1e-12)
    assert [r["step"] for r in log if r["type"] == "val"] == [0, 2, 4, 6, 7]
    # the record of step s carries the lr its update used, lr_at(s - 1): warm-up 2 steps to 3e-3, cosine
    # to 1e-4 at 7
    cosine = lambda done: 1e-4 + 0.5 * (1 + math.cos(math.pi * done / 5)) * 2.9e-3
    assert [r["lr"] for r in tr] == pytest.approx([1.5e-3, 3e-3, cosine(3), cosine(4)], rel=1e-12)
    # the time left: the mean step time x the steps to go; elapsed: from the start, evaluations (1100 s
    # with their audits) and the probes of k before steps 2, 4, 6 and 7 (1000 s) included
    assert [r["left_s"] for r in tr] == [None, 4.0, 1.0, 0.0]
    out = capsys.readouterr().out
    assert re.search(r"^step      3/7 \| loss .* \| mfu [0-9.]+% \| 0:53:23 elapsed, 0:00:04 left$", out,
                     re.M)
    assert re.search(r"^step      1/7 \| .* \| first step, untimed \| 0:18:21 elapsed$", out, re.M)
    assert re.search(r"^done: 7 steps, 448 tokens in 2:38:27; 64 tok/s over the timed steps "
                     r"\(0:00:06\)$", out, re.M)


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
        want = m(rows[:, :-1], rows[:, 1:]).item()
    assert log[-2]["loss"] == pytest.approx(want, rel=1e-5)
    assert log[-2]["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_resume_changes_lists_the_new_settings_and_refuses_another_world_seed_data_or_model():
    cfg, mcfg = train_cfg(), GPTConfig(**TINY)
    ckpt = dict(config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg), world_size=1)
    assert rundir.resume_changes(ckpt, dataclasses.replace(cfg, resume=True), mcfg, 1) == {}
    new = dataclasses.replace(cfg, resume=True, batch_size=4, lr=2e-3)
    assert rundir.resume_changes(ckpt, new, mcfg, 1) == {
        "batch_size": [16, 4], "lr": [1e-3, 2e-3]}
    for new_cfg, new_mcfg, world, key in [(cfg, mcfg, 2, "world_size"),
                                          (dataclasses.replace(cfg, seed=1), mcfg, 1, "seed"),
                                          (dataclasses.replace(cfg, data_dir="x"), mcfg, 1, "data_dir"),
                                          (cfg, dataclasses.replace(mcfg, d_v=2), 1, "d_v")]:
        with pytest.raises(ConfigError, match=f"the checkpoint's {key} was"):
            rundir.resume_changes(ckpt, new_cfg, new_mcfg, world)


def test_training_checkpoint_that_dies_mid_write_leaves_the_previous_one(shards, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_second_save(obj, f):
        calls.append(f)
        real_save(obj, f)
        if len(calls) == 2:
            f.truncate(10)
            raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_second_save)
    with pytest.raises(OSError, match="disk full"):
        run_train(shards, tmp_path / "c", "--max_steps=3", "--ckpt_interval=1", "--eval_interval=100")
    monkeypatch.undo()
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)["step"] == 1
    assert not (tmp_path / "c" / "ckpt.pt.tmp").exists()


# ----------------------------------------------------------------------- train.py: failures a user can hit

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
def test_an_infinite_gradient_norm_alone_stops_training(shards, tmp_path, monkeypatch, ckpt_interval,
                                                        log_interval,
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
    # a run that wrote no checkpoint keeps its log aside, so that a retry may start
    log = [json.loads(line) for line in open(tmp_path / "inf" / ("log.failed.jsonl" if ckpt_step is None
                                                                   else "log.jsonl"))]
    assert log[-1] == {"type": "diverged", "step": 5}
    assert [r["step"] for r in log if r["type"] == "train"][-1] == last_train
    ckpt = tmp_path / "inf" / "ckpt.pt"
    assert (torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else None) == ckpt_step


def test_resume_after_a_crash_continues_the_log_without_duplicates(shards, tmp_path, monkeypatch):
    args = ("--max_steps=7", "--decay_steps=7", "--ckpt_interval=3", "--eval_interval=2")
    straight = run_train(shards, tmp_path / "a", *args)
    real_lr = train.lr_at
    # dies in step 6
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: real_lr(step, cfg) if step < 5 else 1 / 0)
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
    ("--val_tokens=8", "--val_tokens=8: must be >= block_size=16"),
    ("--embed_conv=no", "--embed_conv='no': expected a bool"),
    ("--n_layer=2.5", "--n_layer='2.5': expected an int"),
    ("--resume=maybe", "--resume='maybe': expected a bool"),
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
            with pytest.raises(prepare_data.DataError,
                               match="the val shard holds 16 tokens, fewer than block_size \\+ 1 = 17"):
                run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16")
    log = run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16", "--seed=2")
    torch.manual_seed(2)
    m = GPT(GPTConfig(**log[0]["model_config"]))
    with torch.no_grad():
        want = m(torch.arange(16)[None], torch.arange(1, 17)[None]).item()
    assert [r["type"] for r in log] == ["config", "val", "gates"]
    assert log[1]["loss"] == pytest.approx(want, rel=1e-5)
    (data / "run.json").write_text("{}")  # prepare_data.py still running, or died
    with pytest.raises(prepare_data.DataError, match="prepare_data.py did not finish there; rerun it"):
        run_train(str(data), tmp_path / "o", "--max_steps=0", "--val_tokens=16")


GOOD_SETTINGS = dict(batch_size=1, total_batch=1, val_tokens=1, eval_interval=1, log_interval=1,
                     ckpt_interval=1, seed=0, max_steps=0, decay_steps=0, warmup_steps=0, sample_tokens=0,
                     weight_decay=0.0, peak_tflops=0.0, beta1=0.0, beta2=0.999, lr=1e-9, grad_clip=1e-9,
                     min_lr=1e-9, mode="sample", device="auto", num_samples=1, temperature=0.0, top_k=0,
                     overwrite=True)


@pytest.mark.parametrize("key,bad", [
    *((k, 0) for k in ("batch_size", "total_batch", "val_tokens", "eval_interval", "log_interval",
                       "ckpt_interval",
                       "num_samples")),
    *((k, -1) for k in ("seed", "max_steps", "decay_steps", "warmup_steps", "sample_tokens", "top_k")),
    ("weight_decay", -1e-9), ("peak_tflops", -1.0), ("beta1", 1.0), ("beta2", 1.0), ("beta1", -0.1),
    ("lr", 0.0), ("lr", math.inf), ("grad_clip", 0.0), ("min_lr", -1e-9), ("min_lr", 2e-9), ("mode", "bench"),
    ("device", "mps"),
    ("temperature", -1e-9)])
def test_train_config_refuses_just_outside_each_bound_and_takes_the_bound(key, bad):
    train.TrainConfig(**GOOD_SETTINGS)
    with pytest.raises(ConfigError, match="^--overwrite=True: excludes --resume: choose one$"):
        train.TrainConfig(**{**GOOD_SETTINGS, "resume": True})
    with pytest.raises(ConfigError, match=f"^--{key}={re.escape(repr(bad))}: "):
        train.TrainConfig(**{**GOOD_SETTINGS, key: bad})


def test_parse_args_bools_preset_first_and_the_argument_form():
    for text, value in (("true", True), ("True", True), ("1", True), ("false", False), ("FALSE", False),
                        ("0", False)):
        cfg, _ = train.parse_args([f"--compile={text}", f"--resume={text}"])
        assert cfg.compile is value and cfg.resume is value, text
    assert train.parse_args(["--resume"])[0].resume is True and train.parse_args([])[0].resume is False
    assert train.parse_args(["--overwrite"])[0].overwrite is True  # any bool as a bare --flag
    # the keys given win over the preset
    cfg, mcfg = train.parse_args(["--max_steps=3", "--preset=smoke", "--n_layer=3"])
    got = (cfg.max_steps, mcfg.n_layer, cfg.lr, cfg.batch_size, mcfg.d_v, cfg.out_dir)
    assert got == (3, 3, 3e-3, 16, 4, "out-smoke")
    cfg, mcfg = train.parse_args(["--lr=2e-3"])
    assert (cfg.max_steps, mcfg.n_layer, cfg.lr, cfg.batch_size, mcfg.d_v) == (100_000, 12, 2e-3, 16, 1)
    for arg in ("lr=0.1", "--lr", "-lr=0.1"):
        with pytest.raises(ConfigError, match=f"^argument {re.escape(repr(arg))} is not of the form "
                                              r"--key=value \(or --flag for a true bool\)$"):
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
    rank, world, dev, ctx = rundir.setup(train_cfg(device="cpu"))
    assert (rank, world, dev) == (0, 1, torch.device("cpu")) and isinstance(ctx, nullcontext)


def test_cuda_asked_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device='cuda': this torch finds no CUDA device"):
        rundir.setup(train_cfg(device="cuda"))


def test_sampling_never_emits_padding_ids(capsys):
    """A model whose padding rows dominate the logits: unrestricted generation picks padding ids, which
    tiktoken cannot decode; train.sample restricts to the 50257 real ids and decodes."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, head_dim=8, n_embd=16, block_size=16, residual="additive"))
    with torch.no_grad():
        m.wte.weight[50257:] = 50.0 * torch.randn(50304 - 50257, 16)
    idx = torch.full((1, 1), 50256)
    assert m.generate(idx, 4, top_k=5).max() >= 50257  # the restriction below is not vacuous
    [text] = train.sample(m, train_cfg(sample_tokens=8, prompt="Hi"), torch.device("cpu"), nullcontext())
    assert isinstance(text, str) and text.startswith("Hi") and capsys.readouterr().out == text + "\n"
    torch.rand(7)  # the sample is seeded by --seed: the global generator's state does not matter
    assert train.sample(m, train_cfg(sample_tokens=8, prompt="Hi"), torch.device("cpu"),
                        nullcontext()) == [text]


class Echo:
    """Stands in for GPT: generate_tokens yields the ids of `tokens`, one (1, 1) tensor at a time, and
    records what it was asked; each yield prints a mark, so the test sees what sample printed before it."""
    def __init__(self, tokens):
        self.tokens, self.calls = tokens, []

    def generate_tokens(self, idx, max_new_tokens, temperature, top_k, n_vocab):
        self.calls.append((idx.tolist(), max_new_tokens, temperature, top_k, n_vocab))
        for t in self.tokens[:max_new_tokens]:
            print("|", end="")
            yield torch.tensor([[t]])


def test_sample_speed_leaves_out_each_samples_first_two_tokens(monkeypatch, capsys):
    """On a fake clock, each sample's first two tokens (the prompt's forward, the decoder's capture) take 10
    s and the others 0.5 s: 2 samples x 3 timed tokens in 3 s, 2 tokens/s."""
    clock = [0.0]

    class Slow(Echo):
        def generate_tokens(self, *args):
            for n, t in enumerate(super().generate_tokens(*args)):
                clock[0] += 10.0 if n < 2 else 0.5
                yield t

    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    cfg = train_cfg(sample_tokens=5, num_samples=2)
    train.sample(Slow([2124] * 5), cfg, torch.device("cpu"), nullcontext())
    assert capsys.readouterr().err.startswith("6 tokens in 3.00 s: 2.0 tokens/s (each sample's first two")


def test_sample_streams_the_text_as_generated_with_the_sampling_keys(capsys):
    """Each new token's text is printed before the next is asked for; a character whose UTF-8 bytes span
    two tokens (tiktoken's byte tokens: é is 0xC3 0xA9) comes out whole once its last byte arrives."""
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode([2124]) == " x"
    first, second = enc.encode_single_token(b"\xc3"), enc.encode_single_token(b"\xa9")
    echo = Echo([2124, first, second, 2124])
    cfg = train_cfg(sample_tokens=4, prompt="Deep delta", temperature=0.5, top_k=7, num_samples=2)
    assert train.sample(echo, cfg, torch.device("cpu"), nullcontext()) == ["Deep delta x\u00e9 x"] * 2
    out, err = capsys.readouterr()
    assert out == "Deep delta| x||\u00e9| x\n---------------\n" * 2
    # timed after each sample's first two tokens: 2 x 2 tokens
    assert re.fullmatch(r"4 tokens in [0-9.]+ s: [0-9.]+ tokens/s \(each sample's first two tokens not "
                        r"timed: the prompt's forward and the decoder's set-up\)\n", err)
    assert echo.calls == [([[50256] + enc.encode_ordinary("Deep delta")], 4, 0.5, 7, 50257)] * 2
    train.sample(echo, train_cfg(sample_tokens=1, top_k=0), torch.device("cpu"), nullcontext())
    assert echo.calls[-1][2:] == (0.8, None, 50257)  # the defaults; top_k 0: every id


def test_sample_mode_continues_the_prompt_with_the_checkpoints_weights(shards, tmp_path, capsys):
    """--mode=sample from the final checkpoint gives the sample that ended training (same seed and prompt)."""
    run_train(shards, tmp_path / "s", "--max_steps=2", "--sample_tokens=6", "--prompt=The gate")
    trained = capsys.readouterr().out.split("sample: ", 1)[1][:-1]
    train.main(["--mode=sample", f"--out_dir={tmp_path / 's'}", "--sample_tokens=6", "--prompt=The gate",
                "--device=cpu"])
    assert capsys.readouterr().out[:-1] == trained and trained.startswith("The gate")
    assert len(tiktoken.get_encoding("gpt2").encode_ordinary(trained)) >= 3


def run_script(*argv, code=None):
    cmd = [sys.executable, *(["-c", code] if code else [os.path.join(HERE, "train.py")]), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=120)


def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path):
    r = run_script("--lr=-1")
    assert r.returncode == 1 and r.stderr == "train.py: error: --lr=-1.0: must be > 0 and finite\n"
    # a ValueError from inside a (modified) model is not the user's setting: its traceback must show
    code = ("import runpy, sys, ddl\n"
            "def broken(self, idx, targets=None): raise ValueError('inside the model')\n"
            "ddl.GPT.forward = broken\nsys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')")
    r = run_script("--preset=smoke", "--device=cpu", "--max_steps=1", f"--out_dir={tmp_path}", code=code)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: inside the model" in r.stderr


# ----------------------------------------------------------------------- train.py: issue 22's cases, one each

def copy_shards(shards, folder, splits=("train", "val")):
    os.makedirs(folder)
    for f in os.listdir(shards):
        if any(f"_{s}_" in f for s in splits):
            shutil.copy(os.path.join(shards, f), folder)
    return folder


def test_a_wrong_or_partial_data_dir_is_refused_naming_it_also_with_the_smoke_preset(shards, tmp_path):
    """The smoke preset takes its fixed text only where no --data_dir is given; a --data_dir given is used or
    refused, in one line naming it and what is missing, before anything is written."""
    cases = [(tmp_path / "typo", "no \\*_train_\\*.bin and \\*_val_\\*.bin shards there"),
             (copy_shards(shards, tmp_path / "val_only", ["val"]), "no \\*_train_\\*.bin shards there"),
             (copy_shards(shards, tmp_path / "train_only", ["train"]), "no \\*_val_\\*.bin shards there")]
    for data, message in cases:
        for preset in ([], ["--preset=smoke"]):
            with pytest.raises(prepare_data.DataError,
                               match=f"^--data_dir={re.escape(str(data))}: {message}"):
                train.main([*preset, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])
    assert not (tmp_path / "o").exists()


def test_the_smoke_text_is_fixed_and_read_alone(monkeypatch):
    """smoke/kjv.txt, pinned by its hash and token count, tokenised as prepare_data.py does (EOT, then the
    ordinary encoding), its first 90% to train on: no other file is read (the repository's text drifts)."""
    path = os.path.join(HERE, "smoke", "kjv.txt")
    data = open(path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == ("38fff65cc1bf6de7251c9fd05b7a8591"
                                                "c27578c22731a4a8c0cdc4b7f25298ec")
    want = [50256] + tiktoken.get_encoding("gpt2").encode_ordinary(data.decode("utf-8"))
    assert len(want) == 92075
    opened, real_open = [], open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    (train_part,), val = train.load_data(train.parse_args(["--preset=smoke"])[0], 50304)
    monkeypatch.undo()
    assert opened == [path]
    assert train_part.tolist() == want[:82867] and val.tolist() == want[82867:]  # 92075 * 9 // 10 = 82867


def test_a_new_run_refuses_an_out_dir_holding_a_run_unless_resume_or_overwrite(shards, tmp_path):
    """Forgetting --resume loses nothing: a run's ckpt.pt or log.jsonl (even alone) stays as it was;
    --overwrite=true deletes both, so the log and the checkpoint are of one run."""
    out = tmp_path / "r"
    run_train(shards, out, "--max_steps=1")
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "log.jsonl")}
    (tmp_path / "log_only").mkdir()
    (tmp_path / "log_only" / "log.jsonl").write_text("{}\n")
    for folder, files in ((out, "ckpt.pt and log.jsonl"), (tmp_path / "log_only", "log.jsonl")):
        message = (f"^--out_dir={re.escape(str(folder))} holds a run's {files}: --resume continues it, "
                   "--overwrite=true deletes it, or choose another --out_dir$")
        with pytest.raises(ConfigError, match=message):
            run_train(shards, folder, "--max_steps=3")
    assert {f: (out / f).read_bytes() for f in before} == before and not (out / "lock").exists()
    log = run_train(shards, out, "--max_steps=2", "--overwrite=true")
    assert [(r["type"], r.get("step")) for r in log if r["type"] in ("config", "train")] == [
        ("config", None), ("train", 1), ("train", 2)]
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def test_a_second_run_into_a_busy_out_dir_is_refused_and_a_dead_runs_lock_taken_over(shards, tmp_path,
                                                                                     capsys):
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # a live process holding the lock
    try:
        (out / "lock").write_text(str(other.pid))
        with pytest.raises(ConfigError, match=f"^--out_dir={re.escape(str(out))} is in use by another run "
                                              f"\\(pid {other.pid}, "):
            run_train(shards, out, "--max_steps=1")
        assert (out / "lock").read_text() == str(other.pid) and not (out / "log.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is taken over, and removed at exit
    run_train(shards, out, "--max_steps=1")
    out_text = capsys.readouterr().out
    assert f"{out / 'lock'}: its run (pid {other.pid}) is gone; taking the lock over" in out_text
    assert not (out / "lock").exists()


@pytest.mark.parametrize("where", ["weight", "adamw"])
def test_weights_made_non_finite_by_a_finite_step_are_never_checkpointed(shards, tmp_path, monkeypatch,
                                                                         where):
    """Step 2's update leaves a weight inf (or an AdamW moment nan) from a finite loss and gradient norm:
    the step-2 checkpoint is not written, the step-1 one stays, and the log ends with the divergence."""
    real_step, calls = train.train_step, []

    def poisoned(model, raw, opt, *args):
        out = real_step(model, raw, opt, *args)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                t = raw.wte.weight if where == "weight" else next(iter(opt.state.values()))["exp_avg_sq"]
                t.view(-1)[3] = float("inf") if where == "weight" else float("nan")
        return out

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(FloatingPointError,
                       match="^a weight or AdamW's state is not finite at step 2: training"):
        run_train(shards, tmp_path / "w", "--max_steps=3", "--ckpt_interval=1", "--eval_interval=100")
    ckpt = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    log = [json.loads(line) for line in open(tmp_path / "w" / "log.jsonl")]
    assert log[-1] == {"type": "diverged", "step": 2} and log[-2]["type"] == "train" and log[-2]["step"] == 2


def test_all_finite_is_false_where_any_value_is_inf_or_nan():
    ts = [torch.randn(3, 4), torch.zeros(5), torch.tensor(3e38)]  # 3e38: finite, though its square is not
    assert rundir.all_finite(ts)
    for bad in (float("inf"), -float("inf"), float("nan")):
        for i in range(3):
            poisoned = [t.clone() for t in ts]
            poisoned[i].view(-1)[-1] = bad
            assert not rundir.all_finite(poisoned), (i, bad)


@pytest.mark.parametrize("split,top", [("train", 50304), ("val", 65535)])
def test_token_ids_from_another_tokenizer_are_refused_naming_the_shard_before_anything_is_written(
        shards, tmp_path, split, top):
    data = copy_shards(shards, tmp_path / "data")
    shard = data / next(f for f in sorted(os.listdir(data)) if f"_{split}_" in f)
    tokens = np.array(prepare_data.read_shard(shard))
    tokens[7] = top
    prepare_data.write_shard(str(shard), tokens)
    with pytest.raises(prepare_data.DataError,
                       match=f"^{re.escape(str(shard))}: token id {top} >= vocab_size=50304"):
        run_train(str(data), tmp_path / "o", "--max_steps=1")
    assert not (tmp_path / "o").exists()


def test_an_out_dir_in_the_way_of_a_file_is_refused_before_the_data_load(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("the data was loaded first"))
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        message = f"^--out_dir={re.escape(str(out))}: {re.escape(str(tmp_path / 'f'))} is a file, not a"
        with pytest.raises(prepare_data.DataError, match=message):
            train.main([*TRAIN_TINY, f"--out_dir={out}"])


def test_resume_cuts_the_log_by_the_checkpoints_step_in_a_new_out_dir_killed_and_resumed(shards, tmp_path,
                                                                                          monkeypatch):
    """A step-2 checkpoint copied into a new out_dir (no log there), resumed, killed in step 6 (after its
    step-4 checkpoint and step 5's record), resumed again: each step's records once, none lost."""
    args = ("--max_steps=6", "--decay_steps=6", "--ckpt_interval=2", "--eval_interval=2")
    run_train(shards, tmp_path / "src", *args[1:], "--max_steps=2")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "src" / "ckpt.pt", tmp_path / "b")
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: real_lr(step, cfg) if step < 5 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_train(shards, tmp_path / "b", *args, "--resume")
    monkeypatch.undo()
    crashed = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in crashed if r["type"] == "train"] == [3, 4, 5]
    resumed = run_train(shards, tmp_path / "b", *args, "--resume")
    steps = [(r["type"], r["step"]) for r in resumed if r["type"] != "config"]
    assert len(steps) == len(set(steps)) and [r["type"] for r in resumed].count("config") == 2
    assert [s for t, s in steps if t == "train"] == [3, 4, 5, 6]
    assert [s for t, s in steps if t == "val"] == [4, 6]


def test_ctrl_c_says_in_one_line_what_was_kept_and_exits_130(shards, tmp_path, monkeypatch, capsys):
    real_step, calls = train.train_step, []

    def interrupted_in_step_3(*args):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", interrupted_in_step_3)
    cases = ((tmp_path / "k", 2, "the step-2 checkpoint {} (--resume continues it)"),
             (tmp_path / "n", 9, "no checkpoint yet (--overwrite=true starts afresh)"))
    for out, ckpt_interval, kept in cases:
        with pytest.raises(SystemExit) as e:
            run_train(shards, out, "--max_steps=4", f"--ckpt_interval={ckpt_interval}")
        assert e.value.code == 130 and not (out / "lock").exists()
        kept = kept.format(out / "ckpt.pt")
        want = f"train.py: interrupted: kept {kept} and its log {out / 'log.jsonl'}\n"
        assert capsys.readouterr().err == want
        assert [json.loads(line).get("step") for line in open(out / "log.jsonl")][-1] == 2
    assert torch.load(tmp_path / "k" / "ckpt.pt", weights_only=False)["step"] == 2


def test_a_cpu_run_prints_torchs_thread_count_and_how_to_change_it(shards, tmp_path, capsys):
    log = run_train(shards, tmp_path / "t", "--max_steps=0")
    n = torch.get_num_threads()
    out = capsys.readouterr().out
    assert f"cpu: {n} torch threads (OMP_NUM_THREADS=1: often faster on busy cores)" in out
    assert log[0]["threads"] == n


@pytest.mark.parametrize("flags,key",
                         [(["--compressor=cc"], "compressor"), (["--d_v=1", "--compressor=tc"], "compressor"),
                                       (["--embed_conv=false"], "embed_conv"),
                                       (["--preset=smoke", "--d_v=1", "--embed_conv=true"], "embed_conv")])
def test_a_compressor_or_embed_conv_given_at_d_v_1_is_refused(flags, key):
    with pytest.raises(ConfigError,
                       match=f"^--{key}=.*: applies to d_v > 1 only; d_v is 1: set --d_v or drop it$"):
        train.parse_args(flags)
    assert train.parse_args(["--d_v=2", "--compressor=tc", "--embed_conv=false"])[1].compressor == "tc"
    # the preset's own compressor: not given
    assert train.parse_args(["--preset=smoke", "--d_v=1"])[1].d_v == 1


def test_provenance_hashes_the_source_files_and_names_a_commit_only_where_they_are_clean(tmp_path):
    names = ["bench.py", "ddl.py", "fused.py", "prepare_data.py", "rundir.py", "train.py"]
    for n in names:
        shutil.copy(os.path.join(HERE, n), tmp_path / n)
    (tmp_path / "README.md").write_text("not a source file")

    def want():  # what `sha256sum bench.py ddl.py ... | sha256sum` prints
        digest = lambda n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
        listing = "".join(f"{digest(n)}  {n}\n" for n in sorted(names))
        return hashlib.sha256(listing.encode()).hexdigest()

    assert rundir.provenance(str(tmp_path)) == dict(source_sha256=want(), git_commit=None, git_dirty=None)
    if shutil.which("sha256sum"):
        shell = subprocess.run(f"sha256sum {' '.join(sorted(names))} | sha256sum", shell=True, cwd=tmp_path,
                               capture_output=True, text=True).stdout.split()[0]
        assert shell == want()
    if not shutil.which("git"):
        return
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                                     *a],
                                    capture_output=True, text=True, check=True).stdout.strip()
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    assert rundir.provenance(str(tmp_path)) == dict(source_sha256=want(), git_commit=head, git_dirty=False)
    (tmp_path / "README.md").write_text("changed")  # not a source file: the sources are still as committed
    assert rundir.provenance(str(tmp_path))["git_commit"] == head
    (tmp_path / "hellaswag.py").write_text("# new\n")  # a source file git does not have: dirty, and hashed
    names.append("hellaswag.py")
    assert rundir.provenance(str(tmp_path)) == dict(source_sha256=want(), git_commit=None, git_dirty=True)


# ============================================================================ the compiled path: one graph

@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_compiles_as_one_graph_training_and_evaluation(name, capture_query_as_on_cuda):
    """torch.compile(fullgraph=True) raises at any graph break: the training forward with targets and its
    backward under bf16 autocast (as on CUDA), and the no-grad evaluation forward, each one graph with the
    eager model's loss and gradients; the eager model still refuses a bad token id (its checks run there)."""
    model, twin = tiny_model(3, **VARIANTS[name]), tiny_model(3, **VARIANTS[name])
    one_graph = torch.compile(twin, fullgraph=True, backend="eager")
    x, y = (torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for m in (model, one_graph):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x, y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():
        assert torch.equal(one_graph(x, y), model(x, y))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\); got \[0, 97\]"):
        model(torch.tensor([[0, 97]]))


def test_compiled_models_are_one_graph_in_the_chosen_mode_and_bad_modes_refused(monkeypatch):
    """build on CUDA compiles as one graph in --compile_mode (torch's None for default). No GPU here: the
    model stays on the CPU and torch.compile is recorded, not run; the CPU compiles nothing."""
    calls, model = [], tiny_model()
    model.to = lambda dev: model
    monkeypatch.setattr(train, "GPT", lambda mcfg: model)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    for mode in train.COMPILE_MODES:
        train.build(train_cfg(compile_mode=mode, fused="false"), GPTConfig(), torch.device("cuda"))
    assert calls == [dict(fullgraph=True, mode=None if m == "default" else m) for m in train.COMPILE_MODES]
    train.build(train_cfg(fused="false"), GPTConfig(), torch.device("cpu"))
    assert len(calls) == len(train.COMPILE_MODES)
    with pytest.raises(ConfigError, match="^--compile_mode='bogus': allowed: default, reduce-overhead, "
                                          "max-autotune, max-autotune-no-cudagraphs$"):
        train.parse_args(["--compile_mode=bogus"])


def test_compiled_runs_refuse_check_spectrum_and_cuda_graphs_under_torchrun():
    cuda, graphs = torch.device("cuda"), train_cfg(compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="^--check_spectrum=true reads values back in every forward, "
                                          "which a compiled graph cannot: add --compile=false$"):
        train.build(graphs, GPTConfig(check_spectrum=True), cuda, 1)  # before it makes anything on CUDA
    with pytest.raises(ConfigError, match=r"^--compile_mode='reduce-overhead' \(CUDA graphs\) is untested "
                                          "under torchrun: use default or max-autotune-no-cudagraphs$"):
        train.check_compile(graphs, GPTConfig(), cuda, 2)
    train.check_compile(train_cfg(compile_mode="max-autotune-no-cudagraphs"), GPTConfig(), cuda, 2)
    train.check_compile(train_cfg(compile=False), GPTConfig(check_spectrum=True), cuda, 2)
    train.check_compile(graphs, GPTConfig(check_spectrum=True), torch.device("cpu"), 2)  # a CPU runs eager


def test_the_first_line_names_the_variant_the_path_the_mode_and_the_dtype(shards, tmp_path, capsys):
    run_train(shards, tmp_path / "h", "--max_steps=1")
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(r"cpu x1 \| DDL TC \+ EC, d_v = 2 \| ddl.py \(--fused=auto: no CUDA\) \| eager \| "
                        r"fp32 \| [0-9,]+ params \| accum 2 \| 64 tokens/step", first)
    names = {"additive baseline": dict(residual="additive"), "DDL, d_v = 1": dict(),
             "write-only control, d_v = 1": dict(residual="write"),
             "DDL CC, d_v = 4": dict(d_v=4, embed_conv=False),
             "write-only control TC + EC, d_v = 3": dict(residual="write", d_v=3, compressor="tc"),
             "DDL, d_v = 1, beta < 1": dict(beta_bound=1.0, beta_init=0.5)}
    assert [train.variant(GPTConfig(**kw)) for kw in names.values()] == list(names)



def test_fused_auto_takes_fused_py_where_install_accepts_the_model_else_ddl_py_saying_why(monkeypatch):
    """--fused: auto runs fused.install on CUDA and keeps what it returns; what install refuses runs in ddl.py
    with install's reason; no CUDA or false: ddl.py without importing fused.py; true: install's error."""
    calls, fast = [], object()

    def install(model):  # a stand-in for fused.install: refuses d_v = 1 as the real one does
        calls.append(model)
        if model.config.d_v == 1:
            raise ConfigError("fused: d_v=1 is not supported: must be > 1")
        return fast
    monkeypatch.setitem(sys.modules, "fused", type(sys)("fused"))
    monkeypatch.setattr(sys.modules["fused"], "install", install, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    wide, narrow = tiny_model(d_v=2, compressor="cc"), tiny_model()
    choose = lambda fused, model, dev: train.choose_path(train_cfg(fused=fused), model, dev)
    assert choose("auto", wide, cuda) == (fast, "fused.py (--fused=auto)")
    assert choose("auto", narrow, cuda) == (narrow, "ddl.py (--fused=auto: fused: d_v=1 is not supported: "
                                                    "must be > 1)")
    assert choose("true", wide, cuda) == (fast, "fused.py (--fused=true)") and len(calls) == 3
    assert choose("auto", wide, cpu) == (wide, "ddl.py (--fused=auto: no CUDA)")
    assert choose("false", wide, cuda) == (wide, "ddl.py (--fused=false)") and len(calls) == 3
    with pytest.raises(ConfigError, match="^fused: d_v=1 is not supported"):
        choose("true", narrow, cuda)
    with pytest.raises(ConfigError, match="^--fused='yes': allowed: auto, true, false$"):
        train.parse_args(["--fused=yes"])

# ============================================================================ the run folder: disks and locks

@pytest.mark.parametrize("err,why", [(28, "no space left on the device"), (30, "read-only file system")])
def test_a_checkpoint_on_a_full_or_read_only_disk_is_one_line_and_leaves_no_temporary_file(
        tmp_path, monkeypatch, err, why):
    path = str(tmp_path / "ckpt.pt")
    rundir.save_atomic({"step": 1}, path)

    def fails(obj, f):  # as a full disk does: some bytes written, then the write refused
        f.write(b"x" * 100)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(ConfigError, match=f"^cannot write {re.escape(path)}: {why}: free space or choose "
                                          "another --out_dir$"):
        rundir.save_atomic({"step": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"x"), 1 / 0))  # any other error: its own
    with pytest.raises(ZeroDivisionError):
        rundir.save_atomic({"step": 3}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_a_lock_that_cannot_be_written_is_removed_and_a_lock_without_pid_taken_over_once_stale(
        tmp_path, monkeypatch, capsys):
    cfg = train_cfg(out_dir=str(tmp_path / "run"))
    lock = tmp_path / "run" / "lock"

    class Full:  # the lock's file, made, then its pid refused by a full disk
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "open", Full, raising=False)
    with pytest.raises(ConfigError, match=f"^cannot write {re.escape(str(lock))}: no space left on the "
                                          "device"):
        rundir.claim(cfg)
    assert not lock.exists()
    monkeypatch.undo()
    lock.write_text("")  # a start that died before writing its pid: while it may be starting, refused
    with pytest.raises(ConfigError, match=r"is in use by another run \(pid None, "):
        rundir.claim(cfg)
    stale = time.time() - rundir.LOCK_START_S - 1
    os.utime(lock, (stale, stale))
    rundir.claim(cfg)
    assert lock.read_text() == str(os.getpid())
    out = capsys.readouterr().out
    assert f"{lock}: its run (no pid: a failed start) is gone; taking the lock over" in out
    rundir.release(cfg.out_dir)


def test_a_failed_start_leaves_nothing_that_blocks_a_retry(shards, tmp_path, monkeypatch, capsys):
    """A setting that cannot run (fused.py refuses check_spectrum) is refused before the run folder is
    claimed; a run failing at its first step (as an out-of-memory would) moves its log aside, and the same
    command then runs; a run of 0 steps leaves the initial model's checkpoint, which --resume continues."""
    out = tmp_path / "f"
    with pytest.raises(ConfigError, match="fused: check_spectrum=True is not supported"):
        run_train(shards, out, "--max_steps=2", "--fused=true", "--check_spectrum=true")
    assert not out.exists() or os.listdir(out) == []
    real_step = train.train_step
    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train(shards, out, "--max_steps=2")
    assert sorted(os.listdir(out)) == ["log.failed.jsonl"]
    err = capsys.readouterr().err
    assert f"no checkpoint was written; the log is kept as {out / 'log.failed.jsonl'}" in err
    monkeypatch.setattr(train, "train_step", real_step)
    assert [r["step"] for r in run_train(shards, out, "--max_steps=2") if r["type"] == "train"] == [1, 2]
    zero = tmp_path / "zero"
    run_train(shards, zero, "--max_steps=0")
    assert torch.load(zero / "ckpt.pt", weights_only=False)["step"] == 0
    log = run_train(shards, zero, "--max_steps=2", "--resume")
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2]


def test_a_garbled_log_an_empty_out_dir_and_a_checkpoint_of_another_config_are_one_line(shards, tmp_path):
    out = tmp_path / "g"
    run_train(shards, out, "--max_steps=2", "--ckpt_interval=2")
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    for bad in ("{garbled\n", "\n"):
        (out / "log.jsonl").write_text("".join(lines[:2] + [bad] + lines[2:]))
        with pytest.raises(ConfigError, match=f"^{re.escape(str(out / 'log.jsonl'))}:3: not a JSON record "):
            run_train(shards, out, "--max_steps=3", "--resume")
    with pytest.raises(ConfigError, match="^--out_dir='': must name a folder$"):
        train.parse_args(["--out_dir="])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    for change, what in ((dict(gate_kind="x"), "unknown keys gate_kind"),
                         (dict(k_eps=None), "missing keys k_eps")):
        config = {k: v for k, v in {**ckpt["model_config"], **change}.items() if v is not None}
        torch.save({**ckpt, "model_config": config}, out / "ckpt.pt")
        message = f"^{re.escape(str(out / 'ckpt.pt'))}: its model_config has {what}: made by another version"
        with pytest.raises(ConfigError, match=message):
            train.main(["--mode=sample", f"--out_dir={out}", "--device=cpu"])
        with pytest.raises(ConfigError, match=message):
            run_train(shards, out, "--max_steps=3", "--resume")


def test_without_the_vocabulary_offline_a_test_is_skipped_naming_tiktoken_cache_dir(monkeypatch):
    import conftest

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(conftest, "LOAD_ENCODING", offline)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"tiktoken could not load gpt2 \(ConnectionError\): "
                                                    "offline, set TIKTOKEN_CACHE_DIR"):
        tiktoken.get_encoding("gpt2")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/a/cache")  # set, yet failing: a failure
    with pytest.raises(ConnectionError):
        tiktoken.get_encoding("gpt2")


# ============================================================================ what the docstrings promise
# (from a mutation audit of rundir.py, train.main and fused.install: each test fails on a one-line bug that
# the rest of the suite let through)

def test_claim_removes_its_lock_when_the_pid_is_refused_at_the_flush(tmp_path, monkeypatch):
    lock = tmp_path / "run" / "lock"

    class FullOnFlush:  # the pid held in a buffer, refused when it reaches the disk
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            try:
                self.flush()  # as a real file's close does
            finally:
                self.f.close()

        def write(self, text):
            self.pending = text

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "open", FullOnFlush, raising=False)
    with pytest.raises(ConfigError, match=f"^cannot write {re.escape(str(lock))}: no space left"):
        rundir.claim(train_cfg(out_dir=str(tmp_path / "run")))
    assert not lock.exists()


def test_a_lock_of_another_users_live_process_is_refused(tmp_path, monkeypatch):
    def kill(pid, sig):  # 4242 lives under another user (EPERM); 4243 is gone
        if pid == 4242:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        raise ProcessLookupError(errno.ESRCH, "No such process")

    monkeypatch.setattr(os, "kill", kill)
    assert rundir.pid_alive(4242) is True and rundir.pid_alive(4243) is False
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text("4242")
    with pytest.raises(ConfigError, match=r"is in use by another run \(pid 4242, "):
        rundir.claim(train_cfg(out_dir=str(out)))
    assert (out / "lock").read_text() == "4242"


def test_start_log_keeps_a_record_seen_twice_once_and_drops_a_last_line_cut_short(tmp_path):
    recs = [{"type": "config"}, {"type": "train", "step": 1}, {"type": "train", "step": 2},
            {"type": "val", "step": 2}, {"type": "train", "step": 2}, {"type": "train", "step": 3}]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "train", "st')
    rundir.start_log(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs[:4]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, PermissionError(errno.EACCES, "Permission denied")])
def test_a_save_stopped_by_ctrl_c_or_a_forbidden_folder_leaves_no_temporary_file(tmp_path, monkeypatch, stop):
    path = str(tmp_path / "ckpt.pt")
    rundir.save_atomic({"step": 1}, path)

    def stopped(obj, f):
        f.write(b"x" * 100)
        raise stop

    monkeypatch.setattr(torch, "save", stopped)
    raises = (pytest.raises(KeyboardInterrupt) if stop is KeyboardInterrupt else
              pytest.raises(ConfigError, match=f"^cannot write {re.escape(path)}: permission denied: free"))
    with raises:
        rundir.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and torch.load(path)["step"] == 1


def test_load_checkpoint_refuses_a_file_that_is_not_a_dict_in_one_line(tmp_path):
    torch.save(5, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="is not a checkpoint of this train.py: it has no model, optimizer"):
        rundir.load_checkpoint(str(tmp_path / "ckpt.pt"))


def test_provenance_without_git_still_hashes_the_sources(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("x = 1\n")
    listing = f"{hashlib.sha256(b'x = 1' + bytes([10])).hexdigest()}  train.py\n"
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no git on PATH
    assert rundir.provenance(str(tmp_path)) == dict(
        source_sha256=hashlib.sha256(listing.encode()).hexdigest(), git_commit=None, git_dirty=None)


def test_ctrl_c_before_the_folder_is_claimed_or_after_a_step_0_checkpoint_is_one_line(shards, tmp_path,
                                                                                       monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    real_load = train.load_data
    monkeypatch.setattr(train, "load_data", interrupted)
    with pytest.raises(SystemExit) as e:
        run_train(shards, tmp_path / "o", "--max_steps=1")
    assert e.value.code == 130 and capsys.readouterr().err == "train.py: interrupted\n"
    assert not (tmp_path / "o" / "lock").exists()
    monkeypatch.setattr(train, "load_data", real_load)
    run_train(shards, tmp_path / "z", "--max_steps=0")
    capsys.readouterr()
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit):
        run_train(shards, tmp_path / "z", "--max_steps=2", "--resume")
    assert f"kept the step-0 checkpoint {tmp_path / 'z' / 'ckpt.pt'} (--resume" in capsys.readouterr().err


def test_a_checkpoint_check_names_the_first_non_finite_step_not_the_current_one(shards, tmp_path,
                                                                                  monkeypatch):
    real_step, calls = train.train_step, []

    def poisoned(model, raw, *args):  # nan weights from step 5 on; the step-6 checkpoint's check finds it
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                raw.wte.weight[0, 0] = float("nan")
        return real_step(model, raw, *args)

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="^the loss or gradient norm is not finite at step 5:"):
        run_train(shards, tmp_path / "nan", "--max_steps=8", "--ckpt_interval=2", "--log_interval=7",
                  "--eval_interval=100")
    log = [json.loads(line) for line in open(tmp_path / "nan" / "log.jsonl")]
    assert log[-1] == {"type": "diverged", "step": 5}
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["step"] == 4
