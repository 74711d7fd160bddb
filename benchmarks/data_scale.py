#!/usr/bin/env python
"""Benchmark the data path of `icae pretrain` against corpus size: peak memory and time to the first batch.

    python benchmarks/data_scale.py                                  # 10k/40k/160k texts, old and new, 2 ranks at 40k
    python benchmarks/data_scale.py --sizes 10000 --old-max 0 --torchrun 0   # the new path at 10k only
    python benchmarks/data_scale.py --smoke --output /tmp/s.json     # 200 texts, the byte tokenizer (tests)

No model. Each run is a fresh process that reads a JSON list of synthetic 4,096-character texts (the
seed's `train_data.json` format; windows of the built-in corpus), splits off the eval texts (5%, at most
1,000), tokenizes (SmolLM2-135M's tokenizer, model_max_length 512, the seed's cut), builds the example
datasets and takes one batch (8 examples, collated for m = 128, rate 4) out of a shuffling DataLoader:
what `icae pretrain` does before its first step. Measured in that process:

- time from the start of the process to the first batch (imports, tokenizer, data, batch), and its parts;
- peak RSS: VmHWM, the resident high-water mark, which counts the pages of memory-mapped files the
  process touched (page cache, shared between processes and reclaimable) as well as its own memory;
- peak private memory: the largest RssAnon seen by a thread sampling /proc/self/status every 20 ms;
- how many texts this process tokenized (0: it read the token ids from a cache).

"old" is the implementation before the Arrow tables (commit OLD_REF, extracted with `git archive`):
texts in a Python list, token ids in lists cached as one JSON file. "new" is this tree. A cold run
starts with empty caches, the warm run after it reuses them. `--torchrun N` runs the new path in 2
processes (torchrun, gloo) on N texts, cold then warm: rank 0 tokenizes, rank 1 waits and maps the
result (`main_process_first`). Workers run with OMP_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false
(one core each), and tokenizing uses one process (num_proc 1).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OLD_REF = "a9b76b8"  # main before the Arrow tables
SCHEMA = "icae-data-scale-benchmark/1"
MARK = "DATA_RESULT "
TEXT_CHARS = 4096


# ----------------------------------------------------------------------------- the worker (one run)


def _status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


class PeakSampler(threading.Thread):
    """The largest RssAnon (private memory) seen, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon, self.done = 0.0, threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            self.peak_anon = max(self.peak_anon, _status()["RssAnon"])

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak_anon, _status()["RssAnon"])


