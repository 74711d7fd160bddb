"""`--streaming True`: examples read, tokenized and made while training, split across ranks."""

import json
import shlex
import subprocess
import sys

import pytest

from icae.core.examples import ExampleConfig
from icae.data.stream import stream_examples
from icae.errors import UserError
from icae.testing import byte_tokenizer

CFG = ExampleConfig(model_max_length=40, lm_ratio=0.5, min_tokens_for_lm=8, leave_tokens_for_lm=2).validate()
TEXTS = [f"text {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(41)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def table_examples(source, eval_size, seed=3):
    from icae.recipes.pretrain import DataArguments, build_datasets, load_splits

    tables = load_splits(DataArguments(train_file=source, eval_size=eval_size), as_tables=True)
    train, _ = build_datasets(*tables, byte_tokenizer(), CFG, seed)
    return [train[i] for i in range(len(train))]


def test_one_stream_gives_the_table_examples_in_file_order(corpus):
    streamed = list(stream_examples(corpus, byte_tokenizer(), CFG, seed=3, start=5))
    assert streamed == table_examples(corpus, eval_size=5)
    assert {e["task"] for e in streamed} == {"ae", "lm"}
    assert list(stream_examples(corpus, byte_tokenizer(), CFG, seed=3, start=5, stop=9)) == streamed[:4]


def test_two_ranks_get_disjoint_examples_that_cover_the_stream(corpus):
    """What the Trainer does under torchrun: accelerate shards the stream for each rank (no dispatching)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    stream = stream_examples(corpus, byte_tokenizer(), CFG, seed=3, start=5, num_shards=2)
    ranks = []
    for rank in range(2):
        loader = prepare_data_loader(DataLoader(stream, batch_size=3, collate_fn=list), num_processes=2,
                                     process_index=rank, put_on_device=False, dispatch_batches=False)
        ranks.append([json.dumps(e) for batch in loader for e in batch])
    whole = [json.dumps(e) for e in table_examples(corpus, eval_size=5)]
    assert len(ranks[0]) == len(ranks[1]) == 18
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(whole)


def test_a_hub_dataset_is_streamed(corpus, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": t, "meta": 1} for t in TEXTS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    streamed = list(stream_examples("someone/corpus", byte_tokenizer(), CFG, seed=3, start=5))
    assert streamed == list(stream_examples(corpus, byte_tokenizer(), CFG, seed=3, start=5))
    assert calls == [("someone/corpus", "train", True)]
    with pytest.raises(UserError, match=r"'someone/corpus' has no column 'body'; pass one of \['text', 'meta'\]"):
        list(stream_examples("someone/corpus", byte_tokenizer(), CFG, seed=3, column="body"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from icae.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("stream-model") / "tiny")


def flags(corpus, model, out):
    return (f"--output_dir {out} --model_name_or_path {model} --train_file {corpus} --eval_size 5 --lora_r 4 "
            "--fixed_mem_size 4 --model_max_length 40 --lm_ratio 0.5 --min_tokens_for_lm 8 --report_to none "
            "--save_strategy no --logging_steps 1 --per_device_train_batch_size 2 --streaming True")


def test_pretrain_streams(corpus, model_dir, tmp_path, capsys):
    from icae.recipes.pretrain import main as pretrain

    with pytest.raises(UserError, match=r"--streaming True needs --max_steps"):
        pretrain(shlex.split(flags(corpus, model_dir, tmp_path / "never")))
    out = tmp_path / "run"
    argv = shlex.split(flags(corpus, model_dir, out) + " --max_steps 3 --eval_strategy steps --eval_steps 3")
    assert pretrain(argv) == 0
    assert "train examples: streamed | eval examples (AE): 5" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and any("eval_loss" in r for r in records)


def test_pretrain_streams_under_torchrun(corpus, model_dir, tmp_path):
    """Two ranks read their own shards (each a batch of its own padding: batches are not dispatched)."""
    out = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "icae", "pretrain"]
    proc = subprocess.run(torchrun + shlex.split(flags(corpus, model_dir, out) + " --max_steps 2 --eval_strategy no"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 2
