#!/usr/bin/env bash
# Runs grid runs one after another, each to 1,000 steps and then on to 2,000 (resumable: finished stages are
# skipped), so two lanes keep the CPU's two cores busy across sessions.
# usage: bash docs/results/seed-grid/lane.sh GRID:RUN [GRID:RUN ...]
here="$(dirname "$0")"
for item in "$@"; do
  for steps in 1000 2000; do
    echo "== $(date -u +%FT%TZ) ${item} to ${steps} steps"
    STEPS=$steps bash "$here/run.sh" "${item%%:*}" "${item#*:}" || { echo "== stopped at ${item} (exit $?)"; exit 1; }
  done
done
echo "== $(date -u +%FT%TZ) lane done"
