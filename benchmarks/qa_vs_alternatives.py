#!/usr/bin/env python
"""Is it worth using? Answers from memory slots against what a user would do instead, at equal budget (issue 32).

Six sources answer the same held-out questions of `builtin:python-docs-qa-long` (or any PwC-format file),
greedily, after the same prompt part (icae.core.qa_examples: the chat template's user turn):

  memory_slots            the compressor fine-tuned on the set (`icae finetune`) reads [slots, [FT], prompt]
  full_context_finetuned  the same base model + LoRA rank fine-tuned on the same questions and steps reading
                          [BOS, context, prompt] as text (`icae finetune --context_as_text True`)
  full_context_base       the base model (no LoRA) reads [BOS, context, prompt]
  truncated               the full-context fine-tuned model reads the context's first tokens, as many as the
                          slots are (n_segments * m: ~1/r of the context)
  llmlingua               the full-context fine-tuned model reads the context compressed by LLMLingua
                          (icae.core.prompt_compression; question-agnostic, aiming at 1/r of its tokens)
  no_context              the base model reads [BOS?, prompt]

Each context is read once and its questions answered from a copy of its KV cache (compress/prefill once,
answer k): `answer_after_prefix` gives the same tokens as `icae eval --task qa`'s rows (tests/test_qa_vs_alternatives.py).
Cost per answer, measured on each context: decoder context tokens (slots, kept or full context tokens), the
KV cache's bytes at the end of the answer (read off the cache), and CPU seconds (one thread; wall seconds on
a shared machine are mostly waiting) for k=1 (compression/prefill + one answer) and k=5 (compression/prefill
once, five answers). LLMLingua's cost includes its scoring-model pass (the try kept), ICAE's the encoder pass.

    # 1. LLMLingua's compressed contexts (cached as JSONL; question-agnostic, so once per context)
    python benchmarks/qa_vs_alternatives.py llmlingua --contexts 12 --output runs/qa-long/llmlingua.jsonl
    # 2. answers and costs, per context and source (appends; a rerun skips what is done)
    python benchmarks/qa_vs_alternatives.py answer --checkpoint runs/qa-long/memory_slots \\
        --text_checkpoint runs/qa-long/full_context_finetuned --llmlingua runs/qa-long/llmlingua.jsonl \\
        --contexts 12 --output runs/qa-long/answers.jsonl
    # 3. results.json, the table and the plot
    python benchmarks/qa_vs_alternatives.py report --answers runs/qa-long/answers.jsonl \\
        --output_dir docs/results/qa-vs-alternatives
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

SOURCES = ("memory_slots", "full_context_finetuned", "full_context_base", "truncated", "llmlingua", "no_context")
TEXT_SOURCES = ("full_context_finetuned", "truncated", "llmlingua")  # read by --text_checkpoint's LoRA
BASE_SOURCES = ("full_context_base", "no_context")  # the base model: any checkpoint's, LoRA off
K = 5


# ----------------------------------------------------------------------------- records


def eval_contexts(source: str, contexts: int | None, first: int = 0) -> list[tuple[str, list[dict]]]:
    """(context, its records) of the eval split, in order of first appearance; `contexts` of them from the
    `first` (0-based) on."""
    from icae.recipes.evaluate import load_eval_records

    grouped: dict[str, list[dict]] = {}
    for r in load_eval_records(source):
        grouped.setdefault(r["input"], []).append(r)
    items = list(grouped.items())[first:]
    return items[:contexts] if contexts else items


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def cpu_clock() -> float:
    return time.thread_time()  # one thread does the work (OMP_NUM_THREADS=1): its CPU time


# ----------------------------------------------------------------------------- decoding after a shared prefix


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def answer_after_prefix(model, prefix: torch.Tensor | None, prefix_positions: list[int], prompts: list[list[int]],
                        prompt_positions: list[list[int]], adapter: str, max_new_tokens: int = 64) -> dict:
    """Greedy answers to several prompts after one prefix (embeddings), read once into a KV cache that each
    answer starts from a copy of. The same tokens `_decode_batch` gives for [prefix, prompt] rows.
    Returns {"answers": ids per prompt (no EOS), "prefix_seconds", "answer_seconds": per prompt (CPU),
    "kv_cache_bytes" and "kv_tokens": per prompt, the cache at the end of its answer}."""
    from transformers import DynamicCache

    from icae.core.inference import eos_token_id

    eos = eos_token_id(model)
    head = model.base.get_output_embeddings()
    device = model.device
    start = cpu_clock()
    cache = DynamicCache(config=model.base.config)
    n_prefix = 0
    if prefix is not None and len(prefix_positions):
        n_prefix = len(prefix_positions)
        model.decoder_hidden(prefix[None].to(device), torch.ones(1, n_prefix, dtype=torch.long, device=device),
                             torch.tensor([prefix_positions], device=device), past_key_values=cache, use_cache=True,
                             adapter=adapter)
    prefix_seconds = cpu_clock() - start
    out = {"answers": [], "prefix_seconds": prefix_seconds, "answer_seconds": [], "kv_cache_bytes": [],
           "kv_tokens": []}
    for prompt, positions in zip(prompts, prompt_positions):
        start = cpu_clock()
        run = copy.deepcopy(cache)
        inputs = model.embed(torch.tensor([prompt], device=device))
        pos = torch.tensor([positions], device=device)
        seen = n_prefix + len(prompt)
        tokens: list[int] = []
        next_position = positions[-1] + 1
        for step in range(max_new_tokens):
            mask = torch.ones(1, seen, dtype=torch.long, device=device)
            hidden = model.decoder_hidden(inputs, mask, pos, past_key_values=run, use_cache=True, adapter=adapter)
            token = int(head(hidden.last_hidden_state[:, -1]).float().argmax(-1))
            if token == eos:
                break
            tokens.append(token)
            inputs = model.embed(torch.tensor([[token]], device=device))
            pos = torch.tensor([[next_position + step]], device=device)
            seen += 1
        out["answers"].append(tokens)
        out["answer_seconds"].append(cpu_clock() - start)
        out["kv_cache_bytes"].append(_cache_bytes(run))
        out["kv_tokens"].append(run.get_seq_length())
    return out


def answer_context(model, source: str, context_ids: list[int], prompts: list[list[int]], max_new_tokens: int = 64,
                   llmlingua_ids: list[int] | None = None, llmlingua_seconds: float = 0.0) -> dict:
    """One source's answers to the questions about one context, with what it cost."""
    from icae.core.inference import compress, eval_mode
    from icae.core.positions import decoder_positions, segment_spans
    from icae.core.collate import special_token_id
    from icae.core.text_context import start_id

    c = model.config
    m, r = c.fixed_mem_size, c.mean_compression_rate
    n_slots = len(segment_spans(len(context_ids), m, r)) * m  # what compress makes of the context
    bos = start_id(model)
    lora = model._decoder_state()
    compress_seconds = 0.0
    with eval_mode(model):
        if source == "memory_slots":
            start = cpu_clock()
            memory = compress(model, [context_ids])
            compress_seconds = cpu_clock() - start
            slots = memory.slots[0]
            ft = model.embed(torch.tensor([special_token_id("ft", c.vocab_size, m)], device=model.device))
            prefix = torch.cat([slots.to(ft.dtype), ft])
            positions = [decoder_positions(c.position_layout, len(context_ids), m, r, "ft", len(p)) for p in prompts]
            split = slots.shape[0] + 1
            result = answer_after_prefix(model, prefix, positions[0][:split], prompts, [p[split:] for p in positions],
                                         lora, max_new_tokens)
            budget = slots.shape[0]
        else:
            if source in ("full_context_finetuned", "full_context_base"):
                kept = list(context_ids)
            elif source == "truncated":
                kept = list(context_ids[:n_slots])
            elif source == "llmlingua":
                kept, compress_seconds = list(llmlingua_ids), llmlingua_seconds
            elif source == "no_context":
                kept = []
            else:
                raise ValueError(f"unknown source {source!r}")
            adapter = "disabled" if source in BASE_SOURCES else lora
            if source == "no_context":
                row = [] if prompts and prompts[0] and prompts[0][0] == bos else [bos]
            else:
                row = [bos] + kept
            prefix = model.embed(torch.tensor(row, device=model.device)) if row else None
            result = answer_after_prefix(model, prefix, list(range(len(row))), prompts,
                                         [list(range(len(row), len(row) + len(p))) for p in prompts], adapter,
                                         max_new_tokens)
            budget = len(kept)
    result.update(compress_seconds=compress_seconds, decoder_context_tokens=budget, context_tokens=len(context_ids))
    return result


