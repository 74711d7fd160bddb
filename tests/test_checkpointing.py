"""Gradient checkpointing policies (icae.core.checkpointing): off, full and selective give the same
losses and gradients, in every decoder mode and with either LoRA implementation, and hold less memory
in that order; the pretrain flag."""

import json

import pytest
import torch

from icae.core.collate import collate
from icae.core.config import ICAEConfig
from icae.core.model import ICAE
from icae.errors import UserError
from icae.recipes.pretrain import main as pretrain
from icae.recipes.pretrain import parse_args
from icae.testing import LiveBytes, save_tiny_model, tiny_base_model
from test_model import M, MODES, R, V, mixed_examples

POLICIES = ("off", "full", "selective")


def make(mode, impl, policy, dropout=0.1):
    torch.manual_seed(0)
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, position_layout="epl", decoder_mode=mode,
                     lora_r=4, lora_dropout=dropout, lora_target_modules="all-linear", lora_impl=impl)
    model = ICAE(cfg, tiny_base_model("llama"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.train()
    if policy != "off":
        model.gradient_checkpointing_enable({"policy": policy})
    return model


def run(model, batch):
    torch.manual_seed(5)  # the dropout masks: the same draws whatever the policy (recompute restores the RNG)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["peft", "fused"])
@pytest.mark.parametrize("mode", MODES)
def test_policies_give_the_same_losses_and_gradients(mode, impl):
    batch = collate(mixed_examples(), "epl", M, R, V)
    loss, grads = run(make(mode, impl, "off"), batch)
    assert "memory_embeddings.weight" in grads and any("lora_A" in n for n in grads)
    for policy in ("full", "selective"):
        other_loss, other = run(make(mode, impl, policy), batch)
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        assert other.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other[name], grads[name], atol=1e-5, rtol=1e-4, msg=f"{policy}: {name}")


def held_after_forward(impl, policy):
    batch = collate(mixed_examples(), "epl", M, R, V)
    model = make("shared", impl, policy)
    with LiveBytes() as meter:
        out = model(**batch)
        held = meter.live  # what the forward leaves for backward (+ the loss)
        out.loss.backward()
    assert meter.peak >= held
    return held


def test_selective_holds_less_than_off_and_more_than_full():
    held = {policy: held_after_forward("peft", policy) for policy in POLICIES}
    assert held["full"] < held["selective"] < 0.8 * held["off"], held


def test_fused_lora_holds_what_selective_would_without_recompute():
    """The fused path keeps what selective checkpointing would (matmul outputs, the norms' inputs, gate and
    up; no dropout copies, no SiLU output or product); selective has nothing left to drop."""
    held = {policy: held_after_forward("fused", policy) for policy in POLICIES}
    peft = held_after_forward("peft", "selective")
    assert held["off"] < 0.6 * held_after_forward("peft", "off") and held["off"] < peft, (held, peft)
    assert held["full"] < held["off"] and held["selective"] < 1.1 * held["off"], held


def test_policy_switch_and_bad_values():
    model = make("frozen", "peft", "selective", dropout=0.0)
    assert model.checkpoint_policy == "selective" and model.base.is_gradient_checkpointing
    model.gradient_checkpointing_enable({"policy": "off"})
    assert not model.base.is_gradient_checkpointing
    with pytest.raises(UserError, match="--gradient_checkpointing_policy"):
        model.gradient_checkpointing_enable({"policy": "some"})


def test_pretrain_flag():
    _, _, args = parse_args(["--gradient_checkpointing_policy", "selective"])
    assert args.activation_checkpointing and args.gradient_checkpointing_policy == "selective"
    _, _, args = parse_args(["--gradient_checkpointing_policy", "off"])
    assert not args.activation_checkpointing
    with pytest.raises(UserError, match="contradicts --gradient_checkpointing_policy"):
        parse_args(["--gradient_checkpointing", "True", "--gradient_checkpointing_policy", "off"])
    with pytest.raises(UserError, match="--gradient_checkpointing_policy"):
        parse_args(["--gradient_checkpointing_policy", "partial"])


@pytest.mark.parametrize("flags", ["--gradient_checkpointing True",
                                   "--gradient_checkpointing_policy selective --lora_impl fused"])
def test_pretrain_runs_with_checkpointing(tmp_path, flags):
    """The Trainer enables checkpointing through ICAE.activation_checkpointing_enable (every_n_layers, offload)."""
    model = save_tiny_model(tmp_path / "tiny")
    texts = [" ".join(["alpha beta gamma delta"] * (10 + i)) for i in range(8)]
    (tmp_path / "train.json").write_text(json.dumps(texts))
    argv = (f"--output_dir {tmp_path}/out --model_name_or_path {model} --train_file {tmp_path}/train.json "
            f"--eval_strategy no --lora_r 8 --report_to none --max_steps 1 {flags}").split()
    assert pretrain(argv) == 0
    saved = json.loads((tmp_path / "out" / "icae_config.json").read_text())
    assert saved["lora_impl"] == ("fused" if "fused" in flags else "peft")
