"""The run plumbing every training recipe shares: checks before anything loads, the output folder
(resume, lock, tidy), the model, and the run itself (Trainer, final save and eval, lock released).

A recipe (icae/recipes/pretrain.py, finetune.py) reads "arguments -> data -> model -> run" and calls,
in this order:
  resume = check_start(config, args)         reporting packages, output_dir, resume point, the model exists
  check_eval_data / check_checkpoints(...)   eval data present; checkpoints to load fit the planned model
  out = prepare_output_dir(args, resume)     the first side effect on disk: lock, overwrite, tidy, wandb
  model = build_model(...)                   seeded, base weights loaded, optionally restored
  record_run(model, out, args, ...)          describe the model, write run_config.json
  return run(trainer_class, model, args, train_set, eval_set, resume)
Everything a user can get wrong is refused as one UserError line before the first expensive step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch

from icae.core.config import ICAEConfig
from icae.core.precision import use_fp32_attention
from icae.errors import UserError, check_output_path
from icae.training.arguments import ICAETrainingArguments, cuda_available

REPORT_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}
_STRUCTURAL = ("fixed_mem_size", "lora_r", "decoder_mode")

# ----------------------------------------------------------------------------- checks, before anything loads


def check_start(config: ICAEConfig, args: ICAETrainingArguments) -> Path | None:
    """The first checks of every run, cheapest first: the reporting packages, the output folder (and
    the checkpoint to resume, returned), and that the base model exists (its files only)."""
    from icae.core.base_model import resolve_model

    check_reporting(args)
    resume = resolve_output_dir(args)
    resolve_model(config.model_name_or_path, convert=False)  # a missing model fails before the data loads
    if args.disable_datasets_cache:  # the seed's workaround: tables and token ids in a temporary folder, per run
        from datasets import disable_caching

        disable_caching()
    return resume


def check_reporting(args: ICAETrainingArguments) -> None:
    """A `--report_to` integration whose package is missing fails now, not after the model has loaded."""
    from importlib.util import find_spec

    for name in args.report_to or []:
        package = REPORT_PACKAGES.get(name)
        if package and find_spec(package) is None:
            raise UserError(f"--report_to {name} needs the {package} package: pip install 'icae[{name}]' "
                            "(or pass --report_to none)")


def resolve_output_dir(args: ICAETrainingArguments) -> Path | None:
    """The checkpoint to resume from, after refusing to clobber an unrelated non-empty folder.

    Only complete checkpoints count (marker present, weights file whole): a folder half-written
    when a process died is never taken as the latest.
    """
    from icae.training.faults import LOCK_NAME, check_output_dir
    from icae.training.trainer import is_complete_checkpoint, last_complete_checkpoint

    out = Path(args.output_dir)
    check_output_path(out, "--output_dir", folder=True)  # a file, a parent that is a file, not writable
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


def check_eval_data(args: ICAETrainingArguments, count: int, what: str) -> None:
    """Evaluating needs something to evaluate on (`what`: "texts", "records")."""
    if not count and args.eval_strategy != "no":
        raise UserError(f"--eval_strategy {getattr(args.eval_strategy, 'value', args.eval_strategy)} needs eval "
                        f"{what}, but there are none: pass --eval_file, raise --eval_size / --max_eval_samples, "
                        "or pass --eval_strategy no")


def check_model(config: ICAEConfig):
    """The ICAE this run would build, on the meta device: the base model's config is read (a GGUF
    file is converted once) but no weights are loaded. Unknown LoRA targets fail here."""
    import torch
    from transformers import AutoModelForCausalLM

    from icae.core.base_model import load_model_config
    from icae.core.model import ICAE

    base_config = load_model_config(config.model_name_or_path)
    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(base_config)
        except Exception as err:  # noqa: BLE001 - an unsupported architecture fails in many ways
            raise UserError(
                f"cannot build a causal LM from {config.model_name_or_path} ({type(err).__name__}: {err}); "
                "pass a causal LM (Llama, Mistral, Qwen2, ...)"
            ) from None
        return ICAE(config, base_model=base)


def check_checkpoints(config: ICAEConfig, args: ICAETrainingArguments, resume: Path | None,
                      restore_from: str | None) -> None:
    """The checkpoints this run would load (to resume, to restore from) fit the run's model, built on
    the meta device: checked before any weights load."""
    planned = check_model(config)
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
        out, source = Path(args.output_dir).resolve(), Path(restore_from).resolve()
        if args.overwrite_output_dir and resume is None and (source == out or out in source.parents):
            raise UserError(f"--overwrite_output_dir would delete --restore_from {restore_from}, which is inside "
                            f"--output_dir {args.output_dir}: choose another --output_dir")


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


# ----------------------------------------------------------------------------- the output folder


def prepare_output_dir(args: ICAETrainingArguments, resume: Path | None) -> Path:
    """The side effects on output_dir once the run is known to be able to start: locked for this run
    (until `run` ends), emptied under --overwrite_output_dir, stale checkpoints tidied on resume,
    created; wandb set up there."""
    from icae.training.faults import LOCK_NAME, hold_output_dir

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


# ----------------------------------------------------------------------------- the model and the run


def build_model(config: ICAEConfig, args: ICAETrainingArguments, tokenizer, attn_implementation: str | None = None,
                restore_from: str | None = None):
    """The run's ICAE: seeded, the base model's weights loaded, then the trainable weights of `restore_from`
    when given. The trainable weights (LoRA, memory embeddings) are fp32 master weights; --bf16 autocasts,
    and on a CPU also stores the frozen weights in bf16 once (no cast per step) and runs attention in fp32
    (icae.core.precision: faster there than torch's bf16 attention kernel)."""
    from transformers import set_seed

    from icae.core.base_model import load_base_model
    from icae.core.model import ICAE

    set_seed(args.seed)
    bf16_cpu = args.bf16 and training_device(args) == "cpu"
    base = load_base_model(config.model_name_or_path, dtype=torch.bfloat16 if bf16_cpu else torch.float32,
                           attn_implementation=attn_implementation)
    if bf16_cpu:
        use_fp32_attention(base)
    model = ICAE(config, base_model=base, tokenizer=tokenizer)
    if restore_from:
        model.load_trainable_weights(restore_from)
    return model


def training_device(args: ICAETrainingArguments) -> str:
    """'cpu' or 'cuda': where Trainer will put the model (without initialising anything)."""
    return "cpu" if args.use_cpu or not cuda_available() else "cuda"


def command_line(prog: str, argv: list[str]) -> str:
    """The command as typed, recorded in the checkpoint (icae_config.json's "training")."""
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def record_run(model, out: Path, args: ICAETrainingArguments, summary: str, run_config: dict) -> None:
    """On the saving process: print the model and `summary`, and write output_dir/run_config.json
    (the model's config, `run_config`, the seed and the trainable parameter count)."""
    from icae.training.trainer import describe_model

    if not args.should_save:
        return
    print(describe_model(model), flush=True)
    print(summary, flush=True)
    record = {"icae": model.config.to_dict(), **run_config, "seed": args.seed,
              "trainable_params": model.num_parameters()[0]}
    (out / "run_config.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def run(trainer_class, model, args: ICAETrainingArguments, train_set, eval_set, resume: Path | None) -> int:
    """Train (resuming from `resume`), save the final weights to output_dir, evaluate once more; then
    release output_dir's lock, also when training stops early (preempted, a full disk, an error)."""
    from icae.training.faults import release_output_dir
    from icae.training.trainer import MetricsFileCallback

    evaluate = eval_set is not None and len(eval_set) > 0
    trainer = None
    try:
        trainer = trainer_class(model=model, args=args, train_dataset=train_set,
                                eval_dataset=eval_set if evaluate else None, data_collator=model.collator,
                                callbacks=[MetricsFileCallback()])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(args.output_dir)
        if evaluate:
            trainer.evaluate()
        if "wandb" in (args.report_to or []):  # close the run now (an offline one is complete on disk)
            import wandb

            if wandb.run is not None:
                wandb.finish()
    except BaseException:
        if resume is None and args.should_save and (trainer is None or trainer.state.global_step == 0):
            # a failed start (a bad batch size, a bad line in a stream): what record_run wrote would make the
            # corrected rerun refuse the folder as "not empty"
            (Path(args.output_dir) / "run_config.json").unlink(missing_ok=True)
        raise
    finally:
        release_output_dir(args.output_dir)
    return 0
