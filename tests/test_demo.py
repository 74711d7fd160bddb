"""`icae demo` end to end (train, evaluate, show a checkpoint at work, write the summary) on a tiny model."""

import json

from icae.recipes.demo import main as demo
from icae.testing import save_tiny_model


def test_demo_runs_and_writes_its_summary(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    # the trained tiny run stands in for the shipped checkpoint (which needs the real base model)
    assert demo(["--output_dir", str(out), "--checkpoint", str(out), "--model_name_or_path", model,
                 "--max_steps", "2", "--eval_steps", "1", "--lora_r", "4"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    printed = capsys.readouterr().out
    assert f"eval AE loss:                 {summary['eval_ae_loss_before']:.3f} -> " \
           f"{summary['eval_ae_loss_after']:.3f}" in printed
    shown = summary["shipped"]
    assert shown["original"] in printed and f"token accuracy {shown['token_accuracy']:.3f}" in printed
    lm_ratio = json.loads((out / "icae_config.json").read_text()).get("training", {}).get("lm_ratio") or 0
    assert ("continuation generated from the slots" in printed) == (lm_ratio > 0)
    assert ("no continuation: this checkpoint was trained to reconstruct only" in printed) == (lm_ratio == 0)
    for name in ("icae_weights.safetensors", "metrics.jsonl", "loss.png", "demo_summary.json"):
        assert (out / name).is_file()


def test_demo_without_a_shipped_checkpoint_still_trains(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    assert demo(["--output_dir", str(out), "--checkpoint", str(tmp_path / "missing"), "--model_name_or_path", model,
                 "--max_steps", "1", "--eval_steps", "1", "--lora_r", "4"]) == 0
    assert "(skipped: " in capsys.readouterr().out
    assert json.loads((out / "demo_summary.json").read_text())["shipped"] is None
