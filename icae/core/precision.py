"""bf16 on CPUs: whether this CPU has bf16 instructions, and attention that stays fast under bf16.

A CPU with AMX (`amx_bf16`) or AVX-512-BF16 (`avx512_bf16`) multiplies bf16 matrices 2x (AVX-512-BF16,
AMD Zen 4) to 13x (AMX, Intel Sapphire Rapids) faster than fp32; one without either emulates them and
was measured ~160x SLOWER than fp32. So bf16 on a CPU is decided from /proc/cpuinfo, never assumed.

torch's CPU flash-attention kernel is slower in bf16 than in fp32 at the short rows ICAE trains on
(8 x 42 tokens, 9 heads, forward + backward: 11.4 ms against 3.3 ms without AMX), so under bf16 the
attention runs in fp32 on inputs cast once per layer (`sdpa_fp32`, 6.2 ms; no slower at 640 tokens):
benchmarks/results/bf16-attention-cpu.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from icae.errors import UserError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FP32_ATTENTION = "sdpa_fp32"


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The bf16 instruction sets this CPU reports (amx_bf16, avx512_bf16), [] if none or unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in BF16_FLAGS if f in flags]


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """'AMD EPYC ...' / 'Intel(R) Xeon(R) ...' (with family/model numbers): what benchmarks record."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return "unknown CPU"
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def bf16_problem(device: str | torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """Why bf16 should not be used on `device`, or None where it is fast (a GPU, or a CPU with bf16 instructions)."""
    if torch.device(device).type != "cpu":
        return None
    if cpu_bf16_flags(cpuinfo):
        return None
    return ("this CPU has no bf16 instructions (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo), so bf16 "
            "matmuls are emulated, ~160x slower than fp32 here")


def check_bf16(flag: str, device: str | torch.device) -> None:
    """Refuse a bf16 request on a CPU without bf16 instructions, before anything loads."""
    problem = bf16_problem(device)
    if problem:
        raise UserError(f"{flag}: {problem}; drop {flag} (fp32 is the fast dtype on this CPU)")


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where it is fast (a CUDA GPU with bf16, a CPU with bf16 instructions), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32 if bf16_problem(device) else torch.bfloat16


def resolve_dtype(name: str, device: str | torch.device, flag: str = "--dtype") -> torch.dtype:
    """'auto' (the fast dtype), 'float32'/'fp32', 'bfloat16'/'bf16' (refused where bf16 is emulated)."""
    name = str(name).lower()
    if name == "auto":
        return fast_dtype(device)
    if name in ("float32", "fp32"):
        return torch.float32
    if name in ("bfloat16", "bf16"):
        check_bf16(f"{flag} {name}", device)
        return torch.bfloat16
    raise UserError(f"unknown {flag} {name!r}: choose auto, float32 or bfloat16")


def sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in fp32 (autocast off) and returned in the inputs' dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def register_fp32_attention() -> None:
    """Make `attn_implementation="sdpa_fp32"` known to transformers (attention and mask functions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, sdpa_fp32_attention)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def use_fp32_attention(model: torch.nn.Module) -> bool:
    """Switch a CPU model that runs SDPA to fp32 SDPA (for bf16 weights or autocast); True if switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    register_fp32_attention()
    model.set_attn_implementation(FP32_ATTENTION)
    return True
