"""Activation checkpointing policies: what a checkpointed decoder layer keeps for its backward.

`full`: only the layer's input; backward re-runs the whole layer, matmuls included (~1/3 more
FLOPs). `selective`: torch's selective activation checkpointing with a policy that also keeps
the outputs of the matmuls and attention kernels, so backward re-runs only the elementwise work
between them (norms, rotary, SiLU, residual adds, dropout masks): little time, and most of the
memory of a layer that keeps everything. `off`: no checkpointing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from icae.errors import UserError

POLICIES = ("off", "full", "selective")

# Matmuls and fused attention kernels: expensive to recompute. Everything else is recomputed.
_SAVED = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
SAVED_OPS = frozenset(getattr(torch.ops.aten, name) for name in _SAVED if hasattr(torch.ops.aten, name))


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save matmul and attention outputs (also flash-attn's ops, and the fused LoRA's: icae.core.lora),
    recompute the rest."""
    if op.overloadpacket in SAVED_OPS or op.namespace in ("flash_attn", "icae"):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def checkpoint_contexts(policy: str, recompute_context) -> tuple:
    """(forward context, recompute context) for torch.utils.checkpoint's `context_fn`.

    `recompute_context` is the caller's own context for the recompute (ICAE re-enters the adapter
    state the layer ran with).
    """
    if policy != "selective":
        return contextlib.nullcontext(), recompute_context
    forward, recompute = create_selective_checkpoint_contexts(selective_policy)
    return forward, _both(recompute, recompute_context)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise UserError(f"unknown --gradient_checkpointing_policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy

