"""Robustness: bad input, interrupted training and numerical faults, as a user meets them.

Every bad-input case runs the CLI in its own process and expects exit code 2, exactly one
`error: ...` line that names the problem and the fix, no traceback, and no side effect (output_dir
untouched, no model converted): the data cases use a "sentinel" model, a .gguf file whose header is
fine but which cannot be converted, so an error that names the data (and no `models/` folder in the
case's cache) shows that the data was checked before any model was loaded. See FORK_SERVER for how
the processes are started cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icae.testing import save_tiny_model

# ----------------------------------------------------------------------------- workspace


def _checkpoint(model_dir: str, folder: Path, **config) -> Path:
    """An ICAE checkpoint (weights + icae_config.json) of a fresh ICAE on `model_dir`, no training."""
    from icae.core.base_model import load_base_model, load_tokenizer
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE

    cfg = ICAEConfig(model_name_or_path=model_dir, **{"lora_r": 4, "fixed_mem_size": 4, **config})
    ICAE(cfg, base_model=load_base_model(model_dir), tokenizer=load_tokenizer(model_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    save_tiny_model(root / "tiny")  # hidden size 64
    save_tiny_model(root / "other", hidden_size=32)  # another base model
    (root / "sentinel.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # passes the header check, cannot be converted
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(30 + i)) for i in range(20)]
    (root / "train.json").write_text(json.dumps([{"text": t} for t in texts[4:]]))
    (root / "eval.json").write_text(json.dumps(texts[:4]))
    (root / "empty.json").write_text("")
    (root / "bad.json").write_text('[{"text": "a"},\n{"text": "b"')
    (root / "list.jsonl").write_text('{"text": "a"}\n["not", "an", "object"]\n')
    (root / "notext.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (root / "data.csv").write_text("text\na\n")
    # models that cannot be used
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    for name in ("bad-config", "no-weights", "truncated", "unknown-arch"):
        shutil.copytree(root / "tiny", root / name)
    (root / "bad-config" / "config.json").write_text('{"model_type": "llama",')
    (root / "no-weights" / "model.safetensors").unlink()
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = json.loads((root / "unknown-arch" / "config.json").read_text())
    (root / "unknown-arch" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    # checkpoints
    _checkpoint(str(root / "other"), root / "other-ckpt")
    _checkpoint(str(root / "tiny"), root / "r8-ckpt", lora_r=8)
    shutil.copytree(root / "r8-ckpt", root / "incomplete" / "checkpoint-3")  # no COMPLETE marker
    return root


def _as_checkpoint(source: Path, folder: Path) -> None:
    shutil.copytree(source, folder)
    (folder / "COMPLETE").write_text("step 2\n")


# ----------------------------------------------------------------------------- bad input through the CLI

BASE = ("pretrain --model_name_or_path {ws}/sentinel.gguf --train_file {ws}/train.json --eval_file {ws}/eval.json "
        "--output_dir {out} --lora_r 4 --fixed_mem_size 4 --model_max_length 64 --max_steps 1 "
        "--save_strategy no --eval_strategy no --report_to none")
TINY = "--model_name_or_path {ws}/tiny"


@dataclasses.dataclass
class Case:
    flags: str  # appended to BASE (argparse: the last of a repeated flag wins); or a whole command
    message: str  # regex the `error:` line must match
    setup: object = None  # callable(out, ws) preparing output_dir
    whole: bool = False  # `flags` is the whole command line (not pretrain)
    usage: bool = False  # an argparse error: usage text, then `prog: error: ...`
    debug: bool = False  # run with --debug: the traceback is shown
    loads: bool = False  # it may convert a model (the sentinel) before failing


CASES = {
    # data files: checked before any model is loaded
    "missing-train-file": Case("--train_file {ws}/nope.json", r"nope.json does not exist; pass a .json, .jsonl"),
    "empty-train-file": Case("--train_file {ws}/empty.json", r"empty.json is empty; pass a file that holds texts"),
    "invalid-json": Case("--train_file {ws}/bad.json", r"bad.json: invalid JSON at line 2: .*; fix the file"),
    "jsonl-line-not-object": Case(
        "--train_file {ws}/list.jsonl", r'list.jsonl: line 2 must be an object with a "text" string, not a JSON list'
    ),
    "jsonl-line-without-text": Case(
        "--train_file {ws}/notext.jsonl", r"notext.jsonl: line 2 must be an object with a \"text\" string, not an "
        r"object with keys \['body'\]"
    ),
    "unknown-file-type": Case("--train_file {ws}/data.csv", r"data.csv: unknown file type '.csv'; use a .json"),
    "corrupt-eval-file": Case("--eval_file {ws}/bad.json", r"bad.json: invalid JSON at line 2"),
    "all-texts-too-short": Case(
        "--min_chars 100000",
        r"all 16 texts in .*train.json are blank or shorter than min_chars=100000; lower min_chars",
    ),
    "eval-needs-texts": Case(
        "--eval_file '' --eval_size 0 --eval_strategy steps", r"--eval_strategy steps needs eval texts.*--eval_file"
    ),
    "negative-max-train-samples": Case(
        "--max_train_samples -3", r"--max_train_samples must not be negative \(got -3\)"
    ),
    "overwrite-keeps-files-on-bad-data": Case(
        "--train_file {ws}/bad.json --overwrite_output_dir", r"bad.json: invalid JSON",
        setup=lambda out, ws: (out.mkdir(), (out / "keep.txt").write_text("mine")),
    ),
    # the model
    "missing-model": Case("--model_name_or_path {ws}/nope", r"model '.*nope' not found; pass smollm2-135m, a .gguf"),
    "model-folder-without-config": Case("--model_name_or_path {ws}/no-config", r"no-config has no config.json"),
    "model-config-not-json": Case(
        "--model_name_or_path {ws}/bad-config", r"bad-config/config.json cannot be read as JSON .*; re-download"
    ),
    "model-without-weights": Case("--model_name_or_path {ws}/no-weights", r"no-weights has no model weights"),
    "model-weights-truncated": Case(
        "--model_name_or_path {ws}/truncated",
        r"truncated/model.safetensors is not a valid weights file: it is truncated",
    ),
    "model-unknown-architecture": Case(
        "--model_name_or_path {ws}/unknown-arch",
        r"cannot load the config of .*unknown-arch .*no-such-arch.*--model_name",
    ),
    "model-hub-id-offline": Case(  # every case runs with HF_HUB_OFFLINE=1: no test touches the network
        "--model_name_or_path nobody-here/no-such-model", r"cannot load the config of nobody-here/no-such-model"
    ),
    "model-gguf-not-convertible": Case("", r"cannot convert .*sentinel.gguf", loads=True),
    # contradictory or out-of-range flags
    "leave-more-than-min-tokens": Case(
        "--min_tokens_for_lm 8 --leave_tokens_for_lm 9",
        r"--leave_tokens_for_lm \(9\) is larger than --min_tokens_for_lm \(8\).*lower the first or raise the second",
    ),
    "fixed-mem-size-0": Case("--fixed_mem_size 0", r"--fixed_mem_size must be at least 1 \(got 0\)"),
    "model-max-length-0": Case("--model_max_length 0", r"--model_max_length must be at least 1 \(got 0\)"),
    "lm-ratio-above-1": Case("--lm_ratio 1.5", r"--lm_ratio must be between 0 and 1 \(got 1.5\)"),
    "lm-ratio-below-0": Case("--lm_ratio -0.1", r"--lm_ratio must be between 0 and 1 \(got -0.1\)"),
    "unknown-layout": Case("--position_layout sideways", r"unknown --position_layout 'sideways': choose one of"),
    "unknown-decoder-mode": Case("--decoder_mode twin", r"unknown --decoder_mode 'twin': choose one of frozen"),
    "use-my-pe-contradicts-layout": Case(
        "--use_my_pe True --position_layout epl_fixed", r"--use_my_pe True contradicts --position_layout epl_fixed"
    ),
    "train-decoder-contradicts-mode": Case(
        "--train_decoder False --decoder_mode shared", r"--train_decoder False contradicts --decoder_mode shared"
    ),
    "unknown-lora-target": Case(
        TINY + " --lora_target_modules q_proj,nope_proj",
        r"--lora_target_modules names nope_proj, which this model does not have; its linear layers are: .*q_proj",
    ),
    "unknown-flag": Case("--bogus_flag 3", r"unknown flag --bogus_flag; see `icae pretrain --help`"),
    "debug-shows-the-traceback": Case("--debug --lm_ratio 2", r"--lm_ratio must be between 0 and 1", debug=True),
    "flag-of-wrong-type": Case(
        "--lora_r four", r"icae pretrain: error: argument --lora_r(/--lora-r)?: invalid int value", usage=True
    ),
    # output_dir and checkpoints
    "output-dir-not-empty": Case(
        "", r"output_dir .* is not empty and holds no complete checkpoint to resume: pass --overwrite_output_dir",
        setup=lambda out, ws: (out.mkdir(), (out / "notes.txt").write_text("someone else's")),
    ),
    "output-dir-only-incomplete-checkpoint": Case(
        TINY, r"is not empty and holds no complete checkpoint",
        setup=lambda out, ws: shutil.copytree(ws / "r8-ckpt", out / "checkpoint-2"),
    ),
    "output-dir-is-a-file": Case("--output_dir {ws}/train.json", r"--output_dir .*train.json is a file"),
    "resume-checkpoint-missing": Case(
        "--resume_from_checkpoint {ws}/nowhere/checkpoint-9", r"--resume_from_checkpoint .*checkpoint-9 does not exist"
    ),
    "resume-checkpoint-incomplete": Case(
        "--resume_from_checkpoint {ws}/incomplete/checkpoint-3",
        r"--resume_from_checkpoint .*checkpoint-3 is not a complete checkpoint folder",
    ),
    "resume-other-base-model": Case(
        TINY, r"the last checkpoint in output_dir, .*checkpoint-2 was trained on another base model .*hidden size 32.*"
        r"hidden size 64.*pass --model_name_or_path .*other, or pass --overwrite_output_dir",
        setup=lambda out, ws: _as_checkpoint(ws / "other-ckpt", out / "checkpoint-2"),
    ),
    "restore-other-base-model": Case(
        TINY + " --restore_from {ws}/other-ckpt", r"--restore_from .*other-ckpt was trained on another base model"
    ),
    "restore-other-lora-rank": Case(
        TINY + " --restore_from {ws}/r8-ckpt", r"--restore_from .*r8-ckpt does not fit this run: it was trained with "
        r"--lora_r 8 \(this run: 4\): pass the flags it was trained with"
    ),
    "restore-missing": Case(
        TINY + " --restore_from {ws}/nowhere", r"--restore_from .*nowhere does not exist; pass the output folder"
    ),
    "restore-not-a-checkpoint": Case(
        TINY + " --restore_from {ws}/tiny", r"tiny is not an ICAE checkpoint: icae_config.json is missing; pass the"
    ),
    # other commands' checkpoints (their CLIs belong to icae.recipes.evaluate / icae.recipes.use)
    "eval-missing-checkpoint": Case(
        "eval --checkpoint {ws}/nonexistent", r"nonexistent", whole=True
    ),
    "compress-missing-checkpoint": Case(
        "compress --checkpoint {ws}/nonexistent --text hi -o {out}/x.safetensors", r"nonexistent", whole=True,
    ),
}


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {".": path.read_bytes()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# One process per case, each running `icae.cli.main` -- what `python -m icae` runs -- with its own
# stdout, stderr and exit status. A fresh interpreter per case costs 5-15 s of imports
# (transformers, peft), so by default a small server imports them once and forks a child per case;
# ICAE_TEST_FRESH_PROCESSES=1 runs every case as `python -m icae ...` instead (slow, same asserts),
# and test_fork_server_matches_python_dash_m checks that the two agree.
FORK_SERVER = textwrap.dedent("""
    import json, os, sys, traceback
    jobs, workers = json.load(open(sys.argv[1])), int(sys.argv[2])
    import icae.cli, icae.recipes.pretrain, icae.recipes.evaluate, icae.recipes.use  # the slow imports, once, before any fork
    import icae.training.trainer, icae.data.texts

    def child(job):
        code = 1
        try:
            os.environ.update(job["env"])
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["icae", *job["argv"]]
            try:
                icae.cli.main(job["argv"])
                code = 0
            except SystemExit as exit:  # as the interpreter does it
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    running, codes = {}, {}
    while jobs or running:
        while jobs and len(running) < workers:
            job = jobs.pop(0)
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = job["name"]
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    json.dump(codes, open(sys.argv[3], "w"))
""")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}  # read at import: same for every case


def _prepare(ws: Path, name: str) -> dict:
    case = CASES[name]
    out = ws / "out" / name
    out.parent.mkdir(exist_ok=True)
    if case.setup:
        case.setup(out, ws)
    flags = case.flags if case.whole else f"{BASE} {case.flags}"
    watched = ws / "train.json" if name == "output-dir-is-a-file" else out
    logs = ws / "logs"
    logs.mkdir(exist_ok=True)
    return {
        "name": name, "argv": shlex.split(flags.format(ws=ws, out=out)), "watched": str(watched),
        "before": _snapshot(watched), "cache": str(ws / "cache" / name),
        "env": {"ICAE_CACHE_DIR": str(ws / "cache" / name)},
        "stdout": str(logs / f"{name}.out"), "stderr": str(logs / f"{name}.err"),
    }


def _finish(job: dict, code: int) -> dict:
    proc = subprocess.CompletedProcess(
        job["argv"], code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text()
    )
    watched = Path(job["watched"])
    return {"proc": proc, "unchanged": _snapshot(watched) == job["before"],
            "converted": (Path(job["cache"]) / "models").exists()}


def _python_dash_m(job: dict) -> int:
    env = {**os.environ, **ENV, **job["env"]}
    with open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
        return subprocess.run([sys.executable, "-m", "icae", *job["argv"]], stdout=out, stderr=err, env=env,
                              timeout=600).returncode


def _run_cases(ws: Path, names: list[str], fresh: bool) -> dict:
    jobs = [_prepare(ws, name) for name in names]
    workers = max(2, min(4, os.cpu_count() or 2))
    if fresh:
        with ThreadPoolExecutor(workers) as pool:
            codes = dict(zip(names, pool.map(_python_dash_m, jobs)))
    else:
        spec, codes_file = ws / f"jobs-{len(names)}.json", ws / f"codes-{len(names)}.json"
        spec.write_text(json.dumps([{k: j[k] for k in ("name", "argv", "env", "stdout", "stderr")} for j in jobs]))
        server = subprocess.run([sys.executable, "-c", FORK_SERVER, str(spec), str(workers), str(codes_file)],
                                capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
        assert server.returncode == 0, server.stderr[-3000:]
        codes = json.loads(codes_file.read_text())
    return {job["name"]: _finish(job, codes[job["name"]]) for job in jobs}


@pytest.fixture(scope="module")
def cli_results(request, ws):
    """Run the selected cases (a few processes at a time), once for the module."""
    selected = [
        item.callspec.params["name"] for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_is_one_clear_line" and hasattr(item, "callspec")
        and item.module.__name__ == __name__
    ]
    return _run_cases(ws, selected, fresh=os.environ.get("ICAE_TEST_FRESH_PROCESSES") == "1")


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_line(cli_results, name):
    case = CASES[name]
    result = cli_results[name]
    proc = result["proc"]
    if case.debug:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "icae.errors.UserError" in proc.stderr
        assert re.search(case.message, proc.stderr.splitlines()[-1]), proc.stderr[-3000:]
        return
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.usage:
        assert "usage:" in proc.stderr and re.search(case.message, proc.stderr), proc.stderr[-2000:]
        return
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(case.message, errors[0]), errors[0]
    assert result["unchanged"], "output_dir (or the file named as one) changed before the check failed"
    assert case.loads or not result["converted"], "a model was loaded before the error"


def test_fork_server_matches_python_dash_m(ws, cli_results):
    """The same cases through a fresh `python -m icae` give the same exit status and error line."""
    names = [n for n in ("invalid-json",) if n in cli_results]
    if not names:
        pytest.skip("the cases to compare were not selected")
    for name in names:
        shutil.rmtree(ws / "out" / name, ignore_errors=True)
    fresh = _run_cases(ws, names, fresh=True)
    for name in names:
        a, b = cli_results[name]["proc"], fresh[name]["proc"]
        errors = lambda proc: [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # noqa: E731
        assert (a.returncode, errors(a)) == (b.returncode, errors(b))


# ----------------------------------------------------------------------------- warnings, not errors


def test_short_texts_and_bad_utf8_are_skipped_or_replaced_with_one_line_warnings(ws, tmp_path):
    """Texts under --min_chars are skipped and counted; bytes that are not UTF-8 are replaced; the run goes on."""
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_bytes("caf\xe9 ".encode("latin-1") * 30)  # not UTF-8
    (data / "b.txt").write_text("short")
    (data / "c.txt").write_text("a long enough text, " * 10)
    out = tmp_path / "out"
    flags = BASE.format(ws=ws, out=out) + f" {TINY.format(ws=ws)} --train_file {data} --min_chars 50 --max_steps 1"
    proc = subprocess.run([sys.executable, "-m", "icae", *shlex.split(flags)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any(re.search(r"a.txt: 30 bytes are not valid UTF-8; replaced them with U\+FFFD", w) for w in warnings)
    assert any(re.search(r"skipped 1 of 3 texts that are blank or shorter than min_chars=50", w) for w in warnings)
    assert "train examples: 2" in proc.stdout
    assert (out / "icae_weights.safetensors").is_file()


# ----------------------------------------------------------------------------- interrupted training

RUN = ("--output_dir {out} --model_name_or_path {ws}/tiny --train_file {ws}/train.json --eval_file {ws}/eval.json "
       "--lora_r 4 --fixed_mem_size 4 --model_max_length 48 --lm_ratio 0.5 --min_tokens_for_lm 8 "
       "--leave_tokens_for_lm 2 --max_steps 8 --save_steps 2 --logging_steps 2 --eval_strategy no "
       "--per_device_train_batch_size 2 --learning_rate 5e-3 --seed 5 --report_to none")


def test_half_written_checkpoints_are_never_resumed_from(ws, tmp_path, capfd, monkeypatch):
    """A process died while saving step 6 (no marker) and while a torn step-8 save reached the disk
    (marker, truncated weights): the same command resumes from checkpoint-4, removes both with a
    note, finishes all 8 steps, and ends with the weights of an uninterrupted run."""
    import icae.training.trainer
    from icae.recipes.pretrain import main as pretrain
    from icae.training.trainer import checkpoint_step, complete_checkpoints, is_complete_checkpoint, last_complete_checkpoint

    remove = icae.training.trainer.remove_checkpoint

    def checked_remove(path):  # rotation never deletes a complete checkpoint before a newer one is complete
        if is_complete_checkpoint(path):
            assert any(checkpoint_step(c) > checkpoint_step(path) for c in complete_checkpoints(Path(path).parent))
        remove(path)

    monkeypatch.setattr(icae.training.trainer, "remove_checkpoint", checked_remove)

    straight = tmp_path / "straight"
    assert pretrain(shlex.split(RUN.format(ws=ws, out=straight))) == 0

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for step in (2, 4, 6, 8):
        shutil.copytree(straight / f"checkpoint-{step}", crashed / f"checkpoint-{step}")
    (crashed / "checkpoint-6" / "COMPLETE").unlink()
    weights = crashed / "checkpoint-8" / "icae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert last_complete_checkpoint(crashed) == crashed / "checkpoint-4"
    capfd.readouterr()

    # the same command again (--save_total_limit only changes which checkpoints are kept)
    assert pretrain(shlex.split(RUN.format(ws=ws, out=crashed) + " --save_total_limit 1")) == 0
    captured = capfd.readouterr()
    assert f"resume: {crashed / 'checkpoint-4'}" in captured.out
    assert re.search(r"note: removing .*checkpoint-6: an incomplete checkpoint", captured.err)
    assert re.search(r"note: removing .*checkpoint-8: an incomplete checkpoint", captured.err)
    # rotation kept only the newest complete checkpoint, which is the finished run's last step
    assert [p.name for p in complete_checkpoints(crashed)] == ["checkpoint-8"]
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-8"]
    state = json.loads((crashed / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    a, b = load_file(straight / "icae_weights.safetensors"), load_file(crashed / "icae_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_rotation_counts_complete_checkpoints_only(ws, tmp_path):
    """--save_total_limit 1 with a stale incomplete checkpoint-6 beside complete 2 and 4: transformers'
    own rotation would keep the incomplete folder (the highest number) and delete checkpoint-4."""
    from transformers import TrainingArguments

    from icae.training.trainer import ICAETrainer, complete_checkpoints

    for step, complete in ((2, True), (4, True), (6, False)):
        shutil.copytree(ws / "r8-ckpt", tmp_path / f"checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "COMPLETE").write_text("done\n")
    trainer = ICAETrainer.__new__(ICAETrainer)  # rotation needs only args and state
    trainer.args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_total_limit=1)
    trainer.state = type("State", (), {"best_model_checkpoint": None})()
    trainer._rotate_complete_checkpoints(tmp_path)
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_resuming_from_an_older_checkpoint_drops_the_newer_ones(ws, tmp_path, capfd):
    from icae.recipes.pretrain import main as pretrain

    out = tmp_path / "run"
    flags = RUN.format(ws=ws, out=out).replace("--max_steps 8", "--max_steps 4")
    assert pretrain(shlex.split(flags)) == 0
    capfd.readouterr()
    assert pretrain(shlex.split(f"{flags} --resume_from_checkpoint {out}/checkpoint-2")) == 0
    captured = capfd.readouterr()
    assert re.search(r"note: removing .*checkpoint-4: newer than checkpoint-2", captured.err)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / "COMPLETE").is_file()


# ----------------------------------------------------------------------------- numerical faults

# Run the real CLI in a subprocess with ICAE.forward patched to turn the loss NaN from the k-th
# training forward on: the product has no test-only switch.
NAN_DRIVER = textwrap.dedent("""
    import sys
    import icae.core.model
    forward, calls = icae.core.model.ICAE.forward, [0]
    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] >= {k}:
                out.loss = out.loss * float("{value}")
        return out
    icae.core.model.ICAE.forward = patched
    from icae.cli import main
    main(["pretrain", *sys.argv[1:]])