# ----------------------------------------------------------------------------- the steps


def run_llmlingua(args) -> int:
    from icae.core.base_model import load_tokenizer
    from icae.core.prompt_compression import llmlingua_compress, llmlingua_compressor
    from icae.core.positions import segment_spans

    out = Path(args.output)
    done = {row["context"] for row in read_jsonl(out)}
    todo = [(ctx, recs) for ctx, recs in eval_contexts(args.eval_file, args.contexts) if ctx not in done]
    if not todo:
        print(f"{out}: every context is compressed already")
        return 0
    from icae.core.precision import fast_dtype

    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and fast_dtype("cpu") == torch.bfloat16) \
        else torch.float32
    compressor = llmlingua_compressor(args.model_name_or_path, dtype=dtype)
    tokenizer = load_tokenizer(args.model_name_or_path)
    for ctx, _ in todo:
        context_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"][: args.max_context_length]
        text = tokenizer.decode(context_ids)
        m, r = args.fixed_mem_size, args.rate
        rate = len(segment_spans(len(context_ids), m, r)) * m / len(context_ids)  # the slots' budget, as a share
        found = llmlingua_compress(compressor, [text], rate=rate, tries=args.tries)[0]
        append_jsonl(out, {"context": ctx, "rate_target": rate, "dtype": str(dtype).removeprefix("torch."), **found})
        print(f"llmlingua: {found['tokens']} -> {found['kept_tokens']} tokens ({found['ratio']:.3f}; target "
              f"{rate:.3f}) in {found['seconds']:.1f} s CPU", flush=True)
    return 0


