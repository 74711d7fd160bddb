"""The 64-token compressor runs on the H200 next to the CPU curriculum run: held-out token accuracy and
eval AE loss against training step and against texts seen. `python docs/results/gpu/plot.py`."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = {  # folder: (label, texts per step)
    "gpu64-b32": ("H200, batch 32, LoRA r=19 (from the shipped weights)", 32),
    "gpu64-b8": ("H200, batch 8, LoRA r=19 (from the shipped weights)", 8),
    "curr64-cpu": ("CPU, batch 8, LoRA r=32 (from the same run's step 850, before the rank cut)", 8),
}


def evals(run: str) -> list[dict]:
    lines = (HERE / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_token_accuracy" in r]


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run, (label, batch) in RUNS.items():
        rows = evals(run)
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["eval_token_accuracy"] for r in rows], "o-", label=label)
        axes[1].plot([s * batch for s in steps], [r["eval_token_accuracy"] for r in rows], "o-", label=label)
        axes[2].plot(steps, [r["eval_loss"] for r in rows], "o-", label=label)
    for ax in axes[:2]:
        ax.axhline(0.9, color="grey", ls="--", lw=1)
        ax.set_ylabel("held-out token accuracy (greedy, 64 texts)")
    axes[0].set(title="64-token texts -> 16 slots (rate 4)", xlabel="step")
    axes[1].set(title="against texts seen", xlabel="64-token texts seen")
    axes[2].set(title="eval AE loss", xlabel="step", ylabel="loss", yscale="log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "compressor64.png", dpi=110)
    print(f"wrote {HERE / 'compressor64.png'}")


if __name__ == "__main__":
    main()
