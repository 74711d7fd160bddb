"""LLMLingua (Jiang et al., EMNLP 2023; the PyPI package `llmlingua`) as a baseline to memory slots,
offline, on transformers 5, with the embedded base model as its scoring LM.

Two things stand in the way (measured with llmlingua 0.2.2):
1. `PromptCompressor.__init__` calls `tiktoken.encoding_for_model("gpt-3.5-turbo")`, which downloads an
   encoding. LLMLingua uses it only to count and split the prompt's tokens, so a counter built on the
   scoring model's own tokenizer (`TokenizerEncoding`) stands in for it while the compressor is built:
   the rates LLMLingua aims at are then in the decoder's own tokens, which is what the comparison wants.
2. Its iterative compression slices and concatenates `past_key_values` as a list of (k, v) pairs, while
   transformers 5 models take and return a `Cache`. `PairCacheModel` wraps the scoring model: a list
   of pairs in becomes a `DynamicCache`, the cache out becomes a list of pairs again.

The package is an optional extra (`pip install -e ".[baselines]"`), imported only here, when used.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from icae.errors import UserError


class TokenizerEncoding:
    """What LLMLingua asks of a tiktoken encoding (`encode`, `decode`), from a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids, *args, **kwargs) -> str:
        return self.tokenizer.decode(list(ids))


def pairs_to_cache(pairs, config=None):
    """A DynamicCache holding a list of (keys, values) pairs, one per layer (None stays None)."""
    from transformers import Cache, DynamicCache

    if pairs is None or isinstance(pairs, Cache):
        return pairs
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer, (k, v) in enumerate(pairs):
        cache.update(k, v, layer)
    return cache


def cache_to_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The list of (keys, values) pairs of a transformers Cache, one per layer."""
    if cache is None or isinstance(cache, (list, tuple)):
        return cache
    return [(layer.keys, layer.values) for layer in cache.layers]


class PairCacheModel(nn.Module):
    """The scoring model, speaking lists of (k, v) pairs as LLMLingua expects: pairs in, pairs out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, *args, past_key_values=None, **kwargs):
        out = self.model(*args, past_key_values=pairs_to_cache(past_key_values, self.config), **kwargs)
        if getattr(out, "past_key_values", None) is not None:
            out.past_key_values = cache_to_pairs(out.past_key_values)
        return out


@contextlib.contextmanager
def _tiktoken_substitute(tokenizer):
    import tiktoken

    original = tiktoken.encoding_for_model
    tiktoken.encoding_for_model = lambda *args, **kwargs: TokenizerEncoding(tokenizer)
    try:
        yield
    finally:
        tiktoken.encoding_for_model = original


def llmlingua_compressor(model_name_or_path: str = "smollm2-135m", device: str = "cpu",
                         dtype: torch.dtype = torch.float32):
    """LLMLingua's `PromptCompressor` scoring with the base model (an alias, a .gguf or a local folder;
    offline) in `dtype`, with the two substitutes above in place."""
    try:
        from llmlingua import PromptCompressor
    except ImportError:
        raise UserError('the llmlingua baseline needs the `llmlingua` package: pip install -e ".[baselines]" '
                        "(or pip install llmlingua)") from None
    from icae.core.base_model import load_tokenizer, resolve_model

    folder = resolve_model(model_name_or_path)
    tokenizer = load_tokenizer(model_name_or_path)
    with _tiktoken_substitute(tokenizer):
        compressor = PromptCompressor(model_name=folder, device_map=device, model_config={"trust_remote_code": False, "torch_dtype": dtype})
    compressor.oai_tokenizer = TokenizerEncoding(compressor.tokenizer)
    compressor.model = PairCacheModel(compressor.model).eval()
    return compressor


def llmlingua_compress(compressor, contexts: list[str], rate: float = 0.25, tries: int = 3,
                       tolerance: float = 0.03) -> list[dict]:
    """Each context compressed by LLMLingua's token-level filter, question-agnostic (as the slots are: one
    compression serves every question), to about `rate` of its tokens (counted by the scoring model's
    tokenizer). LLMLingua's rate is a target it overshoots (0.25 kept ~0.4 of a 768-token context): when
    the kept share is above `rate + tolerance`, the rate asked for is scaled down by rate / kept and the
    context compressed again, at most `tries` times in all. Per context: {"text", "tokens",
    "kept_tokens", "ratio", "rate_asked", "seconds"} of the try closest to `rate` (its CPU seconds, this thread's)."""
    count = lambda text: len(compressor.oai_tokenizer.encode(text))  # noqa: E731
    out = []
    for context in contexts:
        n, asked, best = count(context), rate, None
        for _ in range(tries):
            start = time.thread_time()
            result = compressor.compress_prompt([context], rate=asked, use_context_level_filter=False,
                                                use_sentence_level_filter=False, use_token_level_filter=True)
            text = result["compressed_prompt"]
            kept = count(text)
            found = {"text": text, "tokens": n, "kept_tokens": kept, "ratio": kept / n, "rate_asked": asked,
                     "seconds": time.thread_time() - start}
            if best is None or abs(found["ratio"] - rate) < abs(best["ratio"] - rate):
                best = found
            if found["ratio"] <= rate + tolerance:
                break
            asked = asked * rate / found["ratio"]
        out.append(best)
    return out
