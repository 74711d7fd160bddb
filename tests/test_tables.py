"""Texts and token ids in Arrow tables: the streaming readers, the cached text table, the cached tokenizing
`map`, and the examples built over them (the same as today's list path)."""

import json
import os
import subprocess
import sys
import warnings

import pytest

import icae.data.texts as texts_module
from icae.data.tables import load_text_table, tables_dir
from icae.data.texts import iter_texts, load_texts
from icae.data.tokens import tokenize_table
from icae.errors import UserError

ITEMS = ["plain", 'quote " and \\ backslash', "unicode: héllo ✓ \u2028 \U0001f600", "x" * 300, "", "  \n ",
         "newline\nand\ttab", "]], {{ not json structure ,"]


@pytest.fixture
def tiny_reads(monkeypatch):
    """Reads of a few bytes, so items, escapes and multi-byte characters are cut by the end of a read."""
    monkeypatch.setattr(texts_module, "_CHUNK", 7)


@pytest.mark.parametrize("layout", ["compact", "spaced", "objects"])
def test_json_list_is_read_item_by_item_across_reads(tmp_path, tiny_reads, layout):
    data = ITEMS
    if layout == "objects":  # with a nested list of objects whose string looks like an item boundary
        data = [{"text": t, "meta": {"n": [i, {"k": "}, {"}]}} for i, t in enumerate(ITEMS)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data, indent=2 if layout == "spaced" else None, ensure_ascii=layout != "compact"))
    assert list(iter_texts(str(path))) == ITEMS


@pytest.mark.parametrize("content", ['[\n"a",\n', '[{"text": "a"},\n{"text": "b"', '["a" "b"]', '["a",]',
                                     '["a"] x', '[\n\n"abc\\q"]', '[', '["a", 3]', '{"text": "a"}', "[]"])
def test_json_errors_are_the_same_whatever_the_read_size(tmp_path, monkeypatch, content):
    """Each bad file fails with the message (and line) of a whole-file `json.loads`, also when cut in reads."""
    path = tmp_path / "bad.json"
    path.write_text(content)
    messages = []
    for chunk in (3, 1 << 20):
        monkeypatch.setattr(texts_module, "_CHUNK", chunk)
        with pytest.raises(UserError) as err:
            load_texts(str(path))
        messages.append(str(err.value))
    whole = texts_module._load_json_whole  # today's whole-file reader, for the messages of a list too
    try:
        expected = "holds no texts" if not whole(path) else None
    except UserError as err:
        expected = str(err)
    assert messages[0] == messages[1] and expected in messages[0]


def test_bad_utf8_is_counted_across_reads(tmp_path, monkeypatch):
    data = b"caf\xe9 \xe2\x82 ok \xef\xbf\xbd \xf0\x9f\x98\x80 end\xff"
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "' + data + b'"}\n')
    expected = data.decode("utf-8", errors="replace")
    for chunk in range(1, 12):
        monkeypatch.setattr(texts_module, "_CHUNK", chunk)
        with pytest.warns(UserWarning, match=r"a.jsonl: 4 bytes are not valid UTF-8") as caught:
            assert list(iter_texts(str(path))) == [expected]
        assert len(caught) == 1


def write_json(path, items):
    path.write_text(json.dumps(items))
    return str(path)


def test_text_table_is_read_once_then_mapped_from_the_cache(tmp_path, monkeypatch):
    source = write_json(tmp_path / "t.json", [{"text": f"text {i} " * (i + 1)} for i in range(30)])
    table = load_text_table(source)
    assert table["text"][:] == load_texts(source) and len(table) == 30
    (arrow,) = {f["filename"] for f in table.cache_files}
    assert arrow.startswith(str(tables_dir())) and arrow.endswith("texts.arrow")

    def no_reading(folder, source):
        raise AssertionError(f"{source} was read again")

    with monkeypatch.context() as m:
        m.setattr("icae.data.tables._write_table", no_reading)
        again = load_text_table(source)
    assert again["text"][:] == table["text"][:]
    # a changed file is a new table
    write_json(tmp_path / "t.json", ["changed text"])
    os.utime(source, ns=(10**18, 10**18))
    assert load_text_table(source)["text"][:] == ["changed text"]


