"""The flags every training command shares (`icae pretrain`, `icae finetune`) and their parsing.

`ModelArguments` is ICAEConfig plus the seed's two switches (`--use_my_pe`, `--train_decoder`), which
map onto `--position_layout` and `--decoder_mode` and are refused when they contradict them;
`ICAETrainingArguments` is transformers' `TrainingArguments` plus ICAE's own Trainer flags. A recipe
adds its data and example flags and calls `parse_args` with its own dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from icae.core.checkpointing import check_policy
from icae.core.config import ICAEConfig
from icae.errors import UserError


@dataclass
class ModelArguments(ICAEConfig):
    use_my_pe: bool | None = field(default=None, metadata={"help": "the seed's switch: True = --position_layout epl"})
    train_decoder: bool | None = field(default=None, metadata={"help": "True = --decoder_mode shared (the seed's)"})
    restore_from: str | None = field(default=None, metadata={"help": "start from the weights of an ICAE checkpoint"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager, or flash_attention_2 (CUDA, pip install flash-attn)"}
    )

    def icae_config(self) -> ICAEConfig:
        """The ICAEConfig these flags give. A seed switch and our flag must agree: True means epl /
        shared, False means default / frozen; the other value of our flag is an error either way."""
        if self.use_my_pe is not None:
            if self.position_layout not in ("default", "epl" if self.use_my_pe else "default"):
                raise UserError(f"--use_my_pe {self.use_my_pe} contradicts --position_layout {self.position_layout}: "
                                "give only one of them")
            self.position_layout = "epl" if self.use_my_pe else "default"
        if self.train_decoder is not None:
            if self.decoder_mode not in ("frozen", "shared" if self.train_decoder else "frozen"):
                raise UserError(f"--train_decoder {self.train_decoder} contradicts --decoder_mode {self.decoder_mode}: "
                                "give only one of them")
            self.decoder_mode = "shared" if self.train_decoder else "frozen"
        names = {f.name for f in dataclasses.fields(ICAEConfig)}
        return ICAEConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}).validate()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
        check_training_values(self)
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
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cuda_available():
            self.use_cpu = True  # torchrun on CPUs: without this Trainer runs N unsynchronised copies
        if not cuda_available():
            self.dataloader_pin_memory = False
        if self.bf16 and (self.use_cpu or not cuda_available()):  # bf16 on a CPU: only where it is fast
            from icae.core.precision import check_bf16

            check_bf16("--bf16 True", "cpu")
            self.use_cpu = True  # what Trainer asks for before it autocasts on a CPU
        super().__post_init__()


# (flag, smallest value, whether the smallest is allowed): checked before anything loads. None is "not given".
_LIMITS = (("per_device_train_batch_size", 1, True), ("per_device_eval_batch_size", 1, True),
           ("gradient_accumulation_steps", 1, True), ("learning_rate", 0, True), ("memory_learning_rate", 0, True),
           ("warmup_steps", 0, True), ("warmup_ratio", 0, True), ("weight_decay", 0, True), ("max_grad_norm", 0, True),
           ("adam_epsilon", 0, False), ("adam_beta1", 0, True), ("adam_beta2", 0, True),
           ("dataloader_num_workers", 0, True), ("save_total_limit", 1, True), ("logging_steps", 0, False),
           ("save_steps", 0, False), ("eval_steps", 0, False))


def check_training_values(args) -> None:
    """The Trainer flags' values, each a finite number in its range: a batch size 0 or a NaN learning rate
    would otherwise fail (or silently train nothing) after the model has loaded. (A learning rate of 0 is
    allowed: a run that changes nothing, e.g. to check a setup.)"""
    import math

    for name, low, inclusive in _LIMITS:
        value = getattr(args, name, None)
        if value is None or isinstance(value, str):
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number (got {value})")
        if value < low or (value == low and not inclusive):
            raise UserError(f"--{name} must be {'at least' if inclusive else 'greater than'} {low} (got {value})")
    for name, top in (("adam_beta1", "1)"), ("adam_beta2", "1)"), ("warmup_ratio", "1]")):
        value = getattr(args, name, None)
        if value is not None and (value > 1 or (value == 1 and top == "1)")):
            raise UserError(f"--{name} must be in [0, {top} (got {value})")
    if args.max_steps <= 0 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise UserError(f"--num_train_epochs must be a finite number greater than 0 (got {args.num_train_epochs}), "
                        "or pass --max_steps")


def parse_args(argv: list[str], types: tuple, prog: str) -> tuple:
    """(model, data, training) arguments from the command line; an unknown flag is a UserError."""
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
    check_data_args(data_args)
    return model_args, data_args, train_args


def check_data_args(data_args) -> None:
    """The counts both recipes' data flags share must not be negative."""
    for name in ("eval_size", "max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name, None)
        if value is not None and value < 0:
            raise UserError(f"--{name} must not be negative (got {value})")


def given_flags(argv: list[str]) -> set[str]:
    """The flag names on the command line (`--lora-r 8` and `--lora_r=8` both give "lora_r")."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
