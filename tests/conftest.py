"""Shared fixtures: a private model cache and a tiny model, so no test touches ~/.cache or the network."""

import os

import pytest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, bos, eos, as in SmolLM2


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: converts the real embedded model (about a minute, once per session)")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One cache per session: the real model is converted at most once, and never into ~/.cache; text
    tables and token ids (datasets' cache) go to a session folder too, and nothing asks the hub."""
    private = {
        "ICAE_CACHE_DIR": str(tmp_path_factory.mktemp("icae-cache")),
        "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf-datasets")),
        "HF_DATASETS_OFFLINE": "1",
    }
    old = {name: os.environ.get(name) for name in private}
    os.environ.update(private)
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with a byte-level tokenizer (no pad token), saved as a plain HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()  # GPT-2 style byte-level BPE: one token per byte, no merges
    vocab = SPECIAL_TOKENS + [table[b] for b in range(256)]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=vocab[0], bos_token=vocab[1], eos_token=vocab[2]
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, unk_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
