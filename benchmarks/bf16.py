#!/usr/bin/env python
"""bf16 against fp32 on this CPU: train steps of three recipes, decoding and compression.

    python benchmarks/bf16.py                       # everything, 1 and 2 threads (~25 min on 2 cores)
    python benchmarks/bf16.py --parts step --settings grid --threads 1 --rounds 4
    python benchmarks/bf16.py --smoke --output /tmp/b.json   # tiny random model, seconds (tests)

Arithmetics (what the commands do):
  fp32            fp32 weights, no autocast
  bf16-autocast   fp32 weights under torch.autocast(cpu, bf16): `--bf16 True` before this benchmark
  bf16            `--bf16 True` now: frozen weights stored in bf16, fp32 LoRA/memory master weights,
                  autocast, attention in fp32 SDPA (icae.core.precision)
  bf16-compile    bf16 with the step's forward under torch.compile (--compile whole)
  bf16-compile-layers  bf16 with each decoder layer compiled on its own (--compile layers; "regional
                  compilation": the layers share one structure, so one compiled graph serves all of them
                  and the warm-up is one layer's, not the whole model's)

  reference-fp32  the reference-cost model of the seed's / ICAE v2's own code (benchmarks/step_bench/reference_cost.py:
                  its forward as that code spends it, batch 1), fp32 (--reference; settings seed and v2)
  reference-bf16  the same under torch.autocast(cpu, bf16) with fp32 weights: what the seed's
                  `--mixed_precision=bf16` (accelerate) runs

Train steps: each setting runs in a fresh process that builds one model per arithmetic and alternates their
steps for --rounds rounds (order reversed every other round), so the ratios compare steps seconds apart on a
shared machine. Reported: median process CPU seconds and wall seconds per step, and the ratio to fp32.
Decoding: the shipped checkpoint reconstructs a held-out 64-token paragraph from its 16 slots (greedy, KV
cache) in fp32 and bf16, ms per token; with --busy a second process spins on one core meanwhile. Compression:
text tokens per second of `compress` over 32 paragraphs. Every record names the CPU and its bf16 flags.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    # the seed grid's recipe on the CPU: 8 x 32-token texts -> 8 slots, EPL, shared decoder, LoRA r32 all-linear
    "grid": dict(batch=8, length=32, mem=8, layout="epl", decoder="shared", r=32, alpha=64, targets="all-linear"),
    # the seed's setting: 512 tokens -> 128 slots, batch 1, EPL, shared decoder, LoRA r128 all-linear
    "seed": dict(batch=1, length=512, mem=128, layout="epl", decoder="shared", r=128, alpha=32, targets="all-linear"),
    # ICAE v2's: 512 -> 128, batch 1, default layout, frozen decoder, LoRA r128 on q,v
    "v2": dict(batch=1, length=512, mem=128, layout="default", decoder="frozen", r=128, alpha=32, targets=""),
}
ARITHMETICS = ("fp32", "bf16-autocast", "bf16")


def environment() -> dict:
    import torch

    from icae.core.precision import cpu_bf16_flags, cpu_model_name

    return {"cpu": cpu_model_name(), "bf16_flags": cpu_bf16_flags(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- train steps (worker)

def build_reference(setting: dict, arithmetic: str, smoke: bool):
    """A step of the reference-cost model (the seed's or ICAE v2's own code, as it spends compute), batch 1."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_bench.plan import LORA_TARGETS, RunConfig
    from step_bench.reference_cost import ReferenceCostModel
    from step_bench.steps import build_base, make_batch

    if setting["batch"] != 1:
        raise SystemExit("error: the reference-cost model runs batch 1 only (settings seed and v2)")
    cfg = RunConfig(model="tiny" if smoke else "smollm2-135m", impl="reference", batch=1, layout="default",
                    decoder=setting["decoder"], dtype="fp32", ckpt="off" if setting["decoder"] == "shared" else "decoder",
                    length=setting["length"], mem_size=setting["mem"], rate=4,
                    lora_targets="all-linear" if setting["targets"] == "all-linear" else ",".join(LORA_TARGETS))
    base, eos = build_base(cfg)
    torch.manual_seed(0)
    model = ReferenceCostModel(cfg, base)
    batch = make_batch(cfg, base.get_input_embeddings().weight.shape[0], eos, "default")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arithmetic == "reference-bf16"):
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build(setting: dict, arithmetic: str, smoke: bool):
    import torch

    if arithmetic.startswith("reference"):
        return build_reference(setting, arithmetic, smoke)

    from icae.core.base_model import load_base_model
    from icae.core.collate import collate
    from icae.core.config import ICAEConfig
    from icae.core.examples import ae_example
    from icae.core.model import ICAE
    from icae.core.precision import use_fp32_attention
    from icae.testing import tiny_base_model

    bf16_weights = arithmetic in ("bf16", "bf16-compile", "bf16-compile-layers")
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    base = tiny_base_model("llama").to(dtype) if smoke else load_base_model("smollm2-135m", dtype=dtype)
    if bf16_weights:
        use_fp32_attention(base)
    cfg = ICAEConfig(fixed_mem_size=setting["mem"], mean_compression_rate=4, position_layout=setting["layout"],
                     decoder_mode=setting["decoder"], lora_r=setting["r"], lora_alpha=setting["alpha"],
                     lora_target_modules=setting["targets"])
    torch.manual_seed(0)
    model = ICAE(cfg, base_model=base).train()
    vocab = base.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(3, vocab, (setting["length"],), generator=g).tolist() for _ in range(setting["batch"])]
    batch = collate([ae_example(t, 0) for t in texts], cfg.position_layout, cfg.fixed_mem_size, 4, vocab)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    autocast = arithmetic != "fp32"
    forward = torch.compile(model) if arithmetic == "bf16-compile" else model
    if arithmetic == "bf16-compile-layers":
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def step_worker(name: str, arithmetics: list[str], rounds: int, smoke: bool) -> dict:
    steps = {a: build(SETTINGS[name], a, smoke) for a in arithmetics}
    first_loss, first_cpu = {}, {}
    for a in arithmetics:  # warm-up (compiles, pages in weights): timed, since compiling is a cost too
        c = time.process_time()
        first_loss[a] = steps[a]()
        first_cpu[a] = time.process_time() - c
    for a in arithmetics:
        steps[a]()
    cpu = {a: [] for a in arithmetics}
    wall = {a: [] for a in arithmetics}
    for r in range(rounds):
        for a in (arithmetics if r % 2 == 0 else arithmetics[::-1]):
            t, c = time.perf_counter(), time.process_time()
            steps[a]()
            wall[a].append(time.perf_counter() - t)
            cpu[a].append(time.process_time() - c)
    rows = []
    for a in arithmetics:
        rows.append({
            "part": "step", "setting": name, "arithmetic": a, **SETTINGS[name], "rounds": rounds,
            "step_cpu_s": statistics.median(cpu[a]), "step_wall_s": statistics.median(wall[a]),
            "cpu_ratio_to_fp32": statistics.median(x / y for x, y in zip(cpu[a], cpu["fp32"])),
            "wall_ratio_to_fp32": statistics.median(x / y for x, y in zip(wall[a], wall["fp32"])),
            "cpu_ratio_to_reference_bf16": (statistics.median(x / y for x, y in zip(cpu[a], cpu["reference-bf16"]))
                                            if "reference-bf16" in cpu else None),
            "first_step_loss": first_loss[a], "first_step_cpu_s": first_cpu[a], "step_cpu_all": cpu[a],
        })
    return {"rows": rows}


