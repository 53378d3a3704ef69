"""Shared fixtures: tiny in-process models and a small preference dataset (no downloads)."""

from __future__ import annotations

import os

import pytest

# Tests never reach the Hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "The grass is", "chosen": " green.", "rejected": " blue and boring."},
    {
        "prompt": "Write a short review of the restaurant.",
        "chosen": " I loved this place!",
        "rejected": " It was terrible.",
    },
    {"prompt": "A cat sat on", "chosen": " the mat.", "rejected": " the dog in the park."},
    {"prompt": "Please answer briefly:", "chosen": " a great story.", "rejected": " far too long, boring."},
    {
        "prompt": "Seek medical advice",
        "chosen": " promptly.",
        "rejected": " instead of self-medicating later.",
    },
    {"prompt": "The dog ran", "chosen": " in the park.", "rejected": " on the mat!"},
    {"prompt": "It was", "chosen": " wonderful acting.", "rejected": " terrible music."},
]


@pytest.fixture(scope="session")
def tiny_tok():
    from tidpo.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tok):
    from tidpo.models import tiny_causal_lm

    return tiny_causal_lm("llama", tokenizer=tiny_tok)


@pytest.fixture
def pairs_dataset():
    from datasets import Dataset

    return Dataset.from_list(PAIRS)
