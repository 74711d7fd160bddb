#!/usr/bin/env python
"""Cost per answer at 4x longer contexts, measured: the first four eval contexts of builtin:python-docs-qa-long
joined (2,784 tokens), the five questions about the last one, k=1 and k=5, for the slots, the full context and
the truncated context (benchmarks/qa_vs_alternatives.py measures the 1x rows). Run from the repository root
after the two fine-tunes (their checkpoints are read from the finetune step's finetune.json unless given):

    python benchmarks/qa_vs_alternatives_4x.py [--work_dir runs/qa-long] [--checkpoint M --text_checkpoint T]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qa_vs_alternatives as b  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="runs/qa-long")
    p.add_argument("--checkpoint", default=None, help="memory slots (default: finetune.json's)")
    p.add_argument("--text_checkpoint", default=None, help="full context (default: finetune.json's)")
    p.add_argument("--output", default="docs/results/qa-vs-alternatives/measured_4x.json")
    args = p.parse_args()
    from icae.core.model import load_checkpoint
    from icae.core.qa_examples import prompt_part_ids

    tuned = json.loads((Path(args.work_dir) / "finetune.json").read_text()) if not (
        args.checkpoint and args.text_checkpoint) else {}
    memory = args.checkpoint or tuned["memory_slots"]["checkpoint"]
    text_ckpt = args.text_checkpoint or tuned["full_context_finetuned"]["checkpoint"]
    contexts = b.eval_contexts("builtin:python-docs-qa-long", 4)
    text = "\n\n".join(c for c, _ in contexts)
    records = contexts[3][1]  # questions about the last part
    out = []
    for source, ckpt in (("full_context_finetuned", text_ckpt), ("memory_slots", memory), ("truncated", text_ckpt)):
        model = load_checkpoint(ckpt, device="cpu", dtype="bfloat16")
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts = [prompt_part_ids(model.tokenizer, r["prompt"]) for r in records]
        r = b.answer_context(model, source, ids, prompts, 64)
        fixed = r["compress_seconds"] + r["prefix_seconds"]
        n = len(prompts)
        row = {"source": source, "checkpoint": str(ckpt), "context_tokens": len(ids),
               "decoder_context_tokens": r["decoder_context_tokens"], "compress_seconds": r["compress_seconds"],
               "prefix_seconds": r["prefix_seconds"], "answer_seconds": r["answer_seconds"],
               "kv_cache_bytes": sum(r["kv_cache_bytes"]) / n,
               "seconds_per_answer_k1": fixed + sum(r["answer_seconds"]) / n,
               "seconds_per_answer_k5": (fixed + sum(r["answer_seconds"])) / n,
               "answer_tokens": [len(a) for a in r["answers"]]}
        print(json.dumps(row), flush=True)
        out.append(row)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
