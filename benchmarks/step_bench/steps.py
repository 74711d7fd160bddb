"""Building one configuration and timing its steps, in a worker process (`run_worker`) or several
configurations alternated in one process (`interleaved_pair`, `interleaved_group`).

A step is forward + backward + AdamW on the trainable parameters; our ICAE (icae.core.model) or the
reference-cost model (reference_cost.py) on the same collated batch of AE examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from step_bench.flops import Shape, flop_counter_mode, step_flops
from step_bench.measure import RssPeak, matmul_peak
from step_bench.plan import (LLAMA_1B, LORA_ALPHA, LORA_DROPOUT, LORA_R, SMOLLM2_135M, RunConfig,
                             target_time_ratio)
from step_bench.reference_cost import ReferenceCostModel


LIVE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
                   "unknown")


def build_base(cfg: RunConfig):
    """(base causal LM on cfg.device, eos id) for cfg.model; weights fp32, or bf16 for dtype bf16w."""
    import torch

    if cfg.model == "smollm2-135m":
        from icae.core.base_model import load_base_model

        base = load_base_model("smollm2-135m")
    elif cfg.model == "tiny":
        from icae.testing import tiny_base_model

        base = tiny_base_model("llama")
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**(SMOLLM2_135M if cfg.model == "smollm2-135m-random" else LLAMA_1B))
        config._attn_implementation = "sdpa"
        torch.manual_seed(cfg.seed)
        with torch.device(cfg.device):  # initialise where it will run: fast on a GPU
            base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = base.to(cfg.device)
    if cfg.attn:
        base.set_attn_implementation(cfg.attn)
    if cfg.dtype == "bf16w":
        base = base.to(torch.bfloat16)
    eos = base.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return base, int(eos if eos is not None else 0)


def make_batch(cfg: RunConfig, vocab: int, eos: int, layout: str) -> dict:
    """cfg.batch AE examples of exactly cfg.length random tokens, collated as icae.core.collate does."""
    import torch

    from icae.core.collate import collate
    from icae.core.examples import ae_example

    g = torch.Generator().manual_seed(cfg.seed + 1)
    texts = [torch.randint(3, vocab, (cfg.length,), generator=g).tolist() for _ in range(cfg.batch)]
    batch = collate([ae_example(t, eos) for t in texts], layout, cfg.mem_size, cfg.rate, vocab)
    return {k: v.to(cfg.device) for k, v in batch.items()}


def build_ours(cfg: RunConfig, base):
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE

    config = ICAEConfig(fixed_mem_size=cfg.mem_size, mean_compression_rate=cfg.rate, position_layout=cfg.layout,
                        decoder_mode=cfg.decoder, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                        lora_target_modules=cfg.lora_targets, lora_impl=cfg.lora_impl)
    model = ICAE(config, base_model=base, tokenizer=None).to(cfg.device)
    if cfg.ckpt in ("on", "selective"):
        model.gradient_checkpointing_enable({"policy": "full" if cfg.ckpt == "on" else "selective"})
    return model.train()


def unique_param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


class Stepper:
    """Builds one configuration and runs its steps: forward, backward, AdamW step, zero_grad."""

    def __init__(self, cfg: RunConfig):
        import torch

        self.cfg = cfg
        base, eos = build_base(cfg)
        self.shape = Shape.of(base.config)
        self.fused_attention = base.config._attn_implementation != "eager"
        self.base_weight_bytes = unique_param_bytes(base.parameters())
        self.base_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
        vocab = base.get_input_embeddings().weight.shape[0]
        if cfg.impl == "ours":
            self.model = build_ours(cfg, base)
            self.batch = make_batch(cfg, vocab, eos, cfg.layout)
            params = list(self.model.parameters())
            self.forward = lambda: self.model(**self.batch).loss
        else:
            self.model = ReferenceCostModel(cfg, base)
            self.batch = make_batch(cfg, vocab, eos, "default")
            params = list(self.model.parameters())
            self.forward = lambda: self.model(self.batch)
        self.weight_bytes = unique_param_bytes(params)
        with torch.no_grad():  # page in lazily mapped weights now, so that the memory after the build counts them
            for p in {id(p): p for p in params}.values():
                p.float().sum() if p.numel() else None
        trainable = [p for p in params if p.requires_grad]
        self.trainable = sum(p.numel() for p in {id(p): p for p in trainable}.values())
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        if cfg.device == "cuda":
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
        else:
            self.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")

    def sync(self) -> None:
        if self.cfg.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def step(self) -> float:
        with self.autocast():
            loss = self.forward()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def live_memory_peak(stepper: Stepper) -> tuple[int, dict]:
    """Peak bytes of live CPU tensors during one (extra, untimed) step, by torch's memory profiler: what a
    caching allocator would report as allocated, without the C allocator's retained and fragmented pages
    that RSS also counts."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        stepper.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    at = max(sizes, key=sum)
    return sum(at), {name: n for name, n in zip(LIVE_CATEGORIES, at[1:]) if n}


