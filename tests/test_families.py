"""Twelve base-model families, tiny and random (hidden 64, 2 layers, the embedded tokenizer's 49,152 tokens):
ICAE trains on each, scores tokens as the model itself does and decodes the same with or without a KV cache.

The references are the models' own HF forward passes and losses (a second, unwrapped copy of the same
weights), so a family whose forward post-processes logits (Granite's logits_scaling, Gemma's soft-cap),
scales its embeddings (Gemma) or lacks PEFT's default LoRA targets (phi3, granite, olmo2) is caught here.
"""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from icae.core.collate import IGNORE, collate
from icae.core.config import ICAEConfig
from icae.core.examples import ae_example
from icae.core.inference import generate_ids, generate_plain_ids
from icae.core.losses import output_head
from icae.core.model import ICAE
from icae.core.qa_examples import FTExampleConfig, answer_ids, ft_example, prompt_part_ids
from icae.recipes.evaluate import evaluate
from icae.testing import FAMILIES, embedded_tokenizer, save_tiny_model, tiny_base_model

M, R = 4, 4
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Tiny models, quick tests."]
# PEFT's table where it has an entry; ours (attention projections by structure) for phi3, granite, olmo2
DEFAULT_TARGETS = {"phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"]}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def base(family, tokenizer):
    """The same random weights every call: a fresh copy is the independent reference."""
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tiny_base_model(family, seed=0, vocab_size=len(tokenizer), special_ids=special)


