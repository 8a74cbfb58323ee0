"""fused.install's check (fused.check_against_ddl) at d_v = 1, the 124m shape, redone in Triton's
interpreter on the CPU with every parameter's error printed: the six largest (relative to the gradient's
largest entry, as the check measures) and the b_v's of the first three blocks. Needs branch
issue30-dv1b's fused.py (d_v = 1 through the kernels); run from a checkout of that branch (about 50 s on
2 cores):

    python docs/records/2026-12-06-five-variants/dv1_cpu_check.py
"""
import copy
import os
import sys
import time
import types

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ".")
import torch
import fused
from ddl import GPT, GPTConfig
torch.manual_seed(0)
cfg = GPTConfig(residual="delta", d_v=1)  # the 124m shape
gpt = GPT(cfg)
gen = torch.Generator().manual_seed(0)
ref = copy.deepcopy(gpt).float()
with torch.no_grad():
    for p in ref.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
idx = torch.randint(0, cfg.vocab_size, (1, 4), generator=gen)
res = []
t0 = time.time()
for body in (type(gpt).body, fused.fused_body):
    ref.body = types.MethodType(body, ref)
    ref.zero_grad(set_to_none=True)
    loss = ref(idx[:, :-1], idx[:, 1:]); loss.backward()
    res.append({"loss": loss.detach(), **{n: p.grad.clone() for n, p in ref.named_parameters()}})
print("time", round(time.time() - t0, 1))
errs = []
for n, want in res[0].items():
    got = res[1][n]
    scale = want.abs().max().item()
    errs.append(((got - want).abs().max().item() / (scale + 1e-12), n, scale))
errs.sort()
for e in errs[-6:]: print(f"{e[0]:.2e} {e[1]} |max| {e[2]:.2e}")
print("b_v, by layer:", [f"{e:.1e}" for e, n, _ in sorted(errs, key=lambda x: list(res[0]).index(x[1]))
                         if n.endswith("b_v")][:6])
