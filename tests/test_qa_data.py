"""QA records: the built-in python-docs-qa set, PwC-format files and their bad forms, `icae prepare --dataset pwc`."""

import json
import re
from collections import defaultdict

import pytest

import icae.recipes.prepare as prep
from icae.data.qa import (
    BUILTIN_PYTHON_DOCS_QA, _build_python_docs_qa, builtin_qa_splits, first_sentence, is_eval_module, load_qa,
)
from icae.errors import UserError

RECORDS = [{"input": f"context {i}: the answer is {i}.", "prompt": f"What is {i}?", "answer": f"It is {i}."}
           for i in range(12)]


# ----------------------------------------------------------------------------- the built-in set


@pytest.fixture(scope="module")
def splits():
    return builtin_qa_splits(with_keys=True)


def test_builtin_set_is_deterministic_and_sized_as_documented(splits):
    train, evaluation = splits
    fresh = _build_python_docs_qa()  # built again from the sources: the same records in the same order
    assert [r for r in fresh if not is_eval_module(r["module"])] == train
    assert [r for r in fresh if is_eval_module(r["module"])] == evaluation
    assert 2000 <= len(train) <= 4000 and 150 <= len(evaluation) <= 600  # docs/FINETUNING.md: ~2,600 train, ~350 eval on 3.11
    assert load_qa(BUILTIN_PYTHON_DOCS_QA) == [{k: r[k] for k in ("input", "prompt", "answer")}
                                               for r in evaluation + train]


def test_each_answer_is_read_from_its_context(splits):
    train, evaluation = splits
    by_context = defaultdict(list)
    for r in train + evaluation:
        name = re.fullmatch(r"What does `(.+)` do\?", r["prompt"]).group(1)
        # the context holds the member's signature line and, below it, the answer: its docstring's first sentence
        assert re.search(rf"^{re.escape(name)}\(.*\)\n{re.escape(r['answer'])}", r["input"], re.M), r
        assert 3 <= len(r["answer"].split()) <= 40 and r["answer"] == first_sentence(r["answer"])
        by_context[r["context_id"]].append(r)
    for rows in by_context.values():
        assert 2 <= len(rows) <= 4 and len({r["input"] for r in rows}) == 1
        assert len({r["prompt"] for r in rows}) == len(rows)  # one question per member


def test_eval_split_holds_out_whole_modules(splits):
    train, evaluation = splits
    train_modules, eval_modules = {r["module"] for r in train}, {r["module"] for r in evaluation}
    assert not train_modules & eval_modules and eval_modules
    assert all(is_eval_module(m) for m in eval_modules) and not any(is_eval_module(m) for m in train_modules)
    assert not {r["input"] for r in train} & {r["input"] for r in evaluation}


def test_first_sentence():
    assert first_sentence("Return the value.  More text here.") == "Return the value."
    assert first_sentence("Use it, e.g. for files, i.e. paths, etc. and more. Then.") == \
        "Use it, e.g. for files, i.e. paths, etc. and more."
    assert first_sentence("Call .set_ok() first! Then go.") == "Call .set_ok() first!"
    assert first_sentence("No end\n   here") == "No end here"


# ----------------------------------------------------------------------------- files


