"""CPU sampling speed, smoke model (random init), before (full recompute per token) and after (cache)."""
import time

import torch

from ddl import GPT, GPTConfig

import train
_, mcfg = train.parse_args(["--preset=smoke"])
torch.manual_seed(0)
m = GPT(mcfg).eval()
def uncached(p, n):
    for _ in range(n):
        p = torch.cat([p, m.sample(m(p[:, -mcfg.block_size:])[:, -1, :50257], 0.8, 200)], 1)
    return p
for B in (1, 8):
    for n in (48, 256):
        p = torch.randint(0, 50257, (B, 16))
        with torch.no_grad():
            m.generate(p, 4, temperature=0.8, top_k=200)
            uncached(p, 4)
            t = time.perf_counter()
            m.generate(p, n, temperature=0.8, top_k=200, n_vocab=50257)
            new = time.perf_counter() - t
            t = time.perf_counter()
            uncached(p, n)
            old = time.perf_counter() - t
        print(f"batch {B}, {n} new tokens (block_size {mcfg.block_size}): before {B*n/old:,.0f} tok/s, "
              f"now {B*n/new:,.0f} tok/s, x{old/new:.2f}", flush=True)
