#!/usr/bin/env bash
# Device call 1 of 2, as it ran (2026-11-30, one H200 lent for 15 minutes, no network there).
# The embedded model's GGUF is 94 MiB and one call carries 64 MiB with the working tree, so the file
# travels in two halves: this call stashes the first (.gpuA/part) and installs the Python packages the
# machine's image lacks (.whl: datasets, dill, multiprocess, fsspec, gguf, peft, as on this project's
# CPU machines), then runs the step benchmark's GPU plan (`--quick`: SmolLM2-135M's random twin and the
# 0.85B Llama, bf16, batch 1/4/8, with the reference-cost pairs), which needs no GGUF.
set -u
mkdir -p /tmp/stash /tmp/site
cp .gpuA/part /tmp/stash/partA
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ICAE_CACHE_DIR=/tmp/icae-cache
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc; free -g | head -2
  python3 -c "import sys, torch, transformers, peft, datasets, accelerate, sacrebleu
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__,
      'accelerate', accelerate.__version__)
import icae.core.model, icae.recipes.pretrain; print('icae imports ok')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${BENCH_S:-110}" python3 benchmarks/train_step.py --quick --device cuda \
  --output "$OUT/train_step-quick-cuda.json" 2>&1 | tee "$OUT/bench.log"
ls -la "$OUT"
