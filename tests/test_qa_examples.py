"""Fine-tuning examples: labels on the answer only, positions on worked examples, chat templates; QA metrics."""

import pytest

from icae.core import metrics
from icae.core.collate import collate, special_token_id
from icae.core.qa_examples import (
    FTDataset, FTExampleConfig, answer_ids, chat_prompt_text, ft_example, prompt_part_ids, prompt_part_text,
)
from icae.errors import UserError
from icae.testing import byte_tokenizer

VOCAB = 259  # the byte tokenizer: 256 bytes + <bos>, <eos>, <pad>
# A template in the style of Mistral's/Llama's: it writes {{ bos_token }} first.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                "{% endfor %}")
# SmolLM2-Instruct's own template: its turn marker <|im_start|> is also what its tokenizer calls BOS.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids, computed without it: its vocabulary is the byte-level alphabet, sorted."""
    from tokenizers import pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    order = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = bytes_to_unicode()
    return [order.index(table[b]) for b in text.encode()]


@pytest.fixture(scope="module")
def plain():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def templated():
    tok = byte_tokenizer()
    tok.chat_template = BOS_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def smol(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # <|endoftext|>, <|im_start|> (BOS), <|im_end|> (EOS)
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def labelled(example):
    return [t for t in example["target_labels"] if t != -100]


# ----------------------------------------------------------------------------- rows and labels


def test_no_template_row_is_slots_ft_prompt_answer_eos_with_labels_on_the_answer(plain):
    eos = plain.eos_token_id
    context, prompt, answer = "the cat sat down", "Who sat?", "The cat."
    ex = ft_example(byte_ids(context), prompt_part_ids(plain, prompt), answer_ids(plain, answer), eos, FTExampleConfig())
    assert ex["task"] == "ft" and ex["special"] is True
    assert ex["input_ids"] == byte_ids(context)
    assert ex["target_ids"] == byte_ids(prompt) + byte_ids(answer) + [eos]
    assert ex["target_labels"] == [-100] * len(byte_ids(prompt)) + byte_ids(answer) + [eos]
    # through the collator: [8 slots, [FT], prompt, answer, EOS] with loss on the answer and EOS only
    m, r = 8, 2
    batch = collate([ex], "default", m, r, VOCAB)
    row, labels = batch["decoder_input_ids"][0].tolist(), batch["labels"][0].tolist()
    ft = special_token_id("ft", VOCAB, m)
    assert ft == VOCAB + m + 2
    assert row == [VOCAB] * m + [ft] + byte_ids(prompt) + byte_ids(answer) + [eos]
    assert labels == [-100] * (m + 1 + len(prompt)) + byte_ids(answer) + [eos]
    assert plain.decode([t for t in labels if t != -100]) == answer + "<eos>"
    assert batch["decoder_position_ids"][0].tolist() == list(range(len(row)))  # default: 0..T-1


def test_bos_adding_template_wraps_the_prompt_and_keeps_labels_on_the_answer(templated):
    eos = templated.eos_token_id
    prompt, answer = "What does `f` do?", "Return one."
    assert chat_prompt_text(templated, prompt) == f"<user>{prompt}</user><assistant>"  # no <bos>: rows start with slots
    part = prompt_part_ids(templated, prompt)
    assert part == byte_ids(f"<user>{prompt}</user><assistant>")
    assert templated.bos_token_id not in part
    ex = ft_example(byte_ids("ctx"), part, answer_ids(templated, answer), eos, FTExampleConfig())
    assert ex["target_ids"] == part + byte_ids(answer) + [eos]
    assert templated.decode(labelled(ex)) == answer + "<eos>"  # not the template's </assistant>, not the prompt


def test_smollm2_template_keeps_its_turn_markers(smol):
    prompt, answer = "What does `f` do?", "Return one."
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_part_text(smol, prompt) == expected
    part = prompt_part_ids(smol, prompt)
    assert part[0] == smol.bos_token_id == smol.convert_tokens_to_ids("<|im_start|>")  # the template's, kept
    assert part.count(smol.convert_tokens_to_ids("<|im_start|>")) == 3
    ex = ft_example([5, 6, 7], part, answer_ids(smol, answer), smol.eos_token_id, FTExampleConfig())
    # the answer's turn ends with EOS, which is SmolLM2's end-of-turn token <|im_end|>
    assert smol.decode(labelled(ex)) == answer + "<|im_end|>"
    assert smol.decode(ex["target_ids"]) == expected + answer + "<|im_end|>"


def test_a_template_without_the_assistant_message_is_refused():
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="does not write the assistant's message"):
        prompt_part_ids(tok, "q")


