"""Configuration of an ICAE model: a dataclass whose field names are the seed's / ICAE v2's flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from icae.errors import UserError
from icae.core.positions import LAYOUTS

DECODER_MODES = ("frozen", "shared", "separate")
LORA_IMPLS = ("peft", "fused")
CONFIG_NAME = "icae_config.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # checkpoints that ship inside the package


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints inside the package (e.g. smollm2-135m-icae)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint folder, or the name of a shipped checkpoint (a local checkpoint folder of that name wins;
    a folder without icae_config.json, e.g. one a command made for its results, does not)."""
    path = Path(name_or_path)
    if (path / CONFIG_NAME).is_file() or str(name_or_path) not in shipped_checkpoints():
        return path
    return SHIPPED_DIR / str(name_or_path)


def results_path(checkpoint: str | Path, name: str) -> Path:
    """Where a command writes `name` (e.g. eval_results.json) about a checkpoint by default: in its folder, or
    for a shipped checkpoint named without a path, a file NAME-<name> here (never a folder of the checkpoint's
    name, which would stand in for it)."""
    folder = resolve_checkpoint(checkpoint)
    if folder.resolve().parent == SHIPPED_DIR.resolve():
        return Path(f"{folder.name}-{name}")
    return folder / name


@dataclass
class ICAEConfig:
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "base LM: alias smollm2-135m (embedded), a local HF folder, a .gguf file or a hub id"},
    )
    fixed_mem_size: int = field(default=128, metadata={"help": "memory tokens per segment (m)"})
    mean_compression_rate: int = field(default=4, metadata={"help": "text tokens per memory token (r)"})
    position_layout: str = field(default="default", metadata={"help": "memory position ids: " + "|".join(LAYOUTS)})
    decoder_mode: str = field(
        default="frozen",
        metadata={"help": "frozen: base LM without LoRA; shared: the LoRA-adapted encoder; separate: its own LoRA"},
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="", metadata={"help": "'' = PEFT's default (q_proj,v_proj for Llama), 'all-linear', or a comma list"}
    )
    lora_impl: str = field(
        default="peft",
        metadata={"help": "peft: PEFT's LoRA layers; fused: the same LoRA keeping each input once and dropout masks "
                  "as bits (less activation memory, same distribution; icae.core.lora)"},
    )
    # Filled in from the base model when a model is built; checked when a checkpoint is loaded.
    hidden_size: int | None = None
    vocab_size: int | None = None

    def validate(self) -> "ICAEConfig":
        if self.position_layout not in LAYOUTS:
            raise UserError(
                f"unknown --position_layout {self.position_layout!r}: choose one of {', '.join(LAYOUTS)}"
            )
        if self.decoder_mode not in DECODER_MODES:
            raise UserError(f"unknown --decoder_mode {self.decoder_mode!r}: choose one of {', '.join(DECODER_MODES)}")
        if self.lora_impl not in LORA_IMPLS:
            raise UserError(f"unknown --lora_impl {self.lora_impl!r}: choose one of {', '.join(LORA_IMPLS)}")
        if self.fixed_mem_size < 1:
            raise UserError(f"--fixed_mem_size must be at least 1 (got {self.fixed_mem_size})")
        if self.mean_compression_rate < 1:
            raise UserError(f"--mean_compression_rate must be at least 1 (got {self.mean_compression_rate})")
        if self.lora_r < 1:
            raise UserError(f"--lora_r must be at least 1 (got {self.lora_r})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:  # what transformers' reporting callbacks call on `model.config`
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "ICAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, directory: str | Path, **extra) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> tuple["ICAEConfig", dict]:
        """The config and the whole JSON (which also records LoRA config and special tokens)."""
        directory = resolve_checkpoint(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise UserError(
                f"{directory} is not an ICAE checkpoint: {CONFIG_NAME} is missing; pass the output folder of "
                "`icae pretrain`, one of its checkpoint-N folders, or a shipped checkpoint ("
                + (", ".join(shipped_checkpoints()) or "none installed") + ")"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is corrupt ({err}); use another checkpoint") from None
        return cls.from_dict(data), data
