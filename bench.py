"""
Throughput of every DDL variant against the additive baseline, in one process on one device.

    python bench.py --preset=124m                       # every variant, one GPU, default compile mode
    python bench.py --preset=124m --bench_batch=16 --bench_steps=10 --bench_profile=true \
        --bench_variants=additive,delta,cc,cc+fused,tc+fused,write+fused   # the README's table
    python bench.py --preset=124m --compile_mode=reduce-overhead     # the same under CUDA graphs
    python bench.py --preset=smoke --bench_steps=3      # the code path on a CPU
    python bench.py --preset=124m --bench_profile=true --bench_variants=additive,delta
                                                        # where each step's GPU time goes, the host's share

First the measured bf16 matmul peak and a check of one sublayer boundary as the model runs it (k
from k~, Eq. 2.2, the next CC read and its norm; in bf16 and fp32, compiled or fused) against
float64; then per variant, built and compiled as train.py does (one graph), full training steps
(train.py's train_step: forward, backward, clip, AdamW) and forwards with targets under no_grad
(inference) on a fixed random batch: WARM_UP calls each, then bench_steps rounds that time the
baseline's call and the variant's back to back. Takes train.py's and GPTConfig's keys too.
"""
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ddl import ConfigError, GPTConfig, delta_update, setting, unit_direction
from rundir import setup
from train import TrainConfig, build, compiled, cuda_graphs, parse_args, train_step

VARIANTS = {
    "additive": dict(residual="additive", d_v=1),
    "delta": dict(residual="delta", d_v=1),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
    "write": dict(residual="write", d_v=4, compressor="cc", embed_conv=True),
}
FUSED = ("cc+fused", "tc+fused", "write+fused")  # the same variants through fused.py, beside ddl.py's

@dataclass
class BenchConfig:
    bench_batch: int = setting(16, "micro-batch of the timed steps")
    bench_steps: int = setting(20, "timed steps per variant")
    bench_variants: str = setting(",".join(VARIANTS), "comma-separated, from " + ", ".join(VARIANTS)
                                  + "; cc+fused, tc+fused, write+fused: through fused.py (--fused=true: "
                                    "every d_v > 1 one)")
    bench_profile: bool = setting(False, "CUDA: also profile 3 training steps per variant (torch.profiler): "
                                         "GPU busy time, kernel launches, kernel time by group")

    def __post_init__(self):
        for key in ("bench_batch", "bench_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key}={getattr(self, key)!r}: must be >= 1")
        for name in self.bench_variants.split(","):
            if name not in (*VARIANTS, *FUSED):
                raise ConfigError(f"--bench_variants: unknown variant {name!r}; allowed: "
                                  f"{', '.join((*VARIANTS, *FUSED))}")

WARM_UP = 3  # calls before timing: compilation, and under CUDA graphs their warm-up, capture and first replay

def time_rounds(fns, rounds, dev):
    """Wall ms of every call of fns, called in turn (fns[0], fns[1], ..., then again) for `rounds` rounds, the
    device synchronised before every clock read: a drift of a shared host falls on all of them alike.
    One list of ms per fn."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ms in zip(fns, times):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ms.append((time.perf_counter() - t) * 1000)
    return times

def time_ms(fn, steps, dev):
    """Median wall time of fn in ms over steps calls after WARM_UP calls."""
    for _ in range(WARM_UP):
        fn()
    return float(np.median(time_rounds([fn], steps, dev)[0]))

def round_ratio(base_ms, ms):
    """The median over rounds of base_ms / ms: a variant's speed as a multiple of the baseline's."""
    return float(np.median(np.array(base_ms) / np.array(ms)))

def matmul_peak_tflops(dev):
    """Measured dense matmul rate: bf16 8192^3 on a GPU, fp32 512^3 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / time_ms(lambda: a @ b, 10, dev) / 1e9

def reference_step(X, k_tilde, v, beta, W, gamma, k_eps):
    """k from k~ (§3.1), Eq. 2.2, then the next CC read of the new state (mix W, (d, d_v)) and its norm
    (gain gamma): what the model computes between two sublayers, and what fused.step does in one kernel."""
    Xn = delta_update(X, unit_direction(k_tilde, k_eps), v, beta[..., None])  # one beta per token
    x_in = torch.sum(Xn * W, dim=-1)
    return Xn, F.rms_norm(x_in, (x_in.shape[-1],), gamma, eps=1e-5)

