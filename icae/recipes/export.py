"""`icae export --checkpoint DIR --output DIR`: a smaller copy of a checkpoint to share or ship.

Weights are stored in `--dtype` (float16 halves an fp32 checkpoint; loading casts them back) and
without tokenizer files (the base model's tokenizer is used). `--lora_rank K` refactors every
LoRA update (alpha/r) B A at rank K by truncated SVD, the best rank-K approximation of it
(Eckart-Young), stored with alpha = K so the scale stays 1; check what it costs with `--eval_texts`. `icae_config.json` keeps how the
weights were trained and gains the step they come from and, with `--eval_texts N`, the held-out
metrics of the exported weights (`icae eval` on the first N texts of the eval split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icae.core.config import resolve_checkpoint

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def truncate_lora(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank `rank` with B' A' the best approximation of scale * B A."""
    u, s, vh = torch.linalg.svd(scale * (b.double() @ a.double()), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(a.dtype), (u[:, :rank] * root).to(b.dtype)


def lower_rank(model, rank: int):
    """A copy of `model` (same base weights) whose LoRA updates are refactored at `rank`."""
    import dataclasses

    from icae.core.model import ICAE

    config = dataclasses.replace(model.config, lora_r=rank, lora_alpha=rank)
    smaller = ICAE(config, tokenizer=model.tokenizer)  # a fresh base model: LoRA cannot be put on a wrapped one twice
    own, new = dict(model.named_parameters()), dict(smaller.named_parameters())
    scale = model.config.lora_alpha / model.config.lora_r
    with torch.no_grad():
        for name, param in new.items():
            if ".lora_A." in name:
                b_name = name.replace(".lora_A.", ".lora_B.")
                a, b = truncate_lora(own[name], own[b_name], scale, rank)
                param.copy_(a)
                new[b_name].copy_(b)
            elif ".lora_B." not in name and param.requires_grad:
                param.copy_(own[name])
    return smaller.eval()


def check_target(source: Path, out: Path) -> None:
    """An export never writes into its source checkpoint, nor into a non-empty folder that is not an earlier
    export of the same checkpoint (which it replaces)."""
    from icae.core.config import CONFIG_NAME
    from icae.errors import UserError, check_output_path

    check_output_path(out, "--output", folder=True)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise UserError(f"--output {out} is inside the checkpoint {source} it exports; choose another --output")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / CONFIG_NAME).read_text()).get("training", {}).get("exported_from")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier is None or resolve_checkpoint(earlier).resolve() != source.resolve():
        raise UserError(f"--output {out} is not empty and is not an earlier export of {source}; choose another "
                        "--output, or remove it first")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="icae export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder to export")
    p.add_argument("--output", required=True, help="folder to write (e.g. icae/checkpoints/NAME to ship it)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--lora_rank", type=int, default=None, help="refactor the LoRA updates at this lower rank (SVD)")
    p.add_argument("--eval_texts", type=int, default=0, help="evaluate the exported weights on N held-out texts")
    p.add_argument("--eval_file", default="builtin:python-docs")
    args = p.parse_args(argv)
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE, load_checkpoint
    from icae.errors import UserError

    if args.eval_texts < 0:
        raise UserError(f"--eval_texts must not be negative (got {args.eval_texts})")
    source = Path(args.checkpoint)
    check_target(resolve_checkpoint(source), Path(args.output))  # before anything loads
    saved, _ = ICAEConfig.load(source)
    if args.lora_rank is not None and not 1 <= args.lora_rank < saved.lora_r:
        raise UserError(f"--lora_rank must be between 1 and the checkpoint's rank {saved.lora_r} - 1 "
                        f"(got {args.lora_rank})")
    if args.eval_texts:
        from icae.recipes.evaluate import load_eval_texts

        eval_texts = load_eval_texts(args.eval_file)
    model = load_checkpoint(args.checkpoint, device="cpu")
    info = dict(model.training_info)
    info.pop("held_out_metrics", None)  # the source's, if it is an export itself: measured on other weights
    state = source / "trainer_state.json"
    if state.is_file():
        info["steps"] = json.loads(state.read_text()).get("global_step")
    info["exported_from"] = str(source)
    out = Path(args.output)
    model.training_info = info
    if args.lora_rank is not None:
        info["lora_rank_before_export"] = model.config.lora_r
        model = lower_rank(model, args.lora_rank)
        model.training_info = info
    model.save_pretrained(out, dtype=DTYPES[args.dtype], save_tokenizer=False)
    if args.eval_texts:
        from icae.recipes.evaluate import evaluate

        exported = ICAE.from_pretrained(out).eval()  # the weights as shipped, after the dtype round trip
        length = int(info.get("model_max_length") or 512)
        results = evaluate(exported, eval_texts, limit=args.eval_texts, model_max_length=length, batch_size=16)
        keys = ("num_texts", "model_max_length", "ae_loss", "token_accuracy", "exact_match", "bleu")
        info["held_out_metrics"] = {k: results[k] for k in keys}
        exported.training_info = info
        exported.save_pretrained(out, dtype=DTYPES[args.dtype], save_tokenizer=False)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {source} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB)")
    if "held_out_metrics" in info:
        print(json.dumps(info["held_out_metrics"], indent=2))
    return 0
