"""ICAE model correctness on tiny random models (fp32): the acceptance list of the model issue."""

import pytest
import torch

from icae.core.collate import collate, encoder_rows
from icae.core.config import ICAEConfig
from icae.errors import UserError
from icae.core.model import ICAE
from icae.core.positions import LAYOUTS, encoder_positions, segment_spans
from icae.testing import tiny_base_model

M, R, V = 4, 2, 259  # 4 memory tokens per segment, rate 2: segments of up to 8 tokens
MODES = ("frozen", "shared", "separate")


def make_model(layout="epl", mode="frozen", arch="llama", targets="", seed=0):
    torch.manual_seed(seed)
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, position_layout=layout, decoder_mode=mode,
                     lora_r=4, lora_dropout=0.0, lora_target_modules=targets)
    model = ICAE(cfg, tiny_base_model(arch))
    # LoRA B starts at zero, which would make every adapter state look alike: give it weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def rand_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def mixed_examples():
    """AE and LM rows, with and without special tokens, 1 to 3 segments."""
    return [
        dict(input_ids=rand_ids(5, 1), task="ae", target_ids=rand_ids(5, 1) + [257]),
        dict(input_ids=rand_ids(13, 2), task="lm", target_ids=rand_ids(9, 3), target_labels=[-100] * 3 + rand_ids(9, 3)[3:]),
        dict(input_ids=rand_ids(20, 4), task="ae", target_ids=rand_ids(20, 4) + [257]),
        dict(input_ids=rand_ids(9, 5), task="lm", special=False, target_ids=rand_ids(4, 6)),
    ]


def slots_of(model, texts):
    return model.encode(**{k: v for k, v in encoder_rows(texts, model.config.position_layout, M, R, V).items()
                           if k != "num_segments"})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_change_moves_only_its_own_segment(layout):
    model = make_model(layout)
    text = rand_ids(20, 7)  # segments (0,7) (7,7) (14,6)
    assert segment_spans(20, M, R) == [(0, 7), (7, 7), (14, 6)]
    changed = list(text)
    changed[9] = (changed[9] + 1) % 256
    other = rand_ids(11, 8)
    with torch.no_grad():
        a = slots_of(model, [other, text])[2:]
        b = slots_of(model, [other, changed])[2:]
    assert not torch.allclose(a[1], b[1], atol=1e-5), "slots must depend on their own text"
    # every memory slot must change, not just one: guards memory tokens attending only to themselves
    assert ((a[1] - b[1]).abs().amax(-1) > 1e-6).all()
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2], b[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_memory_and_lora_only(mode):
    model = make_model("epl", mode).train()
    out = model(**collate(mixed_examples(), "epl", M, R, V))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["memory_embeddings.weight"].abs().sum() > 0
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values()), "every LoRA tensor trains"
    base = [n for n, g in grads.items() if "lora_" not in n and n != "memory_embeddings.weight"]
    assert base and all(grads[n] is None for n in base), "base weights never get gradients"
    if mode == "separate":
        assert any(".decoder." in n for n in lora)


