"""Positive sentiment: neutral requests for short reviews and story openings, judged by VADER.

The judge is vaderSentiment's compound score (-1..1, a lexicon-and-rules sentiment model that ships
in its wheel, so it runs offline), mapped to [0, 1] as ``(compound + 1) / 2``: higher = more positive
= preferred. The prompts themselves ask for no particular sentiment, so the preference signal comes
only from the judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["compound", "judge"]


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    # Imported lazily: loading the lexicon takes a moment and most users never judge sentiment.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
    """VADER's compound sentiment score of ``text`` in [-1, 1] (0 for text with no sentiment words)."""
    if not isinstance(text, str):
        raise TypeError(f"sentiment judge: text must be a string, got {type(text).__name__}")
    return float(_analyzer().polarity_scores(text)["compound"])


def judge(text: str, row: Mapping[str, Any] | None = None) -> float:
    """Positivity of ``text`` in [0, 1]: ``(compound + 1) / 2``. ``row`` is accepted and unused."""
    return (compound(text) + 1.0) / 2.0