def worker(args) -> None:
    sampler = PeakSampler()
    sampler.start()
    phases = {}
    mark = time.perf_counter()

    def phase(name):
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 2)
        mark = now

    import inspect

    import torch
    from transformers import AutoTokenizer

    from icae.core.collate import Collator
    from icae.core.examples import ExampleConfig
    from icae.recipes.pretrain import DataArguments, PretrainArguments, build_datasets, load_splits

    after_imports = _status()["VmRSS"]
    phase("imports")

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenized = [0]  # texts this process tokenized
    call = type(tokenizer).__call__

    def counting_call(self, text=None, *a, **kw):
        tokenized[0] += len(text) if isinstance(text, list) else 1
        return call(self, text, *a, **kw)

    type(tokenizer).__call__ = counting_call
    train_args = PretrainArguments(output_dir=str(Path(args.cache) / "out"), report_to="none")
    cfg = ExampleConfig(model_max_length=512, lm_ratio=0.5, min_tokens_for_lm=64, leave_tokens_for_lm=8).validate()
    phase("tokenizer")

    data_args = DataArguments(train_file=args.file)
    new = "main_process_first" in inspect.signature(build_datasets).parameters
    if new:
        with train_args.main_process_first(desc="reading the texts"):
            train_texts, eval_texts = load_splits(data_args, as_tables=True)
        phase("texts")
        train, evaluation = build_datasets(train_texts, eval_texts, tokenizer, cfg, seed=42, num_proc=1,
                                           main_process_first=train_args.main_process_first)
    else:
        train_texts, eval_texts = load_splits(data_args)
        phase("texts")
        train, evaluation = build_datasets(train_texts, eval_texts, tokenizer, cfg, seed=42)
    phase("tokens")

    collate = Collator("default", 128, 4, len(tokenizer))
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate)
    batch = next(iter(loader))
    assert len(batch["num_segments"]) == 8
    phase("first_batch")

    peak_anon = sampler.stop()
    status = _status()
    result = {
        "path": "new" if new else "old", "n_texts": args.texts, "cache": args.cache_state,
        "rank": train_args.process_index, "world": train_args.world_size,
        "seconds_to_first_batch": round(time.perf_counter() - START, 2), "phases": phases,
        "peak_rss_mib": round(status["VmHWM"], 1), "peak_private_mib": round(peak_anon, 1),
        "rss_after_imports_mib": round(after_imports, 1), "rss_file_end_mib": round(status["RssFile"], 1),
        "texts_tokenized": tokenized[0], "train_examples": len(train), "eval_examples": len(evaluation),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the parent (plan, corpus, report)


def write_corpus(path: Path, n: int) -> None:
    """n texts of 4,096 characters: windows of the built-in corpus at spread-out offsets, as [{"text": ...}]."""
    if path.is_file():
        return
    sys.path.insert(0, str(REPO))
    from icae.data.texts import builtin_python_docs

    whole = "\n\n".join(builtin_python_docs())
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            start = (i * 104_729) % (len(whole) - TEXT_CHARS)
            f.write((", " if i else "") + json.dumps({"text": whole[start : start + TEXT_CHARS]}, ensure_ascii=False))
        f.write("]")
    tmp.replace(path)


def old_source(work: Path) -> Path:
    """The package as it was at OLD_REF, for the old path."""
    dest = work / f"old-src-{OLD_REF}"
    if not (dest / "icae").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_REF, "icae"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run(args, path: str, n: int, corpus: Path, cache: Path, state: str, procs: int, tokenizer: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "ICAE_CACHE_DIR": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets"),
           "PYTHONPATH": str(old_source(Path(args.work)) if path == "old" else REPO)}
    worker_args = [str(Path(__file__).resolve()), "--worker", "--file", str(corpus), "--texts", str(n), "--cache",
                   str(cache), "--cache-state", state, "--tokenizer", tokenizer]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *worker_args]
    else:
        cmd = [sys.executable, *worker_args]
    began = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    results = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or len(results) != procs:
        raise RuntimeError(f"{path} {n} {state} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    for r in results:
        r["wall_seconds"] = round(time.time() - began, 1)
    return sorted(results, key=lambda r: r["rank"])


def plan(args) -> list[tuple[str, int, int]]:
    """(path, texts, processes), each run cold then warm; the largest corpus last (it takes longest)."""
    runs = []
    for n in sorted(args.sizes):
        if n <= args.old_max:
            runs.append(("old", n, 1))
        runs.append(("new", n, 1))
    largest = [r for r in runs if r[1] == max(args.sizes)]
    two = [("new", args.torchrun, 2)] if args.torchrun else []
    return [r for r in runs if r not in largest] + two + largest


def table(results: list[dict]) -> str:
    head = ("| texts | path | procs | cache | rank | first batch (s) | imports (s) | data (s) | tokenized here "
            "| peak RSS (MiB) | peak private (MiB) | RSS after imports (MiB) |")
    lines = [head, "|" + "---|" * 12]
    order = lambda r: (r["n_texts"], r["world"], r["path"] != "old", r["cache"] != "cold", r["rank"])  # noqa: E731
    for r in sorted(results, key=order):
        data = sum(v for k, v in r["phases"].items() if k in ("texts", "tokens", "first_batch"))
        lines.append(
            f"| {r['n_texts']:,} | {r['path']} | {r['world']} | {r['cache']} | {r['rank']} "
            f"| {r['seconds_to_first_batch']:.1f} | {r['phases']['imports']:.1f} | {data:.1f} "
            f"| {r['texts_tokenized']:,} | {r['peak_rss_mib']:,.0f} | {r['peak_private_mib']:,.0f} "
            f"| {r['rss_after_imports_mib']:,.0f} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import datasets
    import transformers

    load = os.getloadavg()
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load],
            "datasets": datasets.__version__, "transformers": transformers.__version__,
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,40000,160000", help="corpus sizes, in texts")
    p.add_argument("--old-max", type=int, default=40_000, help="run the old path up to this size (0: never)")
    p.add_argument("--torchrun", type=int, default=40_000, help="texts for the 2-process run (0: none)")
    p.add_argument("--work", default="/tmp/icae-data-scale", help="corpus files and caches")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2-135M's)")
    p.add_argument("--output", default=str(HERE / "results" / "data_scale-cpu.json"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="200 texts, the byte tokenizer, new path only")
    p.add_argument("--resume", action="store_true", help="keep the runs already in OUTPUT.partial.jsonl")
    p.add_argument("--note", default=None, help="a remark stored in the report (what was left out, and why)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--texts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--cache-state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if args.smoke:
        args.sizes, args.old_max, args.torchrun = [200], 0, 0
        sys.path.insert(0, str(REPO))
        from icae.testing import byte_tokenizer

        tokenizer = str(work / "byte-tokenizer")
        byte_tokenizer().save_pretrained(tokenizer)
    elif tokenizer is None:
        sys.path.insert(0, str(REPO))
        from icae.core.base_model import resolve_model

        tokenizer = str(resolve_model("smollm2-135m"))
    report = {"schema": SCHEMA, "environment": environment(), "argv": ["benchmarks/data_scale.py", *sys.argv[1:]],
              "results": [], **({"note": args.note} if args.note else {})}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")  # raw results as they come, for a long invocation
    done = [json.loads(line) for line in partial.read_text().splitlines()] if args.resume and partial.is_file() else []
    partial.write_text("".join(json.dumps(r) + "\n" for r in done))
    for path, n, procs in plan(args):
        kept = [r for r in done if (r["path"], r["n_texts"], r["world"]) == (path, n, procs)]
        if len(kept) == 2 * procs:  # cold and warm, every rank: measured by the invocation resumed
            report["results"] += kept
            continue
        corpus = work / f"texts-{n}.json"
        write_corpus(corpus, n)
        cache = work / f"cache-{path}-{n}-{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            print(f"{path} path, {n:,} texts, {procs} process(es), {state} cache ...", file=sys.stderr, flush=True)
            for r in run(args, path, n, corpus, cache, state, procs, tokenizer):
                report["results"].append(r)
                with partial.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"  rank {r['rank']}: first batch after {r['seconds_to_first_batch']:.1f} s, peak RSS "
                      f"{r['peak_rss_mib']:,.0f} MiB (private {r['peak_private_mib']:,.0f}), tokenized "
                      f"{r['texts_tokenized']:,}", file=sys.stderr, flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["environment"]["results_kept_by_resume"] = len(done)
    out.write_text(json.dumps(report, indent=2) + "\n")
    partial.unlink()
    out.with_suffix(".md").write_text(table(report["results"]) + "\n")
    print(table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
