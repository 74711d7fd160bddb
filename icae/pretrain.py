"""`icae pretrain`: ICAE v2 pretraining (autoencoding + language modelling over memory slots).

Accepts the seed's command lines verbatim (`icae pretrain` in place of `pretrain.py`), ICAE v2's
flags, and every `TrainingArguments` flag. Runs on a CPU, one GPU, or many under
`accelerate launch` / `torchrun` (also as `python -m icae.pretrain`).

Read top to bottom: arguments -> data -> model -> Trainer -> final save and eval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from icae.config import ICAEConfig
from icae.errors import UserError
from icae.examples import ExampleConfig

# ----------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments(ICAEConfig):
    use_my_pe: bool | None = field(default=None, metadata={"help": "the seed's switch: True = --position_layout epl"})
    train_decoder: bool | None = field(default=None, metadata={"help": "True = --decoder_mode shared (the seed's)"})
    restore_from: str | None = field(default=None, metadata={"help": "start from the weights of an ICAE checkpoint"})

    def icae_config(self) -> ICAEConfig:
        if self.use_my_pe is not None:
            if self.position_layout not in ("default", "epl" if self.use_my_pe else "default"):
                raise UserError("--use_my_pe contradicts --position_layout: give only one of them")
            self.position_layout = "epl" if self.use_my_pe else self.position_layout
        if self.train_decoder:
            if self.decoder_mode not in ("frozen", "shared"):
                raise UserError("--train_decoder True contradicts --decoder_mode: give only one of them")
            self.decoder_mode = "shared"
        names = {f.name for f in dataclasses.fields(ICAEConfig)}
        return ICAEConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}).validate()


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "training texts (.json/.jsonl/.parquet/.txt/folder); default: built-in corpus"}
    )
    eval_file: str | None = field(default=None, metadata={"help": "eval texts; default: split off the training source"})
    eval_size: int = field(default=1000, metadata={"help": "texts split off for eval when --eval_file is not given"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training texts"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N eval texts"})
    min_chars: int = field(default=1, metadata={"help": "skip texts shorter than this many characters"})


@dataclass
class PretrainArguments(TrainingArguments):
    output_dir: str = field(default="runs/pretrain", metadata={"help": "where checkpoints and metrics go"})
    model_max_length: int = field(default=512, metadata={"help": "tokens kept per text (the seed cuts to this)"})
    lm_ratio: float = field(default=0.0, metadata={"help": "probability of an LM example (else AE)"})
    min_tokens_for_lm: int = field(default=64, metadata={"help": "shorter continuations become AE examples"})
    leave_tokens_for_lm: int = field(default=8, metadata={"help": "first continuation tokens carry no loss"})
    add_special_token_for_lm: bool = field(default=False, metadata={"help": "put [LM] before the continuation"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start afresh even if output_dir has a run"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})
    disable_datasets_cache: bool = field(default=False, metadata={"help": "the seed's workaround: no datasets cache"})
    remove_unused_columns: bool = field(default=False)
    prediction_loss_only: bool = field(default=True)

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        self.remove_unused_columns = False  # our collator reads the raw examples
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available():
            self.use_cpu = True  # torchrun on CPUs: without this Trainer runs N unsynchronised copies
        if not _cuda_available():
            self.dataloader_pin_memory = False
        super().__post_init__()

    def example_config(self) -> ExampleConfig:
        return ExampleConfig(
            model_max_length=self.model_max_length,
            lm_ratio=self.lm_ratio,
            min_tokens_for_lm=self.min_tokens_for_lm,
            leave_tokens_for_lm=self.leave_tokens_for_lm,
            add_special_token_for_lm=self.add_special_token_for_lm,
        ).validate()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, PretrainArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainArguments))
    parser.prog = "icae pretrain"
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:  # TrainingArguments' own checks
        raise UserError(str(err).splitlines()[0]) from None
    return model_args, data_args, train_args


def resolve_output_dir(args: PretrainArguments) -> Path | None:
    """The checkpoint to resume from, after refusing to clobber an unrelated non-empty folder."""
    from icae.trainer import last_complete_checkpoint

    out = Path(args.output_dir)
    if args.resume_from_checkpoint not in (None, "", "False", "false"):
        if args.resume_from_checkpoint in ("True", "true", "last"):
            last = last_complete_checkpoint(out)
            if last is None:
                raise UserError(f"--resume_from_checkpoint: no complete checkpoint in {out}")
            return last
        path = Path(args.resume_from_checkpoint)
        if not (path / "COMPLETE").is_file():
            raise UserError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder")
        return path
    if args.overwrite_output_dir or not out.is_dir() or not any(out.iterdir()):
        return None
    last = last_complete_checkpoint(out)
    if last is None:
        raise UserError(
            f"output_dir {out} is not empty and holds no complete checkpoint to resume: "
            "pass --overwrite_output_dir to start afresh there, or choose another --output_dir"
        )
    return last


# ----------------------------------------------------------------------------- data


def load_splits(data_args: DataArguments, seed_eval_size: int) -> tuple[list[str], list[str]]:
    from icae.texts import BUILTIN_PYTHON_DOCS, load_texts, split_train_eval

    source = data_args.train_file or BUILTIN_PYTHON_DOCS
    texts = load_texts(source, min_chars=data_args.min_chars)
    if data_args.eval_file:
        train, evaluation = texts, load_texts(data_args.eval_file, min_chars=data_args.min_chars)
    else:
        train, evaluation = split_train_eval(texts, seed_eval_size)
    if data_args.max_train_samples:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return train, evaluation


def build_datasets(train_texts, eval_texts, tokenizer, cfg: ExampleConfig, seed: int, cache: bool = True):
    from icae.data import tokenize_texts
    from icae.examples import build_examples

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which the AE target needs; use a model whose tokenizer has one")
    eos = tokenizer.eos_token_id
    train_ids = [t for t in tokenize_texts(train_texts, tokenizer, cfg.model_max_length, cache) if t]
    eval_ids = [t for t in tokenize_texts(eval_texts, tokenizer, cfg.model_max_length, cache) if t]
    if not train_ids:
        raise UserError("no training text has a single token; check the training data")
    train = build_examples(train_ids, cfg, eos, seed)
    evaluation = build_examples(eval_ids, cfg, eos, seed, eval_set=True)
    return train, evaluation


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    config = model_args.icae_config()
    example_cfg = args.example_config()
    resume = resolve_output_dir(args)

    from transformers import set_seed

    from icae.base_model import load_base_model, load_tokenizer
    from icae.model import ICAE
    from icae.trainer import ICAETrainer, MetricsFileCallback, describe_model

    if args.disable_datasets_cache:
        from datasets import disable_caching

        disable_caching()
    out = Path(args.output_dir)
    if args.overwrite_output_dir and out.is_dir() and resume is None and args.should_save:
        for child in out.iterdir():  # start afresh: old metrics and checkpoints would mix with the new run
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)

    train_texts, eval_texts = load_splits(data_args, data_args.eval_size)
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_set, eval_set = build_datasets(
        train_texts, eval_texts, tokenizer, example_cfg, args.seed, cache=not args.disable_datasets_cache
    )

    set_seed(args.seed)
    base = load_base_model(config.model_name_or_path)  # fp32 master weights; --bf16 autocasts
    model = ICAE(config, base_model=base, tokenizer=tokenizer)
    if model_args.restore_from:
        model.load_trainable_weights(model_args.restore_from)
    if args.should_save:
        print(describe_model(model), flush=True)
        print(f"train examples: {len(train_set):,} | eval examples (AE): {len(eval_set):,} | resume: {resume}")
        (out / "run_config.json").write_text(
            json.dumps({"icae": config.to_dict(), "examples": dataclasses.asdict(example_cfg),
                        "data": dataclasses.asdict(data_args), "seed": args.seed,
                        "trainable_params": model.num_parameters()[0]}, indent=2) + "\n"
        )

    trainer = ICAETrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=model.collator,
        callbacks=[MetricsFileCallback()],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(args.output_dir)
    if eval_set:
        trainer.evaluate()
    return 0


if __name__ == "__main__":
    from icae.cli import main as cli_main

    cli_main(["pretrain", *sys.argv[1:]])
