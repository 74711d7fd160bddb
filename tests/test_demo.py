"""`icae demo` end to end (train, evaluate, show a checkpoint at work, write the summary) on a tiny model."""

import json

from icae.recipes.demo import main as demo, show_answer
from icae.testing import save_tiny_model
from test_finetune import answer_records, answering  # noqa: F401  (the fixture: a tiny model trained to answer)


def test_demo_runs_and_writes_its_summary(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    # the trained tiny run stands in for the shipped checkpoint (which needs the real base model)
    assert demo(["--output_dir", str(out), "--checkpoint", str(out), "--qa_checkpoint", str(tmp_path / "no-qa"),
                 "--model_name_or_path", model, "--max_steps", "2", "--eval_steps", "1", "--lora_r", "4"]) == 0
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
    assert demo(["--output_dir", str(out), "--checkpoint", str(tmp_path / "missing"),
                 "--qa_checkpoint", str(tmp_path / "missing-qa"), "--model_name_or_path", model, "--max_steps", "1", "--eval_steps", "1", "--lora_r", "4"]) == 0
    assert "(skipped: " in capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["shipped"] is None and summary["shipped_qa"] is None


def test_demo_answers_a_held_out_question_from_the_slots(answering, tmp_path, capsys):  # noqa: F811
    records = answer_records()
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    answering.training_info = {"train_source": str(data), "max_context_length": 512}
    answering.save_pretrained(tmp_path / "qa-ckpt")
    for k in (0, 3):
        shown = show_answer(str(tmp_path / "qa-ckpt"), question=k)
        printed = capsys.readouterr().out
        assert shown["question"] == records[k]["prompt"] and shown["reference"] == records[k]["answer"]
        assert shown["answer_from_slots"] == records[k]["answer"]  # the tiny model answers every question exactly
        assert f"answer from the {shown['slots']} slots:" in printed and records[k]["prompt"] in printed
        assert " ".join(shown["answer_from_full_context_base"].split()) in printed
