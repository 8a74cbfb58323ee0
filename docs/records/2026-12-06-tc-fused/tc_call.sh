#!/usr/bin/env bash
# (as it ran on 2026-12-06 at 19:35 UTC, from .devcarry/, as `bash .devcarry/tc_call.sh 260`; lines wrapped)
# bash .devcarry/tc_call.sh BENCH_LIMIT_S [then ABL_LIMIT_S]: the TC branch's check and bench from a copy in
# /tmp/tc (main's tree with .devcarry/tc's files over it), then the d_v = 1 ablations in the main tree.
set -uo pipefail
end=$(( $(date +%s) + 380 ))
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/call.txt"
rm -rf /tmp/tc && mkdir /tmp/tc && cp -r ./*.py smoke /tmp/tc/ && cp .devcarry/tc/*.py /tmp/tc/
(cd /tmp/tc && sha256sum ddl.py fused.py bench.py train.py && date -u +"eq %T" \
 && PYTHONPATH=/tmp/tc timeout 100 python3 compiled_eq.py tc 2>&1 | grep -v "^W1206" | tail -4 \
 && date -u +"bench %T" && PYTHONPATH=/tmp/tc TORCH_LOGS=graph_breaks timeout "$1" python3 bench.py \
  --preset=124m \
  --bench_batch=16 --bench_steps=10 --bench_variants=additive,tc+fused --bench_profile=true 2>&1 \
  | grep -v "^W1206" | tee "$OUT/bench_full.txt" | tail -45) 2>&1 | tee -a "$OUT/call.txt"
date -u +"bench done %T" | tee -a "$OUT/call.txt"
left=$(( end - $(date +%s) )); echo "ablations: $left s" | tee -a "$OUT/call.txt"
if [ -n "${2:-}" ] && [ "$left" -gt 60 ]; then
  timeout "$left" python3 docs/ablations.py run 2>&1 | tee "$OUT/abl.txt" \
    | grep -E "ablations?:|val loss|Error"
  tar -C docs/records -czf "$OUT/ablations.tgz" ablations
fi
