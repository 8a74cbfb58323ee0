#!/usr/bin/env bash
# One device call of the ablations, from the repository root on the lent machine (one GPU):
#   bash docs/records/ablations/device.sh LIMIT_S
# Runs `docs/ablations.py run --split I/N` in N processes at once (2 on a card under 100 GB, 3 above: a d512
# run reserved up to 33 GiB on an H200, 22 GiB on an H100), each cut at LIMIT_S (a cut run leaves no log),
# with TORCH_LOGS=graph_breaks (any break is printed). Each process plans from docs/records/ablations/ as
# the call's copy of the tree holds it: copy the last call's new logs in before the next call, or it runs
# them again. Returns $OUT/ablations.tgz (the folder, new logs beside the old), abl_I.txt (each process's
# output) and machine.txt. Leave the call's own limit 30 s above LIMIT_S. Then, here:
#   tar xzf ablations.tgz -C /tmp && cp -n /tmp/ablations/*.jsonl docs/records/ablations/
set -uo pipefail
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.devcarry/tiktoken_cache" TORCH_LOGS=graph_breaks
{ date -u +"start %F %T UTC"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  sha256sum ddl.py fused.py train.py; } | tee -a "$OUT/machine.txt"
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
n=$(( mib > 100000 ? 3 : 2 ))
for i in $(seq 0 $((n - 1))); do
  { timeout -k 10 "$1" python3 docs/ablations.py run --split "$i/$n"
    echo "exit $? (124: cut at LIMIT_S)"; } > "$OUT/abl_$i.txt" 2>&1 &
done
wait
for i in $(seq 0 $((n - 1))); do
  echo "== process $i/$n"; grep -E "^ladder: |^peak memory|^exit |Error|error|raph break" "$OUT/abl_$i.txt"
done
tar -C docs/records -czf "$OUT/ablations.tgz" ablations
date -u +"end %T" | tee -a "$OUT/machine.txt"
