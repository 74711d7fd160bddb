"""Reading texts from data files: .json (a list, parsed item by item, never whole), .jsonl, .parquet,
.txt or a folder of .txt files, or the built-in corpus (icae.data.corpus); and the train/eval split.

Bytes that are not UTF-8 are replaced (U+FFFD) with one warning naming the file and the count; a bad
item fails with its position, as one UserError line.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from icae.data.corpus import BUILTIN_PYTHON_DOCS, builtin_python_docs
from icae.errors import UserError

FORMATS = ".json, .jsonl, .parquet or .txt file, a folder of .txt files, or " + BUILTIN_PYTHON_DOCS


class NotUtf8Warning(UserWarning):
    """Bytes of a data file that are not UTF-8 were replaced with U+FFFD (the message names the file and count)."""


def _warn_not_utf8(path: Path, bad: int) -> None:
    warnings.warn(f"{path}: {bad} bytes are not valid UTF-8; replaced them with U+FFFD", NotUtf8Warning, stacklevel=3)


def _decode(data: bytes, path: Path) -> str:
    """UTF-8, with bad bytes replaced by U+FFFD and a warning: one stray byte should not stop a run."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
    # Valid parts re-encode to their own bytes; original U+FFFD (EF BF BD) always decodes as itself.
    replaced = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
    _warn_not_utf8(path, len(data) - (len(text.encode("utf-8")) - 3 * replaced))
    return text


def _open(path: Path):
    """The file, opened for reading bytes; one in UTF-16 or UTF-32 (a byte-order mark, or NUL bytes between
    ASCII characters) is refused: read as UTF-8 it would only fail later as "invalid JSON at line 1"."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    head = f.read(4)
    f.seek(0)
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or (
            len(head) == 4 and head.count(0) == 2 and (head[1] == head[3] == 0 or head[0] == head[2] == 0)):
        f.close()
        raise UserError(f"{path} is UTF-16 (or UTF-32) encoded; re-encode it as UTF-8, e.g. "
                        f"iconv -f UTF-16 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}")
    return f


def _check_not_blank(path: Path) -> None:
    """Refuse a file with nothing but whitespace, reading only up to its first other byte."""
    with _open(path) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise UserError(f"{path} is empty; pass a file that holds texts")


def read_text_file(path: Path) -> str:
    """A whole text file, decoded as `_decode` does; a blank file is an error."""
    with _open(path) as f:
        data = f.read()
    if not data.strip():
        raise UserError(f"{path} is empty; pass a file that holds texts")
    return _decode(data, path)


_CHUNK = 1 << 20


def _text_chunks(path: Path) -> Iterator[str]:
    """A file's text in pieces of about 1 MiB, decoded as `_decode` does, with one warning at the end (the
    same count: summed over the pieces, as a sequence cut between two reads is decoded with the second)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    size = decoded = genuine = fffd = 0
    tail = b""  # the last 2 bytes, so a genuine U+FFFD split across two reads is counted once
    with _open(path) as f:
        while True:
            data = f.read(_CHUNK)
            text = decoder.decode(data, final=not data)
            size += len(data)
            genuine += (tail + data).count(b"\xef\xbf\xbd")
            tail = (tail + data)[-2:]
            if "\ufffd" in text:
                fffd += text.count("\ufffd")
            decoded += len(text.encode("utf-8"))
            if text:
                yield text
            if not data:
                break
    bad = size - (decoded - 3 * (fffd - genuine))
    if bad:
        _warn_not_utf8(path, bad)


def _item_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise UserError(f'{where} is {describe_json(item)}; make it a string or an object with a "text" string')


def describe_json(value) -> str:
    """A JSON value as an error message names it ("an object with keys [...]", "a JSON int", "null")."""
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:5]}"
    return f"a JSON {type(value).__name__}" if value is not None else "null"


_SPACE = re.compile(r"[ \t\n\r]*")


def _iter_json(path: Path) -> Iterator[str]:
    """The items of a JSON list, parsed one at a time from 1 MiB reads: a multi-GB file (the seed's
    `train_data.json`) is never held whole. Errors name the line, as `json.loads` would."""
    chunks = _text_chunks(path)
    decoder = json.JSONDecoder()
    buf, pos, lines_before = "", 0, 0

    def more() -> bool:
        nonlocal buf, pos, lines_before
        chunk = next(chunks, None)
        if chunk is None:
            return False
        lines_before += buf.count("\n", 0, pos)
        buf, pos = buf[pos:] + chunk, 0
        return True

    def skip_space() -> None:
        nonlocal pos
        while True:
            pos = _SPACE.match(buf, pos).end()
            if pos < len(buf) or not more():
                return

    def fail(msg: str, at: int):
        line = lines_before + buf.count("\n", 0, at) + 1
        raise UserError(f"{path}: invalid JSON at line {line}: {msg}; fix the file")

    skip_space()
    if pos == len(buf):
        raise UserError(f"{path} is empty; pass a file that holds texts")
    if buf[pos] != "[":
        yield from _load_json_whole(path)  # not a list: only its error message is left to find
        return
    pos += 1
    skip_space()
    if buf[pos : pos + 1] == "]":
        pos += 1
    else:
        index = 0
        while True:
            while True:
                try:
                    item, pos = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    # An item cut by the end of this read fails at (or, inside a string, from) the end: read on.
                    cut = err.msg.startswith("Unterminated string") or err.pos >= len(buf) - 8
                    if not (cut and more()):
                        fail(err.msg, err.pos)
            yield _item_text(item, f"{path}: item {index}")
            index += 1
            skip_space()
            if buf[pos : pos + 1] == "]":
                pos += 1
                break
            if buf[pos : pos + 1] != ",":
                fail("Expecting ',' delimiter", pos)
            pos += 1
            skip_space()
    skip_space()
    if pos < len(buf):
        fail("Extra data", pos)


