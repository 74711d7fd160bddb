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
