"""Whether two versions of fused.py compile DDL-CC's kernels to the same machine code: each kernel, at every
config it autotunes over on the GPU (tokens and warps; the weight pass's tiles), with and without the norm
and the erase term, 0 to 3 replayed boundaries, at the 124m size's boundary (d = 768, d_v = 4, a bf16
state), compiled for an H100 (sm_90) on the CPU (Triton's compiler and its bundled cuobjdump, no GPU).
Prints one SASS digest per kernel and config (addresses dropped), to diff between versions:

    python docs/records/2026-12-06-tc-fused/same_sass.py OLD/fused.py > old.txt
    python docs/records/2026-12-06-tc-fused/same_sass.py fused.py > new.txt && diff old.txt new.txt
"""
import hashlib
import importlib.util
import itertools
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))  # the ddl.py beside that fused.py
import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BF16 = {"X", "KT", "XN", "C", "GXN", "GC", "K1", "K2", "K3", "G_X", "G_KT"}  # the state and (B, T, d) tensors


def signature(fn, consts):
    kind = lambda a: ("constexpr" if a in consts else "i32" if a == "n_tok" else
                      "fp32" if a in ("k_eps2", "k_scale") else "*bf16" if a in BF16 else "*fp32")
    return {a: kind(a) for a in fn.arg_names}


def sass(fn, consts, warps):
    kernel = triton.compile(ASTSource(fn, signature(fn, consts), consts), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    path = f"/tmp/same_sass_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    out = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    code = [re.sub(r"/\*[0-9a-f]{4}\*/", "", line).split(";")[0].strip() for line in out.splitlines()
            if "/*" in line and ";" in line]
    return hashlib.sha1("\n".join(code).encode()).hexdigest()[:12]


spec = importlib.util.spec_from_file_location("fused", sys.argv[1])
fused = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fused)
cases = []
for tokens, warps, norm, erase in itertools.product((1, 4), (4, 8, 16), (True, False), (True, False)):
    cases.append(("_step_fwd", dict(TOKENS=tokens, NORM=norm, ERASE=erase), warps))
    cases += [("_step_bwd", dict(TOKENS=tokens, NORM=norm, ERASE=erase, N_CHAIN=n), warps) for n in range(4)]
for bi, bt, warps, norm, n in itertools.product((16, 32, 64), (8, 16), (2, 4), (True, False), (0, 3)):
    cases.append(("_weight_bwd", dict(BLOCK_I=bi, BLOCK_T=bt, NORM=norm, N_CHAIN=n, CHUNK=64), warps))
for name, config, warps in cases:
    fn = getattr(fused, name).fn
    consts = dict(d=768, d_v=4, BLOCK_D=1024, BLOCK_V=4, TAPS=1, **config)  # TAPS: one tap, CC's read
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    print(name, sorted(config.items()), f"{warps} warps", sass(fn, consts, warps), flush=True)
