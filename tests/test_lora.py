"""The fused LoRA path (icae.core.lora) against PEFT's own LoRA modules: same losses and gradients,
same dropout distribution, same checkpoints, less saved memory."""

import pytest
import torch
from torch import nn

import icae.core.lora as lora
from icae.core.collate import collate
from icae.core.config import ICAEConfig
from icae.core.model import ICAE
from icae.errors import UserError
from icae.testing import saved_tensor_bytes, tiny_base_model
from test_model import M, MODES, R, V, mixed_examples, slots_of, rand_ids


def make(impl, mode="shared", dropout=0.0, targets="all-linear", seed=0):
    torch.manual_seed(seed)
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, position_layout="epl", decoder_mode=mode,
                     lora_r=4, lora_dropout=dropout, lora_target_modules=targets, lora_impl=impl)
    model = ICAE(cfg, tiny_base_model("llama"))
    with torch.no_grad():  # LoRA B starts at zero: give it weight, so that the adapter's path counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.train()


def loss_and_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=atol)
    assert grads_a.keys() == grads_b.keys()
    assert any("lora_A" in n for n in grads_a) and "memory_embeddings.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=10 * atol, msg=name)


class FixedMasks:
    """The n-th mask drawn is Bernoulli(1 - p) from a generator seeded with n, whoever draws it."""

    def __init__(self, p):
        self.p, self.n = p, 0

    def draw(self, shape, p=None, device=None):
        g = torch.Generator().manual_seed(1000 + self.n)
        self.n += 1
        return torch.rand(shape, generator=g) < 1 - self.p


