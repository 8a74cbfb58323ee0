"""bench.py: the throughput table, its timing, its fast-path check and its bounds. CPU, offline."""
import gc
import os
import re
import types
import weakref
from contextlib import nullcontext

import pytest
import torch

import bench
import train
from ddl import ConfigError, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_runs_on_cpu(capsys):
    rows = bench.bench(*train.parse_args(
        ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
         "--bench_batch=2", "--bench_steps=2", "--device=cpu"], BENCH_KINDS))
    assert [r["variant"] for r in rows] == ["additive", "delta", "cc", "tc", "write"]
    assert all(r["train_tps"] > 0 and r["infer_tps"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out


BENCH_KINDS = (train.TrainConfig, GPTConfig, bench.BenchConfig)


def table_row(variant, params, train_ms, ratio, mem):
    return dict(variant=variant, params=params, train_ms=train_ms, train_min=train_ms / 2,
                train_max=train_ms * 2, train_tps=1e4 / train_ms, train_ratio=ratio, infer_tps=2e4 / train_ms,
                infer_ratio=ratio * 2, mem_gib=mem, reserved_gib=mem + 1, mfu=0.25, breaks=1, recompiles=2)


def test_bench_table_ratios_are_the_rounds_and_memory_against_the_base_row(capsys):
    rows = [table_row("cc", 1000, 20.0, 0.45, 3.0), table_row("additive", 900, 10.0, 1.0, 2.0)]
    rows[1]["host_share"], rows[0]["host_share"] = 0.05, 0.25
    bench.print_table(rows, rows[1], torch.device("cpu"), 1.5, 4, 8, "reduce-overhead", 7)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("| micro-batch 4 x 8 | compile reduce-overhead | ratios against additive: "
                             "median of 7 interleaved rounds")
    assert lines[2].split()[-3:] == ["breaks", "recomp", "host"]
    assert lines[3].split() == ["cc", "1,000", "20.0", "10.0-40.0", "500", "0.450", "1,000", "0.900", "3.00",
                                "1.500", "4.00", "25.0%", "1", "2", "25%"]
    assert lines[4].split() == ["additive", "900", "10.0", "5.0-20.0", "1,000", "1.000", "2,000", "2.000",
                                "2.00", "1.000", "3.00", "25.0%", "1", "2", "5%"]


def test_time_rounds_interleaves_the_calls_and_ratios_are_the_median_of_the_rounds(monkeypatch):
    """Two functions called in turn for 3 rounds, each timed alone; a host slowdown in round 2 hits both,
    so the median per-round ratio (2, 2, 2) is exact where a ratio of the medians (30 / 10) is not."""
    clock, order = [0.0], []
    durations = {"base": iter([10, 40, 10]), "variant": iter([20, 80, 30])}

    def call(name):
        def fn():
            order.append(name)
            clock[0] += next(durations[name]) / 1000
        return fn

    monkeypatch.setattr(bench, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    base, variant = bench.time_rounds([call("base"), call("variant")], 3, torch.device("cpu"))
    assert order == ["base", "variant"] * 3
    assert base == pytest.approx([10, 40, 10]) and variant == pytest.approx([20, 80, 30])
    assert bench.round_ratio(base, variant) == pytest.approx(0.5)
    assert bench.round_ratio([10, 10, 10], [20, 20, 10]) == pytest.approx(0.5)


def test_time_ms_is_the_median_after_the_warm_up_calls(monkeypatch):
    clock, durations = [0.0], iter([50] * bench.WARM_UP + [2, 9, 1, 40])  # ms; the timed three: 2, 9, 1

    def fn():
        clock[0] += next(durations) / 1000

    monkeypatch.setattr(bench, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    assert bench.time_ms(fn, 3, torch.device("cpu")) == pytest.approx(2.0)


def test_bench_rows_throughput_mfu_and_ratios_from_the_timed_rounds(monkeypatch, capsys):
    """The CPU peak: 2 x 512^3 flops in 10 ms; the rounds (base step, cc step, base forward, cc forward) of
    10, 20, 4, 5 ms, then 10, 40, 4, 5: cc's median step 30 ms, its ratio the median of 1/2 and 1/4; the
    additive baseline's 10 ms: 3200 tok/s; mfu (6 params + 12 L T d) x tok/s / peak."""
    rounds = iter([[[10.0, 10.0], [20.0, 40.0], [4.0, 4.0], [5.0, 5.0]]])
    monkeypatch.setattr(bench, "time_rounds", lambda fns, steps, dev: next(rounds))
    monkeypatch.setattr(bench, "matmul_peak_tflops", lambda dev: 2 * 512 ** 3 / 10.0 / 1e9)
    monkeypatch.setattr(bench, "check_fast_path", lambda dev, use_compile, fused: None)
    rows = bench.bench(*train.parse_args(
        ["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16", "--block_size=16", "--vocab_size=64",
         "--bench_batch=2", "--bench_steps=2", "--bench_variants=cc,additive", "--device=cpu"], BENCH_KINDS))
    peak = 2 * 512 ** 3 / 10.0 / 1e9  # TFLOP/s
    cc, add = rows
    assert (cc["variant"], add["variant"]) == ("cc", "additive") and cc["params"] > add["params"]
    assert (cc["train_ms"], cc["train_min"], cc["train_max"], add["train_ms"]) == (30.0, 20.0, 40.0, 10.0)
    assert cc["train_ratio"] == pytest.approx(0.375) and cc["infer_ratio"] == pytest.approx(0.8)
    assert add["train_tps"] == pytest.approx(3200.0) and add["infer_tps"] == pytest.approx(8000.0)
    assert (add["train_ratio"], add["mem_gib"], cc["breaks"], cc["recompiles"]) == (1.0, None, 0, 0)
    for r in rows:
        assert r["mfu"] == pytest.approx((6 * r["params"] + 12 * 1 * 16 * 16) * 2 * 16 / r["train_ms"] / 1e9
                                         / peak)
    lines = capsys.readouterr().out.splitlines()  # each variant's line comes as soon as it is measured
    assert lines[0] == "cc: 30.0 ms/step (20.0-40.0), 0.375x the baseline"


def test_bench_counts_each_variants_own_breaks_and_graphs_compiled_after_its_warm_up(monkeypatch):
    """Two variants whose calls alternate: the second's warm-up compiles 2 graphs and breaks one, then its
    timed call compiles one more; none of that is the first's, which compiles nothing after its warm-up."""
    from torch._dynamo.utils import counters
    cfg, mcfg = train.parse_args(["--n_layer=1", "--n_head=2", "--head_dim=8", "--n_embd=16",
                                  "--block_size=16", "--vocab_size=64", "--device=cpu"])
    x = torch.zeros(2, 16, dtype=torch.long)
    first = bench.Variant("additive", cfg, mcfg, torch.device("cpu"), nullcontext(), x, x)
    real_build = bench.build

    def build(*args):  # the second variant: its step compiles a graph at every call
        raw, model, opt = real_build(*args)
        counters["stats"]["unique_graphs"] += 1
        counters["graph_break"]["a break"] += 1

        def compiles(*a):
            counters["stats"]["unique_graphs"] += 1
            return model(*a)
        return raw, compiles, opt

    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "WARM_UP", 1)
    second = bench.Variant("delta", cfg, mcfg, torch.device("cpu"), nullcontext(), x, x)
    bench.time_rounds([first.step, second.step], 1, torch.device("cpu"))
    rows = [v.row([1.0], [1.0], (1.0, 1.0), 2, 16, 1.0) for v in (first, second)]
    assert [(r["breaks"], r["recompiles"]) for r in rows] == [(0, 0), (1, 1)]
    assert counters["stats"]["unique_graphs"] >= 3


GIB = 2**30


class FakeAllocator:
    """torch.cuda's memory statistics in GiB: `now` allocated, its peak since the last reset, and reserved;
    alloc(n) is a call that allocates n GiB on top and frees them; `log` records the calls in order."""
    def __init__(self, monkeypatch, now, peak, reserved_peak):
        self.now, self.peak, self.reserved_peak, self.log = now, peak, reserved_peak, []
        for name, fn in dict(synchronize=lambda dev=None: self.log.append("sync"), empty_cache=lambda: None,
                             reset_peak_memory_stats=self.reset,
                             memory_allocated=lambda dev=None: self.now * GIB,
                             memory_reserved=lambda dev=None: 1 * GIB,
                             max_memory_allocated=lambda dev=None: self.peak * GIB,
                             max_memory_reserved=lambda dev=None: self.reserved_peak * GIB).items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def reset(self, dev=None):
        self.log.append("reset")
        self.peak = self.now

    def alloc(self, n):
        def call():
            self.log.append(n)
            self.peak = max(self.peak, self.now + n)
        return call


def test_steady_peak_is_the_most_allocated_while_the_calls_run_not_before(monkeypatch):
    """5 GiB held, 9 GiB peaked during compilation before the reset; the calls allocate 2 GiB and 3 GiB on
    top, each freed: the steady peak is 5 + 3, not the 9 before it, nor the 5 + 2 + 3."""
    mem = FakeAllocator(monkeypatch, now=5, peak=9, reserved_peak=12)
    assert bench.steady_peak("cuda", (mem.alloc(2), mem.alloc(3))) == 8.0
    assert mem.log == ["sync", "reset", 2, 3, "sync"]


def test_peak_memory_is_the_steady_step_above_what_was_held_but_the_warm_up_under_cuda_graphs(monkeypatch):
    """Held before the build: 2 GiB allocated, 1 reserved; the build and warm-up peaked at 9 allocated and 12
    reserved, and 5 are allocated after it. Without CUDA graphs the calls run (peak 5 + 3) and the variant's
    figures are 8 - 2 and 12 - 1; under CUDA graphs, whose replays allocate nothing, they are the warm-up's,
    9 - 2, and the calls do not run."""
    mem = FakeAllocator(monkeypatch, now=5, peak=9, reserved_peak=12)
    assert bench.peak_memory("cuda", (2.0, 1.0), (mem.alloc(3),), graphs=False) == (6.0, 11.0)
    mem = FakeAllocator(monkeypatch, now=5, peak=9, reserved_peak=12)
    assert bench.peak_memory("cuda", (2.0, 1.0), (mem.alloc(3),), graphs=True) == (7.0, 11.0)
    assert mem.log == []


def test_held_memory_frees_an_earlier_variant_in_a_reference_cycle_before_reading(monkeypatch):
    """An earlier variant, unreachable but in a reference cycle (its counted calls hold it), with Python's
    automatic collection off: held_memory reads the memory only once the collector has freed it, so that
    it is not freed during the next variant's measurement instead."""
    class Earlier:  # as bench.Variant: its step, a closure, holds it
        def __init__(self):
            self.step = self.counted()

        def counted(self):
            return lambda: self
    earlier = Earlier()
    gone = weakref.ref(earlier)
    del earlier
    mem, freed_when_read = FakeAllocator(monkeypatch, now=5, peak=9, reserved_peak=12), []

    def allocated(dev=None):
        freed_when_read.append(gone() is None)
        return mem.now * GIB
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    gc.disable()
    try:
        assert bench.held_memory("cuda") == (5.0, 1.0)
    finally:
        gc.enable()
    assert freed_when_read == [True]


def test_bench_cpu_memory_estimate_at_its_boundary(monkeypatch):
    """smoke at micro-batch 2 (n = 128 tokens, L = 2, d = 64, V = 50304) with cc's d_v = 4: 16 x 12 L d^2
    (1,572,864) + 16 V d (51,511,296) + 8 n V (51,511,296) + 160 n L d d_v (10,485,760) = 115,081,216
    bytes."""
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
            # beta: (B, T, 1)
            return (scale * (X + k[..., None] + v[:, :, None, :] + beta[..., None])).to(X.dtype)
        return rule

    for off_bf16, off_fp32, failing in ((2e-2, 0.0, "torch.bfloat16"), (0.0, 5e-5, "torch.float32")):
        monkeypatch.setattr(bench, "delta_update", stand_in(off_bf16, off_fp32))
        with pytest.raises(RuntimeError, match=f"the {failing} rewrite disagrees with the reference"):
            bench.check_fast_path(torch.device("cpu"), False, False)
    assert "torch.bfloat16: max relative error" in capsys.readouterr().out  # passed with its rounding alone


def test_bench_config_bounds():
    bench.BenchConfig(bench_batch=1, bench_steps=1, bench_variants="write")
    for kw, message in ((dict(bench_batch=0), "--bench_batch=0: must be >= 1"),
                        (dict(bench_steps=0), "--bench_steps=0: must be >= 1"),
                        (dict(bench_variants="cc,ddl"), "--bench_variants: unknown variant 'ddl'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench.BenchConfig(**kw)


def test_bench_refuses_a_cpu_size_that_cannot_fit_and_prints_no_nan(monkeypatch, capsys):
    pages = {"SC_AVPHYS_PAGES": 2**20, "SC_PAGE_SIZE": 4096}  # 4 GiB
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    cfg, mcfg, bcfg = train.parse_args(["--preset=124m", "--device=cpu"], BENCH_KINDS)
    with pytest.raises(ConfigError, match="needs about .* GiB and 4 GiB are free: use --preset=smoke"):
        bench.bench(cfg, mcfg, bcfg)


def test_bench_fused_on_a_cpu_is_one_line_error_before_any_kernel_runs(monkeypatch):
    """As train.py (fused.install) says it; without TRITON_INTERPRET=1 Triton finds no driver on a CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bench, "check_fast_path", lambda *a: pytest.fail("a fused kernel was run on the CPU"))
    cfg, mcfg, bcfg = train.parse_args(["--preset=smoke", "--device=cpu", "--fused=true"], BENCH_KINDS)
    with pytest.raises(ConfigError,
                       match="^--fused=true: device='cpu' is not supported: fused.py's kernels need "
                                          "cuda \\(or TRITON_INTERPRET=1 on the CPU: for tests"):
        bench.bench(cfg, mcfg, bcfg)


def test_kernel_summary_is_per_step_busy_time_launches_and_groups():
    """Two steps' trace: kernels at [0, 10], [5, 20] (overlapping), [30, 35] and [30, 31] (µs), and one CPU
    op, which is not a kernel. Busy: the union, 20 + 5 = 25 µs over 2 steps; 4 launches over 2 steps; each
    kernel's own time in its group."""
    events = [dict(cat="kernel", name="nvjet_sm90_tst_256x128_NNT", ts=0.0, dur=10.0),
              dict(cat="kernel", name="_step_bwd", ts=5.0, dur=15.0),
              dict(cat="kernel", name="triton_per_fused__fused_rms_norm_backward_add_5", ts=30.0, dur=5.0),
              dict(cat="kernel", name="triton_red_fused__log_softmax_backward_nll_0", ts=30.0, dur=1.0),
              dict(cat="cpu_op", name="aten::mm", ts=0.0, dur=100.0)]
    got = bench.kernel_summary(events, steps=2)
    assert got["busy_ms"] == pytest.approx(25 / 1000 / 2)
    assert got["launches"] == 2
    assert got["groups"] == pytest.approx({"matmul": 0.005, "fused bwd": 0.0075, "inductor": 0.0025,
                                           "loss": 0.0005})
    # the longest inductor kernels alone: the matmul, the fused kernel and the loss have their groups
    assert [(n, pytest.approx(v)) for n, v in got["top"]] == [
        ("triton_per_fused__fused_rms_norm_backward_add_5", (0.0025, 0.5))]
    again = [dict(cat="kernel", name=f"triton_poi_fused_add_{i % 2}", ts=40.0 + 10 * i, dur=2.0 + 2 * i)
             for i in range(3)]  # add_0 twice, 2 + 6 µs over 2 steps: the first of the top 2; add_1 left out
    got = bench.kernel_summary(events + again, steps=2, top=2)["top"]
    assert [(n, pytest.approx(v)) for n, v in got] == [
        ("triton_poi_fused_add_0", (0.004, 1.0)),
        ("triton_per_fused__fused_rms_norm_backward_add_5", (0.0025, 0.5))]


def test_report_prints_the_profile_with_its_longest_kernels(monkeypatch, capsys):
    summary = dict(busy_ms=30.0, launches=500.0, groups={"matmul": 12.0, "inductor": 15.5},
                   top=[("triton_red_fused_sum_7", (2.25, 24.0)), ("triton_poi_fused_add_3", (1.5, 24.0))])
    monkeypatch.setattr(bench, "profile_kernels", lambda step: summary)
    row = dict(variant="tc+fused", train_ms=40.0, train_min=39.5, train_max=41.0, train_ratio=0.5,
               mem_gib=0.0)
    bcfg = types.SimpleNamespace(bench_profile=True)
    got = bench.report(types.SimpleNamespace(step=None), row, bcfg)
    assert got["host_share"] == pytest.approx(0.25) and got["profile"] is summary
    assert capsys.readouterr().out.splitlines() == [
        "tc+fused: 40.0 ms/step (39.5-41.0), 0.500x the baseline",
        "  GPU busy 30.0 ms per step (25% of the median step waits on the host), 500 kernel launches; "
        "kernel ms: inductor 15.50, matmul 12.00",
        "  longest inductor kernels, ms (launches) per step: triton_red_fused_sum_7 2.25 (24), "
        "triton_poi_fused_add_3 1.50 (24)"]


def test_bench_profile_needs_cuda():
    args = ["--preset=smoke", "--bench_profile=true", "--device=cpu"]
    with pytest.raises(ConfigError, match=r"^--bench_profile=true profiles GPU kernels: device='cpu' runs"):
        bench.bench(*train.parse_args(args, BENCH_KINDS))


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CPU-only torch
def test_profile_kernels_runs_the_steps_and_reads_the_profilers_trace(monkeypatch):
    """The plumbing: `steps` calls under torch.profiler, its Chrome trace exported and summarised; a CPU
    step makes no kernels to find."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    got = bench.profile_kernels(lambda: calls.append(torch.ones(3).sum()), steps=2)
    assert len(calls) == 2 and got == dict(busy_ms=0.0, launches=0.0, groups={}, top=[])
