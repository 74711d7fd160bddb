"""`icae report RUN_DIR... -o OUT`: one picture and one table for a set of pretraining runs.

A run folder is anything with a `metrics.jsonl` (what `icae pretrain` always writes); a folder of
run folders (what `icae ablate` writes) is expanded. Writes OUT.png (eval AE loss and training
loss against step), OUT.md (a table, plus mean and spread over seeds) and OUT.json.
"""

from __future__ import annotations

import argparse
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


def cumulative_cpu_seconds(records: list[dict]) -> list[float | None]:
    """CPU seconds since the run began: `cpu_seconds` restarts at 0 in each process of a resumed run."""
    out, offset, last = [], 0.0, 0.0
    for r in records:
        cpu = r.get("cpu_seconds")
        if cpu is None:
            out.append(None)
            continue
        if cpu < last:  # a new process (resume): continue from where the last one stopped
            offset += last
        last = cpu
        out.append(round(offset + cpu, 1))
    return out


def summarize(run: Path) -> dict:
    """The numbers the table shows for one run."""
    records = read_metrics(run)
    cpu = cumulative_cpu_seconds(records)
    accuracy = sorted({r["step"]: (c, r["eval_token_accuracy"], r.get("eval_bleu"), r.get("eval_exact_match"))
                       for r, c in zip(records, cpu) if r.get("eval_token_accuracy") is not None}.items())
    config = json.loads((run / "run_config.json").read_text()) if (run / "run_config.json").is_file() else {}
    icae = config.get("icae", {})
    evals = sorted({r["step"]: r["eval_loss"] for r in records if r.get("eval_loss") is not None}.items())
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    final = next((r for r in reversed(records) if "train_runtime" in r), {})
    tokens = max((r.get("text_tokens", 0) for r in records), default=0)
    runtime = final.get("train_runtime")
    bleu = None
    if (run / "eval_results.json").is_file():
        bleu = json.loads((run / "eval_results.json").read_text()).get("bleu4")
    return {
        "run": run.name,
        "path": str(run),
        "layout": icae.get("position_layout"),
        "lora_target_modules": icae.get("lora_target_modules") or "q,v (default)",
        "decoder_mode": icae.get("decoder_mode"),
        "seed": config.get("seed"),
        "final_eval_ae_loss": evals[-1][1] if evals else None,
        "first_eval_ae_loss": evals[0][1] if evals else None,
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


def group_over_seeds(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["layout"], row["lora_target_modules"], row["decoder_mode"])
        groups.setdefault(key, []).append(row)
    out = []
    for (layout, targets, decoder), members in groups.items():
        losses = [m["final_eval_ae_loss"] for m in members if m["final_eval_ae_loss"] is not None]
        out.append({
            "layout": layout, "lora_target_modules": targets, "decoder_mode": decoder,
            "seeds": [m["seed"] for m in members], "n": len(losses),
            "mean_final_eval_ae_loss": statistics.fmean(losses) if losses else None,
            "min": min(losses, default=None), "max": max(losses, default=None),
        })
    return out


def fmt(value, digits=4):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict], groups: list[dict]) -> str:
    lines = [
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
    lines += ["", "Over seeds (final eval AE loss):", "",
              "| layout | LoRA targets | decoder | seeds | mean | min | max |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        lines.append(
            f"| {g['layout']} | {g['lora_target_modules']} | {g['decoder_mode']} | {g['seeds']} | "
            f"{fmt(g['mean_final_eval_ae_loss'])} | {fmt(g['min'])} | {fmt(g['max'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_accuracy = any(r.get("accuracy_curve") for r in rows)
    fig, axes = plt.subplots(1, 3 if with_accuracy else 2, figsize=(19 if with_accuracy else 13, 4.8))
    ax_eval, ax_train = axes[0], axes[1]
    for r in rows:
        style = "-" if r["layout"] == "epl" else "--"
        if r["eval_curve"]:
            steps, losses = zip(*r["eval_curve"])
            ax_eval.plot(steps, losses, style, marker="o", markersize=3, label=r["run"])
        if r["train_curve"]:
            steps, losses = zip(*r["train_curve"])
            ax_train.plot(steps, losses, style, label=r["run"], alpha=0.8)
    if with_accuracy:
        ax_acc = axes[2]
        for r in rows:
            if r.get("accuracy_curve"):
                _, cpu, acc = zip(*r["accuracy_curve"])
                ax_acc.plot([c / 3600 if c is not None else None for c in cpu], acc,
                            "-" if r["layout"] == "epl" else "--", marker="o", markersize=3, label=r["run"])
        ax_acc.set(title="held-out reconstruction token accuracy (greedy)", xlabel="CPU hours", ylabel="token accuracy",
                   ylim=(0, 1))
        ax_acc.grid(alpha=0.3)
        ax_acc.legend(fontsize=7)
    ax_eval.set(title="eval AE loss (lower is better)", xlabel="step", ylabel="loss")
    ax_train.set(title="training loss (AE + LM)", xlabel="step", ylabel="loss")
    for ax in (ax_eval, ax_train):
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: list[str], out: str | Path) -> list[dict]:
    rows = [summarize(run) for run in find_runs(run_dirs)]
    groups = group_over_seeds(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(rows, groups))
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, "over_seeds": groups}, indent=2) + "\n")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, or folders of runs")
    parser.add_argument("-o", "--output", default="report", help="output path without extension")
    args = parser.parse_args(argv)
    out = Path(args.output)
    write_report(args.runs, out.with_suffix("") if out.suffix in (".png", ".md", ".json") else out)
    print((out.with_suffix(".md")).read_text())
    print(f"wrote {out.with_suffix('.png')}, {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return 0
