"""Tokenising texts once: batched, and cached on disk keyed by the texts and the tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm


def _cache_key(texts: list[str], tokenizer, max_length: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer.name_or_path, len(tokenizer), type(tokenizer).__name__, max_length]).encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8", "replace")).digest())
    return h.hexdigest()[:24]


def tokenize_texts(
    texts: list[str], tokenizer, max_length: int | None = None, cache: bool = True, batch_size: int = 256,
    desc: str = "tokenizing",
) -> list[list[int]]:
    """Token ids of each text without special tokens, cut to `max_length` (the seed's truncation)."""
    path = None
    if cache:
        from icae.core.base_model import cache_dir

        path = cache_dir() / "tokenized" / f"{_cache_key(texts, tokenizer, max_length)}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # a torn cache file: rebuild it
    out: list[list[int]] = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=len(texts) <= batch_size, leave=False):
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        out.extend(ids[:max_length] if max_length else ids for ids in batch)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{os.getpid()}.tmp")  # ranks may race: each writes its own
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    return out
