#!/usr/bin/env bash
# The recipe study of docs/results/compressor/README.md, exactly as it ran (2026-11-30, 2 shared CPU cores,
# one thread per run, two runs at a time). Every run is resumable: rerun its line to continue it.
# `icae report` then draws docs/results/compressor/report.{png,md,json} from the run folders.
set -euo pipefail
cd "$(dirname "$0")/../../.."
run() {  # run NAME [flags...]: the common recipe, 32-token texts -> 8 slots (rate 4), pure AE, eval every 50 steps
  local name=$1; shift
  OMP_NUM_THREADS=1 icae pretrain --output_dir runs/probes/$name \
    --model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random \
    --lora_target_modules all-linear --lora_r 32 --lora_alpha 64 \
    --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup --warmup_steps 10 --max_grad_norm 2.0 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
    --max_steps 300 --logging_steps 10 --eval_strategy steps --eval_steps 50 --eval_reconstruction_samples 64 \
    --save_steps 50 --save_total_limit 1 --report_to none --seed 42 --disable_tqdm True "$@"
}
# Probes (stopped where README says):
run epl-frozen --position_layout epl --decoder_mode frozen                                      # stopped at step 100
run epl-shared-rate1 --position_layout epl --decoder_mode shared --fixed_mem_size 32 --mean_compression_rate 1 \
  --max_steps 200                                                                                # stopped at step 80
run long-r16 --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 --lora_r 16 --lora_alpha 32 \
  --max_steps 3000 --save_steps 100                                                              # stopped at step 80
# The run that broke the plateau: started as a 300-step probe and stopped at step 200, then resumed from
# checkpoint-200 with a longer horizon (the constant schedule makes the continuation the same schedule;
# the longer horizon lists each text more often, so the data order after step 200 is that of the 3000-step
# run); resumed once more from checkpoint-600 with 2 threads (THREADS=2), stopped after step 850.
run epl-shared-memlr --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2   # stopped at 200
run epl-shared-memlr --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 --max_steps 3000
# The long run at the target length (64-token texts -> 16 slots, rate 4), LoRA rank 16 so that it ships in 12 MB:
run long64-r16 --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 --lora_r 16 --lora_alpha 32 \
  --model_max_length 64 --fixed_mem_size 16 --per_device_train_batch_size 4 --max_steps 4000  # stopped at 250
# Session 4: the curriculum. The 32-token run's checkpoint-850 continued on 64-token texts: the same 8 slots per
# 32-token segment, so a text is 2 segments -> 16 slots (rate 4); `--restore_from` loads its weights (fresh
# optimizer). And the rate-8 run: the same checkpoint, 64-token texts -> 8 slots (one segment of 64 tokens).
run curr64 --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 \
  --restore_from runs/probes/epl-shared-memlr/checkpoint-850 --model_max_length 64 --max_steps 3000 \
  --eval_steps 100 --save_steps 50                                                               # stopped at step 440 (Ctrl-C)
run rate8 --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 \
  --restore_from runs/probes/epl-shared-memlr/checkpoint-850 --model_max_length 64 --mean_compression_rate 8 \
  --max_steps 3000 --eval_steps 100 --save_steps 50                                              # stopped at step 225 (Ctrl-C)
icae report runs/probes -o docs/results/compressor/report
# Session 5: the 64-token stage on one H200 (docs/results/gpu/call2.sh, the COMMON flags there): the shipped
# 32-token weights (`--restore_from smollm2-135m-icae`, rank 19) on 64-token texts, batch 8 and batch 32 side by side,
# stopped by SIGTERM after 7 minutes (steps 1,001 and 993); batch 32's step 993, exported to float16, is shipped.
# Session 5, batch 32 from scratch on the CPU (stopped at step 246 with Ctrl-C):
run epl-shared-memlr-b32 --position_layout epl --decoder_mode shared --memory_learning_rate 1e-2 \
  --per_device_train_batch_size 32 --max_steps 3000 --eval_steps 25 --save_steps 25               # stopped at step 246
