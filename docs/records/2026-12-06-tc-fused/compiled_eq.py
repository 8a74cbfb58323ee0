"""Device check of the fused path for one compressor: fused.py compiled (its kernels launched by inductor,
with SEGMENT's replay) against ddl.py compiled, both with fullgraph=True, on one batch of a 4-layer d = 256
model away from its init: the loss and every parameter's gradient. fp32 (TF32 off) must agree to 1e-4
(relative); under bf16 autocast each is compared with ddl.py in fp32, to compare their rounding.

    PYTHONPATH=. python3 docs/records/2026-12-06-tc-fused/compiled_eq.py tc      # or cc
"""
import copy
import sys

import torch

import fused
from ddl import GPT, GPTConfig

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
cfg = GPTConfig(n_embd=256, n_layer=4, n_head=2, head_dim=128, residual="delta", d_v=4,
                compressor=sys.argv[1], embed_conv=True, block_size=256)
torch.manual_seed(0)
base = GPT(cfg).cuda()
with torch.no_grad():
    for p in base.parameters():
        p.add_(0.05 * torch.randn_like(p))
idx = torch.randint(0, cfg.vocab_size, (8, 257), device="cuda")
res = {}
for path in ("ddl", "fused"):
    for amp in (False, True):
        m = copy.deepcopy(base)
        if path == "fused":
            fused.install(m)
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            loss = torch.compile(m, fullgraph=True)(idx[:, :-1], idx[:, 1:])
        loss.backward()
        res[path, amp] = [loss.detach()] + [p.grad for p in m.parameters()]


def err(a, b):
    return max(((x - y).norm() / (y.norm() + 1e-30)).item() for x, y in zip(res[a], res[b]))


e32 = err(("fused", False), ("ddl", False))
print(sys.argv[1], "fp32 fused vs ddl: max rel err (loss, every grad)", f"{e32:.2e}")
print(sys.argv[1], "bf16 ddl vs fp32 ddl", f"{err(('ddl', True), ('ddl', False)):.2e}",
      "| bf16 fused vs fp32 ddl", f"{err(('fused', True), ('ddl', False)):.2e}",
      "| losses", [round(res[k][0].item(), 5) for k in res])
names = ["loss"] + [n for n, _ in base.named_parameters()]
for path in ("ddl", "fused"):  # the three worst of bf16's errors, by name, with the gradient's size
    errs = sorted((((x - y).norm() / (y.norm() + 1e-30)).item(), n, y.norm().item())
                  for n, x, y in zip(names, res[path, True], res["ddl", False]))
    print(sys.argv[1], f"bf16 {path}: worst", [(n, f"{e:.2e}", f"|g| {g:.1e}") for e, n, g in errs[-3:]])
raise SystemExit(0 if e32 < 1e-4 else 1)
