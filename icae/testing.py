"""Tiny, randomly initialised base models and a byte-level tokenizer: fast, offline, deterministic;
and two memory meters (saved_tensor_bytes, LiveBytes).

Used by the tests, the benchmarks' smoke mode and anyone who wants to try the pipeline without
a real model. `save_tiny_model(dir)` writes an HF folder that `--model_name_or_path` accepts.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ARCHS = ("llama", "mistral", "qwen2")
# The base-model families icae is tested on (tests/test_families.py), by HF model_type.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "stablelm",
            "gpt_neox", "gpt2")
# Per family, what differs from a llama-like config: head sizes the defaults make huge, and the features
# icae must reproduce set to values that change the numbers (Granite's multipliers as in granite-3, a
# logit soft-cap small enough to matter for tiny random logits).
_FAMILY_KWARGS = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 1.0},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 1.0},
    "granite": {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0156},
    "gpt2": {"n_positions": 4096},
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <bos>, <eos>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<bos>", "<eos>", "<pad>"):
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer (49,152 tokens), read from its GGUF file without converting the model."""
    from transformers import AutoTokenizer

    from icae.core.base_model import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(arch: str = "llama", vocab_size: int = 259, hidden_size: int = 64, layers: int = 2,
                special_ids: tuple[int, int, int] | None = None):
    """A small config of any family in FAMILIES; `special_ids` = (bos, eos, pad), else the last three ids."""
    from transformers import AutoConfig

    bos, eos, pad = special_ids or (vocab_size - 3, vocab_size - 2, vocab_size - 1)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if arch not in FAMILIES:
        raise ValueError(f"unknown family {arch!r}; one of {', '.join(FAMILIES)}")
    extra = dict(_FAMILY_KWARGS.get(arch, {}))
    if arch == "gpt2":
        extra.update(n_embd=hidden_size, n_layer=layers, n_head=4, n_inner=hidden_size * 2)
    config = AutoConfig.for_model(arch, **{**common, **extra})
    # sdpa where the family supports it (Gemma 2's soft-capped attention needs eager)
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    return config


def tiny_base_model(arch: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs), dtype=torch.float32)
    return model.eval()


def save_tiny_model(directory: str | Path, arch: str = "llama", seed: int = 0, tokenizer=None, **kwargs) -> str:
    """A tiny model saved as a HF folder with `tokenizer` (the byte tokenizer by default)."""
    directory = Path(directory)
    tiny_base_model(arch, seed, **kwargs).save_pretrained(directory)
    (tokenizer or byte_tokenizer()).save_pretrained(directory)
    return str(directory)


class saved_tensor_bytes:
    """Bytes autograd saves for backward under this context (each storage once, parameters excluded).

    `by` (optional) names what saved a tensor, `by(tensor) -> str`; `.groups` sums the bytes per name.
    Tensors saved inside a checkpointed region are not seen (checkpointing replaces them); see LiveBytes.
    """

    def __init__(self, exclude=(), by=None):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.by, self.total, self.groups, self._seen = by, 0, {}, set()

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self._seen and storage.nbytes():
            self._seen.add(key)
            name = self.by(t) if self.by else "saved"
            self.groups[name] = self.groups.get(name, 0) + storage.nbytes()
            self.total += storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are still alive (`live`), and their peak.

    Every op's outputs are seen (also a selective checkpoint's cached ones), each storage counted once
    until it is freed: what a caching allocator would report as allocated, without its rounding.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                # a view or an in-place result shares an input's storage: not new memory (e.g. a weight's .t())
                if key not in self._seen and key not in inputs and nbytes:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out
