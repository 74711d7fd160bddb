"""`icae pretrain` end to end on a tiny model: the seed's command lines, resume, two processes."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icae.errors import UserError
from icae.recipes.pretrain import main as pretrain
from icae.testing import save_tiny_model

SEED_COMMON = (
    '--model_max_length 512 --lm_ratio 0.5 --gradient_accumulation_steps 32 --per_device_train_batch_size 1 '
    '--num_train_epochs 1 --per_device_eval_batch_size 1 --learning_rate 1e-4 --warmup_steps 300 '
    '--max_grad_norm 2.0 --overwrite_output_dir --logging_steps 10 --evaluation_strategy "steps" --eval_steps 100 '
    "--add_special_token_for_lm True"
)
SEED_DECODER = "--train_decoder True"  # the seed's decoder: the LoRA-adapted encoder (docs/SEED-EXPERIMENTS.md says so)
SEED_RUNS = {
    "default": "--use_my_pe False",
    "epl": "--use_my_pe True",
    "default_all_linear": "--use_my_pe False --lora_target_modules 'all-linear'",
    "epl_all_linear": "--use_my_pe True --lora_target_modules 'all-linear'",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    model = save_tiny_model(root / "tiny")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(40 + i)) + f" #{i}" for i in range(24)]
    (root / "train.json").write_text(json.dumps([{"text": t} for t in texts[4:]]))
    (root / "eval.json").write_text(json.dumps(texts[:4]))
    return root, model


def tiny_flags(root, model, out):
    return (f"--output_dir {out} --model_name_or_path {model} --train_file {root}/train.json "
            f"--eval_file {root}/eval.json --lora_r 8 --report_to none")


@pytest.mark.parametrize("run", SEED_RUNS)
def test_seed_command_lines(workspace, run):
    root, model = workspace
    out = root / f"seed-{run}"
    # the seed's lines verbatim; the appended flags only shorten the run (argparse: the last one wins)
    argv = shlex.split(f"{SEED_COMMON} {SEED_RUNS[run]} {SEED_DECODER} {tiny_flags(root, model, out)} "
                       "--max_steps 2 --gradient_accumulation_steps 3")
    assert pretrain(argv) == 0
    config = json.loads((out / "icae_config.json").read_text())
    assert config["position_layout"] == ("epl" if "epl" in run else "default")
    assert config["decoder_mode"] == "shared"
    assert config["training"]["model_max_length"] == 512 and "--use_my_pe" in config["training"]["command"]
    targets = set(config["lora_config"]["target_modules"])
    if "all_linear" in run:
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    else:
        assert targets == {"q_proj", "v_proj"}
    # only trained weights are saved: LoRA + memory embeddings, nothing of the base model
    weights = load_file(out / "icae_weights.safetensors")
    assert weights and all("lora_" in k or k == "memory_embeddings.weight" for k in weights)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and any("train_loss" in r for r in records)


def test_seed_lines_without_the_decoder_flag_get_icae_v2s_frozen_decoder():
    from icae.recipes.pretrain import parse_args

    for run in SEED_RUNS.values():
        model_args, _, _ = parse_args(shlex.split(f"{SEED_COMMON} {run} --output_dir /tmp/x"))
        assert model_args.icae_config().decoder_mode == "frozen"
        model_args, _, _ = parse_args(shlex.split(f"{SEED_COMMON} {run} {SEED_DECODER} --output_dir /tmp/x"))
        assert model_args.icae_config().decoder_mode == "shared"


@pytest.mark.parametrize("switch, ours, agreeing, refused", [
    ("use_my_pe", "position_layout", {"True": "epl", "False": "default"}, {"True": "epl_fixed", "False": "epl"}),
    ("train_decoder", "decoder_mode", {"True": "shared", "False": "frozen"}, {"True": "separate", "False": "shared"}),
])
def test_the_seeds_two_switches_are_treated_alike(switch, ours, agreeing, refused):
    """Each seed switch sets our flag; given with a value of ours that it contradicts, it is refused."""
    from icae.recipes.pretrain import parse_args

    for value in ("True", "False"):
        model_args, _, _ = parse_args([f"--{switch}", value, "--output_dir", "/tmp/x"])
        assert getattr(model_args.icae_config(), ours) == agreeing[value]
        model_args, _, _ = parse_args([f"--{switch}", value, f"--{ours}", agreeing[value], "--output_dir", "/tmp/x"])
        assert getattr(model_args.icae_config(), ours) == agreeing[value]
        model_args, _, _ = parse_args([f"--{switch}", value, f"--{ours}", refused[value], "--output_dir", "/tmp/x"])
        with pytest.raises(UserError, match=f"--{switch} {value} contradicts --{ours} {refused[value]}: give only one"):
            model_args.icae_config()


def test_cli_entry_points_and_bad_output_dir(workspace):
    root, model = workspace
    out = root / "cli"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    cmd = [sys.executable, "-m", "icae.pretrain", *shlex.split(tiny_flags(root, model, out)), "--max_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--overwrite_output_dir"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainable params" in proc.stdout and "target_modules=['q_proj', 'v_proj']" in proc.stdout
    assert not (out / "notes.txt").exists()


def _weights(path):
    return load_file(Path(path) / "icae_weights.safetensors")


def test_killed_run_resumes_to_the_same_weights(workspace):
    root, model = workspace
    flags = (tiny_flags(root, model, "{out}") + " --fixed_mem_size 8 --model_max_length 128 --lm_ratio 0.5 "
             "--min_tokens_for_lm 16 --max_steps 24 --save_steps 4 --logging_steps 4 --eval_strategy no "
             "--per_device_train_batch_size 2 --learning_rate 5e-3 --seed 11 --lora_dropout 0.05")
    straight = root / "straight"
    assert pretrain(shlex.split(flags.format(out=straight))) == 0

    killed = root / "killed"
    cmd = [sys.executable, "-m", "icae", "pretrain", *shlex.split(flags.format(out=killed))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-8" / "COMPLETE").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-24").exists(), "the run finished before it could be killed"
    # the same command again resumes from the last complete checkpoint
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: " in proc.stdout and "resume: None" not in proc.stdout
    state = json.loads((killed / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    # One step moves a weight by ~lr = 5e-3, so a lost step, another data order or dropout mask would differ by
    # ~1e-3; the straight run (in this process) and the resumed one (a fresh process, maybe another thread count)
    # may sum in another order: up to ~1.3e-6 seen on a loaded machine.
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=0)


def test_two_processes_match_one_process_with_twice_the_batch(workspace):
    """Gradients are synchronised: 2 gloo ranks x batch 1 == 1 process x batch 2 (equal-length AE rows)."""
    root, model = workspace
    flags = (f"--model_name_or_path {model} --train_file {root}/train.json --eval_file {root}/eval.json "
             "--fixed_mem_size 8 --model_max_length 48 --lm_ratio 0 --max_steps 4 --logging_steps 1 --lora_r 8 "
             "--lora_dropout 0 --learning_rate 1e-2 --save_strategy no --report_to none --seed 3 "
             "--eval_strategy no --overwrite_output_dir")
    one, two = root / "one-process", root / "two-processes"
    assert pretrain(shlex.split(f"{flags} --output_dir {one} --per_device_train_batch_size 2")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "icae", "pretrain"]
    proc = subprocess.run(torchrun + shlex.split(f"{flags} --output_dir {two} --per_device_train_batch_size 1"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert len(losses(two)) == 4, "one metrics file, written by rank 0 only"
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _short_run(root, model, out, report):
    return shlex.split(f"{tiny_flags(root, model, out)} --report_to {report} --max_steps 3 --logging_steps 1 "
                       "--eval_strategy steps --eval_steps 3 --per_device_train_batch_size 2 --save_strategy no")


def test_wandb_logs_offline_without_credentials(workspace, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    root, model = workspace
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wandb-run"
    assert pretrain(_short_run(root, model, out, "wandb")) == 0
    assert os.environ["WANDB_MODE"] == "offline"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb folder"
    # The offline record file (protobuf records, values as JSON text) holds every logged loss.
    (records,) = runs[0].glob("run-*.wandb")
    data = records.read_bytes()
    assert b"train/loss" in data and b"eval/loss" in data
    logged = [r[k] for r in _metrics(out) for k in ("loss", "eval_loss") if k in r]
    assert len(logged) >= 4 and all(json.dumps(v).encode() in data for v in logged)


def test_tensorboard_gets_the_same_losses_as_metrics_jsonl(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, model = workspace
    out = tmp_path / "tb-run"
    assert pretrain(_short_run(root, model, out, "tensorboard")) == 0
    (logdir,) = (out / "runs").iterdir()  # transformers 5: output_dir/runs/<date_host> (or TENSORBOARD_LOGGING_DIR)
    events = EventAccumulator(str(logdir))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}
    assert logged.keys() == expected.keys() and len(logged) == 3
    assert list(logged.values()) == pytest.approx(list(expected.values()), rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")][:1] == [3]


def test_missing_reporting_package_is_named_before_anything_loads(workspace, tmp_path, monkeypatch):
    import icae.training.run

    root, model = workspace
    monkeypatch.setitem(icae.training.run.REPORT_PACKAGES, "wandb", "no_such_package_for_icae_tests")
    out = tmp_path / "never"
    with pytest.raises(UserError, match=r"--report_to wandb needs .*pip install 'icae\[wandb\]'"):
        pretrain(_short_run(root, model, out, "wandb"))
    assert not out.exists()


def test_memory_learning_rate_gets_its_own_optimizer_group(workspace, tmp_path):
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE
    from icae.recipes.pretrain import PretrainArguments
    from icae.testing import byte_tokenizer, tiny_base_model
    from icae.training.trainer import ICAETrainer

    model = ICAE(ICAEConfig(fixed_mem_size=4, lora_r=4), tiny_base_model(), byte_tokenizer())
    memory = {id(p) for p in model.memory_embeddings.parameters()}
    for lr, groups_with_memory in ((None, 1), (0.5, 1)):
        args = PretrainArguments(output_dir=str(tmp_path), learning_rate=1e-3, memory_learning_rate=lr, report_to="none")
        optimizer = ICAETrainer(model=model, args=args, data_collator=model.collator).create_optimizer()
        holding = [g for g in optimizer.param_groups if memory & {id(p) for p in g["params"]}]
        assert len(holding) == groups_with_memory
        assert holding[0]["lr"] == (lr or 1e-3)
        if lr is not None:  # alone in its group, and every trainable weight still in exactly one group
            assert {id(p) for p in holding[0]["params"]} == memory
        ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_random_windows_and_reconstruction_metrics_during_eval(workspace):
    root, model = workspace
    out = root / "windows"
    argv = shlex.split(f"{tiny_flags(root, model, out)} --model_max_length 24 --fixed_mem_size 4 --lm_ratio 0 "
                       "--text_window random --max_steps 3 --per_device_train_batch_size 8 --eval_strategy steps "
                       "--eval_steps 3 --eval_reconstruction_samples 3 --save_strategy no --logging_steps 1 "
                       "--memory_learning_rate 1e-2")
    assert pretrain(argv) == 0
    records = _metrics(out)
    assert all("cpu_seconds" in r for r in records)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(0.0 <= r["eval_token_accuracy"] <= 1.0 and "eval_bleu" in r and "eval_exact_match" in r
                         for r in evals)
    config = json.loads((out / "icae_config.json").read_text())
    assert config["training"]["text_window"] == "random" and config["training"]["model_max_length"] == 24
    # the logged token accuracy is what `icae eval`'s own reconstruction gives on the same 3 texts
    from icae.recipes.evaluate import evaluate
    from icae.core.model import load_checkpoint

    trained = load_checkpoint(str(out), device="cpu")
    eval_texts = json.loads((root / "eval.json").read_text())[:3]
    results = evaluate(trained, eval_texts, model_max_length=24, batch_size=3)
    assert evals[-1]["eval_token_accuracy"] == pytest.approx(results["token_accuracy"])
