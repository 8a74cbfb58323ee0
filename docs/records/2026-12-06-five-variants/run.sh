#!/usr/bin/env bash
# One device call: the five variants at the 124m size, one micro-batch, every one on its default path on
# CUDA (--fused=auto: CC, TC and write-only through fused.py; additive and d_v = 1 through ddl.py) with
# ddl.py's path beside it, and d_v = 1 through fused.py from the branch issue30-dv1b (its fused.py and
# bench.py, carried in .devcarry/dv1; DDL-CC's and DDL-TC's kernels and calls are main's).
#   bash docs/records/2026-12-06-five-variants/run.sh BATCH LIMIT_S     (from the repository root)
# as the first call ran it; the second table, main's sources alone, without the refused delta+fused:
#   SOURCES= VARIANTS="additive delta cc cc+fused tc tc+fused write+fused" bash .../run.sh 30 575
# (at micro-batch 30 an 80 GiB card compiles 3 at a time: first fill the cache in a call of its own on the
# same machine, BENCH=0 with VARIANTS="tc tc+fused write+fused", which then warm in seconds)
# First compiles each variant in its own process, untimed (inductor's on-disk cache then serves the timed
# run), as many at a time as the card holds at about 0.75 GiB per sequence of the micro-batch each (12 GiB
# at 16: 5 on an 80 GiB card), 8 at most; then one bench.py process times them all, one at a time, with
# the profile.
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
B=$1 end=$(( $(date +%s) + $2 ))
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
jobs=$(( mib * 9 / 10 * 4 / 3 / 1024 / B )); jobs=$(( jobs > 8 ? 8 : jobs < 1 ? 1 : jobs ))
VARIANTS=${VARIANTS-"additive delta delta+fused cc cc+fused tc tc+fused write+fused"}
SOURCES=${SOURCES-.devcarry/dv1}  # files put over main's in the copy that runs ("": main's alone)
rm -rf /tmp/tree && mkdir /tmp/tree && cp -r ./*.py smoke /tmp/tree/
[ -z "$SOURCES" ] || cp "$SOURCES"/*.py /tmp/tree/
cd /tmp/tree
{ date -u +"start %F %T UTC"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  sha256sum ddl.py fused.py bench.py train.py; } | tee -a "$OUT/machine_b$B.txt"
printf '%s\n' $VARIANTS | timeout $(( $2 * 2 / 3 )) xargs -P "$jobs" -I{} bash -c 'python3 bench.py \
  --preset=124m --bench_batch='"$B"' --bench_steps=1 --bench_variants={} > /tmp/warm_{}.txt 2>&1;
  echo "warm {}: exit $? $(date +%T)"' | tee -a "$OUT/machine_b$B.txt"
[ "${BENCH-1}" = 0 ] || timeout $(( end - $(date +%s) )) python3 bench.py --preset=124m --bench_batch="$B" \
  --bench_steps=10 --bench_variants="$(echo $VARIANTS | tr ' ' ,)" --bench_profile=true 2>&1 \
  | grep -v "^W1206" \
  | tee "$OUT/bench_b$B.txt" | tail -40
date -u +"end %T" | tee -a "$OUT/machine_b$B.txt"
