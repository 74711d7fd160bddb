#!/usr/bin/env python
"""Where the activation memory of one ICAE training step goes, by kind of saved tensor.

    python benchmarks/memory_breakdown.py                 # SmolLM2-135M, both settings (~10 min on 2 busy cores)
    python benchmarks/memory_breakdown.py --model tiny --output /tmp/b.json   # seconds (tests)

For ICAE v2's setting (default layout, frozen decoder, LoRA q,v) and the seed's (epl, shared decoder,
all-linear LoRA), fp32, batch 1, 512 tokens -> 128 slots, LoRA r = 128 (dropout 0.05), this measures:

1. without checkpointing, every tensor autograd saves in one forward, classified by what saved it (a
   saved_tensors_hooks pack hook reading the module being run and the torch function inside it), each
   storage counted once (a tensor saved by q, k and v counts once), for each LoRA implementation;
2. for each LoRA implementation x checkpointing policy (off / full / selective): the bytes the forward
   leaves for backward, and the peak of live tensor bytes over forward + backward (icae.testing.LiveBytes:
   what a caching allocator reports as allocated, without the C allocator's slack that RSS adds).

The weights (and AdamW's state, which a real step adds) are not in these numbers: only what the step creates.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from step_bench.measure import environment  # noqa: E402
from step_bench.plan import LORA_DROPOUT, LORA_R, SETTINGS, RunConfig  # noqa: E402

KINDS = (
    "LoRA: inputs kept for A's gradient",
    "LoRA: dropout masks",
    "LoRA: A outputs (for B's gradient)",
    "attention: q, k, v (after rotary), output, logsumexp",
    "rotary: cos, sin",
    "MLP: SiLU input (gate output)",
    "MLP: the product's inputs (PEFT: SiLU output, up; fused: gate, up)",
    "RMSNorm: inputs and 1/rms (fused: also what the projections after it rebuild their input from)",
    "outside the layers: embeddings, slots",
    "loss: gradient w.r.t. the hidden states",
)
POLICIES = ("off", "full", "selective")
MIB = 2**20


class Tracker:
    """The module being run (forward hooks) and the torch functions inside it (a TorchFunctionMode); the
    tensors the MLP's gate, up and SiLU produced (to tell them from the fused down projection's own)."""

    def __init__(self, model):
        import weakref

        from torch.overrides import TorchFunctionMode

        self.modules, self.funcs, self.passes, self.mlp_parts = [], [], 0, {}
        tracker = self

        class Funcs(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                tracker.funcs.append(getattr(func, "__name__", ""))
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    tracker.funcs.pop()

        self.mode = Funcs()
        self.handles = []
        def enter(name):
            self.modules.append(name)

        def leave(name, output, passes=0):
            self.modules.pop()
            self.passes += passes
            if name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "act_fn") and output is not None:
                self.mlp_parts[output.untyped_storage().data_ptr()] = weakref.ref(output)

        for name, module in model.named_modules():  # hooks returning None: they must not replace anything
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
            self.handles.append(module.register_forward_hook(
                lambda m, a, o, name=name, n=int(module is model.backbone): leave(name, o, n), always_call=True))

    def close(self):
        for h in self.handles:
            h.remove()

    def kind(self, t, rank: int) -> str:
        import torch

        inner = self.modules[-1] if self.modules else ""
        parts = inner.split(".")
        if "lora_dropout" in parts:
            return KINDS[1]
        if "lora_A" in parts:  # PEFT: lora_A keeps its input, the dropped-out copy
            return KINDS[0]
        if "lora_B" in parts:
            return KINDS[2]
        last = parts[-1]
        if last.endswith("_proj"):  # the fused LoRA function saves at the projection itself
            return KINDS[1] if t.dtype in (torch.uint8, torch.bool) else KINDS[2] if t.shape[-1] == rank else KINDS[0]
        if last == "self_attn":
            return KINDS[3] if "scaled_dot_product_attention" in self.funcs else KINDS[4]
        if last == "act_fn":
            return KINDS[5]
        if last == "mlp":  # PEFT: SiLU's output and up; fused: gate and up, and the down projection's A output, bits
            ref = self.mlp_parts.get(t.untyped_storage().data_ptr())
            if ref is not None and ref() is not None:
                return KINDS[6]
            return KINDS[1] if t.dtype in (torch.uint8, torch.bool) else KINDS[2]
        if "norm" in last:
            return KINDS[7]
        return KINDS[9] if self.passes >= 2 else KINDS[8]


def measure(cfg: RunConfig, policy: str, breakdown: bool) -> dict:
    import torch

    from icae.testing import LiveBytes, saved_tensor_bytes
    from step_bench.steps import Stepper

    torch.manual_seed(cfg.seed)
    stepper = Stepper(cfg)
    model = stepper.model
    out = {"policy": policy, "lora_impl": cfg.lora_impl}
    tracker = Tracker(model) if breakdown else None
    by_pass: dict = {}

    def by(t):
        name = tracker.kind(t, LORA_R)
        where = "decoder" if tracker.passes >= 1 else "encoder"
        by_pass.setdefault(where, {}).setdefault(name, 0)
        by_pass[where][name] += t.untyped_storage().nbytes()
        return name

    with LiveBytes() as live:
        if breakdown:
            with saved_tensor_bytes(exclude=model.parameters(), by=by) as saved, tracker.mode:
                loss = stepper.forward()
            tracker.close()
            out.update(saved_total=saved.total, saved=saved.groups, saved_by_pass=by_pass)
        else:
            loss = stepper.forward()
        out["held_after_forward"] = live.live
        loss.backward()
        out["peak_live"] = live.peak
    params = {id(p): p for p in model.parameters()}.values()
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    del stepper, model, loss
    gc.collect()
    return out


def config(model: str, setting: str, impl: str, policy: str, args) -> RunConfig:
    s = SETTINGS[setting]
    ckpt = {"off": "off", "full": "on", "selective": "selective"}[policy]
    return RunConfig(model=model, layout=s["layout"], decoder=s["decoder"], lora_targets=s["lora_targets"],
                     lora_impl=impl, ckpt=ckpt, length=args.length, mem_size=args.mem_size, rate=args.rate).check()


def markdown(report: dict) -> str:
    runs = report["runs"]
    off = [r for r in runs if r["policy"] == "off"]
    cols = [f"{r['setting']}, {r['lora_impl']}" for r in off]
    lines = [f"# Saved tensors of one training step by kind (MiB; {report['model']}, fp32, batch 1, "
             f"{report['length']} tokens, m = {report['mem_size']}, LoRA r = {LORA_R}, dropout {LORA_DROPOUT}; "
             "no checkpointing)", "", "| kind | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{r['saved'].get(kind, 0) / MIB:,.1f}" for r in off) + " |")
    lines.append("| **all saved tensors** | " + " | ".join(f"**{r['saved_total'] / MIB:,.1f}**" for r in off) + " |")
    lines.append("| of which in the encoder / decoder pass | " + " | ".join(
        f"{sum(r['saved_by_pass'].get('encoder', {}).values()) / MIB:,.0f} / "
        f"{sum(r['saved_by_pass'].get('decoder', {}).values()) / MIB:,.0f}" for r in off) + " |")
    lines += ["", "Live tensor bytes (MiB) the forward leaves for backward / peak over forward + backward "
              "(no weights, no optimizer state):", "",
              "| setting | LoRA | off | full | selective |", "|---|---|---:|---:|---:|"]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        for impl in dict.fromkeys(r["lora_impl"] for r in runs):
            cells = []
            for policy in POLICIES:
                r = next((r for r in runs if (r["setting"], r["lora_impl"], r["policy"]) == (setting, impl, policy)),
                         None)
                cells.append("-" if r is None else f"{r['held_after_forward'] / MIB:,.0f} / {r['peak_live'] / MIB:,.0f}")
            lines.append(f"| {setting} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="smollm2-135m (default where installed), smollm2-135m-random, tiny")
    p.add_argument("--settings", default="v2,seed")
    p.add_argument("--lora-impls", default="peft,fused")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--mem-size", type=int, default=128)
    p.add_argument("--rate", type=int, default=4)
    p.add_argument("--output", default=str(HERE / "results" / "memory_breakdown-cpu.json"))
    args = p.parse_args(argv)
    if args.model is None:
        from train_step import embedded_or_random

        args.model = embedded_or_random()
    runs = []
    for setting in args.settings.split(","):
        for impl in args.lora_impls.split(","):
            for policy in args.policies.split(","):
                print(f"{setting} {impl} {policy} ...", end=" ", file=sys.stderr, flush=True)
                r = measure(config(args.model, setting, impl, policy, args), policy, breakdown=policy == "off")
                runs.append({"setting": setting, **r})
                print(f"held {r['held_after_forward'] / MIB:,.0f} MiB, peak {r['peak_live'] / MIB:,.0f} MiB",
                      file=sys.stderr)
    report = {"schema": "icae-memory-breakdown/1", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(
              timespec="seconds"), "argv": ["benchmarks/memory_breakdown.py", *(sys.argv[1:] if argv is None else argv)],
              "environment": environment("cpu"), "model": args.model, "length": args.length, "mem_size": args.mem_size,
              "settings": {k: SETTINGS[k] for k in args.settings.split(",")}, "lora_r": LORA_R,
              "lora_dropout": LORA_DROPOUT, "runs": runs}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
