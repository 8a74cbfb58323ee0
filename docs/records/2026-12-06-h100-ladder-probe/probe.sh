export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.devcarry/tiktoken_cache
git log -1 --format='commit %h' > $OUT/commit.txt
nvidia-smi --query-gpu=name --format=csv,noheader >> $OUT/commit.txt
for v in "additive --residual=additive" "delta --residual=delta" "cc --residual=delta --d_v=4 --compressor=cc --embed_conv=true"; do
  set -- $v; name=$1; shift
  timeout 150 python3 train.py --n_layer=4 --n_head=2 --head_dim=128 --n_embd=256 --block_size=1024 "$@" \
    --batch_size=64 --total_batch=64 --max_steps=264 --warmup_steps=26 --lr=3e-3 --min_lr=3e-4 \
    --eval_interval=88 --val_tokens=1048576 --log_interval=44 --ckpt_interval=1000 --sample_tokens=0 \
    --data_dir=data/ladder --out_dir=/tmp/p_$name > $OUT/probe_$name.txt 2>&1
  echo "$name exit $?"; cp /tmp/p_$name/log.jsonl $OUT/log_$name.jsonl; tail -3 $OUT/probe_$name.txt
done
