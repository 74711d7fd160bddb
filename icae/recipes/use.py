"""`icae compress / reconstruct / generate`: text -> memory slots (a safetensors file) -> text.

The work is done by icae.core.inference; the slots file is a saved `Memory` (icae.core.memory).
`icae generate --context FILE --prompt "..."` compresses the context itself and answers the prompt
(the [FT] task, after `icae finetune`); `--prompt` may be repeated: every question is answered from
the same slots, compressed once. `icae reconstruct --context FILE` compresses and reconstructs in one
go. `-` reads standard input (`--context -`, `compress --file -`). `--checkpoint` defaults to the
checkpoint shipped in the package (smollm2-135m-icae).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sys

from icae.core.config import shipped_checkpoints
from icae.core.inference import compress, generate, reconstruct
from icae.core.memory import Memory
from icae.core.model import load_checkpoint
from icae.errors import UserError, check_output_path


def _parser(command: str) -> argparse.ArgumentParser:
    descriptions = {
        "compress": "Compress texts into memory slots, saved as one safetensors file.",
        "reconstruct": "Print the texts reconstructed from a slots file (the [AE] task).",
        "generate": "Print a continuation ([LM]) of each compressed text, or an answer to --prompt ([FT]).",
    }
    p = argparse.ArgumentParser(prog=f"icae {command}", description=descriptions[command])
    shipped = shipped_checkpoints()
    p.add_argument("--checkpoint", required=not shipped, default=shipped[0] if shipped else None,
                   help="ICAE checkpoint folder (icae_config.json + weights) or a shipped checkpoint's name"
                   + (f" (default: {shipped[0]})" if shipped else ""))
    p.add_argument("--model_name_or_path", default=None, help="base model to use instead of the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on a GPU or a CPU with bf16 instructions (amx_bf16 / avx512_bf16), else float32")
    p.add_argument("--batch_size", type=int, default=8)
    if command == "compress":
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--text", help="one text to compress")
        source.add_argument("--file", help="texts: .json/.jsonl/.parquet/.txt file, builtin:python-docs, "
                            "or - for one text from standard input")
        p.add_argument("-o", "--output", required=True, help="slots file to write (.safetensors)")
        return p
    p.add_argument("slots", nargs="?", default=None, help="slots file written by `icae compress` (or --context)")
    p.add_argument("--context", default=None,
                   help="compress this file first instead of reading a slots file (.txt: one context; "
                        ".json/.jsonl/.parquet: one per text; -: standard input)")
    p.add_argument("--max_new_tokens", type=int, default=None if command == "reconstruct" else 64)
    p.add_argument("--json", action="store_true", help="print a JSON list of strings instead of plain text")
    if command == "generate":
        p.add_argument("--prompt", action="append", default=None,
                       help="a question or instruction about the text ([FT] task); repeat it to ask several "
                            "questions of the same slots")
        p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top_p", type=float, default=1.0)
        p.add_argument("--top_k", type=int, default=0)
        p.add_argument("--seed", type=int, default=None)
    return p


def _print_texts(texts: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(texts, ensure_ascii=False))
        return
    for text in texts:
        print(text)


def _read_contexts(source: str) -> list[str]:
    """--context: a .json/.jsonl/.parquet file or a folder of .txt files holds one context per text; any
    other file (.txt, .md, .py, ...) is one context, read whole."""
    from pathlib import Path

    from icae.data.texts import load_texts, read_text_file

    if source == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise UserError("standard input is empty: pipe a text in, or pass a file")
        return [text]
    path = Path(source).expanduser()
    if source.startswith("builtin:") or path.is_dir() or path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        return load_texts(source)
    if not path.is_file():
        raise UserError(f"--context {source} does not exist; pass a text file")
    return [read_text_file(path)]


def check_generate_task(checkpoint: str, prompts: list[str] | None) -> None:
    """`--prompt` needs a checkpoint fine-tuned on the [FT] task (`icae finetune`): a pretrained one answers
    with a blank line. Read from icae_config.json's training record, before anything loads; a checkpoint that
    records no training is let through."""
    from icae.core.config import ICAEConfig

    if prompts is None:
        return
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt is empty: give a question or instruction about the text")
    info = ICAEConfig.load(checkpoint)[1].get("training") or {}
    if info and info.get("task") != "ft":
        raise UserError(f"checkpoint {checkpoint} was pretrained only (no [FT] training), so it cannot answer "
                        f"--prompt; fine-tune it first: icae finetune --restore_from {checkpoint} ... "
                        "(icae reconstruct reads its slots as they are)")


def main(argv: list[str], command: str = "compress") -> int:
    if command not in ("compress", "reconstruct", "generate"):
        raise ValueError(f"unknown command {command!r}")
    args = _parser(command).parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {args.batch_size})")
    if command == "compress":
        check_output_path(args.output, "--output")  # before the texts and the model load
        if args.file and Path(args.file).expanduser().resolve() == Path(args.output).expanduser().resolve():
            raise UserError(f"--output {args.output} is the --file it compresses; choose another --output")
        if args.text is not None and not args.text.strip():
            raise UserError("--text is empty: there is nothing to compress")
        if args.text is not None:
            texts = [args.text]
        elif args.file == "-":
            texts = _read_contexts("-")
        else:
            from icae.data.texts import load_texts

            texts = load_texts(args.file)
        model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device, args.dtype)
        memory = compress(model, texts, batch_size=args.batch_size)
        memory.save(args.output)
        print(f"compressed {len(texts)} texts ({sum(memory.text_lengths)} tokens) into {memory.num_slots} slots: "
              f"{args.output}")
        return 0
    if (args.slots is None) == (args.context is None):
        raise UserError(f"icae {command} reads either a slots file or --context FILE: give one of them")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    if command == "generate":
        check_generate_task(args.checkpoint, args.prompt)
    if args.context is not None:
        texts = _read_contexts(args.context)  # checked before the model loads
        model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device, args.dtype)
        memory = compress(model, texts, batch_size=args.batch_size)
    else:
        memory = Memory.load(args.slots)
        model = load_checkpoint(args.checkpoint, args.model_name_or_path, args.device, args.dtype)
    if command == "reconstruct":
        _print_texts(reconstruct(model, memory, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                     args.json)
        return 0
    prompts = args.prompt or [None]
    answers = [
        generate(model, memory, prompt=prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                 batch_size=args.batch_size)
        for prompt in prompts
    ]
    if len(prompts) == 1:
        _print_texts(answers[0], args.json)
    elif args.json:
        print(json.dumps([{"prompt": p, "answers": a} for p, a in zip(prompts, answers)], ensure_ascii=False))
    else:
        for prompt, texts in zip(prompts, answers):
            print(f"> {prompt}")
            _print_texts(texts, False)
    return 0