def check_fast_path(dev, use_compile, fused):
    """The step as the model runs it (compiled on CUDA as one graph, through fused.step with --fused; state
    in bf16 or fp32, v and beta in fp32) against reference_step in float64 on random inputs: both outputs
    and the gradients of X, k~, v, beta, W and gamma. With --fused the state X is made from an earlier one
    by three fused steps, which the backward replays (fused.py's SEGMENT 4 at most), so the replay is
    checked too. Prints the largest relative error; fails beyond 1e-2 (bf16) / 1e-5 (fp32). TF32 is off
    meanwhile: fp32 means fp32 here."""
    k_eps = GPTConfig().k_eps
    gen = torch.Generator().manual_seed(0)
    shapes = ((8, 256, 768, 4), (8, 256, 768), (8, 256, 768, 4))
    X, kt, GX = (torch.randn(*s, generator=gen).to(dev) for s in shapes)
    W, gamma = torch.randn(768, 4, generator=gen).to(dev) / 2, 1 + torch.randn(768, generator=gen).to(dev) / 2
    v, beta = 4 * torch.rand(8, 256, 4, generator=gen).to(dev), 2 * torch.rand(8, 256, generator=gen).to(dev)
    GC = torch.randn(8, 256, 768, generator=gen).to(dev)
    earlier_kt = [torch.randn(8, 256, 768, generator=gen).to(dev) for _ in range(3)]
    chain, origin = [], None
    step = reference = lambda *inputs: reference_step(*inputs, k_eps)
    if fused:
        fused_step = __import__("fused").step  # looked up here: torch.compile traces the call, not the import
        step = lambda *inputs: fused_step(*inputs, k_eps, True, origin, chain)[:2]  # erase, and the replay
    step = torch.compile(step, fullgraph=True) if use_compile else step  # a graph break raises
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            state, params = X.to(dtype), (W.to(dtype), gamma.to(dtype))
            if fused:  # the state three boundaries on from origin, and what the backward replays it from
                origin, chain = state, []
                with torch.no_grad():
                    for k_earlier in (k.to(dtype) for k in earlier_kt):
                        state, _, e, rk, _ = fused_step(state, k_earlier, v, beta, *params, k_eps, True)
                        chain += [k_earlier, rk, e, beta]
            results = []
            for f, ins in ((reference, [t.double() for t in (state, kt, v, beta, *params)]),
                           (step, [state, kt.to(dtype), v, beta, *params])):
                ins = [t.detach().requires_grad_() for t in ins]
                Xn, c = f(*ins)
                torch.autograd.backward((Xn, c), (GX.to(Xn.dtype), GC.to(c.dtype)))
                results.append([Xn, c] + [t.grad for t in ins])
            err = max(((b.double() - a).norm() / a.norm()).item() for a, b in zip(*results))
            print(f"k, Eq. 2.2, next read and norm as run{' (fused, replayed)' if fused else ''} vs float64 "
                  f"reference (2 outputs, 6 gradients), {dtype}: max relative error {err:.2e} "
                  f"(limit {tol:.0e})")
            if not err <= tol:
                raise RuntimeError(f"the {dtype} rewrite disagrees with the reference: {err:.2e} > {tol:.0e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

# kernel-name fragments and their group, first match wins: fused.py's kernels, then the libraries', then
# what torch.compile generated (inductor's Triton kernels, with the loss's own)
KERNEL_GROUPS = (("_step_fwd", "fused fwd"), ("_step_bwd", "fused bwd"), ("_weight_bwd", "fused W bwd"),
                 ("flash", "attention"), ("fmha", "attention"), ("cudnn", "attention"),
                 ("adam", "optimizer"), ("multi_tensor", "optimizer"),
                 ("nvjet", "matmul"), ("gemm", "matmul"), ("xmma", "matmul"), ("cutlass", "matmul"),
                 ("log_softmax", "loss"), ("nll_loss", "loss"), ("triton_", "inductor"))

def kernel_summary(events, steps, top=6):
    """From a Chrome trace's events, per step: the GPU's busy time (the union of the kernels' intervals;
    the rest of a step the GPU waits, on the host), the kernel launches, the kernel ms by group, and the
    `top` inductor kernels by ms (name: ms, launches): the other groups are one kind of kernel each, while
    inductor's names say which ops each one fuses, so they say where a variant's extra inductor time goes."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")
    busy, end, groups, names = 0.0, float("-inf"), {}, {}
    for start, stop, name in kernels:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        group = next((g for key, g in KERNEL_GROUPS if key in name.lower()), "other")
        groups[group] = groups.get(group, 0.0) + (stop - start) / 1000 / steps
        if group == "inductor":
            ms, n = names.get(name, (0.0, 0.0))
            names[name] = (ms + (stop - start) / 1000 / steps, n + 1 / steps)
    return dict(busy_ms=busy / 1000 / steps, launches=len(kernels) / steps, groups=groups,
                top=sorted(names.items(), key=lambda kv: -kv[1][0])[:top])

def profile_kernels(step, steps=3):
    """kernel_summary of `steps` calls of step under torch.profiler, on CUDA."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            return kernel_summary(json.load(f)["traceEvents"], steps)

def check_cpu_memory(mcfg, B, d_v):
    """On a CPU, refuse a size that would not fit in memory (the out-of-memory killer gives no message).
    A rough upper estimate: parameters with gradients and AdamW state, fp32 logits for the loss and
    its gradient, and about 40 saved fp32 activations of width d x d_v per layer and token."""
    n = B * mcfg.block_size
    need = (16 * 12 * mcfg.n_layer * mcfg.n_embd ** 2 + 16 * mcfg.vocab_size * mcfg.n_embd
            + n * 8 * mcfg.vocab_size + n * 160 * mcfg.n_layer * mcfg.n_embd * d_v)
    have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise ConfigError(f"bench on a CPU at this size needs about {need / 2**30:.0f} GiB and "
                          f"{have / 2**30:.0f} GiB are free: use --preset=smoke, a smaller --bench_batch "
                          "or a GPU")

def compile_counts():
    """torch._dynamo's counters so far: graph breaks and graphs compiled."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]

def steady_peak(dev, calls):
    """Peak GiB allocated on dev while calls run, from a reset after the warm-up: what training holds, its
    weights, optimizer state and activations, without what compiling and the first steps took once."""
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    for fn in calls:
        fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30

def held_memory(dev):
    """GiB allocated and reserved on dev before a variant is built, once Python's collector has freed what
    nothing reaches: a variant done before stays in a reference cycle (its counted calls hold it) until
    the collector runs, and freed in the middle of the next variant's measurement it lowered that
    variant's figures by its weights and optimizer state (about 1.4 GiB at 124m, 2026-12-07)."""
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev) / 2**30, torch.cuda.memory_reserved(dev) / 2**30

