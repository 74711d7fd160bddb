"""Per-token cross-entropy of hidden states through the output embedding, without the logit tensor.

The vocabulary projection is the largest tensor of a training step: 512 tokens x 49,152 (SmolLM2)
fp32 logits are 100 MB, and autograd keeps the log-softmax and creates two gradients of that
size (128k vocabularies at batch 8: several GB). Each token's loss depends on its own hidden row
only, so the gradient of loss_i with respect to h_i, (softmax_i - onehot_i) W, is computed in the
forward pass, chunk by chunk, and kept (tokens x hidden size); backward scales it by the incoming
per-token gradient. Same matmuls as the plain path, no recompute, peak = one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in fp32): smaller chunks made the matmuls slower on CPU


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_losses(hidden, weight, bias, targets, start, stop, with_grad: bool):
    logits = F.linear(hidden[start:stop], weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
    loss = lse - target_logit
    if not with_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    probs[torch.arange(stop - start, device=probs.device), targets[start:stop]] -= 1.0
    return loss, probs.to(weight.dtype) @ weight  # under autocast, in the autocast dtype like the forward matmul


def _all_chunks(hidden, weight, bias, targets, rows, with_grad: bool):
    """(per-token losses, gradients w.r.t. hidden or None), chunk by chunk."""
    n = hidden.shape[0]
    parts = [_chunk_losses(hidden, weight, bias, targets, s, min(s + rows, n), with_grad) for s in range(0, n, rows)]
    losses = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if not with_grad:
        return losses, None
    return losses, torch.cat([p[1] for p in parts]).to(hidden.dtype) if parts else hidden.new_zeros(hidden.shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        losses, grad_hidden = _all_chunks(hidden, weight, bias, targets, rows, with_grad=True)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss[:, None].to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses (fp32, reduction none) of `hidden` (N, d) projected by `weight` (V, d) (+ `bias`)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, d) and targets (N,), got {tuple(hidden.shape)} / {tuple(targets.shape)}")
    rows = chunk_rows(weight.shape[0])
    trained_head = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and trained_head:  # a trained output layer: the plain path
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)
    with torch.no_grad():
        return _all_chunks(hidden, weight, bias, targets, rows, with_grad=False)[0]
