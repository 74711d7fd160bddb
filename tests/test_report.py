"""`icae report` on hand-made run folders: curves, CPU time across a resume, the table."""

import json

import pytest

from icae.errors import UserError
from icae.recipes.report import cumulative_cpu_seconds, main, summarize


def make_run(path, records, layout="epl", seed=1):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "run_config.json").write_text(json.dumps({"icae": {"position_layout": layout, "decoder_mode": "shared"},
                                                      "seed": seed, "trainable_params": 10}))
    return path


RECORDS = [  # a run resumed after step 20: the second process's CPU clock starts again near 0
    {"step": 10, "cpu_seconds": 50.0, "loss": 5.0},
    {"step": 20, "cpu_seconds": 100.0, "eval_loss": 4.0, "eval_token_accuracy": 0.1, "eval_bleu": 2.0},
    {"step": 30, "cpu_seconds": 40.0, "loss": 3.0},
    {"step": 40, "cpu_seconds": 90.0, "eval_loss": 2.0, "eval_token_accuracy": 0.6, "eval_bleu": 40.0,
     "eval_exact_match": 0.25},
    {"step": 40, "cpu_seconds": 91.0, "train_runtime": 100.0, "train_loss": 4.0},
]


def test_cpu_seconds_accumulate_across_a_resume():
    assert cumulative_cpu_seconds(RECORDS) == [50.0, 100.0, 140.0, 190.0, 191.0]
    assert cumulative_cpu_seconds([{"step": 1}, {"cpu_seconds": 3.0}]) == [None, 3.0]


def test_summary_has_accuracy_against_cpu_time(tmp_path):
    row = summarize(make_run(tmp_path / "a", RECORDS))
    assert row["accuracy_curve"] == [(20, 100.0, 0.1), (40, 190.0, 0.6)]
    assert row["final_eval_token_accuracy"] == 0.6 and row["final_eval_bleu"] == 40.0
    assert row["final_eval_exact_match"] == 0.25
    assert row["cpu_seconds"] == 191.0 and row["final_eval_ae_loss"] == 2.0


def test_report_writes_png_table_and_json(tmp_path, capsys):
    make_run(tmp_path / "runs" / "a", RECORDS)
    make_run(tmp_path / "runs" / "b", RECORDS[:2], layout="default")
    assert main([str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out.md").read_text()
    assert "token accuracy" in table and "| 0.600 | 0.250 |" in table and "| 0.100 |" in table
    data = json.loads((tmp_path / "out.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["a", "b"]
    assert (tmp_path / "out.png").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folders"):
        main([str(tmp_path / "empty"), "-o", str(tmp_path / "x")])