def test_text_table_warns_and_fails_like_load_texts_also_from_the_cache(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_bytes("caf\xe9 ".encode("latin-1") * 30)
    (folder / "b.txt").write_text("short")
    (folder / "c.txt").write_text("tiny")
    for _ in range(2):  # the first read, then the cached table
        with pytest.warns(UserWarning) as caught:
            table = load_text_table(str(folder), min_chars=10)
        messages = [str(w.message) for w in caught]
        assert any("a.txt: 30 bytes are not valid UTF-8" in m for m in messages)
        assert any("skipped 2 of 3 texts that are blank or shorter than min_chars=10" in m for m in messages)
        assert table["text"][:] == ["caf\ufffd " * 30]
    with pytest.raises(UserError, match=r"all 3 texts in .*docs are blank or shorter than min_chars=1000"):
        load_text_table(str(folder), min_chars=1000)
    for name, content in [("bad.json", '[\n"a",\n'), ("none.json", "[]"), ("empty.txt", " "), ("x.csv", "a")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(UserError) as expected:
            load_texts(str(path))
        with pytest.raises(UserError) as got:
            load_text_table(str(path))
        assert str(got.value) == str(expected.value)
    assert not list(tables_dir().glob(".*.tmp")), "a failed read leaves no half table behind"


def test_builtin_corpus_is_a_table_too():
    from icae.data.texts import BUILTIN_PYTHON_DOCS, builtin_python_docs

    table = load_text_table(BUILTIN_PYTHON_DOCS, min_chars=2000)
    assert table["text"][:] == [t for t in builtin_python_docs() if len(t) >= 2000]


def test_tables_go_to_the_icae_cache_unless_hf_datasets_cache_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_CACHE")
    monkeypatch.setenv("ICAE_CACHE_DIR", str(tmp_path / "icae"))
    assert tables_dir() == tmp_path / "icae" / "datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert tables_dir() == tmp_path / "hf"


def test_disabled_datasets_cache_reads_into_a_temporary_folder(tmp_path, monkeypatch):
    import datasets

    from icae.testing import byte_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    source = write_json(tmp_path / "t.json", ["one text", "another text"])
    datasets.disable_caching()
    try:
        table = load_text_table(source)
        tokens = tokenize_table(table, byte_tokenizer())
        assert tokens["num_tokens"][:] == [8, 12]
        assert not (tmp_path / "cache").exists()
        assert all(not f["filename"].startswith(str(tmp_path)) for f in table.cache_files + tokens.cache_files)
    finally:
        datasets.enable_caching()


TOKENIZE_AGAIN = """
import sys
from icae.data.tables import load_text_table
from icae.data.tokens import tokenize_table
from icae.testing import byte_tokenizer
tokens = tokenize_table(load_text_table(sys.argv[1]), byte_tokenizer(), 16, verbose=True)
print(tokens.cache_files[0]["filename"])
"""


def test_tokenizing_is_cached_by_fingerprint_across_processes(tmp_path, capsys, monkeypatch):
    import icae.data.tokens as tokens_module
    from icae.testing import byte_tokenizer

    tokenized = []  # how many texts were tokenized, in this process
    real = tokens_module._tokenize_batch
    monkeypatch.setattr(tokens_module, "_tokenize_batch",
                        lambda texts, **kw: tokenized.append(len(texts)) or real(texts, **kw))
    source = write_json(tmp_path / "t.json", [f"text number {i} " * 3 for i in range(50)])
    tokens = tokenize_table(load_text_table(source), byte_tokenizer(), 16, verbose=True)
    assert sum(tokenized) == 50 and "50 texts, tokenizing" in capsys.readouterr().err
    expected = byte_tokenizer()("text number 0 te", add_special_tokens=False)["input_ids"]
    assert tokens["input_ids"][0] == expected and set(tokens["num_tokens"][:]) == {16}
    (path,) = {f["filename"] for f in tokens.cache_files}
    stamp = os.stat(path).st_mtime_ns
    # the same table and tokenizer in another process (another rank, a rerun): the cache file, untouched
    proc = subprocess.run([sys.executable, "-c", TOKENIZE_AGAIN, source], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "50 texts, from the cache" in proc.stderr and proc.stdout.strip() == path
    assert os.stat(path).st_mtime_ns == stamp
    tokenize_table(load_text_table(source), byte_tokenizer(), 16)
    assert sum(tokenized) == 50, "a rerun in this process tokenizes nothing either"
    # another length is another result
    assert tokenize_table(load_text_table(source), byte_tokenizer(), 8)["num_tokens"][0] == 8 and sum(tokenized) == 100


def test_tokenizing_in_two_processes_gives_the_same_ids_and_is_cached_too(tmp_path, capsys, monkeypatch):
    """--preprocessing_num_workers 2: the batches are tokenized in two other processes, come back in order into
    one file, and a rerun maps it, tokenizing nothing."""
    import multiprocessing

    import icae.data.tables as tables_module
    import icae.data.tokens as tokens_module
    from icae.testing import byte_tokenizer

    monkeypatch.setattr(tables_module, "BATCH_ROWS", 7)  # several record batches in the file
    pids = tmp_path / "pids"
    real = tokens_module._tokenize_batch

    def recording(texts, **kw):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(texts, **kw)

    monkeypatch.setattr(tokens_module, "_tokenize_batch", recording)
    texts = [f"text number {i} " * (1 + i % 4) for i in range(2041)]
    source = write_json(tmp_path / "t.json", texts)
    tokens = tokenize_table(load_text_table(source), byte_tokenizer(), 24, num_proc=2, verbose=True)
    expected = [x[:24] for x in byte_tokenizer()(texts, add_special_tokens=False)["input_ids"]]
    assert tokens["input_ids"][:] == expected and "2,041 texts, tokenizing" in capsys.readouterr().err
    if multiprocessing.get_start_method() == "fork":  # a forked worker runs the recording function
        workers = set(pids.read_text().split())
        assert len(pids.read_text().split()) == 3 and str(os.getpid()) not in workers and len(workers) <= 2
    (file,) = [f["filename"] for f in tokens.cache_files]
    stamp = os.stat(file).st_mtime_ns
    again = tokenize_table(load_text_table(source), byte_tokenizer(), 24, num_proc=2, verbose=True)
    assert again["input_ids"][:] == expected and "2,041 texts, from the cache" in capsys.readouterr().err
    assert os.stat(file).st_mtime_ns == stamp


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_filtered_and_split_table_reads_its_rows_from_the_file_as_datasets_map_does(tmp_path, monkeypatch,
                                                                                      num_proc):
    """The texts a filtered (min_chars) and split table holds, read from the file in batches (across record
    batches of the file and of the output), give the ids of datasets' own `map` over the same table."""
    import icae.data.tables as tables_module
    from icae.data.texts import split_train_eval
    from icae.data.tokens import _tokenize_batch, _text_batches
    from icae.testing import byte_tokenizer

    monkeypatch.setattr(tables_module, "BATCH_ROWS", 13)
    texts = [("long text %d " % i) * (i % 5) for i in range(3000)]  # every fifth is blank: left out
    source = write_json(tmp_path / "t.json", texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = load_text_table(source, min_chars=1)
    assert len(table) == 2400
    file, rows = tables_module.texts_file(table)
    assert [t for batch in _text_batches(file, rows, size=100) for t in batch] == table["text"][:]
    train, evaluation = split_train_eval(table, 120)
    for part in (train, evaluation, train.select(range(500, 2100))):
        ours = tokenize_table(part, byte_tokenizer(), 9, num_proc=num_proc)
        theirs = part.map(_tokenize_batch, batched=True, input_columns="text", remove_columns=part.column_names,
                          fn_kwargs={"tokenizer": byte_tokenizer(), "max_length": 9}, keep_in_memory=True)
        assert len(ours) == len(part) and ours["input_ids"][:] == theirs["input_ids"][:]
        assert ours["num_tokens"][:] == theirs["num_tokens"][:]
    with pytest.raises(ValueError, match="increase"):
        next(_text_batches(file, rows[::-1]))


def test_other_tables_are_tokenized_with_datasets_map(tmp_path):
    """A table that is not a text table of ours (a list made into one, shuffled rows) takes `map`'s path."""
    from icae.data.tables import texts_file
    from icae.data.tokens import text_table
    from icae.testing import byte_tokenizer

    listed = text_table(["one text", "another text"])
    assert texts_file(listed) is None and tokenize_table(listed, byte_tokenizer())["num_tokens"][:] == [8, 12]
    source = write_json(tmp_path / "t.json", [f"text {i}" for i in range(20)])
    shuffled = load_text_table(source).shuffle(seed=0)
    ids = tokenize_table(shuffled, byte_tokenizer())["input_ids"][:]
    assert ids == byte_tokenizer()(shuffled["text"][:], add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the examples: old and new paths


def todays_examples(texts, tokenizer, cfg, seed, eval_size, examples_needed):
    """The list path as it was before the tables (load_texts -> lists of ids -> ExampleDataset / build_examples)."""
    import math

    from icae.core.examples import ExampleDataset, build_examples

    train_texts, eval_texts = texts[eval_size:], texts[:eval_size]
    keep = cfg.model_max_length if cfg.text_window == "start" else None
    ids = lambda ts, n: [x[:n] if n else x for x in tokenizer(ts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    train_ids = [x for x in ids(train_texts, keep) if x]
    eval_ids = [x for x in ids(eval_texts, cfg.model_max_length) if x]
    visits = max(1, math.ceil(examples_needed / len(train_ids))) if cfg.text_window == "random" else 1
    train = ExampleDataset(train_ids, cfg, tokenizer.eos_token_id, seed, visits)
    return [train[i] for i in range(len(train))], build_examples(eval_ids, cfg, tokenizer.eos_token_id, seed, True)


# sha256 (first 16 hex digits) of json.dumps(examples, sort_keys=True) for the corpus of the test below, as
# main's in-memory path made them before the tables (commit 34263b5: load_splits -> tokenize_texts lists ->
# build_datasets), run from that commit's tree: (train examples, eval examples) per --text_window.
MAIN_BEFORE_TABLES = {"start": ("feacbd87427a9598", "55a5e86f33d51697"),
                      "random": ("f12da0f0a6bfc1d2", "55a5e86f33d51697")}


def digest(examples) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("window", ["start", "random"])
def test_table_examples_are_todays_examples(tmp_path, window):
    from icae.core.examples import ExampleConfig
    from icae.recipes.pretrain import DataArguments, build_datasets, load_splits
    from icae.testing import byte_tokenizer

    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    corpus = [" ".join(words[(i * j) % 8] for j in range(5 + 7 * i)) for i in range(40)]
    corpus[5], corpus[17] = "  ", "x"  # a blank text and one under min_chars: skipped by both
    source = write_json(tmp_path / "corpus.json", [{"text": t} for t in corpus])
    cfg = ExampleConfig(model_max_length=48, lm_ratio=0.5, min_tokens_for_lm=8, leave_tokens_for_lm=2,
                        add_special_token_for_lm=True, text_window=window).validate()
    tokenizer = byte_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = load_texts(source, min_chars=2)
        tables = load_splits(DataArguments(train_file=source, eval_size=6, min_chars=2), as_tables=True)
    train, evaluation = build_datasets(*tables, tokenizer, cfg, seed=13, examples_needed=100)
    old_train, old_eval = todays_examples(kept, tokenizer, cfg, 13, 6, examples_needed=100)
    assert len(train) == len(old_train) == (32 if window == "start" else 128)
    assert [train[i] for i in range(len(train))] == old_train
    assert [evaluation[i] for i in range(len(evaluation))] == old_eval and len(old_eval) == 6
    assert (digest(old_train), digest(old_eval)) == MAIN_BEFORE_TABLES[window]  # the old code's own output
    assert {e["task"] for e in old_train} == {"ae", "lm"}


def test_tokenizer_fingerprint_ignores_what_a_call_leaves_behind():
    from icae.data.tokens import tokenizer_fingerprint
    from icae.testing import byte_tokenizer

    tokenizer = byte_tokenizer()
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["some text"] * 2, truncation=True, max_length=4, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == before == tokenizer_fingerprint(byte_tokenizer())
    tokenizer.add_tokens(["<new>"])
    assert tokenizer_fingerprint(tokenizer) != before
