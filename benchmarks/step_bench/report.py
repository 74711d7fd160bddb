"""The report: per-configuration summary, ratios ours / reference-cost, and the markdown tables.

`write_report` re-derives everything from the raw runs (with the current FLOP formula), so that
`train_step.py --render X.json` rebuilds an earlier run's summary and table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from step_bench.flops import Shape, step_flops
from step_bench.plan import RunConfig, ratio_partners, targets


def best_peaks(probes: list[dict]) -> dict:
    """Per dtype, the best wall-clock and the best per-CPU-second rate of all the matmul probes of the
    invocation (before and after the runs, and each run's own): a shared machine only ever slows down."""
    out = {}
    for p in probes:
        best = out.setdefault(p["dtype"], {"flops_per_s": 0.0, "flops_per_cpu_s": 0.0, "probes": 0})
        best["probes"] += 1
        if p["flops_per_s"] > best["flops_per_s"]:
            best.update(flops_per_s=p["flops_per_s"], n=p["n"])
        best["flops_per_cpu_s"] = max(best["flops_per_cpu_s"], p.get("flops_per_cpu_s") or 0.0)
    return out


def summarise(results: list[dict], peaks: dict) -> list[dict]:
    """One row per configuration: medians over its repeats (runs of the same key)."""
    rows, by_key = [], {}
    for r in results:
        by_key.setdefault(r["key"], []).append(r)
    for key, runs in by_key.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        cfg = runs[0]["config"]
        row = {"key": key, "config": cfg, "runs": len(runs), "ok_runs": len(ok)}
        if ok:
            med = lambda name: statistics.median(r[name] for r in ok)  # noqa: E731
            t, cpu = med("step_time_s"), med("step_cpu_s")
            flops = ok[0]["flops"]
            peak = peaks.get("bf16" if cfg["dtype"] == "bf16w" else cfg["dtype"], {})
            wall_peak, cpu_peak = peak.get("flops_per_s"), peak.get("flops_per_cpu_s")
            own = statistics.median(r["flops"]["model"] / r["step_time_s"] / r["matmul_probe"]["flops_per_s"]
                                    for r in ok)
            row.update(
                step_time_s=t, step_time_s_runs=[r["step_time_s"] for r in ok],
                step_cpu_s=cpu, step_cpu_s_runs=[r["step_cpu_s"] for r in ok],
                text_tokens_per_s=cfg["batch"] * cfg["length"] / t,
                peak_mem_bytes=med("peak_mem_bytes"), step_mem_bytes=med("step_mem_bytes"),
                peak_mem_bytes_runs=[r["peak_mem_bytes"] for r in ok],
                live_peak_bytes=(statistics.median(r["live_peak_bytes"] for r in ok)
                                 if all("live_peak_bytes" in r for r in ok) else None),
                built_mem_bytes=statistics.median(  # the built model, before any step: its weights as resident
                    r["cuda_built_bytes"] if "cuda_built_bytes" in r else r["rss_built_bytes"] - r["rss_base_bytes"]
                    for r in ok),
                weight_bytes=ok[0]["weight_bytes"], base_weight_bytes=ok[0]["base_weight_bytes"],
                flops_model=flops["model"], flops_executed=flops["executed"], flops_counted=ok[0].get("flops_counted"),
                flops_counted_matches=(all(r["flops_counted"] == r["flops"]["executed_full_square"] for r in ok)
                                       if all(r.get("flops_counted") is not None for r in ok) else None),
                achieved_model_flops_per_s=flops["model"] / t, achieved_executed_flops_per_s=flops["executed"] / t,
                peak_flops_per_s=wall_peak, peak_flops_per_cpu_s=cpu_peak,
                model_fraction_of_peak=flops["model"] / t / wall_peak if wall_peak else None,
                executed_fraction_of_peak=flops["executed"] / t / wall_peak if wall_peak else None,
                model_fraction_of_peak_cpu_time=(flops["model"] / cpu / cpu_peak  # host CPU time means nothing on a GPU
                                                 if cpu_peak and cpu > 0 and cfg["device"] == "cpu" else None),
                model_fraction_of_own_probe=own,
            )
        else:
            row["status"] = runs[0].get("status")
        rows.append(row)
    return rows


def compute_ratios(rows: list[dict], results: list[dict]) -> list[dict]:
    """ours / reference-cost for each reference-cost configuration and its partner(s). `per pair`: each
    reference run against the nearest run of the partner in the run order (its ABBA neighbour)."""
    by_key = {r["key"]: r for r in rows}
    configs = {r["key"]: RunConfig(**r["config"]) for r in results}
    ours_cfgs = [c for c in configs.values() if c.impl == "ours"]
    out = []
    for ref in (c for c in configs.values() if c.impl == "reference"):
        for mine in ratio_partners(ref, ours_cfgs):
            a, b = by_key.get(mine.key(), {}), by_key.get(ref.key(), {})
            if "step_time_s" not in a or "step_time_s" not in b:
                continue
            ok = [(i, r) for i, r in enumerate(results) if r.get("status") == "ok"]
            mine_runs = [(i, r) for i, r in ok if r["key"] == mine.key()]
            per_pair = []
            for i, r in ((i, r) for i, r in ok if r["key"] == ref.key()):
                j, m = min(mine_runs, key=lambda x: abs(x[0] - i))
                per_pair.append(m["step_time_s"] / r["step_time_s"])
            out.append({
                "ours": mine.key(), "reference": ref.key(),
                "step_time_ratio": a["step_time_s"] / b["step_time_s"],
                "step_cpu_ratio": a["step_cpu_s"] / b["step_cpu_s"],
                "peak_mem_ratio": a["peak_mem_bytes"] / b["peak_mem_bytes"],
                "step_mem_ratio": a["step_mem_bytes"] / b["step_mem_bytes"],
                "live_peak_ratio": (a["live_peak_bytes"] / b["live_peak_bytes"]
                                    if a.get("live_peak_bytes") and b.get("live_peak_bytes") else None),
                "flops_model_ratio": a["flops_model"] / b["flops_model"],
                "flops_executed_ratio": a["flops_executed"] / b["flops_executed"],
                "step_time_ratio_per_repeat": per_pair,
                "targets": targets(ref),
            })
    return out


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(report: dict) -> str:
    env = report["environment"]
    settings = report["settings"]
    lines = [
        f"# ICAE train-step benchmark ({report['mode']}, {env['device']})",
        "",
        f"- created {report['created']}; `{' '.join(report['argv'])}`; total {report['total_wall_s']:.0f} s",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}, "
        f"flags {' '.join(env['cpu_flags']) or '-'}, OMP_WAIT_POLICY={env.get('omp_wait_policy')})"
        + (f"; GPU: {env['cuda_device']}" if env.get("cuda_device") else ""),
        f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, python {env['python']}",
        f"- load average at start {env.get('loadavg_start')} / end {env.get('loadavg_end')} (shared machine: "
        "timings are noisy; compare rows of the same run)",
        f"- setting: AE examples of exactly {settings['length']} tokens, m = {settings['mem_size']}, "
        f"LoRA r = {settings['lora_r']} on {','.join(settings['lora_targets'])}, AdamW; {settings['warmup']} warm-up + "
        f"{settings['steps']} measured steps per run, median; runs per pair: {settings['repeats']} (ABBA)",
        "- matmul peak (best of all probes of this invocation): " + ", ".join(
            f"{k} {v['flops_per_s'] / 1e9:,.1f} GFLOP/s wall ({v['n']}^3), "
            f"{(v['flops_per_cpu_s'] or 0) / 1e9:,.1f} GFLOP per CPU-second"
            for k, v in report["matmul_peak"].items()),
        "",
        "| model | impl | B | layout | decoder | LoRA | dtype | ckpt | step s | CPU s | text tok/s | peak mem MiB "
        "| step Δ MiB | live MiB | built MiB | weights MiB | GFLOP/step | GFLOP/s | of peak "
        "| of peak (CPU time) | runs |",
        "|---|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        c = r["config"]
        impl = "reference-cost" if c["impl"] == "reference" else "ours"
        layout = "-" if c["impl"] == "reference" else c["layout"]
        decoder = c["decoder"]
        if c["impl"] == "reference":
            decoder = "= encoder (seed)" if decoder == "shared" else "2nd copy"
        lora = c.get("lora_targets", "q_proj,v_proj").replace("_proj", "") + (
            " fused" if c.get("lora_impl") == "fused" else "")
        ckpt = {"on": "full"}.get(c["ckpt"], c["ckpt"])
        head = f"| {c['model']} | {impl} | {c['batch']} | {layout} | {decoder} | {lora} | {c['dtype']} | {ckpt} "
        if "step_time_s" not in r:
            lines.append(head + f"| {r.get('status')} |" + " |" * 12)
            continue
        lines.append(
            head + f"| {r['step_time_s']:.2f} | {r['step_cpu_s']:.1f} | {r['text_tokens_per_s']:,.1f} "
            f"| {mib(r['peak_mem_bytes'])} | {mib(r['step_mem_bytes'])} | {mib(r.get('live_peak_bytes'))} "
            f"| {mib(r.get('built_mem_bytes'))} "
            f"| {mib(r['weight_bytes'])} "
            f"| {r['flops_model'] / 1e9:,.0f} | {r['achieved_model_flops_per_s'] / 1e9:,.1f} "
            f"| {_pct(r['model_fraction_of_peak'])} | {_pct(r['model_fraction_of_peak_cpu_time'])} | {r['ok_runs']} |")
    if report["ratios"]:
        lines += ["", "Ratios ours / reference-cost (same invocation, runs ABBA-interleaved; targets: step time, "
                  "peak memory):", "",
                  "| ours | reference-cost | step time | per pair | CPU time | peak mem | step Δ mem | live mem "
                  "| model FLOPs | executed FLOPs | targets |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for q in report["ratios"]:
            per = ", ".join(f"{x:.2f}" for x in q["step_time_ratio_per_repeat"])
            ours, ref = q["ours"].replace("|", " "), q["reference"].replace("|", " ")  # no table pipes
            lines.append(f"| {ours} | {ref} | {q['step_time_ratio']:.2f} | {per} "
                         f"| {q['step_cpu_ratio']:.2f} | {q['peak_mem_ratio']:.2f} | {q['step_mem_ratio']:.2f} "
                         f"| {'-' if q.get('live_peak_ratio') is None else format(q['live_peak_ratio'], '.2f')} "
                         f"| {q['flops_model_ratio']:.2f} | {q['flops_executed_ratio']:.2f} "
                         f"| <= {q['targets']['step_time_ratio']}, <= {q['targets']['peak_mem_ratio']} |")
    lines += ["", "step s: median wall time of a step (forward + backward + AdamW); CPU s: its process CPU time "
              "(all threads). peak mem: peak over the steps minus the process before the model was loaded (CPU: "
              "RSS high-water mark; CUDA: max_memory_allocated), so it includes the weights; step Δ: the same peak "
              "minus the memory right after the model was built; live: peak of live tensor bytes in one extra "
              "profiled step (--live-memory; no allocator slack); built: that memory (the model before any step, "
              "weights paged in) over the same baseline; weights: bytes of the module's parameters. GFLOP/step: "
              "analytic model FLOPs (causal attention pairs, no recompute; see README). of peak: achieved / best "
              "matmul probe, by wall time and by CPU time. executed FLOPs include checkpointing's and fused "
              "attention's recompute.", ""]
    return "\n".join(lines)


def _quartiles(ours: list[float], ref: list[float]) -> str:
    pairs = sorted(a / b for a, b in zip(ours, ref))
    return f"{pairs[len(pairs) // 4]:.2f}-{pairs[(3 * len(pairs)) // 4]:.2f}"


def interleaved_markdown(report: dict) -> str:
    env, name = report["environment"], lambda key: key.replace("|", " ")
    lines = [
        "# ICAE train-step time, ours vs reference-cost, interleaved in one process",
        "",
        f"- `{' '.join(report['argv'])}`; {env['cpu_model']}, torch {env['torch']}, {env.get('torch_threads')} "
        f"thread(s); load average at start {env.get('loadavg_start')} / end {env.get('loadavg_end')}",
        "- the reference-cost model and ours (one, or a setting's all) built in one process; after one warm-up "
        "each, every round steps each model once, in turn (ours ..., reference; then reference, ours ...); ratio = "
        "median over rounds of ours / the reference-cost step of the same round. CPU time (the process's, one thread) does not count "
        "waiting for a core: on a loaded machine it is the steadier of the two",
        "",
        "| ours | reference-cost | rounds | ours step s (median) | ref step s (median) | step time ratio | "
        "quartiles | CPU time ratio | quartiles | model FLOPs ratio | target |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {name(r['ours'])} | {name(r['reference'])} | {r['rounds']} | {statistics.median(r['ours_step_s']):.2f} | "
            f"{statistics.median(r['reference_step_s']):.2f} | **{r['step_time_ratio']:.2f}** | "
            f"{_quartiles(r['ours_step_s'], r['reference_step_s'])} | **{r['step_cpu_ratio']:.2f}** | "
            f"{_quartiles(r['ours_cpu_s'], r['reference_cpu_s'])} | {r['flops_model_ratio']:.2f} | "
            f"<= {r.get('target', 0.7)} |")
    return "\n".join(lines) + "\n"


def analyse(report: dict) -> dict:
    """Derive the peaks, the per-configuration summary and the ratios from the raw runs."""
    results = report["results"]
    for r in results:  # the current formula, whatever version of the script measured the run
        if r.get("status") == "ok":
            c = r["config"]
            r["flops"] = step_flops(Shape(**r["shape"]), c["impl"], c["batch"], c["decoder"], c["ckpt"], c["length"],
                                    c["mem_size"], c["rate"],
                                    fused_attention=r.get("fused_attention", c.get("attn") != "eager"),
                                    lora_targets=c.get("lora_targets", "q_proj,v_proj"))
            r["achieved_model_flops_per_s"] = r["flops"]["model"] / r["step_time_s"]
            r["achieved_executed_flops_per_s"] = r["flops"]["executed"] / r["step_time_s"]
            r.pop("achieved_hardware_flops_per_s", None)
    probes = [*report["matmul_peak_before"].values(), *report["matmul_peak_after"].values(),
              *(r["matmul_probe"] for r in results if "matmul_probe" in r)]
    report["matmul_peak"] = best_peaks(probes)
    report["summary"] = summarise(results, report["matmul_peak"])
    report["ratios"] = compute_ratios(report["summary"], results)
    return report


def write_report(report: dict, out: Path) -> None:
    """JSON + .md table of a matrix run (summary and ratios re-derived) or of an --interleave run."""
    if report.get("mode") == "interleaved":
        table = interleaved_markdown(report)
    else:
        report = analyse(report)
        table = markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
