"""`icae pretrain`: ICAE v2 pretraining (autoencoding + language modelling over memory slots).

Accepts the seed's command lines verbatim (`icae pretrain` in place of `pretrain.py`), ICAE v2's
flags, and every `TrainingArguments` flag. Runs on a CPU, one GPU, or many under
`accelerate launch` / `torchrun` (also as `python -m icae.pretrain`).

Read top to bottom: arguments -> data -> model -> Trainer -> final save and eval. Everything a
user can get wrong (flags, data files, the model, the checkpoint to resume) is checked before the
first expensive step (tokenizing, loading weights) and reported as one `UserError` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from icae.core.checkpointing import check_policy
from icae.core.config import ICAEConfig
from icae.errors import UserError
from icae.core.examples import ExampleConfig

# ----------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments(ICAEConfig):
    use_my_pe: bool | None = field(default=None, metadata={"help": "the seed's switch: True = --position_layout epl"})
    train_decoder: bool | None = field(default=None, metadata={"help": "True = --decoder_mode shared (the seed's)"})
    restore_from: str | None = field(default=None, metadata={"help": "start from the weights of an ICAE checkpoint"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager, or flash_attention_2 (CUDA, pip install flash-attn)"}
    )

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
class ICAETrainingArguments(TrainingArguments):
    """The Trainer flags every ICAE training command shares (`icae pretrain`, `icae finetune`)."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "start afresh even if output_dir has a run"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})
    memory_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the memory/special token embeddings (default: --learning_rate)"}
    )
    disable_datasets_cache: bool = field(default=False, metadata={"help": "the seed's workaround: no datasets cache"})
    gradient_checkpointing_policy: str | None = field(
        default=None, metadata={"help": "off | full (= --gradient_checkpointing True) | selective: keep matmul and "
                                "attention outputs, recompute only elementwise work (helps PEFT's LoRA; "
                                "--lora_impl fused alone keeps less)"}
    )
    remove_unused_columns: bool = field(default=False)
    prediction_loss_only: bool = field(default=True)

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.gradient_checkpointing_policy is not None:  # the policy decides; a contradicting switch is an error
            on = check_policy(self.gradient_checkpointing_policy) != "off"
            defaults = {f.name: f.default for f in dataclasses.fields(self)}  # None; older transformers: False
            for name in ("activation_checkpointing", "gradient_checkpointing"):
                value = getattr(self, name, None)  # older transformers have no activation_checkpointing
                if value is not None and value != defaults.get(name) and bool(value) != on:
                    raise UserError(f"--{name} {getattr(self, name)} contradicts --gradient_checkpointing_policy "
                                    f"{self.gradient_checkpointing_policy}: give only one of them")
            self.activation_checkpointing = self.gradient_checkpointing = on
        self.remove_unused_columns = False  # our collator reads the raw examples
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available():
            self.use_cpu = True  # torchrun on CPUs: without this Trainer runs N unsynchronised copies
        if not _cuda_available():
            self.dataloader_pin_memory = False
        super().__post_init__()


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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str], types: tuple = (ModelArguments, DataArguments, PretrainArguments),
               prog: str = "icae pretrain") -> tuple:
    parser = HfArgumentParser(types)
    parser.prog = prog
    try:
        model_args, data_args, train_args, rest = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True
        )
    except ValueError as err:  # TrainingArguments' own checks
        raise UserError(str(err).splitlines()[0]) from None
    if rest:
        flags = [r for r in rest if r.startswith("-")]
        raise UserError(
            (f"unknown flag {', '.join(flags)}" if flags else f"unexpected argument {' '.join(rest)}")
            + f"; see `{prog} --help` for the flags"
        )
    if getattr(model_args, "restore_from", None):  # a shipped checkpoint's name, as with --checkpoint elsewhere
        from icae.core.config import resolve_checkpoint

        model_args.restore_from = str(resolve_checkpoint(model_args.restore_from))
    return model_args, data_args, train_args


def check_data_args(data_args: DataArguments) -> None:
    for name in ("eval_size", "max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} must not be negative (got {value})")


