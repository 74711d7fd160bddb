"""`icae report RUN_DIR... -o OUT`: one picture and one table for a set of pretraining runs.

A run folder is anything with a `metrics.jsonl` (what `icae pretrain` always writes); a folder of
run folders (what `icae ablate` writes) is expanded. Writes OUT.png (eval AE loss and training
loss against step, token accuracy against CPU time, and per cell the mean curve over seeds with a
min-max band), OUT.md and OUT.json with the same numbers: one row per run; per cell (runs that
differ only in their seed) n, mean, std, min and max of the last eval's AE loss, token accuracy and
BLEU-4; for each default/epl pair the difference of means with a 95% Welch t interval over seeds,
and how that difference changes with the LoRA targets or the decoder mode (an interaction); the same
difference for each frozen/shared decoder pair.

The numbers come from icae/recipes/report_stats.py; this module writes them as sentences, tables and a plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icae.errors import UserError
from icae.recipes.report_stats import (
    CELL_METRICS, decoder_effects, describe, find_runs, group_over_seeds, interactions, layout_effects, summarize,
)


def direction(c: dict, higher_is_better: bool) -> int | None:
    """+1 / -1 where the interval lies wholly on the better / worse side of 0, 0 where it holds 0, None where
    there is no interval (fewer than 2 seeds in a group)."""
    if c["low"] is None:
        return None
    side = 1 if c["low"] > 0 else -1 if c["high"] < 0 else 0
    return side if higher_is_better else -side


def fmt_contrast(c: dict, digits: int) -> str:
    if c["estimate"] is None:
        return "no values"
    interval = f" [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]" if c["low"] is not None else f" ({c['note']})"
    return f"{c['estimate']:+.{digits}f}{interval}"


def verdict(question: str, contrast: dict, what: str) -> str:
    """One plain sentence: the answer by token accuracy (the reconstruction a reader sees), the AE loss beside it;
    "no detectable difference" where the 95% interval holds 0."""
    acc, loss = contrast["final_eval_token_accuracy"], contrast["final_eval_ae_loss"]
    by_acc, by_loss = direction(acc, True), direction(loss, False)
    numbers = (f"{what}: token accuracy {fmt_contrast(acc, 3)}, AE loss {fmt_contrast(loss, 4)}, n = "
               f"{'/'.join(map(str, acc['n'] if acc['estimate'] is not None else loss['n']))} seeds")
    if by_acc is None and by_loss is None:
        return f"{question}? Not answerable yet (fewer than 2 seeds with values in a group; {numbers})."
    loss_says = {1: "the AE loss says yes, by more than the noise", -1: "the AE loss says no, the opposite, by more "
                 "than the noise", 0: "the AE loss shows no detectable difference", None: ""}[by_loss]
    if by_acc:
        answer = ("Yes" if by_acc > 0 else "No, the opposite") + ", by more than the seed-to-seed noise"
        answer += f"; but {loss_says}" if by_loss is not None and by_loss != by_acc else ""
    elif by_acc == 0:
        answer = "No detectable difference in token accuracy at this budget"
        answer += {0: ", nor in AE loss", None: ""}.get(by_loss, f"; {loss_says}")
    else:
        answer = f"Token accuracy has no interval yet; {loss_says}"
    return f"{question}? {answer} ({numbers})."


def verdicts(cells: list[dict], effects: list[dict], inter: list[dict], decoders: list[dict]) -> list[str]:
    """The seed's three questions, one sentence per place they can be asked (95% Welch intervals over seeds)."""
    out = []
    for e in effects:
        out.append(verdict(f"Does EPL beat the default layout ({fmt_settings(e['at'])})", e["difference"],
                           "epl − default"))
    for i in inter:
        if i["factor"] == "lora_target_modules" and i["levels"] == ["all-linear", "q,v (default)"]:
            out.append(verdict(f"Does all-linear LoRA help EPL more than the default layout ({fmt_settings(i['at'])})",
                               i["difference"], "(epl − default | all-linear) − (epl − default | q,v)"))
    for e in decoders:
        layout = e["at"].get("layout")
        rest = {k: v for k, v in e["at"].items() if k != "layout"}
        out.append(verdict(f"Does training the decoder help {'EPL' if layout == 'epl' else f'the {layout} layout'} "
                           f"({fmt_settings(rest)})", e["difference"], "shared − frozen"))
    steps = sorted({s for c in cells for s in c["final_eval_steps"] if s is not None})
    if len(steps) > 1:
        out.insert(0, f"Interim: the runs' last evals are at different steps ({steps[0]:,}–{steps[-1]:,}); each "
                      "run counts with its last eval, so these are not yet the comparison at one budget.")
    return out