def peak_memory(dev, held, calls, graphs):
    """GiB above held: allocated at its peak over calls run once more after the warm-up (steady_peak), or
    under CUDA graphs at its peak over build and warm-up (a replay allocates nothing: its activations are
    in memory its capture took, and counted then); reserved at its peak over build and warm-up (the
    graphs' pools are reserved memory)."""
    reserved = torch.cuda.max_memory_reserved(dev) / 2**30 - held[1]
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if graphs else steady_peak(dev, calls)
    return peak - held[0], reserved

class Variant:
    """One variant built as train.py builds it, with its training step and inference forward on the fixed
    batch (x, y), warmed up; its peak memory above what the process held before it (peak_memory); its graph
    breaks from its build on, and the graphs its own calls compile after the warm-up."""
    def __init__(self, name, cfg, mcfg, dev, ctx, x, y):
        kind = name.removesuffix("+fused")  # fused.py: the expanded state, by name or by --fused
        self.fused = name in FUSED or (cfg.fused == "true" and kind + "+fused" in FUSED)
        self.name, before = kind + "+fused" * self.fused, compile_counts()
        if dev.type == "cuda":
            held = held_memory(dev)
        cfg = replace(cfg, fused="true" if self.fused else "false")  # the name says the path
        self.raw, model, opt = build(cfg, replace(mcfg, **VARIANTS[kind]), dev)
        graphs = cuda_graphs(cfg, dev)

        def infer():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), ctx:
                model(x, y)

        step = lambda: train_step(model, self.raw, opt, lambda: (x, y), 1, cfg.lr, cfg, ctx)
        for fn in [step] * WARM_UP + [infer] * WARM_UP:
            fn()
        self.mem = self.reserved = None
        if dev.type == "cuda":
            self.mem, self.reserved = peak_memory(dev, held, (step, infer), graphs)
        self.breaks, self.recompiles = compile_counts()[0] - before[0], 0
        self.step, self.infer = self.counted(step), self.counted(infer)

    def counted(self, fn):
        """fn, adding the graph breaks and the graphs compiled during each call to this variant's counts (the
        counters are the process's: the baseline's calls alternate with another variant's)."""
        def call():
            breaks, graphs = compile_counts()
            fn()
            self.breaks += compile_counts()[0] - breaks
            self.recompiles += compile_counts()[1] - graphs
        return call

    def row(self, train_ms, infer_ms, ratios, B, T, peak):
        """The table's row from this variant's timed calls and its ratios against the baseline."""
        med = float(np.median(train_ms))
        return dict(variant=self.name, params=self.raw.num_params(), train_ms=med, train_min=min(train_ms),
                    train_max=max(train_ms), train_tps=B * T / med * 1000, train_ratio=ratios[0],
                    infer_tps=B * T / float(np.median(infer_ms)) * 1000, infer_ratio=ratios[1],
                    mem_gib=self.mem, reserved_gib=self.reserved, breaks=self.breaks,
                    recompiles=self.recompiles, mfu=self.raw.flops_per_token(T) * B * T / med / 1e9 / peak)

