"""Branch issue30-dv1b at 0b0f752 (fused.install's check against float64): that check at d_v = 1, the 124m
shape, in Triton's interpreter on the CPU, each quantity's error against float64 printed beside ddl.py's own
fp32 error, as a share of the check's bound max(1e-4, 10 x ddl.py's); the five nearest their bound. Run from
a checkout of that branch (about 90 s on 2 cores):

    python docs/records/2026-12-06-five-variants/dv1_check_margin.py
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ".")
import torch  # noqa: E402
import fused  # noqa: E402
from ddl import GPT, GPTConfig  # noqa: E402
rows = []
def spy(want, ddl32, fused32, tol):
    for n, w in want.items():
        scale = w.abs().max().item() + 1e-12
        own, err = ((r[n].double() - w).abs().max().item() / scale for r in (ddl32, fused32))
        rows.append((err / max(tol, 10 * own), n, err, own))
    return None
fused.first_disagreement = spy
torch.manual_seed(0)
fused.check_against_ddl(GPT(GPTConfig(residual="delta", d_v=1)))
rows.sort()
for r in rows[-5:]: print(f"{r[0]:.2f} of the bound: {r[1]} err {r[2]:.1e} ddl.py's own {r[3]:.1e}")
