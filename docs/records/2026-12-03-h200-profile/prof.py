"""Lab script of the 2026-12-03 profile record (wrapped to 110 columns after the run, nothing else
changed). Where a training step's time goes, per variant (torch.profiler, kernel names grouped), and the
fused kernels alone against their memory-traffic floor. Prints text; writes JSON rows to $OUT."""
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
from bench import VARIANTS  # noqa: E402
from ddl import GPTConfig  # noqa: E402
from train import TrainConfig, build, setup, train_step  # noqa: E402

M124 = dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, block_size=1024)
OUT = os.environ.get("OUT", "/tmp")


def group(name):
    n = name.lower()
    for key, label in (("_step_fwd", "fused fwd"), ("_step_bwd", "fused bwd"), ("_weight_bwd", "fused W bwd"),
                       ("flash", "attention"), ("fmha", "attention"), ("cudnn", "attention"),
                       ("adam", "optimizer"), ("multi_tensor", "optimizer"), ("foreach", "optimizer"),
                       ("nvjet", "matmul"), ("gemm", "matmul"), ("xmma", "matmul"), ("cutlass", "matmul"),
                       ("cross_entropy", "loss"), ("nll", "loss"), ("log_softmax", "loss")):
        if key in n:
            return label
    if n.startswith("triton_"):
        return "inductor"
    return "other"


def profile_steps(step, steps):
    """Per step: wall ms, GPU busy ms (union of kernel intervals), kernel ms by name and group, launches."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1000 / steps
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    by_name, by_group = defaultdict(float), defaultdict(float)
    count = defaultdict(int)
    for e in kernels:
        by_name[e["name"][:90]] += e["dur"] / 1000 / steps
        count[e["name"][:90]] += 1
        by_group[group(e["name"])] += e["dur"] / 1000 / steps
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, -1e30
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return dict(wall_ms=wall, busy_ms=busy / 1000 / steps, kernel_ms=sum(by_group.values()),
                launches=len(kernels) / steps, groups=dict(by_group),
                top=sorted(((v, count[k] / steps, k) for k, v in by_name.items()), reverse=True)[:25])


def profile_variants(names, B):
    cfg = replace(TrainConfig(), compile=True)
    _, _, dev, ctx = setup(cfg)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50304, (B, 1024), generator=gen).to(dev) for _ in range(2))
    rows = []
    for n in names:
        fused = "+fused" in n
        if "segment" in n:
            __import__("fused").SEGMENT = int(n.split("segment")[1])
        kw = VARIANTS[n.split("+")[0]]
        torch.cuda.reset_peak_memory_stats()
        raw, model, opt = build(replace(cfg, fused=fused), replace(GPTConfig(**M124), **kw), dev)
        step = lambda: train_step(model, raw, opt, lambda: (x, y), 1, cfg.lr, cfg, ctx)
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        plain = (time.perf_counter() - t) * 100
        r = dict(variant=n, batch=B, plain_ms=plain, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                 **profile_steps(step, 3))
        print(f"\n== {n} B={B}: {plain:.1f} ms/step unprofiled, peak {r['peak_gib']:.2f} GiB; "
              f"profiled wall {r['wall_ms']:.1f}, GPU busy {r['busy_ms']:.1f}, "
              f"kernels {r['kernel_ms']:.1f} ms, "
              f"{r['launches']:.0f} launches/step")
        groups = sorted(r["groups"].items(), key=lambda a: -a[1])
        print("   groups: " + ", ".join(f"{k} {v:.2f}" for k, v in groups))
        for ms, c, name in r["top"]:
            print(f"   {ms:7.3f} ms {c:5.0f}x  {name}")
        rows.append(r)
        with open(os.path.join(OUT, f"prof_B{B}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        del raw, model, opt
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rows


def kernels_alone(B):
    """fused.step forward and backward alone on a (B*1024, 768, 4) bf16 state, against the bytes they
    must move."""
    import fused
    dev = torch.device("cuda")
    n, d, d_v = B * 1024, 768, 4
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(n, d, d_v, device=dev, generator=g).bfloat16()
    kt = torch.randn(n, d, device=dev, generator=g).bfloat16()
    v, beta = 4 * torch.rand(n, d_v, device=dev, generator=g), 2 * torch.rand(n, device=dev, generator=g)
    W, gamma = torch.rand(d, d_v, device=dev, generator=g).bfloat16(), torch.ones(d, device=dev).bfloat16()
    GX, GC = torch.randn_like(X), torch.randn_like(kt)

    def timed(fn, reps=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    state = n * d * d_v * 2
    fwd = timed(lambda: fused.step(X, kt, v, beta, W, gamma, 1e-5, True))
    Xn, c, e, rk, rstd = fused.step(X, kt, v, beta, W, gamma, 1e-5, True)
    bwd = timed(lambda: fused.step_backward(GX, GC, X, [], kt, e, beta, W, gamma, rk, rstd, True))
    chain3 = [kt, rk, e, beta] * 3
    bwd3 = timed(lambda: fused.step_backward(GX, GC, X, chain3, kt, e, beta, W, gamma, rk, rstd, True))
    print(f"   backward replaying 3 boundaries: {bwd3:.3f} ms (none: {bwd:.3f})")
    copy = timed(lambda: X.clone())
    rows = dict(tokens=n, fwd_ms=fwd, bwd_ms=bwd, bwd_chain3_ms=bwd3, clone_ms=copy,
                fwd_floor_ms=2 * state / (2 * state / copy) if copy else None,
                best=str({k.fn.__name__: str(k.best_config) for k in
                          (fused._step_fwd, fused._step_bwd, fused._weight_bwd)
                          if hasattr(k, "best_config")}))
    print(f"\n== fused kernels alone, {n} tokens: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms; "
          "a clone of the state "
          f"(read + write {2 * state / 2**20:.0f} MiB) {copy:.3f} ms = {2 * state / copy / 1e6:.0f} GB/s; "
          f"fwd moves ~2 states, bwd ~4 (G, X, g_X; X again for W)\n   chosen: {rows['best']}")
    # per-launch host cost: the same op on 1 token
    one = [t[:1] for t in (X, kt, v, beta)]
    tiny = timed(lambda: fused.step(*one, W, gamma, 1e-5, True), 200)
    t0 = time.perf_counter()
    for _ in range(200):
        fused.step(*one, W, gamma, 1e-5, True)
    host = (time.perf_counter() - t0) / 200 * 1000
    torch.cuda.synchronize()
    print(f"   1-token step: {tiny * 1000:.0f} us per call on the GPU clock, {host * 1000:.0f} us host time")
    rows.update(tiny_us=tiny * 1000, host_us=host * 1000)
    return rows


if __name__ == "__main__":
    task = sys.argv[1]
    rows = []
    if task in ("kernels", "all"):
        rows.append(kernels_alone(16))
    if task in ("profile", "all"):
        rows += profile_variants(sys.argv[2].split(","), int(sys.argv[3]))
    with open(os.path.join(OUT, f"prof_{task}.json"), "w") as f:
        json.dump(rows, f, indent=1)
