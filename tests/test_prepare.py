"""`icae prepare`: the seed's files from local texts and from a (faked) streamed hub dataset."""

import json

import pytest

import icae.recipes.prepare as prep
from icae.errors import UserError


def test_local_source_writes_the_seed_files_and_skips_on_rerun(tmp_path):
    texts = [f"document {i} " + "x" * (i * 10) for i in range(30)]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(texts))
    out = tmp_path / "out"
    counts = prep.prepare(str(src), out, min_chars=100, eval_size=5, max_chars=50)
    kept = [t for t in texts if len(t) >= 100]
    assert json.loads((out / "long_text.json").read_text()) == kept
    assert json.loads((out / "eval_data.json").read_text()) == [{"text": t[:50]} for t in kept[:5]]
    assert json.loads((out / "train_data.json").read_text()) == [{"text": t[:50]} for t in kept[5:]]
    assert counts == {"eval_data.json": 5, "train_data.json": len(kept) - 5}
    assert not (out / "tiny_train_data.json").exists()  # fewer than 25,600 texts
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prep.prepare(str(src), out, min_chars=100, eval_size=5, max_chars=50)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}, "finished work is not redone"


def test_mini_and_tiny_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "MINI", 20)
    monkeypatch.setattr(prep, "TINY", 8)
    src = tmp_path / "src.json"
    src.write_text(json.dumps([f"text {i}" for i in range(40)]))
    counts = prep.prepare(str(src), tmp_path / "o", min_chars=1, eval_size=10)
    train = json.loads((tmp_path / "o" / "train_data.json").read_text())
    assert counts["mini_train_data.json"] == 20 and counts["tiny_train_data.json"] == 8
    assert json.loads((tmp_path / "o" / "tiny_train_data.json").read_text()) == train[-8:]


def test_streamed_hub_dataset_filters_and_stops(tmp_path, monkeypatch):
    rows = [{"text": "a" * n, "meta": {}} for n in (10, 5000, 4096, 4095, 9000, 7000)]
    calls = {}

    def fake_load_dataset(name, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return iter(rows)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prep.prepare("DKYoon/SlimPajama-6B", tmp_path, max_docs=3, eval_size=1)
    assert calls == {"name": "DKYoon/SlimPajama-6B", "split": "train", "streaming": True}
    assert [len(t) for t in json.loads((tmp_path / "long_text.json").read_text())] == [5000, 4096, 9000]
    assert [len(r["text"]) for r in json.loads((tmp_path / "train_data.json").read_text())] == [4096, 4096]


def test_too_few_texts_is_a_clear_error(tmp_path):
    src = tmp_path / "src.json"
    src.write_text(json.dumps(["short", "tiny"]))
    with pytest.raises(UserError, match="eval_size"):
        prep.prepare(str(src), tmp_path / "o", min_chars=1, eval_size=5)


def test_builtin_corpus_source(tmp_path):
    counts = prep.prepare("builtin:python-docs", tmp_path, min_chars=2000, eval_size=10)
    assert counts["eval_data.json"] == 10 and counts["train_data.json"] > 50


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_other_formats_hold_the_same_rows_and_sizes_are_reported(tmp_path, fmt, capsys):
    from icae.data.texts import load_texts

    texts = [f"document {i} " + "é" * (i * 10) for i in range(30)]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(texts))
    prep.main(["--source", str(src), "--output_dir", str(tmp_path / "json"), "--min_chars", "100", "--eval_size", "5",
               "--max_chars", "50"])
    assert prep.main(["--source", str(src), "--output_dir", str(tmp_path / fmt), "--min_chars", "100",
                      "--eval_size", "5", "--max_chars", "50", "--format", fmt]) == 0
    printed = capsys.readouterr().out
    for name in ("long_text", "eval_data", "train_data"):
        assert load_texts(str(tmp_path / fmt / f"{name}.{fmt}")) == load_texts(str(tmp_path / "json" / f"{name}.json"))
    assert json.loads((tmp_path / "json" / "long_text.json").read_text()) == [t for t in texts if len(t) >= 100]
    size = (tmp_path / fmt / f"train_data.{fmt}").stat().st_size / 2**20
    assert f"train_data.{fmt}: 16 texts, {size:,.1f} MiB" in printed and f"long_text.{fmt}: " in printed


def test_a_failed_source_leaves_no_file(tmp_path, monkeypatch):
    import datasets

    def broken(name, split, streaming):
        yield {"text": "a" * 5000}
        raise UserError("cannot stream dataset: connection lost")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(UserError, match="connection lost"):
        prep.prepare("someone/corpus", tmp_path, eval_size=0)
    assert list(tmp_path.iterdir()) == []
