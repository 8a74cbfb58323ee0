#!/usr/bin/env bash
# Issue 30 device check: triton_op probe; the fused path compiled (train.py stops on a graph break) against
# ddl.py's on the same seed; bench 124m mb16 with the profile. Outputs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/t30.txt"
git log --oneline | head -1 >> "$OUT/t30.txt"; git status --short >> "$OUT/t30.txt"
python3 docs/records/2026-12-06-h100-triton-op/probe_triton_op.py 2>&1 | tail -4 | tee -a "$OUT/t30.txt"
for f in true false; do
  TORCH_LOGS=graph_breaks timeout 150 python3 train.py --n_embd=256 --n_layer=4 --n_head=2 --head_dim=128 \
    --residual=delta --d_v=4 --compressor=cc --embed_conv=true --block_size=1024 --batch_size=64 \
    --total_batch=64 --max_steps=30 --warmup_steps=5 --lr=0.006 --min_lr=0.0006 --eval_interval=30 \
    --val_tokens=262144 --seed=1337 --log_interval=10 --ckpt_interval=30 --sample_tokens=0 \
    --data_dir=data/ladder --out_dir=/tmp/t30/fused-$f --overwrite=true --fused=$f > "$OUT/train-$f.txt" 2>&1
  echo "train fused=$f rc=$?" | tee -a "$OUT/t30.txt"
  grep -iE "graph break|fused|path|step +30|error" "$OUT/train-$f.txt" | head -8 | tee -a "$OUT/t30.txt"
done
python3 - <<'PY' | tee -a "$OUT/t30.txt"
import json
for f in ("true", "false"):
    recs = [json.loads(l) for l in open(f"/tmp/t30/fused-{f}/log.jsonl")]
    print(f, [(r["type"], r["step"], round(r["loss"], 5)) for r in recs if r["type"] in ("train", "val")][-4:],
          [r.get("path") or r.get("fused") for r in recs if r["type"] == "config"][:1])
PY
TORCH_LOGS=graph_breaks timeout 420 python3 bench.py --preset=124m --bench_batch=16 --bench_steps=10 \
  --bench_variants=additive,cc+fused,delta --bench_profile=true > "$OUT/bench16.txt" 2>&1
echo "bench rc=$?" | tee -a "$OUT/t30.txt"
