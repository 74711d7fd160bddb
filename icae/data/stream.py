"""`--streaming True`: training examples read, tokenized and made as the Trainer asks for them, from local
files or a hub dataset, with nothing written to disk: for corpora that do not fit on it.

The stream is a `datasets.IterableDataset` of `num_shards` interleaved shards: shard k holds the texts
whose position i (among the kept texts, the eval texts first) has i % num_shards == k. The Trainer
(accelerate) gives each rank its own shards (`IterableDataset.shard`), so ranks get disjoint texts that
together cover the corpus; each rank reads the whole source (cheap: parsing), but tokenizes only its
own texts. Position i is global, so an example depends on (seed, i) as in the table path: on one rank
the stream gives the same examples as `ExampleDataset`, in file order, unless texts have no tokens.
A hub dataset is read through `datasets.load_dataset(..., streaming=True)` by every rank.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

from icae.core.examples import ExampleConfig, example_rng, pretrain_example
from icae.data.texts import is_kept, iter_texts
from icae.errors import UserError

STREAM_EVAL_SIZE = 1000  # the seed's eval split; a stream's length is unknown, so 5% cannot be taken


def is_hub_dataset(source: str) -> bool:
    """Not a local path nor the built-in corpus: a dataset name for `datasets.load_dataset`. A name that looks
    like a file (`x.jsonl`, `./x`, `a/b/c`: a file extension, or a path no hub id has) is a local path, missing
    or not: "no such file" at once, not a hub lookup with network retries."""
    if source.startswith("builtin:") or Path(source).expanduser().exists():
        return False
    looks_like_path = (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
                       or re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", Path(source).suffix) is not None)
    return not looks_like_path


def _hub_texts(name: str, split: str, column: str) -> Iterator[str]:
    from datasets import load_dataset

    try:
        rows = load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, unknown dataset, ...: one line, not a traceback
        raise UserError(f"cannot stream dataset {name!r} (split {split!r}): {err}".splitlines()[0]) from None
    for row in rows:
        text = row.get(column)
        if text is None:
            raise UserError(f"dataset {name!r} has no column {column!r}; pass one of {list(row)}")
        yield text


def kept_texts(source: str, min_chars: int = 0, split: str = "train", column: str = "text") -> Iterator[str]:
    """The texts of a local source or hub dataset, in order, blank ones and those under `min_chars` left out."""
    texts = _hub_texts(source, split, column) if is_hub_dataset(source) else iter_texts(source)
    return (t for t in texts if is_kept(t, min_chars))


def _rows(shards: list[int], source: str, min_chars: int, split: str, column: str, num_shards: int,
          start: int, stop: int | None):
    keep = set(shards)
    for i, text in enumerate(itertools.islice(kept_texts(source, min_chars, split, column), start, stop)):
        if i % num_shards in keep:
            yield {"text": text, "index": i}


def _examples(batch: dict, tokenizer, max_length: int | None, cfg: ExampleConfig, eos_id: int, seed: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    examples = [pretrain_example(x[:max_length] if max_length else x, cfg, eos_id, example_rng(seed, i))
                for x, i in zip(ids, batch["index"]) if x]
    keys = ("input_ids", "task", "special", "target_ids", "target_labels")
    return {k: [e[k] for e in examples] for k in keys}


def stream_examples(source: str, tokenizer, cfg: ExampleConfig, seed: int, *, min_chars: int = 0,
                    start: int = 0, stop: int | None = None, num_shards: int = 1, split: str = "train",
                    column: str = "text"):
    """Training examples of the kept texts start..stop of `source` (index i counted from `start`), as a
    `datasets.IterableDataset` of `num_shards` shards; tokenized in batches of 64 as they are read."""
    from datasets import IterableDataset

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which the AE target needs; use a model whose tokenizer "
                        "has one")
    rows = IterableDataset.from_generator(_rows, gen_kwargs={
        "shards": list(range(num_shards)), "source": source, "min_chars": min_chars, "split": split,
        "column": column, "num_shards": num_shards, "start": start, "stop": stop,
    })
    keep = cfg.model_max_length if cfg.text_window == "start" else None
    return rows.map(_examples, batched=True, batch_size=64, remove_columns=["text", "index"], fn_kwargs={
        "tokenizer": tokenizer, "max_length": keep, "cfg": cfg, "eos_id": tokenizer.eos_token_id, "seed": seed,
    })
