#!/usr/bin/env python
"""fp32 against bf16 on one recipe: training loss and held-out eval AE loss / token accuracy against step, one
line per arithmetic (icae report pools runs of one config as seeds, so it would draw them as one cell).

    python docs/results/bf16-fidelity/plot.py   # reads runs/{fp32,bf16}/metrics.jsonl beside it, writes fidelity.png/.md
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def read(name: str) -> list[dict]:
    path = HERE / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    runs = {name: read(name) for name in ("fp32", "bf16")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("loss", "training loss"), ("eval_loss", "held-out eval AE loss"),
              ("eval_token_accuracy", "held-out token accuracy (greedy)")]
    for ax, (key, title) in zip(axes, panels):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key != "loss" else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle("compressor study recipe (epl-shared-memlr), seed 42: fp32 vs --bf16 True, AMD EPYC Zen 4 (AVX-512-BF16)")
    fig.tight_layout()
    fig.savefig(HERE / "fidelity.png", dpi=100)
    lines = ["| step | fp32 train loss | bf16 train loss | fp32 eval AE loss | bf16 eval AE loss | fp32 token acc. | bf16 token acc. |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    steps = sorted({r["step"] for rows in runs.values() for r in rows})
    get = lambda name, step, key: next((r[key] for r in runs[name] if r["step"] == step and key in r), None)  # noqa: E731
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for step in steps:
        values = [get(n, step, k) for k in ("loss", "eval_loss", "eval_token_accuracy") for n in ("fp32", "bf16")]
        if any(v is not None for v in values):
            lines.append(f"| {step} | " + " | ".join(fmt(v) for v in values) + " |")
    (HERE / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
