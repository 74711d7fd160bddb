"""`icae report` on hand-made run folders: curves, CPU time across a resume, the table, statistics over seeds."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from icae.errors import UserError
from icae.recipes.report import main
from icae.recipes.report_stats import (
    align_curves, contrast_interval, cumulative_cpu_seconds, describe, summarize, t_quantile,
)


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


def test_wall_time_and_tokens_add_up_over_the_processes_of_a_resumed_run(tmp_path):
    """Each process logs its own train_runtime and restarts its text_tokens counter (a stop at step 20, the
    resumed process to 40, then a resume that had nothing left to train)."""
    records = [{"step": 10, "cpu_seconds": 5.0, "text_tokens": 300}, {"step": 20, "cpu_seconds": 9.0, "text_tokens": 600},
               {"step": 20, "cpu_seconds": 9.5, "train_runtime": 60.0},
               {"step": 30, "cpu_seconds": 4.0, "text_tokens": 300}, {"step": 40, "cpu_seconds": 8.0, "text_tokens": 600},
               {"step": 40, "cpu_seconds": 8.5, "train_runtime": 40.0},
               {"step": 40, "cpu_seconds": 1.0, "train_runtime": 0.01}]
    row = summarize(make_run(tmp_path / "a", records))
    assert row["wall_time_s"] == pytest.approx(100.0, abs=0.1) and row["steps"] == 40
    assert row["text_tokens_per_second"] == pytest.approx(1200 / 100.01, abs=0.1)


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


def test_t_quantile_matches_the_printed_table():
    """Student's t table (two-sided 95% and 99%), to the 6 digits it prints."""
    table = {(0.975, 3): 3.182446, (0.975, 4): 2.776445, (0.975, 10): 2.228139, (0.975, 30): 2.042272,
             (0.995, 5): 4.032143, (0.995, 20): 2.845340}
    for (p, df), q in table.items():
        assert t_quantile(p, df) == pytest.approx(q, abs=1e-6), (p, df)


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


# --- a fake multi-seed ablation: run folders written here, no model


def make_seed_run(root, layout, targets, decoder, seed, acc, loss, steps=(20, 40, 60), reconstruction=True, lora_r=32):
    """A finished run whose last eval has token accuracy `acc` and AE loss `loss`; earlier evals are worse."""
    name = f"{layout}-{targets or 'qv'}-{decoder}-r{lora_r}-seed{seed}"
    records = []
    for step in steps:
        records.append({"step": step, "cpu_seconds": step * 10.0, "loss": loss + 1.0})
        ev = {"step": step, "cpu_seconds": step * 10.0 + 5, "eval_loss": loss + (steps[-1] - step) / 100}
        if reconstruction:
            ev |= {"eval_token_accuracy": acc * step / steps[-1], "eval_bleu": 100 * acc * step / steps[-1],
                   "eval_exact_match": 0.0}
        records.append(ev)
    records.append({"step": steps[-1], "cpu_seconds": steps[-1] * 10.0 + 9, "train_runtime": 99.0})
    path = root / name
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"icae": {"position_layout": layout, "lora_target_modules": targets, "decoder_mode": decoder,
                       "lora_r": lora_r}, "examples": {"model_max_length": 32}, "seed": seed,
              "trainable_params": 10 if targets else 5}
    (path / "run_config.json").write_text(json.dumps(config))
    return path


QV, ALL = "q,v (default)", "all-linear"
DEFAULT_QV = {"acc": [0.40, 0.44, 0.37], "loss": [1.2, 1.1, 1.35]}  # the two 3-seed cells of the brief
EPL_QV = {"acc": [0.52, 0.58, 0.49], "loss": [0.9, 0.8, 1.0]}
DEFAULT_ALL = {"acc": [0.45, None], "loss": [1.0, 1.1]}  # seed 2 has no reconstruction metrics
EPL_ALL = {"acc": [0.70, 0.66], "loss": [0.6, 0.7]}


