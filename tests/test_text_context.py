"""The full-context baseline of fine-tuning (`icae finetune --context_as_text True`, icae.core.text_context)
on tiny models: its rows, its loss, the recipe and decoding from its checkpoints."""

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file

from icae.core.collate import IGNORE
from icae.core.inference import generate_plain_ids
from icae.core.model import ICAE, load_checkpoint
from icae.core.text_context import TextContextCollator, as_text_context_model, start_id, text_answers, text_row
from icae.recipes.finetune import main as finetune
from icae.recipes.pretrain import main as pretrain
from icae.testing import save_tiny_model
from test_finetune import WORDS, qa_records
from test_inference import one_thread  # noqa: F401  (the fixture: one thread for tiny matrices)


def test_text_row_puts_the_loss_on_the_answer_only():
    example = {"input_ids": [5, 6, 7], "target_ids": [8, 9, 10, 2], "target_labels": [IGNORE, 9, 10, 2]}
    ids, labels = text_row(example, start_id=1)
    assert ids == [1, 5, 6, 7, 8, 9, 10, 2]
    assert labels == [IGNORE] * 5 + [9, 10, 2]
    batch = TextContextCollator(1)([example, {**example, "input_ids": [5]}])
    assert batch["decoder_input_ids"].tolist() == [ids, [1, 5, 8, 9, 10, 2, 0, 0]]
    assert batch["decoder_position_ids"][0].tolist() == list(range(8))
    assert batch["decoder_attention_mask"][1].tolist() == [1] * 6 + [0, 0]
    assert batch["labels"][1].tolist() == [IGNORE] * 3 + [9, 10, 2, IGNORE, IGNORE]
    assert batch["encoder_attention_mask"].sum().item() == 4 and batch["num_segments"].tolist() == [0, 0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_context")
    model = save_tiny_model(root / "tiny")
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(12)]
    (root / "texts.json").write_text(json.dumps(texts))
    (root / "train.json").write_text(json.dumps(qa_records(16)))
    (root / "eval.json").write_text(json.dumps(qa_records(4, offset=100)))
    assert pretrain(shlex.split(
        f"--model_name_or_path {model} --train_file {root}/texts.json --output_dir {root}/pre --position_layout epl "
        "--fixed_mem_size 4 --mean_compression_rate 4 --lora_r 4 --model_max_length 32 --max_steps 2 "
        "--learning_rate 1e-2 --eval_strategy no --save_strategy no --report_to none")) == 0
    return root


def test_untrained_text_model_scores_the_answer_as_the_base_model_does(ws):
    """A fresh LoRA changes nothing: the loss of a text row is the base model's loss on the answer tokens."""
    model = as_text_context_model(load_checkpoint(str(ws / "pre"), device="cpu"))
    for module in model._tuner_layers:  # a fresh LoRA: B = 0
        for b in module.lora_B.values():
            torch.nn.init.zeros_(b.weight)
    model.eval()
    example = {"input_ids": [40, 41, 42, 43, 44], "target_ids": [50, 51, 52], "target_labels": [IGNORE, 51, 52]}
    batch = model.collator([example])
    loss = model(**batch).loss
    ids = batch["decoder_input_ids"]
    logits = model.base(input_ids=ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits[-2:], ids[0, -2:])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_finetune_context_as_text_trains_a_fresh_lora_and_decodes(ws, tmp_path):
    flags = (f"--restore_from {ws}/pre --train_file {ws}/train.json --eval_file {ws}/eval.json --max_context_length 48 "
             "--model_max_length 32 --report_to none --per_device_train_batch_size 4 --eval_strategy no "
             "--save_strategy no --context_as_text True")
    fresh = tmp_path / "lr0"
    assert finetune(shlex.split(f"{flags} --output_dir {fresh} --max_steps 1 --learning_rate 0")) == 0
    pre, untrained = load_file(ws / "pre" / "icae_weights.safetensors"), load_file(fresh / "icae_weights.safetensors")
    lora_b = [k for k in untrained if "lora_B" in k]
    assert lora_b and all(untrained[k].abs().max() == 0 for k in lora_b)  # a fresh LoRA, not the checkpoint's
    assert any(pre[k].abs().max() > 0 for k in lora_b)
    out = tmp_path / "run"
    assert finetune(shlex.split(f"{flags} --output_dir {out} --max_steps 2 --learning_rate 1e-2")) == 0
    config = json.loads((out / "icae_config.json").read_text())
    assert config["training"]["context_as_text"] is True and config["lora_r"] == 4
    trained = load_file(out / "icae_weights.safetensors")
    assert any(trained[k].abs().max() > 0 for k in lora_b)  # it trained the LoRA
    model = load_checkpoint(str(out), device="cpu")
    assert type(model) is ICAE  # an ordinary checkpoint
    rows = [[start_id(model)] + list(range(40, 40 + n)) for n in (3, 7)]
    base_answers = text_answers(model, rows, max_new_tokens=5, batch_size=2, adapter="disabled")
    assert base_answers == generate_plain_ids(model, rows, max_new_tokens=5, batch_size=2)
    with_lora = text_answers(model, rows, max_new_tokens=5, batch_size=1)
    assert len(with_lora) == 2 and all(len(a) <= 5 for a in with_lora)
