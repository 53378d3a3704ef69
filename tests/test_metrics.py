"""Diversity metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from tidpo.metrics import distinct_n, diversity, ngrams, self_bleu


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []
    with pytest.raises(ValueError, match="n must be"):
        ngrams(["a"], 0)


def test_distinct_n_hand_computed():
    # bigrams (a b), (b a), (a b): 2 unique of 3
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # bigrams pooled over texts: (a b) (b c) (a b) (b d): 3 unique of 4
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    # unigrams: 6 words, 4 distinct
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    # n-grams never span two texts: "c a" would be one if they did
    assert distinct_n(["a b c", "a b"], 2) == pytest.approx(2 / 3)
    # repeating a text halves distinct-n
    assert distinct_n(["x y z w", "x y z w"], 4) == pytest.approx(1 / 2)
    # all distinct
    assert distinct_n(["one two three four five"], 4) == 1.0


def test_distinct_n_empty_cases_are_zero():
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["", "a"], 2) == 0.0  # no text has 2 words
    assert distinct_n(["a b c"], 4) == 0.0


def test_distinct_n_rejects_a_bare_string():
    with pytest.raises(TypeError, match="single string"):
        distinct_n("a b c", 1)
    with pytest.raises(TypeError, match="text 1"):
        distinct_n(["a", 3], 1)


def test_self_bleu_identical_and_disjoint():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == pytest.approx(0.0)


def test_self_bleu_hand_computed():
    # "a b c d e" vs "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths so BP = 1.
    # BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25 for each of the two texts.
    expected = 100 * 0.2**0.25
    assert self_bleu(["a b c d e", "a b c d f"]) == pytest.approx(expected)
    # A third, unrelated text scores 0 and does not change the other two (references clip by max).
    assert self_bleu(["a b c d e", "a b c d f", "v w x y z"]) == pytest.approx(2 * expected / 3)


def test_self_bleu_needs_two_texts():
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_diversity_keys_and_values():
    texts = ["a b c d e", "a b c d f"]
    d = diversity(texts)
    assert set(d) == {"diversity/self_bleu", "diversity/distinct_2", "diversity/distinct_4"}
    assert d["diversity/self_bleu"] == pytest.approx(100 * 0.2**0.25)
    # bigrams: ab bc cd de | ab bc cd df -> 5 unique of 8
    assert d["diversity/distinct_2"] == pytest.approx(5 / 8)
    # 4-grams: abcd bcde | abcd bcdf -> 3 of 4
    assert d["diversity/distinct_4"] == pytest.approx(3 / 4)
    assert all(math.isfinite(v) for v in d.values())
    # One text: nothing to compare it with, so no Self-BLEU; the distinct-n ratios stand.
    assert diversity(["a b c d e"]) == {"diversity/distinct_2": 1.0, "diversity/distinct_4": 1.0}
