"""docs/results/gpu/grid.sh, the seed grid on one GPU in one device call (issue 33): its plan (DRY_RUN=1: the 12
commands, the CPU grid's recipe but for batch 32 and bf16) and its scheduler (runs side by side, the self-timeout,
what comes back under $OUT), the latter with a stand-in for `icae pretrain` so that it takes seconds, not hours."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "results" / "gpu" / "grid.sh"
CPU_RUN = ROOT / "docs" / "results" / "seed-grid" / "run.sh"
NAMES = {f"{layout}-{lora}-seed{seed}" for layout, lora, seed in
         itertools.product(("default", "epl"), ("qv", "all-linear"), (1, 2, 3))}


def grid(tmp_path: Path, py: str = sys.executable, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PY": py,
            "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    for key in ("DEVICE", "STEPS", "BATCH", "PARALLEL", "PRECISION", "RUNS", "LIMIT_S"):
        if key not in env:
            full.pop(key, None)  # the script's own defaults, whatever the caller's shell has
    proc = subprocess.Popen(["bash", str(GRID)], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every run it started
        out, err = proc.communicate()
        raise AssertionError(f"grid.sh did not return within 120 s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def plan(tmp_path: Path, **env) -> tuple[str, dict[str, list[str]]]:
    result = grid(tmp_path, DRY_RUN=1, **env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header = [line for line in lines if line.startswith("#")]
    runs = {}
    for line in lines:
        if not line.startswith("#"):
            name, cmd = line.split(": ", 1)
            assert name not in runs, f"{name} planned twice"
            runs[name] = shlex.split(cmd)
    return "\n".join(header), runs


def flags(argv: list[str]) -> dict[str, str]:
    """--key value and --key=value pairs of a command line."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("--"):
            out[a[2:]] = argv[i + 1]
            i += 1
        i += 1
    return out


def cpu_recipe() -> dict[str, str]:
    text = CPU_RUN.read_text()
    body = text[text.index("bin/icae ablate"):].replace("\\\n", " ")
    return flags(shlex.split(body.split("\n")[0].replace('"$steps"', "STEPS").replace('"$grid"', "seed")
                             .replace('"$seed"', "N").replace('"$run"', "RUN")))


def test_plan_is_the_seed_grid_at_batch_32_bf16(tmp_path):
    header, runs = plan(tmp_path)
    assert set(runs) == NAMES and len(runs) == 12
    assert "12 at once" in header and "device cuda" in header
    limit = int(re.search(r"limit (\d+) s", header).group(1))
    assert limit <= 480, "the whole call must return within 8 minutes"
    recipe = cpu_recipe()
    assert recipe["per_device_train_batch_size"] == "8"  # the CPU grid's, which this grid replaces by 32
    outdirs = set()
    for name, argv in runs.items():
        assert argv[:4] == [sys.executable, "-m", "icae", "pretrain"], argv[:4]
        f = flags(argv)
        layout, lora, seed = re.fullmatch(r"(default|epl)-(qv|all-linear)-seed(\d)", name).groups()
        assert f["position_layout"] == layout
        assert f["lora_target_modules"] == ("all-linear" if lora == "all-linear" else "")
        assert f["decoder_mode"] == "shared" and f["seed"] == seed
        assert f["per_device_train_batch_size"] == "32"
        assert f["bf16"] == "True" and "use_cpu" not in f
        assert f["max_steps"] == "2000"
        assert f["eval_steps"] == "100" and f["eval_reconstruction_samples"] == "64" and "max_eval_samples" not in f
        assert Path(f["output_dir"]).name == name
        outdirs.add(f["output_dir"])
        # every training flag of the CPU grid, with the CPU grid's value, but for the batch (eval batch, saving)
        for key, value in recipe.items():
            if key in ("grid", "seeds", "only", "output_dir", "max_steps", "per_device_train_batch_size",
                       "per_device_eval_batch_size", "save_steps", "save_total_limit"):
                continue
            assert f.get(key) == value, f"{name}: --{key} {f.get(key)} where the CPU grid has {value}"
    assert len(outdirs) == 12


def test_plan_overrides_cpu_smoke(tmp_path):
    header, runs = plan(tmp_path, DEVICE="cpu", STEPS=2, PARALLEL=2, BATCH=8, PRECISION="fp32",
                        RUNS="epl-qv-seed3 default-all-linear-seed1")
    assert set(runs) == {"epl-qv-seed3", "default-all-linear-seed1"}
    assert "2 at once" in header and "device cpu" in header
    for argv in runs.values():
        f = flags(argv)
        assert f["max_steps"] == "2" and f["per_device_train_batch_size"] == "8" and f["use_cpu"] == "True"
        assert "bf16" not in f
        assert f["eval_steps"] == "2" and f["max_eval_samples"] == "8"  # the smoke mode's small eval
    bad = grid(tmp_path, DRY_RUN=1, RUNS="epl-qv-seed4")
    assert bad.returncode == 2 and "not in the seed grid" in bad.stderr