# ----------------------------------------------------------------------------- decoding and compression (worker)

def decode_worker(smoke: bool, rounds: int) -> dict:
    import torch

    from icae.core.inference import generate_ids
    from icae.core.model import load_checkpoint
    from icae.data.texts import builtin_eval_texts

    models = {}
    for dtype in ("float32", "bfloat16"):
        if smoke:
            from icae.core.config import ICAEConfig
            from icae.core.model import ICAE
            from icae.core.precision import use_fp32_attention
            from icae.testing import byte_tokenizer, tiny_base_model

            torch.manual_seed(0)
            model = ICAE(ICAEConfig(fixed_mem_size=4, lora_r=4), tiny_base_model("llama"), byte_tokenizer()).eval()
            if dtype == "bfloat16":
                model = model.to(torch.bfloat16)
                use_fp32_attention(model.base)
        else:
            model = load_checkpoint("smollm2-135m-icae", device="cpu", dtype=dtype)
        models[dtype] = model
    tokenizer = models["float32"].tokenizer  # held-out 64-token paragraphs, as `icae demo` shows one
    rows_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in builtin_eval_texts())
    paragraphs = [ids[:64] for ids in rows_ids if len(ids) >= 64][:32]
    ref = paragraphs[0]
    rows = []
    timings = {d: {"decode": [], "compress": []} for d in models}
    for r in range(rounds):
        for dtype in (list(models) if r % 2 == 0 else list(models)[::-1]):
            model = models[dtype]
            with torch.no_grad():
                t = time.perf_counter()
                memory = model.compress(paragraphs, batch_size=8)
                timings[dtype]["compress"].append(time.perf_counter() - t)
                t = time.perf_counter()
                out = generate_ids(model, memory[:1], task="ae", max_new_tokens=64)
                timings[dtype]["decode"].append((time.perf_counter() - t) / max(1, len(out[0])))
    for dtype, model in models.items():
        with torch.no_grad():
            outs = generate_ids(model, model.compress(paragraphs[:8]), task="ae", max_new_tokens=68)
        same = statistics.mean(sum(a == b for a, b in zip(o, ids)) / len(ids) for o, ids in zip(outs, paragraphs))
        n_tokens = sum(map(len, paragraphs))
        rows.append({"part": "decode", "dtype": dtype, "rounds": rounds,
                     "decode_ms_per_token": 1000 * statistics.median(timings[dtype]["decode"]),
                     "compress_text_tokens_per_s": n_tokens / statistics.median(timings[dtype]["compress"]),
                     "reconstruction_token_accuracy": same})
    return {"rows": rows}


