"""Metrics against hand computations; `evaluate` and `icae eval` on the memorised tiny model."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from icae.core import metrics
from icae.core.collate import collate
from icae.errors import UserError
from icae.recipes.evaluate import ROWS, evaluate, load_eval_texts, main
from icae.core.examples import ae_example
from icae.core.inference import token_ids
from test_inference import one_thread  # noqa: F401  (the fixture, used by every test here)
from test_inference import TEXTS, save_sharp_base_model, sharp_base_model, train_memorised_model

METRIC_KEYS = ["ae_loss", "lm_loss", "ppl_full_context", "ppl_memory", "ppl_no_context", "bleu", "exact_match",
               "token_accuracy", "wall_time_s"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_sharp_base_model(tmp_path_factory.mktemp("sharp-base"))


@pytest.fixture(scope="module")
def memorised(base_dir):
    return train_memorised_model(model_name_or_path=base_dir)


# ----------------------------------------------------------------------------- metrics


def test_perplexity_is_exp_of_mean_nll():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    nll_sum = F.cross_entropy(logits, targets, reduction="sum").item()
    expected = math.exp(F.cross_entropy(logits, targets).item())
    assert metrics.perplexity(nll_sum, 7) == pytest.approx(expected, rel=1e-6)
    assert metrics.perplexity(0.0, 5) == 1.0
    assert math.isnan(metrics.perplexity(0.0, 0))
    assert metrics.perplexity(1e6, 1) == math.inf


def test_token_accuracy_and_exact_match_by_hand():
    hyps, refs = [[1, 2, 3], [4, 5], [9, 9, 9, 9, 9]], [[1, 2, 4], [4, 5, 6, 7], [9]]
    # row 1: 2 of 3; row 2: 2 of 4 (missing tokens are wrong); row 3: 1 of 1 (extra tokens not counted)
    assert metrics.token_accuracy(hyps, refs) == pytest.approx(5 / 8)
    assert metrics.exact_match(hyps, refs) == 0.0
    assert metrics.exact_match(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    assert metrics.token_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        metrics.exact_match(["a"], ["a", "b"])


def test_bleu_by_hand():
    # unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3, same length: no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, rel=1e-6)
    assert metrics.bleu(["a b c d e f"], ["a b c d e f"]) == 100.0
    assert metrics.bleu(["two words", "three short words"], ["two words", "three short words"]) == 100.0
    assert metrics.bleu(["x y z w"], ["a b c d"]) == 0.0


# ----------------------------------------------------------------------------- evaluate()


def test_evaluate_on_memorised_texts(memorised):
    results = evaluate(memorised, TEXTS, batch_size=3)
    assert results["num_texts"] == 4
    assert results["exact_match"] == 1.0 and results["token_accuracy"] == 1.0 and results["bleu"] == 100.0
    assert results["samples"][0] == {"reference": TEXTS[0], "reconstruction": TEXTS[0]}
    assert results["ppl_memory"] == pytest.approx(math.exp(results["lm_loss"]))
    ids = token_ids(memorised.tokenizer, TEXTS)
    eos, bos = memorised.tokenizer.eos_token_id, memorised.tokenizer.bos_token_id
    assert results["ae_tokens"] == sum(len(t) + 1 for t in ids)
    assert results["lm_tokens"] == sum(len(t) - len(t) // 2 for t in ids)

    c = memorised.config
    with torch.no_grad():
        # AE loss: the token mean of one forward over all texts at once
        batch = collate([ae_example(t, eos) for t in ids], c.position_layout, 8, 2, c.vocab_size)
        assert results["ae_loss"] == pytest.approx(memorised(**batch).loss.item(), rel=1e-4)
        # full-context and no-context perplexity: the plain base model, one text at a time
        plain = sharp_base_model()
        nll = {"full": 0.0, "none": 0.0}
        for t in ids:
            half, cont = t[: len(t) // 2], t[len(t) // 2 :]
            for name, prefix in (("full", [bos] + half), ("none", [bos])):
                logits = plain(input_ids=torch.tensor([prefix + cont])).logits[0, len(prefix) - 1 : -1]
                nll[name] += F.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
    assert results["ppl_full_context"] == pytest.approx(math.exp(nll["full"] / results["lm_tokens"]), rel=1e-4)
    assert results["ppl_no_context"] == pytest.approx(math.exp(nll["none"] / results["lm_tokens"]), rel=1e-4)

    short = evaluate(memorised, TEXTS, limit=2, model_max_length=6, batch_size=4, generate=False)
    assert short["num_texts"] == 2 and short["ae_tokens"] == 2 * 7 and "bleu" not in short
    assert short["ae_loss"] != results["ae_loss"]


def test_builtin_eval_split_is_what_pretrain_holds_out(monkeypatch, tmp_path):
    import json

    import icae.data.texts
    from icae.recipes.pretrain import DataArguments, load_splits

    corpus = [f"text {i}" for i in range(1445)]
    monkeypatch.setattr(icae.data.texts, "builtin_python_docs", lambda: corpus)
    assert load_eval_texts("builtin:python-docs") == corpus[:72] == load_splits(DataArguments())[1]
    (tmp_path / "some_file.json").write_text(json.dumps(corpus))
    assert load_eval_texts(str(tmp_path / "some_file.json")) == corpus  # a file is the eval set as it is


# ----------------------------------------------------------------------------- icae eval


def test_eval_cli(memorised, tmp_path):
    ckpt = tmp_path / "ckpt"
    memorised.save_pretrained(ckpt)
    (tmp_path / "eval.json").write_text(json.dumps(TEXTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "icae", "eval", "--checkpoint", str(ckpt), "--eval_file", str(tmp_path / "eval.json"),
         "--batch_size", "2"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    printed = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(\w+)\s+(\S+)\s", line)
        if match and match.group(1) in METRIC_KEYS:
            printed[match.group(1)] = match.group(2)
    assert set(printed) == set(METRIC_KEYS), result.stdout
    assert float(printed["exact_match"]) == 1.0 and float(printed["token_accuracy"]) == 1.0
    assert float(printed["bleu"]) == 100.0

    saved = json.loads((ckpt / "eval_results.json").read_text())
    assert saved["num_texts"] == 4 and saved["config"]["position_layout"] == "epl"
    formats = {key: fmt for key, _, fmt in ROWS}
    assert {key: formats[key].format(saved[key]) for key in printed} == printed
    assert saved["wall_time_s"] > 0

    with pytest.raises(UserError, match="not a folder"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--eval_file", str(tmp_path / "eval.json")])


def test_eval_length_defaults_to_the_checkpoints_training_length(memorised, tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps(TEXTS))
    for trained, expected in ((6, 6), (None, 512)):
        ckpt = tmp_path / f"ckpt-{trained}"
        memorised.training_info = {"model_max_length": trained} if trained else {}
        memorised.save_pretrained(ckpt)
        main(["--checkpoint", str(ckpt), "--eval_file", str(tmp_path / "eval.json"), "--no_generate"])
        assert f"--model_max_length {expected} (" in capsys.readouterr().out
        saved = json.loads((ckpt / "eval_results.json").read_text())
        assert saved["model_max_length"] == expected
        if trained:
            assert saved["ae_tokens"] == len(TEXTS) * (trained + 1)
    memorised.training_info = {}