def run_answers(args) -> int:
    from icae.core.model import load_checkpoint
    from icae.core.precision import fast_dtype
    from icae.core.qa_examples import answer_ids, prompt_part_ids

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        sys.exit(f"error: unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    out = Path(args.output)
    done = {(row["source"], row["context"]) for row in read_jsonl(out)}
    lingua = {row["context"]: row for row in read_jsonl(Path(args.llmlingua))} if args.llmlingua else {}
    contexts = eval_contexts(args.eval_file, args.contexts, args.first_context)
    by_checkpoint = defaultdict(list)
    for source in sources:
        ckpt = args.checkpoint if source == "memory_slots" else (
            args.text_checkpoint if source in TEXT_SOURCES else (args.base_checkpoint or args.checkpoint))
        if not ckpt:
            sys.exit(f"error: {source} needs --checkpoint / --text_checkpoint")
        by_checkpoint[ckpt].append(source)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and fast_dtype("cpu") == torch.bfloat16)
    for ckpt, ckpt_sources in by_checkpoint.items():
        model = load_checkpoint(ckpt, device="cpu", dtype="bfloat16" if bf16 else "float32")
        tok = model.tokenizer
        following = {c: contexts[(i + 1) % len(contexts)][0] for i, (c, _) in enumerate(contexts)}
        for ctx, records in contexts:
            read = following[ctx] if args.wrong_contexts else ctx  # the control: the next context's slots/text
            context_ids = tok(read, add_special_tokens=False)["input_ids"][: args.max_context_length]
            prompts = [prompt_part_ids(tok, r["prompt"]) for r in records]
            references = [tok.decode(answer_ids(tok, r["answer"]), skip_special_tokens=True) for r in records]
            for source in ckpt_sources:
                if (source, ctx) in done:
                    continue
                extra = {}
                if source == "llmlingua":
                    if ctx not in lingua:
                        print(f"skip llmlingua for a context not in {args.llmlingua}", file=sys.stderr)
                        continue
                    extra = {"llmlingua_ids": tok(lingua[ctx]["text"], add_special_tokens=False)["input_ids"],
                             "llmlingua_seconds": lingua[ctx]["seconds"]}
                wall = time.perf_counter()
                result = answer_context(model, source, context_ids, prompts, args.max_new_tokens, **extra)
                answers = [a.strip() for a in tok.batch_decode(result.pop("answers"), skip_special_tokens=True)]
                append_jsonl(out, {"source": source, "context": ctx, "checkpoint": str(ckpt),
                                   "dtype": "bf16" if bf16 else "fp32", "prompts": [r["prompt"] for r in records],
                                   "references": references, "answers": answers, **result,
                                   "wall_seconds": time.perf_counter() - wall})
                print(f"{source}: {len(records)} answers, {result['decoder_context_tokens']} context tokens, "
                      f"{time.perf_counter() - wall:.1f} s wall", flush=True)
    return 0


