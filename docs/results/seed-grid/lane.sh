#!/usr/bin/env bash
# Runs grid runs one after another, each through the stages 1,000 then 2,000 steps (resumable: finished stages
# are skipped), so two lanes keep the CPU's two cores busy across sessions. STAGES="1000 2000 3000" adds a stage
# (the pre-registered budget rule in README.md).
# usage: [STAGES="1000 2000"] bash docs/results/seed-grid/lane.sh GRID:RUN [GRID:RUN ...]
here="$(dirname "$0")"
for item in "$@"; do
  for steps in ${STAGES:-1000 2000}; do
    echo "== $(date -u +%FT%TZ) ${item} to ${steps} steps"
    STEPS=$steps bash "$here/run.sh" "${item%%:*}" "${item#*:}" || { echo "== stopped at ${item} (exit $?)"; exit 1; }
  done
done
echo "== $(date -u +%FT%TZ) lane done"
