"""`icae demo`: the main job on embedded defaults, sized for a 2-core CPU (about 10 minutes).

A short ICAE pretraining of the embedded SmolLM2-135M on the built-in corpus, then evaluation:
prints the eval AE loss before and after training and one text with its reconstruction, and
writes everything (checkpoint, metrics, eval JSON, loss plot) under the output folder.
Any `icae pretrain` flag after the demo's own overrides its default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Short texts (64 tokens -> 16 memory slots at rate 4) and a higher learning rate than the
# seed's 1e-4 so that a visible drop fits in a few minutes on a laptop CPU.
DEMO_FLAGS = [
    "--model_max_length", "64", "--fixed_mem_size", "16", "--mean_compression_rate", "4",
    "--lm_ratio", "0.5", "--add_special_token_for_lm", "True",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "5e-4", "--warmup_steps", "10", "--max_grad_norm", "2.0",
    "--max_steps", "80", "--logging_steps", "5", "--eval_strategy", "steps", "--eval_steps", "20",
    "--eval_on_start", "True", "--eval_size", "100", "--max_eval_samples", "48", "--save_steps", "40", "--save_total_limit", "1",
    "--lora_dropout", "0.05", "--seed", "42", "--report_to", "none", "--overwrite_output_dir",
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--eval_texts", type=int, default=16, help="eval texts for BLEU/exact match after training")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.output_dir)

    from icae.recipes.pretrain import main as pretrain
    from icae.recipes.report import write_report

    start = time.time()
    print(f"== icae demo: pretraining the embedded model on builtin:python-docs -> {out}", flush=True)
    pretrain([*DEMO_FLAGS, "--output_dir", str(out), *extra])
    train_seconds = time.time() - start

    from icae.recipes.evaluate import evaluate, format_table
    from icae.core.inference import compress, reconstruct
    from icae.core.model import ICAE
    from icae.recipes.pretrain import DataArguments, load_splits

    write_report([str(out)], out / "loss")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]

    print("== evaluating the trained checkpoint", flush=True)
    model = ICAE.from_pretrained(out)
    _, eval_texts = load_splits(DataArguments(eval_size=100, max_eval_samples=args.eval_texts))
    results = evaluate(model, eval_texts, model_max_length=64, batch_size=8)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")

    text = eval_texts[0]
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    original = model.tokenizer.decode(ids)
    memory = compress(model, [ids])
    rebuilt = reconstruct(model, memory)[0]

    print(format_table(results))
    print(f"\neval AE loss before training: {evals[0]:.4f}")
    print(f"eval AE loss after training:  {evals[-1]:.4f}")
    print(f"\n-- original ({len(ids)} tokens -> {memory.num_slots} memory slots):\n{original}")
    print(f"\n-- reconstruction from the memory slots:\n{rebuilt}")
    summary = {
        "eval_ae_loss_before": evals[0], "eval_ae_loss_after": evals[-1], "eval": results,
        "example": {"original": original, "reconstruction": rebuilt},
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out}/ (checkpoint, metrics.jsonl, loss.png, eval_results.json, demo_summary.json) "
          f"in {summary['total_seconds']:.0f} s")
    return 0
