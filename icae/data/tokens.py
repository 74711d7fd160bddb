"""Tokenising texts once: an Arrow table of token ids that `datasets` caches by fingerprint (`tokenize_table`,
for pretraining), or a list cached as JSON (`tokenize_texts`, for small lists)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

TOKENS_VERSION = 1  # bump when what `_tokenize_batch` writes changes


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids a tokenizer gives: its class and its serialized state (vocabulary, merges,
    normalizer, added tokens), not its path. Hashing the object itself is unstable across calls, and so are
    the truncation and padding settings a call leaves in the backend: they are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        state = sorted(tokenizer.get_vocab().items())
    key = json.dumps([type(tokenizer).__name__, len(tokenizer), state], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _tokenize_batch(texts: list[str], tokenizer, max_length: int | None) -> dict:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [x[:max_length] for x in ids] if max_length else ids
    return {"input_ids": ids, "num_tokens": [len(x) for x in ids]}


def cache_file(table, fingerprint: str) -> Path | None:
    """Where datasets keeps this `map` result: beside the table (None when it keeps none: caching disabled,
    or a table in memory)."""
    import datasets

    if not (datasets.is_caching_enabled() and table.cache_files):
        return None
    return Path(table.cache_files[0]["filename"]).parent / f"tokens-{fingerprint}.arrow"


def _is_cached(path: Path | None, num_proc: int | None) -> bool:
    if path is None:
        return False
    if num_proc is None:
        return path.is_file()
    # datasets writes one file per worker, named with this suffix, and reuses them only all together
    return all(path.with_name(f"{path.stem}_{rank:05d}_of_{num_proc:05d}.arrow").is_file() for rank in range(num_proc))


def tokens_fingerprint(table, tokenizer, max_length: int | None) -> str:
    key = ["icae-tokens", TOKENS_VERSION, table._fingerprint, tokenizer_fingerprint(tokenizer), max_length]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def tokenize_table(table, tokenizer, max_length: int | None = None, num_proc: int | None = None,
                   desc: str = "tokenizing", verbose: bool = False):
    """Columns `input_ids` (int32, no special tokens, cut to `max_length`: the seed's truncation) and
    `num_tokens` for the `text` column of a `datasets.Dataset`, cached next to the table under a fingerprint
    of (table, tokenizer state, max_length): a rerun, or another rank after the main one
    (`TrainingArguments.main_process_first`), maps that file instead of tokenizing.

    A table of `load_text_table` is read from its file in batches (`_tokenize_file`), not through its
    memory map: every page of a mapped file a process touches counts in its resident memory, so a `map`
    over the table would make a first run's peak RSS grow with the corpus. Other tables go through
    `datasets`' batched `map`. Both use `num_proc` processes.
    """
    from datasets import Features, Sequence, Value

    from icae.data.tables import texts_file

    num_proc = num_proc if num_proc and num_proc > 1 else None  # datasets starts a worker even for num_proc=1
    fingerprint = tokens_fingerprint(table, tokenizer, max_length)
    path = cache_file(table, fingerprint)
    features = Features({"input_ids": Sequence(Value("int32")), "num_tokens": Value("int32")})
    source = texts_file(table)
    if source is not None and path is None:  # caching disabled: datasets' temporary folder, removed at exit
        from datasets.fingerprint import get_temporary_cache_files_directory

        path = Path(get_temporary_cache_files_directory()) / f"tokens-{fingerprint}.arrow"
    cached = path.is_file() if source is not None else _is_cached(path, num_proc)
    if verbose:
        print(f"{desc}: {len(table):,} texts, {'from the cache' if cached else 'tokenizing'}", file=sys.stderr,
              flush=True)
    if source is not None:
        if not cached:
            _tokenize_file(*source, path, features, tokenizer, max_length, num_proc, desc)
        from datasets import Dataset
        from datasets.table import MemoryMappedTable

        return Dataset(MemoryMappedTable.from_file(str(path)), fingerprint=fingerprint)
    return table.map(
        _tokenize_batch, batched=True, batch_size=1000, input_columns="text", remove_columns=table.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, num_proc=num_proc, features=features,
        new_fingerprint=fingerprint, cache_file_name=str(path) if path else None, desc=desc,
    )


def _text_batches(file: str, rows, size: int = 1000):
    """Lists of up to `size` texts: the given rows (increasing) of an Arrow stream file, read in order with
    plain reads (memory: one record batch, whatever the file's size)."""
    import numpy as np
    import pyarrow as pa

    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise ValueError("rows must increase")
    pending: list[str] = []
    start, done = 0, 0
    with pa.OSFile(file, "rb") as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            end = start + batch.num_rows
            stop = int(np.searchsorted(rows, end))
            if stop > done:
                pending += batch.column("text").take(pa.array(rows[done:stop] - start)).to_pylist()
                done = stop
            while len(pending) >= size:
                yield pending[:size]
                pending = pending[size:]
            start = end
            if done == len(rows):
                break
    if done != len(rows):
        raise ValueError(f"{file} has {start} rows, fewer than the table asks for")
    if pending:
        yield pending


_WORKER: tuple | None = None  # (tokenizer, max_length) in a tokenizing process


def _init_worker(tokenizer, max_length):
    global _WORKER
    _WORKER = (tokenizer, max_length)


def _tokenize_in_worker(texts: list[str]) -> dict:
    tokenizer, max_length = _WORKER
    return _tokenize_batch(texts, tokenizer=tokenizer, max_length=max_length)


def _tokenize_file(file: str, rows, path: Path, features, tokenizer, max_length: int | None, num_proc: int | None,
                   desc: str) -> None:
    """Tokenize rows of a text file into an Arrow file at `path` (written beside it, then renamed: a killed
    run leaves no half file that a rerun would take). With `num_proc`, batches go to that many processes,
    a few at a time, and come back in order."""
    import collections
    import concurrent.futures

    from datasets.arrow_writer import ArrowWriter

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    bar = tqdm(total=len(rows), desc=desc, unit=" texts", disable=len(rows) <= 1000, leave=False)
    try:
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            batches = _text_batches(file, rows)
            if num_proc is None:
                for texts in batches:
                    writer.write_batch(_tokenize_batch(texts, tokenizer=tokenizer, max_length=max_length))
                    bar.update(len(texts))
            else:
                with concurrent.futures.ProcessPoolExecutor(num_proc, initializer=_init_worker,
                                                            initargs=(tokenizer, max_length)) as pool:
                    running: collections.deque = collections.deque()

                    def write_oldest():
                        out = running.popleft().result()
                        writer.write_batch(out)
                        bar.update(len(out["num_tokens"]))

                    for texts in batches:
                        running.append(pool.submit(_tokenize_in_worker, texts))
                        if len(running) >= 2 * num_proc:
                            write_oldest()
                    while running:
                        write_oldest()
            writer.finalize()
        os.replace(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)


def text_table(texts):
    """A `datasets.Dataset` with a `text` column: a table as it is, a list copied into memory (not cached)."""
    from datasets import Dataset, Features, Value

    if hasattr(texts, "map"):
        return texts
    return Dataset.from_dict({"text": list(texts)}, features=Features({"text": Value("string")}))


def drop_untokenized(table):
    """(the rows with at least one token, how many had none): a cached `filter`, run only when one has none."""
    import pyarrow.compute as pc

    empty = pc.sum(pc.equal(table.with_format("arrow")["num_tokens"], 0)).as_py() or 0
    if not empty:
        return table, 0
    return table.filter(_has_tokens, batched=True, input_columns="num_tokens", desc="skipping untokenized texts"), empty


def _has_tokens(num_tokens: list[int]) -> list[bool]:
    return [n > 0 for n in num_tokens]


class TokenIds:
    """The `input_ids` of a tokenized table as a sequence of lists, each read from the mapped file on access."""

    def __init__(self, table):
        self.table = table.select_columns(["input_ids"])

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> list[int]:
        return self.table[index]["input_ids"]


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
    """Token ids of each text without special tokens, cut to `max_length` (the seed's truncation), as lists:
    for small inputs. The whole result is held in memory and cached as one JSON file."""
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
