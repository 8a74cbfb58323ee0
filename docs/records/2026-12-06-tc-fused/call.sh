#!/usr/bin/env bash
# The device call still to run for this record (main's tree, from the repository root), about 8 minutes:
# the compiled check for TC (168 s on a warm H100), then bench.py at the 124m size, micro-batch 16,
# additive, DDL-TC through ddl.py and through fused.py, with the profile and graph breaks logged.
#   bash docs/records/2026-12-06-tc-fused/call.sh BENCH_LIMIT_S       (outputs to $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/call.txt"
for comp in tc; do
  PYTHONPATH=. timeout 300 python3 docs/records/2026-12-06-tc-fused/compiled_eq.py $comp 2>&1 \
    | grep -v "^W1206" \
    | tail -3 | tee -a "$OUT/call.txt"
done
TORCH_LOGS=graph_breaks timeout "${1:-400}" python3 bench.py --preset=124m --bench_batch=16 --bench_steps=10 \
  --bench_variants=additive,tc,tc+fused --bench_profile=true 2>&1 | grep -v "^W1206" \
  | tee "$OUT/bench_full.txt" | tail -45 | tee -a "$OUT/call.txt"
