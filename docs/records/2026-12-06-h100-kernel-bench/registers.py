"""
Registers and stack (spills) of fused.py's forward and backward kernels, compiled for an H100 (sm_90) on
the CPU, no GPU needed: Triton's compiler and its bundled cuobjdump. A proxy to compare versions of the
kernels before a device is at hand (it does not time them): at the 124m size's boundary (d = 768,
d_v = 4, bf16 state, with the norm and the erase term), 1 and 4 tokens a program (a backward with
BWD_TOKENS: 1 and that many), 0 and 3 replayed boundaries, 4, 8 and 16 warps; TILE 1 where there is one.

    python docs/records/2026-12-06-h100-kernel-bench/registers.py fused.py [another/fused.py ...]
"""
import importlib.util
import os
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, ".")  # ddl.py, which fused.py imports
import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BF16 = {"X", "KT", "XN", "C", "GXN", "GC", "K1", "K2", "K3", "G_X", "G_KT"}  # the state and (B, T, d) tensors

def signature(fn, consts):
    kind = lambda a: ("constexpr" if a in consts else "i32" if a == "n_tok" else
                      "fp32" if a in ("k_eps2", "k_scale") else "*bf16" if a in BF16 else "*fp32")
    return {a: kind(a) for a in fn.arg_names}

def usage(fn, consts, warps):
    kernel = triton.compile(ASTSource(fn, signature(fn, consts), consts), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    path = "/tmp/registers.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split(":") for part in next(l for l in out.splitlines() if "REG:" in l).split())
    return int(fields["REG"]), int(fields["STACK"])

for file in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("fused", file)
    fused = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fused)
    for name, chains in (("_step_fwd", (None,)), ("_step_bwd", (0, 3))):
        fn = getattr(fused, name).fn
        for n_chain in chains:
            for tokens in (1, 4):
                consts = dict(d=768, d_v=4, ERASE=True, NORM=True, TOKENS=tokens, BLOCK_D=1024, BLOCK_V=4)
                consts.update({k: v for k, v in (("TILE", 1), ("N_CHAIN", n_chain)) if k in fn.arg_names})
                if name == "_step_bwd" and "BWD_TOKENS" in vars(fused):
                    consts["TOKENS"] = fused.BWD_TOKENS if tokens == 4 else 1
                row = ", ".join("%d warps: %d regs, %d B stack" % (w, *usage(fn, consts, w))
                                for w in (4, 8, 16))
                chain = "" if n_chain is None else f", N_CHAIN {n_chain}"
                print(f"{file} {name} TOKENS {consts['TOKENS']}{chain}: {row}", flush=True)