# ----------------------------------------------------------------------------- positions (docs/POSITIONS.md)


def _positions(layout, context_len, m, r, prompt_len=3, answer_len=2):
    ex = ft_example(list(range(1, context_len + 1)), [70] * prompt_len, [80] * answer_len, 258, FTExampleConfig())
    batch = collate([ex], layout, m, r, VOCAB)
    return batch["decoder_position_ids"][0].tolist()


def test_epl_positions_on_worked_examples():
    # L=10, m=4, r=4: one segment; memory k at round_half_even(((2k+1)*10 + 4) / 8): 1.75, 4.25, 6.75, 9.25
    tail = list(range(10, 10 + 1 + 3 + 2 + 1))  # [FT] at L=10, then prompt, answer, EOS
    assert _positions("epl", 10, 4, 4) == [2, 4, 7, 9] + tail
    # L=20, m=2, r=4: n=3 segments of s=7 (offsets 0, 7, 14; lengths 7, 7, 6)
    # segment j: o_j + round_half_even(((2k+1)*s_j + 2) / 4) -> 0+[2, 6], 7+[2, 6], 14+[2, 5]
    tail = list(range(20, 20 + 7))
    assert _positions("epl", 20, 2, 4) == [2, 6, 9, 13, 16, 19] + tail
    # epl_fixed: o_j + (r+1)//2 + k*r whatever s_j is
    assert _positions("epl_fixed", 20, 2, 4) == [2, 6, 9, 13, 16, 20] + tail
    assert _positions("default", 20, 2, 4) == list(range(6 + 7))


# ----------------------------------------------------------------------------- cuts


def test_cuts_and_skips():
    cfg = FTExampleConfig(max_context_length=5, model_max_length=6)
    ex = ft_example(list(range(1, 20)), [70, 71], [80, 81, 82], 258, cfg)
    assert ex["input_ids"] == [1, 2, 3, 4, 5]  # the context cut to max_context_length
    assert ex["target_ids"] == [70, 71, 80, 81, 82, 258]  # exactly fits
    ex = ft_example([1], [70, 71], [80, 81, 82, 83, 84], 258, cfg)
    assert ex["target_ids"] == [70, 71, 80, 81, 82, 83] and ex["target_labels"] == [-100, -100, 80, 81, 82, 83]
    assert ft_example([1], [70] * 6, [80], 258, cfg) is None  # no room for an answer
    data = FTDataset([([1], [70] * 6, [80]), ([1, 2], [70], [80])], 258, cfg)
    assert len(data) == 1 and data.skipped == 1 and data[0]["input_ids"] == [1, 2]
    with pytest.raises(IndexError):
        data[1]
    with pytest.raises(ValueError, match="answer"):
        ft_example([1], [70], [], 258, cfg)
    with pytest.raises(UserError, match="--max_context_length must be at least 1"):
        FTExampleConfig(max_context_length=0).validate()


# ----------------------------------------------------------------------------- QA metrics


def test_qa_metrics_by_hand():
    assert metrics.normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert metrics.answer_exact_match(["The cat sat.", "a dog"], ["cat sat", "the cat"]) == 0.5
    # "cat sat on mat" vs "cat sat": common 2, precision 2/4, recall 2/2 -> F1 2/3; second: no overlap -> 0
    assert metrics.token_f1(["the cat sat on a mat", "dog"], ["Cat sat.", "cat"]) == pytest.approx((2 / 3 + 0) / 2)
    assert metrics.token_f1(["x x y"], ["x y y"]) == pytest.approx(2 / 3)  # words counted with multiplicity
    assert metrics.token_f1([""], [""]) == 1.0 and metrics.token_f1(["a"], ["x"]) == 0.0
    # ROUGE (rouge-score: lower case, alphanumeric words, articles kept): "the cat sat" vs "the cat sat on the mat"
    # ROUGE-1: overlap 3, P 3/3, R 3/6 -> 2/3; ROUGE-L: LCS 3 -> 2/3. "sat the cat" vs "the cat sat": ROUGE-1 1,
    # LCS "the cat" = 2 -> 2/3
    scores = metrics.rouge_f1(["the cat sat", "sat the cat"], ["the cat sat on the mat", "the cat sat"])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert metrics.qa_scores(["a b"], ["a b"]) == {"exact_match": 1.0, "token_f1": 1.0, "rouge1": 1.0, "rougeL": 1.0}
    with pytest.raises(ValueError):
        metrics.token_f1(["a"], [])