def make(family, tokenizer, layout="default", mode="frozen", targets=""):
    config = ICAEConfig(model_name_or_path="tiny", fixed_mem_size=M, mean_compression_rate=R, lora_r=4,
                        position_layout=layout, decoder_mode=mode, lora_target_modules=targets)
    model = ICAE(config, base_model=base(family, tokenizer), tokenizer=tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA that changes the outputs, as after training (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def default_models(tokenizer):
    """One ICAE per family with the default flags, built on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make(family, tokenizer)
        return cache[family]

    return get


def text_ids(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def train_step(model, tokenizer):
    """One forward/backward on an AE and an LM example; the gradients of every trainable tensor."""
    a, b = text_ids(tokenizer)
    lm = {"input_ids": a[:8], "task": "lm", "special": True, "target_ids": a[8:], "target_labels": a[8:]}
    batch = collate([ae_example(b, tokenizer.eos_token_id), lm], model.config.position_layout, M, R,
                    model.config.vocab_size)
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    model.eval()
    assert torch.isfinite(loss)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_flags_train_a_step_with_new_tokens_at_the_embedding_scale(family, tokenizer, default_models):
    model = default_models(family)
    assert model.lora_target_names() == DEFAULT_TARGETS.get(family, ["q_proj", "v_proj"])
    grads = train_step(model, tokenizer)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["memory_embeddings.weight"].abs().sum() > 0
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    # memory and special tokens start where the embedding module's outputs are (Gemma: sqrt(hidden) x weight)
    module = model.base.get_input_embeddings()
    with torch.no_grad():
        real = module(torch.arange(model.config.vocab_size)).std()
    assert 0.7 < float(model.memory_embeddings.weight.detach().std() / real) < 1.4


@pytest.mark.parametrize("family", FAMILIES)
def test_epl_all_linear_shared_trains_a_step(family, tokenizer):
    model = make(family, tokenizer, "epl", "shared", "all-linear")
    grads = train_step(model, tokenizer)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum("lora_B" in n for n in grads) > 2 * 2  # more than q and v in each of the two layers
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_loss_and_logits_are_the_models_own(family, tokenizer, default_models):
    """ICAE's decoder with the adapter disabled against HF's forward and loss on an unwrapped copy."""
    model, reference = default_models(family), base(family, tokenizer)
    ids = torch.tensor([text_ids(tokenizer)[0]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    embeds = model.embed(ids).detach().requires_grad_()  # a gradient: the training path of the loss
    ours = model.decoder_loss(embeds, mask, positions, ids).loss  # frozen decoder: the base model
    ours.backward()
    ref_embeds = reference.get_input_embeddings()(ids).detach().requires_grad_()
    theirs = reference(inputs_embeds=ref_embeds, attention_mask=mask, position_ids=positions, labels=ids)
    theirs.loss.backward()
    torch.testing.assert_close(ours, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # no gradient: the chunked path, and the logits decoding uses
        again = model.decoder_loss(embeds, mask, positions, ids).loss
        hidden = model.decoder_hidden(embeds, mask, positions).last_hidden_state
        logits = output_head(model.base).logits(hidden)
    torch.testing.assert_close(again, theirs.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, theirs.logits.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached(family, tokenizer, default_models):
    model = default_models(family)
    with torch.no_grad():
        memory = model.compress(TEXTS)
    for task in ("ae", "lm"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cached = generate_ids(model, memory, task=task, max_new_tokens=6)
        assert not [w for w in seen if "past_key_values" in str(w.message)]  # the cache passed the supported way
        uncached = generate_ids(model, memory, task=task, max_new_tokens=6, use_cache=False)
        assert cached == uncached
    rows = text_ids(tokenizer)
    assert generate_plain_ids(model, rows, 5) == generate_plain_ids(model, rows, 5, use_cache=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruct_eval_and_finetune_run(family, tokenizer, default_models):
    model = default_models(family)
    with torch.no_grad():
        texts = model.reconstruct(model.compress(TEXTS), max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    results = evaluate(model, TEXTS[:1], batch_size=2, max_new_tokens=4)
    for key in ("ae_loss", "lm_loss", "ppl_full_context", "ppl_memory", "ppl_no_context", "bleu"):
        assert results[key] is not None and math.isfinite(results[key]), key
    # the full-context perplexity is the base model's own, from its HF loss on [bos] + text, scored on the 2nd half
    row = text_ids(tokenizer)[0]
    half = len(row) // 2
    ids = torch.tensor([[tokenizer.bos_token_id] + row])
    labels = torch.tensor([[IGNORE] * (1 + half) + row[half:]])
    with torch.no_grad():
        hf_loss = base(family, tokenizer)(input_ids=ids, labels=labels).loss
    assert results["ppl_full_context"] == pytest.approx(math.exp(float(hf_loss)), rel=1e-4)

    prompt = prompt_part_ids(tokenizer, "What jumps?")
    example = ft_example(row, prompt, answer_ids(tokenizer, "The fox."), tokenizer.eos_token_id, FTExampleConfig())
    batch = collate([example], model.config.position_layout, M, R, model.config.vocab_size)
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    model.eval()
    assert torch.isfinite(loss) and model.memory_embeddings.weight.grad.abs().sum() > 0
    with torch.no_grad():
        answers = model.generate(model.compress(TEXTS[:1]), prompt=["What jumps?", "Where?"], max_new_tokens=3)
    assert len(answers) == 2


def test_the_cli_trains_a_family_peft_has_no_lora_targets_for(tmp_path, tokenizer):
    """The issue's crash (phi3 with the default --lora_target_modules ''), as a user runs it: the targets
    chosen by structure are printed, and the run ends with a checkpoint."""
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = save_tiny_model(tmp_path / "phi3", "phi3", tokenizer=tokenizer, vocab_size=len(tokenizer),
                            special_ids=special)
    texts = [f"{TEXTS[0]} Sentence number {i} ends here." for i in range(6)]
    (tmp_path / "train.json").write_text(json.dumps(texts[2:]))
    (tmp_path / "eval.json").write_text(json.dumps(texts[:2]))
    out = tmp_path / "run"
    argv = (f"pretrain --model_name_or_path {model} --train_file {tmp_path}/train.json --eval_file {tmp_path}/eval.json "
            f"--output_dir {out} --max_steps 1 --fixed_mem_size {M} --lora_r 4 --report_to none").split()
    proc = subprocess.run([sys.executable, "-m", "icae", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA targets for phi3 (PEFT has no default): qkv_proj" in proc.stderr
    assert json.loads((out / "icae_config.json").read_text())["lora_config"]["target_modules"] == ["qkv_proj"]
