"""Evaluation metrics as pure functions over plain Python values (no model, no torch).

Reconstruction is scored three ways, from loose to strict: BLEU-4 on the texts, the fraction of
reference tokens reproduced at their own position, and the fraction of texts reproduced exactly.

Answers to questions (`icae eval --task qa`) are scored as in SQuAD: exact match and token F1 after
normalising both sides (lower case, no punctuation, no articles, single spaces), and with ROUGE-1 and
ROUGE-L F1 from Google's `rouge-score` package.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, 13a tokenisation), 0..100.

    Uses sacrebleu's effective order: identical to plain BLEU-4 whenever the corpus has any
    4-gram, and still 100 for a corpus of short texts reproduced exactly (plain BLEU-4 gives 0
    when no text has four words).
    """
    _same_length(hypotheses, references)
    if not references:
        return 0.0
    import sacrebleu

    score = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], use_effective_order=True).score
    return min(score, 100.0)  # sacrebleu can return 100.00000000000004


def exact_match(hypotheses: Sequence, references: Sequence) -> float:
    """Fraction of hypotheses equal to their reference (texts or token lists)."""
    _same_length(hypotheses, references)
    if not references:
        return 0.0
    return sum(h == r for h, r in zip(hypotheses, references)) / len(references)


def token_accuracy(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Reference tokens reproduced at the same index, over all reference tokens (micro average).

    Missing hypothesis tokens count as wrong; extra ones are not counted (exact match catches them).
    """
    _same_length(hypotheses, references)
    total = sum(len(r) for r in references)
    if total == 0:
        return 0.0
    correct = sum(sum(a == b for a, b in zip(h, r)) for h, r in zip(hypotheses, references))
    return correct / total


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp of the mean negative log-likelihood (natural log) per token; inf if it overflows."""
    if num_tokens <= 0:
        return math.nan
    mean = nll_sum / num_tokens
    return math.exp(mean) if mean < 700 else math.inf


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of answers equal to their reference after `normalize_answer`."""
    return exact_match([normalize_answer(h) for h in hypotheses], [normalize_answer(r) for r in references])


def token_f1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean over answers of SQuAD's token F1: the harmonic mean of precision and recall of the
    normalised words they share (counted with multiplicity). Two empty answers score 1."""
    _same_length(hypotheses, references)
    if not references:
        return 0.0
    total = 0.0
    for hyp, ref in zip(hypotheses, references):
        h, r = normalize_answer(hyp).split(), normalize_answer(ref).split()
        if not h or not r:
            total += float(h == r)
            continue
        common = sum((Counter(h) & Counter(r)).values())
        if common:
            precision, recall = common / len(h), common / len(r)
            total += 2 * precision * recall / (precision + recall)
    return total / len(references)


def rouge_f1(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 over answers (`rouge-score`, its default tokenizer, no stemming)."""
    _same_length(hypotheses, references)
    if not references:
        return {"rouge1": 0.0, "rougeL": 0.0}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rougeL")}


def qa_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match, token_f1, rouge1 and rougeL of answers against their references."""
    return {"exact_match": answer_exact_match(hypotheses, references), "token_f1": token_f1(hypotheses, references),
            **rouge_f1(hypotheses, references)}


def _same_length(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