def resolve_output_dir(args: ICAETrainingArguments) -> Path | None:
    """The checkpoint to resume from, after refusing to clobber an unrelated non-empty folder.

    Only complete checkpoints count (marker present, weights file whole): a folder half-written
    when a process died is never taken as the latest.
    """
    from icae.training.faults import LOCK_NAME, check_output_dir
    from icae.training.trainer import is_complete_checkpoint, last_complete_checkpoint

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    if args.should_save:  # a live run writing there: refuse before reading its checkpoints
        check_output_dir(out)
    if args.resume_from_checkpoint not in (None, "", "False", "false"):
        if args.resume_from_checkpoint in ("True", "true", "last"):
            last = last_complete_checkpoint(out)
            if last is None:
                raise UserError(f"--resume_from_checkpoint: no complete checkpoint in {out}")
            return last
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {path} does not exist; pass a checkpoint-N folder or 'last'")
        if not is_complete_checkpoint(path):
            last = last_complete_checkpoint(path.parent)
            raise UserError(
                f"--resume_from_checkpoint {path} is not a complete checkpoint folder (its save was cut short); "
                f"resume from {last or 'another checkpoint'} instead"
            )
        return path
    if args.overwrite_output_dir or not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return None  # (a lock left by a run killed early does not make the folder another run's)
    last = last_complete_checkpoint(out)
    if last is None:
        raise UserError(
            f"output_dir {out} is not empty and holds no complete checkpoint to resume: "
            "pass --overwrite_output_dir to start afresh there, or choose another --output_dir"
        )
    return last


