#!/usr/bin/env bash
# One device call of the ladder, from the repository root on the lent machine (one GPU):
#   bash docs/records/ladder/device.sh LIMIT_S PATTERN...
# First compiles the first model of each pattern, in parallel processes of 4 steps (no logs kept, at most
# a quarter of LIMIT_S): inductor's on-disk cache then serves the timed runs, which run one at a time, as
# always (WARM=0 skips this, for a machine still warm from an earlier call, whose cache is full). Then,
# for each PATTERN in turn, `docs/ladder.py run --only PATTERN` while time is left (a run cut at LIMIT_S
# leaves no log). WARM_JOBS (default 4) sets how many compile at once: each holds its run's whole memory,
# at d768 (micro-batch 16) 10.3 GiB for DDL-CC, as its runs measured, so four fit an 80 GiB card. The plan
# starts from the committed logs; all logs, new ones beside them, come back as $OUT/ladder.tgz, written
# again after each pattern (a call returns at most 8 files). Leave the call's own limit 30 s above LIMIT_S.
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache"
end=$(( $(date +%s) + $1 )); shift
logs=/tmp/ladder-logs/ladder
mkdir -p "$logs" && cp docs/records/ladder/*.jsonl "$logs/" 2>/dev/null
{ date -u +"start %F %T UTC"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee -a "$OUT/machine.txt"
[ "${WARM:-1}" = 0 ] || for pat in $(printf '%s\n' "$@" | sort -u); do
  first=$(python3 docs/ladder.py plan --logs "$logs" --only "$pat" | sed -n 1p)
  [ -n "$first" ] && echo "${first/#python/python3} --max_steps=4 --warmup_steps=1 --eval_interval=2 \
    --val_tokens=65536 --out_dir=/tmp/warm/$pat"
done | timeout -k 10 $(( ($end - $(date +%s)) / 4 )) xargs -r -P "${WARM_JOBS:-4}" -I{} \
  bash -c '{} > /dev/null 2>&1 ||
  echo "warm failed: {}"'
date -u +"warm done %T" | tee -a "$OUT/machine.txt"
for pat in "$@"; do
  left=$(( end - $(date +%s) )); [ "$left" -gt 20 ] || break
  timeout -k 10 "$left" python3 docs/ladder.py run --logs "$logs" --only "$pat" 2>&1 \
    | tee -a "$OUT/runs.txt" | grep -E "( x[0-9]+ \| |^step +[0-9]+ \| (val|hellaswag)|^ladder: |Error|error)"
  tar -C "$(dirname "$logs")" -czf "$OUT/ladder.tgz.tmp" ladder && mv "$OUT/ladder.tgz.tmp" "$OUT/ladder.tgz"
done
date -u +"end %T" | tee -a "$OUT/machine.txt"
