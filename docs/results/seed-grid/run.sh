#!/usr/bin/env bash
# Issue 18, the seed's grid on the CPU at the study's recipe (batch 8, 32-token texts -> 8 slots, 1,000 steps):
# one run per call, resumable (the same line again).  usage: bash docs/results/seed-grid/run.sh GRID RUN
cd "$(dirname "$0")/../../.."
grid=$1; run=$2; seed=${run##*seed}
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/icae ablate --grid "$grid" --seeds "$seed" --only "$run" --output_dir runs/grid \
  --model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random \
  --lora_r 32 --lora_alpha 64 --memory_learning_rate 1e-2 --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup \
  --warmup_steps 10 --max_grad_norm 2.0 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
  --max_steps 1000 --logging_steps 10 --eval_strategy steps --eval_steps 100 --eval_reconstruction_samples 64 \
  --save_steps 50 --save_total_limit 1 --report_to none --disable_tqdm True
