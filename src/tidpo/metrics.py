"""Diversity metrics of generated text (paper Table B9), in pure Python.

- ``distinct_n``: unique n-grams / total n-grams, pooled over all texts (higher = more diverse).
- ``self_bleu``: mean sentence BLEU of each text against all the others (lower = more diverse),
  in percent like the paper (0..100), computed by ``sacrebleu``.
- ``diversity``: both, under the metric names the evaluation reports.

The per-token entropy of the policy (``diversity/entropy``) needs the model's logits; it lives in
``tidpo.evaluation.evaluate.mean_token_entropy``.

Tokens here are whitespace-separated words (``str.split()``), so the numbers do not depend on a
model's tokenizer and can be compared across models.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["distinct_n", "diversity", "ngrams", "self_bleu"]


def _check_texts(texts: Sequence[str], fn: str) -> None:
    if isinstance(texts, str):
        # A bare string is a sequence of characters: almost certainly a caller's mistake.
        raise TypeError(f"{fn}: expected a sequence of texts, got a single string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{fn}: text {i} is {type(text).__name__}, expected str")


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of a token list (empty when it has fewer than n tokens)."""
    if n < 1:
        raise ValueError(f"ngrams: n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: number of unique n-grams divided by the number of n-grams, over all texts.

    N-grams are counted within each text (never across text boundaries) and the unique set is
    pooled over all texts, so repeating the same text lowers the score. Result in [0, 1].
    Empty case: when the texts hold no n-gram at all (no texts, or all shorter than n words),
    the result is 0.0 — there is no diversity to measure.
    """
    _check_texts(texts, "distinct_n")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(text.split(), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU in percent (0..100): the mean over texts of the sentence BLEU of each text with
    all the other texts as references.

    Uses ``sacrebleu``'s sentence BLEU (13a tokenisation, exponential smoothing, effective order),
    so a text identical to another scores 100 and a text sharing no word with the others scores 0.
    Needs at least two texts (with one there is nothing to compare against): ``ValueError``.
    """
    _check_texts(texts, "self_bleu")
    if len(texts) < 2:
        raise ValueError(f"self_bleu needs at least 2 texts, got {len(texts)}")
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    scores = []
    for i, hypothesis in enumerate(texts):
        references = [t for j, t in enumerate(texts) if j != i]
        scores.append(bleu.sentence_score(hypothesis, references).score)
    return sum(scores) / len(scores)


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """``diversity/self_bleu`` (%), ``diversity/distinct_2`` and ``diversity/distinct_4`` of texts;
    Self-BLEU compares the texts with each other, so a single text has none (the key is left out)."""
    results = {"diversity/self_bleu": self_bleu(texts)} if len(texts) >= 2 else {}
    return {
        **results,
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/distinct_4": distinct_n(texts, 4),
    }
