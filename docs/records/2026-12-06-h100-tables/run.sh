#!/usr/bin/env bash
# The device calls behind this record, from the repository root on the lent machine:
#   bash docs/records/2026-12-06-h100-tables/run.sh warm BATCH JOBS LIMIT_S  # fill inductor's cache
#   bash docs/records/2026-12-06-h100-tables/run.sh bench BATCH MODE LIMIT_S # one table, cache hits
# "warm" compiles every variant in both modes in parallel processes (JOBS at a time), one variant per
# process and no timing: torch.compile's on-disk caches (FX graph, AOTAutograd, Triton) then serve the
# timed run, which builds one variant at a time as always. Compiling 12 graphs one after the other takes
# longer than one call of the device may run. Output goes to $OUT (the device's folder that comes back).
set -uo pipefail
date +"start %T"
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
VARIANTS="additive delta cc tc write cc+fused"
what=$1 B=$2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/machine.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/machine.txt"
if [ "$what" = warm ]; then
  for mode in default reduce-overhead; do for v in $VARIANTS; do echo "$mode $v"; done; done |
    xargs -P "$3" -L 1 bash -c 'timeout '"$4"' python3 bench.py --preset=124m --bench_batch='"$B"' \
      --bench_steps=1 --compile_mode=$0 --bench_variants=$1 > "$OUT/warm_b'"$B"'_$0_$1.txt" 2>&1;
      echo "warm $0 $1: exit $? at $(date +%T)"'
else
  timeout "$4" python3 bench.py --preset=124m --bench_batch="$B" --bench_steps=10 --compile_mode="$3" \
    --bench_variants=additive,delta,cc,tc,write,cc+fused 2>&1 | tee "$OUT/bench_b${B}_$3.txt"
fi
