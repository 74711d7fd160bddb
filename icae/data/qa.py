"""Question-answering records for fine-tuning: PwC-format files and the built-in `builtin:python-docs-qa`.

A record is ICAE v2's PwC format (prompt-with-context): `{"input": context, "prompt": question,
"answer": answer}`, in a .json list, a .jsonl file (one object a line) or a .parquet file with those
three columns. Other keys are ignored.

`builtin:python-docs-qa` is made from the same place as the built-in corpus (the standard library's
Python sources, read with `ast`, nothing imported), deterministically, offline:
- an *owner* is a module (its public functions) or a public class (its public methods) having at
  least two members whose docstring opens with a usable sentence (3 to 40 words);
- the owner's members, in source order, are split into contexts of 2 to 4 members (n members give
  ceil(n/4) contexts whose sizes differ by at most one); a context is a header line (the owner and the first sentence
  of its own docstring) and, per member, its signature and the first paragraph of its docstring (whole
  sentences, at most 300 characters, the first always);
- each member gives one question, "What does `name` do?" (`Class.method` for methods), whose answer
  is the first sentence of its docstring: found only by reading the context;
- the eval split holds out whole modules (those whose name's SHA-256 is 0 modulo 10, with their
  classes), so no eval context or answer is ever trained on.
On CPython 3.11 this gives 2,977 questions about 882 contexts: train 2,624 questions (779 contexts,
184 modules), eval 353 (103 contexts, 16 modules). Other Python versions give slightly other sets.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import re
from pathlib import Path

from icae.data.docstrings import FIELDS, MAX_ANSWER_WORDS, MIN_ANSWER_WORDS, chunks as _chunks, first_sentence  # noqa: F401
from icae.data.docstrings import sentences as _sentences, signature as _signature
from icae.errors import UserError

BUILTIN_PYTHON_DOCS_QA = "builtin:python-docs-qa"
BUILTIN_PYTHON_DOCS_QA_LONG = "builtin:python-docs-qa-long"  # icae.data.qa_long: ~500-1,000-token contexts
BUILTIN_QA_SETS = (BUILTIN_PYTHON_DOCS_QA, BUILTIN_PYTHON_DOCS_QA_LONG)
QA_FORMATS = ".json, .jsonl or .parquet file of {input, prompt, answer} records, or " + " or ".join(BUILTIN_QA_SETS)

MEMBERS_PER_CONTEXT = 4
MIN_MEMBERS = 2
MAX_ENTRY_CHARS = 300
EVAL_MODULUS = 10  # modules whose name hashes to 0 modulo this are the eval split



# ----------------------------------------------------------------------------- files


def _check_record(item, where: str, path) -> dict:
    if not isinstance(item, dict):
        raise UserError(f"{where} is {_describe(item)}; every item must be an object with "
                        '"input", "prompt" and "answer" strings')
    for name in FIELDS:
        if not isinstance(item.get(name), str):
            raise UserError(f'{where} has no "{name}" string; every item needs "input" (the context), "prompt" '
                            f'and "answer" (fix {path})')
    if not item["input"].strip():
        raise UserError(f'{where} has an empty "input": there is no context to compress; fill it or remove the item')
    if not item["answer"].strip():
        raise UserError(f'{where} has an empty "answer": there is nothing to learn; fill it or remove the item')
    return {name: item[name] for name in FIELDS}


def _describe(value) -> str:
    from icae.data.texts import describe_json as describe

    return describe(value)


def _load_json(path: Path) -> list[dict]:
    from icae.data.texts import read_text_file as _read

    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}; fix the file") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{input, prompt, answer}} objects, got {_describe(data)}")
    return [_check_record(item, f"{path}: item {i}", path) for i, item in enumerate(data)]


def _load_jsonl(path: Path) -> list[dict]:
    from icae.data.texts import iter_json_lines

    return [_check_record(item, f"{path}: line {lineno}", path) for lineno, item in iter_json_lines(path)]


def _load_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: cannot read it as Parquet ({err}); check the file") from None
    missing = [name for name in FIELDS if name not in table.column_names]
    if missing:
        raise UserError(f'{path}: no "{missing[0]}" column (it has {table.column_names}); PwC-format data needs '
                        '"input", "prompt" and "answer" columns')
    rows = table.select(list(FIELDS)).to_pylist()
    return [_check_record(row, f"{path}: row {i}", path) for i, row in enumerate(rows)]


def load_qa(source: str) -> list[dict]:
    """{input, prompt, answer} records from a PwC-format file, or all of `builtin:python-docs-qa`.

    A record without one of the three strings, with an empty context or an empty answer is an error
    naming the file and the item, not a silent skip: it means the file is not what it was meant to be.
    """
    if source.startswith("builtin:"):
        train, evaluation = builtin_splits(source)
        return evaluation + train
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{source} does not exist; pass a {QA_FORMATS}" if not path.exists()
                        else f"{source} is not a file; pass a {QA_FORMATS}")
    loaders = {".json": _load_json, ".jsonl": _load_jsonl, ".parquet": _load_parquet}
    loader = loaders.get(path.suffix.lower())
    if loader is None:
        raise UserError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use a {QA_FORMATS}")
    records = loader(path)
    if not records:
        raise UserError(f"{source} holds no records; add at least one {{input, prompt, answer}} object")
    return records


# ----------------------------------------------------------------------------- the built-in set


def _entry(doc: str) -> tuple[str, str] | None:
    """(answer, context text) of a docstring, or None when its first sentence is unusable."""
    paragraph = doc.strip().split("\n\n")[0]
    sentences = _sentences(paragraph)
    if not sentences or not MIN_ANSWER_WORDS <= len(sentences[0].split()) <= MAX_ANSWER_WORDS:
        return None
    kept = sentences[:1]
    for sentence in sentences[1:]:
        if len(" ".join(kept + [sentence])) > MAX_ENTRY_CHARS:
            break
        kept.append(sentence)
    return sentences[0], " ".join(kept)


def _members(body, is_method: bool, prefix: str = "") -> list[dict]:
    """Public documented functions of a module body (or methods of a class body), each name once."""
    from icae.data.corpus import top_level as _top_level

    found, seen = [], set()
    nodes = body if is_method else _top_level(body)
    for node in nodes:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        if node.name in seen:  # platform variants (`if sys.platform ...: def f`) count once
            continue
        entry = _entry(ast.get_docstring(node) or "")
        if entry is None:
            continue
        seen.add(node.name)
        name = prefix + node.name
        found.append({"name": name, "signature": prefix + _signature(node, is_method),
                      "answer": entry[0], "text": entry[1]})
    return found


def _owners(module: str, tree: ast.Module) -> list[tuple[str, str, list[dict]]]:
    """(header, owner key, members) of a module and of each of its public classes."""
    from icae.data.corpus import top_level as _top_level

    def header(kind, name, doc):
        first = first_sentence(doc.strip().split("\n\n")[0]) if doc and doc.strip() else ""
        return f"{kind} `{name}`" + (f": {first}" if first else "")

    owners = [(header("Module", module, ast.get_docstring(tree)), module, _members(tree.body, False))]
    seen = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and node.name not in seen:
            seen.add(node.name)
            owners.append((header("Class", f"{module}.{node.name}", ast.get_docstring(node)),
                           f"{module}.{node.name}", _members(node.body, True, f"{node.name}.")))
    return [o for o in owners if len(o[2]) >= MIN_MEMBERS]


def is_eval_module(module: str) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % EVAL_MODULUS == 0


def _build_python_docs_qa() -> list[dict]:
    from icae.data.corpus import parsed_python_sources

    records = []
    for module, tree in parsed_python_sources():
        for header, owner, members in _owners(module, tree):
            for part, chunk in enumerate(_chunks(members, MEMBERS_PER_CONTEXT)):
                context = "\n\n".join([header] + [f"{m['signature']}\n{m['text']}" for m in chunk])
                for m in chunk:
                    records.append({"input": context, "prompt": f"What does `{m['name']}` do?", "answer": m["answer"],
                                    "module": module, "context_id": f"{owner}#{part}"})
    return records


@functools.lru_cache(maxsize=1)
def _python_docs_qa() -> tuple[dict, ...]:
    return tuple(_build_python_docs_qa())


def builtin_splits(source: str, with_keys: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of one of the built-in QA sets (`BUILTIN_QA_SETS`)."""
    if source == BUILTIN_PYTHON_DOCS_QA:
        return builtin_qa_splits(with_keys)
    if source == BUILTIN_PYTHON_DOCS_QA_LONG:
        from icae.data.qa_long import long_qa_splits

        return long_qa_splits(with_keys)
    raise UserError(f"unknown built-in QA set {source!r}; choose one of {', '.join(BUILTIN_QA_SETS)}")


def builtin_qa_splits(with_keys: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of `builtin:python-docs-qa`; the same lists in every process on one Python.

    `with_keys` keeps each record's "module" and "context_id" (which context it was asked about).
    """
    records = _python_docs_qa()
    keep = dict if with_keys else (lambda r: {name: r[name] for name in FIELDS})
    train = [keep(r) for r in records if not is_eval_module(r["module"])]
    evaluation = [keep(r) for r in records if is_eval_module(r["module"])]
    return train, evaluation
