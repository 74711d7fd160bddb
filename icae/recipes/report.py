"""`icae report RUN_DIR... -o OUT`: one picture and one table for a set of pretraining runs.

A run folder is anything with a `metrics.jsonl` (what `icae pretrain` always writes); a folder of
run folders (what `icae ablate` writes) is expanded. Writes OUT.png (eval AE loss and training
loss against step, token accuracy against CPU time, and per cell the mean curve over seeds with a
min-max band), OUT.md and OUT.json with the same numbers: one row per run; per cell (runs that
differ only in their seed) n, mean, std, min and max of the last eval's AE loss, token accuracy and
BLEU-4; for each default/epl pair the difference of means with a 95% Welch t interval over seeds,
and how that difference changes with the LoRA targets or the decoder mode (an interaction); the same
difference for each frozen/shared decoder pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from icae.errors import UserError


def read_metrics(run: Path) -> list[dict]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a killed run
    return records


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(q for q in p.iterdir() if (q / "metrics.jsonl").is_file())
        else:
            raise UserError(f"{p} is neither a run folder (with metrics.jsonl) nor a folder of runs")
    if not runs:
        raise UserError(f"no run folders (with metrics.jsonl) under {', '.join(paths)}")
    return runs


def cumulative(records: list[dict], key: str) -> list[float | None]:
    """`key` since the run began, for counters (`cpu_seconds`, `text_tokens`) that restart at 0 in each process
    of a resumed run."""
    out, offset, last = [], 0.0, 0.0
    for r in records:
        value = r.get(key)
        if value is None:
            out.append(None)
            continue
        if value < last:  # a new process (resume): continue from where the last one stopped
            offset += last
        last = value
        out.append(round(offset + value, 1))
    return out


def cumulative_cpu_seconds(records: list[dict]) -> list[float | None]:
    return cumulative(records, "cpu_seconds")


def summarize(run: Path, at_step: int | None = None) -> dict:
    """The numbers the table shows for one run; with `at_step`, the run as it stood at that step (its log up to
    there: the eval at that step is its final one, CPU time is what it took to get there)."""
    records = read_metrics(run)
    if at_step is not None:
        records = [r for r in records if r.get("step", 0) <= at_step]
    cpu = cumulative_cpu_seconds(records)
    accuracy = sorted({r["step"]: (c, r["eval_token_accuracy"], r.get("eval_bleu"), r.get("eval_exact_match"))
                       for r, c in zip(records, cpu) if r.get("eval_token_accuracy") is not None}.items())
    config = json.loads((run / "run_config.json").read_text()) if (run / "run_config.json").is_file() else {}
    icae = config.get("icae", {})
    evals = sorted({r["step"]: r["eval_loss"] for r in records if r.get("eval_loss") is not None}.items())
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    final = next((r for r in reversed(records) if "train_runtime" in r), {})
    tokens = max((t for t in cumulative(records, "text_tokens") if t is not None), default=0)
    runtime = sum(r["train_runtime"] for r in records if "train_runtime" in r) or None  # every process's training
    bleu = None
    if (run / "eval_results.json").is_file() and at_step is None:  # icae eval of the final checkpoint
        bleu = json.loads((run / "eval_results.json").read_text()).get("bleu4")
    return {
        "run": run.name,
        "path": str(run),
        "layout": icae.get("position_layout"),
        "lora_target_modules": icae.get("lora_target_modules") or "q,v (default)",
        "decoder_mode": icae.get("decoder_mode"),
        "seed": config.get("seed"),
        "settings": flatten(config),
        "final_eval_ae_loss": evals[-1][1] if evals else None,
        "first_eval_ae_loss": evals[0][1] if evals else None,
        "final_eval_step": evals[-1][0] if evals else None,
        "eval_bleu4": bleu,
        "final_eval_token_accuracy": accuracy[-1][1][1] if accuracy else None,
        "final_eval_bleu": accuracy[-1][1][2] if accuracy else None,
        "final_eval_exact_match": accuracy[-1][1][3] if accuracy else None,
        "cpu_seconds": max((c for c in cpu if c is not None), default=None),
        "text_tokens_per_second": round(tokens / runtime, 1) if runtime and tokens else None,
        "trainable_params": config.get("trainable_params"),
        "wall_time_s": round(runtime, 1) if runtime else None,
        "steps": final.get("step") or (train[-1][0] if train else 0),
        "eval_curve": evals,
        "train_curve": train,
        "accuracy_curve": [(step, c, acc) for step, (c, acc, *_) in accuracy],  # (step, CPU s, token accuracy)
    }


def describe(values: list[float]) -> dict:
    """n, mean, sample std (n-1; None below 2 values), min and max: the spread a reader needs to judge seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` (maybe fractional) degrees of freedom.

    scipy is not a dependency; mpmath is (torch needs sympy, which needs mpmath): solve
    P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 = 1 - p for t with its regularized incomplete beta."""
    import mpmath

    tail = 1 - mpmath.mpf(str(p))  # from the decimal string, so that 0.975 is exactly 0.975
    upper = lambda t: mpmath.betainc(mpmath.mpf(df) / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2  # noqa: E731
    return float(mpmath.findroot(lambda t: upper(t) - tail, (0, 1e6), solver="illinois"))


def contrast_interval(samples: list[list[float]], weights: list[float], level: float = 0.95) -> dict:
    """sum(w_i * mean_i) over independent groups, with a Welch t interval (Welch-Satterthwaite df).

    With two groups and weights (+1, -1) this is Welch's two-sample interval for a difference of means;
    with four groups and (+1, -1, -1, +1) it is the interval of a difference of two such differences
    (an interaction). Seeds are few, so no normal approximation; any group with fewer than 2 values has
    no variance estimate and gets no interval ("n<2")."""
    samples = [[v for v in s if v is not None] for s in samples]
    n = [len(s) for s in samples]
    out = {"estimate": None, "low": None, "high": None, "df": None, "level": level, "n": n, "note": None}
    if min(n) == 0:
        out["note"] = "no values"
        return out
    out["estimate"] = sum(w * statistics.fmean(s) for w, s in zip(weights, samples))
    if min(n) < 2:
        out["note"] = "n<2"
        return out
    parts = [w * w * statistics.variance(s) / len(s) for w, s in zip(weights, samples)]  # var of w_i * mean_i
    se = sum(parts) ** 0.5
    if se == 0:  # every seed gave the same value: no spread to build a t interval from
        out["low"] = out["high"] = out["estimate"]
        out["note"] = "no spread"
        return out
    out["df"] = sum(parts) ** 2 / sum(v * v / (k - 1) for v, k in zip(parts, n))
    half = t_quantile(0.5 + level / 2, out["df"]) * se
    out["low"], out["high"] = out["estimate"] - half, out["estimate"] + half
    return out


AXES = ("layout", "lora_target_modules", "decoder_mode")  # the ablation grids' axes: always part of a cell
NOT_SETTINGS = {"seed", "trainable_params", "icae.position_layout", "icae.lora_target_modules", "icae.decoder_mode"}
CELL_METRICS = {"final_eval_ae_loss": "final eval AE loss", "final_eval_token_accuracy": "token accuracy",
                "final_eval_bleu": "BLEU-4"}
EFFECT_METRICS = ("final_eval_token_accuracy", "final_eval_ae_loss")  # what the layout comparisons are judged on
FACTOR_LEVELS = {"lora_target_modules": ["all-linear", "q,v (default)"], "decoder_mode": ["shared", "frozen"]}


def flatten(config: dict, prefix: str = "") -> dict:
    """run_config.json as dotted keys ("icae.lora_r"), so that any one setting can be compared across runs."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def other_settings(rows: list[dict]) -> list[str]:
    """Settings besides the seed and the grid's axes that differ between runs: runs that differ in one
    are not replicates of each other. (run_config.json holds the model, example and data settings; training
    flags such as the learning rate are not in it, so runs that differ only in those share a cell.)"""
    keys = sorted({k for r in rows for k in r.get("settings", {})} - NOT_SETTINGS)
    return [k for k in keys if len({json.dumps(r.get("settings", {}).get(k)) for r in rows}) > 1]


def align_curves(curves: list[list]) -> tuple[list, list[list[float]]]:
    """The steps that every (non-empty) curve has, and the curves' values at each. Seeds may be evaluated
    at different steps (another --eval_steps, a run still going); a mean over a set of seeds that changes
    from step to step would jump where a seed drops out."""
    maps = [dict((step, value) for step, value, *_ in curve) for curve in curves if curve]
    if not maps:
        return [], []
    steps = sorted(set.intersection(*(set(m) for m in maps)))
    return steps, [[m[step] for m in maps] for step in steps]


def mean_curve(curves: list[list]) -> dict:
    """Mean, std, min and max over seeds at each shared step: what the plot's band is drawn from."""
    steps, values = align_curves(curves)
    stats = [describe(v) for v in values]
    return {"steps": steps, "n": sum(1 for c in curves if c), **{k: [d[k] for d in stats] for k in ("mean", "std", "min", "max")}}


def group_over_seeds(rows: list[dict]) -> list[dict]:
    """Cells of runs that differ only in their seed, with the spread of each final metric over seeds."""
    other = other_settings(rows)
    cells: dict[str, tuple[dict, list[dict]]] = {}
    for row in rows:
        settings = {**{a: row.get(a) for a in AXES}, **{k: row.get("settings", {}).get(k) for k in other}}
        cells.setdefault(json.dumps(settings), (settings, []))[1].append(row)
    out = []
    for settings, members in cells.values():
        members.sort(key=lambda m: (m.get("seed") is None, m.get("seed") or 0, m["run"]))
        out.append({
            **{a: settings[a] for a in AXES}, "other": {k: settings[k] for k in other}, "settings": settings,
            "runs": [m["run"] for m in members], "seeds": [m.get("seed") for m in members],
            "final_eval_steps": [m.get("final_eval_step") for m in members],
            "values": {metric: [m.get(metric) for m in members] for metric in CELL_METRICS},
            **{metric: describe([m.get(metric) for m in members]) for metric in CELL_METRICS},
            "eval_loss_curve": mean_curve([m.get("eval_curve") for m in members]),
            "token_accuracy_curve": mean_curve([[(s, a) for s, _, a in m.get("accuracy_curve") or []] for m in members]),
        })
    return out


def pair_effects(cells: list[dict], factor: str, high, low) -> list[dict]:
    """high - low between every two cells that differ only in `factor`, with a Welch interval over seeds:
    keys `at` (what the two share), `<high>`/`<low>` (each cell's values), `<high>_runs`/`<low>_runs`."""
    pairs: dict[str, tuple[dict, dict]] = {}
    for cell in cells:
        rest = {k: v for k, v in cell["settings"].items() if k != factor}
        pairs.setdefault(json.dumps(rest), (rest, {}))[1][cell["settings"].get(factor)] = cell
    out = []
    for rest, by_level in pairs.values():
        if high in by_level and low in by_level:
            a, b = by_level[high], by_level[low]
            out.append({"at": rest, f"{high}_runs": a["runs"], f"{low}_runs": b["runs"], high: a["values"],
                        low: b["values"], "difference": {m: contrast_interval([a["values"][m], b["values"][m]], [1, -1])
                                                         for m in EFFECT_METRICS}})
    return out


def layout_effects(cells: list[dict]) -> list[dict]:
    """epl - default between the two cells that differ only in the layout: does EPL beat the default here,
    and by more than the seed-to-seed noise (an interval that excludes 0)?"""
    return pair_effects(cells, "layout", "epl", "default")


def decoder_effects(cells: list[dict]) -> list[dict]:
    """shared - frozen between two cells that differ only in the decoder: does training the decoder (the
    seed's "fire the decoder") help, at each layout?"""
    return pair_effects(cells, "decoder_mode", "shared", "frozen")


def level_order(factor: str, level) -> tuple:
    preferred = FACTOR_LEVELS.get(factor, [])
    return (preferred.index(level) if level in preferred else len(preferred), str(level))


def interactions(effects: list[dict]) -> list[dict]:
    """(epl - default | a) - (epl - default | b) for two levels a, b of one factor, all else equal: does
    all-linear LoRA help EPL more than q,v does? Does training the decoder (shared) help EPL more than a
    frozen one?"""
    out = []
    for factor in FACTOR_LEVELS:
        groups: dict[str, tuple[dict, dict]] = {}
        for effect in effects:
            rest = {k: v for k, v in effect["at"].items() if k != factor}
            groups.setdefault(json.dumps(rest), (rest, {}))[1][effect["at"].get(factor)] = effect
        for rest, by_level in groups.values():
            levels = sorted(by_level, key=lambda level: level_order(factor, level))
            for a, b in itertools.combinations(levels, 2):
                ea, eb = by_level[a], by_level[b]
                out.append({"factor": factor, "levels": [a, b], "at": rest, "difference": {
                    m: contrast_interval([ea["epl"][m], ea["default"][m], eb["epl"][m], eb["default"][m]], [1, -1, -1, 1])
                    for m in EFFECT_METRICS}})
    return out


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