def fmt(value, digits=4):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict], cells: list[dict], effects: list[dict], inter: list[dict],
             decoders: list[dict] = (), answers: list[str] = ()) -> str:
    asked = sum(not a.startswith("Interim") and "? Not answerable yet" not in a for a in answers)
    alone = (f"; each stands alone: were there no real effect anywhere, at least one of these {asked} answers would "
             f"still say yes or the opposite with probability about {1 - 0.95 ** asked:.0%}") if asked > 1 else ""
    lines = [*([f"Verdicts (95% Welch intervals over seeds; an interval that holds 0 is no detectable difference{alone}):",
                "", *[f"- {a}" for a in answers], ""] if answers else []),
        "| run | layout | LoRA targets | decoder | seed | steps | final eval AE loss | token accuracy | exact match "
        "| BLEU-4 | text tokens/s | trainable params | wall time (s) | CPU time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bleu = r.get("final_eval_bleu") if r.get("final_eval_bleu") is not None else r.get("eval_bleu4")
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['lora_target_modules']} | {r['decoder_mode']} | {fmt(r['seed'])} | "
            f"{fmt(r['steps'])} | {fmt(r['final_eval_ae_loss'])} | {fmt(r.get('final_eval_token_accuracy'), 3)} | "
            f"{fmt(r.get('final_eval_exact_match'), 3)} | {fmt(bleu, 2)} | {fmt(r['text_tokens_per_second'], 1)} | {fmt(r['trainable_params'])} | "
            f"{fmt(r['wall_time_s'], 0)} | {fmt(r.get('cpu_seconds'), 0)} |"
        )
    lines += ["", *cell_table(cells)]
    if has_replicates(cells):
        lines += ["", f"The plot's bottom row: per cell, the mean over seeds against step, {BAND}, at the eval "
                  "steps that all the cell's seeds share."]
    if effects:
        lines += ["", *effect_table(effects)]
    if decoders:
        lines += ["", *effect_table(decoders, "shared", "frozen")]
    if inter:
        lines += ["", *interaction_table(inter)]
    return "\n".join(lines) + "\n"


DIGITS = {"final_eval_ae_loss": 4, "final_eval_token_accuracy": 3, "final_eval_bleu": 2}
NAMES = {"lora_target_modules": "LoRA", "decoder_mode": "decoder"}


def fmt_spread(d: dict, digits: int) -> tuple[str, str]:
    """("mean ± std (n=3)", "min–max") for one table cell; a lone run has no std, a missing metric is "–"."""
    if not d["n"]:
        return "–", "–"
    std = f" ± {d['std']:.{digits}f}" if d["std"] is not None else ""
    return f"{d['mean']:.{digits}f}{std} (n={d['n']})", f"{d['min']:.{digits}f}–{d['max']:.{digits}f}"


def fmt_mean(values: list, digits: int) -> str:
    d = describe(values)
    return f"{d['mean']:.{digits}f} (n={d['n']})" if d["n"] else "–"


def fmt_signed(value, digits: int) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def fmt_interval(c: dict, digits: int) -> str:
    if c["note"] in ("n<2", "no values"):
        return c["note"]
    df = f" (df {c['df']:.1f})" if c["df"] is not None else f" ({c['note']})"
    return f"[{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]{df}"


def fmt_settings(settings: dict) -> str:
    return ", ".join(f"{NAMES.get(k, k)}={v}" for k, v in settings.items()) or "–"