def bench(cfg, mcfg, bcfg):
    """Training and inference throughput of each variant at mcfg's size against the additive baseline (or
    the first variant), timed in rounds that alternate the two; prints one table and returns its rows."""
    _, _, dev, ctx = setup(cfg)
    names = bcfg.bench_variants.split(",")
    fused = cfg.fused == "true" or any(n in FUSED for n in names)
    if fused and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # as fused.install
        raise ConfigError(f"--fused=true: device={dev.type!r} is not supported: fused.py's kernels need cuda "
                          "(or TRITON_INTERPRET=1 on the CPU: for tests, over 100 s a step at the smoke "
                          "size)")
    if bcfg.bench_profile and dev.type != "cuda":
        raise ConfigError(f"--bench_profile=true profiles GPU kernels: device={dev.type!r} runs none "
                          "(use cuda)")
    B, T = bcfg.bench_batch, mcfg.block_size
    if dev.type == "cpu":
        check_cpu_memory(mcfg, B, max(VARIANTS[n.removesuffix("+fused")]["d_v"] for n in names))
    peak = matmul_peak_tflops(dev)
    check_fast_path(dev, compiled(cfg, dev), False)
    if fused:
        check_fast_path(dev, False, True)
    # the baseline stays built beside each variant: up to 4 compiled graphs of one code at a time, and the
    # variants done before: more than torch._dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(names))
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.randint(0, mcfg.vocab_size, (B, T), generator=gen).to(dev) for _ in range(2))
    base_name = "additive" if "additive" in names else names[0]
    base = Variant(base_name, cfg, mcfg, dev, ctx, x, y)
    if base.mem is not None:  # its row comes last: the memory now, in case the run is cut short
        print(f"{base.name} (the baseline): peak {base.mem:.2f} GiB, {base.reserved:.2f} GiB reserved",
              flush=True)
    timed, rows = {}, []  # timed: per variant, its (train ms, infer ms) and its per-round ratios
    for n in names:
        if n == base_name:
            continue
        v = Variant(n, cfg, mcfg, dev, ctx, x, y)
        b_train, v_train, b_infer, v_infer = time_rounds([base.step, v.step, base.infer, v.infer],
                                                         bcfg.bench_steps, dev)
        timed.setdefault(base_name, ([], []))[0].extend(b_train)
        timed[base_name][1].extend(b_infer)
        rows.append(report(v, v.row(v_train, v_infer, (round_ratio(b_train, v_train),
                                                         round_ratio(b_infer, v_infer)), B, T, peak), bcfg))
        del v
    if base_name not in timed:  # the baseline alone
        timed[base_name] = time_rounds([base.step, base.infer], bcfg.bench_steps, dev)
    base_row = report(base, base.row(*timed[base_name], (1.0, 1.0), B, T, peak), bcfg)
    rows.insert(names.index(base_name), base_row)
    print_table(rows, base_row, dev, peak, B, T, cfg.compile_mode if compiled(cfg, dev) else None,
                bcfg.bench_steps)
    return rows

