"""LoRA projections that keep their input once, not one dropout copy per projection.

PEFT computes `base(x) + B(A(dropout(x))) * s` with autograd saving, for every adapted projection,
the dropped-out copy of x (4 bytes a value in fp32) and its mask (1 byte): q, k and v each keep
their own copy of the same input, gate and up another two. `LoraLinearFunction` saves x itself
(projections that share an input share that one tensor) and the dropout mask as bits, and rebuilds
the dropped-out input in backward. It also adds the adapter into the base matmul's output in place
(`addmm_`) instead of materialising B's product, its scaled copy and the sum. Drawing the mask and
the projection are one custom op: selective checkpointing caches it whole (outputs and bits), so its
recompute costs nothing here.

The same distribution as PEFT's LoRA: each projection draws its own mask, every value kept
independently with probability 1 - p (to 2^-15: 15-bit integers against a threshold, four of them cut
from each 64-bit random word, 2.5x cheaper than torch's Bernoulli sampler on CPU; `draw_keep_mask`)
and scaled by 1 / (1 - p). With dropout 0, or in eval mode, the result and the gradients are PEFT's
(tests/test_lora.py). The parameters stay PEFT's (`lora_A` / `lora_B`, same names): checkpoints load
either way. PEFT's own path draws its masks the same way (`BulkDropout`, installed by ICAE).
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


def unpack_bits(bits: torch.Tensor, shape, dtype=torch.bool) -> torch.Tensor:
    """The mask of `shape` packed in `bits` (which may carry up to 7 padding values at the end), as 0/1 of
    `dtype` (a float mask multiplies several times faster than a bool one on CPU)."""
    words = (bits.to(torch.int64) * _SPREAD) & _SELECT  # byte i: bit i of the packed byte, or 0
    words = ((words + _LOW7) >> 7) & _SPREAD  # each byte: 1 where non-zero
    mask = words.view(torch.uint8)
    n = math.prod(shape)
    mask = (mask if mask.numel() == n else mask[:n]).view(shape)
    return mask.view(torch.bool) if dtype == torch.bool else mask.to(dtype)


KEEP_BITS = 15  # resolution of the keep probability: 2^-15


def draw_keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) for every value (bool), to 2^-15: 15-bit random integers against round((1 - p) * 2^15).

    The random number generator, not the comparison, is the cost (torch's Bernoulli sampler draws one
    32-bit number and a float per value): each 64-bit word of `random_()` (uniform on [0, 2^63)) is cut
    into four 16-bit pieces whose low 15 bits are all random, so a mask of n values draws n/4 words."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    draws = words.view(torch.int16)[:n] & (2**KEEP_BITS - 1)  # little-endian or not, each piece's low 15 bits
    return (draws < round((1.0 - p) * 2**KEEP_BITS)).view(shape)


class BulkDropout(torch.nn.Dropout):
    """nn.Dropout (inverted: kept values scaled by 1 / (1 - p)) with its masks from `draw_keep_mask`: the same
    distribution at 2.5x less cost on CPU. The identity in eval mode or with p = 0 (not even a copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = draw_keep_mask(x.shape, self.p, x.device)
        return (x * keep.to(x.dtype)).mul_(1.0 / (1.0 - self.p))


def use_bulk_dropout(model: torch.nn.Module) -> None:
    """Swap PEFT's LoRA dropout modules (torch.nn.Dropout) for BulkDropout of the same p."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout:
                    replacement = BulkDropout(dropout.p)
                    replacement.train(dropout.training)
                    dropouts[name] = replacement


# One custom op, so that selective checkpointing (icae.core.checkpointing) sees the mask draw and the projection
# as ONE op and caches its outputs: the recompute then neither draws the mask again nor redoes any of its work.
@torch.library.custom_op("icae::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, p: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For 2-d x: (x W^T + bias + alpha (x * mask) A^T B^T, (x * mask) A^T, the mask packed in bits), the mask
    drawn with draw_keep_mask (kept: 1; no mask and empty bits when p = 0)."""
    y = F.linear(x, weight, bias)
    if p > 0:
        n = x.numel()
        keep = draw_keep_mask((n + (-n) % 8,), p, x.device)
        bits = pack_bits(keep)
        x = x * keep[:n].view(x.shape).view(torch.uint8).to(x.dtype)
    else:
        bits = x.new_empty(0, dtype=torch.uint8)
    a = torch.mm(x, lora_a.t())
    y.addmm_(a, lora_b.t(), alpha=alpha)
    return y, a, bits


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, p, alpha):
    bits = (x.numel() + 7) // 8 if p > 0 else 0
    return (x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0]),
            x.new_empty(bits, dtype=torch.uint8))


