#!/usr/bin/env bash
set -uo pipefail
start=$(date +%s)
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/eq.txt"
timeout 240 python3 .devcarry/compiled_eq.py 2>&1 | grep -v "^W1206" | tail -8 | tee -a "$OUT/eq.txt"
ok=${PIPESTATUS[0]}
timeout 60 python3 -c "import torch, bench; bench.check_fast_path(torch.device('cuda'), True, True)" 2>&1 \
  | tail -3 | tee -a "$OUT/eq.txt"
pats="d512-additive-p1 d512-delta-p1"
[ "$ok" = 0 ] && pats="$pats d512-cc-p1 d256-cc-p1 d256-write-p1" || echo "compiled eq failed: no cc runs" | tee -a "$OUT/eq.txt"
bash docs/records/ladder/device.sh $(( $1 - $(date +%s) + start )) $pats
