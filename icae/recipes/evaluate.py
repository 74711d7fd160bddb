"""`icae eval`: how well a checkpoint compresses, by loss, reconstruction and perplexity.

Every text is first cut to `model_max_length` tokens (as in training). Metrics:
- ae_loss: teacher-forced token-mean loss of the [AE] task (the seed's eval curve).
- lm_loss: the first half of each text is compressed, the second half predicted from the slots
  after the [LM] token (always [LM]: the seed trains with --add_special_token_for_lm True).
- ppl_full_context / ppl_memory / ppl_no_context: the ICAE paper's Table 1 comparison, the
  perplexity of that same second half given the first half as plain tokens to the base model
  without LoRA, given its memory slots (= exp(lm_loss)), or given nothing. The plain rows start
  with BOS (EOS when there is none), so all three score exactly the same tokens.
- bleu / exact_match / token_accuracy: greedy reconstruction from the slots, up to each text's
  length + 1 tokens (icae.core.metrics says how each is counted).
- wall_time_s: the evaluation itself, without loading the model.

`--task qa` scores answers to questions about a context instead (after `icae finetune`): greedy
answers, three ways side by side as in the ICAE paper's tables, all after the same prompt part
(icae.core.qa_examples: the chat template's user turn when the tokenizer has one):
- memory: the ICAE decoder reads `[slots, [FT], prompt]`, the context compressed (cut to
  `max_context_length` tokens, multi-span when longer than m*r; each distinct context once);
- full_context: the base model without LoRA reads `[BOS, context tokens, prompt]`: the text itself
  in place of its slots and [FT];
- no_context: the base model without LoRA reads `[BOS, prompt]` (no second BOS when the prompt part
  starts with one, as SmolLM2's template does).
Each is scored by exact match, token F1, ROUGE-1 and ROUGE-L F1 against the reference answers
(icae.core.metrics). After fine-tuning the memory row should lie between the other two: the slots
lose some of the text, and the question alone tells little.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from icae.core import metrics
from icae.core.collate import IGNORE, collate
from icae.errors import UserError, check_output_path
from icae.core.config import resolve_checkpoint, results_path
from icae.core.examples import ae_example
from icae.core.inference import compress, eos_token_id, eval_mode, generate_ids, generate_plain_ids, token_ids
from icae.core.losses import output_head
from icae.core.memory import Memory
from icae.core.model import load_checkpoint



def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _decoder_nll(model, examples: list[dict]) -> tuple[float, int]:
    """Summed loss and token count of a batch of examples through the full ICAE (teacher forcing)."""
    c = model.config
    batch = collate(examples, c.position_layout, c.fixed_mem_size, c.mean_compression_rate, c.vocab_size)
    out = model(**{k: v.to(model.device) for k, v in batch.items()})
    counts = torch.tensor([sum(label != IGNORE for label in e["target_labels"]) for e in examples])
    return float((out.row_loss.float().cpu() * counts).sum()), int(counts.sum())


def _plain_nll(model, rows: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Summed loss of each row's targets after its prefix, by the base model without LoRA."""
    seqs = [prefix + targets for prefix, targets in rows]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    positions = torch.arange(width, device=model.device).expand(len(seqs), -1) * mask
    labels = torch.full_like(ids, IGNORE)
    for i, (prefix, targets) in enumerate(rows):
        labels[i, len(prefix) : len(prefix) + len(targets)] = torch.tensor(targets)
    with model._adapter("disabled"):
        hidden = model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    targets = labels[:, 1:]
    is_target = targets != IGNORE
    losses = output_head(model.base).loss(hidden.last_hidden_state[:, :-1][is_target], targets[is_target])
    return float(losses.sum()), int(is_target.sum())


def _reconstruct_ids(model, ids: list[list[int]], max_new_tokens: int | None) -> list[list[int]]:
    """Greedy [AE] decoding of a batch of texts; by default up to each text's length + 1 (EOS)."""
    memory = compress(model, ids, batch_size=len(ids))
    limits = [n + 1 for n in memory.text_lengths] if max_new_tokens is None else max_new_tokens
    return generate_ids(model, memory, task="ae", max_new_tokens=limits, batch_size=len(ids))


