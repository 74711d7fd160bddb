"""The built-in corpus `builtin:python-docs`: English prose that ships with every CPython (the
reference manual's topics and the standard library's docstrings), so the demo and the tests need no
network. Read from source files where there are some (importing nothing), from C modules' docstrings
otherwise; the same list in every process on one Python. Reading data files is icae.data.texts.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import warnings
from pathlib import Path

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
BUILTIN_MIN_CHARS = 200

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


def python_sources() -> list[tuple[str, Path]]:
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



def parsed_python_sources():
    """(module name, ast.Module) of every `python_sources()` file that parses (the built-in QA sets' input)."""
    for module, path in python_sources():
        try:
            with warnings.catch_warnings():  # old escape sequences in some stdlib files warn on 3.12+
                warnings.simplefilter("ignore")
                yield module, ast.parse(path.read_bytes())
        except (OSError, SyntaxError, ValueError):
            continue


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
    for node in top_level(tree.body):
        if isinstance(node, (*defs, ast.ClassDef)) and not node.name.startswith("_"):
            methods = []
            if isinstance(node, ast.ClassDef):
                own = [m for m in node.body if isinstance(m, defs) and _is_method(m.name)]
                methods = [(m.name, ast.get_docstring(m) or "") for m in own]
            members.append((node.name, isinstance(node, ast.ClassDef), ast.get_docstring(node) or "", methods))
    return ast.get_docstring(tree) or "", members


def top_level(body):
    """Module-level statements, including those inside `if`/`try` blocks (platform variants)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            handlers = [h.body for h in getattr(node, "handlers", [])]
            for block in (node.body, node.orelse, getattr(node, "finalbody", []), *handlers):
                yield from top_level(block)


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
    for name, path in python_sources():
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
