#!/usr/bin/env bash
# One device call: the issue-30 checks, then ladder runs in the time left (LIMIT_S from the call's start).
# Fused ladder patterns (cc, write) run only when the compiled fused model matched ddl.py in fp32.
# (run as .devcarry/call1.sh, this file's copy)
#   bash .devcarry/call1.sh LIMIT_S FUSED_PATTERNS -- PLAIN_PATTERNS
set -uo pipefail
end=$(( $(date +%s) + $1 )); shift
fusedpats=(); while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do fusedpats+=("$1"); shift; done; shift
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
PYTHONPATH="$PWD" timeout 300 python3 docs/records/2026-12-06-h100-triton-op/compiled_eq.py \
  > /tmp/eq.txt 2>&1
eq=$?
grep -v "^W1206" /tmp/eq.txt | tail -6 | tee -a "$OUT/next.txt"
echo "compiled_eq rc=$eq" | tee -a "$OUT/next.txt"
PYTHONPATH="$PWD" timeout 120 python3 -c "import torch, bench; \
bench.check_fast_path(torch.device('cuda'), True, True)" 2>&1 | tail -3 | tee -a "$OUT/next.txt"
for f in fused.py .devcarry/merged/fused.py .devcarry/tiles/fused.py; do  # kernel_bench.py, this folder's
  PYTHONPATH="$PWD" timeout 120 python3 .devcarry/kernel_bench.py "$f" 2>&1 | tail -5 \
    | tee -a "$OUT/next.txt"
done
# (meant for the tiles branch, this checked main's fused.py again: python3 -c puts the working directory
# ahead of PYTHONPATH, as its printed fused.__file__ shows)
PYTHONPATH="$PWD/.devcarry/tiles:$PWD" timeout 150 python3 -c "import torch, bench, fused; \
print(fused.__file__); \
bench.check_fast_path(torch.device('cuda'), True, True)" 2>&1 | tail -3 | tee -a "$OUT/next.txt"
pats=("$@"); [ "$eq" = 0 ] && pats=("$@" "${fusedpats[@]}")
left=$(( end - $(date +%s) )); echo "ladder: $left s for ${pats[*]}" | tee -a "$OUT/next.txt"
[ "$left" -gt 60 ] && bash docs/records/ladder/device.sh "$left" "${pats[@]}"