def evaluate(
    model,
    texts: list[str],
    limit: int | None = None,
    model_max_length: int = 512,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    generate: bool = True,
) -> dict:
    """All metrics of the module docstring on `texts` (the first `limit` of them)."""
    from tqdm.auto import tqdm

    if model_max_length < 2:
        raise UserError(f"--model_max_length must be at least 2 (got {model_max_length})")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {batch_size})")
    start_time = time.perf_counter()
    texts = list(texts[:limit] if limit is not None else texts)
    ids = [row[:model_max_length] for row in token_ids(model.tokenizer, texts)]
    ids = [row for row in ids if row]
    if not ids:
        raise UserError("no evaluation text has any tokens; pass a file with non-empty texts")
    eos = eos_token_id(model)
    start = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else eos
    halves = [(row[: len(row) // 2], row[len(row) // 2 :]) for row in ids if len(row) >= 2]
    lm_examples = [
        {"input_ids": ctx, "task": "lm", "special": True, "target_ids": cont, "target_labels": cont}
        for ctx, cont in halves
    ]
    phases = {
        "ae": _chunks([ae_example(row, eos) for row in ids], batch_size),
        "lm": _chunks(lm_examples, batch_size),
        "full": _chunks([([start] + ctx, cont) for ctx, cont in halves], batch_size),
        "none": _chunks([([start], cont) for _, cont in halves], batch_size),
        "reconstruct": _chunks(ids, batch_size) if generate else [],
    }
    sums = {name: [0.0, 0] for name in ("ae", "lm", "full", "none")}
    hypotheses: list[list[int]] = []
    bar = tqdm(total=sum(len(b) for b in phases.values()), desc="eval", unit="batch")
    with eval_mode(model):
        for name, batches in phases.items():
            bar.set_description(f"eval {name}")
            for batch in batches:
                if name == "reconstruct":
                    hypotheses += _reconstruct_ids(model, batch, max_new_tokens)
                else:
                    nll, count = (_decoder_nll if name in ("ae", "lm") else _plain_nll)(model, batch)
                    sums[name][0] += nll
                    sums[name][1] += count
                bar.update(1)
    bar.close()

    def mean(name):
        nll, count = sums[name]
        return nll / count if count else None

    def ppl(name):  # None rather than NaN/inf, which are not valid JSON
        value = metrics.perplexity(*sums[name])
        return value if math.isfinite(value) else None

    results = {
        "num_texts": len(ids),
        "model_max_length": model_max_length,
        "ae_loss": mean("ae"),
        "ae_tokens": sums["ae"][1],
        "lm_loss": mean("lm"),
        "lm_tokens": sums["lm"][1],
        "ppl_full_context": ppl("full"),
        "ppl_memory": ppl("lm"),
        "ppl_no_context": ppl("none"),
    }
    if generate:
        decode = model.tokenizer.batch_decode
        refs, hyps = decode(ids, skip_special_tokens=True), decode(hypotheses, skip_special_tokens=True)
        results["bleu"] = metrics.bleu(hyps, refs)
        results["exact_match"] = metrics.exact_match(hyps, refs)
        results["token_accuracy"] = metrics.token_accuracy(hypotheses, ids)
        results["samples"] = [{"reference": r, "reconstruction": h} for r, h in list(zip(refs, hyps))[:3]]
    results["wall_time_s"] = time.perf_counter() - start_time
    return results


ROWS = [
    ("ae_loss", "AE loss, teacher-forced (token mean)", "{:.4f}"),
    ("lm_loss", "LM loss with memory slots", "{:.4f}"),
    ("ppl_full_context", "perplexity | full context, base model", "{:.3f}"),
    ("ppl_memory", "perplexity | memory slots", "{:.3f}"),
    ("ppl_no_context", "perplexity | no context", "{:.3f}"),
    ("bleu", "reconstruction BLEU-4", "{:.2f}"),
    ("exact_match", "reconstruction exact match", "{:.4f}"),
    ("token_accuracy", "reconstruction token accuracy", "{:.4f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
]


def format_table(results: dict) -> str:
    lines = [f"{'metric':<18} {'value':>12}  description", "-" * 70]
    for key, description, fmt in ROWS:
        if key in results:
            value = results[key]
            shown = "n/a" if value is None else fmt.format(value)
            lines.append(f"{key:<18} {shown:>12}  {description}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --task qa

QA_SOURCES = {"memory": "memory slots", "full_context": "full context (base model)",
              "no_context": "no context (base model)"}
QA_METRICS = ("exact_match", "token_f1", "rouge1", "rougeL")


def qa_triples(model, records: list[dict], max_context_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(context, prompt part, answer) token ids of {input, prompt, answer} records, as fine-tuning makes them."""
    from icae.core.qa_examples import answer_ids, prompt_part_ids

    if max_context_length < 1:
        raise UserError(f"--max_context_length must be at least 1 (got {max_context_length})")
    tokenizer = model.tokenizer
    contexts = [row[:max_context_length] for row in token_ids(tokenizer, [r["input"] for r in records])]
    return [(c, prompt_part_ids(tokenizer, r["prompt"]), answer_ids(tokenizer, r["answer"]))
            for c, r in zip(contexts, records)]


def memory_answers(model, triples, max_new_tokens: int = 64, batch_size: int = 4) -> list[list[int]]:
    """Greedy answer ids from the slots: each distinct context is compressed once, whatever the
    number of questions about it."""
    unique: dict[tuple, int] = {}
    for context, _, _ in triples:
        unique.setdefault(tuple(context), len(unique))
    compressed = compress(model, [list(c) for c in unique], batch_size=batch_size)
    index = [unique[tuple(context)] for context, _, _ in triples]
    memory = Memory([compressed.slots[i] for i in index], [compressed.text_lengths[i] for i in index],
                    compressed.config)
    return generate_ids(model, memory, task="ft", prompt_ids=[p for _, p, _ in triples],
                        max_new_tokens=max_new_tokens, batch_size=batch_size)


def qa_answers(model, triples, source: str, max_new_tokens: int = 64, batch_size: int = 4) -> list[list[int]]:
    """Greedy answer ids of one row of the table: from the memory slots, the full context or no context."""
    if source == "memory":
        return memory_answers(model, triples, max_new_tokens, batch_size)
    start = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else eos_token_id(model)
    if source == "full_context":
        rows = [[start] + list(context) + list(prompt) for context, prompt, _ in triples]
    elif source == "no_context":
        rows = [([] if prompt and prompt[0] == start else [start]) + list(prompt) for _, prompt, _ in triples]
    else:
        raise ValueError(f"unknown answer source {source!r}")
    return generate_plain_ids(model, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)


def with_wrong_contexts(records: list[dict]) -> list[dict]:
    """The control for "do the slots carry the context?": every question paired with another record's
    context (the distinct contexts, in order of first appearance, each replaced by the next one), prompts
    and answers unchanged. A model that only learnt the answers' form scores the same on both."""
    contexts = list(dict.fromkeys(r["input"] for r in records))
    if len(contexts) < 2:
        raise UserError(f"--wrong_contexts needs questions about at least 2 different contexts (got {len(contexts)}); "
                        "raise --limit or pass an eval file with more contexts")
    following = {c: contexts[(i + 1) % len(contexts)] for i, c in enumerate(contexts)}
    return [{**r, "input": following[r["input"]]} for r in records]


def evaluate_qa(model, records: list[dict], limit: int | None = None, max_context_length: int = 5120,
                max_new_tokens: int = 64, batch_size: int = 4, sources=tuple(QA_SOURCES)) -> dict:
    """Exact match, token F1, ROUGE-1/ROUGE-L F1 of greedy answers from each of `sources`."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {max_new_tokens})")
    start_time = time.perf_counter()
    records = list(records[:limit] if limit is not None else records)
    if not records:
        raise UserError("there are no QA records to evaluate")
    triples = qa_triples(model, records, max_context_length)
    decode = lambda ids: model.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    references = decode([answer for _, _, answer in triples])
    results: dict = {"task": "qa", "num_examples": len(records), "max_context_length": max_context_length,
                     "num_contexts": len({tuple(c) for c, _, _ in triples})}
    answers = {}
    with eval_mode(model):
        for source in sources:
            answers[source] = [a.strip() for a in decode(qa_answers(model, triples, source, max_new_tokens, batch_size))]
            results[source] = metrics.qa_scores(answers[source], references)
    results["samples"] = [
        {"prompt": r["prompt"], "answer": ref, **{source: answers[source][i] for source in sources}}
        for i, (r, ref) in enumerate(list(zip(records, references))[:5])
    ]
    results["wall_time_s"] = time.perf_counter() - start_time
    return results


def format_qa_table(results: dict) -> str:
    """The three-way table, as markdown."""
    lines = ["| answer from | " + " | ".join(QA_METRICS) + " |", "| --- |" + " ---: |" * len(QA_METRICS)]
    for source, label in QA_SOURCES.items():
        if source in results:
            lines.append(f"| {label} | " + " | ".join(f"{results[source][k]:.3f}" for k in QA_METRICS) + " |")
    return "\n".join(lines)


def load_eval_records(source: str) -> list[dict]:
    """A file is the eval set as it is; a built-in QA set contributes its eval split only."""
    from icae.data.qa import BUILTIN_QA_SETS, builtin_splits, load_qa

    return builtin_splits(source)[1] if source in BUILTIN_QA_SETS else load_qa(source)


def load_eval_texts(source: str) -> list[str]:
    """A file is the eval set as it is; the built-in corpus contributes its eval split only."""
    from icae.data.texts import BUILTIN_PYTHON_DOCS, builtin_eval_texts, load_texts

    return builtin_eval_texts() if source == BUILTIN_PYTHON_DOCS else load_texts(source)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="icae eval", description="Evaluate an ICAE checkpoint; write JSON results.")
    p.add_argument("--checkpoint", required=True, help="ICAE checkpoint folder")
    p.add_argument("--task", choices=("ae", "qa"), default="ae",
                   help="ae: losses, reconstruction and perplexities (default); qa: answers to questions about a "
                        "context from memory slots / full context / no context (after `icae finetune`)")
    p.add_argument("--eval_file", default=None,
                   help="eval texts (.json/.jsonl/.parquet/.txt; --task qa: {input, prompt, answer} records); default: "
                        "the built-in corpus's eval split (its first 5%%, as `icae pretrain` holds out), or for --task "
                        "qa the eval split of builtin:python-docs-qa (as `icae finetune` holds out)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N texts (QA records)")
    p.add_argument("--model_max_length", type=int, default=None,
                   help="cut each text to this many tokens (default: the checkpoint's training length, else 512)")
    p.add_argument("--max_context_length", type=int, default=None,
                   help="--task qa: cut each context to this many tokens (default: the checkpoint's fine-tuning "
                        "length, else 5120)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="reconstruction length limit (default: each text's length + 1); --task qa: answer length "
                        "limit (default 64)")
    p.add_argument("--no_generate", action="store_true", help="skip reconstruction (BLEU, exact match)")
    p.add_argument("--output", default=None,
                   help="results JSON (default: CHECKPOINT/eval_results.json, or CHECKPOINT/qa_eval_results.json; "
                        "for a shipped checkpoint NAME: NAME-eval_results.json here)")
    p.add_argument("--model_name_or_path", default=None, help="base model to use instead of the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on a GPU or a CPU with bf16 instructions (amx_bf16 / avx512_bf16), else float32")
    p.add_argument("--sources", default=",".join(QA_SOURCES),
                   help=f"--task qa: the rows to compute, comma-separated (default: all of {','.join(QA_SOURCES)})")
    p.add_argument("--wrong_contexts", action="store_true",
                   help="--task qa: pair each question with another record's context (the control showing "
                        "whether answers come from the context or only from the question)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {args.limit})")
    for flag, low in (("batch_size", 1), ("max_new_tokens", 1), ("model_max_length", 2), ("max_context_length", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:  # before anything loads
            raise UserError(f"--{flag} must be at least {low} (got {getattr(args, flag)})")
    if args.output or resolve_checkpoint(args.checkpoint).is_dir():  # (else loading the checkpoint fails first)
        args.output = check_output_path(args.output or results_path(
            args.checkpoint, "qa_eval_results.json" if args.task == "qa" else "eval_results.json"), "--output")
    if args.task == "qa":
        return main_qa(args)

    args.eval_file = args.eval_file or "builtin:python-docs"
    texts = load_eval_texts(args.eval_file)
    model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device, args.dtype)
    length = args.model_max_length
    if length is None:
        trained = model.training_info.get("model_max_length")
        length = int(trained) if trained else 512
        print(f"--model_max_length {length} ("
              + ("the checkpoint's training length" if trained else "the checkpoint records no training length") + ")")
    results = evaluate(
        model, texts, limit=args.limit, model_max_length=length, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, generate=not args.no_generate,
    )
    results = {"checkpoint": str(args.checkpoint), "eval_file": args.eval_file, **results,
               "config": model.config.to_dict()}
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['num_texts']} texts from {args.eval_file}, checkpoint {args.checkpoint}")
    print(format_table(results))
    print(f"results written to {output}")
    return 0


def main_qa(args) -> int:
    """`icae eval --task qa`: the three-way table, printed and written as JSON."""
    from icae.data.qa import BUILTIN_PYTHON_DOCS_QA

    args.eval_file = args.eval_file or BUILTIN_PYTHON_DOCS_QA
    sources = tuple(x.strip() for x in args.sources.split(",") if x.strip())
    unknown = [x for x in sources if x not in QA_SOURCES]
    if unknown or not sources:
        raise UserError(f"--sources {args.sources!r}: each must be one of {', '.join(QA_SOURCES)}")
    records = load_eval_records(args.eval_file)
    if args.limit is not None:
        records = records[:args.limit]
    if args.wrong_contexts:
        records = with_wrong_contexts(records)
    model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device, args.dtype)
    length = args.max_context_length
    if length is None:
        trained = model.training_info.get("max_context_length")
        length = int(trained) if trained else 5120
        print(f"--max_context_length {length} ("
              + ("the checkpoint's fine-tuning length" if trained else "the checkpoint records none") + ")")
    results = evaluate_qa(model, records, max_context_length=length,
                          max_new_tokens=64 if args.max_new_tokens is None else args.max_new_tokens,
                          batch_size=args.batch_size, sources=sources)
    results = {"checkpoint": str(args.checkpoint), "eval_file": args.eval_file,
               "wrong_contexts": args.wrong_contexts, **results,
               "config": model.config.to_dict()}
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['num_examples']} questions about {results['num_contexts']} contexts from {args.eval_file}, "
          f"checkpoint {args.checkpoint}")
    print(format_qa_table(results))
    print(f"results written to {output}")
    return 0
