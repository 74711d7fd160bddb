#!/usr/bin/env python
"""Where a step's CPU time goes, fp32 against bf16 (the grid recipe of benchmarks/bf16.py): torch's profiler over
one step after two warm-up steps, self CPU time per op, grouped into matmuls / attention / the rest. The floor of
the bf16/fp32 ratio: bf16 matmuls at this CPU's measured bf16/fp32 matmul speed-up, everything else unchanged.

    python benchmarks/bf16_profile.py --output benchmarks/results/bf16-profile-cpu.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16 import SETTINGS, build, environment  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::linear", "aten::matmul")


def matmul_gflops(dtype, n=1024, reps=20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def profile(arithmetic: str, setting: str) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    step = build(SETTINGS[setting], arithmetic, smoke=False)
    step(), step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        step()
    groups = {"matmul": 0.0, "attention": 0.0, "dropout masks": 0.0, "casts": 0.0, "other": 0.0}
    for e in p.key_averages():
        s = e.self_cpu_time_total / 1e6
        if e.key in MATMUL:
            groups["matmul"] += s
        elif "scaled_dot_product" in e.key:
            groups["attention"] += s
        elif e.key in ("aten::bernoulli_", "aten::random_"):
            groups["dropout masks"] += s
        elif e.key in ("aten::copy_", "aten::_to_copy"):
            groups["casts"] += s
        else:
            groups["other"] += s
    return {k: round(v, 3) for k, v in groups.items()} | {"total": round(sum(groups.values()), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--setting", default="grid")
    p.add_argument("--output", default="benchmarks/results/bf16-profile-cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    fp32, bf16 = profile("fp32", args.setting), profile("bf16", args.setting)
    speedup = matmul_gflops(torch.bfloat16) / matmul_gflops(torch.float32)
    floor = (fp32["matmul"] / speedup + fp32["total"] - fp32["matmul"]) / fp32["total"]
    record = {"setting": args.setting, "threads": 1, "env": environment(), "fp32_s": fp32, "bf16_s": bf16,
              "bf16_over_fp32_matmul_speedup_1024": round(speedup, 2), "ratio": round(bf16["total"] / fp32["total"], 3),
              "floor_if_only_matmuls_speed_up": round(floor, 3)}
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
