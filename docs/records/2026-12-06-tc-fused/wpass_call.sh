#!/usr/bin/env bash
# Branch issue30-tc-wpass's device call (from the repository root of main's tree, the branch's fused.py
# carried as .devcarry/wpass/fused.py): DDL-TC fused at the 124m size, micro-batch 16, main's fused.py
# against the branch's (the weight pass recomputes X_{l+1} once for all taps), one bench.py process each,
# the same card, with the profile. Before merging the branch: its tc+fused must beat main's.
#   bash docs/records/2026-12-06-tc-fused/wpass_call.sh LIMIT_S          (outputs to $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/wpass.txt"
rm -rf /tmp/wpass && mkdir /tmp/wpass && cp -r ./*.py smoke /tmp/wpass/ && cp .devcarry/wpass/fused.py /tmp/wpass/
for tree in . /tmp/wpass; do
  (cd "$tree" && sha256sum fused.py && timeout $(( $1 / 2 )) python3 bench.py --preset=124m --bench_batch=16 \
    --bench_steps=10 --bench_variants=additive,tc+fused --bench_profile=true) 2>&1 | grep -v "^W1206" \
    | tee "$OUT/bench_$(basename "$tree").txt" | tail -8 | tee -a "$OUT/wpass.txt"
done