def run_dataset(args) -> int:
    """The long set's size: questions, contexts, modules, context tokens, where the answers sit."""
    from icae.core.base_model import load_tokenizer
    from icae.data.qa import builtin_splits

    tokenizer = load_tokenizer(args.model_name_or_path)
    out = {"source": args.eval_file, "python": sys.version.split()[0]}
    for name, records in zip(("train", "eval"), builtin_splits(args.eval_file, with_keys=True)):
        contexts = {r["context_id"]: r["input"] for r in records}
        lengths = sorted(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts.values())
        positions = [r["answer_position"] for r in records]
        out[name] = {"questions": len(records), "contexts": len(contexts), "modules": len({r["module"] for r in records}),
                     "context_tokens": {"total": sum(lengths), "median": statistics.median(lengths), "min": lengths[0],
                                        "max": lengths[-1]},
                     "answers_per_context_quarter": [sum(q / 4 <= p < (q + 1) / 4 for p in positions) for q in range(4)]}
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- fine-tuning, with the same search

# What both fine-tunes share (only the learning rate is searched, and the memory-slots run leaves out
# --context_as_text): batch, schedule (constant after warm-up, so a run stopped at step n equals a run of n
# steps, and a search arm can be continued), clipping, seed, bf16 where the CPU has it.
FINETUNE_FLAGS = [
    "--max_context_length", "1280", "--model_max_length", "160",
    "--per_device_train_batch_size", "2", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "10",
    "--max_grad_norm", "2.0", "--logging_steps", "5", "--eval_strategy", "no", "--save_steps", "10",
    "--save_total_limit", "4", "--report_to", "none", "--seed", "42", "--disable_tqdm", "True",
]