def cell_table(cells: list[dict]) -> list[str]:
    other = bool(cells and cells[0]["other"])
    head = ["layout", "LoRA targets", "decoder", *(["other settings"] if other else []), "seeds", "last eval step"]
    for name in CELL_METRICS.values():
        head += [f"{name}: mean ± std", "min–max"]
    lines = ["Over seeds: one row per cell (runs that differ only in their seed); of each run's last eval, the mean "
             "± sample standard deviation over seeds (n = runs that have the metric) and the range min–max.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        steps = sorted({s for s in c["final_eval_steps"] if s is not None})
        step = "–" if not steps else f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}"
        row = [str(c["layout"]), str(c["lora_target_modules"]), str(c["decoder_mode"]),
               *([fmt_settings(c["other"])] if other else []), ", ".join(map(str, c["seeds"])), step]
        for metric in CELL_METRICS:
            row += fmt_spread(c[metric], DIGITS[metric])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def effect_table(effects: list[dict], high: str = "epl", low: str = "default") -> list[str]:
    intro = {"epl": "EPL vs the default layout", "shared": "A trained decoder (shared, the seed's) vs a frozen one"}
    lines = [f"{intro.get(high, high)}, all else equal: the difference of means over seeds ({high} − {low}) of the "
             "final token accuracy (higher is better) and eval AE loss (lower is better); an interval that excludes "
             "0 is a difference larger than the seed-to-seed noise.", "",
             f"| at | metric | {high} mean | {low} mean | {high} − {low} | 95% interval (Welch t, Welch–Satterthwaite df) |",
             "|---|---|---|---|---|---|"]
    for e in effects:
        for metric, c in e["difference"].items():
            d = DIGITS[metric]
            lines.append(f"| {fmt_settings(e['at'])} | {CELL_METRICS[metric]} | {fmt_mean(e[high][metric], d)} | "
                         f"{fmt_mean(e[low][metric], d)} | "
                         f"{fmt_signed(c['estimate'], d)} | {fmt_interval(c, d)} |")
    return lines


def interaction_table(inter: list[dict]) -> list[str]:
    lines = ["Does a setting change the EPL effect? (epl − default | first level) − (epl − default | second level), "
             "all else equal; the interval combines the four cells' seeds.", "",
             "| question | at | metric | difference of differences | 95% interval (Welch t, Welch–Satterthwaite df) |",
             "|---|---|---|---|---|"]
    for i in inter:
        a, b = i["levels"]
        question = f"(epl − default \\| {a}) − (epl − default \\| {b})"
        for metric, c in i["difference"].items():
            d = DIGITS[metric]
            lines.append(f"| {question} | {fmt_settings(i['at'])} | {CELL_METRICS[metric]} | {fmt_signed(c['estimate'], d)} | "
                         f"{fmt_interval(c, d)} |")
    return lines


BAND = "band: min–max over seeds"


def has_replicates(cells: list[dict]) -> bool:
    return any(len(c["runs"]) > 1 for c in cells)


def cell_label(cell: dict) -> str:
    parts = [str(cell["layout"]), str(cell["lora_target_modules"]), str(cell["decoder_mode"])]
    return " · ".join(parts + [f"{k}={v}" for k, v in cell["other"].items()]) + f" (n={len(cell['runs'])})"


