"""The long-context QA set `builtin:python-docs-qa-long` (icae.data.qa_long): its pure construction and
the built set's properties (answers in their contexts, held-out modules, answers spread over contexts)."""

import ast
import re
from collections import defaultdict

import pytest

from icae.data.qa import BUILTIN_PYTHON_DOCS_QA_LONG, builtin_splits, load_qa
from icae.data.qa_long import (
    MAX_CONTEXT_CHARS, MIN_CONTEXT_CHARS, QUESTIONS_PER_CONTEXT, build_long_records, context_text,
    is_long_eval_module, long_qa_splits, module_members, pack_members, spread_indices,
)
from icae.errors import UserError


def member(i: int, header: str = "Module `m`: A module.", chars: int = 200) -> dict:
    answer = f"Return the value number {i} of the thing."
    text = (answer + " " + "More words here. " * 40)[:chars].rsplit(".", 1)[0] + "."
    return {"header": header, "name": f"f{i}", "signature": f"f{i}(x, y={i})", "text": text, "answer": answer}


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("n,k", [(1, 5), (5, 5), (6, 5), (12, 5), (40, 5), (7, 3)])
def test_spread_indices_are_distinct_sorted_and_cover_every_part(n, k):
    idx = spread_indices(n, k)
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    assert len(idx) == min(n, k)
    if n > k:  # one index in each of the k equal parts: the first and last parts are both asked about
        assert [int((i + 0.5) * k / n) for i in idx] == list(range(k))  # item i spans [i, i+1)
    assert spread_indices(n, None) == list(range(n))


def test_context_text_puts_each_owner_header_once_before_its_members():
    a, b = [member(i, "Module `m`: A module.") for i in range(2)], [member(i, "Class `m.C`: A class.") for i in (2, 3)]
    text = context_text(a + b)
    assert text.count("Module `m`") == 1 and text.count("Class `m.C`") == 1
    assert text.index("Module `m`") < text.index("f0(") < text.index("Class `m.C`") < text.index("f2(")


def test_pack_members_fits_the_limit_with_balanced_chunks():
    members = [member(i) for i in range(40)]
    chunks = pack_members(members, max_chars=2000)
    assert [m for c in chunks for m in c] == members  # consecutive, nothing lost or repeated
    assert all(len(context_text(c)) <= 2000 for c in chunks)
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert len(pack_members(members[:3], max_chars=10_000)) == 1


def test_build_long_records_asks_spread_unambiguous_questions():
    eval_module = next(f"mod{i}" for i in range(100) if is_long_eval_module(f"mod{i}"))
    train_module = next(f"mod{i}" for i in range(100) if not is_long_eval_module(f"mod{i}"))
    members = [member(i) for i in range(14)]
    members[3] = {**members[3], "answer": None}  # context only: not asked about
    members[5] = {**members[5], "answer": members[6]["answer"], "text": members[6]["text"]}  # ambiguous pair
    records = build_long_records([(eval_module, members), (train_module, members), ("tiny", members[:2])],
                                 min_chars=500, max_chars=10_000)
    by_module = defaultdict(list)
    for r in records:
        by_module[r["module"]].append(r)
    assert set(by_module) == {eval_module, train_module}  # "tiny" is too short to be a context
    asked = {r["prompt"] for r in by_module[train_module]}
    assert asked == {f"What does `f{i}` do?" for i in range(14) if i not in (3, 5, 6)}  # training: every usable one
    assert len(by_module[eval_module]) == QUESTIONS_PER_CONTEXT
    positions = [r["answer_position"] for r in by_module[eval_module]]
    assert positions == sorted(positions) and positions[0] < 0.25 and positions[-1] > 0.75
    for r in records:
        assert r["input"].count(r["answer"]) == 1
        assert 0 <= r["answer_position"] < 1
        assert r["input"][int(r["answer_position"] * len(r["input"])):].lstrip().startswith(r["answer"][:10])


def test_module_members_reads_functions_then_methods_with_headers():
    source = '''"""A module about things."""
def public(a, b=2):
    """Return the sum of a and b here.

    Second paragraph is left out."""
def _private():
    """Not public at all, never read."""
def short():
    """Short."""
class Thing:
    """A thing with methods."""
    def method(self, x):
        """Compute the thing from x, carefully. Then more."""
'''
    members = module_members("mod", ast.parse(source))
    assert [m["name"] for m in members] == ["public", "short", "Thing.method"]
    assert members[0]["header"] == "Module `mod`: A module about things."
    assert members[2]["header"] == "Class `mod.Thing`: A thing with methods."
    assert members[0]["signature"] == "public(a, b=2)" and members[2]["signature"] == "Thing.method(x)"
    assert members[0]["text"] == "Return the sum of a and b here."
    assert members[1]["answer"] is None  # one word: context only
    assert members[2]["answer"] == "Compute the thing from x, carefully."


# ----------------------------------------------------------------------------- the built set


@pytest.fixture(scope="module")
def splits():
    return long_qa_splits(with_keys=True)


def test_built_set_is_sized_and_registered(splits):
    train, evaluation = splits
    assert 500 <= len(train) <= 3000 and 60 <= len(evaluation) <= 400  # 1,057 / 135 on CPython 3.11
    assert builtin_splits(BUILTIN_PYTHON_DOCS_QA_LONG) == long_qa_splits()
    assert load_qa(BUILTIN_PYTHON_DOCS_QA_LONG) == [{k: r[k] for k in ("input", "prompt", "answer")}
                                                    for r in evaluation + train]
    with pytest.raises(UserError, match="unknown built-in QA set"):
        load_qa("builtin:python-docs-qa-longer")


def test_every_answer_is_read_from_its_context(splits):
    for r in splits[0] + splits[1]:
        name = re.fullmatch(r"What does `(.+)` do\?", r["prompt"]).group(1)
        assert re.search(rf"^{re.escape(name)}\(.*\)\n{re.escape(r['answer'])}", r["input"], re.M), r["prompt"]
        assert r["input"].count(r["answer"]) == 1
        assert MIN_CONTEXT_CHARS <= len(r["input"]) <= MAX_CONTEXT_CHARS


def test_eval_modules_are_held_out(splits):
    train, evaluation = splits
    assert not {r["module"] for r in train} & {r["module"] for r in evaluation}
    assert all(is_long_eval_module(r["module"]) for r in evaluation)
    assert not {r["input"] for r in train} & {r["input"] for r in evaluation}


def test_eval_answers_are_spread_over_their_contexts(splits):
    positions = [r["answer_position"] for r in splits[1]]
    quarters = [sum(1 for p in positions if q / 4 <= p < (q + 1) / 4) for q in range(4)]
    assert min(quarters) >= 0.15 * len(positions), quarters  # keeping the first quarter answers about a quarter
    per_context = defaultdict(list)
    for r in splits[1]:
        per_context[r["context_id"]].append(r["answer_position"])
    assert sum(max(p) >= 0.6 for p in per_context.values()) >= 0.8 * len(per_context)


def test_eval_reads_only_the_held_out_split(splits):
    from icae.recipes.evaluate import load_eval_records

    assert load_eval_records(BUILTIN_PYTHON_DOCS_QA_LONG) == [{k: r[k] for k in ("input", "prompt", "answer")}
                                                              for r in splits[1]]
