"""`icae demo` end to end (train, evaluate, reconstruct, write the summary) on a tiny model."""

import json

from icae.recipes.demo import main as demo
from icae.testing import save_tiny_model


def test_demo_runs_and_writes_its_summary(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    assert demo(["--output_dir", str(out), "--eval_texts", "4", "--model_name_or_path", model,
                 "--max_steps", "2", "--eval_steps", "1", "--lora_r", "4"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    printed = capsys.readouterr().out
    assert f"eval AE loss before training: {summary['eval_ae_loss_before']:.4f}" in printed
    assert f"eval AE loss after training:  {summary['eval_ae_loss_after']:.4f}" in printed
    assert summary["example"]["original"] in printed and "reconstruction from the memory slots" in printed
    for name in ("icae_weights.safetensors", "metrics.jsonl", "loss.png", "eval_results.json"):
        assert (out / name).is_file()
