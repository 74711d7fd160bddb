"""Training utilities: a Trainer that saves only what ICAE trains, and safe checkpoint handling.

A checkpoint folder counts only once its `COMPLETE` marker exists: the marker is written last,
so a process killed mid-save never leaves a folder that resume would take as the latest.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from icae.errors import UserError
from icae.model import ICAE, WEIGHTS_NAME

COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders with their marker, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file() and (path / WEIGHTS_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class ICAETrainer(Trainer):
    """`Trainer` for an `ICAE` module: trainable weights only in checkpoints, a NaN guard, token counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_tokens = 0  # text tokens compressed so far, on this process
        self._tokens_at_log = (0, time.perf_counter())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if model.training:
            if not torch.isfinite(loss.detach()):
                last = last_complete_checkpoint(self.args.output_dir)
                raise TrainingDiverged(
                    f"the training loss is {loss.item()} at step {self.state.global_step + 1}; stopped. "
                    f"The last good checkpoint is {last or 'none (no checkpoint was saved yet)'}: lower "
                    "--learning_rate or --max_grad_norm, or check the data, then rerun to resume from it"
                )
            m = self.accelerator.unwrap_model(model).config.fixed_mem_size
            self.text_tokens += int(inputs["encoder_attention_mask"].sum()) - int(inputs["num_segments"].sum()) * m
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add throughput since the previous one
            tokens, then = self._tokens_at_log
            now = time.perf_counter()
            logs["text_tokens"] = self.text_tokens * self.args.world_size
            logs["text_tokens_per_second"] = round((self.text_tokens - tokens) * self.args.world_size / (now - then), 2)
            self._tokens_at_log = (self.text_tokens, now)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir or self.args.output_dir)
        torch.save(self.args, os.path.join(output_dir or self.args.output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            (folder / COMPLETE_MARKER).write_text(f"step {self.state.global_step}\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.accelerator.unwrap_model(self.model)
        model.load_trainable_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            self.accelerator.unwrap_model(self.model).load_trainable_weights(best)


class MetricsFileCallback(TrainerCallback):
    """Append every log (train and eval) to `output_dir/metrics.jsonl`, whatever `--report_to` says."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(Path(args.output_dir) / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def describe_model(model: ICAE) -> str:
    """What the seed printed to be sure the LoRA targets took: the LoRA config and parameter counts."""
    trainable, total = model.num_parameters()
    lora = model.lora_config
    targets = model.lora_target_names()
    return (
        f"LoRA: r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} target_modules={targets}\n"
        f"ICAE: layout={model.config.position_layout} decoder={model.config.decoder_mode} "
        f"m={model.config.fixed_mem_size} r={model.config.mean_compression_rate}\n"
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
