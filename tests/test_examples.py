"""ICAE v2 example rules (with the seed's truncation), checked against the rules written out by hand."""

import random

import pytest

from icae.errors import UserError
from icae.core.examples import ExampleConfig, build_examples, pretrain_example, text_extraction

EOS = 999


def ids(n, start=0):
    return list(range(start, start + n))


def test_ae_example_is_whole_truncated_text_plus_eos():
    cfg = ExampleConfig(model_max_length=50, lm_ratio=0.0)
    ex = pretrain_example(ids(80), cfg, EOS, random.Random(0))
    assert ex["task"] == "ae" and ex["special"] is True
    assert ex["input_ids"] == ids(50)  # the seed cuts to model_max_length first
    assert ex["target_ids"] == ids(50) + [EOS] and ex["target_labels"] == ex["target_ids"]


def test_lm_example_rules():
    cfg = ExampleConfig(model_max_length=200, lm_ratio=1.0, min_tokens_for_lm=10, leave_tokens_for_lm=3,
                        add_special_token_for_lm=True)
    seen_lm = seen_ae = 0
    for seed in range(200):
        ex = pretrain_example(ids(150), cfg, EOS, random.Random(seed))
        if ex["task"] == "lm":
            seen_lm += 1
            n = len(ex["input_ids"])
            assert ex["input_ids"] == ids(n) and n >= 1
            assert ex["target_ids"] == ids(150 - n, start=n)  # the continuation, no EOS
            assert len(ex["target_ids"]) > cfg.min_tokens_for_lm
            assert ex["target_labels"] == [-100] * 3 + ex["target_ids"][3:]
            assert ex["special"] is True
        else:  # continuation of <= min_tokens_for_lm tokens: AE over the prefix
            seen_ae += 1
            assert ex["target_ids"] == ex["input_ids"] + [EOS]
            assert 150 - len(ex["input_ids"]) <= cfg.min_tokens_for_lm
    assert seen_lm > 100 and seen_ae > 0


def test_lm_without_special_token():
    cfg = ExampleConfig(model_max_length=100, lm_ratio=1.0, min_tokens_for_lm=0, leave_tokens_for_lm=0)
    ex = pretrain_example(ids(100), cfg, EOS, random.Random(3))
    assert ex["task"] == "lm" and ex["special"] is False and ex["target_labels"] == ex["target_ids"]


def test_continuation_capped_at_model_max_length_without_truncation_step():
    # text_extraction itself (ICAE v2): windows of `length`, continuation of everything after
    rng = random.Random(0)
    for _ in range(50):
        a, b = text_extraction(ids(1000), 100, 1.0, rng)
        assert len(a) == 100 and b == ids(1000 - a[0] - 100, start=a[0] + 100)
    a, b = text_extraction(ids(1000), 100, 0.0, rng)
    assert len(a) == 100 and b == []


def test_lm_ratio_is_respected_in_expectation():
    cfg = ExampleConfig(model_max_length=512, lm_ratio=0.5, min_tokens_for_lm=0, leave_tokens_for_lm=0)
    examples = build_examples([ids(512)] * 2000, cfg, EOS, seed=1)
    lm = sum(e["task"] == "lm" for e in examples)
    assert 900 < lm < 1100


def test_determinism_and_seed_dependence():
    cfg = ExampleConfig(model_max_length=64, lm_ratio=0.5, min_tokens_for_lm=8)
    texts = [ids(64, i) for i in range(30)]
    assert build_examples(texts, cfg, EOS, seed=7) == build_examples(texts, cfg, EOS, seed=7)
    assert build_examples(texts, cfg, EOS, seed=7) != build_examples(texts, cfg, EOS, seed=8)
    # an example depends on its index and seed only, not on what else is in the list
    assert build_examples(texts[:10], cfg, EOS, seed=7) == build_examples(texts, cfg, EOS, seed=7)[:10]


def test_eval_set_is_ae_only():
    cfg = ExampleConfig(model_max_length=64, lm_ratio=1.0, min_tokens_for_lm=0)
    examples = build_examples([ids(100, i) for i in range(20)], cfg, EOS, seed=0, eval_set=True)
    assert all(e["task"] == "ae" and e["target_ids"] == e["input_ids"] + [EOS] for e in examples)
    assert all(len(e["input_ids"]) == 64 for e in examples)


@pytest.mark.parametrize("kwargs, message", [
    (dict(leave_tokens_for_lm=70, min_tokens_for_lm=64), "leave_tokens_for_lm"),
    (dict(lm_ratio=1.5), "lm_ratio"),
    (dict(model_max_length=0), "model_max_length"),
])
def test_contradictory_settings_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        ExampleConfig(**kwargs).validate()


def test_example_dataset_first_visit_is_todays_examples_and_later_visits_redraw():
    from icae.core.examples import ExampleDataset

    texts = [ids(40 + i, i) for i in range(12)]
    cfg = ExampleConfig(model_max_length=16, lm_ratio=0.5, min_tokens_for_lm=4, leave_tokens_for_lm=2)
    data = ExampleDataset(texts, cfg, EOS, seed=5, visits=3)
    assert len(data) == 36
    assert [data[i] for i in range(12)] == build_examples(texts, cfg, EOS, seed=5)
    assert [data[i] for i in range(12, 24)] != [data[i] for i in range(12)]
    assert data[13] == ExampleDataset(texts, cfg, EOS, seed=5, visits=3)[13]  # deterministic
    with pytest.raises(IndexError):
        data[36]


def test_random_text_window_reaches_past_model_max_length():
    cfg = ExampleConfig(model_max_length=16, lm_ratio=0.0, text_window="random")
    text = ids(200)
    starts = {text.index(pretrain_example(text, cfg, EOS, random.Random(s))["input_ids"][0]) for s in range(50)}
    assert max(starts) > 16 and all(s + 16 <= 200 for s in starts)
    seed_cut = ExampleConfig(model_max_length=16, lm_ratio=0.0)
    assert all(pretrain_example(text, seed_cut, EOS, random.Random(s))["input_ids"] == text[:16] for s in range(5))