def run_colors(rows: list[dict]) -> dict:
    """Run name -> a color of matplotlib's cycle (tab20 beyond ten runs), in the order of the rows."""
    import matplotlib

    names = list(dict.fromkeys(r["run"] for r in rows))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot(rows: list[dict], cells: list[dict], path: Path) -> None:
    """Top row: every run's curves. Bottom row (when some cell has several seeds): per cell the mean over
    seeds with a shaded min–max band, at the eval steps all its seeds share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_accuracy = any(r.get("accuracy_curve") for r in rows)
    replicated = has_replicates(cells)
    ncols, nrows = 3 if with_accuracy else 2, 2 if replicated else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(19 if with_accuracy else 13, 4.8 * nrows), squeeze=False)
    ax_eval, ax_train = axes[0][0], axes[0][1]
    colors = run_colors(rows)  # one color per run in every panel, whichever curves a run has
    for r in rows:
        style = "-" if r["layout"] == "epl" else "--"
        if r["eval_curve"]:
            steps, losses = zip(*r["eval_curve"])
            ax_eval.plot(steps, losses, style, marker="o", markersize=3, label=r["run"], color=colors[r["run"]])
        if r["train_curve"]:
            steps, losses = zip(*r["train_curve"])
            ax_train.plot(steps, losses, style, label=r["run"], alpha=0.8, color=colors[r["run"]])
    if with_accuracy:
        ax_acc = axes[0][2]
        for r in rows:
            if r.get("accuracy_curve"):
                _, cpu, acc = zip(*r["accuracy_curve"])
                ax_acc.plot([c / 3600 if c is not None else None for c in cpu], acc,
                            "-" if r["layout"] == "epl" else "--", marker="o", markersize=3, label=r["run"],
                            color=colors[r["run"]])
        ax_acc.set(title="held-out reconstruction token accuracy (greedy)", xlabel="CPU hours", ylabel="token accuracy",
                   ylim=(0, 1))
        ax_acc.grid(alpha=0.3)
        ax_acc.legend(fontsize=7)
    ax_eval.set(title="eval AE loss (lower is better)", xlabel="step", ylabel="loss")
    ax_train.set(title="training loss (AE + LM)", xlabel="step", ylabel="loss")
    for ax in (ax_eval, ax_train):
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    ax_train.legend(fontsize=7)
    if replicated:
        panels = [(axes[1][0], "eval_loss_curve", "eval AE loss", None)]
        if with_accuracy:
            panels.append((axes[1][2 if ncols == 3 else 1], "token_accuracy_curve", "held-out token accuracy", (0, 1)))
        for ax, curve, name, ylim in panels:
            for cell in cells:
                c = cell[curve]
                if not c["steps"]:
                    continue
                line, = ax.plot(c["steps"], c["mean"], "-" if cell["layout"] == "epl" else "--", marker="o",
                                markersize=3, label=cell_label(cell))
                ax.fill_between(c["steps"], c["min"], c["max"], color=line.get_color(), alpha=0.2)
            ax.set(title=f"{name}: mean over the seeds of each cell", xlabel="step", ylabel=name)
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title=BAND, title_fontsize=7)
        for ax in axes[1]:
            if not ax.has_data():
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: list[str], out: str | Path, at_step: int | None = None) -> list[dict]:
    if at_step is not None and at_step < 1:
        raise UserError(f"--at_step {at_step}: give a training step (>= 1) at which the runs were evaluated")
    rows = [summarize(run, at_step) for run in find_runs(run_dirs)]
    cells = group_over_seeds(rows)
    effects = layout_effects(cells)
    inter = interactions(effects)
    decoders = decoder_effects(cells)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, cells, out.with_suffix(".png"))
    answers = verdicts(cells, effects, inter, decoders)
    at = [f"Every run as it stood at step {at_step:,} (its log up to there).", ""] if at_step is not None else []
    table = markdown(rows, cells, effects, inter, decoders, answers)
    out.with_suffix(".md").write_text("".join(f"{line}\n" for line in at) + table)
    summary = {"at_step": at_step, "runs": rows, "over_seeds": cells, "layout_effects": effects,
               "decoder_effects": decoders, "interactions": inter, "verdicts": answers,
               "interval": "95% Welch t interval, Welch–Satterthwaite df; none where a cell has fewer than 2 seeds"}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, or folders of runs")
    parser.add_argument("-o", "--output", default="report", help="output path without extension")
    parser.add_argument("--at_step", type=int, default=None, help="compare the runs as they stood at this step "
                        "(their evals there), e.g. a shorter budget than the runs trained for")
    args = parser.parse_args(argv)
    out = Path(args.output)
    write_report(args.runs, out.with_suffix("") if out.suffix in (".png", ".md", ".json") else out, args.at_step)
    print((out.with_suffix(".md")).read_text())
    print(f"wrote {out.with_suffix('.png')}, {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return 0
