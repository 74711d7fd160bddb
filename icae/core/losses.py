"""Per-token cross-entropy of hidden states through the output embedding, without the logit tensor.

The vocabulary projection is the largest tensor of a training step: 512 tokens x 49,152 (SmolLM2)
fp32 logits are 100 MB, and autograd keeps the log-softmax and creates two gradients of that
size (128k vocabularies at batch 8: several GB). Each token's loss depends on its own hidden row
only, so the gradient of loss_i with respect to h_i, (softmax_i - onehot_i) W, is computed in the
forward pass, chunk by chunk, and kept (tokens x hidden size); backward scales it by the incoming
per-token gradient. Same matmuls as the plain path, no recompute, peak = one chunk of logits.

Some models post-process the output layer's logits in their forward (Granite divides by
`logits_scaling`, Gemma 2/3 soft-cap them with tanh): `output_head(model)` says how, and every
loss, perplexity and decoding step goes through it, so ICAE scores tokens as the model itself does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icae.errors import UserError

CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in fp32): smaller chunks made the matmuls slower on CPU


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def postprocess(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The model's own transform of the output layer's logits: times `scale`, then softcap * tanh(x / softcap)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_losses(hidden, weight, bias, targets, start, stop, with_grad: bool, scale=1.0, softcap=None):
    logits = F.linear(hidden[start:stop], weight, bias).float()
    if scale != 1.0:
        logits.mul_(scale)
    capped = None
    if softcap is not None:
        capped = logits.div_(softcap).tanh_()  # tanh(z / c), kept for the gradient
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
    loss = lse - target_logit
    if not with_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    probs[torch.arange(stop - start, device=probs.device), targets[start:stop]] -= 1.0
    if capped is not None:  # d(c tanh(z / c))/dz = 1 - tanh^2
        probs.mul_(1.0 - capped.square_())
    if scale != 1.0:
        probs.mul_(scale)
    return loss, probs.to(weight.dtype) @ weight  # under autocast, in the autocast dtype like the forward matmul


def _all_chunks(hidden, weight, bias, targets, rows, with_grad: bool, scale=1.0, softcap=None):
    """(per-token losses, gradients w.r.t. hidden or None), chunk by chunk."""
    n = hidden.shape[0]
    parts = [_chunk_losses(hidden, weight, bias, targets, s, min(s + rows, n), with_grad, scale, softcap)
             for s in range(0, n, rows)]
    losses = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if not with_grad:
        return losses, None
    return losses, torch.cat([p[1] for p in parts]).to(hidden.dtype) if parts else hidden.new_zeros(hidden.shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, scale, softcap):
        losses, grad_hidden = _all_chunks(hidden, weight, bias, targets, rows, True, scale, softcap)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss[:, None].to(grad_hidden.dtype), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """Per-token losses (fp32, reduction none) of `hidden` (N, d) projected by `weight` (V, d) (+ `bias`),
    the logits post-processed as `postprocess(logits, scale, softcap)`."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, d) and targets (N,), got {tuple(hidden.shape)} / {tuple(targets.shape)}")
    rows = chunk_rows(weight.shape[0])
    trained_head = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and trained_head:  # a trained output layer: the plain path
        logits = postprocess(F.linear(hidden, weight, bias).float(), scale, softcap)
        return F.cross_entropy(logits, targets, reduction="none")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, scale, softcap)
    with torch.no_grad():
        return _all_chunks(hidden, weight, bias, targets, rows, False, scale, softcap)[0]


@dataclass(frozen=True)
class OutputHead:
    """hidden -> logits as the model's forward computes them: its output layer, then its post-processing."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0  # Granite: 1 / logits_scaling; Cohere: logit_scale
    softcap: float | None = None  # Gemma 2/3: final_logit_softcapping

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return postprocess(F.linear(hidden, self.weight, self.bias), self.scale, self.softcap)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token losses of `hidden` (N, d) against `targets` (N,), without the whole logit tensor."""
        return linear_cross_entropy(hidden, self.weight, targets, self.bias, self.scale, self.softcap)


def output_head(model) -> OutputHead:
    """How `model` (a HF causal LM) turns its last hidden states into logits, from its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer = model.get_output_embeddings()
    if layer is None or not hasattr(layer, "weight"):
        raise UserError(f"the base model ({config.model_type}) has no output layer; pass a causal language model")
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite
        scale /= config.logits_scaling
    if getattr(config, "logit_scale", None):  # Cohere
        scale *= config.logit_scale
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return OutputHead(layer.weight, getattr(layer, "bias", None), float(scale), softcap and float(softcap))


def check_output_head(model) -> None:
    """Refuse a model whose own forward turns hidden states into logits otherwise than `output_head` does
    (a post-processing icae does not know): its losses and decoding would silently differ from the model's.

    One forward of a few tokens, comparing the model's logits with ours on the hidden states its output
    layer received. A model that cannot run here (on the meta device, or failing) is not checked.
    """
    layer = model.get_output_embeddings()
    head = output_head(model)
    if layer is None or head.weight.device.type == "meta":
        return
    seen = {}

    def keep_input(module, args, out) -> None:  # returns None: a hook's return value would replace the output
        seen.setdefault("hidden", args[0])

    hook = layer.register_forward_hook(keep_input)
    ids = torch.arange(1, 5, device=head.weight.device)[None] % head.weight.shape[0]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            theirs = model(input_ids=ids, use_cache=False).logits.float()
    except Exception:  # noqa: BLE001 - an unusual model that cannot run a bare forward: nothing to compare
        return
    finally:
        hook.remove()
        model.train(training)
    with torch.no_grad():
        ours = head.logits(seen["hidden"]).float() if "hidden" in seen else None
    tol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    if ours is None or ours.shape != theirs.shape or not torch.allclose(
            ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp(min=1e-6))):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise UserError(
            f"the base model ({kind}) post-processes its output logits in a way icae does not reproduce, so its "
            "losses and generations would be wrong; use another base model"
        )
