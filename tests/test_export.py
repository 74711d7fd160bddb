"""`icae export` and shipped checkpoints by name, on the memorised tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

import icae.core.config as config_module
from icae.core.model import ICAE, load_checkpoint
from icae.errors import UserError
from icae.recipes.export import main as export
from test_inference import TEXTS, one_thread  # noqa: F401  (fixture)
from test_inference import save_sharp_base_model, train_memorised_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = train_memorised_model(model_name_or_path=save_sharp_base_model(root / "base"))
    model.training_info = {"model_max_length": 64, "command": "icae pretrain ..."}
    model.save_pretrained(root / "run")
    (root / "run" / "trainer_state.json").write_text(json.dumps({"global_step": 80}))
    (root / "eval.json").write_text(json.dumps(TEXTS))
    return root


def test_export_float16_without_tokenizer_and_with_held_out_metrics(trained, capsys):
    out = trained / "exported"
    assert export(["--checkpoint", str(trained / "run"), "--output", str(out), "--eval_texts", "4",
                   "--eval_file", str(trained / "eval.json")]) == 0
    weights, original = load_file(out / "icae_weights.safetensors"), load_file(trained / "run" / "icae_weights.safetensors")
    assert weights.keys() == original.keys() and all(w.dtype == torch.float16 for w in weights.values())
    assert all(torch.equal(weights[k], original[k].half()) for k in weights)
    assert not list(out.glob("tokenizer*"))
    info = json.loads((out / "icae_config.json").read_text())["training"]
    assert info["steps"] == 80 and info["command"] == "icae pretrain ..." and info["model_max_length"] == 64
    metrics = info["held_out_metrics"]
    assert metrics["num_texts"] == 4 and metrics["token_accuracy"] == 1.0  # the memorised texts survive fp16
    assert "MiB" in capsys.readouterr().out


def test_shipped_checkpoint_loads_by_name(trained, monkeypatch):
    shipped = trained / "shipped"
    export(["--checkpoint", str(trained / "run"), "--output", str(shipped / "tiny-icae")])
    monkeypatch.setattr(config_module, "SHIPPED_DIR", shipped)
    assert config_module.shipped_checkpoints() == ["tiny-icae"]
    model = load_checkpoint("tiny-icae", device="cpu")
    direct = ICAE.from_pretrained(shipped / "tiny-icae")
    for (name, a), (_, b) in zip(model.named_parameters(), direct.named_parameters()):
        assert torch.equal(a, b), name
    assert model.reconstruct(model.compress(TEXTS[:1]))[0] == TEXTS[0]
    with pytest.raises(UserError, match="tiny-icae"):  # the error names what is shipped
        load_checkpoint("no-such-checkpoint", device="cpu")


def test_truncated_svd_is_exact_at_full_rank_and_best_below():
    from icae.recipes.export import truncate_lora

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=g), torch.randn(30, 6, generator=g)
    a2, b2 = truncate_lora(a, b, 2.0, 6)
    torch.testing.assert_close(b2 @ a2, 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    a3, b3 = truncate_lora(a, b, 2.0, 3)
    singular = torch.linalg.svdvals(2.0 * b.double() @ a.double())
    error = torch.linalg.matrix_norm((b3 @ a3).double() - 2.0 * b.double() @ a.double())
    assert error.item() == pytest.approx(singular[3:].norm().item(), rel=1e-4)  # Eckart-Young


def test_export_at_a_lower_rank_keeps_what_the_model_does(trained):
    out = trained / "rank4"
    assert export(["--checkpoint", str(trained / "run"), "--output", str(out), "--lora_rank", "4",
                   "--dtype", "float32"]) == 0
    small = ICAE.from_pretrained(out)
    assert small.config.lora_r == small.config.lora_alpha == 4
    info = json.loads((out / "icae_config.json").read_text())["training"]
    assert info["lora_rank_before_export"] == 8
    full = ICAE.from_pretrained(trained / "run")
    # every LoRA update of the small model is the best rank-4 approximation of the full one's
    scale = full.config.lora_alpha / full.config.lora_r
    big, low = dict(full.named_parameters()), dict(small.named_parameters())
    for name in [n for n in big if ".lora_A." in n][:6]:
        b_name = name.replace(".lora_A.", ".lora_B.")
        target = scale * big[b_name].double() @ big[name].double()
        error = torch.linalg.matrix_norm(low[b_name].double() @ low[name].double() - target)
        assert error.item() == pytest.approx(torch.linalg.svdvals(target)[4:].norm().item(), rel=1e-3, abs=1e-6)
    torch.testing.assert_close(low["memory_embeddings.weight"], big["memory_embeddings.weight"])
    with pytest.raises(UserError, match="--lora_rank"):
        export(["--checkpoint", str(trained / "run"), "--output", str(trained / "bad"), "--lora_rank", "8"])