def report(variant, row, bcfg):
    """Print a variant's line as soon as it is measured (kept if the run is cut short), with its profile."""
    print(f"{row['variant']}: {row['train_ms']:.1f} ms/step ({row['train_min']:.1f}-{row['train_max']:.1f}), "
          f"{row['train_ratio']:.3f}x the baseline" + (f", peak {row['mem_gib']:.2f} GiB" if row["mem_gib"]
                                                       else ""), flush=True)
    if bcfg.bench_profile:
        p = row["profile"] = profile_kernels(variant.step)
        row["host_share"] = max(0.0, 1 - p["busy_ms"] / row["train_ms"])  # the GPU idle, waiting on the host
        groups = sorted(p["groups"].items(), key=lambda kv: -kv[1])
        print(f"  GPU busy {p['busy_ms']:.1f} ms per step ({100 * row['host_share']:.0f}% of the median step "
              f"waits on the host), {p['launches']:.0f} kernel launches; kernel ms: "
              + ", ".join(f"{g} {ms:.2f}" for g, ms in groups), flush=True)
        print("  longest inductor kernels, ms (launches) per step: "
              + ", ".join(f"{name} {ms:.2f} ({n:.0f})" for name, (ms, n) in p["top"]), flush=True)
    return row

def print_table(rows, base, dev, peak, B, T, mode, rounds):
    """The table: per variant its median step and spread, speed against the baseline row `base` (the median
    of per-round ratios), peak memory allocated and reserved (peak_memory; a variant may reuse what an
    earlier one reserved), graph breaks and graphs compiled after the warm-up, and the host's share."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    unit = "bf16" if dev.type == "cuda" else "fp32"
    print(f"\n{name} | {unit} matmul peak {peak:.2f} TFLOP/s | micro-batch {B} x {T} | compile "
          f"{mode or 'off'} | ratios against {base['variant']}: median of {rounds} interleaved rounds")
    print(f"{'variant':11} {'params':>12} {'ms/step':>8} {'min-max ms':>13} {'train tok/s':>12} {'ratio':>6} "
          f"{'infer tok/s':>12} {'ratio':>6} {'mem GiB':>8} {'ratio':>6} {'resv GiB':>8} {'MFU':>6} "
          f"{'breaks':>6} {'recomp':>6}" + (f" {'host':>5}" if "host_share" in base else ""))
    for r in rows:
        mem = (f"{r['mem_gib']:8.2f} {r['mem_gib'] / base['mem_gib']:6.3f} {r['reserved_gib']:8.2f}"
               if r["mem_gib"] else f"{'n/a':>8} {'':6} {'n/a':>8}")
        spread = f"{r['train_min']:.1f}-{r['train_max']:.1f}"
        print(f"{r['variant']:11} {r['params']:12,} {r['train_ms']:8.1f} {spread:>13} "
              f"{r['train_tps']:12,.0f} "
              f"{r['train_ratio']:6.3f} {r['infer_tps']:12,.0f} {r['infer_ratio']:6.3f} {mem} "
              f"{100 * r['mfu']:5.1f}% {r['breaks']:6d} {r['recompiles']:6d}"
              + (f" {100 * r['host_share']:4.0f}%" if "host_share" in r else ""))

if __name__ == "__main__":
    try:
        bench(*parse_args(sys.argv[1:], (TrainConfig, GPTConfig, BenchConfig), __doc__))
    except ConfigError as e:
        sys.exit(f"bench.py: error: {e}")
