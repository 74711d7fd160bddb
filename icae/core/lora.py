"""LoRA projections that keep their input once, not one dropout copy per projection.

PEFT computes `base(x) + B(A(dropout(x))) * s` with autograd saving, for every adapted projection,
the dropped-out copy of x (4 bytes a value in fp32) and its mask (1 byte): q, k and v each keep
their own copy of the same input, gate and up another two. `LoraLinearFunction` saves x itself
(projections that share an input share that one tensor) and the dropout mask as bits, and rebuilds
the dropped-out input in backward. It also adds the adapter into the base matmul's output in place
(`addmm_`) instead of materialising B's product, its scaled copy and the sum. Drawing the mask and
the projection are two custom ops: selective checkpointing caches each whole (bits and outputs), so
its recompute costs nothing here.

The same distribution as PEFT's LoRA: each projection draws its own mask, every value kept
independently with probability 1 - p (to 2^-31: 31-bit integers against a threshold, about twice as
fast as torch's Bernoulli sampler on CPU) and scaled by 1 / (1 - p). With dropout 0, or in eval
mode, the result and the gradients are PEFT's (tests/test_lora.py). The parameters stay PEFT's
(`lora_A` / `lora_B`, same names): checkpoints load either way.
"""

from __future__ import annotations

import math
import types
import weakref

import torch
import torch.nn.functional as F


# Bit packing of bool masks, 8 values per byte, with 64-bit multiplies (a few cheap passes over n/8 words).
_PACK = 0x0102040810204080  # moves byte i's low bit to bit 56 + i
_SPREAD = 0x0101010101010101  # copies a byte into all 8 bytes of a word
_SELECT = 0x8040201008040201 - 2**64  # keeps bit i of byte i (as a signed int64)
_LOW7 = 0x7F7F7F7F7F7F7F7F


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of n values (n a multiple of 8) as n/8 bytes."""
    words = mask.contiguous().view(-1).view(torch.uint8).view(torch.int64)
    return ((words * _PACK) >> 56).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` packed in `bits` (which may carry up to 7 padding values at the end)."""
    words = (bits.to(torch.int64) * _SPREAD) & _SELECT  # byte i: bit i of the packed byte, or 0
    words = ((words + _LOW7) >> 7) & _SPREAD  # each byte: 1 where non-zero
    mask = words.view(torch.bool)
    n = math.prod(shape)
    return (mask if mask.numel() == n else mask[:n]).view(shape)


def draw_keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) for every value: 31 random bits against round((1 - p) * 2^31)."""
    threshold = round((1.0 - p) * 2**31)
    return torch.empty(shape, dtype=torch.int32, device=device).random_(0, 2**31) < threshold


# Two custom ops, so that selective checkpointing (icae.core.checkpointing) sees each as ONE op and caches its
# outputs: the recompute then neither draws the masks again nor redoes any of the projection's work.
@torch.library.custom_op("icae::lora_keep_bits", mutates_args=())
def keep_bits(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask of x (kept: 1), drawn with draw_keep_mask, packed 8 values a byte (zero-padded)."""
    n = x.numel()
    keep = draw_keep_mask((n + (-n) % 8,), p, x.device)
    keep[n:] = False
    return pack_bits(keep)


@keep_bits.register_fake
def _(x, p):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op("icae::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, bits: torch.Tensor | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + bias + alpha (masked x) A^T B^T, (masked x) A^T) for 2-d x; masked: the zeros of `bits` dropped."""
    y = F.linear(x, weight, bias)
    a = torch.mm(x if bits is None else x * unpack_bits(bits, x.shape), lora_a.t())
    y.addmm_(a, lora_b.t(), alpha=alpha)
    return y, a


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, bits, alpha):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + s/(1-p) * ((x * mask) A^T) B^T, saving x, the mask as bits and (x * mask) A^T."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        bits = torch.ops.icae.lora_keep_bits(x2, p) if p > 0 else None
        alpha = scaling / (1.0 - p)  # the dropout's 1/(1-p), applied on the rank-r side
        y, a = torch.ops.icae.lora_linear(x2, weight, bias, lora_a, lora_b, bits, alpha)
        ctx.save_for_backward(x, bits, a, weight, lora_a, lora_b)
        ctx.alpha = alpha
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, bits, a, weight, lora_a, lora_b = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        keep = None if bits is None else unpack_bits(bits, x2.shape)
        grad_a = torch.mm(g2, lora_b).mul_(ctx.alpha)  # (N, r), includes s/(1-p)
        grad_b = torch.mm(g2.t(), a).mul_(ctx.alpha)
        grad_lora_a = torch.mm(grad_a.t(), x2 if keep is None else x2 * keep)
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight)
            if keep is None:
                grad_x.addmm_(grad_a, lora_a)
            else:
                grad_x.add_(torch.mm(grad_a, lora_a).mul_(keep))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g2.t(), x2)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_lora_a, grad_b, None, None


_last_cast: list = [None, None, None]  # (weakref to an input, its version, its autocast copy)


def _autocast_input(x: torch.Tensor, dtype) -> torch.Tensor:
    """x in the autocast dtype; q, k, v (and gate, up) read the same input and share one copy."""
    ref, version, cast = _last_cast
    if ref is not None and ref() is x and x._version == version and cast.dtype == dtype and cast._version == 0:
        return cast
    cast = x.to(dtype)
    _last_cast[:] = [weakref.ref(x), x._version, cast]
    return cast


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's lora.Linear.forward for one active vanilla adapter, through LoraLinearFunction."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    plain = (self.disable_adapters or self.merged or adapter not in self.lora_A or args or kwargs
             or adapter in self.lora_variant or getattr(self, "lora_bias", {}).get(adapter, False)
             or not isinstance(self.base_layer, torch.nn.Linear)
             or (not autocast and not x.dtype == weight.dtype == self.lora_A[adapter].weight.dtype))
    if plain:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if not autocast:
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, self.scaling[adapter], p)
    dtype = torch.get_autocast_dtype(device)  # cast as autocast would, then run the function without it
    weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        return LoraLinearFunction.apply(_autocast_input(x, dtype), weight, bias, lora_a, lora_b,
                                        self.scaling[adapter], p)


def use_fused_lora(layers) -> None:
    """Route PEFT LoRA Linear layers' forward through LoraLinearFunction (other layer types are left alone)."""
    from peft.tuners.lora import Linear

    for layer in layers:
        if type(layer) is Linear and not hasattr(layer, "_peft_forward"):
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
