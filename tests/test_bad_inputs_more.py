"""Bad input to the newer commands (issue 31, sections 1-2), in the spirit of test_bad_inputs.py: exit
status 2, exactly one `error: ...` line naming the problem and the fix, no traceback, nothing written that
blocks the corrected rerun, nothing of the user's changed.

The cases run `icae.cli.main` in this process (what `python -m icae` runs; test_bad_inputs.py checks that the
two agree), on a tiny model. Where a check must come before the model loads, `no_model` makes loading a
base model fail the test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import icae.core.config as config_module
from icae.testing import save_tiny_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from icae.core.base_model import load_base_model, load_tokenizer
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad-inputs-more")
    tiny = save_tiny_model(root / "tiny")
    model = ICAE(ICAEConfig(model_name_or_path=tiny, lora_r=4, fixed_mem_size=4), base_model=load_base_model(tiny),
                 tokenizer=load_tokenizer(tiny))
    model.save_pretrained(root / "fresh")  # records no training: let through wherever that matters
    model.training_info = {"model_max_length": 64, "lm_ratio": 0.0, "command": "icae pretrain ..."}
    model.save_pretrained(root / "ckpt")
    with torch.no_grad():  # the same sizes and layout, other weights
        model.memory_embeddings.weight.add_(1.0)
    model.save_pretrained(root / "other-weights")
    shutil.copytree(root / "ckpt", root / "truncated")
    weights = (root / "truncated" / "icae_weights.safetensors").read_bytes()
    (root / "truncated" / "icae_weights.safetensors").write_bytes(weights[: len(weights) - 100])
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(30 + i)) for i in range(20)]
    (root / "train.json").write_text(json.dumps([{"text": t} for t in texts[4:]]))
    (root / "eval.json").write_text(json.dumps(texts[:4]))
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lines = [json.dumps({"text": t}) for t in texts]
    lines[12] = '{"text": "cut short'
    (root / "bad-line.jsonl").write_text("\n".join(lines) + "\n")
    (root / "utf16.json").write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-16")
    (root / "utf16le.jsonl").write_text(lines[0] + "\n", encoding="utf-16-le")  # no byte-order mark
    records = [{"input": t, "prompt": "What comes first?", "answer": t.split()[0]} for t in texts[:6]]
    (root / "qa.json").write_text(json.dumps(records))
    (root / "context.txt").write_text(texts[0])
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Loading a base model fails the test: the check under test must come first."""
    import icae.core.base_model

    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded before the check")

    monkeypatch.setattr(icae.core.base_model, "load_base_model", refuse)


