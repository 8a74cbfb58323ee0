"""
GPU time of fused.py's kernels alone, at the 124m size's boundary (micro-batch 16 x 1024 tokens, d = 768,
d_v = 4, bf16 state): one forward and backward of fused.step per chain length 0-3 (what SEGMENT 4 runs),
timed by torch.profiler over 20 rounds; and a copy of the state, the rate they are measured against.
One process per fused.py (its ops register one name), so to compare two versions on one card:

    PYTHONPATH=. python docs/records/2026-12-06-h100-kernel-bench/kernel_bench.py fused.py  # then another
"""
import importlib.util
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")  # ddl.py, which fused.py imports
spec = importlib.util.spec_from_file_location("fused", sys.argv[1])
fused = importlib.util.module_from_spec(spec)
sys.modules["fused"] = fused
spec.loader.exec_module(fused)

B, T, d, d_v, ROUNDS = 16, 1024, 768, 4, 20
dev, bf16 = torch.device("cuda"), torch.bfloat16
gen = torch.Generator(device=dev).manual_seed(0)
rand = lambda *shape, dtype=bf16: torch.randn(*shape, generator=gen, device=dev).to(dtype)
X, kt, W, gamma = rand(B, T, d, d_v), rand(B, T, d), rand(d, d_v) / 2, 1 + rand(d) / 2
v, beta = 4 * torch.rand(B, T, d_v, device=dev), 2 * torch.rand(B, T, device=dev)
gX, gc = rand(B, T, d, d_v), rand(B, T, d)
chain = [rand(B, T, d), torch.rand(B, T, device=dev) + 0.5, rand(B, T, d_v, dtype=torch.float32), beta]

def one_round():
    for n in range(4):  # chain lengths 0..3: a segment of SEGMENT = 4 boundaries
        ins = [t.detach().requires_grad_() for t in (X, kt, v, beta, W, gamma)]
        Xn, c, *_ = fused.step(*ins, 1e-5, True, X if n else None, chain * n)
        torch.autograd.backward((Xn, c), (gX, gc))

for _ in range(3):  # autotune and warm up
    one_round()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(ROUNDS):
        one_round()
    torch.cuda.synchronize()
times = defaultdict(float)
for ev in prof.events():
    if ev.device_type == torch.autograd.DeviceType.CUDA:
        key = next((k for k in ("_step_fwd", "_step_bwd", "_weight_bwd") if k in ev.name), "other")
        times[key] += ev.device_time / 1000 / ROUNDS
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(ROUNDS):
    X.clone()  # a copy of the state: reads and writes it once
end.record()
torch.cuda.synchronize()
times["copy of X"] = start.elapsed_time(end) / ROUNDS
print(torch.cuda.get_device_name(dev), sys.argv[1])
for key, ms in sorted(times.items()):
    per = ms if key == "copy of X" else ms / 4  # per boundary
    print(f"{key:12} {1000 * per:7.1f} us per boundary (4 boundaries a round: chain 0-3)")
