"""Text sources for training and evaluation: the built-in corpus or local files.

The built-in corpus is English prose that ships with every CPython (the reference manual's
topics and the standard library's docstrings), so the demo and the tests need no network.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import inspect
import io
import itertools
import json
import os
import pkgutil
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from icae.errors import UserError

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
BUILTIN_MIN_CHARS = 200

FORMATS = ".json, .jsonl, .parquet or .txt file, a folder of .txt files, or " + BUILTIN_PYTHON_DOCS

# Modules that are tests, GUIs, demos, deprecated shims or have import-time side effects
# (opening a browser, printing, installing a readline completer).
_SKIP_TOP = {
    "test", "idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "readline",
    "rlcompleter", "lib2to3", "distutils", "ensurepip", "venv", "pydoc_data",
}
_SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _wanted(name: str) -> bool:
    parts = name.split(".")
    return parts[0] not in _SKIP_TOP and not any(p.startswith("_") or p in _SKIP_PARTS for p in parts)


def _python_sources() -> list[tuple[str, Path]]:
    """(module name, source file) for the public stdlib modules written in Python, packages walked."""
    found = []

    def walk(folder: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(folder)]):
            name = prefix + info.name
            if not _wanted(name) or (not prefix and name not in sys.stdlib_module_names):
                continue
            if info.ispkg:
                found.append((name, folder / info.name / "__init__.py"))
                walk(folder / info.name, name + ".")
            else:
                found.append((name, folder / f"{info.name}.py"))

    walk(Path(sysconfig.get_paths()["stdlib"]), "")
    return sorted((name, path) for name, path in found if path.is_file())


def _extension_modules() -> list:
    """The stdlib modules written in C (math, _io, _collections...), imported quietly.

    Private ones are included: they hold the real docs of classes such as `deque` and `TextIOWrapper`.
    """
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if name.lstrip("_") in _SKIP_TOP:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) or ""
        is_ext = origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        if origin == "built-in" or (is_ext and os.path.realpath(origin).startswith(stdlib)):
            module = _quiet_import(name)
            if module is not None:
                modules.append(module)
    return modules


def _quiet_import(name: str):
    """Import without letting the module print or warn; None when it cannot be imported here."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):  # noqa: BLE001 - platform-specific modules fail in many ways
        return None


def _is_method(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _parsed_members(path: Path):
    """Module docstring and (name, is_class, doc, [(method, doc)]) read from source, importing nothing.

    Reading source rather than live objects keeps the corpus the same whatever other libraries
    have imported or monkeypatched in this process.
    """
    try:
        with warnings.catch_warnings():  # old escape sequences in some stdlib files warn on 3.12+
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return "", []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    members = []
    for node in _top_level(tree.body):
        if isinstance(node, (*defs, ast.ClassDef)) and not node.name.startswith("_"):
            methods = []
            if isinstance(node, ast.ClassDef):
                own = [m for m in node.body if isinstance(m, defs) and _is_method(m.name)]
                methods = [(m.name, ast.get_docstring(m) or "") for m in own]
            members.append((node.name, isinstance(node, ast.ClassDef), ast.get_docstring(node) or "", methods))
    return ast.get_docstring(tree) or "", members


def _top_level(body):
    """Module-level statements, including those inside `if`/`try` blocks (platform variants)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            handlers = [h.body for h in getattr(node, "handlers", [])]
            for block in (node.body, node.orelse, getattr(node, "finalbody", []), *handlers):
                yield from _top_level(block)


def _doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _live_members(module):
    """Like `_parsed_members`, for a C module. Dunder methods are left out: C slot wrappers carry
    boilerplate ("Return self+value.")."""
    members = []
    for name, obj in sorted(vars(module).items()):
        if module is sys:  # sys.__excepthook__ etc. keep the originals of hooks others replace (pytest does)
            obj = getattr(sys, f"__{name}__", obj)
        # Only what the module defines: `_collections.deque` says it is from `collections`.
        owner = str(getattr(obj, "__module__", None)).lstrip("_")
        if name.startswith("_") or owner != module.__name__.lstrip("_"):
            continue
        if inspect.isclass(obj):
            methods = [(n, _doc(m)) for n, m in vars(obj).items() if not n.startswith("_") and callable(m)]
            members.append((name, True, _doc(obj), methods))
        elif inspect.isroutine(obj):
            members.append((name, False, _doc(obj), []))
    return _doc(module), members


def _module_texts(module_name: str, doc: str, members) -> list[tuple[str, str]]:
    """(key, text): one per class (its methods' docs appended, for longer documents) and per long
    function; short function docs join the module's own text. `_heapq` is keyed as `heapq`."""
    public = module_name.lstrip("_")
    head, out = [doc], []
    for name, is_class, member_doc, methods in members:
        if is_class:
            parts = [member_doc] + [f"{name}.{m}: {d}" for m, d in methods if d]
            out.append((f"{public}.{name}", "\n\n".join(p for p in parts if p)))
        elif len(member_doc) >= BUILTIN_MIN_CHARS:
            out.append((f"{public}.{name}", member_doc))
        elif member_doc:
            head.append(f"{name}: {member_doc}")
    return [(public, "\n\n".join(p for p in head if p))] + out


def _build_python_docs() -> list[str]:
    import pydoc_data.topics

    keyed = [(f"topic:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    for name, path in _python_sources():
        keyed += _module_texts(name, *_parsed_members(path))
    for module in _extension_modules():
        keyed += _module_texts(module.__name__, *_live_members(module))
    # The Python source wins over its C accelerator (`heapq` over `_heapq`): no near-duplicates.
    keyed = list({key: text for key, text in reversed(keyed)}.items())
    # Order by a hash of the key: stable across runs, yet mixes modules, so the first texts
    # (the eval split) are a fair sample rather than all of `abc` and `argparse`.
    keyed.sort(key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())
    texts, seen = [], set()
    for _, text in keyed:
        text = _ADDRESS.sub("", text).strip()
        norm = " ".join(text.split())
        if len(text) >= BUILTIN_MIN_CHARS and norm not in seen:
            seen.add(norm)
            texts.append(text)
    return texts


@functools.lru_cache(maxsize=1)
def _python_docs() -> tuple[str, ...]:
    return tuple(_build_python_docs())


def builtin_python_docs() -> list[str]:
    """The built-in corpus: about 1.8M characters, the same list in every process on one Python.

    Built from source files and C docstrings in a few seconds, then kept for this process.
    """
    return list(_python_docs())


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
    try:
        return path.open("rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None


def _check_not_blank(path: Path) -> None:
    """Refuse a file with nothing but whitespace, reading only up to its first other byte."""
    with _open(path) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise UserError(f"{path} is empty; pass a file that holds texts")


def _read(path: Path) -> str:
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
    raise UserError(f'{where} is {_describe(item)}; make it a string or an object with a "text" string')


def _describe(value) -> str:
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
        data = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}; fix the file") from None
    if not isinstance(data, list):
        raise UserError(
            f'{path}: expected a JSON list of strings or of objects with "text", got {_describe(data)}; fix the file'
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
            raise UserError(f'{path}: line {lineno} must be an object with a "text" string, not {_describe(item)}')
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
                raise UserError(f'{path}: row {row} of column "text" is {_describe(value)}; make every row a string')
            row += 1
            yield value


def _iter_files(files: list[Path]) -> Iterator[str]:
    for file in files:
        yield _read(file)


_READERS = {".json": _iter_json, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet, ".txt": lambda p: iter([_read(p)])}


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
