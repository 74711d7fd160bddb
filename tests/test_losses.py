"""The chunked linear cross-entropy against the plain logits -> cross_entropy path."""

import pytest
import torch
import torch.nn.functional as F

from icae.core import losses


def plain(hidden, weight, targets, bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


def data(n=37, d=16, v=50, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.rand(n, generator=g)  # a non-uniform weighting: not only a mean
    return hidden, weight, targets, (torch.randn(v, generator=g) if bias else None), upstream


@pytest.fixture(params=[2**22, 7 * 50, 50])  # one chunk, several uneven chunks, one row per chunk
def chunked(request, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
def test_values_and_hidden_gradient_match_the_plain_path(chunked, bias):
    hidden, weight, targets, b, upstream = data(bias=bias)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours, ref = losses.linear_cross_entropy(h1, weight, targets, b), plain(h2, weight, targets, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad((ours * upstream).sum(), h1)
    (g2,) = torch.autograd.grad((ref * upstream).sum(), h2)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_no_grad_path_matches(chunked):
    hidden, weight, targets, _, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(losses.linear_cross_entropy(hidden, weight, targets), plain(hidden, weight, targets))


def test_a_trained_output_layer_gets_its_gradient():
    hidden, weight, targets, _, upstream = data()
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    (g1,) = torch.autograd.grad((losses.linear_cross_entropy(hidden, w1, targets) * upstream).sum(), w1)
    (g2,) = torch.autograd.grad((plain(hidden, w2, targets) * upstream).sum(), w2)
    torch.testing.assert_close(g1, g2)


def test_no_logit_sized_tensor_is_kept_for_backward(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 8 * 50)
    hidden, weight, targets, _, _ = data(n=64, v=50)
    saved = []

    def record(t):
        saved.append(t.numel())
        return t

    for fn in (plain, losses.linear_cross_entropy):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            fn(hidden.clone().requires_grad_(), weight, targets).sum().backward()
        biggest = max(saved)
        if fn is plain:
            assert biggest >= 64 * 50  # the plain path keeps the (N, V) log-softmax: the check can fail
        else:
            assert biggest <= 64 * 16  # ours keeps an (N, d) gradient


def test_bf16_autocast_close_to_fp32():
    hidden, weight, targets, _, _ = data(n=20, d=32, v=64)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = losses.linear_cross_entropy(h, weight, targets)
    ours.sum().backward()
    assert ours.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(ours, plain(hidden, weight, targets), atol=0.3, rtol=0.05)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="expected hidden"):
        losses.linear_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("scale,softcap", [(0.125, None), (1.0, 0.7), (3.0, 2.0)])
def test_post_processed_logits_match_autograd_through_the_plain_path(chunked, scale, softcap):
    """Granite's logits_scaling and Gemma's soft-cap, in the chunked path with its hand-written gradient."""
    hidden, weight, targets, b, upstream = data(bias=True)

    def reference(h):
        logits = F.linear(h, weight, b).float() * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="none")

    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours, ref = losses.linear_cross_entropy(h1, weight, targets, b, scale, softcap), reference(h2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, plain(hidden, weight, targets, b), atol=1e-3)  # the post-processing matters
    (g1,) = torch.autograd.grad((ours * upstream).sum(), h1)
    (g2,) = torch.autograd.grad((ref * upstream).sum(), h2)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(losses.linear_cross_entropy(hidden, weight, targets, b, scale, softcap), ref)
    w = weight.clone().requires_grad_()  # a trained output layer: the plain path, post-processed too
    head = losses.OutputHead(w, b, scale, softcap)
    torch.testing.assert_close(head.loss(hidden, targets), ref, atol=1e-5, rtol=1e-5)


def test_a_model_whose_logits_icae_cannot_reproduce_is_refused():
    from icae.errors import UserError
    from icae.testing import tiny_base_model

    model = tiny_base_model("llama")
    losses.check_output_head(model)  # a plain head passes

    class Doubled(torch.nn.Linear):  # a post-processing no config attribute announces
        def forward(self, x):
            return super().forward(x) * 2

    doubled = Doubled(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    doubled.weight = model.lm_head.weight
    model.lm_head = doubled
    with pytest.raises(UserError, match=r"\(llama\) post-processes its output logits"):
        losses.check_output_head(model)
