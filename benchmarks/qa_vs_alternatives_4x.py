#!/usr/bin/env python
"""Cost per answer at 4x longer contexts, measured: the first four eval contexts of builtin:python-docs-qa-long
joined (2,784 tokens), the five questions about the last one, k=1 and k=5, for the slots, the full context and
the truncated context (issue 32; benchmarks/qa_vs_alternatives.py measures the 1x rows). Run from the
repository root after the two fine-tunes: python benchmarks/qa_vs_alternatives_4x.py
"""
import json, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import qa_vs_alternatives as b
from icae.core.model import load_checkpoint
from icae.core.qa_examples import prompt_part_ids
contexts = b.eval_contexts("builtin:python-docs-qa-long", 4)
text = "\n\n".join(c for c, _ in contexts)
records = contexts[3][1]  # questions about the last part
out = []
for source, ckpt in (("full_context_finetuned", "runs/qa-long/full_context_finetuned/checkpoint-40"),
                     ("memory_slots", "runs/qa-long/memory_slots/checkpoint-40"),
                     ("truncated", "runs/qa-long/full_context_finetuned/checkpoint-40")):
    model = load_checkpoint(ckpt, device="cpu", dtype="bfloat16")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [prompt_part_ids(model.tokenizer, r["prompt"]) for r in records]
    r = b.answer_context(model, source, ids, prompts, 64)
    fixed = r["compress_seconds"] + r["prefix_seconds"]
    row = {"source": source, "context_tokens": len(ids), "decoder_context_tokens": r["decoder_context_tokens"],
           "compress_seconds": r["compress_seconds"], "prefix_seconds": r["prefix_seconds"],
           "answer_seconds": r["answer_seconds"], "kv_cache_bytes": sum(r["kv_cache_bytes"]) / 5,
           "seconds_per_answer_k1": fixed + sum(r["answer_seconds"]) / 5,
           "seconds_per_answer_k5": (fixed + sum(r["answer_seconds"])) / 5,
           "answer_tokens": [len(a) for a in r["answers"]]}
    print(json.dumps(row), flush=True)
    out.append(row)
json.dump(out, open("docs/results/qa-vs-alternatives/measured_4x.json", "w"), indent=2)
