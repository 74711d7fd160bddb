"""`builtin:python-docs-qa-long`: long contexts (a whole module or class, ~500-1,200 tokens) with
questions about members anywhere in them: the set on which compressing the context is worth asking about.

Made like `builtin:python-docs-qa` (icae.data.qa), from the same sources (the standard library's Python
files read with `ast`, nothing imported), deterministically and offline; what differs:
- a module's members are its public documented functions, then each public class's public documented
  methods, in source order; each is its signature and its docstring's first paragraph (whole sentences,
  at most `MAX_ENTRY_CHARS` characters, the first always), under its owner's header line ("Module `m`:
  first sentence" or "Class `m.C`: ...") where a run of the owner's members starts;
- a module's members are packed into as few contexts as keep each under `MAX_CONTEXT_CHARS` characters
  (chunk sizes differing by at most one); a context is kept with at least `MIN_CONTEXT_CHARS`
  characters and `MIN_MEMBERS` members that can be asked about;
- a member can be asked about when its docstring's first sentence has 3 to 40 words and appears only
  once in the context: "What does `name` do?" (`Class.method` for methods), answered by that sentence;
- eval contexts get `QUESTIONS_PER_CONTEXT` questions about members spread evenly over them
  (`spread_indices`: the middle of each of k equal parts), so that keeping one quarter of the context
  cannot answer them all; a training context is asked about every usable member;
- the eval split holds out whole modules: those whose name's SHA-256 is 0 modulo `EVAL_MODULUS` (5; the
  short set holds out 1 in 10, too few long contexts here).
Each record also keeps "module", "context_id" and "answer_position" (where the answer starts in its
context, as a fraction of the context's characters).
On CPython 3.11, with SmolLM2's tokenizer: train 1,057 questions about 54 contexts (42 modules), eval 135
questions about 27 contexts (20 modules); a context has 711 tokens (median; train 472-1,031) and 774
(eval; 555-1,241).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math

from icae.data.docstrings import FIELDS, MAX_ANSWER_WORDS, MIN_ANSWER_WORDS, chunks, first_sentence, sentences, signature

MIN_CONTEXT_CHARS = 2000  # ~500 tokens of SmolLM2's tokenizer (about 4 characters a token here)
MAX_CONTEXT_CHARS = 3600  # ~900 tokens
MIN_MEMBERS = 4  # members that can be asked about
MAX_ENTRY_CHARS = 600  # a member's docstring paragraph in the context (the short set: 300)
QUESTIONS_PER_CONTEXT = 5  # in eval contexts; a training context is asked about every usable member
EVAL_MODULUS = 5  # 1 module in 5 held out (the short set: 1 in 10), for enough eval contexts


def is_long_eval_module(module: str) -> bool:
    """The eval split's modules: those whose name's SHA-256 is 0 modulo `EVAL_MODULUS`."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % EVAL_MODULUS == 0


def spread_indices(n: int, k: int | None) -> list[int]:
    """k distinct indices of n items spread evenly: the middle of each of k equal parts (all n when n <= k
    or k is None)."""
    if k is None or n <= k:
        return list(range(n))
    return [min(n - 1, int((j + 0.5) * n / k)) for j in range(k)]


def entry_text(member: dict) -> str:
    return f"{member['signature']}\n{member['text']}"


def context_text(members: list[dict]) -> str:
    """Members (each with its owner's "header") as one context: each run of members of one owner under
    that owner's header line."""
    blocks, header = [], None
    for m in members:
        if m["header"] != header:
            header = m["header"]
            blocks.append(header)
        blocks.append(entry_text(m))
    return "\n\n".join(blocks)


def pack_members(members: list[dict], max_chars: int = MAX_CONTEXT_CHARS) -> list[list[dict]]:
    """The fewest chunks of consecutive members whose contexts all fit in `max_chars` (chunk sizes
    differing by at most one); a single member longer than that is a chunk of its own."""
    if not members:
        return []
    for count in range(math.ceil(len(context_text(members)) / max_chars), len(members) + 1):
        parts = chunks(members, math.ceil(len(members) / count))
        if all(len(context_text(c)) <= max_chars or len(c) == 1 for c in parts):
            return parts
    return [[m] for m in members]