def test_json_jsonl_and_parquet_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = [{**r, "id": i} for i, r in enumerate(RECORDS)]  # other keys are ignored
    (tmp_path / "a.json").write_text(json.dumps(extra))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in extra) + "\n\n")
    pq.write_table(pa.Table.from_pylist(extra), tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "a.parquet"):
        assert load_qa(str(tmp_path / name)) == RECORDS, name


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """U+2028 (and \\r before the newline) inside a record: a legal JSON line, one record, as texts.jsonl reads it."""
    record = {"input": "a\u2028line\x85separator", "prompt": "p\u2029", "answer": "a"}
    (tmp_path / "a.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps(record) + "\n")
    assert load_qa(str(tmp_path / "a.jsonl")) == [record, record]


BAD = {
    "missing-answer": ('[{"input": "c", "prompt": "p"}]', ".json",
                       r'bad.json: item 0 has no "answer" string; every item needs "input" \(the context\), "prompt" '
                       r'and "answer" \(fix .*bad.json\)'),
    "missing-input-jsonl": ('{"input": "c", "prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "a"}', ".jsonl",
                            r'bad.jsonl: line 2 has no "input" string'),
    "empty-answer": ('[{"input": "c", "prompt": "p", "answer": "a"}, {"input": "c", "prompt": "p", "answer": " "}]',
                     ".json", r'bad.json: item 1 has an empty "answer": there is nothing to learn'),
    "empty-input": ('[{"input": "", "prompt": "p", "answer": "a"}]', ".json",
                    r'bad.json: item 0 has an empty "input": there is no context to compress'),
    "not-an-object": ('["just text"]', ".json", r"bad.json: item 0 is a JSON str; every item must be an object"),
    "not-a-list": ('{"input": "c"}', ".json", r"expected a JSON list of \{input, prompt, answer\} objects"),
    "no-records": ("[]", ".json", r"holds no records"),
    "invalid-json": ('[{"input": ', ".json", r"bad.json: invalid JSON at line 1"),
    "unknown-type": ("input,prompt,answer\n", ".csv", r"unknown file type '.csv'; use a .json, .jsonl or .parquet"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_one_line_errors(tmp_path, name):
    content, suffix, message = BAD[name]
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_qa(str(path))
    assert "\n" not in str(err.value)


def test_missing_parquet_column_and_missing_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"input": "c", "question": "q", "answer": "a"}]), tmp_path / "q.parquet")
    with pytest.raises(UserError, match=r'q.parquet: no "prompt" column \(it has'):
        load_qa(str(tmp_path / "q.parquet"))
    with pytest.raises(UserError, match=r"nope.json does not exist; pass a .json, .jsonl or .parquet file"):
        load_qa(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match=r"unknown built-in QA set 'builtin:python-docs'"):
        load_qa("builtin:python-docs")


# ----------------------------------------------------------------------------- icae prepare --dataset pwc


def test_prepare_pwc_from_a_local_file_splits_like_pretraining_data(tmp_path):
    src = tmp_path / "pwc.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = tmp_path / "out"
    assert prep.main(["--dataset", "pwc", "--source", str(src), "--output_dir", str(out), "--eval_size", "3"]) == 0
    assert json.loads((out / "pwc_records.json").read_text()) == RECORDS
    assert json.loads((out / "pwc_eval.json").read_text()) == RECORDS[:3]
    assert json.loads((out / "pwc_train.json").read_text()) == RECORDS[3:]
    assert load_qa(str(out / "pwc_train.json")) == RECORDS[3:]  # what `icae finetune --train_file` reads
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prep.prepare_pwc(str(src), out, eval_size=3)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}, "finished work is not redone"
    with pytest.raises(UserError, match="12 records leave none for training after --eval_size 12"):
        prep.prepare_pwc(str(src), tmp_path / "o2", eval_size=12)


def test_prepare_pwc_streams_the_hub_dataset(tmp_path, monkeypatch):
    rows = [{**r, "extra": 1} for r in RECORDS[:4]]
    rows.insert(2, {"input": "c", "prompt": "p", "answer": ""})  # the hub's own empty answer: skipped, counted
    calls = {}

    def fake_load_dataset(name, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return iter(rows)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    counts = prep.prepare_pwc(prep.PWC_HUB, tmp_path, eval_size=1, max_docs=3)
    assert calls == {"name": "sggetao/PwC", "split": "train", "streaming": True}
    assert counts == {"pwc_eval.json": 1, "pwc_train.json": 2}
    assert json.loads((tmp_path / "pwc_records.json").read_text()) == RECORDS[:3]

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: iter([{"context": "c"}]))
    with pytest.raises(UserError, match=r"dataset 'sggetao/PwC' has no 'input' string column"):
        prep.prepare_pwc(prep.PWC_HUB, tmp_path / "o", eval_size=1)