def run_worker(cfg: RunConfig) -> dict:
    """Measure one configuration in this (fresh) process."""
    import gc

    import peft.tuners.lora  # noqa: F401 - import everything before the baseline RSS,
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - so that libraries are not counted as memory

    import icae.core.base_model  # noqa: F401
    import icae.core.model  # noqa: F401
    import icae.testing  # noqa: F401

    cuda = cfg.device == "cuda"
    # The matmul peak under this run's conditions (a shared machine's load changes from run to run).
    probe = matmul_peak("bf16" if cfg.dtype == "bf16w" else cfg.dtype, cfg.device, cfg.probe_n)
    rss = RssPeak()
    torch.manual_seed(cfg.seed)
    gc.collect()
    rss_base = rss.rss()
    t_build = time.perf_counter()
    stepper = Stepper(cfg)
    build_s = time.perf_counter() - t_build
    gc.collect()
    rss_built = rss.rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_built = torch.cuda.memory_allocated()
    rss.reset()  # the peak from here on: warm-up and measured steps, not the model loading

    losses, warm_times, times, cpu_times = [], [], [], []
    for _ in range(cfg.warmup):
        stepper.sync()
        t = time.perf_counter()
        losses.append(stepper.step())
        stepper.sync()
        warm_times.append(time.perf_counter() - t)
    for _ in range(cfg.steps):
        stepper.sync()
        t, c = time.perf_counter(), time.process_time()
        losses.append(stepper.step())
        stepper.sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)

    peak_rss = rss.peak()
    # FLOPs counted by torch in one extra, untimed step: a step under FlopCounterMode left the next
    # checkpointed steps up to 1.7x slower here, so it must not be a warm-up step.
    counted = counted_error = None
    try:  # torch's own count only checks the analytic one: a formula it lacks must not lose the timings
        with flop_counter_mode() as counter:
            losses.append(stepper.step())
        counted = counter.get_total_flops()
    except (AssertionError, RuntimeError, NotImplementedError) as err:  # e.g. CUDA sdpa with grouped-query heads
        counted_error = f"{type(err).__name__}: {err}"
    live = live_memory_peak(stepper) if cfg.live_memory and not cuda else None
    median = statistics.median(times)
    flops = step_flops(stepper.shape, cfg.impl, cfg.batch, cfg.decoder, cfg.ckpt, cfg.length, cfg.mem_size, cfg.rate,
                       fused_attention=stepper.fused_attention, lora_targets=cfg.lora_targets)
    result = {
        "key": cfg.key(), "config": dataclasses.asdict(cfg), "status": "ok",
        "step_time_s": median, "step_times_s": times, "warmup_times_s": warm_times,
        "step_cpu_s": statistics.median(cpu_times), "step_cpu_times_s": cpu_times, "matmul_probe": probe,
        "text_tokens_per_step": cfg.batch * cfg.length, "text_tokens_per_s": cfg.batch * cfg.length / median,
        "build_s": build_s, "losses": losses,
        "memory_method": "cuda.max_memory_allocated" if cuda else rss.method,
        "rss_base_bytes": rss_base, "rss_built_bytes": rss_built, "rss_peak_bytes": peak_rss,
        "base_params": stepper.base_params, "base_weight_bytes": stepper.base_weight_bytes,
        "weight_bytes": stepper.weight_bytes, "trainable_params": stepper.trainable,
        "shape": dataclasses.asdict(stepper.shape),
        "flops": flops, "flops_counted": counted, "flops_counted_error": counted_error,
        "achieved_model_flops_per_s": flops["model"] / median,
        "achieved_executed_flops_per_s": flops["executed"] / median, "fused_attention": stepper.fused_attention,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_mem_bytes=peak, step_mem_bytes=peak - cuda_built, cuda_built_bytes=cuda_built,
                      cuda_max_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        # Memory the training needs: weights + gradients + optimizer state + activations (+ allocator
        # caches), i.e. the peak RSS over the RSS of the bare interpreter with torch imported.
        result.update(peak_mem_bytes=peak_rss - rss_base, step_mem_bytes=peak_rss - rss_built)
    if live is not None:
        result.update(live_peak_bytes=live[0], live_peak_by_category=live[1])
    if not all(math.isfinite(x) for x in losses):
        result["status"] = "nonfinite-loss"
    return result


def interleaved_pair(ours_cfg: RunConfig, ref_cfg: RunConfig, rounds: int) -> dict:
    """The step-time ratio with both models in ONE process and their steps alternated ABBA."""
    return interleaved_group(ref_cfg, [ours_cfg], rounds)[0]


def interleaved_group(ref_cfg: RunConfig, ours_cfgs: list[RunConfig], rounds: int) -> list[dict]:
    """Step-time ratios of several of our configurations to one reference-cost configuration, all built in
    ONE process, every model one step per round (the order reversed every other round).

    On a shared machine whose speed drifts by tens of percent within minutes, separate processes
    (even ABBA) see different machines; steps a few seconds apart see the same one. No memory is
    measured here (all models live in the process)."""
    import gc

    steppers = [Stepper(ref_cfg)] + [Stepper(c) for c in ours_cfgs]
    for st in steppers:
        st.step()  # warm-up

    def timed(stepper):
        stepper.sync()
        t, c = time.perf_counter(), time.process_time()
        stepper.step()
        stepper.sync()
        return time.perf_counter() - t, time.process_time() - c

    wall, cpu = [[] for _ in steppers], [[] for _ in steppers]
    for r in range(rounds):
        for i in range(len(steppers)) if r % 2 else reversed(range(len(steppers))):
            w, c = timed(steppers[i])
            wall[i].append(w)
            cpu[i].append(c)
    cfgs = [ref_cfg, *ours_cfgs]
    flops = [step_flops(st.shape, c.impl, c.batch, c.decoder, c.ckpt, c.length, c.mem_size, c.rate,
                        fused_attention=st.fused_attention, lora_targets=c.lora_targets)["model"]
             for st, c in zip(steppers, cfgs)]
    del steppers
    gc.collect()
    out = []
    for i, mine in enumerate(ours_cfgs, 1):
        pairs = sorted(a / b for a, b in zip(wall[i], wall[0]))
        out.append({
            "ours": mine.key(), "reference": ref_cfg.key(), "rounds": rounds,
            "ours_step_s": wall[i], "reference_step_s": wall[0], "ours_cpu_s": cpu[i], "reference_cpu_s": cpu[0],
            "step_time_ratio": statistics.median(pairs),
            "step_time_ratio_quartiles": [pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]],
            "step_cpu_ratio": statistics.median(a / b for a, b in zip(cpu[i], cpu[0])),
            "flops_model_ratio": flops[i] / flops[0], "target": target_time_ratio(ref_cfg),
        })
    return out