def test_frozen_decoder_equals_plain_base_model():
    model = make_model("epl", "frozen")
    batch = collate(mixed_examples(), "epl", M, R, V)
    plain = tiny_base_model("llama")  # same seed, no LoRA
    with torch.no_grad():
        slots = model.encode(batch["encoder_input_ids"], batch["encoder_attention_mask"], batch["encoder_position_ids"])
        embeds = model.decoder_embeddings(batch["decoder_input_ids"], batch["num_segments"], slots)
        ours = model.decoder_hidden(embeds, batch["decoder_attention_mask"], batch["decoder_position_ids"])
        ours = model.base.get_output_embeddings()(ours.last_hidden_state)
        ref = plain(inputs_embeds=embeds, attention_mask=batch["decoder_attention_mask"],
                    position_ids=batch["decoder_position_ids"]).logits
        shared = make_model("epl", "shared")
        shared_logits = shared.base.get_output_embeddings()(
            shared.decoder_hidden(embeds, batch["decoder_attention_mask"], batch["decoder_position_ids"]).last_hidden_state)
    mask = batch["decoder_attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared_logits[mask], ref[mask], atol=1e-3), "shared mode must apply LoRA"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_invariance(layout, mode):
    model = make_model(layout, mode)
    examples = mixed_examples()
    with torch.no_grad():
        batch = collate(examples, layout, M, R, V)
        together = model(**batch).row_loss
        slots = slots_of(model, [e["input_ids"] for e in examples])
        alone = torch.cat([model(**collate([e], layout, M, R, V)).row_loss for e in examples])
        slots_alone = torch.cat([slots_of(model, [e["input_ids"]]) for e in examples])
    assert batch["num_segments"].tolist() == [1, 2, 3, 2]
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(slots, slots_alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multispan_batched_equals_one_segment_at_a_time(layout):
    model = make_model(layout, "shared")
    text = rand_ids(20, 11)
    with torch.no_grad():
        batched = slots_of(model, [text])
        for j, (offset, seg_len) in enumerate(segment_spans(len(text), M, R)):
            ids = torch.tensor([text[offset:offset + seg_len] + list(range(V, V + M))])
            pos = torch.tensor([encoder_positions(layout, seg_len, M, R, offset)])
            single = model.encode(ids, torch.ones_like(ids), pos)
            torch.testing.assert_close(batched[j], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(arch):
    model = make_model("epl", "separate", arch=arch, targets="all-linear")
    examples = mixed_examples()
    with torch.no_grad():
        together = model(**collate(examples, "epl", M, R, V)).row_loss
        alone = torch.cat([model(**collate([e], "epl", M, R, V)).row_loss for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    model.train()
    model(**collate(examples, "epl", M, R, V)).loss.backward()
    assert model.memory_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    batch = collate(mixed_examples(), "epl", M, R, V)
    grads = []
    for checkpointing in (False, True):
        model = make_model("epl", mode).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_lora_targets():
    qv = make_model(targets="")
    every = make_model(targets="all-linear")
    some = make_model(targets="q_proj,k_proj")
    names = lambda m: {n.split(".")[-4] for n, _ in m.named_parameters() if "lora_A" in n}  # noqa: E731
    assert names(qv) == {"q_proj", "v_proj"}
    assert names(every) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names(some) == {"q_proj", "k_proj"}
    with pytest.raises(UserError, match="qq_proj"):
        make_model(targets="q_proj,qq_proj")


def test_encoder_computes_no_vocabulary_logits_and_decoder_only_at_labels(monkeypatch):
    model = make_model()
    calls, head, linear = [], model.base.get_output_embeddings().weight, torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):  # every vocabulary projection, by module or by icae.core.losses
        if weight is head:
            calls.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    batch = collate(mixed_examples(), "epl", M, R, V)
    with torch.no_grad():
        model.encode(batch["encoder_input_ids"], batch["encoder_attention_mask"], batch["encoder_position_ids"])
        assert calls == []
        model(**batch)
    assert calls and sum(calls) == int((batch["labels"][:, 1:] != -100).sum())


def test_save_load_gives_identical_slots(tmp_path):
    model = make_model("epl", "separate")
    model.save_pretrained(tmp_path)
    loaded = ICAE.from_pretrained(tmp_path, base_model=tiny_base_model("llama")).eval()
    texts = [rand_ids(13, 3), rand_ids(5, 4)]
    with torch.no_grad():
        torch.testing.assert_close(slots_of(loaded, texts), slots_of(model, texts), atol=0, rtol=0)
    assert loaded.config.position_layout == "epl" and loaded.config.decoder_mode == "separate"


def test_checkpoint_for_another_base_model_is_refused(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="hidden size"):
        ICAE.from_pretrained(tmp_path, base_model=tiny_base_model("llama", hidden_size=32))


def test_bf16_runs():
    model = make_model("epl", "frozen")
    model.lm.to(torch.bfloat16)
    batch = collate(mixed_examples(), "epl", M, R, V)
    with torch.no_grad():
        loss32 = make_model("epl", "frozen")(**batch).loss
        loss16 = model(**batch).loss
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.1


def test_flash_attention_gets_whole_sequence_boundaries():
    """Under flash_attention_2 transformers would read one epl row's positions as packed sequences."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    model = make_model("epl")
    batch = collate(mixed_examples()[:1], "epl", M, R, V)
    assert _is_packed_sequence(batch["decoder_position_ids"], 1), "the hazard this guards against"
    assert model._attention_kwargs(batch["decoder_attention_mask"]) == {}  # sdpa: nothing to do
    model.base.config._attn_implementation = "flash_attention_2"
    kwargs = model._attention_kwargs(batch["decoder_attention_mask"])
    length = batch["decoder_attention_mask"].shape[1]
    assert kwargs["cu_seq_lens_q"].tolist() == [0, length] and kwargs["max_length_k"] == length
    two_rows = collate(mixed_examples()[:2], "epl", M, R, V)["decoder_attention_mask"]
    assert model._attention_kwargs(two_rows) == {}  # padded batches take the mask (unpad) path


def test_memory_embeddings_start_on_the_base_models_device_with_the_same_values():
    """A base model already on an accelerator (the step benchmark builds it there): the memory rows are
    drawn on the CPU, as before, and land on the base model's device. `meta` stands in for CUDA here."""
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, lora_r=4)
    torch.manual_seed(0)
    on_cpu = ICAE(cfg, tiny_base_model())
    base = tiny_base_model().to("meta")
    torch.manual_seed(0)
    on_meta = ICAE(cfg, base)
    assert on_meta.memory_embeddings.weight.device.type == "meta"
    assert on_cpu.memory_embeddings.weight.device.type == "cpu"
    torch.manual_seed(0)
    again = ICAE(cfg, tiny_base_model())
    assert torch.equal(on_cpu.memory_embeddings.weight, again.memory_embeddings.weight)


def test_init_leaves_the_callers_config_alone_and_records_the_token_ids(tmp_path):
    """ICAE fills in vocab_size / hidden_size on its own copy; the saved ids past the vocabulary
    are memory tokens V..V+m-1, then [AE], [LM], [FT] (written out here, not taken from collate)."""
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, lora_r=4)
    before = cfg.to_dict()
    model = ICAE(cfg, tiny_base_model("llama"))
    assert cfg.to_dict() == before and cfg.vocab_size is None
    assert model.config is not cfg and model.config.vocab_size == V
    model.save_pretrained(tmp_path)
    _, saved = ICAEConfig.load(tmp_path)
    assert saved["special_tokens"] == {"memory_token_ids": [V, V + M - 1], "ae_token_id": V + M,
                                       "lm_token_id": V + M + 1, "ft_token_id": V + M + 2}
