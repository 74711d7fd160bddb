"""Texts as Arrow tables that `datasets` memory-maps: read once per source, then shared by every run and rank.

A source (a data file, a folder, the built-in corpus) is read with the streaming readers of
`icae.data.texts` (their one-line errors, the non-UTF-8 warning) and written in batches to
`texts.arrow` in a folder keyed by the source's path, size and modification time (the built-in
corpus: by its content), beside a `meta.json` holding the row count and the warnings the read gave,
so that a cached run warns the same. `datasets.Dataset.from_file` maps the file: a process holds
the pages it reads, not the corpus, and `map`/`filter` results are cached next to it by fingerprint.

Where: `$HF_DATASETS_CACHE` when set, else `~/.cache/icae/datasets` (`$ICAE_CACHE_DIR/datasets`).
With `datasets.disable_caching()` (`--disable_datasets_cache True`) tables go to the temporary folder
`datasets` uses for uncached results, removed when the process exits, and every run reads afresh.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import warnings
from pathlib import Path

from icae.data.texts import (
    BUILTIN_PYTHON_DOCS, NotUtf8Warning, builtin_python_docs, iter_texts, no_texts_error, skipped_texts,
)

TABLE_VERSION = 2  # bump when the table layout or the readers change what they produce
BATCH_ROWS = 1000
TEXTS_FILE = "texts.arrow"


def tables_dir() -> Path:
    """Where text tables (and, beside them, datasets' cached `map` results) are kept."""
    import datasets

    if not datasets.is_caching_enabled():
        from datasets.fingerprint import get_temporary_cache_files_directory

        return Path(get_temporary_cache_files_directory())
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        return Path(env).expanduser()
    from icae.core.base_model import cache_dir

    return cache_dir() / "datasets"


def source_key(source: str) -> str:
    """What identifies a source's texts: a file's path, size and mtime; a folder's .txt files; the built-in
    corpus's content. A changed file gets a new table (the old one stays until the cache is cleared)."""
    h = hashlib.sha256(json.dumps(["icae-texts", TABLE_VERSION, source.startswith("builtin:")]).encode())
    if source == BUILTIN_PYTHON_DOCS:
        for text in builtin_python_docs():
            h.update(hashlib.sha256(text.encode()).digest())
        return h.hexdigest()[:20]
    path = Path(source).expanduser().resolve()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        h.update(json.dumps([str(file), stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:20]


def _write_arrow(path: Path, texts) -> int:
    """Texts to an Arrow stream file, BATCH_ROWS at a time: columns `text`, `chars` (its length, 0 when
    blank, for a cheap filter) and `row` (its row number in this file, which a filtered or split table keeps:
    `icae.data.tokens` reads the texts it needs from the file by it, without mapping it). Returns the number
    of rows."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.string()), ("chars", pa.int64()), ("row", pa.int64())])
    texts, rows = iter(texts), 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while batch := list(itertools.islice(texts, BATCH_ROWS)):
            chars = [0 if t.isspace() else len(t) for t in batch]
            numbers = pa.array(range(rows, rows + len(batch)), pa.int64())
            writer.write_batch(pa.record_batch([pa.array(batch, pa.string()), pa.array(chars, pa.int64()), numbers],
                                               schema))
            rows += len(batch)
    return rows


def _write_table(folder: Path, source: str) -> None:
    """texts.arrow and meta.json, written into a temporary folder that is renamed into place: a killed run
    leaves no half table that a rerun would take."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = _write_arrow(tmp / TEXTS_FILE, iter_texts(source))
        ours = [str(w.message) for w in caught if issubclass(w.category, NotUtf8Warning)]
        for w in caught:  # others pass through (ours are given on every load, from meta.json)
            if not issubclass(w.category, NotUtf8Warning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not rows:
            raise no_texts_error(source)
        (tmp / "meta.json").write_text(json.dumps({"source": source, "rows": rows, "warnings": ours}) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same table first: keep theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_text_table(source: str, min_chars: int = 0):
    """The texts of a source as a memory-mapped `datasets.Dataset` with columns `text`, `chars` and `row`,
    blank texts and texts under `min_chars` characters left out (a cached `filter`, counted in one warning).

    The first call reads the source (a bad file fails here with the same one-line error as
    `load_texts`); later calls, in this process or any other, map the cached table.
    """
    from datasets import Dataset

    iter_texts(source)  # a missing file, an unknown type or a blank file fails before any cache lookup
    folder = tables_dir() / f"texts-{source_key(source)}"
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _write_table(folder, source)
    meta = json.loads((folder / "meta.json").read_text())
    for message in meta["warnings"]:
        warnings.warn(message, NotUtf8Warning, stacklevel=2)
    table = Dataset.from_file(str(folder / TEXTS_FILE))
    kept = table.filter(_long_enough, batched=True, batch_size=10_000, input_columns="chars",
                        fn_kwargs={"min_chars": max(min_chars, 1)}, desc="skipping short texts")
    skipped_texts(source, len(table), len(kept), min_chars)
    return kept if len(kept) < len(table) else table


def _long_enough(chars: list[int], min_chars: int) -> list[bool]:
    return [n >= min_chars for n in chars]


def texts_file(table) -> tuple[str, "numpy.ndarray"] | None:
    """(the texts.arrow a table of `load_text_table` reads, the file rows it holds, increasing), or None for
    any other table (a list made into a table, another library's data set, a shuffled table). What lets a pass over a table's
    texts read the file in batches instead of through its memory map, whose pages count in the process's
    resident memory once touched (`icae.data.tokens.tokenize_table`)."""
    if "row" not in table.column_names:
        return None
    files = [f["filename"] for f in table.cache_files if Path(f["filename"]).name == TEXTS_FILE]
    if len(files) != 1 or not (Path(files[0]).parent / "meta.json").is_file():
        return None
    rows = table.with_format("arrow")["row"].to_numpy()
    if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():  # reordered (a shuffle): read through the map
        return None
    return files[0], rows