def _rebuild(recipe: str, t0, t1, t2, t3):
    """A projection's input from what was saved: itself ("x"), the RMSNorm that made it from its input and
    1/rms ("norm": bit-identical, the norm's own ops), or the gated MLP's gate and up outputs ("swiglu")."""
    if recipe == "norm":
        return t3 * (t1.to(torch.float32) * t2).to(t1.dtype)
    if recipe == "swiglu":
        return F.silu(t0) * t1
    return t0


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + s/(1-p) ((x * mask) A^T) B^T (no LoRA term when lora_a is None), saving the mask
    as bits, (x * mask) A^T, and what rebuilds x in backward (see `_rebuild`) instead of x when that is kept
    anyway: the norm's input and 1/rms (saved by the norm), the MLP's gate and up outputs (which SiLU and
    the product need in any case; the product itself and SiLU's output are then not kept)."""

    @staticmethod
    def forward(ctx, recipe, t0, t1, t2, t3, weight, bias, lora_a, lora_b, scaling: float, p: float):
        x = _rebuild(recipe, t0, t1, t2, t3) if recipe == "swiglu" else t0  # "norm": t0 is the norm's output
        x2 = x.reshape(-1, x.shape[-1])
        if lora_a is None:
            y, a, bits, alpha = F.linear(x2, weight, bias), None, None, 0.0
        else:
            alpha = scaling / (1.0 - p)  # the dropout's 1/(1-p), applied on the rank-r side
            y, a, bits = torch.ops.icae.lora_linear(x2, weight, bias, lora_a, lora_b, p, alpha)
        kept = {"x": (t0, None, None), "norm": (t1, t2, t3), "swiglu": (t0, t1, None)}[recipe]
        ctx.save_for_backward(*kept, bits if p > 0 else None, a, weight, lora_a, lora_b)
        ctx.recipe, ctx.alpha = recipe, alpha
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        k0, k1, k2, bits, a, weight, lora_a, lora_b = ctx.saved_tensors
        recipe = ctx.recipe
        x = _rebuild(recipe, None, k0, k1, k2) if recipe == "norm" else _rebuild(recipe, k0, k1, None, None)
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.mm(g2, weight)
        grad_lora_a = grad_b = None
        if lora_a is not None:
            keep = None if bits is None else unpack_bits(bits, x2.shape, x2.dtype)
            grad_a = torch.mm(g2, lora_b).mul_(ctx.alpha)  # (N, r), includes s/(1-p)
            grad_b = torch.mm(g2.t(), a).mul_(ctx.alpha)
            grad_lora_a = torch.mm(grad_a.t(), x2 if keep is None else x2 * keep)
            if keep is None:
                grad_x.addmm_(grad_a, lora_a)
            else:
                grad_x.add_(torch.mm(grad_a, lora_a).mul_(keep))
        grad_x = grad_x.view(x.shape)
        grad_w = torch.mm(g2.t(), x2) if ctx.needs_input_grad[5] else None
        grad_bias = g2.sum(0) if ctx.needs_input_grad[6] else None
        grads = [None] * 4
        if recipe == "swiglu":  # through x = silu(gate) * up, as autograd would
            grads[:2] = [torch.ops.aten.silu_backward(grad_x * k1, k0), grad_x * F.silu(k0)]
        else:
            grads[0] = grad_x
        return None, *grads, grad_w, grad_bias, grad_lora_a, grad_b, None, None


_last_cast: list = [None, None, None]  # (weakref to an input, its version, its autocast copy)
_last_norm: list = [None, None, None]  # (weakref to a norm's output, its version, (input, 1/rms, weight) weakly)


def _autocast_input(x: torch.Tensor, dtype) -> torch.Tensor:
    """x in the autocast dtype; q, k, v (and gate, up) read the same input and share one copy."""
    ref, version, cast = _last_cast
    if ref is not None and ref() is x and x._version == version and cast.dtype == dtype and cast._version == 0:
        return cast
    cast = x.to(dtype)
    _last_cast[:] = [weakref.ref(x), x._version, cast]
    return cast


def _norm_parts(x: torch.Tensor):
    """(input, 1/rms, weight) of the RMSNorm whose output x is (the last one run), or None."""
    ref, version, parts = _last_norm
    if ref is None or ref() is not x or x._version != version:
        return None
    parts = [r() for r in parts]
    return None if any(t is None for t in parts) else parts


def _rms_norm_forward(self, hidden_states):
    """Llama's RMSNorm, op for op, remembering its input and 1/rms for the projections that read its output."""
    input_dtype = hidden_states.dtype
    hidden = hidden_states.to(torch.float32)
    rstd = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    out = self.weight * (hidden * rstd).to(input_dtype)
    if torch.is_grad_enabled() and input_dtype == torch.float32:
        _last_norm[:] = [weakref.ref(out), out._version, [weakref.ref(t) for t in (hidden_states, rstd, self.weight)]]
    return out


def _projection(layer, x: torch.Tensor):
    """(weight, bias, lora_a or None, lora_b, scaling, p) of a linear layer as it runs now, or None where
    the fused path does not apply (PEFT's own forward then runs)."""
    from peft.tuners.lora import Linear

    if type(layer) is torch.nn.Linear:
        return layer.weight, layer.bias, None, None, 0.0, 0.0
    if type(layer) is not Linear or not isinstance(layer.base_layer, torch.nn.Linear) or layer.merged:
        return None
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    if layer.disable_adapters:
        return weight, bias, None, None, 0.0, 0.0
    adapter = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    if (adapter not in layer.lora_A or adapter in layer.lora_variant
            or getattr(layer, "lora_bias", {}).get(adapter, False)):
        return None
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return weight, bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter], p


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's lora.Linear.forward for one active vanilla adapter, through LoraLinearFunction."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    proj = None if args or kwargs else _projection(self, x)
    if proj is None or proj[2] is None or (
            not autocast and not x.dtype == proj[0].dtype == proj[2].dtype):
        return self._peft_forward(x, *args, **kwargs)
    weight, bias, lora_a, lora_b, scaling, p = proj
    if not autocast:
        norm = _norm_parts(x)
        recipe, inputs = ("x", (x, None, None, None)) if norm is None else ("norm", (x, *norm))
        return LoraLinearFunction.apply(recipe, *inputs, weight, bias, lora_a, lora_b, scaling, p)
    dtype = torch.get_autocast_dtype(device)  # cast as autocast would, then run the function without it
    weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        return LoraLinearFunction.apply("x", _autocast_input(x, dtype), None, None, None, weight, bias, lora_a,
                                        lora_b, scaling, p)


