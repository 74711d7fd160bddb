"""The numbers behind `icae report`: runs read from their metrics.jsonl, cells of runs that differ only in
their seed, and the differences between cells with 95% Welch t intervals over seeds (pure Python). The
words and pictures (verdict sentences, markdown tables, the plot) are icae/recipes/report.py.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

from icae.errors import UserError

AXES = ("layout", "lora_target_modules", "decoder_mode")  # the ablation grids' axes: always part of a cell
NOT_SETTINGS = {"seed", "trainable_params", "icae.position_layout", "icae.lora_target_modules", "icae.decoder_mode"}
CELL_METRICS = {"final_eval_ae_loss": "final eval AE loss", "final_eval_token_accuracy": "token accuracy",
                "final_eval_bleu": "BLEU-4"}
EFFECT_METRICS = ("final_eval_token_accuracy", "final_eval_ae_loss")  # what the layout comparisons are judged on
FACTOR_LEVELS = {"lora_target_modules": ["all-linear", "q,v (default)"], "decoder_mode": ["shared", "frozen"]}



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


# ----------------------------------------------------------------------------- statistics


def describe(values: list[float]) -> dict:
    """n, mean, sample std (n-1; None below 2 values), min and max: the spread a reader needs to judge seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` (maybe fractional) degrees of freedom, by bisection on
    P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 (no scipy needed)."""
    tail, low, high = 1.0 - p, 0.0, 1.0
    upper = lambda t: _incomplete_beta(df / 2, 0.5, df / (df + t * t)) / 2  # noqa: E731
    while upper(high) > tail:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if upper(mid) > tail else (low, mid)
        if high - low <= 1e-15 * high:
            break
    return (low + high) / 2


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz;
    Numerical Recipes' betacf), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges faster."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * result / a


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