class FixedDropout(nn.Module):
    """PEFT's dropout module with its masks taken from FixedMasks."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def forward(self, x):
        return x * self.masks.draw(x.shape) / (1 - self.masks.p)


@pytest.mark.parametrize("mode", MODES)
def test_same_losses_and_gradients_as_peft_without_dropout(mode):
    batch = collate(mixed_examples(), "epl", M, R, V)
    assert_same(loss_and_grads(make("fused", mode), batch), loss_and_grads(make("peft", mode), batch))


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_same_losses_and_gradients_as_peft_with_the_same_dropout_masks(mode, monkeypatch):
    """In float64: this random tiny model amplifies fp32 rounding to ~4e-4 in its gradients."""
    batch = collate(mixed_examples(), "epl", M, R, V)
    peft_model, fused_model = make("peft", mode, 0.3).double(), make("fused", mode, 0.3).double()
    peft_masks, fused_masks = FixedMasks(0.3), FixedMasks(0.3)
    for layer in peft_model._tuner_layers:
        for name in layer.lora_dropout:
            layer.lora_dropout[name] = FixedDropout(peft_masks)
    monkeypatch.setattr(lora, "draw_keep_mask", fused_masks.draw)
    fused = loss_and_grads(fused_model, batch)
    assert fused_masks.n > 0
    peft = loss_and_grads(peft_model, batch)
    assert peft_masks.n == fused_masks.n  # one mask per adapted projection call, in the same order
    assert_same(fused, peft, atol=1e-10)


def test_dropout_masks_are_bernoulli_and_independent():
    torch.manual_seed(0)
    n, p = 1_000_000, 0.05
    a, b = lora.draw_keep_mask((n,), p, "cpu"), lora.draw_keep_mask((n,), p, "cpu")
    sigma = ((1 - p) * p / n) ** 0.5
    assert abs(a.float().mean().item() - (1 - p)) < 5 * sigma
    assert abs((a & b).float().mean().item() - (1 - p) ** 2) < 5 * sigma  # two draws: independent
    assert lora.draw_keep_mask((n,), 0.5, "cpu").float().mean().sub(0.5).abs() < 5 * (0.25 / n) ** 0.5


def test_dropout_is_live_in_training_and_off_in_eval():
    model = make("fused", dropout=0.5)
    batch = collate(mixed_examples(), "epl", M, R, V)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(**batch).loss
        second = model(**batch).loss
        assert first != second, "training draws new masks"
        model.eval()
        reference = make("peft", dropout=0.5).eval()
        torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, atol=1e-6, rtol=0)


def test_bit_packing_round_trip():
    torch.manual_seed(0)
    for mask in (torch.rand(7, 64) < 0.5, torch.ones(3, 8, dtype=torch.bool), torch.zeros(16, dtype=torch.bool),
                 torch.rand(5, 40) < 0.95):
        bits = lora.pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == mask.numel() // 8
        assert torch.equal(lora.unpack_bits(bits, mask.shape), mask)


def test_each_input_is_saved_once_and_masks_as_bits():
    """PEFT keeps a dropped-out copy of the input per projection (+ a byte mask); fused, one input and bits."""
    batch = collate(mixed_examples(), "epl", M, R, V)
    sizes = {}
    for impl in ("peft", "fused"):
        torch.manual_seed(0)
        model = make(impl, "shared", 0.1)
        with saved_tensor_bytes(exclude=model.parameters()) as saved:
            model(**batch)
        sizes[impl] = saved.total
    assert sizes["fused"] < 0.75 * sizes["peft"], sizes


@pytest.mark.parametrize("saved_by, loaded_by", [("fused", "peft"), ("peft", "fused")])
def test_checkpoints_load_either_way(tmp_path, saved_by, loaded_by):
    """A checkpoint saved with one implementation loads into the other: the same tensors under the same
    (PEFT's) names, and the loaded model gives the saving model's memory slots."""
    saver = make(saved_by, "separate")
    assert [n for n, _ in saver.named_parameters()] == [n for n, _ in make(loaded_by, "separate").named_parameters()]
    saver.save_pretrained(tmp_path)
    loaded = ICAE.from_pretrained(tmp_path, base_model=tiny_base_model("llama"), lora_impl=loaded_by).eval()
    assert loaded.config.lora_impl == loaded_by
    mine, theirs = saver.trainable_state_dict(), loaded.trainable_state_dict()
    assert mine.keys() == theirs.keys() and any("lora_A" in k for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    texts = [rand_ids(13, 3), rand_ids(5, 4)]
    with torch.no_grad():
        torch.testing.assert_close(slots_of(loaded, texts), slots_of(saver.eval(), texts), atol=1e-6, rtol=0)


def test_autocast_is_as_close_to_fp32_as_peft():
    """Under bf16 autocast, fused LoRA's loss and gradients stray from fp32 no more than PEFT's do."""
    batch = collate(mixed_examples(), "epl", M, R, V)
    exact_loss, exact = loss_and_grads(make("peft"), batch)
    error = {}
    for impl in ("peft", "fused"):
        model = make(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in exact])
        reference = torch.cat([exact[n].flatten() for n, p in model.named_parameters() if n in exact])
        error[impl] = (abs(loss.item() - exact_loss.item()), ((grads - reference).norm() / reference.norm()).item())
    assert error["fused"][0] < 2 * error["peft"][0] + 1e-3 and error["fused"][1] < 2 * error["peft"][1] + 1e-3, error


def test_unknown_impl_is_refused():
    with pytest.raises(UserError, match="--lora_impl"):
        make("turbo")


def test_norm_and_mlp_inputs_are_not_kept_twice():
    """Even without dropout (PEFT then keeps one input per group too) the fused path saves less: projections
    after a norm keep the norm's input and 1/rms, which the norm keeps anyway; the down projection keeps
    gate and up, which SiLU and the product need anyway (not SiLU's output, not the product)."""
    batch = collate(mixed_examples(), "epl", M, R, V)
    saved = {}
    for impl in ("peft", "fused"):
        model = make(impl, "shared", 0.0)
        with saved_tensor_bytes(exclude=model.parameters()) as meter:
            model(**batch)
        saved[impl] = meter.total
    assert saved["fused"] < 0.8 * saved["peft"], saved


def test_modules_that_compute_otherwise_are_left_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class DoubledRMSNorm(LlamaRMSNorm):  # looks like Llama's, computes otherwise
        def forward(self, x):
            return 2 * super().forward(x)

    base = tiny_base_model("llama")
    layer = base.model.layers[0]
    layer.input_layernorm = DoubledRMSNorm(64, eps=1e-6)
    lora.use_fused_lora(base)
    assert "forward" not in vars(layer.input_layernorm)
    assert "forward" in vars(layer.post_attention_layernorm) and "forward" in vars(layer.mlp)


def test_masks_cut_from_one_word_are_independent():
    """The four 15-bit draws of each 64-bit word: neighbours kept together as often as independence says."""
    torch.manual_seed(0)
    n, p = 2_000_000, 0.3
    keep = lora.draw_keep_mask((n // 4, 4), p, "cpu").float()
    sigma = ((1 - p) * p / (n // 4)) ** 0.5
    for i in range(4):
        assert abs(keep[:, i].mean().item() - (1 - p)) < 5 * sigma, i
    for i, j in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        assert abs((keep[:, i] * keep[:, j]).mean().item() - (1 - p) ** 2) < 5 * sigma, (i, j)


def test_bulk_dropout_keeps_1_minus_p_and_scales_the_kept_values():
    torch.manual_seed(0)
    n, p = 1_000_000, 0.2
    x = torch.rand(n) + 1.0  # no zeros: a zero output means dropped
    y = lora.BulkDropout(p).train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((1 - p) * p / n) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(y.mean().item() - x.mean().item()) < 0.01  # unbiased, as inverted dropout must be


@pytest.mark.parametrize("impl", ["peft", "fused"])
def test_dropout_0_is_bit_identical_to_no_dropout(impl):
    """BulkDropout(0) in training mode gives the same bits as no dropout module at all."""
    batch = collate(mixed_examples(), "epl", M, R, V)
    with_p0, without = make(impl, dropout=0.0), make(impl, dropout=0.0)
    for model, module in [(with_p0, lambda: lora.BulkDropout(0.0).train()), (without, nn.Identity)]:
        for layer in model._tuner_layers:
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = module()
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(with_p0, batch), loss_and_grads(without, batch)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_peft_path_draws_its_masks_in_bulk(monkeypatch):
    """PEFT's LoRA layers train with BulkDropout: every adapted projection call draws from draw_keep_mask."""
    calls = []
    real = lora.draw_keep_mask
    monkeypatch.setattr(lora, "draw_keep_mask", lambda *a: calls.append(a[0]) or real(*a))
    model = make("peft", dropout=0.1)
    model(**collate(mixed_examples(), "epl", M, R, V)).loss.backward()
    assert len(calls) == sum(len(layer.lora_dropout) for layer in model._tuner_layers) * 2  # encoder + decoder
