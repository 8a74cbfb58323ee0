# fused.install's numerical check (fp64 + fp32 ddl.py vs fused fp32) on the device: which models it
# accepts, how long it takes, what memory it holds. FIRST=1: only the first model (CPU interpreter test);
# ONLY=text: only the models whose name holds it (e.g. ONLY=124m).
import os, sys, time, traceback
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "docs"))
import torch
import fused
from ddl import GPT, GPTConfig, ConfigError
import ladder, ablations

dev = "cuda" if torch.cuda.is_available() else "cpu"
cases = [(f"d512-{s}", dict(ladder.SIZES["d512"], head_dim=128, **ablations.SETTINGS[s][1]), seed)
         for s in ("cc", "cc-bound1") for seed in (1337, 1338, 1339)]
cases += [(f"d512-{s}", dict(ladder.SIZES["d512"], head_dim=128, **ablations.SETTINGS[s][1]), 1337)
          for s in ("write4", "cc-k1", "cc-k2", "cc-k8", "tc", "tc-k1", "tc-k2", "tc-k8")]
cases += [(f"124m-{c}", dict(n_layer=12, n_head=6, head_dim=128, n_embd=768, residual="delta", d_v=4,
                             compressor=c, embed_conv=True), 1337) for c in ("cc", "tc")]
if os.environ.get("FIRST"):
    cases = cases[:1]
cases = [c for c in cases if os.environ.get("ONLY", "") in c[0]]
bad = 0
for name, flags, seed in cases:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=1024, **flags)).to(dev)
    if dev == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    t = time.time()
    try:
        fused.install(model); verdict = "accepted"
    except ConfigError as e:
        verdict = f"REFUSED: {e}"; bad += 1
    except Exception:
        verdict = "CRASHED:\n" + traceback.format_exc(); bad += 1
    mem = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else float("nan")
    print(f"{name} s{seed}: {verdict} | {time.time() - t:.1f} s | check's peak above the model {mem:.2f} GiB",
          flush=True)
    del model
card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
print(f"{len(cases) - bad} of {len(cases)} accepted on {card}")
