"""Where the seed grid stands: one row per planned run from its committed log (runs/NAME/metrics.jsonl here).

usage: python docs/results/seed-grid/progress.py > docs/results/seed-grid/progress.md   (sync.sh does this)
"""

import sys
from pathlib import Path

from icae.recipes.report import summarize

HERE = Path(__file__).parent
BUDGET = 2000
MILESTONES = (500, 1000, 1500, 2000)
PLANNED = [f"{layout}-{lora}-seed{seed}" for seed in (1, 2, 3) for lora in ("qv", "all-linear")
           for layout in ("default", "epl")] + [f"{layout}-all-linear-frozen-seed{seed}" for seed in (1, 2)
                                                for layout in ("default", "epl")]


def row(name: str) -> tuple[str, int, float]:
    path = HERE / "runs" / name
    if not (path / "metrics.jsonl").is_file():
        return f"| {name} | 0 | – | " + " | ".join("–" for _ in MILESTONES) + " | 0.0 |", 0, 0.0
    run = summarize(path)
    losses = dict(run["eval_curve"])
    accuracies = {step: acc for step, _, acc in run["accuracy_curve"]}

    def show(step):
        return f"{losses[step]:.2f} / {accuracies[step]:.2f}" if step in accuracies and step in losses else "–"

    last = run["accuracy_curve"][-1][0] if run["accuracy_curve"] else None
    recent = [loss for step, loss in run["train_curve"] if last and last - 100 < step <= last]
    train = f"; training loss {sum(recent) / len(recent):.2f}" if recent else ""
    cells = [f"{last:,}: {show(last)}, BLEU {run['final_eval_bleu']:.1f}{train}" if last else "–"]
    cells += [show(m) for m in MILESTONES]
    cpu_h = (run["cpu_seconds"] or 0.0) / 3600
    return f"| {name} | {run['steps']:,} | {' | '.join(cells)} | {cpu_h:.1f} |", run["steps"], cpu_h


def kind(name: str) -> str:
    return "q,v" if "-qv-" in name else "all-linear"


def cost_left(rows: list, names: list[str]) -> float:
    """CPU hours still needed to take every run to BUDGET, at the CPU hours per step measured so far per LoRA kind."""
    per_step = {}
    for k in ("q,v", "all-linear"):
        measured = [(steps, cpu) for name, (_, steps, cpu) in zip(names, rows) if kind(name) == k and steps >= 100]
        per_step[k] = sum(c for _, c in measured) / max(1, sum(s for s, _ in measured))
    return sum(max(0, BUDGET - steps) * per_step[kind(name)] for name, (_, steps, _) in zip(names, rows))


def main() -> None:
    rows = [row(name) for name in PLANNED]
    done = sum(min(steps, BUDGET) for _, steps, _ in rows)
    cpu = sum(c for *_, c in rows)
    left = cost_left(rows, PLANNED)
    print(f"# Seed grid progress: {done:,} of {len(PLANNED) * BUDGET:,} steps ({done / len(PLANNED) / BUDGET:.0%}), "
          f"{cpu:.1f} CPU hours so far, ~{left:.0f} to go to {BUDGET:,} steps (~{left / 2:.0f} hours on two cores)\n")
    print("Eval AE loss / held-out token accuracy (greedy reconstruction of 64 texts); at the last eval also BLEU-4 "
          "and the training loss (mean of the 100 steps before it, on training texts: its gap to the eval AE loss "
          "is what the model knows of its training texts beyond what the slots carry; README.md). Written by `progress.py` from the logs in `runs/`.\n")
    print("| run | steps | last eval | " + " | ".join(f"{m:,}" for m in MILESTONES) + " | CPU hours |")
    print("|---|---:|---|" + "---|" * len(MILESTONES) + "---:|")
    for line, *_ in rows:
        print(line)


if __name__ == "__main__":
    sys.exit(main())