def context_records(module: str, part: int, chunk: list[dict], questions: int | None = QUESTIONS_PER_CONTEXT) -> list[dict]:
    """The records of one context: questions about `questions` members spread over it, unambiguous ones only."""
    context = context_text(chunk)
    usable = [m for m in chunk if m["answer"] and context.count(m["answer"]) == 1 and context.count(f"{m['signature']}\n") == 1]
    records = []
    for i in spread_indices(len(usable), questions):
        m = usable[i]
        start = context.index(entry_text(m)) + len(m["signature"]) + 1
        records.append({"input": context, "prompt": f"What does `{m['name']}` do?", "answer": m["answer"],
                        "module": module, "context_id": f"{module}#{part}",
                        "answer_position": round(start / len(context), 4)})
    return records


def build_long_records(modules, min_chars: int = MIN_CONTEXT_CHARS, max_chars: int = MAX_CONTEXT_CHARS,
                       min_members: int = MIN_MEMBERS) -> list[dict]:
    """Records from (module, members) pairs, each member a dict with "header", "name", "signature",
    "text" and "answer": a pure function of its input. Eval contexts get `QUESTIONS_PER_CONTEXT` questions
    spread over them; training contexts one per usable member."""
    records = []
    for module, members in modules:
        for part, chunk in enumerate(pack_members(members, max_chars)):
            if sum(1 for m in chunk if m["answer"]) >= min_members and len(context_text(chunk)) >= min_chars:
                records += context_records(module, part, chunk, QUESTIONS_PER_CONTEXT if is_long_eval_module(module)
                                           else None)
    return records


def module_members(module: str, tree: ast.Module, max_entry_chars: int = MAX_ENTRY_CHARS) -> list[dict]:
    """The module's public documented functions, then each public class's public documented methods, in
    source order, each with its owner's header line (as icae.data.qa._owners writes it), its signature,
    its docstring's first paragraph (whole sentences up to `max_entry_chars`, the first always) and the
    answer (the first sentence, or None when it is not 3 to 40 words: such a member is context only)."""
    from icae.data.corpus import top_level as _top_level

    def header(kind, name, doc):
        first = first_sentence(doc.strip().split("\n\n")[0]) if doc and doc.strip() else ""
        return f"{kind} `{name}`" + (f": {first}" if first else "")

    def members(body, is_method, head, prefix=""):
        found, seen = [], set()
        for node in (body if is_method else _top_level(body)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            said = sentences((ast.get_docstring(node) or "").strip().split("\n\n")[0])
            if node.name in seen or not said:
                continue
            seen.add(node.name)
            kept = said[:1]
            for sentence in said[1:]:
                if len(" ".join(kept + [sentence])) > max_entry_chars:
                    break
                kept.append(sentence)
            usable = MIN_ANSWER_WORDS <= len(said[0].split()) <= MAX_ANSWER_WORDS
            found.append({"header": head, "name": prefix + node.name, "signature": prefix + signature(node, is_method),
                          "text": " ".join(kept), "answer": said[0] if usable else None})
        return found

    out = members(tree.body, False, header("Module", module, ast.get_docstring(tree)))
    seen = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and node.name not in seen:
            seen.add(node.name)
            out += members(node.body, True, header("Class", f"{module}.{node.name}", ast.get_docstring(node)),
                           f"{node.name}.")
    return out


def stdlib_modules():
    """(module, members) of the standard library's Python sources (icae.data.corpus.parsed_python_sources)."""
    from icae.data.corpus import parsed_python_sources

    for module, tree in parsed_python_sources():
        members = module_members(module, tree)
        if members:
            yield module, members


@functools.lru_cache(maxsize=1)
def _python_docs_qa_long() -> tuple[dict, ...]:
    return tuple(build_long_records(stdlib_modules()))


def long_qa_splits(with_keys: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of `builtin:python-docs-qa-long`; the same lists in every process on one Python."""
    records = _python_docs_qa_long()
    keep = dict if with_keys else (lambda r: {name: r[name] for name in FIELDS})
    train = [keep(r) for r in records if not is_long_eval_module(r["module"])]
    evaluation = [keep(r) for r in records if is_long_eval_module(r["module"])]
    return train, evaluation
