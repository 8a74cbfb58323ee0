"""
Throughput of every DDL variant against the additive baseline, in one process on one device.

    python bench.py --preset=124m                       # every variant, one GPU, unfused
    python bench.py --preset=124m --fused=true --bench_batch=30 --bench_variants=additive,delta,cc
                                                        # the README's table
    python bench.py --preset=124m --bench_variants=additive,cc --bench_batch=32
    python bench.py --preset=smoke --bench_steps=3      # the code path on a CPU
    python bench.py --preset=124m --bench_profile=true --bench_variants=additive,delta
                                                        # where each step's GPU time goes

First the measured bf16 matmul peak and a check of one sublayer boundary as the model runs it (k
from k~, Eq. 2.2, the next CC read and its norm; in bf16 and fp32, compiled or fused) against
float64; then, per variant, full training steps (train.py's build and train_step: forward, backward,
clip, AdamW) and forwards with targets under no_grad (inference), on a fixed random batch, median of
bench_steps after 3 warm-up calls. Takes train.py's and GPTConfig's keys too.
"""
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
from train import TrainConfig, build, parse_args, setup, train_step

VARIANTS = {
    "additive": dict(residual="additive", d_v=1),
    "delta": dict(residual="delta", d_v=1),
    "cc": dict(residual="delta", d_v=4, compressor="cc", embed_conv=True),
    "tc": dict(residual="delta", d_v=4, compressor="tc", embed_conv=True),
    "write": dict(residual="write", d_v=4, compressor="cc", embed_conv=True),
}

@dataclass
class BenchConfig:
    bench_batch: int = setting(16, "micro-batch of the timed steps")
    bench_steps: int = setting(20, "timed steps per variant")
    bench_variants: str = setting(",".join(VARIANTS), "comma-separated, from " + ", ".join(VARIANTS))
    bench_profile: bool = setting(False, "CUDA: also profile 3 training steps per variant (torch.profiler): "
                                         "GPU busy time, kernel launches, kernel time by group")

    def __post_init__(self):
        for key in ("bench_batch", "bench_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key}={getattr(self, key)!r}: must be >= 1")
        for name in self.bench_variants.split(","):
            if name not in VARIANTS:
                raise ConfigError(f"--bench_variants: unknown variant {name!r}; allowed: "
                                  f"{', '.join(VARIANTS)}")

def time_ms(fn, steps, dev):
    """Median wall time of fn in ms over steps calls after 3 warm-up calls (compilation), with the
    device synchronised before every clock read."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))

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
    """The step as the model runs it (compiled on CUDA, or fused.step with --fused; state in bf16 or
    fp32, v and beta in fp32) against reference_step in float64 on random inputs: both outputs and the
    gradients of X, k~, v, beta, W and gamma. Prints the largest relative error; fails beyond 1e-2 (bf16) /
    1e-5 (fp32). TF32 is off meanwhile: fp32 means fp32 here."""
    k_eps = GPTConfig().k_eps
    if fused:
        step = lambda *inputs: __import__("fused").step(*inputs, True)[:2]  # inputs end with k_eps; erase
    else:
        step = torch.compile(reference_step) if use_compile else reference_step
    gen = torch.Generator().manual_seed(0)
    shapes = ((8, 256, 768, 4), (8, 256, 768), (8, 256, 768, 4))
    X, kt, GX = (torch.randn(*s, generator=gen).to(dev) for s in shapes)
    W, gamma = torch.randn(768, 4, generator=gen).to(dev) / 2, 1 + torch.randn(768, generator=gen).to(dev) / 2
    v, beta = 4 * torch.rand(8, 256, 4, generator=gen).to(dev), 2 * torch.rand(8, 256, generator=gen).to(dev)
    GC = torch.randn(8, 256, 768, generator=gen).to(dev)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            results = []
            for f, ins in ((reference_step, [t.double() for t in (X, kt, v, beta, W, gamma)]),
                           (step, [X.to(dtype), kt.to(dtype), v, beta, W.to(dtype), gamma.to(dtype)])):
                ins = [t.detach().requires_grad_() for t in ins]
                Xn, c = f(*ins, k_eps)
                torch.autograd.backward((Xn, c), (GX.to(Xn.dtype), GC.to(c.dtype)))
                results.append([Xn, c] + [t.grad for t in ins])
            err = max(((b.double() - a).norm() / a.norm()).item() for a, b in zip(*results))
            print(f"k, Eq. 2.2, next read and norm as run{' (fused)' if fused else ''} vs float64 reference "
                  f"(2 outputs, 6 gradients), {dtype}: max relative error {err:.2e} (limit {tol:.0e})")
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

def kernel_summary(events, steps):
    """From a Chrome trace's events, per step: the GPU's busy time (the union of the kernels' intervals;
    the rest of a step the GPU waits, on the host), the kernel launches and the kernel ms by group."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")
    busy, end, groups = 0.0, float("-inf"), {}
    for start, stop, name in kernels:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        group = next((g for key, g in KERNEL_GROUPS if key in name.lower()), "other")
        groups[group] = groups.get(group, 0.0) + (stop - start) / 1000 / steps
    return dict(busy_ms=busy / 1000 / steps, launches=len(kernels) / steps, groups=groups)

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