def search_loss(metrics: list[dict], search_steps: int) -> float:
    """An arm's score: the mean training loss logged over the second half of its search steps. Each batch
    is new data there (the search is far below one epoch), so its loss before the update is a held-out loss."""
    losses = [r["loss"] for r in metrics
              if r.get("loss") is not None and search_steps // 2 < r["step"] <= search_steps]
    if not losses or not all(math.isfinite(x) for x in losses):
        return float("inf")  # diverged, or never got there
    return statistics.mean(losses)


def pick_learning_rate(arms: dict[str, list[dict]], search_steps: int) -> tuple[str, dict[str, float]]:
    """The learning rate whose arm has the lowest search loss (ties: the smaller rate), and every arm's loss."""
    scores = {lr: search_loss(metrics, search_steps) for lr, metrics in arms.items()}
    finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
    if not finite:
        sys.exit(f"error: no learning-rate arm logged a finite loss by step {search_steps}: {scores}")
    return min(finite, key=lambda lr: (finite[lr], float(lr))), scores


def _icae_finetune(flags: list[str], log: Path) -> None:
    import subprocess

    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "icae", "finetune", *flags]
    print(f"$ icae finetune {' '.join(flags)}  > {log}", flush=True)
    with log.open("a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"error: icae finetune failed; see {log}")


def run_finetune(args) -> int:
    """Per source: one arm per learning rate for --search_steps, the best arm continued to --max_steps
    (resumed from its own checkpoint). Writes WORK/finetune.json: the arms' losses, the pick, the checkpoint."""
    work = Path(args.work_dir)
    record_path = work / "finetune.json"
    rates = [lr.strip() for lr in args.learning_rates.split(",") if lr.strip()]
    bf16 = args.bf16
    if bf16 == "auto":
        from icae.core.precision import fast_dtype

        bf16 = str(fast_dtype("cpu") == torch.bfloat16)
    for source in [s.strip() for s in args.sources.split(",") if s.strip()]:
        if source not in ("memory_slots", "full_context_finetuned"):
            sys.exit(f"error: only memory_slots and full_context_finetuned are fine-tuned, not {source}")
        extra = ["--context_as_text", "True"] if source == "full_context_finetuned" else []
        base = ["--restore_from", args.restore_from, "--train_file", args.train_file, *extra, *FINETUNE_FLAGS,
                "--bf16", bf16]
        arms = {}
        for lr in rates:
            out = work / "lr" / f"{source}-{lr}"
            if not any(r.get("step", 0) >= args.search_steps for r in read_jsonl(out / "metrics.jsonl")):
                _icae_finetune([*base, "--learning_rate", lr, "--max_steps", str(args.search_steps),
                                "--max_eval_samples", "0", "--output_dir", str(out)], out.with_suffix(".log"))
            arms[lr] = read_jsonl(out / "metrics.jsonl")
        lr, scores = pick_learning_rate(arms, args.search_steps)
        out = work / "lr" / f"{source}-{lr}"
        print(f"{source}: learning rate {lr} (search losses {scores}); continuing it to step {args.max_steps}",
              flush=True)
        _icae_finetune([*base, "--learning_rate", lr, "--max_steps", str(args.max_steps), "--output_dir", str(out)],
                       out.with_suffix(".log"))
        checkpoint = out / f"checkpoint-{args.max_steps}"
        if not checkpoint.is_dir():
            sys.exit(f"error: {checkpoint} was not written; see {out.with_suffix('.log')}")
        record = json.loads(record_path.read_text()) if record_path.exists() else {}  # (another source's run
        record[source] = {"search_losses": scores, "learning_rate": lr,               # may have written to it)
                          "search_steps": args.search_steps, "max_steps": args.max_steps, "checkpoint": str(checkpoint)}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def run_all(args) -> int:
    """The whole comparison in one command: both fine-tunes (same search), LLMLingua, the six rows, the
    wrong-context control, the report."""
    work = Path(args.work_dir)
    run_finetune(argparse.Namespace(**{**vars(args), "sources": "memory_slots,full_context_finetuned"}))
    tuned = json.loads((work / "finetune.json").read_text())
    common = {"eval_file": args.eval_file, "contexts": args.contexts, "first_context": 0,
              "max_context_length": args.max_context_length, "dtype": "auto"}
    scorer = args.model_name_or_path
    if scorer is None:  # LLMLingua scores with the compressor's own base model
        from icae.core.config import CONFIG_NAME, resolve_checkpoint

        scorer = json.loads((resolve_checkpoint(args.restore_from) / CONFIG_NAME).read_text())["model_name_or_path"]
    run_llmlingua(argparse.Namespace(**common, output=str(work / "llmlingua.jsonl"), tries=3,
                                     model_name_or_path=scorer, fixed_mem_size=args.fixed_mem_size,
                                     rate=args.rate))
    answer = dict(common, checkpoint=tuned["memory_slots"]["checkpoint"], max_new_tokens=64,
                  text_checkpoint=tuned["full_context_finetuned"]["checkpoint"], base_checkpoint=args.restore_from)
    run_answers(argparse.Namespace(**answer, llmlingua=str(work / "llmlingua.jsonl"), sources=",".join(SOURCES),
                                   wrong_contexts=False, output=str(work / "answers.jsonl")))
    run_answers(argparse.Namespace(**answer, llmlingua=None, sources="memory_slots", wrong_contexts=True,
                                   output=str(work / "control-wrong-contexts.jsonl")))
    control = summarize(read_jsonl(work / "control-wrong-contexts.jsonl"))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "control_wrong_contexts.json").write_text(json.dumps(control, indent=2) + "\n")
    return run_report(argparse.Namespace(answers=[str(work / "answers.jsonl")], output_dir=args.output_dir))


