#!/usr/bin/env bash
# Copies what a session keeps of the grid's runs (their logs, not their weights) from runs/grid to runs/ here,
# and redraws the interim report.  usage: bash docs/results/seed-grid/sync.sh
cd "$(dirname "$0")/../../.."
for run in runs/grid/*/; do
  name=$(basename "$run"); [ -f "$run/metrics.jsonl" ] || continue
  mkdir -p "docs/results/seed-grid/runs/$name"
  cp "$run"/metrics.jsonl "$run"/run_config.json "docs/results/seed-grid/runs/$name/"
  rm -f "docs/results/seed-grid/runs/$name"/FINISHED*  # mirror the markers: a stage's FINISHED is renamed when the next starts
  cp "$run"/FINISHED* "docs/results/seed-grid/runs/$name/" 2>/dev/null
done
.venv/bin/icae report docs/results/seed-grid/runs -o docs/results/seed-grid/report > /dev/null
.venv/bin/icae report docs/results/seed-grid/runs --at_step 1000 -o docs/results/seed-grid/report-at-1000 > /dev/null  # stage 1
.venv/bin/python docs/results/seed-grid/progress.py > docs/results/seed-grid/progress.md
