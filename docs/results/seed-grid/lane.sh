#!/usr/bin/env bash
# Runs grid runs one after another (each resumable; finished ones are skipped), so two lanes keep the
# CPU's two cores busy across sessions.  usage: bash docs/results/seed-grid/lane.sh GRID:RUN [GRID:RUN ...]
here="$(dirname "$0")"
for item in "$@"; do
  echo "== $(date -u +%FT%TZ) ${item}"
  bash "$here/run.sh" "${item%%:*}" "${item#*:}" || { echo "== stopped at ${item} (exit $?)"; exit 1; }
done
echo "== $(date -u +%FT%TZ) lane done"