# ----------------------------------------------------------------------------- report


def summarize(rows: list[dict], k: int = K) -> dict:
    """Per source: the scores over every answer, and the mean cost per answer (k=1 and k=5) over contexts."""
    from icae.core import metrics

    by_source: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    for row in rows:  # one row per source and context (answer steps split over processes may overlap)
        if (row["source"], row["context"]) not in seen:
            seen.add((row["source"], row["context"]))
            by_source[row["source"]].append(row)
    common = set.intersection(*({row["context"] for row in group} for group in by_source.values())) if by_source else set()
    out = []
    for source in [s for s in SOURCES if s in by_source] + sorted(set(by_source) - set(SOURCES)):
        group = [row for row in by_source[source] if row["context"] in common]
        hyps = [a for row in group for a in row["answers"]]
        refs = [a for row in group for a in row["references"]]
        scores = metrics.qa_scores(hyps, refs)
        k1, kk, k1_4x, kk_4x = [], [], [], []
        for row in group:
            fixed = row["compress_seconds"] + row["prefix_seconds"]
            answers = row["answer_seconds"]
            k1 += [fixed + a for a in answers]
            n = min(k, len(answers))
            kk.append((fixed + sum(answers[:n])) / n)
            # 4x longer contexts, by formula: compression and prefill grow linearly with the context (attention's
            # quadratic share is small at these lengths and ignored), each answer's own cost is kept
            k1_4x += [4 * fixed + a for a in answers]
            kk_4x.append((4 * fixed + sum(answers[:n])) / n)
        kv = [b for row in group for b in row["kv_cache_bytes"]]
        budget = statistics.mean(row["decoder_context_tokens"] for row in group)
        context = statistics.mean(row["context_tokens"] for row in group)
        out.append({
            "source": source,
            "exact_match": scores["exact_match"], "token_f1": scores["token_f1"], "rouge_l": scores["rougeL"],
            "decoder_context_tokens": budget, "kv_cache_bytes": statistics.mean(kv),
            "seconds_per_answer_k1": statistics.mean(k1), "seconds_per_answer_k5": statistics.mean(kk),
            "num_questions": len(hyps), "num_contexts": len(group), "context_tokens": context,
            "at_4x_context": {"decoder_context_tokens": 4 * budget,
                              "kv_cache_bytes": statistics.mean(kv) + 3 * budget * _bytes_per_token(group),
                              "seconds_per_answer_k1": statistics.mean(k1_4x),
                              "seconds_per_answer_k5": statistics.mean(kk_4x)},
            "dtype": group[0]["dtype"],
        })
    return {"rows": out, "contexts": len(common), "questions": out[0]["num_questions"] if out else 0}


def _bytes_per_token(group: list[dict]) -> float:
    """KV-cache bytes per cached token, read off the rows' caches."""
    return sum(sum(row["kv_cache_bytes"]) for row in group) / max(1, sum(sum(row["kv_tokens"]) for row in group))


def goals(summary: dict) -> dict:
    """Issue 32's goals, each with the numbers it compares and whether it holds."""
    rows = {row["source"]: row for row in summary["rows"]}
    if not {"memory_slots", "full_context_finetuned", "truncated", "llmlingua"} <= set(rows):
        return {}
    mem, full = rows["memory_slots"], rows["full_context_finetuned"]
    out = {}
    for other in ("truncated", "llmlingua"):
        out[f"f1_above_{other}"] = {"memory_slots": mem["token_f1"], other: rows[other]["token_f1"],
                                    "holds": mem["token_f1"] > rows[other]["token_f1"]}
    share = mem["token_f1"] / full["token_f1"] if full["token_f1"] else float("nan")
    out["f1_at_least_0.8_of_full_context_finetuned"] = {"share": share, "holds": share >= 0.8}
    for key in ("seconds_per_answer_k5",):
        out["cheaper_than_full_context_at_k5"] = {"memory_slots": mem[key], "full_context_finetuned": full[key],
                                                  "holds": mem[key] < full[key]}
        out["cheaper_than_full_context_at_k5_4x_context"] = {
            "memory_slots": mem["at_4x_context"][key], "full_context_finetuned": full["at_4x_context"][key],
            "holds": mem["at_4x_context"][key] < full["at_4x_context"][key]}
    return out


