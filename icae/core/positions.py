"""Position ids of memory tokens: the contract of docs/POSITIONS.md as pure functions, one per section there.

Everything here works on plain ints and lists so tests (and `icae layout`, icae/recipes/layout.py) can
check every worked example without a model. The collator turns these lists into tensors.
"""

from __future__ import annotations

import math

LAYOUTS = ("default", "epl", "epl_fixed")
TASKS = ("ae", "lm", "ft")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        from icae.errors import UserError

        raise UserError(f"unknown position layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    return layout


def segment_spans(length: int, mem_size: int, rate: int) -> list[tuple[int, int]]:
    """(offset, length) of each segment: n = ceil(L / (m*r)) segments of s = ceil(L / n) tokens."""
    if length < 1:
        raise ValueError("a text to compress needs at least one token")
    n = math.ceil(length / (mem_size * rate))
    s = math.ceil(length / n)
    return [(j * s, min(s, length - j * s)) for j in range(n)]


def memory_positions(layout: str, seg_len: int, mem_size: int, rate: int, offset: int = 0) -> list[int]:
    """Positions of one segment's m memory tokens (epl: the centre of the span each summarises)."""
    if layout == "default":
        return list(range(seg_len, seg_len + mem_size))
    if layout == "epl_fixed":
        return [offset + (rate + 1) // 2 + k * rate for k in range(mem_size)]
    if layout == "epl":
        return [offset + _round_half_even((2 * k + 1) * seg_len + mem_size, 2 * mem_size) for k in range(mem_size)]
    check_layout(layout)
    raise AssertionError("unreachable")


def _round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even (torch.round's rule), exactly, in integers.

    The centre of memory token k is ((2k+1)*s + m) / (2m); a float linspace misrounds its exact
    halves when m is not a power of two (m=7, s=74: 37.5 must give 38).
    """
    q, r = divmod(numerator, denominator)
    if 2 * r > denominator or (2 * r == denominator and q % 2 == 1):
        q += 1
    return q


def encoder_positions(layout: str, seg_len: int, mem_size: int, rate: int, offset: int = 0) -> list[int]:
    """Positions of an encoder row `[segment tokens, memory tokens]`."""
    if layout == "default":
        return list(range(seg_len + mem_size))
    text = list(range(offset + 1, offset + seg_len + 1))
    return text + memory_positions(layout, seg_len, mem_size, rate, offset)


def slot_positions(layout: str, text_len: int, mem_size: int, rate: int) -> list[int]:
    """Positions of all n*m memory slots of a text, in segment order, as the decoder sees them."""
    if layout == "default":
        return list(range(len(segment_spans(text_len, mem_size, rate)) * mem_size))
    return [
        p
        for offset, seg_len in segment_spans(text_len, mem_size, rate)
        for p in memory_positions(layout, seg_len, mem_size, rate, offset)
    ]


def decoder_positions(
    layout: str, text_len: int, mem_size: int, rate: int, task: str, num_tokens: int, special_token: bool = True
) -> list[int]:
    """Positions of a decoder row `[slots, special token?, num_tokens tokens]`.

    epl: the AE token sits at 0 so each reconstructed token keeps its original position; for LM
    and FT the first token after the slots sits at L, whatever it is (the [LM]/[FT] token, or
    without one the first continuation token), as in the seed's code.
    """
    n_slots = len(segment_spans(text_len, mem_size, rate)) * mem_size
    n_special = 1 if special_token else 0
    if layout == "default":
        return list(range(n_slots + n_special + num_tokens))
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    if task == "ae" and not special_token:
        raise ValueError("the AE task always has its [AE] token")
    start = 0 if task == "ae" else text_len  # position of the first token after the slots
    return slot_positions(layout, text_len, mem_size, rate) + list(range(start, start + n_special + num_tokens))
