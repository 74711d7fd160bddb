"""`icae pretrain`: ICAE v2 pretraining (autoencoding + language modelling over memory slots).

Accepts the seed's command lines verbatim (`icae pretrain` in place of `pretrain.py`), ICAE v2's
flags, and every `TrainingArguments` flag. Runs on a CPU, one GPU, or many under
`accelerate launch` / `torchrun` (also as `python -m icae.pretrain`).

Read top to bottom: arguments -> data -> model -> run. The run plumbing (checks, output folder,
resume, Trainer, final save) is icae/training/run.py, shared with `icae finetune`. Everything a
user can get wrong (flags, data files, the model, the checkpoint to resume) is checked before the
first expensive step (tokenizing, loading weights) and reported as one `UserError` line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from icae.core.examples import ExampleConfig
from icae.errors import UserError
from icae.training import run as plumbing
from icae.training.arguments import ICAETrainingArguments, ModelArguments
from icae.training.arguments import parse_args as parse

# ----------------------------------------------------------------------------- arguments


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "training texts (.json/.jsonl/.parquet/.txt/folder); default: built-in corpus"}
    )
    eval_file: str | None = field(default=None, metadata={"help": "eval texts; default: split off the training source"})
    eval_size: int | None = field(
        default=None, metadata={"help": "the first N texts are the eval split when --eval_file is not given "
                                "(default: 5%% of the texts, at least 1, at most 1,000)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training texts"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N eval texts"})
    min_chars: int = field(default=1, metadata={"help": "skip texts shorter than this many characters"})
    streaming: bool = field(
        default=False, metadata={"help": "read, tokenize and build examples while training, from the files or a "
                                 "hub dataset (--train_file NAME), storing nothing; needs --max_steps"}
    )
    dataset_split: str = field(default="train", metadata={"help": "the split of a hub dataset (--streaming True)"})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes that tokenize (once; the result is cached)"}
    )


@dataclass
class PretrainArguments(ICAETrainingArguments):
    output_dir: str = field(default="runs/pretrain", metadata={"help": "where checkpoints and metrics go"})
    model_max_length: int = field(default=512, metadata={"help": "tokens kept per text (the seed cuts to this)"})
    lm_ratio: float = field(default=0.0, metadata={"help": "probability of an LM example (else AE)"})
    min_tokens_for_lm: int = field(default=64, metadata={"help": "shorter continuations become AE examples"})
    leave_tokens_for_lm: int = field(default=8, metadata={"help": "first continuation tokens carry no loss"})
    add_special_token_for_lm: bool = field(default=False, metadata={"help": "put [LM] before the continuation"})
    text_window: str = field(
        default="start", metadata={"help": "start: each text cut to its first model_max_length tokens (the seed); "
                                   "random: a window anywhere in the text, redrawn on every visit (ICAE v2)"}
    )
    eval_reconstruction_samples: int = field(
        default=0, metadata={"help": "at each eval, greedily reconstruct this many eval texts and log token "
                             "accuracy, exact match and BLEU-4 (0: off)"}
    )

    def example_config(self) -> ExampleConfig:
        return ExampleConfig(
            model_max_length=self.model_max_length,
            lm_ratio=self.lm_ratio,
            min_tokens_for_lm=self.min_tokens_for_lm,
            leave_tokens_for_lm=self.leave_tokens_for_lm,
            add_special_token_for_lm=self.add_special_token_for_lm,
            text_window=self.text_window,
        ).validate()


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, PretrainArguments]:
    return parse(argv, (ModelArguments, DataArguments, PretrainArguments), prog="icae pretrain")


# ----------------------------------------------------------------------------- data


def load_splits(data_args: DataArguments, verbose: bool = False, as_tables: bool = False):
    """(train, eval) texts: lists, or with `as_tables` memory-mapped `datasets.Dataset`s (what pretraining
    reads: a text is read from disk when it is tokenized, never held in a list)."""
    from icae.data.tables import load_text_table
    from icae.data.texts import BUILTIN_PYTHON_DOCS, default_eval_size, load_texts, split_train_eval, take

    load = load_text_table if as_tables else load_texts
    source = data_args.train_file or BUILTIN_PYTHON_DOCS
    texts = load(source, min_chars=data_args.min_chars)
    if data_args.eval_file:
        train, evaluation = texts, load(data_args.eval_file, min_chars=data_args.min_chars)
    else:
        size = data_args.eval_size if data_args.eval_size is not None else default_eval_size(len(texts))
        train, evaluation = split_train_eval(texts, size)
    if data_args.max_train_samples:
        train = take(train, 0, data_args.max_train_samples)
    if data_args.max_eval_samples is not None:
        evaluation = take(evaluation, 0, data_args.max_eval_samples)
    if verbose:
        how = ("--eval_file" if data_args.eval_file else
               f"the first {len(evaluation):,}" + (" (--eval_size)" if data_args.eval_size is not None else " (5%)"))
        print(f"texts: {len(train):,} train, {len(evaluation):,} eval ({how}) from {source}", flush=True)
    return train, evaluation


def load_stream_eval(data_args: DataArguments) -> tuple[list[str], int]:
    """--streaming: (eval texts, how many texts of the stream they hold back from training). The first
    --eval_size texts (default 1,000, the seed's: a stream has no length to take 5% of), or --eval_file."""
    import itertools

    from icae.data.stream import STREAM_EVAL_SIZE, kept_texts
    from icae.data.texts import BUILTIN_PYTHON_DOCS, load_texts

    source = data_args.train_file or BUILTIN_PYTHON_DOCS
    if data_args.eval_file:
        texts, held_back = load_texts(data_args.eval_file, min_chars=data_args.min_chars), 0
    else:
        held_back = data_args.eval_size if data_args.eval_size is not None else STREAM_EVAL_SIZE
        texts = list(itertools.islice(kept_texts(source, data_args.min_chars, data_args.dataset_split), held_back + 1))
        if len(texts) <= held_back:
            raise UserError(f"--eval_size {held_back} leaves no training texts in {source} ({len(texts)} texts "
                            "in all); lower --eval_size or add texts")
        texts = texts[:held_back]
    return texts[: data_args.max_eval_samples], held_back


def build_datasets(train_texts, eval_texts, tokenizer, cfg: ExampleConfig, seed: int, examples_needed: int = 0,
                   num_proc: int | None = None, main_process_first=None, verbose: bool = False):
    """(train, eval) example datasets over token ids in memory-mapped Arrow tables, each example made on
    access from (seed, index). The texts are `datasets.Dataset`s (`load_splits(as_tables=True)`) or lists.

    Tokenizing is a cached `map`: under torchrun, `main_process_first` (TrainingArguments') lets the main
    process tokenize while the others wait, then map its cache files. Under `--text_window random` a
    training text is listed as often as `examples_needed` (max_steps x batch) requires, with a fresh
    window each time.
    """
    import contextlib
    import math

    from icae.core.examples import AEDataset, ExampleDataset
    from icae.data.tokens import TokenIds, drop_untokenized, text_table, tokenize_table

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which the AE target needs; use a model whose tokenizer has one")
    eos = tokenizer.eos_token_id
    keep = cfg.model_max_length if cfg.text_window == "start" else None
    first = main_process_first or (lambda desc: contextlib.nullcontext())
    train_texts, eval_texts = text_table(train_texts), text_table(eval_texts)
    with first(desc="tokenizing"):
        train_ids = tokenize_table(train_texts, tokenizer, keep, num_proc, "tokenizing the training texts", verbose)
        eval_ids = tokenize_table(eval_texts, tokenizer, cfg.model_max_length, num_proc, "tokenizing the eval texts",
                                  verbose)
        (train_ids, train_skipped), (eval_ids, eval_skipped) = drop_untokenized(train_ids), drop_untokenized(eval_ids)
    if not len(train_ids):
        raise UserError("no training text has a single token; check the training data")
    for name, texts, skipped in (("training", train_texts, train_skipped), ("eval", eval_texts, eval_skipped)):
        if skipped:
            print(f"note: skipped {skipped} of {len(texts)} {name} texts with no tokens", file=sys.stderr)
    visits = max(1, math.ceil(examples_needed / len(train_ids))) if cfg.text_window == "random" else 1
    train = ExampleDataset(TokenIds(train_ids), cfg, eos, seed, visits)
    evaluation = AEDataset(TokenIds(eval_ids), cfg, eos)
    return train, evaluation


def build_stream(data_args: DataArguments, eval_texts: list[str], held_back: int, tokenizer, cfg: ExampleConfig,
                 args: PretrainArguments):
    """--streaming: (train, eval): a `datasets.IterableDataset` of examples, one shard per rank and dataloader
    worker (accelerate gives each rank its own), and the eval examples, made now (a few texts)."""
    from icae.core.examples import AEDataset
    from icae.data.stream import stream_examples
    from icae.data.texts import BUILTIN_PYTHON_DOCS
    from icae.data.tokens import tokenize_texts

    stop = held_back + data_args.max_train_samples if data_args.max_train_samples else None
    train = stream_examples(
        data_args.train_file or BUILTIN_PYTHON_DOCS, tokenizer, cfg, args.seed, min_chars=data_args.min_chars,
        start=held_back, stop=stop, num_shards=args.world_size * max(1, args.dataloader_num_workers),
        split=data_args.dataset_split,
    )
    # else rank 0 would read every batch and concatenate them for the others, which fails on unequal widths
    args.accelerator_config.dispatch_batches = False
    eval_ids = [ids for ids in tokenize_texts(eval_texts, tokenizer, cfg.model_max_length, cache=False) if ids]
    return train, AEDataset(eval_ids, cfg, tokenizer.eos_token_id)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    # Arguments, and every check before anything is written or loaded (the data's files are read).
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_args(argv)
    config, example_cfg = model_args.icae_config(), args.example_config()
    if data_args.streaming and args.max_steps <= 0:
        raise UserError("--streaming True needs --max_steps: a stream has no length to count epochs in")
    resume = plumbing.check_start(config, args)

    # Data: the texts now (an Arrow table, or the held-out head of a stream); examples after the checks.
    if data_args.streaming:
        eval_texts, held_back = load_stream_eval(data_args)
    else:
        with args.main_process_first(desc="reading the texts"):  # one process writes a source's table
            train_texts, eval_texts = load_splits(data_args, verbose=args.should_log, as_tables=True)
    plumbing.check_eval_data(args, len(eval_texts), "texts")
    plumbing.check_checkpoints(config, args, resume, model_args.restore_from)
    out = plumbing.prepare_output_dir(args, resume)
    from icae.core.base_model import load_tokenizer

    tokenizer = load_tokenizer(config.model_name_or_path)
    if data_args.streaming:
        train_set, eval_set = build_stream(data_args, eval_texts, held_back, tokenizer, example_cfg, args)
    else:
        examples_needed = max(args.max_steps, 0) * args.per_device_train_batch_size \
            * args.gradient_accumulation_steps * args.world_size
        train_set, eval_set = build_datasets(
            train_texts, eval_texts, tokenizer, example_cfg, args.seed, examples_needed=examples_needed,
            num_proc=data_args.preprocessing_num_workers, main_process_first=args.main_process_first,
            verbose=args.should_log,
        )

    # Model.
    model = plumbing.build_model(config, args, tokenizer, model_args.attn_implementation, model_args.restore_from)
    model.training_info = {"model_max_length": example_cfg.model_max_length, "lm_ratio": example_cfg.lm_ratio,
                           "text_window": example_cfg.text_window,
                           "train_source": data_args.train_file or "builtin:python-docs",
                           "command": plumbing.command_line("icae pretrain", argv)}

    # Run.
    count = "streamed" if data_args.streaming else f"{len(train_set):,}"
    plumbing.record_run(model, out, args, f"train examples: {count} | eval examples (AE): {len(eval_set):,} | "
                        f"resume: {resume}", {"examples": example_cfg, "data": data_args})
    from icae.training.trainer import ICAETrainer

    return plumbing.run(ICAETrainer, model, args, train_set, eval_set, resume)
