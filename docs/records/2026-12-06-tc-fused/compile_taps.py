"""fused.py's kernels with TC's taps (K = 1, 4, 8), compiled for an H100 (sm_90) on the CPU: that they
compile, and their registers and stack (spills) at the 124m size's boundary (d = 768, d_v = 4, bf16 state,
no norm, the erase term, 3 replayed boundaries), for two autotune configs each. No GPU, no timing.

    python docs/records/2026-12-06-tc-fused/compile_taps.py fused.py
"""
import importlib.util
import os
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BF16 = {"X", "KT", "XN", "C", "GXN", "GC", "K1", "K2", "K3", "G_X", "G_KT"}
CONFIGS = (("_step_fwd", dict(TOKENS=1), 4), ("_step_fwd", dict(TOKENS=4), 8),
           ("_step_bwd", dict(TOKENS=1), 4), ("_step_bwd", dict(TOKENS=4), 8),
           ("_weight_bwd", dict(BLOCK_I=32, BLOCK_T=8, CHUNK=64), 4),
           ("_weight_bwd", dict(BLOCK_I=64, BLOCK_T=16, CHUNK=64), 4))

spec = importlib.util.spec_from_file_location("fused", sys.argv[1])
fused = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fused)
cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
for name, config, warps in CONFIGS:
    fn = getattr(fused, name).fn
    row = []
    for taps in (1, 4, 8):
        consts = dict(d=768, d_v=4, ERASE=True, NORM=False, BLOCK_D=1024, BLOCK_V=4, TAPS=taps, N_CHAIN=3,
                      BLOCK_S=triton.next_power_of_2(taps),
                      **config)
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        sig = {a: "constexpr" if a in consts else "i32" if a == "n_tok" else
               "fp32" if a in ("k_eps2", "k_scale") else "*bf16" if a in BF16 else "*fp32"
               for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=warps))
        with open("/tmp/compile_taps.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "-res-usage", "/tmp/compile_taps.cubin"], capture_output=True,
                             text=True, check=True).stdout
        fields = dict(p.split(":") for p in next(l for l in out.splitlines() if "REG:" in l).split())
        row.append(f"K {taps}: {fields['REG']} regs, {fields['STACK']} B stack")
    print(f"{name} {config} {warps} warps: " + "; ".join(row), flush=True)
