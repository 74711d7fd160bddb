#!/usr/bin/env bash
# bf16 against fp32 on the compressor study's recipe (docs/results/compressor/study.sh, run epl-shared-memlr):
# the same seed and data order, 300 steps each, one thread per run; then one report with both curves.
# usage: bash docs/results/bf16-fidelity/run.sh [fp32|bf16|report]   (resumable: rerun a line to continue)
# MAX_STEPS=600 continues both past 300 from their step-300 checkpoints (the same learning rate: constant after
# warm-up; --text_window random lists each text as often as max_steps x batch needs, so steps 301-600 draw from
# the 600-step listing: not bit-for-bit one 600-step run, but the same data for both dtypes)
set -euo pipefail
cd "$(dirname "$0")/../../.."
run() {  # run NAME [flags...]
  local name=$1; shift
  OMP_NUM_THREADS=1 .venv/bin/icae pretrain --output_dir runs/bf16-fidelity/$name \
    --model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random \
    --lora_target_modules all-linear --lora_r 32 --lora_alpha 64 \
    --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 \
    --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup --warmup_steps 10 --max_grad_norm 2.0 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
    --max_steps "${MAX_STEPS:-300}" --logging_steps 10 --eval_strategy steps --eval_steps 50 --eval_reconstruction_samples 64 \
    --save_steps 50 --save_total_limit 1 --report_to none --seed 42 --disable_tqdm True "$@"
}
case "${1:-all}" in
  fp32) run fp32 ;;
  bf16) run bf16 --bf16 True ;;
  report) .venv/bin/icae report runs/bf16-fidelity/fp32 runs/bf16-fidelity/bf16 --output docs/results/bf16-fidelity/report ;;
  all) run fp32; run bf16 --bf16 True ;;
esac
