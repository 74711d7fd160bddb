"""Training utilities: a Trainer that saves only what ICAE trains, and safe checkpoint handling.

A checkpoint folder counts only once its `COMPLETE` marker exists and its weights file is whole:
the marker is written last (and removed first when a folder is rewritten or deleted), so a process
killed mid-save never leaves a folder that resume would take as the latest. Rotation
(`--save_total_limit`) runs only after the new checkpoint is complete and counts complete ones only.

A NaN or infinite loss, gradient or weight stops training with `TrainingDiverged` before anything
non-finite is applied or saved, so the last checkpoint on disk stays good.

While `train()` runs, SIGTERM, SIGUSR1 and a first Ctrl-C stop training after the current step with a
complete checkpoint and raise `Preempted` (icae/training/faults.py). A save that finds the disk full
removes its half-written folder and raises `DiskFull` naming the last complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from icae.core.base_model import safetensors_problem
from icae.errors import DiskFull, Preempted, UserError
from icae.core.model import ICAE, WEIGHTS_NAME
from icae.training.faults import StopOnSignal, disk_full_reason

COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def is_complete_checkpoint(path: str | Path) -> bool:
    """The marker is there and the weights file is whole (a torn write is caught by its header)."""
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() and safetensors_problem(path / WEIGHTS_NAME) is None


def _numbered_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders with their marker and whole weights, oldest first."""
    return [p for _, p in _numbered_checkpoints(output_dir) if is_complete_checkpoint(p)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders that are not complete (a save that was interrupted), oldest first."""
    return [p for _, p in _numbered_checkpoints(output_dir) if not is_complete_checkpoint(p)]


def checkpoint_step(path: str | Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def remove_checkpoint(path: str | Path) -> None:
    """Unmark first, then delete: a deletion cut short leaves an incomplete folder, never a 'complete' one."""
    path = Path(path)
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class ICAETrainer(Trainer):
    """`Trainer` for an `ICAE` module: trainable weights only in checkpoints, a NaN guard, token counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        policy = getattr(self.args, "gradient_checkpointing_policy", None)
        if policy:  # what activation_checkpointing_enable does when train() calls it (every recipe)
            self.model.checkpoint_policy = policy
        self.text_tokens = 0  # text tokens compressed so far, on this process
        self._tokens_at_log = (0, time.perf_counter())
        self.add_callback(_FiniteGradientGuard(self))
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)

    def train(self, *args, **kwargs):
        try:
            with self.stop_on_signal.installed():
                output = super().train(*args, **kwargs)
        except BaseException:
            self._close_progress_bar()
            raise
        step = self.stop_on_signal.stopped_at
        if step is not None:
            self._close_progress_bar()
            folder = Path(self.args.output_dir) / f"checkpoint-{step}"
            raise Preempted(f"{self.stop_on_signal.signal_name} after step {step} of {self.state.max_steps}: saved "
                            f"{folder}; run the same command again to resume from it")
        return output

    def _close_progress_bar(self) -> None:
        """End the progress bar, so that what is printed next starts a line."""
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
                callback.training_bar = None

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the memory embeddings in a group of their own when
        `--memory_learning_rate` is set (the schedule scales it like every other group)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "memory_learning_rate", None)
        if fresh and lr is not None:
            memory = list(self.accelerator.unwrap_model(self.model).memory_embeddings.parameters())
            ids = {id(p) for p in memory}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": memory, "lr": lr, "weight_decay": 0.0})
        return optimizer

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The loss loop, plus greedy reconstruction of the first `--eval_reconstruction_samples`
        eval texts (token accuracy, exact match, BLEU-4): the loss alone cannot tell a decoder that
        reads the slots from one that guesses likely text."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        n = getattr(self.args, "eval_reconstruction_samples", 0) or 0
        dataset = self.eval_dataset if not isinstance(self.eval_dataset, dict) else None
        if n > 0 and dataset is not None and self.is_world_process_zero():
            from icae.core.inference import reconstruction_scores

            model = self.accelerator.unwrap_model(self.model)
            texts = [list(dataset[i]["input_ids"]) for i in range(min(n, len(dataset)))]
            scores = reconstruction_scores(model, texts, batch_size=self.args.per_device_eval_batch_size)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        last = last_complete_checkpoint(self.args.output_dir)
        return TrainingDiverged(
            f"{what} at step {step}; stopped before saving or applying it. "
            f"The last good checkpoint is {last or 'none (no checkpoint was saved yet)'}: lower "
            "--learning_rate or --max_grad_norm, or check the data, then rerun to resume from it"
        )

    def _check_finite_weights(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
            raise self.diverged("the trained weights are NaN or infinite", self.state.global_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if model.training:
            if not torch.isfinite(loss.detach()):
                raise self.diverged(f"the training loss is {loss.item()}", self.state.global_step + 1)
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
        self._check_finite_weights()
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir or self.args.output_dir)
        torch.save(self.args, os.path.join(output_dir or self.args.output_dir, "training_args.bin"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # a checkpoint: _save_checkpoint reports a full disk
            return super().save_model(output_dir, _internal_call)
        folder = Path(output_dir or self.args.output_dir)
        try:
            super().save_model(output_dir, _internal_call)
        except UserError:
            raise
        except Exception as err:
            reason = disk_full_reason(err, folder)
            if reason is None:
                raise
            raise self._disk_full(f"the final weights to {folder}", reason) from err

    def _save_checkpoint(self, model, trial) -> None:
        self._check_finite_weights()  # on every rank, before anything is written
        run_dir = Path(self._get_output_dir(trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # rewriting a folder: incomplete until done
        # Rotate only once the new checkpoint is complete (transformers rotates before our marker
        # exists, so a kill in between could leave no complete checkpoint), and count complete ones only.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written before the marker
            if self.args.should_save:
                (folder / COMPLETE_MARKER).write_text(f"step {self.state.global_step}\n")
        except UserError:  # non-finite weights: nothing was written
            raise
        except Exception as err:
            reason = disk_full_reason(err, folder)  # before the removal frees the space
            if reason is None:
                raise
            if self.args.should_save:
                remove_checkpoint(folder)
            raise self._disk_full(f"{folder.name} to {run_dir}", reason) from err
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            self._rotate_complete_checkpoints(run_dir)

    def _disk_full(self, what: str, reason: str) -> DiskFull:
        last = last_complete_checkpoint(self.args.output_dir)
        then = (f"rerun to resume from {last.name}" if last else
                "rerun with --overwrite_output_dir (no complete checkpoint was saved yet)")
        return DiskFull(f"the disk is full while saving {what} ({reason}): free space and {then}")

    def _rotate_complete_checkpoints(self, run_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        found = complete_checkpoints(run_dir)
        protected = {found[-1].resolve()} if found else set()  # the newest, to resume from
        if self.state.best_model_checkpoint:
            protected.add(Path(self.state.best_model_checkpoint).resolve())
        remaining = len(found)
        for path in found:
            if remaining <= max(limit, len(protected)):
                break
            if path.resolve() not in protected:
                remove_checkpoint(path)
                remaining -= 1

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.accelerator.unwrap_model(self.model)
        model.load_trainable_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            self.accelerator.unwrap_model(self.model).load_trainable_weights(best)


class _FiniteGradientGuard(TrainerCallback):
    """Stop before the optimizer applies a NaN or infinite gradient (which would poison the weights).

    Skipped under fp16 loss scaling, where an infinite gradient only makes the scaler skip the step.
    """

    def __init__(self, trainer: ICAETrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if args.fp16 or getattr(trainer.accelerator, "scaler", None) is not None:
            return
        grads = [p.grad.detach() for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
            raise trainer.diverged("the gradients are NaN or infinite", state.global_step + 1)


class MetricsFileCallback(TrainerCallback):
    """Append every log (train and eval) to `output_dir/metrics.jsonl`, whatever `--report_to` says."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                  "cpu_seconds": round(time.process_time(), 2), **logs}
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
