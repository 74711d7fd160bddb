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
from icae.errors import UserError
from icae.core.examples import ae_example
from icae.core.inference import compress, eos_token_id, eval_mode, generate_ids, token_ids
from icae.core.losses import linear_cross_entropy
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
    head = model.base.get_output_embeddings()
    losses = linear_cross_entropy(hidden.last_hidden_state[:, :-1][is_target], head.weight, targets[is_target], head.bias)
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


def load_eval_texts(source: str) -> list[str]:
    """A file is the eval set as it is; the built-in corpus contributes its eval split only."""
    from icae.data.texts import BUILTIN_PYTHON_DOCS, default_eval_size, load_texts, split_train_eval

    texts = load_texts(source)
    return split_train_eval(texts, default_eval_size(len(texts)))[1] if source == BUILTIN_PYTHON_DOCS else texts


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="icae eval", description="Evaluate an ICAE checkpoint; write JSON results.")
    p.add_argument("--checkpoint", required=True, help="ICAE checkpoint folder")
    p.add_argument("--eval_file", default="builtin:python-docs",
                   help=f"eval texts (.json/.jsonl/.parquet/.txt); default: the built-in corpus's eval split "
                        "(its first 5%%, as `icae pretrain` holds out)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N texts")
    p.add_argument("--model_max_length", type=int, default=None,
                   help="cut each text to this many tokens (default: the checkpoint's training length, else 512)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="reconstruction length limit (default: each text's length + 1)")
    p.add_argument("--no_generate", action="store_true", help="skip reconstruction (BLEU, exact match)")
    p.add_argument("--output", default=None, help="results JSON (default: CHECKPOINT/eval_results.json)")
    p.add_argument("--model_name_or_path", default=None, help="base model to use instead of the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {args.limit})")

    texts = load_eval_texts(args.eval_file)
    model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device)
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
    output = Path(args.output) if args.output else Path(args.checkpoint) / "eval_results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['num_texts']} texts from {args.eval_file}, checkpoint {args.checkpoint}")
    print(format_table(results))
    print(f"results written to {output}")
    return 0
