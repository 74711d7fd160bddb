"""`icae demo`: the main job on embedded defaults, sized for a 2-core CPU (about 10 minutes).

1. A short ICAE pretraining of the embedded SmolLM2-135M on the built-in corpus, with the recipe
   that learned fastest in our study (docs/results/compressor/README.md), evaluated before and after.
2. The shipped checkpoint (`smollm2-135m-icae`: the same recipe trained longer, then on 64-token
   texts on a GPU) at work: one held-out paragraph -> memory slots -> reconstruction next to the
   original, with its token accuracy, and a continuation generated from the slots (if the checkpoint
   was trained with the LM objective).
3. The shipped QA checkpoint (`smollm2-135m-icae-qa`: that compressor fine-tuned to answer questions about
   documentation from its slots, docs/results/finetune.md) at work: a held-out context -> memory slots ->
   the answer to a question about it, beside the base model's answer from the whole text.
Everything is written under the output folder. Any `icae pretrain` flag after the demo's own
overrides its default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHIPPED = "smollm2-135m-icae"
SHIPPED_QA = "smollm2-135m-icae-qa"
QUESTION = 2  # which held-out question the demo asks (the same one every run: not chosen for its answer)

# The study's fastest recipe (docs/results/compressor/README.md), cut to a few minutes of training:
# 32-token texts -> 8 slots (rate 4), EPL positions, the LoRA-adapted encoder as decoder, LoRA on
# all linear layers, a 10x learning rate for the memory embeddings, a fresh random window of each
# text on every visit, pure autoencoding.
DEMO_FLAGS = [
    "--model_max_length", "32", "--fixed_mem_size", "8", "--mean_compression_rate", "4",
    "--position_layout", "epl", "--decoder_mode", "shared",
    "--lora_target_modules", "all-linear", "--lora_r", "16", "--lora_alpha", "32",
    "--lm_ratio", "0", "--text_window", "random",
    "--learning_rate", "1e-3", "--memory_learning_rate", "1e-2", "--lr_scheduler_type", "constant_with_warmup",
    "--warmup_steps", "10", "--max_grad_norm", "2.0",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--max_steps", "60", "--logging_steps", "5", "--eval_strategy", "steps", "--eval_steps", "30",
    "--eval_on_start", "True", "--eval_reconstruction_samples", "16",
    "--save_steps", "60", "--save_total_limit", "1", "--seed", "42", "--report_to", "none", "--overwrite_output_dir",
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--checkpoint", default=SHIPPED, help="the trained checkpoint to show at work")
    parser.add_argument("--qa_checkpoint", default=SHIPPED_QA, help="the QA fine-tuned checkpoint to show at work")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.output_dir)

    from icae.recipes.pretrain import main as pretrain
    from icae.recipes.report import write_report

    start = time.time()
    print(f"== 1. icae demo: pretraining the embedded model on builtin:python-docs -> {out}", flush=True)
    pretrain([*DEMO_FLAGS, "--output_dir", str(out), *extra])
    train_seconds = time.time() - start
    write_report([str(out)], out / "loss")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("eval_loss") is not None]
    first, last = evals[0], evals[-1]

    print("\n== 2. the shipped checkpoint at work", flush=True)
    shipped = show_checkpoint(args.checkpoint)
    print("\n== 3. the shipped QA checkpoint at work", flush=True)
    answered = show_answer(args.qa_checkpoint)

    print(f"\n== the demo's own training ({last['step']} steps, {train_seconds / 60:.1f} min):")
    print(f"eval AE loss:                 {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}")
    if "eval_token_accuracy" in last:
        print(f"held-out token accuracy:      {first['eval_token_accuracy']:.3f} -> {last['eval_token_accuracy']:.3f}"
              " (greedy reconstruction; the shipped checkpoint trained far longer)")
    summary = {
        "eval_ae_loss_before": first["eval_loss"], "eval_ae_loss_after": last["eval_loss"],
        "token_accuracy_before": first.get("eval_token_accuracy"),
        "token_accuracy_after": last.get("eval_token_accuracy"),
        "shipped": shipped, "shipped_qa": answered, "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out}/ (checkpoint, metrics.jsonl, loss.png, demo_summary.json) in {summary['total_seconds']:.0f} s")
    return 0


def show_checkpoint(checkpoint: str) -> dict | None:
    """One held-out paragraph through a trained checkpoint: slots -> reconstruction, and a continuation."""
    from icae.core import metrics
    from icae.core.inference import compress, generate, generate_ids
    from icae.core.model import load_checkpoint
    from icae.errors import UserError
    from icae.data.texts import builtin_eval_texts

    try:
        model = load_checkpoint(checkpoint, device="cpu")
    except UserError as err:
        print(f"(skipped: {err})")
        return None
    length = int(model.training_info.get("model_max_length") or 64)
    held_out = builtin_eval_texts()  # the split the shipped checkpoint was trained without
    tokenizer = model.tokenizer
    ids = next(row for row in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in held_out)
               if len(row) >= length)[:length]
    memory = compress(model, [ids])
    rebuilt = generate_ids(model, memory, task="ae", max_new_tokens=length + 1)[0]
    accuracy = metrics.token_accuracy([rebuilt], [ids])
    lm_trained = (model.training_info.get("lm_ratio") or 0) > 0  # a continuation means something only then
    continuation = generate(model, memory, max_new_tokens=32)[0] if lm_trained else None
    original = tokenizer.decode(ids)
    reconstruction = tokenizer.decode(rebuilt, skip_special_tokens=True)
    print(f"checkpoint {checkpoint}: {length} tokens -> {memory.num_slots} memory slots "
          f"(rate {model.config.mean_compression_rate}, {model.config.position_layout} layout)")
    print(f"\n-- original (held out):\n{original}")
    print(f"\n-- reconstruction from the slots (token accuracy {accuracy:.3f}):\n{reconstruction}")
    if lm_trained:
        print(f"\n-- continuation generated from the slots:\n{continuation}")
    else:
        print("\n(no continuation: this checkpoint was trained to reconstruct only (--lm_ratio 0); questions are "
              "answered from slots by a fine-tuned one, below)")
    return {"checkpoint": checkpoint, "original": original, "reconstruction": reconstruction,
            "token_accuracy": accuracy, "continuation": continuation}


def show_answer(checkpoint: str, question: int = QUESTION) -> dict | None:
    """One held-out question through a QA fine-tuned checkpoint: its context -> slots -> the answer, beside
    the base model's (LoRA off) answer from the whole context as text."""
    from icae.core.model import load_checkpoint
    from icae.core.positions import segment_spans
    from icae.errors import UserError
    from icae.recipes.evaluate import load_eval_records, qa_answers, qa_triples

    try:
        model = load_checkpoint(checkpoint, device="cpu", dtype="auto")
    except UserError as err:
        print(f"(skipped: {err})")
        return None
    source = model.training_info.get("train_source") or "builtin:python-docs-qa"
    records = load_eval_records(source)  # the held-out modules: never seen in pretraining or fine-tuning
    record = records[question % len(records)]
    triples = qa_triples(model, [record], int(model.training_info.get("max_context_length") or 5120))
    tokenizer = model.tokenizer
    start = time.process_time()
    from_slots = tokenizer.decode(qa_answers(model, triples, "memory")[0], skip_special_tokens=True).strip()
    slot_seconds = time.process_time() - start
    start = time.process_time()
    from_text = tokenizer.decode(qa_answers(model, triples, "full_context")[0], skip_special_tokens=True).strip()
    text_seconds = time.process_time() - start
    tokens = len(triples[0][0])
    m, r = model.config.fixed_mem_size, model.config.mean_compression_rate
    slots = len(segment_spans(tokens, m, r)) * m  # what compress made of the context
    first_line = record["input"].splitlines()[0]
    one_line = " ".join(from_text.split())  # the base model's answer may run over several lines
    print(f"checkpoint {checkpoint}: a held-out context of {tokens} tokens ({first_line[:60]} ...) -> {slots} memory slots")
    print(f"\n-- question:                    {record['prompt']}")
    print(f"-- the context says:            {record['answer']}")
    print(f"-- answer from the {slots} slots: {from_slots}   ({slot_seconds:.1f} s CPU, compression included)")
    print(f"-- base model reading the text: {one_line}   ({text_seconds:.1f} s CPU)")
    print("(scores over 200 held-out questions, and the same with another context's slots: docs/results/finetune.md)")
    return {"checkpoint": checkpoint, "question": record["prompt"], "reference": record["answer"],
            "context_tokens": tokens, "slots": slots, "answer_from_slots": from_slots,
            "answer_from_full_context_base": from_text}