# ----------------------------------------------------------------------------- driver

def run_worker(argv: list[str], threads: int, busy: bool, timeout: int, policy: str = "PASSIVE") -> dict:
    """One worker in a fresh process with `threads` torch threads and OpenMP wait `policy` (PASSIVE: what the
    icae command sets; default: the OpenMP library's own, spinning a while); with `busy`, a spinning process
    beside it."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", *argv], env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        if spinner:
            spinner.kill()
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            for row in result["rows"]:
                row.update(threads=threads, busy=busy, omp_wait_policy=policy, env=result["env"])
            return result
    raise RuntimeError(f"worker {argv} failed:\n{proc.stderr[-3000:]}")


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| setting | arithmetic | threads | OpenMP wait | step CPU s | step wall s | CPU ratio to fp32 | wall ratio |"
             " CPU ratio to reference bf16 | load |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["part"] == "step":
            lines.append(f"| {r['setting']} | {r['arithmetic']} | {r['threads']} | {r['omp_wait_policy']} | "
                         f"{r['step_cpu_s']:.2f} | {r['step_wall_s']:.2f} | **{r['cpu_ratio_to_fp32']:.2f}** | "
                         f"{r['wall_ratio_to_fp32']:.2f} | {_ratio(r.get('cpu_ratio_to_reference_bf16'))} | "
                         f"{r['env']['loadavg_1m']:.1f} |")
    lines += ["", "| dtype | threads | OpenMP wait | other process busy | decode ms/token | compress text tokens/s | "
              "reconstruction token accuracy | load |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["part"] == "decode":
            lines.append(f"| {r['dtype']} | {r['threads']} | {r['omp_wait_policy']} | {'yes' if r['busy'] else 'no'} | "
                         f"{r['decode_ms_per_token']:.1f} | {r['compress_text_tokens_per_s']:.0f} | "
                         f"{r['reconstruction_token_accuracy']:.2f} | {r['env']['loadavg_1m']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="step,decode")
    p.add_argument("--settings", default="grid,seed,v2")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--wait_policies", default="PASSIVE,default",
                   help="OpenMP wait policies to compare (decoding; steps at 2+ threads)")
    p.add_argument("--compile", default="", help="also time bf16 under torch.compile: whole (the model), "
                   "layers (each decoder layer), or both (whole,layers)")
    p.add_argument("--reference", action="store_true", help="also time the reference-cost model of the seed's / "
                   "ICAE v2's own code, fp32 and bf16 autocast (settings seed, v2)")
    p.add_argument("--arithmetics", default=",".join(ARITHMETICS), help="which of ours to time (fp32 always)")
    p.add_argument("--smoke", action="store_true", help="tiny random model (for tests)")
    p.add_argument("--output", default="benchmarks/results/bf16-cpu.json")
    p.add_argument("--timeout", type=int, default=3000)
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:  # inside a fresh process
        kind, *rest = args.worker
        result = (step_worker(rest[0], rest[1].split(","), args.rounds, args.smoke) if kind == "step"
                  else decode_worker(args.smoke, args.rounds))
        result["env"] = environment()
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0

    compiled = {"whole": "bf16-compile", "layers": "bf16-compile-layers"}
    modes = [m for m in args.compile.split(",") if m]
    if set(modes) - set(compiled):
        sys.exit(f"error: --compile takes whole and/or layers, not {args.compile}")
    ours = ["fp32"] + [a for a in args.arithmetics.split(",") if a and a != "fp32"]
    if set(ours) - set(ARITHMETICS):
        sys.exit(f"error: --arithmetics takes {', '.join(ARITHMETICS)}, not {args.arithmetics}")
    arithmetics = ours + [compiled[m] for m in modes] + (["reference-fp32", "reference-bf16"] if args.reference else [])
    common = ["--rounds", str(args.rounds)] + (["--smoke"] if args.smoke else [])
    rows = []
    parts = args.parts.split(",")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": "icae-bf16-benchmark/1", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "rows": rows}

    def write() -> None:  # after every worker: what finished survives a stopped run
        out.write_text(json.dumps(record, indent=2) + "\n")
        env = rows[0]["env"] if rows else {}
        out.with_suffix(".md").write_text(
            f"# bf16 against fp32 on {env.get('cpu')} (bf16 flags: {', '.join(env.get('bf16_flags', [])) or 'none'})\n\n"
            f"`{record['command']}`, {record['date']}; load average at the start of each worker in the JSON.\n\n"
            + table(rows))

    policies = args.wait_policies.split(",")
    for threads in [int(t) for t in args.threads.split(",")]:
        if "step" in parts:
            for name in args.settings.split(","):
                for policy in policies if threads > 1 else policies[:1]:
                    print(f"step: {name}, {threads} thread(s), OpenMP wait {policy} ...", flush=True)
                    rows += run_worker(["step", name, ",".join(arithmetics), *common], threads, False, args.timeout,
                                       policy)["rows"]
                    write()
        if "decode" in parts:
            for busy in (False, True):
                for policy in policies if threads > 1 else policies[:1]:
                    print(f"decode: {threads} thread(s), busy={busy}, OpenMP wait {policy} ...", flush=True)
                    rows += run_worker(["decode", *common], threads, busy, args.timeout, policy)["rows"]
                    write()
    write()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