""")


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(ws, tmp_path):
    from icae.core.model import ICAE
    from icae.training.trainer import is_complete_checkpoint, last_complete_checkpoint

    out, value = tmp_path / "run", "nan"
    flags = RUN.format(ws=ws, out=out).replace("--max_steps 8", "--max_steps 6")
    proc = subprocess.run([sys.executable, "-c", NAN_DRIVER.format(k=5, value=value), *shlex.split(flags)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(rf"the training loss is {value} at step 5; stopped.*The last good checkpoint is "
                     rf"{re.escape(str(out / 'checkpoint-4'))}: lower --learning_rate", errors[0]), errors[0]
    # nothing was saved on the way out; the last good checkpoint is complete and loads
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "icae_weights.safetensors").exists()
    assert last_complete_checkpoint(out) == out / "checkpoint-4" and is_complete_checkpoint(out / "checkpoint-4")
    model = ICAE.from_pretrained(out / "checkpoint-4", model_name_or_path=str(ws / "tiny"))
    assert all(torch.isfinite(p).all() for p in model.trainable_state_dict().values())


def test_infinite_loss_stops_too(ws, tmp_path, monkeypatch):
    import icae.core.model
    from icae.recipes.pretrain import main as pretrain
    from icae.training.trainer import TrainingDiverged, last_complete_checkpoint

    forward, calls = icae.core.model.ICAE.forward, [0]

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == 3:
                out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(icae.core.model.ICAE, "forward", patched)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the training loss is inf at step 3; stopped"):
        pretrain(shlex.split(RUN.format(ws=ws, out=out)))
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_nan_gradients_stop_before_the_update(ws, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN: stopped before the optimizer step, so no weight turns NaN."""
    import icae.core.model
    from icae.recipes.pretrain import main as pretrain
    from icae.training.trainer import TrainingDiverged, last_complete_checkpoint

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    forward, calls = icae.core.model.ICAE.forward, [0]

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == 3:
                out.loss = out.loss + NanGradient.apply(self.memory_embeddings.weight).sum() * 0
        return out

    monkeypatch.setattr(icae.core.model.ICAE, "forward", patched)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the gradients are NaN or infinite at step 3; stopped"):
        pretrain(shlex.split(RUN.format(ws=ws, out=out)))
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "checkpoint-4").exists() and not (out / "icae_weights.safetensors").exists()
    weights = load_file(out / "checkpoint-2" / "icae_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_weights_are_never_saved(ws, tmp_path):
    from transformers import TrainingArguments

    from icae.core.base_model import load_base_model, load_tokenizer
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE
    from icae.training.trainer import ICAETrainer, TrainingDiverged

    model_dir = str(ws / "tiny")
    model = ICAE(ICAEConfig(model_name_or_path=model_dir, lora_r=4, fixed_mem_size=4),
                 base_model=load_base_model(model_dir), tokenizer=load_tokenizer(model_dir))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_total_limit=1)
    trainer = ICAETrainer(model=model, args=args, data_collator=model.collator)
    with torch.no_grad():
        model.memory_embeddings.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"the trained weights are NaN or infinite at step 0"):
        trainer._save_checkpoint(trainer.model, None)
    with pytest.raises(TrainingDiverged, match=r"the trained weights are NaN or infinite"):
        trainer.save_model(str(tmp_path / "final"))
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "final" / "icae_weights.safetensors").exists()
