"""Pure helpers that turn CPython's docstrings into QA material, shared by the built-in QA sets
(icae/data/qa.py: short contexts; icae/data/qa_long.py: whole modules): sentences, signatures, chunks."""

from __future__ import annotations

import ast
import math
import re

FIELDS = ("input", "prompt", "answer")  # a QA record
MIN_ANSWER_WORDS, MAX_ANSWER_WORDS = 3, 40  # a docstring's first sentence is an answer only at this length

# A sentence ends at . ! or ? before a space or the end, but not in "e.g." / "i.e." / "etc.".
_SENTENCE = re.compile(r".+?(?<!\be\.g)(?<!\bi\.e)(?<!\betc)[.!?](?=\s|$)", re.S)


def first_sentence(text: str) -> str:
    """The first sentence of a paragraph (spaces collapsed), or the whole paragraph if none ends."""
    text = " ".join(text.split())
    match = _SENTENCE.match(text)
    return match.group(0) if match else text


def sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    out = []
    while text:
        sentence = first_sentence(text)
        out.append(sentence)
        text = text[len(sentence):].strip()
    return out


def signature(node, is_method: bool) -> str:
    args = node.args
    if is_method and (args.posonlyargs or args.args) and not any(
        isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list
    ):
        args = ast.arguments(**{**{f: getattr(args, f) for f in args._fields}})
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
    return f"{node.name}({ast.unparse(args)})"


def chunks(items: list, size: int) -> list[list]:
    """ceil(n/size) consecutive chunks whose lengths differ by at most one (4 items a chunk at most:
    13 items give 4, 3, 3, 3; from 2 items on, every chunk has at least 2)."""
    count = math.ceil(len(items) / size)
    base, extra = divmod(len(items), count)
    out, start = [], 0
    for j in range(count):
        end = start + base + (1 if j < extra else 0)
        out.append(items[start:end])
        start = end
    return out