@pytest.fixture(scope="module")
def seed_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    runs = root / "runs"
    for layout, targets, values in [("default", "", DEFAULT_QV), ("epl", "", EPL_QV),
                                    ("default", "all-linear", DEFAULT_ALL), ("epl", "all-linear", EPL_ALL)]:
        for seed, (acc, loss) in enumerate(zip(values["acc"], values["loss"]), 1):
            steps = (20, 30, 60) if (layout, targets, seed) == ("epl", "", 3) else (20, 40, 60)  # another eval schedule
            make_seed_run(runs, layout, targets, "shared", seed, acc or 0.0, loss, steps, reconstruction=acc is not None)
    make_seed_run(runs, "default", "", "frozen", 1, 0.10, 3.0)  # the frozen pair: one default seed only
    make_seed_run(runs, "epl", "", "frozen", 1, 0.12, 2.9)
    make_seed_run(runs, "epl", "", "frozen", 2, 0.14, 2.8)
    make_seed_run(runs, "epl", "", "shared", 1, 0.9, 0.1, lora_r=16)  # another setting: its own cell, no pair
    assert main([str(runs), "-o", str(root / "report")]) == 0
    return root / "report", json.loads((root / "report.json").read_text())


def cell(data, layout, targets, decoder="shared", lora_r=32):
    found = [c for c in data["over_seeds"] if (c["layout"], c["lora_target_modules"], c["decoder_mode"]) ==
             (layout, targets, decoder) and c["other"] == {"icae.lora_r": lora_r}]
    assert len(found) == 1, found
    return found[0]


def test_cells_are_seed_replicates_and_other_settings_split_them(seed_report):
    _, data = seed_report
    assert len(data["over_seeds"]) == 7  # 4 shared + 2 frozen cells at lora_r=32, 1 at lora_r=16
    assert cell(data, "epl", QV)["seeds"] == [1, 2, 3] and cell(data, "epl", QV, lora_r=16)["seeds"] == [1]


@pytest.mark.parametrize("layout,values", [("default", DEFAULT_QV), ("epl", EPL_QV)])
def test_cell_spread_matches_numpy(seed_report, layout, values):
    c = cell(seed_report[1], layout, QV)
    for metric, expected in [("final_eval_token_accuracy", values["acc"]), ("final_eval_ae_loss", values["loss"]),
                             ("final_eval_bleu", [100 * a for a in values["acc"]])]:
        got, x = c[metric], np.array(expected)
        assert got["n"] == 3
        assert got["mean"] == pytest.approx(x.mean()) and got["std"] == pytest.approx(x.std(ddof=1))
        assert (got["min"], got["max"]) == (pytest.approx(x.min()), pytest.approx(x.max()))


def test_layout_effect_is_welchs_interval(seed_report):
    path, data = seed_report
    effect = next(e for e in data["layout_effects"] if e["at"] == {"lora_target_modules": QV, "decoder_mode": "shared",
                                                                      "icae.lora_r": 32})
    for metric, key in [("final_eval_token_accuracy", "acc"), ("final_eval_ae_loss", "loss")]:
        d, df, (lo, hi) = welch_by_hand(EPL_QV[key], DEFAULT_QV[key], lambda df: t_quantile(0.975, df))
        got = effect["difference"][metric]
        assert got["estimate"] == pytest.approx(d) and got["df"] == pytest.approx(df)
        assert (got["low"], got["high"]) == (pytest.approx(lo), pytest.approx(hi))
    acc = effect["difference"]["final_eval_token_accuracy"]
    assert acc["low"] > 0  # EPL is better here by more than the seed noise
    table = path.with_suffix(".md").read_text()
    assert "95% interval (Welch t, Welch–Satterthwaite df)" in table
    assert f"| {acc['estimate']:+.3f} | [{acc['low']:+.3f}, {acc['high']:+.3f}] (df {acc['df']:.1f}) |" in table
    assert len(data["layout_effects"]) == 3  # q,v and all-linear shared, q,v frozen; lora_r=16 has no default


