"""`icae ablate --grid seed --output_dir DIR [pretrain flags...]`: the seed's four runs as one command.

Grids: `seed` = layout {default, epl} x LoRA targets {q,v, all-linear} with the seed's decoder
(`shared`: in the seed's code the decoder IS the LoRA-adapted encoder); `full` = the same with
decoder {frozen (ICAE v2's), shared}; `layout` = layout {default, epl} only. `--seeds 1,2`
repeats each run per seed. Every run gets the same data, data order and seed, runs in its own
process one after another, is skipped when already finished, and a failed run does not stop the
others. Finally `icae report` is written to DIR/report.{png,md,json}.

A scheduler's SIGTERM/SIGUSR1 to this process is passed on to the run in progress, which saves a
checkpoint; the grid then stops with that run's status (143), and the same command resumes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from icae.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

FINISHED = "FINISHED"
GRIDS = {
    "layout": {"position_layout": ["default", "epl"]},
    "seed": {"position_layout": ["default", "epl"], "lora_target_modules": ["", "all-linear"]},
    "full": {"position_layout": ["default", "epl"], "lora_target_modules": ["", "all-linear"],
             "decoder_mode": ["frozen", "shared"]},
}
FIXED = {"seed": {"decoder_mode": "shared"}}  # not an axis, but part of what the grid means
FORBIDDEN = ("--output_dir", "--seed", "--position_layout", "--use_my_pe", "--overwrite_output_dir")


def grid_runs(grid: str, seeds: list[int]) -> list[tuple[str, dict]]:
    """(run name, flag values) for every point of the grid and every seed."""
    axes = GRIDS[grid]
    runs = []
    for seed in seeds:
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            name = "-".join([
                point["position_layout"],
                *(["all-linear" if point["lora_target_modules"] else "qv"] if "lora_target_modules" in point else []),
                *([point["decoder_mode"]] if "decoder_mode" in point else []),
                f"seed{seed}",
            ])
            runs.append((name, {**point, **FIXED.get(grid, {}), "seed": seed}))
    return runs


def run_command(point: dict, out: Path, passthrough: list[str]) -> list[str]:
    flags = [f"--{k}={v}" for k, v in point.items()]
    return [sys.executable, "-m", "icae", "pretrain", *passthrough, *flags, "--output_dir", str(out)]


def run_one(cmd: list[str], log) -> int:
    """One grid point in its own process. SIGTERM/SIGUSR1 sent to this process (Kubernetes signals only
    the first process) go on to it; Ctrl-C, which the terminal sends to both, is left to it alone."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGUSR1: signal.signal(signal.SIGUSR1, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="seed")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seeds", default="42", help="comma list of seeds, e.g. 1,2")
    parser.add_argument("--only", default="", help="comma list of run names to run (default: the whole grid)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, passthrough = parser.parse_known_args(argv)
    from icae.errors import UserError

    bad = [f for f in passthrough if f.split("=")[0] in FORBIDDEN]
    if bad:
        raise UserError(f"{', '.join(bad)} is set by icae ablate itself for every run; leave it out")
    axes = [f"--{a}" for a in [*GRIDS[args.grid], *FIXED.get(args.grid, {})]]
    if "--decoder_mode" in axes:
        axes.append("--train_decoder")
    clash = [f for f in passthrough if f.split("=")[0] in axes]
    if clash:
        raise UserError(f"{', '.join(clash)} is set by --grid {args.grid} for every run; leave it out")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes a comma list of integers, got {args.seeds!r}") from None

    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    runs = grid_runs(args.grid, seeds)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {name for name, _ in runs}
        if unknown:
            raise UserError(f"--only names {', '.join(sorted(unknown))}, not in this grid: {[n for n, _ in runs]}")
        runs = [(name, point) for name, point in runs if name in wanted]
    status = {}
    for i, (name, point) in enumerate(runs, 1):
        out = root / name
        cmd = run_command(point, out, passthrough)
        if args.dry_run:
            print(" ".join(cmd))
            continue
        if (out / FINISHED).is_file():
            print(f"[{i}/{len(runs)}] {name}: finished already, skipped")
            status[name] = "skipped"
            continue
        print(f"[{i}/{len(runs)}] {name}: {' '.join(cmd[2:])}", flush=True)
        if out.is_dir() and any(out.iterdir()) and not any(out.glob("checkpoint-*/COMPLETE")):
            cmd.append("--overwrite_output_dir")  # a failed run without checkpoints: start it again
        start = time.time()
        with open(root / f"{name}.log", "a") as log:
            code = run_one(cmd, log)
        took = time.time() - start
        if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            print(f"[{i}/{len(runs)}] {name}: stopped (exit {code}, see {root / (name + '.log')}); the grid stops "
                  "here: run the same command again to resume it", file=sys.stderr)
            return code
        if code == 0:
            (out / FINISHED).write_text(json.dumps({"seconds": round(took, 1), "command": cmd}) + "\n")
            status[name] = "ok"
        else:
            status[name] = f"failed (exit {code}, see {root / (name + '.log')})"
        print(f"[{i}/{len(runs)}] {name}: {status[name]} in {took:.0f} s", flush=True)
    if args.dry_run:
        return 0
    (root / "ablation_status.json").write_text(json.dumps(status, indent=2) + "\n")
    from icae.recipes.report import write_report

    done = [str(root / n) for n, s in status.items() if s in ("ok", "skipped")]
    if done:
        write_report(done, root / "report")
        print((root / "report.md").read_text())
        print(f"report: {root / 'report.png'}")
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
