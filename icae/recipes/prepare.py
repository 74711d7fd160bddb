"""`icae prepare`: the seed's data files, from a streamed Hugging Face dataset or local files.

1. `long_text.json`: a JSON list of documents of at least `--min_chars` characters (the seed's
   helper streams `DKYoon/SlimPajama-6B`, split `train`, column `text`).
2. `eval_data.json` (the first `--eval_size` texts) and `train_data.json` (the rest), each text
   cut to its first `--max_chars` characters, as lists of `{"text": ...}`; plus
   `mini_train_data.json` (last 256,000) and `tiny_train_data.json` (last 25,600) when there
   are that many. A file that exists already is not rebuilt (delete it, or pass `--force`).

`--format jsonl` or `--format parquet` writes the same rows as `.jsonl` / `.parquet` files, which are
read a line or a row group at a time instead of as one multi-GB JSON array. Texts stream through:
documents are written as they arrive, and the splits in one pass over `long_text`, so memory does
not grow with the corpus.

`--dataset pwc` does the same for ICAE v2's fine-tuning data, PwC (prompt-with-context, the hub's
`sggetao/PwC`, or a local .json/.jsonl/.parquet file of {input, prompt, answer} records):
`pwc_records.json` (every record), then `pwc_eval.json` (the first `--eval_size`) and `pwc_train.json`
(the rest), the files `icae finetune --train_file / --eval_file` read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from icae.errors import UserError, check_output_path

MINI, TINY = 256_000, 25_600
FORMATS = ("json", "jsonl", "parquet")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # the output folder, once there is something to write
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    tmp.replace(path)  # atomic: a killed run never leaves half a file that a re-run would skip


class RowWriter:
    """One data file in `fmt`, written to a temporary name and renamed when complete: a killed run never
    leaves half a file that a rerun would skip. `objects`: JSON rows are {"text": ...}, not bare strings."""

    def __init__(self, path: Path, fmt: str, objects: bool = True):
        self.path, self.fmt, self.objects, self.rows = path, fmt, objects or fmt == "jsonl", 0
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = None  # opened at the first row: a source that fails before it leaves no folder or file
        self.batch: list[str] = []
        self.parquet = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt != "parquet" and self.file is None:
            self.file = self.tmp.open("w", encoding="utf-8")
            if self.fmt == "json":
                self.file.write("[")

    def write(self, text: str) -> None:
        self._open()
        if self.fmt == "parquet":
            self.batch.append(text)
            if len(self.batch) == 10_000:
                self._flush()
        else:
            item = json.dumps({"text": text} if self.objects else text, ensure_ascii=False)
            self.file.write(("\n" if self.fmt == "jsonl" else ", ") * bool(self.rows) + item)
        self.rows += 1

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": pa.array(self.batch, pa.string())})
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.tmp, table.schema)
        self.parquet.write_table(table)
        self.batch.clear()

    def close(self) -> None:
        self._open()
        if self.fmt == "parquet":
            if self.batch or self.parquet is None:
                self._flush()
            self.parquet.close()
        else:
            self.file.write("]" if self.fmt == "json" else "\n" * bool(self.rows))
            self.file.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.parquet is not None:
            self.parquet.close()
        self.tmp.unlink(missing_ok=True)


def _write_long_texts(path: Path, fmt: str, source: str, split: str, column: str, min_chars: int,
                      max_docs: int | None) -> int:
    from tqdm.auto import tqdm

    from icae.data.stream import kept_texts

    writer = RowWriter(path, fmt, objects=False)
    try:
        texts = itertools.islice(kept_texts(source, min_chars, split, column), max_docs)
        for text in tqdm(texts, desc=f"documents of {source}", unit=" docs", total=max_docs, mininterval=2):
            writer.write(text)
        if not writer.rows:
            raise UserError(f"no document of {source} has at least {min_chars} characters; lower --min_chars")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.rows


def _count(path: Path) -> int:
    from icae.data.texts import iter_texts

    return sum(1 for _ in iter_texts(str(path)))


def prepare(source: str, output_dir: str | Path, split: str = "train", column: str = "text", min_chars: int = 4096,
            max_docs: int | None = None, eval_size: int = 1000, max_chars: int = 4096, force: bool = False,
            fmt: str = "json") -> dict:
    """Write the files; return {file name: number of texts}."""
    from icae.data.texts import iter_texts

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(output_dir)
    long_path = out / f"long_text.{fmt}"
    if long_path.is_file() and not force:
        n = _count(long_path)
        print(f"{long_path} exists ({n:,} texts): not rebuilt")
    else:
        n = _write_long_texts(long_path, fmt, source, split, column, min_chars, max_docs)
    if n <= eval_size:
        raise UserError(f"{n} texts leave none for training after --eval_size {eval_size}; lower it")
    spans = {"eval_data": (0, eval_size), "train_data": (eval_size, n)}
    if n - eval_size >= MINI:
        spans["mini_train_data"] = (n - MINI, n)
    if n - eval_size >= TINY:
        spans["tiny_train_data"] = (n - TINY, n)
    writers = {}
    for name, (start, stop) in spans.items():
        path = out / f"{name}.{fmt}"
        if path.is_file() and not force and path.stat().st_mtime >= long_path.stat().st_mtime:
            print(f"{path} exists: not rebuilt")
        else:
            writers[name] = RowWriter(path, fmt)
    if writers:
        try:
            for i, text in enumerate(iter_texts(str(long_path))):
                for name, writer in writers.items():
                    if spans[name][0] <= i < spans[name][1]:
                        writer.write(text[:max_chars])
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for writer in writers.values():
            writer.close()
    return {f"{name}.{fmt}": stop - start for name, (start, stop) in spans.items()}


PWC_HUB = "sggetao/PwC"


def stream_hub_records(name: str, split: str, max_docs: int | None) -> list[dict]:
    """{input, prompt, answer} rows of a streamed hub dataset; rows with an empty context or answer are
    skipped and counted (they are the hub's, not the user's to fix), a missing column is an error."""
    from datasets import load_dataset
    from tqdm.auto import tqdm

    from icae.data.qa import FIELDS

    try:
        stream = load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, unknown dataset, ...: one line, not a traceback
        raise UserError(f"cannot stream dataset {name!r} (split {split!r}): {err}".splitlines()[0]) from None
    kept, skipped = [], 0
    with tqdm(desc=f"streaming {name}", unit=" records", total=max_docs) as bar:
        for row in stream:
            missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
            if missing:
                raise UserError(f"dataset {name!r} has no {missing[0]!r} string column (it has {list(row)}); "
                                "PwC-format data needs input, prompt and answer")
            if not row["input"].strip() or not row["answer"].strip():
                skipped += 1
                continue
            kept.append({f: row[f] for f in FIELDS})
            bar.update(1)
            if max_docs and len(kept) >= max_docs:
                break
    if skipped:
        print(f"note: skipped {skipped} records of {name} with an empty input or answer", file=sys.stderr)
    return kept


def prepare_pwc(source: str, output_dir: str | Path, split: str = "train", max_docs: int | None = None,
                eval_size: int = 1000, force: bool = False) -> dict:
    """`pwc_records.json`, then `pwc_eval.json` (first `eval_size` records) and `pwc_train.json` (the rest)."""
    from icae.data.qa import load_qa
    from icae.data.stream import is_hub_dataset

    out = Path(output_dir)
    all_path = out / "pwc_records.json"
    if all_path.is_file() and not force:
        records = json.loads(all_path.read_text())
        print(f"{all_path} exists ({len(records):,} records): not rebuilt")
    else:
        if not is_hub_dataset(source):
            records = load_qa(source)[: max_docs or None]
        else:
            records = stream_hub_records(source, split, max_docs)
        if not records:
            raise UserError(f"{source} has no usable {{input, prompt, answer}} record")
        _write_json(all_path, records)
    if len(records) <= eval_size:
        raise UserError(f"{len(records)} records leave none for training after --eval_size {eval_size}; lower it")
    files = {"pwc_eval.json": records[:eval_size], "pwc_train.json": records[eval_size:]}
    counts = {}
    for name, rows in files.items():
        path = out / name
        if path.is_file() and not force and path.stat().st_mtime >= all_path.stat().st_mtime:
            print(f"{path} exists: not rebuilt")
        else:
            _write_json(path, rows)
        counts[name] = len(rows)
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("slimpajama", "pwc"), default="slimpajama",
                        help="slimpajama: pretraining texts (default); pwc: fine-tuning records {input, prompt, answer}")
    parser.add_argument("--source", default=None,
                        help="a hub dataset (streamed), builtin:python-docs, or a .json/.jsonl/.parquet/.txt file or "
                             f"folder (default: DKYoon/SlimPajama-6B, or {PWC_HUB} for --dataset pwc)")
    parser.add_argument("--output_dir", default="data")
    parser.add_argument("--split", default="train")
    parser.add_argument("--column", default="text", help="the text column (slimpajama only)")
    parser.add_argument("--min_chars", type=int, default=4096, help="keep documents at least this long (slimpajama only)")
    parser.add_argument("--max_docs", type=int, default=None, help="stop after this many kept documents (records)")
    parser.add_argument("--eval_size", type=int, default=1000)
    parser.add_argument("--max_chars", type=int, default=4096, help="cut each text to this many characters (slimpajama only)")
    parser.add_argument("--format", default="json", choices=FORMATS,
                        help="json: the seed's JSON lists; jsonl or parquet: read without parsing one big array "
                             "(slimpajama only)")
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args(argv)
    if args.eval_size < 0 or args.max_chars < 1 or args.min_chars < 0:
        raise UserError("--eval_size and --min_chars must not be negative, --max_chars must be positive")
    if args.max_docs is not None and args.max_docs < 1:
        raise UserError(f"--max_docs must be at least 1 (got {args.max_docs})")
    check_output_path(args.output_dir, "--output_dir", folder=True)
    if args.dataset == "pwc":
        counts = prepare_pwc(args.source or PWC_HUB, args.output_dir, args.split, args.max_docs, args.eval_size,
                             args.force)
        for name, n in counts.items():
            print(f"{Path(args.output_dir) / name}: {n:,} records")
        return 0
    counts = prepare(args.source or "DKYoon/SlimPajama-6B", args.output_dir, args.split, args.column, args.min_chars,
                     args.max_docs, args.eval_size, args.max_chars, args.force, args.format)
    for name in [f"long_text.{args.format}", *counts]:
        path = Path(args.output_dir) / name
        count = f"{counts[name]:,} texts, " if name in counts else ""
        print(f"{path}: {count}{path.stat().st_size / 2**20:,.1f} MiB")
    return 0