def test_decoder_effect_is_shared_minus_frozen_with_welchs_interval(seed_report):
    """The seed's "fire the decoder": shared - frozen at each layout, all else equal (the fixture's frozen
    pair: EPL q,v seeds 1-2 at 0.12 / 0.14, default q,v seed 1 only)."""
    path, data = seed_report
    (epl,) = [e for e in data["decoder_effects"] if e["at"] == {"layout": "epl", "lora_target_modules": QV,
                                                                 "icae.lora_r": 32}]
    d, df, (lo, hi) = welch_by_hand(EPL_QV["acc"], [0.12, 0.14], lambda df: t_quantile(0.975, df))
    got = epl["difference"]["final_eval_token_accuracy"]
    assert got["estimate"] == pytest.approx(d) and got["df"] == pytest.approx(df)
    assert (got["low"], got["high"]) == (pytest.approx(lo), pytest.approx(hi))
    (default,) = [e for e in data["decoder_effects"] if e["at"]["layout"] == "default"]
    assert default["difference"]["final_eval_token_accuracy"]["estimate"] == pytest.approx(
        sum(DEFAULT_QV["acc"]) / 3 - 0.10)
    assert default["difference"]["final_eval_token_accuracy"].get("low") is None  # one frozen seed: no interval
    assert len(data["decoder_effects"]) == 2  # all-linear has no frozen runs
    table = path.with_suffix(".md").read_text()
    assert "| at | metric | shared mean | frozen mean | shared − frozen |" in table
    assert f"| {got['estimate']:+.3f} | [{got['low']:+.3f}, {got['high']:+.3f}] (df {got['df']:.1f}) |" in table


def test_fewer_than_two_seeds_print_n_below_2(seed_report):
    path, data = seed_report
    frozen = next(e for e in data["layout_effects"] if e["at"]["decoder_mode"] == "frozen")
    assert frozen["difference"]["final_eval_ae_loss"]["note"] == "n<2"
    assert frozen["difference"]["final_eval_ae_loss"]["estimate"] == pytest.approx(2.85 - 3.0)
    table = path.with_suffix(".md").read_text()
    assert "| -0.1500 | n<2 |" in table


def test_runs_without_reconstruction_metrics_count_as_missing(seed_report):
    path, data = seed_report
    c = cell(data, "default", ALL)
    assert c["final_eval_token_accuracy"]["n"] == 1 and c["final_eval_ae_loss"]["n"] == 2
    assert c["final_eval_bleu"] == {"n": 1, "mean": 45.0, "std": None, "min": 45.0, "max": 45.0}
    effect = next(e for e in data["layout_effects"] if e["at"]["lora_target_modules"] == ALL)
    assert effect["difference"]["final_eval_token_accuracy"]["note"] == "n<2"
    assert effect["difference"]["final_eval_ae_loss"]["low"] is not None
    row = next(line for line in path.with_suffix(".md").read_text().splitlines() if "default-all-linear-shared-r32-seed2" in line)
    assert "| – | – | – |" in row  # token accuracy, exact match, BLEU-4


def test_mean_curves_use_the_steps_all_seeds_share(seed_report):
    c = cell(seed_report[1], "epl", QV)["eval_loss_curve"]  # seed 3 evaluated at 20, 30, 60; the others at 20, 40, 60
    assert c["steps"] == [20, 60] and c["n"] == 3
    at20 = [loss + 0.4 for loss in EPL_QV["loss"]]
    assert c["mean"] == [pytest.approx(np.mean(at20)), pytest.approx(np.mean(EPL_QV["loss"]))]
    assert c["min"][0] == pytest.approx(min(at20)) and c["max"][1] == pytest.approx(max(EPL_QV["loss"]))
    assert align_curves([[(1, 5.0), (2, 6.0)], [], [(2, 7.0, "x"), (3, 8.0)]]) == ([2], [[6.0, 7.0]])


