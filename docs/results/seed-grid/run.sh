#!/usr/bin/env bash
# Issue 18, the seed's grid on the CPU at the study's recipe (batch 8, 32-token texts -> 8 slots): one run per
# call, resumable (the same line again).  usage: [STEPS=N] bash docs/results/seed-grid/run.sh GRID RUN
# STEPS (default 1000) larger than a finished run's extends it from its last checkpoint (constant learning rate):
# every run of the grid is taken to 1,000 steps, then from checkpoint-1000 to 2,000 (STEPS=2000), the same way.
cd "$(dirname "$0")/../../.."
grid=$1; run=$2; seed=${run##*seed}; steps=${STEPS:-1000}; out=runs/grid/$run
last_ckpt=$(ls -d "$out"/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tail -1)
if [ -n "$last_ckpt" ] && [ "$last_ckpt" -ge "$steps" ]; then  # a later stage already passed this one
  echo "$run: checkpoint-$last_ckpt is past $steps steps; nothing to do"; exit 0
fi
if [ -f "$out/FINISHED" ]; then  # finished with fewer steps: let icae ablate continue it (the old marker is kept)
  done_steps=$(.venv/bin/python -c "import json,sys; c=json.load(open(sys.argv[1]))['command']; print(c[c.index('--max_steps')+1])" "$out/FINISHED")
  if [ "$done_steps" -lt "$steps" ]; then mv "$out/FINISHED" "$out/FINISHED-$done_steps"; fi
fi
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/icae ablate --grid "$grid" --seeds "$seed" --only "$run" --output_dir runs/grid \
  --model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random \
  --lora_r 32 --lora_alpha 64 --memory_learning_rate 1e-2 --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup \
  --warmup_steps 10 --max_grad_norm 2.0 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
  --max_steps "$steps" --logging_steps 10 --eval_strategy steps --eval_steps 100 --eval_reconstruction_samples 64 \
  --save_steps 50 --save_total_limit 1 --report_to none --disable_tqdm True