def bench(cfg, mcfg, bcfg):
    """Training and inference throughput of each variant at mcfg's size against the additive
    baseline (or the first variant); prints one table and returns its rows."""
    _, _, dev, ctx = setup(cfg)
    if cfg.fused and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # as fused.install
        raise ConfigError(f"--fused=true: device={dev.type!r} is not supported: fused.py's kernels need cuda "
                          "(or TRITON_INTERPRET=1 on the CPU)")
    if bcfg.bench_profile and dev.type != "cuda":
        raise ConfigError(f"--bench_profile=true profiles GPU kernels: device={dev.type!r} runs none "
                          "(use cuda)")
    B, T = bcfg.bench_batch, mcfg.block_size
    names = bcfg.bench_variants.split(",")
    if dev.type == "cpu":
        check_cpu_memory(mcfg, B, max(VARIANTS[n]["d_v"] for n in names))
    peak = matmul_peak_tflops(dev)
    check_fast_path(dev, cfg.compile and dev.type == "cuda", cfg.fused)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.randint(0, mcfg.vocab_size, (B, T), generator=gen).to(dev) for _ in range(2))
    rows = []
    for n in names:
        fused = cfg.fused and VARIANTS[n].get("compressor") == "cc"  # fused.py: the expanded state with CC
        raw, model, opt = build(replace(cfg, fused=fused), replace(mcfg, **VARIANTS[n]), dev)

        def infer():
            with torch.no_grad(), ctx:
                model(x, y)

        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        step = lambda: train_step(model, raw, opt, lambda: (x, y), 1, cfg.lr, cfg, ctx)
        train_ms = time_ms(step, bcfg.bench_steps, dev)
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        infer_ms = time_ms(infer, bcfg.bench_steps, dev)
        fpt = raw.flops_per_token(T)
        rows.append(dict(variant=n + "+fused" * fused, params=raw.num_params(), train_ms=train_ms,
                         train_tps=B * T / train_ms * 1000, infer_tps=B * T / infer_ms * 1000, mem_gib=mem,
                         mfu=fpt * B * T / train_ms / 1e9 / peak))
        print(f"{rows[-1]['variant']}: {train_ms:.1f} ms/step, {infer_ms:.1f} ms/forward"
              + (f", peak {mem:.2f} GiB" if mem else ""), flush=True)  # kept if cut short
        if bcfg.bench_profile:
            p = rows[-1]["profile"] = profile_kernels(step)
            groups = sorted(p["groups"].items(), key=lambda kv: -kv[1])
            print(f"  GPU busy {p['busy_ms']:.1f} ms per step, {p['launches']:.0f} kernel launches; "
                  "kernel ms: " + ", ".join(f"{g} {ms:.2f}" for g, ms in groups), flush=True)
        del raw, opt, model
        torch._dynamo.reset()  # a fresh compile cache per variant, so none hits the recompile limit
    print_table(rows, dev, peak, B, T, cfg.compile and dev.type == "cuda")
    return rows

def print_table(rows, dev, peak, B, T, compiled):
    base = next((r for r in rows if r["variant"] == "additive"), rows[0])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    unit = "bf16" if dev.type == "cuda" else "fp32"
    print(f"\n{name} | {unit} matmul peak {peak:.2f} TFLOP/s | micro-batch {B} x {T} | compile {compiled} | "
          f"ratios against {base['variant']}")
    print(f"{'variant':11} {'params':>12} {'ms/step':>8} {'train tok/s':>12} {'ratio':>6} "
          f"{'infer tok/s':>12} {'ratio':>6} {'mem GiB':>8} {'ratio':>6} {'MFU':>6}")
    for r in rows:
        mem = (f"{r['mem_gib']:8.2f} {r['mem_gib'] / base['mem_gib']:6.3f}" if r["mem_gib"]
               else f"{'n/a':>8} {'':6}")
        print(f"{r['variant']:11} {r['params']:12,} {r['train_ms']:8.1f} {r['train_tps']:12,.0f} "
              f"{r['train_tps'] / base['train_tps']:6.3f} {r['infer_tps']:12,.0f} "
              f"{r['infer_tps'] / base['infer_tps']:6.3f} {mem} {100 * r['mfu']:5.1f}%")

if __name__ == "__main__":
    try:
        bench(*parse_args(sys.argv[1:], (TrainConfig, GPTConfig, BenchConfig), __doc__))
    except ConfigError as e:
        sys.exit(f"bench.py: error: {e}")
