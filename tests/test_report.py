"""`icae report` on hand-made run folders: curves, CPU time across a resume, the table."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from icae.errors import UserError
from icae.recipes.report import contrast_interval, cumulative_cpu_seconds, describe, main, summarize, t_quantile


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


# --- statistics over seeds: checked against numpy and closed forms computed here, not by the module


def test_describe_matches_numpy():
    values = [0.41, 0.47, 0.38]
    d = describe(values + [None])  # a run without the metric does not count
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(np.mean(values)) and d["std"] == pytest.approx(np.std(values, ddof=1))
    assert (d["min"], d["max"]) == (0.38, 0.47)
    assert describe([0.5]) == {"n": 1, "mean": 0.5, "std": None, "min": 0.5, "max": 0.5}
    assert describe([None]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None}


def test_t_quantile_matches_closed_forms():
    # df=1 is the Cauchy distribution, df=2 has q = (2p-1) / sqrt(2p(1-p)); large df tends to the normal
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    assert t_quantile(0.95, 2) == pytest.approx(0.9 / math.sqrt(2 * 0.95 * 0.05), rel=1e-9)
    assert t_quantile(0.975, 1e4) == pytest.approx(NormalDist().inv_cdf(0.975), abs=3e-4)
    assert t_quantile(0.975, 3) > t_quantile(0.975, 3.5) > t_quantile(0.975, 4)  # fractional df in between


def welch_by_hand(a, b, q):
    """Welch's interval for mean(a) - mean(b), written out from the textbook formula."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    d = np.mean(a) - np.mean(b)
    return d, df, (d - q(df) * math.sqrt(va + vb), d + q(df) * math.sqrt(va + vb))


def test_welch_interval_matches_the_textbook_formula():
    a, b = [0.52, 0.58, 0.49], [0.40, 0.47, 0.36, 0.44]
    got = contrast_interval([a, b], [1, -1])
    d, df, (lo, hi) = welch_by_hand(a, b, lambda df: t_quantile(0.975, df))
    assert got["estimate"] == pytest.approx(d) and got["df"] == pytest.approx(df)
    assert (got["low"], got["high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert got["low"] > 0  # these two groups are well apart
    wide = contrast_interval([a, [0.1, 0.9]], [1, -1])
    assert wide["low"] < 0 < wide["high"]


def test_welch_interval_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.52, 0.58, 0.49], [0.40, 0.47, 0.36, 0.44]
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    got = contrast_interval([a, b], [1, -1])
    assert (got["low"], got["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_interaction_interval_is_satterthwaite_over_four_groups():
    g = [[0.6, 0.65, 0.7], [0.3, 0.35, 0.32], [0.5, 0.52, 0.55], [0.4, 0.45, 0.41]]
    got = contrast_interval(g, [1, -1, -1, 1])
    v = [np.var(x, ddof=1) / len(x) for x in g]
    df = sum(v) ** 2 / sum(vi**2 / (len(x) - 1) for vi, x in zip(v, g))
    est = (np.mean(g[0]) - np.mean(g[1])) - (np.mean(g[2]) - np.mean(g[3]))
    half = t_quantile(0.975, df) * math.sqrt(sum(v))
    assert got["estimate"] == pytest.approx(est) and got["df"] == pytest.approx(df)
    assert (got["low"], got["high"]) == (pytest.approx(est - half), pytest.approx(est + half))


def test_fewer_than_two_seeds_give_no_interval():
    got = contrast_interval([[0.5], [0.4, 0.45]], [1, -1])
    assert got["note"] == "n<2" and got["low"] is None and got["estimate"] == pytest.approx(0.075)
    assert contrast_interval([[], [0.4, 0.45]], [1, -1])["estimate"] is None
    same = contrast_interval([[0.5, 0.5], [0.4, 0.4]], [1, -1])
    assert same["note"] == "no spread" and same["low"] == same["high"] == pytest.approx(0.1)