def _load_json_whole(path: Path) -> list[str]:
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}; fix the file") from None
    if not isinstance(data, list):
        raise UserError(
            f'{path}: expected a JSON list of strings or of objects with "text", got {describe_json(data)}; fix the file'
        )
    return [_item_text(item, f"{path}: item {i}") for i, item in enumerate(data)]


def iter_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON-lines file, read in chunks; a bad line fails
    with its number. Lines end at "\n" only: U+2028 and the like are legal inside a JSON string."""
    rest, lineno = "", 0
    for chunk in itertools.chain(_text_chunks(path), ["\n"]):
        *lines, rest = (rest + chunk).split("\n")
        for line in lines:
            lineno += 1
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({err.msg}); fix or remove it") from None


def _iter_jsonl(path: Path) -> Iterator[str]:
    for lineno, item in iter_json_lines(path):
        if not (isinstance(item, dict) and isinstance(item.get("text"), str)):
            raise UserError(f'{path}: line {lineno} must be an object with a "text" string, not {describe_json(item)}')
        yield item["text"]


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: cannot read it as Parquet ({err}); check the file") from None
    if "text" not in file.schema_arrow.names:
        raise UserError(f'{path}: no "text" column (it has {file.schema_arrow.names}); name the text column "text"')
    row = 0
    for batch in file.iter_batches(batch_size=1024, columns=["text"]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                value = _decode(value, path)
            if not isinstance(value, str):
                raise UserError(f'{path}: row {row} of column "text" is {describe_json(value)}; make every row a string')
            row += 1
            yield value


def _iter_files(files: list[Path]) -> Iterator[str]:
    for file in files:
        yield read_text_file(file)


_READERS = {".json": _iter_json, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet, ".txt": lambda p: iter([read_text_file(p)])}


def iter_texts(source: str) -> Iterator[str]:
    """The texts of `builtin:python-docs` or of a local .json/.jsonl/.parquet/.txt file or .txt folder, one
    at a time (a file is read in pieces, never whole). What can be checked without reading the texts (the
    source exists, its type is known, it is not blank) fails here; a bad item fails when it is reached."""
    if source.startswith("builtin:"):
        if source != BUILTIN_PYTHON_DOCS:
            raise UserError(f"unknown built-in corpus {source!r}; the only one is {BUILTIN_PYTHON_DOCS}")
        return iter(builtin_python_docs())
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist; pass a {FORMATS}")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"{path} is a folder with no .txt files; add .txt files (one text each) or pass a file")
        return _iter_files(files)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use a {FORMATS}")
    if path.suffix.lower() != ".parquet":
        _check_not_blank(path)
    return reader(path)


def is_kept(text: str, min_chars: int) -> bool:
    """Texts that are blank or shorter than `min_chars` are skipped."""
    return len(text) >= min_chars and not (text == "" or text.isspace())


def no_texts_error(source: str) -> UserError:
    return UserError(f"{source} holds no texts; add at least one")


def skipped_texts(source: str, total: int, kept: int, min_chars: int) -> None:
    """The one warning (or, when nothing is left, the error) about skipped short or blank texts."""
    if not kept:
        raise UserError(
            f"all {total} texts in {source} are blank or shorter than min_chars={min_chars}; "
            "lower min_chars or pass longer texts"
        )
    if kept < total:
        warnings.warn(
            f"{source}: skipped {total - kept} of {total} texts that are blank or shorter than min_chars={min_chars}",
            stacklevel=3,
        )


def load_texts(source: str, min_chars: int = 0) -> list[str]:
    """Texts from `builtin:python-docs` or a local .json/.jsonl/.parquet/.txt file or .txt folder, as a list
    (for evaluation and small inputs; pretraining reads an Arrow table instead: `icae.data.tables`).

    Texts shorter than `min_chars` (or blank) are skipped, with a warning that counts them; it is
    an error only when none is left. Bytes that are not UTF-8 are replaced with U+FFFD and a
    warning names the file and the count, rather than failing the whole run.
    """
    total, kept = 0, []
    for text in iter_texts(source):
        total += 1
        if is_kept(text, min_chars):
            kept.append(text)
    if not total:
        raise no_texts_error(source)
    skipped_texts(source, total, len(kept), min_chars)
    return kept


def default_eval_size(num_texts: int) -> int:
    """5% of the texts, at least 1, at most 1,000 (the seed's size on SlimPajama)."""
    return max(1, min(1000, round(0.05 * num_texts)))


def split_train_eval(texts, eval_size: int):
    """The first `eval_size` texts are the eval set, the rest train (the seed's convention). `texts` is a
    list, or a `datasets.Dataset` that is split by row ranges (nothing is copied)."""
    if eval_size < 0:
        raise UserError(f"eval_size={eval_size} is negative; use 0 or more")
    if eval_size >= len(texts):
        raise UserError(
            f"eval_size={eval_size} leaves no training texts ({len(texts)} texts in all); "
            "lower eval_size or add texts"
        )
    return take(texts, eval_size, len(texts)), take(texts, 0, eval_size)


def take(texts, start: int, stop: int):
    """Rows start..stop of a list or of a `datasets.Dataset` (a view of the same file)."""
    if hasattr(texts, "select"):
        return texts.select(range(start, min(stop, len(texts))))
    return list(texts[start:stop])


def builtin_eval_texts() -> list[str]:
    """The built-in corpus's eval split: its first 5%, which `icae pretrain` holds out by default."""
    texts = builtin_python_docs()
    return split_train_eval(texts, default_eval_size(len(texts)))[1]
