"""Tiny, randomly initialised base models and a byte-level tokenizer: fast, offline, deterministic.

Used by the tests, the benchmarks' smoke mode and anyone who wants to try the pipeline without
a real model. `save_tiny_model(dir)` writes an HF folder that `--model_name_or_path` accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2")


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


def tiny_config(arch: str = "llama", vocab_size: int = 259, hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=vocab_size - 3,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        tie_word_embeddings=False,
    )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = cls(**common)
    config._attn_implementation = "sdpa"
    return config


def tiny_base_model(arch: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs), dtype=torch.float32)
    return model.eval()


def save_tiny_model(directory: str | Path, arch: str = "llama", seed: int = 0, **kwargs) -> str:
    directory = Path(directory)
    tiny_base_model(arch, seed, **kwargs).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return str(directory)