def test_interactions_combine_four_cells(seed_report):
    path, data = seed_report
    lora = next(i for i in data["interactions"] if i["factor"] == "lora_target_modules")
    assert lora["levels"] == [ALL, QV]  # (epl - default | all-linear) - (epl - default | q,v)
    groups = [EPL_ALL["loss"], DEFAULT_ALL["loss"], EPL_QV["loss"], DEFAULT_QV["loss"]]
    v = [np.var(g, ddof=1) / len(g) for g in groups]
    df = sum(v) ** 2 / sum(vi**2 / (len(g) - 1) for vi, g in zip(v, groups))
    est = np.mean(groups[0]) - np.mean(groups[1]) - np.mean(groups[2]) + np.mean(groups[3])
    got = lora["difference"]["final_eval_ae_loss"]
    assert got["estimate"] == pytest.approx(est) and got["df"] == pytest.approx(df)
    assert got["high"] - got["low"] == pytest.approx(2 * t_quantile(0.975, df) * math.sqrt(sum(v)))
    assert lora["difference"]["final_eval_token_accuracy"]["note"] == "n<2"
    decoder = next(i for i in data["interactions"] if i["factor"] == "decoder_mode")
    assert decoder["levels"] == ["shared", "frozen"] and decoder["difference"]["final_eval_ae_loss"]["note"] == "n<2"
    assert "(epl − default \\| all-linear) − (epl − default \\| q,v (default))" in path.with_suffix(".md").read_text()


def test_plot_has_the_over_seeds_row(seed_report):
    from PIL import Image

    path, _ = seed_report
    with Image.open(path.with_suffix(".png")) as image:
        assert image.height > 1000  # two rows of panels: the runs, then the means over seeds with bands
    assert "min–max over seeds" in path.with_suffix(".md").read_text()


def test_a_run_has_one_color_in_every_panel(tmp_path, monkeypatch):
    """A run with no eval yet (training loss only) comes first: the other runs keep their colors across panels."""
    import matplotlib.pyplot as plt

    from icae.recipes import report

    make_run(tmp_path / "runs" / "a-early", [{"step": 10, "cpu_seconds": 5.0, "loss": 6.0}], layout="default")
    make_run(tmp_path / "runs" / "b-run", RECORDS)
    make_run(tmp_path / "runs" / "c-run", RECORDS, layout="default", seed=2)
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert main([str(tmp_path / "runs"), "-o", str(tmp_path / "report")]) == 0
    colors: dict[str, set] = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            if line.get_label() not in ("a-early", "b-run", "c-run"):  # the means over seeds (second row)
                continue
            colors.setdefault(line.get_label(), set()).add(line.get_color() if isinstance(line.get_color(), str)
                                                           else tuple(line.get_color()))
    assert set(colors) == {"a-early", "b-run", "c-run"}
    assert all(len(c) == 1 for c in colors.values()), colors
    assert len({next(iter(c)) for c in colors.values()}) == 3
    assert report.run_colors([{"run": "x"}, {"run": "y"}])["y"] != report.run_colors([{"run": "x"}])["x"]


def test_verdicts_answer_the_seeds_questions(seed_report):
    path, data = seed_report
    said = {v.split("?")[0]: v for v in data["verdicts"]}
    qv, all_linear = "LoRA=q,v (default), decoder=shared, icae.lora_r=32", "LoRA=all-linear, decoder=shared, icae.lora_r=32"
    # EPL q,v beats default q,v in token accuracy beyond the noise (test_layout_effect_is_welchs_interval)
    assert said[f"Does EPL beat the default layout ({qv})"].split("? ")[1].startswith("Yes, by more than the seed")
    # all-linear: one default seed has token accuracy (no interval); the AE loss is 0.65 vs 1.05 over 2 seeds each
    lo, hi = welch_by_hand(EPL_ALL["loss"], DEFAULT_ALL["loss"], lambda df: t_quantile(0.975, df))[2]
    assert hi < 0
    assert "? Token accuracy has no interval yet; the AE loss says yes" in said[f"Does EPL beat the default layout ({all_linear})"]
    assert "? Not answerable yet" in said["Does EPL beat the default layout (LoRA=q,v (default), decoder=frozen, icae.lora_r=32)"]
    assert said["Does training the decoder help EPL (LoRA=q,v (default), icae.lora_r=32)"].split("? ")[1].startswith("Yes")
    assert "Does all-linear LoRA help EPL more than the default layout (decoder=shared, icae.lora_r=32)" in said
    assert not any(v.startswith("Interim") for v in data["verdicts"])  # every run's last eval is at step 60
    table = path.with_suffix(".md").read_text()
    assert table.startswith("Verdicts") and all(f"- {v}" in table for v in data["verdicts"])
    answered = [v for v in data["verdicts"] if "? Not answerable yet" not in v]
    assert len(answered) == 4  # layout at q,v and all-linear (AE loss), the interaction (AE loss), decoder at EPL
    assert f"at least one of these 4 answers would still say yes or the opposite with probability about {1 - 0.95**4:.0%}" \
        in table.splitlines()[0]