def markdown_table(summary: dict) -> str:
    head = ("| source | exact match | token F1 | ROUGE-L | decoder context tokens | KV cache at answer end | "
            "s/answer k=1 | s/answer k=5 |")
    lines = [head, "| --- |" + " ---: |" * 7]
    for row in summary["rows"]:
        lines.append(f"| {row['source']} | {row['exact_match']:.3f} | {row['token_f1']:.3f} | {row['rouge_l']:.3f} | "
                     f"{row['decoder_context_tokens']:.0f} | {row['kv_cache_bytes'] / 2**20:.1f} MiB | "
                     f"{row['seconds_per_answer_k1']:.2f} | {row['seconds_per_answer_k5']:.2f} |")
    lines += ["", "At 4x longer contexts (by formula: context tokens, KV bytes and compression/prefill seconds x4, "
              "each answer's own seconds as measured):", "",
              "| source | decoder context tokens | KV cache at answer end | s/answer k=1 | s/answer k=5 |",
              "| --- |" + " ---: |" * 4]
    for row in summary["rows"]:
        x = row["at_4x_context"]
        lines.append(f"| {row['source']} | {x['decoder_context_tokens']:.0f} | {x['kv_cache_bytes'] / 2**20:.1f} MiB | "
                     f"{x['seconds_per_answer_k1']:.2f} | {x['seconds_per_answer_k5']:.2f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in summary["rows"]:
        ax.scatter(row["decoder_context_tokens"], row["token_f1"], s=40)
        ax.annotate(row["source"], (row["decoder_context_tokens"], row["token_f1"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("decoder context budget (tokens or slots the decoder reads for the context)")
    ax.set_ylabel("token F1")
    ax.set_title(f"Held-out questions: {summary['questions']} about {summary['contexts']} contexts", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_curve(args) -> int:
    """Memory-slots token F1 against fine-tuning steps (answer files per checkpoint), beside the other rows of
    a results.json as horizontal lines: curve.json and curve.png."""
    from icae.core import metrics

    points = []
    for item in args.answers:
        step, _, path = item.partition("=")
        rows = [r for r in read_jsonl(Path(path)) if r["source"] == "memory_slots"]
        scores = metrics.qa_scores([a for r in rows for a in r["answers"]], [a for r in rows for a in r["references"]])
        points.append({"step": int(step), "token_f1": scores["token_f1"], "exact_match": scores["exact_match"],
                       "questions": sum(len(r["answers"]) for r in rows)})
    points.sort(key=lambda p: p["step"])
    others = {r["source"]: r["token_f1"] for r in json.loads(Path(args.results).read_text())["rows"]
              if r["source"] != "memory_slots"}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"memory_slots": points, "other_rows": others}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["step"] for p in points], [p["token_f1"] for p in points], "o-", label="memory_slots")
    for i, (source, f1) in enumerate(sorted(others.items(), key=lambda kv: -kv[1])):
        ax.axhline(f1, linestyle="--", linewidth=1, color=f"C{i + 1}", label=f"{source} (at the last step)")
    ax.set_xlabel("fine-tuning steps (batch 2)")
    ax.set_ylabel("token F1, held-out questions")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    for p in points:
        print(f"step {p['step']}: token F1 {p['token_f1']:.3f} ({p['questions']} questions)")
    return 0


def run_report(args) -> int:
    rows = [row for path in args.answers for row in read_jsonl(Path(path))]
    summary = summarize(rows)
    summary["goals"] = goals(summary)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(summary) + "\n")
    plot(summary, out / "f1_vs_budget.png")
    print(markdown_table(summary))
    print(json.dumps(summary["goals"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--eval_file", default="builtin:python-docs-qa-long")
    common.add_argument("--contexts", type=int, default=None, help="the first N eval contexts (default: all)")
    common.add_argument("--first_context", type=int, default=0, help="start at this eval context (0-based; "
                        "to split the answer step over processes)")
    common.add_argument("--max_context_length", type=int, default=1280)
    q = sub.add_parser("llmlingua", parents=[common])
    q.add_argument("--output", required=True)
    q.add_argument("--model_name_or_path", default="smollm2-135m")
    q.add_argument("--fixed_mem_size", type=int, default=8, help="m of the compressor compared with")
    q.add_argument("--rate", type=int, default=4, help="r of the compressor compared with")
    q.add_argument("--tries", type=int, default=3)
    q.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the scoring model's dtype; auto: bf16 where the CPU has bf16 instructions")
    a = sub.add_parser("answer", parents=[common])
    a.add_argument("--checkpoint", default=None, help="the memory-slots checkpoint (icae finetune)")
    a.add_argument("--text_checkpoint", default=None, help="the full-context one (icae finetune --context_as_text)")
    a.add_argument("--base_checkpoint", default=None, help="any checkpoint of the base model (LoRA off); "
                   "default: --checkpoint")
    a.add_argument("--llmlingua", default=None, help="the llmlingua step's JSONL")
    a.add_argument("--sources", default=",".join(SOURCES))
    a.add_argument("--max_new_tokens", type=int, default=64)
    a.add_argument("--wrong_contexts", action="store_true",
                   help="the control: answer each question from the next eval context (as icae eval --wrong_contexts)")
    a.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 weights where the CPU has bf16 instructions (the fast dtype; load_checkpoint's "
                   "dtype: attention in fp32)")
    a.add_argument("--output", required=True)
    d = sub.add_parser("dataset", parents=[common])
    d.add_argument("--model_name_or_path", default="smollm2-135m")
    d.add_argument("--output", default=None)
    f = argparse.ArgumentParser(add_help=False)
    f.add_argument("--restore_from", default="smollm2-135m-icae", help="the pretrained compressor both start from")
    f.add_argument("--work_dir", default="runs/qa-long", help="fine-tuning runs, answers (not kept)")
    f.add_argument("--train_file", default="builtin:python-docs-qa-long", help="the fine-tuning questions (a built-in "
                   "set's train split, or a PwC-format file)")
    f.add_argument("--learning_rates", default="3e-4,1e-3,3e-3", help="the search: one arm each, for both sources")
    f.add_argument("--search_steps", type=int, default=30)
    f.add_argument("--max_steps", type=int, default=400, help="the chosen arm is continued to this step")
    f.add_argument("--bf16", default="auto", help="icae finetune's --bf16 (auto: where the CPU has bf16 instructions)")
    ft = sub.add_parser("finetune", parents=[f])
    ft.add_argument("--sources", default="memory_slots,full_context_finetuned")
    al = sub.add_parser("all", parents=[common, f])
    al.add_argument("--output_dir", default="docs/results/qa-vs-alternatives")
    al.add_argument("--model_name_or_path", default=None, help="LLMLingua's scoring model (default: the base model "
                    "of --restore_from)")
    al.add_argument("--fixed_mem_size", type=int, default=8)
    al.add_argument("--rate", type=int, default=4)
    c = sub.add_parser("curve")
    c.add_argument("--answers", required=True, nargs="+", help="STEP=answers.jsonl, one per memory-slots checkpoint")
    c.add_argument("--results", required=True, help="the report's results.json (the other rows, as lines)")
    c.add_argument("--output_dir", required=True)
    r = sub.add_parser("report")
    r.add_argument("--answers", required=True, nargs="+", help="the answer step's JSONL file(s)")
    r.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    steps = {"llmlingua": run_llmlingua, "answer": run_answers, "report": run_report, "dataset": run_dataset,
             "finetune": run_finetune, "all": run_all, "curve": run_curve}
    return steps[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
