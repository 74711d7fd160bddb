"""Compress / reconstruct / generate on tiny models: exact recall after training, cache and batch equivalence,
and the Memory they pass between them (in memory and as a slots file)."""

import json
import pytest
import torch

from icae.core.collate import collate
from icae.core.config import ICAEConfig
from icae.errors import UserError
from icae.core.examples import ae_example
from icae.core.inference import compress, generate, generate_ids, reconstruct, token_ids
from icae.core.memory import Memory
from icae.core.model import ICAE
from icae.testing import byte_tokenizer, tiny_base_model

TEXTS = ["the cat sat down", "red fox ran far", "we eat hot soup", "big dogs bark"]  # 13-16 bytes: one segment


def sharp_base_model():
    """The tiny random Llama with a 25x LM head: its default 0.02-std head caps logits near +-1,
    which makes a frozen head learn slowly and greedy outputs collapse onto one token."""
    base = tiny_base_model()
    with torch.no_grad():
        base.lm_head.weight.mul_(25)
    return base


def save_sharp_base_model(directory) -> str:
    """Like `icae.testing.save_tiny_model`, for the model above: a folder --model_name_or_path loads."""
    sharp_base_model().save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return str(directory)


def train_memorised_model(layout="epl", mode="shared", steps=80, model_name_or_path="tiny") -> ICAE:
    """An ICAE (m=8, r=2) trained with plain AdamW until it reconstructs TEXTS exactly."""
    torch.manual_seed(0)
    cfg = ICAEConfig(model_name_or_path=model_name_or_path, fixed_mem_size=8, mean_compression_rate=2,
                     position_layout=layout, decoder_mode=mode, lora_r=8, lora_dropout=0.0)
    tokenizer = byte_tokenizer()
    model = ICAE(cfg, sharp_base_model(), tokenizer)
    examples = [ae_example(ids, tokenizer.eos_token_id) for ids in token_ids(tokenizer, TEXTS)]
    batch = collate(examples, layout, 8, 2, model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"training did not converge (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    base_dir = save_sharp_base_model(tmp_path_factory.mktemp("sharp-base"))
    return train_memorised_model(model_name_or_path=base_dir)


def random_model(layout, mode, m=4, r=2):
    """Untrained, with all weights scaled up so greedy outputs vary with their input (the tiny model's
    0.02-std weights repeat one token), and LoRA B drawn so every adapter state differs."""
    base = tiny_base_model()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(10)
    torch.manual_seed(0)
    cfg = ICAEConfig(fixed_mem_size=m, mean_compression_rate=r, position_layout=layout, decoder_mode=mode,
                     lora_r=4, lora_dropout=0.0)
    model = ICAE(cfg, base, byte_tokenizer())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


# 3, 8 and 13 bytes: with m=4, r=2 (segments of up to 8 tokens) the last one has 2 segments
GEN_TEXTS = ["abc", "hello yo", "a longer one!"]
PROMPTS = ["Q?", "what is it", ""]


# ----------------------------------------------------------------------------- compress


def test_compress_shapes_and_multispan():
    model = random_model("epl", "shared")
    memory = compress(model, GEN_TEXTS)
    assert isinstance(memory, Memory) and len(memory) == 3
    assert memory.text_lengths == [3, 8, 13]
    assert [tuple(s.shape) for s in memory.slots] == [(4, 64), (4, 64), (8, 64)] and memory.num_slots == 16
    assert memory.config == model.config.to_dict()
    assert not any(s.requires_grad for s in memory.slots)
    one_by_one = [compress(model, [t], batch_size=1).slots[0] for t in GEN_TEXTS]
    for a, b in zip(memory.slots, one_by_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    by_ids = compress(model, token_ids(model.tokenizer, GEN_TEXTS), batch_size=2)
    for a, b in zip(memory.slots, by_ids.slots):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_compress_rejects_empty_text_and_keeps_train_mode():
    model = random_model("default", "shared").train()
    with pytest.raises(UserError, match="empty"):
        compress(model, ["abc", ""])
    compress(model, ["abc"])
    assert model.training


# ----------------------------------------------------------------------------- memorised model


def test_memorised_texts_are_reconstructed_exactly(memorised):
    memory = memorised.compress(TEXTS)
    assert all(s.shape[0] == 8 for s in memory.slots), "one segment each"
    assert memorised.reconstruct(memory) == TEXTS
    # the slots carry the text: swapping them swaps the reconstructions
    assert reconstruct(memorised, memory[::-1]) == TEXTS[::-1]
    # one text per decoder batch gives the same
    assert reconstruct(memorised, memory[:1], batch_size=1) == TEXTS[:1]


def test_only_a_memory_whose_slots_fit_its_lengths_is_read(memorised):
    memory = compress(memorised, TEXTS[:2])
    slots = memory.slots  # a plain list of slot tensors: not a Memory, refused
    for use in (reconstruct, generate, generate_ids):
        with pytest.raises(UserError, match="expected the Memory that compress returns"):
            use(memorised, slots)
    with pytest.raises(UserError, match="do not belong"):
        reconstruct(memorised, Memory(slots, [40, 15], memory.config))
    hidden = memorised.config.hidden_size
    with pytest.raises(UserError, match="shape"):
        reconstruct(memorised, Memory([torch.zeros(8, hidden + 1)], [4], memory.config))


def test_save_load_gives_identical_slots(memorised, tmp_path):
    memorised.save_pretrained(tmp_path / "ckpt")
    loaded = ICAE.from_pretrained(tmp_path / "ckpt", base_model=sharp_base_model(), tokenizer=byte_tokenizer()).eval()
    before = compress(memorised, TEXTS)
    after = compress(loaded, TEXTS)
    for a, b in zip(before.slots, after.slots):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert reconstruct(loaded, before) == TEXTS


def test_slots_file_round_trip(memorised, tmp_path):
    memory = compress(memorised, TEXTS)
    memory.save(tmp_path / "s.safetensors")
    loaded = Memory.load(tmp_path / "s.safetensors")
    assert loaded == memory and loaded.source == str(tmp_path / "s.safetensors")
    assert loaded.text_lengths == memory.text_lengths and loaded.config["position_layout"] == "epl"
    for a, b in zip(memory.slots, loaded.slots):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert reconstruct(memorised, loaded) == TEXTS
    with pytest.raises(UserError, match="does not exist"):
        Memory.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        Memory.load(tmp_path / "junk.safetensors")


def test_slots_file_format_is_unchanged(memorised, tmp_path):
    """A file in the "icae-slots-v1" layout written without Memory (as `icae compress` always wrote it) loads."""
    from safetensors.torch import load_file, save_file

    memory = compress(memorised, TEXTS[:2])
    tensors = {"slots.0": memory.slots[0].contiguous(), "slots.1": memory.slots[1].contiguous(),
               "text_lengths": torch.tensor(memory.text_lengths)}
    metadata = {"format": "icae-slots-v1", "icae_config": json.dumps(memorised.config.to_dict())}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    assert Memory.load(tmp_path / "v1.safetensors") == memory
    memory.save(tmp_path / "new.safetensors")
    assert load_file(str(tmp_path / "new.safetensors")).keys() == tensors.keys()
    assert reconstruct(memorised, Memory.load(tmp_path / "v1.safetensors")) == TEXTS[:2]


def test_memory_of_another_model_is_refused(memorised):
    other = random_model("epl", "shared")  # m = 4, r = 2: memorised has m = 8
    memory = compress(other, ["abc"])
    memory.check_fits(other.config)
    memory.check_fits(other.config.to_dict())
    for use in (reconstruct, generate, lambda model, m: generate_ids(model, m)):
        with pytest.raises(UserError, match="this memory was compressed by another model .*fixed_mem_size 4 vs 8"):
            use(memorised, memory)


def test_memory_indexes_like_a_list_of_texts():
    model = random_model("epl", "shared")
    memory = compress(model, GEN_TEXTS)
    assert [m.text_lengths for m in memory] == [[3], [8], [13]]
    assert memory[-1].text_lengths == [13] and memory[-1].slots[0] is memory.slots[2]
    assert memory[1:].text_lengths == [8, 13] and memory[1:].config == memory.config
    assert repr(memory) == "Memory(3 texts, 16 slots of size 64, text_lengths=[3, 8, 13], m=4, r=2, layout=epl)"
    assert generate_ids(model, memory[1:], max_new_tokens=4) == generate_ids(model, memory, max_new_tokens=4)[1:]
    with pytest.raises(IndexError):
        memory[3]
    with pytest.raises(UserError, match="one length per"):
        Memory(memory.slots, [3, 8], memory.config)


# ----------------------------------------------------------------------------- decoding equivalences


def distinct_tokens(rows):
    return len({t for row in rows for t in row})


@pytest.mark.parametrize("mode", ["frozen", "separate"])
@pytest.mark.parametrize("layout", ["default", "epl"])
def test_cache_and_batch_equivalence(layout, mode):
    model = random_model(layout, mode)
    memory = compress(model, GEN_TEXTS)
    prompts = token_ids(model.tokenizer, PROMPTS)
    for task, prompt_ids in (("lm", None), ("ft", prompts), ("ae", None)):
        kwargs = dict(task=task, prompt_ids=prompt_ids, max_new_tokens=10)
        cached = generate_ids(model, memory, **kwargs)
        assert distinct_tokens(cached) > 10, "degenerate outputs would make this test vacuous"
        assert generate_ids(model, memory, use_cache=False, **kwargs) == cached
        alone = [
            generate_ids(model, one, task, None if prompt_ids is None else [prompt_ids[i]], 10, use_cache=False)[0]
            for i, one in enumerate(memory)
        ]
        assert alone == cached, task
        assert generate_ids(model, memory, batch_size=2, **kwargs) == cached


@pytest.mark.parametrize("layout", ["default", "epl"])
def test_generation_follows_the_training_layout(layout):
    """Each generated token is the argmax of a teacher-forced pass over the collated decoder row."""
    model = random_model(layout, "shared")
    memory = compress(model, GEN_TEXTS)
    ids = token_ids(model.tokenizer, GEN_TEXTS)
    prompts = token_ids(model.tokenizer, PROMPTS)
    answers = generate_ids(model, memory, task="ft", prompt_ids=prompts, max_new_tokens=6)
    c = model.config
    examples = [dict(input_ids=t, task="ft", target_ids=p + a, target_labels=[-100] * len(p) + a)
                for t, p, a in zip(ids, prompts, answers)]
    batch = collate(examples, layout, c.fixed_mem_size, c.mean_compression_rate, c.vocab_size)
    with torch.no_grad():
        flat = torch.cat(memory.slots)
        embeds = model.decoder_embeddings(batch["decoder_input_ids"], batch["num_segments"], flat)
        hidden = model.decoder_hidden(embeds, batch["decoder_attention_mask"], batch["decoder_position_ids"])
        logits = model.base.get_output_embeddings()(hidden.last_hidden_state)
    for i in range(len(examples)):
        labelled = [j for j, label in enumerate(batch["labels"][i].tolist()) if label != -100]
        assert logits[i, [j - 1 for j in labelled]].argmax(-1).tolist() == answers[i]


def test_generate_text_api_and_sampling():
    model = random_model("epl", "shared")
    memory = compress(model, GEN_TEXTS)
    greedy = generate(model, memory, max_new_tokens=8)
    assert len(greedy) == 3 and all(isinstance(t, str) for t in greedy)
    assert model.generate(memory, max_new_tokens=8) == greedy
    assert generate(model, memory, prompt="Q?", max_new_tokens=8) != greedy
    sample = dict(max_new_tokens=12, do_sample=True, temperature=1.5)
    a = generate_ids(model, memory, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    b = generate_ids(model, memory, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3, use_cache=False)
    c = generate_ids(model, memory, max_new_tokens=12, do_sample=True, temperature=1.5, seed=4)
    assert a == b and a != c
    assert generate(model, memory, seed=3, **sample) == generate(model, memory, seed=3, **sample)
    top1 = generate_ids(model, memory, max_new_tokens=8, do_sample=True, top_k=1, seed=0)
    tiny_p = generate_ids(model, memory, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=0)
    assert top1 == tiny_p == generate_ids(model, memory, max_new_tokens=8)
    with pytest.raises(UserError, match="prompts"):
        generate(model, memory, prompt=["a", "b"])
    with pytest.raises(UserError, match="temperature"):
        generate(model, memory, do_sample=True, temperature=0.0)


# ----------------------------------------------------------------------------- CLI


def run_cli(command, *args):
    """`icae COMMAND ...` in this process (the subprocess path is covered by test_evaluate)."""
    from icae.recipes.use import main

    return main([str(a) for a in args], command=command)


def test_cli_compress_reconstruct_generate(memorised, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    memorised.save_pretrained(ckpt)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    slots_file = tmp_path / "slots.safetensors"
    assert run_cli("compress", "--checkpoint", ckpt, "--file", tmp_path / "texts.json", "-o", slots_file) == 0
    assert "compressed 4 texts (59 tokens) into 32 slots" in capsys.readouterr().out
    run_cli("reconstruct", "--checkpoint", ckpt, slots_file, "--json")
    assert json.loads(capsys.readouterr().out) == TEXTS
    run_cli("generate", "--checkpoint", ckpt, slots_file, "--prompt", "Q", "--max_new_tokens", "4", "--do_sample",
            "--seed", "1", "--device", "cpu")
    assert len(capsys.readouterr().out.splitlines()) >= 4
    run_cli("compress", "--checkpoint", ckpt, "--text", TEXTS[1], "-o", tmp_path / "one.safetensors")
    capsys.readouterr()
    run_cli("reconstruct", "--checkpoint", ckpt, tmp_path / "one.safetensors")
    assert capsys.readouterr().out == TEXTS[1] + "\n"
    with pytest.raises(UserError, match="icae compress"):
        run_cli("reconstruct", "--checkpoint", ckpt, tmp_path / "nope.safetensors")


def test_cli_reads_standard_input_and_compresses_on_the_fly(memorised, tmp_path, capsys, monkeypatch):
    import io

    ckpt = tmp_path / "ckpt"
    memorised.save_pretrained(ckpt)
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXTS[2]))
    run_cli("reconstruct", "--checkpoint", ckpt, "--context", "-")
    assert capsys.readouterr().out == TEXTS[2] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXTS[3]))
    run_cli("compress", "--checkpoint", ckpt, "--file", "-", "-o", tmp_path / "stdin.safetensors")
    capsys.readouterr()
    run_cli("reconstruct", "--checkpoint", ckpt, tmp_path / "stdin.safetensors")
    assert capsys.readouterr().out == TEXTS[3] + "\n"
    (tmp_path / "one.txt").write_text(TEXTS[0])
    run_cli("reconstruct", "--checkpoint", ckpt, "--context", tmp_path / "one.txt")
    assert capsys.readouterr().out == TEXTS[0] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    with pytest.raises(UserError, match="standard input is empty"):
        run_cli("reconstruct", "--checkpoint", ckpt, "--context", "-")
    with pytest.raises(UserError, match="either a slots file or --context"):
        run_cli("reconstruct", "--checkpoint", ckpt)


def test_cli_refuses_slots_of_another_model(memorised, tmp_path):
    ckpt = tmp_path / "ckpt"
    memorised.save_pretrained(ckpt)
    other = random_model("epl", "shared")
    compress(other, ["abc"]).save(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="other.safetensors was compressed by another model .*fixed_mem_size 4 vs 8"):
        run_cli("reconstruct", "--checkpoint", ckpt, tmp_path / "other.safetensors")