def test_verdict_sees_no_difference_and_the_opposite():
    from icae.recipes.report import verdict
    from icae.recipes.report_stats import contrast_interval

    def contrast(acc_a, acc_b, loss_a, loss_b):
        return {"final_eval_token_accuracy": contrast_interval([acc_a, acc_b], [1, -1]),
                "final_eval_ae_loss": contrast_interval([loss_a, loss_b], [1, -1])}

    a, b = [0.10, 0.30, 0.22], [0.20, 0.25, 0.15]
    lo, hi = welch_by_hand(a, b, lambda df: t_quantile(0.975, df))[2]
    assert lo < 0 < hi
    said = verdict("Q", contrast(a, b, [1.0, 1.2, 1.1], [1.1, 1.0, 1.2]), "a − b")
    assert said.startswith("Q? No detectable difference in token accuracy at this budget, nor in AE loss (a − b: ")
    said = verdict("Q", contrast([0.1, 0.12, 0.11], [0.5, 0.52, 0.55], [2.0, 2.1, 2.2], [1.0, 1.1, 1.2]), "a − b")
    assert said.startswith("Q? No, the opposite, by more than the seed-to-seed noise (")
    said = verdict("Q", contrast(a, b, [1.0, 1.1, 1.05], [2.0, 2.1, 2.2]), "a − b")  # loss lower for a: it says yes
    assert said.startswith("Q? No detectable difference in token accuracy at this budget; the AE loss says yes")


def test_verdicts_warn_when_runs_end_at_different_steps():
    from icae.recipes.report import verdicts

    warned = verdicts([{"final_eval_steps": [1000, None]}, {"final_eval_steps": [1200]}], [], [], [])
    assert len(warned) == 1 and warned[0].startswith("Interim: the runs' last evals are at different steps (1,000–1,200)")
    assert verdicts([{"final_eval_steps": [1000]}, {"final_eval_steps": [1000, 1000]}], [], [], []) == []


def test_at_step_compares_the_runs_as_they_stood_then(seed_report, tmp_path):
    root = seed_report[0].parent
    assert main([str(root / "runs"), "-o", str(tmp_path / "at40"), "--at_step", "40"]) == 0
    data = json.loads((tmp_path / "at40.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    for seed, acc in enumerate(DEFAULT_QV["acc"], 1):  # the fixture's evals: accuracy grows as acc * step / 60
        row = rows[f"default-qv-shared-r32-seed{seed}"]
        assert row["final_eval_step"] == 40 and row["final_eval_token_accuracy"] == pytest.approx(acc * 40 / 60)
        assert row["cpu_seconds"] == pytest.approx(405.0) and row["steps"] == 40
    assert rows["epl-qv-shared-r32-seed3"]["final_eval_step"] == 30  # evaluated at 20, 30, 60: 30 is its last by 40
    assert data["at_step"] == 40 and data["verdicts"][0].startswith("Interim: the runs' last evals are at different steps")
    assert (tmp_path / "at40.md").read_text().startswith("Every run as it stood at step 40 (its log up to there).\n\n")
    with pytest.raises(UserError, match="--at_step 0"):
        main([str(root / "runs"), "-o", str(tmp_path / "at0"), "--at_step", "0"])
