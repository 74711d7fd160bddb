import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest

from icae.errors import UserError
from icae.data.corpus import builtin_python_docs
from icae.data.texts import BUILTIN_PYTHON_DOCS, load_texts, split_train_eval

CORPUS_SHA = "import hashlib; from icae.data.corpus import builtin_python_docs as b; " \
    "print(hashlib.sha256('\\0'.join(b()).encode()).hexdigest())"


def corpus_sha(texts):
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def test_builtin_corpus_is_large_long_and_unique():
    texts = builtin_python_docs()
    assert sum(map(len, texts)) >= 1_500_000
    assert min(map(len, texts)) >= 200
    normalized = [" ".join(t.split()) for t in texts]
    assert len(set(normalized)) == len(texts)
    assert not any(" at 0x" in t for t in texts)


def test_builtin_corpus_is_the_same_in_other_processes():
    """Other hash seeds, and a process where transformers and logging have patched the stdlib."""
    preludes = ["", "import logging, transformers; logging.captureWarnings(True); "]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + CORPUS_SHA],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        for seed, prelude in enumerate(preludes)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outputs == [corpus_sha(builtin_python_docs())] * 2


def test_builtin_corpus_callers_get_their_own_list():
    builtin_python_docs().clear()
    assert builtin_python_docs()
    assert load_texts(BUILTIN_PYTHON_DOCS) == builtin_python_docs()
    long = load_texts(BUILTIN_PYTHON_DOCS, min_chars=2000)
    assert long and all(len(t) >= 2000 for t in long)


TEXTS = ["first text", "second text, héllo ✓", "third\nwith lines"]


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_json_list_of_strings_and_objects(tmp_path):
    assert load_texts(write(tmp_path / "a.json", json.dumps(TEXTS))) == TEXTS
    objects = json.dumps([{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    assert load_texts(write(tmp_path / "b.json", objects)) == TEXTS


def test_jsonl(tmp_path):
    lines = "\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n\n"
    assert load_texts(write(tmp_path / "a.jsonl", lines)) == TEXTS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS, "n": [1, 2, 3]}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.parquet")) == TEXTS


def test_txt_file_and_folder(tmp_path):
    assert load_texts(write(tmp_path / "one.txt", TEXTS[2])) == [TEXTS[2]]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", TEXTS[1])
    write(folder / "a.txt", TEXTS[0])
    write(folder / "sub" / "c.txt", TEXTS[2])
    write(folder / "notes.md", "ignored")
    assert load_texts(str(folder)) == TEXTS


def test_min_chars_skips_short_and_blank_texts(tmp_path):
    path = write(tmp_path / "a.json", json.dumps(["x" * 5, "y" * 50, "   "]))
    assert load_texts(path, min_chars=10) == ["y" * 50]
    assert load_texts(path) == ["x" * 5, "y" * 50]
    with pytest.raises(UserError, match=r"all 3 texts in .*a.json are blank or shorter than min_chars=100"):
        load_texts(path, min_chars=100)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", "", r"empty.json is empty"),
        ("empty.txt", "  \n", r"empty.txt is empty"),
        ("none.json", "[]", r"none.json holds no texts"),
        ("bad.json", '[\n"a",\n', r"bad.json: invalid JSON at line 3"),
        ("dict.json", '{"text": "a"}', r'dict.json: expected a JSON list of strings or of objects with "text"'),
        ("item.json", '["a", 3]', r'item.json: item 1 is a JSON int; make it a string or an object with a "text"'),
        ("key.json", '[{"body": "a"}]', r"key.json: item 0 is an object with keys \['body'\]"),
        ("bad.jsonl", '{"text": "a"}\n{"text": ', r"bad.jsonl: line 2 is not valid JSON"),
        ("list.jsonl", '{"text": "a"}\n\n["a"]', r'list.jsonl: line 3 must be an object with a "text" string'),
        ("num.jsonl", '{"text": 5}', r'num.jsonl: line 1 must be an object with a "text" string'),
        ("data.csv", "text\na", r"data.csv: unknown file type '.csv'; use a .json, .jsonl, .parquet or .txt"),
    ],
)
def test_file_errors(tmp_path, name, content, message):
    with pytest.raises(UserError, match=message):
        load_texts(write(tmp_path / name, content))


def test_missing_sources(tmp_path):
    with pytest.raises(UserError, match=r"nope.json does not exist; pass a .json"):
        load_texts(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match=r"folder with no .txt files"):
        load_texts(str(tmp_path))
    with pytest.raises(UserError, match=r"unknown built-in corpus 'builtin:wiki'"):
        load_texts("builtin:wiki")


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a.parquet: no \"text\" column \(it has \['body'\]\)"):
        load_texts(str(tmp_path / "a.parquet"))
    write(tmp_path / "junk.parquet", "not parquet")
    with pytest.raises(UserError, match=r"junk.parquet: cannot read it as Parquet"):
        load_texts(str(tmp_path / "junk.parquet"))


def test_bad_utf8_is_replaced_with_a_warning(tmp_path):
    # Two stray bytes, one truncated 3-byte sequence (2 bytes), and a genuine U+FFFD that is not counted.
    path = write(tmp_path / "latin1.txt", b"caf\xe9 cr\xe8me \xe2\x82 ok \xef\xbf\xbd")
    with pytest.warns(UserWarning, match=r"latin1.txt: 4 bytes are not valid UTF-8"):
        (text,) = load_texts(path)
    assert text == "caf\ufffd cr\ufffdme \ufffd ok \ufffd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_texts(write(tmp_path / "ok.json", json.dumps(TEXTS))) == TEXTS


def test_split_train_eval_takes_eval_first():
    texts = [f"t{i}" for i in range(5)]
    assert split_train_eval(texts, 2) == (["t2", "t3", "t4"], ["t0", "t1"])
    assert split_train_eval(texts, 0) == (texts, [])
    with pytest.raises(UserError, match=r"eval_size=5 leaves no training texts \(5 texts in all\)"):
        split_train_eval(texts, 5)
    with pytest.raises(UserError, match=r"eval_size=-1 is negative"):
        split_train_eval(texts, -1)


def test_default_eval_split_is_proportional_and_capped():
    from icae.data.texts import default_eval_size

    assert [default_eval_size(n) for n in (1, 2, 19, 100, 1445, 20_000, 10**6)] == [1, 1, 1, 5, 72, 1000, 1000]


def test_pretrain_splits_print_sizes_and_keep_an_explicit_eval_size(tmp_path, capsys):
    import json

    from icae.recipes.pretrain import DataArguments, load_splits

    path = tmp_path / "texts.json"
    path.write_text(json.dumps([f"text number {i}" for i in range(100)]))
    train, evaluation = load_splits(DataArguments(train_file=str(path)), verbose=True)
    assert (len(train), len(evaluation)) == (95, 5) and evaluation[0] == "text number 0"
    assert "95 train, 5 eval" in capsys.readouterr().out
    train, evaluation = load_splits(DataArguments(train_file=str(path), eval_size=30))
    assert (len(train), len(evaluation)) == (70, 30)

