"""Counting FLOPs: the analytic count of one training step (`step_flops`, documented in
benchmarks/README.md) and torch's own count (`flop_counter_mode`), which the tests hold equal."""

from __future__ import annotations

import math
from dataclasses import dataclass

from step_bench.plan import LENGTH, LORA_R, LORA_TARGETS, MEM_SIZE, RATE


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
        return sum(r * sum(sizes[t]) for t in target_names(targets))


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_names(targets) -> tuple:
    """LoRA targets as names: a tuple, a comma list, or 'all-linear' (every projection of a layer)."""
    if isinstance(targets, str):
        return ALL_LINEAR if targets == "all-linear" else tuple(t for t in targets.split(",") if t)
    return tuple(targets)


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
    stops early, before the frozen down projection, whose output no backward needs; `selective`
    checkpointing keeps every matmul and attention output, so it re-runs no matmul), and fused
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
    adapted_down = "down_proj" in target_names(lora_targets)

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
        dec_lora = decoder == "shared"  # the seed's version: the decoder is the LoRA-adapted encoder
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


def flop_counter_mode():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernels and the fused LoRA's projection
    (icae.core.lora, a custom op) it has no formula for."""
    import torch
    from torch.utils import flop_counter as fc

    import icae.core.lora  # noqa: F401 - registers torch.ops.icae

    aten = torch.ops.aten

    def lora_linear(x, weight, bias, lora_a, lora_b, *args, out_shape=None, **kwargs):
        n, d = x  # base, A and B matmuls
        return 2 * n * (d * weight[0] + d * lora_a[0] + lora_a[0] * lora_b[0])

    custom = {torch.ops.icae.lora_linear: lora_linear}
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