FAKE_PRETRAIN = r'''
import json, signal, sys, time
from pathlib import Path
a = sys.argv[1:]
f = {}
for i, x in enumerate(a):
    if x.startswith("--") and "=" in x:
        f[x[2:].split("=", 1)[0]] = x.split("=", 1)[1]
    elif x.startswith("--") and i + 1 < len(a):
        f[x[2:]] = a[i + 1]
out = Path(f["output_dir"]); out.mkdir(parents=True)
(out / "run_config.json").write_text(json.dumps({"icae": {"position_layout": f["position_layout"],
    "lora_target_modules": f["lora_target_modules"], "decoder_mode": f["decoder_mode"]}, "seed": int(f["seed"])}))
def log(step, **kw):
    with open(out / "metrics.jsonl", "a") as m:
        m.write(json.dumps({"step": step, "time": time.time(), "cpu_seconds": 0.1 * step, **kw}) + "\n")
acc = 0.1 if f["position_layout"] == "default" else 0.2
log(1, loss=5.0); log(2, loss=4.0)
log(2, eval_loss=4.0, eval_token_accuracy=acc + 0.01 * int(f["seed"]), eval_exact_match=0.0, eval_bleu=1.0)
if f["seed"] == "2":  # hangs until the grid's limit: SIGTERM, as icae saves a checkpoint and stops, exit 143
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    while True:
        time.sleep(0.2)
'''


def test_runs_side_by_side_and_stops_at_the_limit(tmp_path):
    """4 at once: seed 1's runs finish, seed 2's hang until SIGTERM at LIMIT_S - GRACE_S, seed 3's find no slot
    with MIN_RUN_S left and are not started; the summary, the logs and icae report come back under OUT."""
    (tmp_path / "fake_pretrain.py").write_text(FAKE_PRETRAIN)
    py = tmp_path / "py"
    py.write_text(f'''#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m icae pretrain" ]; then shift 3; exec {sys.executable} {tmp_path / "fake_pretrain.py"} "$@"; fi
case "$*" in *resolve_model*) exit 0;; esac
exec {sys.executable} "$@"
''')
    py.chmod(0o755)
    limit, grace, kill = 60, 48, 3
    start = time.time()
    result = grid(tmp_path, py=str(py), DEVICE="cpu", STEPS=2, PARALLEL=4, LIMIT_S=limit, GRACE_S=grace,
                  MIN_RUN_S=2, KILL_S=kill)
    took = time.time() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert took < limit + 10, f"grid.sh took {took:.0f} s with LIMIT_S={limit}"
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"] == 4 and summary["batch"] == 32 and summary["precision"] == "bf16"
    runs = summary["runs"]
    assert set(runs) == NAMES, result.stdout
    for name, r in runs.items():
        seed = name[-1]
        if seed == "1":
            assert r["status"] == "finished" and r["rc"] == 0, (name, r, result.stdout)
            assert r["last_eval"]["step"] == 2 and r["end_s"] < limit - grace
            assert (out / "grid" / name / "metrics.jsonl").is_file() and (out / "grid" / f"{name}.log").is_file()
            finished = json.loads((out / "grid" / name / "FINISHED").read_text())
            assert finished["command"][finished["command"].index("--max_steps") + 1] == "2"
        elif seed == "2":  # hung until the limit (or, on a crawling machine, never started)
            assert r["status"] in ("stopped at the limit", "not started"), (name, r, result.stdout)
            if r["status"] != "not started":
                assert r["rc"] == 124 and r["end_s"] <= limit - grace + kill + 5, (name, r)
                assert not (out / "grid" / name / "FINISHED").exists()
        else:  # the slots free up only at the limit
            assert r["status"] == "not started" and r["rc"] is None, (name, r, result.stdout)
            assert not (out / "grid" / name).exists()
    assert any(r["status"] == "stopped at the limit" for r in runs.values()), result.stdout
    assert summary["finished"] == 4
    report = (out / "report.md").read_text()
    assert "epl-all-linear-seed1" in report and "default-qv-seed1" in report
    assert (out / "report.png").is_file() and (out / "report.json").is_file()
