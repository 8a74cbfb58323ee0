# Device probe: can torch.compile (inductor, fullgraph) trace a triton_op whose autotuned kernel takes a
# tuple of tensors, and one with a registered autograd? Prints one line per case.
import torch, triton, triton.language as tl
from torch.library import triton_op, wrap_triton

@triton.autotune([triton.Config(dict(B=64), num_warps=w) for w in (2, 4)], key=["n"])
@triton.jit
def k_tuple(X, CH, Y, n, N: tl.constexpr, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    x = tl.load(X + o, mask=o < n)
    for s in tl.static_range(N):
        x += tl.load(CH[s] + o, mask=o < n)
    tl.store(Y + o, x, mask=o < n)

@triton_op("probe::tup", mutates_args=())
def tup(x: torch.Tensor, ch: list[torch.Tensor]) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    wrap_triton(k_tuple)[lambda m: (triton.cdiv(n, m["B"]),)](x, tuple(ch), y, n, len(ch))
    return y

@triton.jit
def k_scale(X, Y, n, a, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(Y + o, a * tl.load(X + o, mask=o < n), mask=o < n)

@triton_op("probe::scale", mutates_args=())
def scale(x: torch.Tensor, a: float) -> torch.Tensor:
    y = torch.empty_like(x)
    wrap_triton(k_scale)[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), a, B=64)
    return y

def _setup(ctx, inputs, output):
    ctx.a = inputs[1]
def _bwd(ctx, g):
    return scale(g, ctx.a), None
scale.register_autograd(_bwd, setup_context=_setup)

x = torch.randn(1000, device="cuda")
ch = [torch.randn(1000, device="cuda") for _ in range(3)]
for name, f, want in (("tuple arg", lambda x: tup(x, ch) * 2, 2 * (x + sum(ch))),):
    try:
        got = torch.compile(f, fullgraph=True)(x)
        print(name, "compiled: max err", (got - want).abs().max().item())
    except Exception as e:
        print(name, "FAILED:", type(e).__name__, str(e).splitlines()[0][:300])
xr = x.clone().requires_grad_()
try:
    y = torch.compile(lambda x: scale(x, 3.0).sin().sum(), fullgraph=True)(xr)
    y.backward()
    print("autograd compiled: grad err", (xr.grad - 3 * torch.cos(3 * x)).abs().max().item())
except Exception as e:
    print("autograd FAILED:", type(e).__name__, str(e).splitlines()[0][:300])
