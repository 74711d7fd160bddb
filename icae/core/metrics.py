"""Evaluation metrics as pure functions over plain Python values (no model, no torch).

Reconstruction is scored three ways, from loose to strict: BLEU-4 on the texts, the fraction of
reference tokens reproduced at their own position, and the fraction of texts reproduced exactly.
"""

from __future__ import annotations

import math
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


def _same_length(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