def _mlp_forward(self, x):
    """The gated MLP, down(silu(gate(x)) * up(x)), with the down projection keeping gate and up only."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    proj = _projection(self.down_proj, gate)
    if proj is None or torch.is_autocast_enabled(x.device.type) or not gate.dtype == up.dtype == proj[0].dtype:
        return self.down_proj(self.act_fn(gate) * up)
    return LoraLinearFunction.apply("swiglu", gate, up, None, None, *proj)


def _same(module, forward, x) -> bool:
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.equal(module(x), forward(module, x))
    finally:
        module.train(training)


def _is_gated_silu_mlp(module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def use_fused_lora(model: torch.nn.Module) -> None:
    """Route PEFT LoRA Linear layers' forward through LoraLinearFunction, and let the RMSNorms and gated
    MLPs that feed projections keep one copy of what the projections need. Every swap of a norm or an MLP
    is checked once against the module's own output on a random input; one that differs is left alone."""
    from peft.tuners.lora import Linear

    modules = list(model.modules())
    for layer in modules:
        if type(layer) is Linear and not hasattr(layer, "_peft_forward"):
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
    for module in modules:
        if "forward" in vars(module):
            continue
        weight = getattr(module, "weight", None)
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and weight is not None:
            forward, width = _rms_norm_forward, weight.shape[0]
        elif _is_gated_silu_mlp(module):
            forward = _mlp_forward
            weight, width = next(module.parameters()), module.gate_proj.in_features
        else:
            continue
        if weight.device.type == "meta":  # nothing to check against (a model built only to be inspected)
            continue
        g = torch.Generator(weight.device).manual_seed(0)  # the check leaves the global random state alone
        x = torch.randn(3, width, generator=g, device=weight.device, dtype=weight.dtype)
        if _same(module, forward, x):
            module.forward = types.MethodType(forward, module)