def icae(argv: str, capsys, ws: Path, out: Path | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `icae ARGV` (split as a shell does) run in this process; {ws} and {out}
    are filled in."""
    import shlex

    from icae.cli import main

    capsys.readouterr()
    try:
        main(shlex.split(argv.format(ws=ws, out=out)))
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, pattern: str) -> str:
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


PRETRAIN = ("pretrain --model_name_or_path {ws}/tiny --train_file {ws}/train.json --eval_file {ws}/eval.json "
            "--output_dir {out} --lora_r 4 --fixed_mem_size 4 --model_max_length 48 --max_steps 1 "
            "--save_strategy no --eval_strategy no --report_to none")

# ----------------------------------------------------------------------------- 1. nothing lost, nothing left behind


@pytest.mark.parametrize("target", ["{ws}/ckpt", "{ws}/ckpt/smaller", "{out}"])
def test_export_never_writes_into_its_source_or_a_foreign_folder(ws, tmp_path, capsys, no_model, target):
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before, theirs = snapshot(ws / "ckpt"), snapshot(out)
    code, _, err = icae(f"export --checkpoint {{ws}}/ckpt --output {target} --lora_rank 2", capsys, ws, out)
    one_error(code, err, r"--output .* (is inside the checkpoint .*ckpt it exports|is not empty and is not an "
                         r"earlier export of .*ckpt); choose another --output")
    assert snapshot(ws / "ckpt") == before and snapshot(out) == theirs
    assert not (ws / "ckpt" / "smaller").exists()


def test_export_replaces_its_earlier_export_and_never_copies_the_sources_metrics(ws, tmp_path, capsys):
    source = tmp_path / "an-export"
    shutil.copytree(ws / "ckpt", source)
    config = json.loads((source / "icae_config.json").read_text())
    config["training"]["held_out_metrics"] = {"ae_loss": 0.01, "bleu": 99.0}  # measured on other weights
    (source / "icae_config.json").write_text(json.dumps(config))
    out = tmp_path / "smaller"
    for _ in range(2):  # the second time into the first export of the same checkpoint: allowed
        code, _, err = icae(f"export --checkpoint {source} --output {{out}} --lora_rank 2", capsys, ws, out)
        assert code == 0, err[-3000:]
    info = json.loads((out / "icae_config.json").read_text())["training"]
    assert "held_out_metrics" not in info and info["lora_rank_before_export"] == 4


def test_a_folder_without_icae_config_never_shadows_a_shipped_checkpoint(ws, tmp_path, capsys, monkeypatch):
    """`eval --task qa --checkpoint NAME` in a folder: the results are a file NAME-qa_eval_results.json, and an
    unrelated folder NAME/ (no icae_config.json) does not stand in for the shipped checkpoint."""
    shipped = tmp_path / "shipped"
    shutil.copytree(ws / "ckpt", shipped / "tiny-icae")
    monkeypatch.setattr(config_module, "SHIPPED_DIR", shipped)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-icae").mkdir()  # e.g. left by an older icae eval
    assert config_module.resolve_checkpoint("tiny-icae") == shipped / "tiny-icae"
    code, out, err = icae(f"eval --task qa --checkpoint tiny-icae --eval_file {{ws}}/qa.json --limit 2 "
                          "--max_new_tokens 2 --sources memory --dtype float32", capsys, ws)
    assert code == 0, err[-3000:]
    assert (tmp_path / "tiny-icae-qa_eval_results.json").is_file()
    assert list((tmp_path / "tiny-icae").iterdir()) == []
    # a local checkpoint of that name still wins
    shutil.copytree(ws / "fresh", tmp_path / "mine")
    (tmp_path / "tiny-icae").rmdir()
    (tmp_path / "mine").rename(tmp_path / "tiny-icae")
    assert config_module.resolve_checkpoint("tiny-icae") == Path("tiny-icae")
    assert config_module.results_path("tiny-icae", "eval_results.json") == Path("tiny-icae/eval_results.json")


@pytest.mark.parametrize("flag, message", [
    ("--per_device_train_batch_size 0", r"--per_device_train_batch_size must be at least 1 \(got 0\)"),
    ("--per_device_eval_batch_size 0", r"--per_device_eval_batch_size must be at least 1 \(got 0\)"),
    ("--gradient_accumulation_steps 0", r"--gradient_accumulation_steps must be at least 1"),
    ("--learning_rate nan", r"--learning_rate must be a finite number \(got nan\)"),
    ("--learning_rate -0.001", r"--learning_rate must be at least 0 \(got -0.001\)"),
    ("--memory_learning_rate inf", r"--memory_learning_rate must be a finite number \(got inf\)"),
    ("--warmup_steps -1", r"--warmup_steps must be at least 0"),
    ("--adam_epsilon 0", r"--adam_epsilon must be greater than 0 \(got 0.0\)"),
    ("--weight_decay nan", r"--weight_decay must be a finite number \(got nan\)"),
    ("--max_grad_norm -1", r"--max_grad_norm must be at least 0"),
    ("--adam_beta2 1.0", r"--adam_beta2 must be in \[0, 1\) \(got 1.0\)"),
    ("--max_steps -1 --num_train_epochs 0", r"--num_train_epochs must be a finite number greater than 0"),
])
def test_bad_training_values_are_refused_before_anything_loads_or_is_written(ws, tmp_path, capsys, no_model, flag,
                                                                             message):
    out = tmp_path / "run"
    code, _, err = icae(f"{PRETRAIN} {flag}", capsys, ws, out)
    one_error(code, err, message)
    assert not out.exists()


def test_finetune_checks_the_same_training_values(ws, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    code, _, err = icae("finetune --restore_from {ws}/ckpt --train_file {ws}/qa.json --output_dir {out} "
                        "--report_to none --learning_rate nan", capsys, ws, out)
    one_error(code, err, r"--learning_rate must be a finite number \(got nan\)")
    assert not out.exists()


def test_a_run_that_fails_at_its_first_step_does_not_block_the_corrected_rerun(ws, tmp_path, capsys):
    """A bad line met while streaming (after the held-out texts): the run stops with one line, and the same
    command on the fixed file starts in that output_dir (no "not empty and holds no complete checkpoint")."""
    out = tmp_path / "run"
    stream = f"{PRETRAIN} --streaming True --eval_size 2 --per_device_train_batch_size 16".replace(
        "--train_file {ws}/train.json --eval_file {ws}/eval.json", "--train_file {ws}/bad-line.jsonl")
    code, _, err = icae(stream, capsys, ws, out)
    one_error(code, err, r"bad-line.jsonl: line 13 is not valid JSON .*; fix or remove it")
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    code, _, err = icae(stream.replace("bad-line.jsonl", "train.jsonl"), capsys, ws, out)
    assert code == 0, err[-3000:]
    assert (out / "icae_weights.safetensors").is_file() and (out / "run_config.json").is_file()


def test_prepare_makes_no_folder_when_it_has_nothing_to_write(ws, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    for dataset in ("slimpajama", "pwc"):
        out = tmp_path / dataset
        code, _, err = icae(f"prepare --dataset {dataset} --source {{ws}}/no_such.jsonl --output_dir {{out}}",
                            capsys, ws, out)
        one_error(code, err, r"no_such.jsonl does not exist")
        assert not out.exists()


# ----------------------------------------------------------------------------- 2. one-line errors


WRITERS = {  # every command that writes: the path it writes, under a parent that is a file
    "pretrain": PRETRAIN.replace("--output_dir {out}", "--output_dir {ws}/train.json/run"),
    "finetune": "finetune --restore_from {ws}/ckpt --train_file {ws}/qa.json --output_dir {ws}/train.json/run "
                "--report_to none",
    "export": "export --checkpoint {ws}/ckpt --output {ws}/train.json/export",
    "prepare": "prepare --source {ws}/train.json --output_dir {ws}/train.json/data",
    "compress": "compress --checkpoint {ws}/ckpt --text hello -o {ws}/train.json/slots.safetensors",
    "eval": "eval --checkpoint {ws}/ckpt --eval_file {ws}/eval.json --output {ws}/train.json/results.json",
    "eval-qa": "eval --task qa --checkpoint {ws}/ckpt --eval_file {ws}/qa.json --output {ws}/train.json/r.json",
}


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_path_under_a_file_is_refused_before_the_work(ws, capsys, no_model, command):
    before = (ws / "train.json").read_bytes()
    code, _, err = icae(WRITERS[command], capsys, ws)
    one_error(code, err, r"--(output|output_dir) .*train.json/\S+: .*train.json is a file, not a folder; "
                         r"choose another")
    assert (ws / "train.json").read_bytes() == before


@pytest.mark.parametrize("command", ["pretrain", "compress", "eval"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(ws, capsys, no_model, command):
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys, a folder that takes no new files even for root")
    argv = WRITERS[command].replace("{ws}/train.json/", "/sys/icae-test-")
    code, _, err = icae(argv, capsys, ws)
    one_error(code, err, r"--(output|output_dir) /sys/icae-test-\S+: cannot write in /sys \(.*\); choose another")


@pytest.mark.parametrize("argv", [
    "compress --checkpoint {ws}/truncated --text hello -o {out}/s.safetensors",
    "reconstruct --checkpoint {ws}/truncated --context {ws}/context.txt",
    "generate --checkpoint {ws}/truncated --context {ws}/context.txt",
    "eval --checkpoint {ws}/truncated --eval_file {ws}/eval.json --output {out}/r.json",
    "eval --task qa --checkpoint {ws}/truncated --eval_file {ws}/qa.json --output {out}/r.json",
    "export --checkpoint {ws}/truncated --output {out}/export",
])
def test_a_truncated_weights_file_is_one_clean_error_everywhere(ws, tmp_path, capsys, no_model, argv):
    code, _, err = icae(argv, capsys, ws, tmp_path)
    one_error(code, err, r"truncated: icae_weights.safetensors is not a valid weights file: it is truncated")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    ("generate --checkpoint {ws}/fresh --context {ws}/context.txt --prompt ''", r"--prompt is empty"),
    ("generate --checkpoint {ws}/fresh --context {ws}/context.txt --max_new_tokens 0",
     r"--max_new_tokens must be at least 1 \(got 0\)"),
    ("reconstruct --checkpoint {ws}/fresh --context {ws}/context.txt --max_new_tokens -2",
     r"--max_new_tokens must be at least 1 \(got -2\)"),
    ("generate --checkpoint {ws}/ckpt --context {ws}/context.txt --prompt What?",
     r"checkpoint .*ckpt was pretrained only \(no \[FT\] training\), so it cannot answer --prompt; fine-tune it "
     r"first: icae finetune --restore_from"),
    ("eval --task qa --checkpoint {ws}/ckpt --eval_file {ws}/qa.json --max_new_tokens 0",
     r"--max_new_tokens must be at least 1 \(got 0\)"),
    ("eval --task qa --checkpoint {ws}/ckpt --eval_file {ws}/qa.json --max_context_length 0",
     r"--max_context_length must be at least 1 \(got 0\)"),
    ("eval --checkpoint {ws}/ckpt --eval_file {ws}/eval.json --model_max_length 1",
     r"--model_max_length must be at least 2 \(got 1\)"),
    ("eval --checkpoint {ws}/ckpt --eval_file {ws}/eval.json --batch_size 0", r"--batch_size must be at least 1"),
    ("compress --checkpoint {ws}/ckpt --text hello -o {ws}", r"-(-output|o) .* is a folder; name a file to write"),
    ("compress --checkpoint {ws}/ckpt --text hello -o {out}/s.safetensors --batch_size 0",
     r"--batch_size must be at least 1"),
    ("export --checkpoint {ws}/ckpt --output {out}/e --lora_rank 9",
     r"--lora_rank must be between 1 and the checkpoint's rank 4 - 1 \(got 9\)"),
    ("export --checkpoint {ws}/ckpt --output {out}/e --eval_texts 2 --eval_file {ws}/no_such.json",
     r"no_such.json does not exist"),
    # nothing lost: outputs onto a checkpoint's own files or the input
    ("eval --checkpoint {ws}/ckpt --eval_file {ws}/eval.json --output {ws}/ckpt/icae_config.json",
     r"--output .*ckpt/icae_config.json is a file of the checkpoint in .*ckpt; writing there would destroy"),
    ("compress --checkpoint {ws}/ckpt --text hi -o {ws}/ckpt/icae_weights.safetensors",
     r"--output .*icae_weights.safetensors is a file of the checkpoint"),
    ("compress --checkpoint {ws}/ckpt --file {ws}/train.json -o {ws}/train.json",
     r"--output .*train.json is the --file it compresses"),
    (PRETRAIN.replace("--output_dir {out}", "--output_dir {ws}/ckpt") + " --restore_from {ws}/ckpt/ "
     "--overwrite_output_dir", r"--overwrite_output_dir would delete --restore_from .*ckpt/?, which is inside "
     r"--output_dir .*ckpt: choose another --output_dir"),
    ("reconstruct --checkpoint {ws}/ckpt {ws}", r"is a folder; pass a slots file written by `icae compress -o FILE`"),
    ("prepare --source {ws}/train.json --output_dir {out}/data --max_docs -1", r"--max_docs must be at least 1"),
    ("compress --checkpoint {ws}/ckpt --text ' ' -o {out}/s.safetensors", r"--text is empty: there is nothing"),
    ("compress --checkpoint {ws}/ckpt --text hi -o {out}/s.safetensors --device gpu",
     r"--device 'gpu' is not a device: pass auto, cpu, cuda or cuda:N"),
    ("eval --checkpoint {ws}/ckpt --eval_file {ws}/eval.json --output {out}/r.json --device cuda:99",
     r"--device cuda:99: there (is no CUDA GPU here|are only \d+ CUDA devices)"),
])
def test_bad_flags_of_the_newer_commands_fail_before_the_model_loads(ws, tmp_path, capsys, no_model, argv, message):
    before = snapshot(ws)
    code, _, err = icae(argv, capsys, ws, tmp_path)
    one_error(code, err, message)
    assert list(tmp_path.iterdir()) == [] and snapshot(ws) == before


def test_a_huge_max_new_tokens_is_capped_at_the_context_with_a_warning(ws):
    from icae.core.inference import generate_ids
    from icae.core.model import load_checkpoint

    model = load_checkpoint(str(ws / "fresh"), device="cpu", dtype="float32")
    model.base.config.max_position_embeddings = 40
    memory = model.compress(["alpha beta gamma delta"])  # 22 tokens: 2 segments of 4 slots, [LM]: room for 31
    with pytest.warns(UserWarning, match=r"max_new_tokens 1000000 capped at 31: the model's context ends at "
                                         r"position 40"):
        ids = generate_ids(model, memory, max_new_tokens=10**6)
    assert len(ids[0]) <= 31


def test_slots_refuse_other_weights_of_the_same_sizes_and_old_files_still_load(ws, tmp_path, capsys):
    slots = tmp_path / "slots.safetensors"
    code, _, err = icae(f"compress --checkpoint {{ws}}/ckpt --text hello -o {slots} --dtype float32", capsys, ws)
    assert code == 0, err[-3000:]
    code, _, err = icae(f"reconstruct --checkpoint {{ws}}/other-weights {slots} --dtype float32", capsys, ws)
    one_error(code, err, r"slots.safetensors was compressed by other weights \(fingerprint [0-9a-f]{16}\) than this "
                         r"checkpoint's \([0-9a-f]{16}\).*use the checkpoint it was made with")
    code, _, err = icae(f"reconstruct --checkpoint {{ws}}/ckpt {slots} --dtype float32 --max_new_tokens 2", capsys, ws)
    assert code == 0, err[-3000:]
    # a slots file written before fingerprints: read without that check
    from safetensors import safe_open

    with safe_open(str(slots), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "weights_fingerprint"}
    save_file(load_file(slots), str(slots), metadata=metadata)
    code, _, err = icae(f"reconstruct --checkpoint {{ws}}/other-weights {slots} --dtype float32 --max_new_tokens 2",
                        capsys, ws)
    assert code == 0, err[-3000:]


@pytest.mark.parametrize("argv, message", [
    ("pretrain --train_file {ws}/no_such.jsonl --streaming True --max_steps 1 --output_dir {out}",
     r"no_such.jsonl does not exist; pass a .json"),
    ("pretrain --train_file ./data/no_such --streaming True --max_steps 1 --output_dir {out}",
     r"\./data/no_such does not exist"),
    ("pretrain --train_file {ws}/utf16.json --output_dir {out}", r"utf16.json is UTF-16 \(or UTF-32\) encoded; "
                                                                r"re-encode it as UTF-8"),
    ("pretrain --train_file {ws}/utf16le.jsonl --output_dir {out}", r"utf16le.jsonl is UTF-16 .*re-encode it as UTF-8"),
    ("finetune --restore_from {ws}/ckpt --train_file {ws}/utf16.json --output_dir {out}",
     r"utf16.json is UTF-16 .*re-encode it as UTF-8"),
    ("generate --checkpoint {ws}/fresh --context {ws}/utf16.json", r"utf16.json is UTF-16 .*re-encode it as UTF-8"),
])
def test_data_paths_missing_or_not_utf8(ws, tmp_path, capsys, no_model, monkeypatch, argv, message):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    out = tmp_path / "run"
    argv = argv + " --model_name_or_path {ws}/tiny --report_to none" if argv.startswith(("pretrain", "finetune")) \
        else argv
    code, _, err = icae(argv, capsys, ws, out)
    one_error(code, err, message)
    assert not out.exists()