REPORT_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def check_reporting(args: ICAETrainingArguments) -> None:
    """A `--report_to` integration whose package is missing fails now, not after the model has loaded."""
    from importlib.util import find_spec

    for name in args.report_to or []:
        package = REPORT_PACKAGES.get(name)
        if package and find_spec(package) is None:
            raise UserError(f"--report_to {name} needs the {package} package: pip install 'icae[{name}]' "
                            "(or pass --report_to none)")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def setup_wandb(args: ICAETrainingArguments, out: Path) -> None:
    """wandb runs under output_dir, in project `icae`, and offline when there is no API key: a
    training run never stops at a login prompt or for want of a network (`wandb sync` uploads later)."""
    if "wandb" not in (args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", "icae")
    os.environ.setdefault("WANDB_DIR", str(out))
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        if args.should_log:
            print(f"wandb: no API key (WANDB_API_KEY or `wandb login`), logging offline under "
                  f"{os.environ['WANDB_DIR']}/wandb; upload with `wandb sync`", flush=True)


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


# ----------------------------------------------------------------------------- model and checkpoint checks


def check_model(config: ICAEConfig):
    """The ICAE this run would build, on the meta device: the base model's config is read (a GGUF
    file is converted once) but no weights are loaded. Unknown LoRA targets fail here."""
    import torch

    from icae.core.base_model import load_model_config
    from icae.core.model import ICAE

    base_config = load_model_config(config.model_name_or_path)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(base_config)
        except Exception as err:  # noqa: BLE001 - an unsupported architecture fails in many ways
            raise UserError(
                f"cannot build a causal LM from {config.model_name_or_path} ({type(err).__name__}: {err}); "
                "pass a causal LM (Llama, Mistral, Qwen2, ...)"
            ) from None
        return ICAE(dataclasses.replace(config), base_model=base)


_STRUCTURAL = ("fixed_mem_size", "lora_r", "decoder_mode")


def check_checkpoint_fits(checkpoint: Path, model, flag: str, fix: str) -> None:
    """Refuse, before any weights are loaded, a checkpoint whose tensors do not fit `model` (the
    meta-device ICAE of this run): another base model, or other LoRA targets, rank, mode or m."""
    from safetensors import safe_open

    from icae.core.base_model import safetensors_problem
    from icae.core.model import WEIGHTS_NAME

    if not checkpoint.is_dir():
        raise UserError(
            f"{flag} {checkpoint} does not exist; pass the output folder of `icae pretrain` or a checkpoint"
        )
    saved, data = ICAEConfig.load(checkpoint)
    path = checkpoint / WEIGHTS_NAME
    problem = safetensors_problem(path)
    if problem:
        raise UserError(f"{flag} {checkpoint}: {path.name} is not a valid weights file: {problem}")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    own = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    config = model.config
    layers = lambda names: len({m for n in names for m in re.findall(r"\.layers\.(\d+)\.", n)})  # noqa: E731
    sizes_saved = (saved.hidden_size, saved.vocab_size)
    sizes_own = (config.hidden_size, config.vocab_size)
    if (None not in sizes_saved and sizes_saved != sizes_own) or layers(shapes) != layers(own):
        raise UserError(
            f"{flag} {checkpoint} was trained on another base model ({saved.model_name_or_path}: hidden size "
            f"{sizes_saved[0]}, vocabulary {sizes_saved[1]}, {layers(shapes)} LoRA layers) than "
            f"{config.model_name_or_path} (hidden size {sizes_own[0]}, vocabulary {sizes_own[1]}, "
            f"{layers(own)} LoRA layers): pass --model_name_or_path {saved.model_name_or_path}, {fix}"
        )
    if shapes == own:
        return
    diffs = [f"--{k} {getattr(saved, k)} (this run: {getattr(config, k)})" for k in _STRUCTURAL
             if getattr(saved, k) != getattr(config, k)]
    saved_targets = sorted((data.get("lora_config") or {}).get("target_modules") or [])
    if saved_targets and saved_targets != model.lora_target_names():
        diffs.append(f"LoRA on {','.join(saved_targets)} (this run: {','.join(model.lora_target_names())})")
    if not diffs:
        missing, extra = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
        diffs = [f"other tensors ({len(missing)} missing, {len(extra)} unexpected, "
                 f"{sum(shapes[k] != own[k] for k in set(own) & set(shapes))} of another shape)"]
    raise UserError(
        f"{flag} {checkpoint} does not fit this run: it was trained with {'; '.join(diffs)}: pass the flags it was "
        f"trained with, {fix}"
    )


def tidy_checkpoints(out: Path, resume: Path | None) -> None:
    """Before a resumed run: drop incomplete checkpoint folders (saves cut short) and, when resuming
    from an older checkpoint of this output_dir, the newer ones whose steps this run redoes. Else a
    stale folder could be taken as the latest, or `--save_total_limit` could keep it over a good one."""
    from icae.training.trainer import checkpoint_step, complete_checkpoints, incomplete_checkpoints, remove_checkpoint

    for path in incomplete_checkpoints(out):
        print(f"note: removing {path}: an incomplete checkpoint (its save was cut short)", file=sys.stderr)
        remove_checkpoint(path)
    if resume is not None and resume.resolve().parent == out.resolve() and checkpoint_step(resume) is not None:
        for path in complete_checkpoints(out):
            if checkpoint_step(path) > checkpoint_step(resume):
                print(f"note: removing {path}: newer than {resume.name}, which this run resumes from and "
                      "whose later steps it redoes", file=sys.stderr)
                remove_checkpoint(path)


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
    # 1. Checks, cheapest first, all before anything is written or loaded: flags, output_dir,
    #    data files, then the model (its config only) and the checkpoints it would load.
    argv_used = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_args(argv_used)
    config = model_args.icae_config()
    example_cfg = args.example_config()
    check_data_args(data_args)
    if data_args.streaming and args.max_steps <= 0:
        raise UserError("--streaming True needs --max_steps: a stream has no length to count epochs in")
    check_reporting(args)
    resume = resolve_output_dir(args)

    from icae.core.base_model import resolve_model

    resolve_model(config.model_name_or_path, convert=False)  # a missing model fails before the data loads
    if args.disable_datasets_cache:  # the seed's workaround: tables and token ids in a temporary folder, per run
        from datasets import disable_caching

        disable_caching()
    if data_args.streaming:
        eval_texts, held_back = load_stream_eval(data_args)
    else:
        with args.main_process_first(desc="reading the texts"):  # one process writes a source's table
            train_texts, eval_texts = load_splits(data_args, verbose=args.should_log, as_tables=True)
    if not eval_texts and args.eval_strategy != "no":
        raise UserError(f"--eval_strategy {getattr(args.eval_strategy, 'value', args.eval_strategy)} needs eval "
                        "texts, but there are none: pass --eval_file, raise --eval_size / --max_eval_samples, "
                        "or pass --eval_strategy no")
    check_checkpoints(check_model(config), args, resume, model_args.restore_from)

    from transformers import set_seed

    from icae.core.base_model import load_base_model, load_tokenizer
    from icae.core.model import ICAE
    from icae.training.trainer import ICAETrainer, MetricsFileCallback, describe_model

    # 2. Side effects on output_dir, now that the run is known to be able to start.
    out = prepare_output_dir(args, resume)

    # 3. The expensive part.
    tokenizer = load_tokenizer(config.model_name_or_path)
    examples_needed = max(args.max_steps, 0) * args.per_device_train_batch_size * args.gradient_accumulation_steps \
        * args.world_size
    if data_args.streaming:
        train_set, eval_set = build_stream(data_args, eval_texts, held_back, tokenizer, example_cfg, args)
    else:
        train_set, eval_set = build_datasets(
            train_texts, eval_texts, tokenizer, example_cfg, args.seed, examples_needed=examples_needed,
            num_proc=data_args.preprocessing_num_workers, main_process_first=args.main_process_first,
            verbose=args.should_log,
        )

    set_seed(args.seed)
    # fp32 master weights; --bf16 autocasts
    base = load_base_model(config.model_name_or_path, attn_implementation=model_args.attn_implementation)
    model = ICAE(config, base_model=base, tokenizer=tokenizer)
    if model_args.restore_from:
        model.load_trainable_weights(model_args.restore_from)
    model.training_info = {"model_max_length": example_cfg.model_max_length, "lm_ratio": example_cfg.lm_ratio,
                           "text_window": example_cfg.text_window, "train_source": data_args.train_file or "builtin:python-docs",
                           "command": "icae pretrain " + " ".join(shlex.quote(a) for a in argv_used)}
    if args.should_save:
        print(describe_model(model), flush=True)
        count = "streamed" if data_args.streaming else f"{len(train_set):,}"
        print(f"train examples: {count} | eval examples (AE): {len(eval_set):,} | resume: {resume}")
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
    train_and_save(trainer, args, resume, evaluate=bool(eval_set))
    return 0


def check_checkpoints(planned, args: ICAETrainingArguments, resume: Path | None, restore_from: str | None) -> None:
    """The checkpoints this run would load (to resume, to restore from) fit `planned`, the run's
    meta-device ICAE: checked before any weights load."""
    if resume is not None:
        explicit = args.resume_from_checkpoint not in (None, "", "False", "false")
        check_checkpoint_fits(
            resume, planned,
            "--resume_from_checkpoint" if explicit else "the last checkpoint in output_dir,",
            "or pass another --resume_from_checkpoint" if explicit
            else "or pass --overwrite_output_dir (or another --output_dir) to start afresh",
        )
    if restore_from:
        check_checkpoint_fits(Path(restore_from), planned, "--restore_from",
                              "or restore from a checkpoint that fits this run")


def prepare_output_dir(args: ICAETrainingArguments, resume: Path | None) -> Path:
    """The side effects on output_dir once the run is known to be able to start: locked for this run
    (until train_and_save ends), emptied under --overwrite_output_dir, stale checkpoints tidied on resume,
    created; wandb set up there."""
    from icae.training.faults import LOCK_NAME, hold_output_dir

    if args.disable_datasets_cache:
        from datasets import disable_caching

        disable_caching()
    out = Path(args.output_dir)
    if args.should_save:
        hold_output_dir(out)
    if args.overwrite_output_dir and out.is_dir() and resume is None and args.should_save:
        for child in out.iterdir():  # start afresh: old metrics and checkpoints would mix with the new run
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    if resume is not None and args.should_save:
        tidy_checkpoints(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    setup_wandb(args, out)
    return out


def train_and_save(trainer, args: ICAETrainingArguments, resume: Path | None, evaluate: bool) -> None:
    """Train (resuming from `resume`), save the final weights to output_dir, evaluate once more; then
    release output_dir's lock, also when training stops early (preempted, a full disk, an error)."""
    from icae.training.faults import release_output_dir

    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(args.output_dir)
        if evaluate:
            trainer.evaluate()
        if "wandb" in (args.report_to or []):  # close the run now (an offline one is complete on disk)
            import wandb

            if wandb.run is not None:
                wandb.finish()
    finally:
        release_output_dir(args.output_dir)

