"""`icae finetune`: ICAE v2's instruction fine-tuning: answer a prompt about a context the decoder
sees only as memory slots.

The second stage after `icae pretrain`, with the same machinery (every `TrainingArguments` flag,
complete checkpoints, resume, metrics.jsonl, wandb/tensorboard, torchrun / accelerate launch) and
the same order: every check (flags, output_dir, data, the model's config, the checkpoints) before
anything is written or loaded. What differs:
- `--restore_from PRETRAINED_CHECKPOINT` is required. The layout, m, r, LoRA rank/alpha/targets
  and the base model are taken from it; a flag that contradicts the checkpoint is an error. The
  decoder mode is the checkpoint's unless `--decoder_mode` (or `--train_decoder True`) says otherwise.
- The data are {input, prompt, answer} records (icae.data.qa: PwC-format files or the built-in
  `builtin:python-docs-qa`), made into `[slots, [FT], prompt, answer, EOS]` rows with the loss on the
  answer and EOS only (icae.core.qa_examples).
- Evaluation: the teacher-forced answer loss on held-out records (eval_loss), and with
  `--eval_qa_samples N` exact match / token F1 / ROUGE of greedy answers from the slots of the first
  N of them. `icae eval --task qa` gives the full three-way table afterwards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from icae.core.config import ICAEConfig
from icae.core.qa_examples import FTExampleConfig
from icae.data.qa import BUILTIN_PYTHON_DOCS_QA
from icae.errors import UserError
from icae.training import run as plumbing
from icae.training.arguments import ICAETrainingArguments, ModelArguments, given_flags
from icae.training.arguments import parse_args as parse
from icae.training.trainer import ICAETrainer

# Taken from the --restore_from checkpoint; giving one of them another value is an error.
FROM_CHECKPOINT = ("fixed_mem_size", "mean_compression_rate", "position_layout", "lora_r", "lora_alpha",
                   "lora_target_modules")


@dataclass
class FinetuneDataArguments:
    train_file: str = field(
        default=BUILTIN_PYTHON_DOCS_QA,
        metadata={"help": "{input, prompt, answer} records (.json/.jsonl/.parquet, the PwC format), or "
                  f"{BUILTIN_PYTHON_DOCS_QA} (default; its train split)"},
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "eval records; default: the built-in set's held-out modules, or the first "
                                "--eval_size records of --train_file"}
    )
    eval_size: int | None = field(
        default=None, metadata={"help": "the first N records of --train_file are the eval split when --eval_file is "
                                "not given (default: 5%%, at least 1, at most 1,000)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N eval records"})


@dataclass
class FinetuneArguments(ICAETrainingArguments):
    output_dir: str = field(default="runs/finetune", metadata={"help": "where checkpoints and metrics go"})
    max_context_length: int = field(
        default=5120, metadata={"help": "context tokens kept (ICAE v2: 5120); longer than m*r means several segments"}
    )
    model_max_length: int = field(
        default=512, metadata={"help": "decoder tokens after [FT]: prompt part + answer + EOS (longer answers are cut)"}
    )
    eval_qa_samples: int = field(
        default=0, metadata={"help": "at each eval, answer this many eval questions greedily from the slots and log "
                             "exact match, token F1 and ROUGE-1/L (0: off)"}
    )
    context_as_text: bool = field(
        default=False, metadata={"help": "the full-context baseline: the decoder reads [BOS, context, prompt, answer] "
                                 "as text, no slots, with a fresh LoRA of the checkpoint's rank/targets "
                                 "(--restore_from gives the config only; icae.core.text_context)"}
    )

    def example_config(self) -> FTExampleConfig:
        return FTExampleConfig(max_context_length=self.max_context_length,
                               model_max_length=self.model_max_length).validate()


def parse_args(argv: list[str]) -> tuple[ModelArguments, FinetuneDataArguments, FinetuneArguments]:
    return parse(argv, (ModelArguments, FinetuneDataArguments, FinetuneArguments), prog="icae finetune")


def finetune_config(model_args: ModelArguments, given: set[str]) -> ICAEConfig:
    """The run's ICAEConfig: the --restore_from checkpoint's, with the flags allowed to differ
    (decoder mode, LoRA dropout, the base model's path); a flag that contradicts it is an error."""
    if not model_args.restore_from:
        raise UserError("icae finetune needs --restore_from: the output folder (or a checkpoint-N folder) of "
                        "`icae pretrain`")
    path = Path(model_args.restore_from)
    if not path.is_dir():
        raise UserError(f"--restore_from {path} does not exist; pass the output folder of `icae pretrain` "
                        "or one of its checkpoint-N folders")
    saved, _ = ICAEConfig.load(path)
    config = model_args.icae_config()
    if "use_my_pe" in given:  # the seed's switches say the layout / decoder mode as much as ours do
        given = given | {"position_layout"}
    if "train_decoder" in given:
        given = given | {"decoder_mode"}
    diffs = [f"--{name} {getattr(saved, name)!r} (this run: {getattr(config, name)!r})" for name in FROM_CHECKPOINT
             if name in given and getattr(config, name) != getattr(saved, name)]
    if diffs:
        raise UserError(f"--restore_from {path} was pretrained with {'; '.join(diffs)}: fine-tuning takes the layout, "
                        "m, r and LoRA config from the checkpoint; leave those flags out, or restore from a checkpoint "
                        "pretrained with them")
    for name in FROM_CHECKPOINT:
        setattr(config, name, getattr(saved, name))
    if "model_name_or_path" not in given:
        config.model_name_or_path = saved.model_name_or_path
    if "decoder_mode" not in given:
        config.decoder_mode = saved.decoder_mode
    return config.validate()


# ----------------------------------------------------------------------------- data


def load_qa_splits(data_args: FinetuneDataArguments, verbose: bool = False) -> tuple[list[dict], list[dict]]:
    from icae.data.qa import BUILTIN_QA_SETS, builtin_splits, load_qa
    from icae.data.texts import default_eval_size, split_train_eval

    source = data_args.train_file
    if source in BUILTIN_QA_SETS:
        train, evaluation = builtin_splits(source)
        how = "the held-out modules"
        if data_args.eval_file:
            evaluation, how = load_qa(data_args.eval_file), "--eval_file"
    else:
        records = load_qa(source)
        if data_args.eval_file:
            train, evaluation, how = records, load_qa(data_args.eval_file), "--eval_file"
        else:
            size = data_args.eval_size if data_args.eval_size is not None else default_eval_size(len(records))
            train, evaluation = split_train_eval(records, size)
            how = f"the first {size:,}" + (" (--eval_size)" if data_args.eval_size is not None else " (5%)")
    if data_args.max_train_samples:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    if verbose:
        print(f"QA records: {len(train):,} train, {len(evaluation):,} eval ({how}) from {source}", flush=True)
    return train, evaluation


def build_ft_datasets(train_records: list[dict], eval_records: list[dict], tokenizer, cfg: FTExampleConfig,
                      cache: bool = True):
    """(train, eval) FTDatasets: contexts, prompt parts and answers tokenized once (cached on disk)."""
    from icae.core.qa_examples import FTDataset, prompt_part_text
    from icae.data.tokens import tokenize_texts

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which ends every answer; use a model whose tokenizer has one")
    datasets = []
    for name, records in (("training", train_records), ("eval", eval_records)):
        contexts = tokenize_texts([r["input"] for r in records], tokenizer, cfg.max_context_length, cache,
                                  desc=f"{name} contexts")
        prompts = tokenize_texts([prompt_part_text(tokenizer, r["prompt"]) for r in records], tokenizer, None, cache,
                                 desc=f"{name} prompts")
        answers = tokenize_texts([r["answer"] for r in records], tokenizer, None, cache, desc=f"{name} answers")
        dataset = FTDataset(list(zip(contexts, prompts, answers)), tokenizer.eos_token_id, cfg)
        if dataset.skipped:
            print(f"note: skipped {dataset.skipped} of {len(records)} {name} records whose prompt part fills "
                  f"--model_max_length {cfg.model_max_length}", file=sys.stderr)
        datasets.append(dataset)
    if not len(datasets[0]):
        raise UserError(f"no training record leaves room for an answer within --model_max_length "
                        f"{cfg.model_max_length}; raise it")
    return datasets[0], datasets[1]


# ----------------------------------------------------------------------------- the trainer


class FinetuneTrainer(ICAETrainer):
    """ICAETrainer, plus greedy answers from the slots of the first `--eval_qa_samples` eval records at
    each eval: the answer loss alone cannot tell whether the answers come out right."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        n = getattr(self.args, "eval_qa_samples", 0) or 0
        dataset = self.eval_dataset if not isinstance(self.eval_dataset, dict) else None
        if n > 0 and dataset is not None and len(dataset) and self.is_world_process_zero():
            from icae.core import metrics
            from icae.recipes.evaluate import memory_answers

            model = self.accelerator.unwrap_model(self.model)
            triples = dataset.triples[:n]
            if getattr(self.args, "context_as_text", False):
                from icae.core.text_context import start_id, text_answers

                hyps = text_answers(model, [[start_id(model)] + list(c) + list(p) for c, p, _ in triples], 64,
                                    self.args.per_device_eval_batch_size)
            else:
                hyps = memory_answers(model, triples, max_new_tokens=64,
                                      batch_size=self.args.per_device_eval_batch_size)
            decode = lambda ids: [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]  # noqa: E731
            scores = metrics.qa_scores(decode(hyps), decode([answer for _, _, answer in triples]))
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    # Arguments, and every check before anything is written or loaded (the records are read).
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_args(argv)
    example_cfg = args.example_config()
    if args.eval_qa_samples < 0:
        raise UserError(f"--eval_qa_samples must not be negative (got {args.eval_qa_samples})")
    config = finetune_config(model_args, given_flags(argv))
    resume = plumbing.check_start(config, args)

    # Data: the records now, tokenized after the checks.
    train_records, eval_records = load_qa_splits(data_args, verbose=args.should_log)
    plumbing.check_eval_data(args, len(eval_records), "records")
    plumbing.check_checkpoints(config, args, resume, model_args.restore_from)
    out = plumbing.prepare_output_dir(args, resume)
    from icae.core.base_model import load_tokenizer

    tokenizer = load_tokenizer(config.model_name_or_path)
    train_set, eval_set = build_ft_datasets(train_records, eval_records, tokenizer, example_cfg,
                                            cache=not args.disable_datasets_cache)

    # Model: the pretrained checkpoint's weights.
    if args.context_as_text:  # the full-context baseline: a fresh LoRA reading the context as text
        from icae.core.text_context import as_text_context_model

        if config.decoder_mode == "frozen":  # the decoder must read with the LoRA it trains: the one adapter
            config.decoder_mode = "shared"
        model = as_text_context_model(plumbing.build_model(config, args, tokenizer, model_args.attn_implementation))
    else:
        model = plumbing.build_model(config, args, tokenizer, model_args.attn_implementation, model_args.restore_from)
    model.training_info = {"task": "ft", "max_context_length": example_cfg.max_context_length,
                           "model_max_length": example_cfg.model_max_length, "train_source": data_args.train_file,
                           "restored_from": str(model_args.restore_from), "context_as_text": args.context_as_text,
                           "command": plumbing.command_line("icae finetune", argv)}

    # Run.
    plumbing.record_run(model, out, args, f"train examples: {len(train_set):,} | eval examples: {len(eval_set):,} | "
                        f"restored from: {model_args.restore_from} | resume: {resume}",
                        {"examples": example_cfg, "data": data_args, "restore_from": str(model_args.restore_from)})
    return plumbing.run(FinetuneTrainer, model, args, train_set, eval_set, resume)
