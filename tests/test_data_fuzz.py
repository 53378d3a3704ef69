"""Fuzz: any mixture of malformed rows either prepares or fails with a PreferenceDataError naming the spot."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo.data import PreferenceDataError, prepare_preference_dataset
from tidpo.models import tiny_tokenizer

TOKENIZER = tiny_tokenizer()

texts = st.sampled_from(["The sky is", " blue.", " green.", "A cat", "", "   ", "the dog ran", "\n"])
good_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": texts}
)
bad_message = st.one_of(
    st.none(),
    st.integers(),
    texts,
    st.fixed_dictionaries({"role": st.sampled_from(["user", ""])}),
    st.fixed_dictionaries({"content": texts}),
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.one_of(st.none(), st.integers(), st.just(["x"]))}
    ),
)
values = st.one_of(
    texts,
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.dictionaries(st.sampled_from(["role", "content", "text"]), texts, max_size=2),
    st.lists(good_message, min_size=0, max_size=3),
    st.lists(st.one_of(good_message, bad_message), min_size=1, max_size=3),
)
weights = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.floats(-1, 2), st.just(float("nan")), st.just("x")), max_size=4),
)
random_row = st.dictionaries(
    st.sampled_from(
        ["prompt", "chosen", "rejected", "score", "chosen_weights", "rejected_weights", "question"]
    ),
    st.one_of(values, weights),
    min_size=0,
    max_size=7,
)
good_standard = st.fixed_dictionaries(
    {
        "prompt": st.just("The sky is"),
        "chosen": st.sampled_from([" blue.", " green and blue."]),
        "rejected": st.just(" green."),
    }
)
good_conversational = st.fixed_dictionaries(
    {
        "prompt": st.just([{"role": "user", "content": "The sky is?"}]),
        "chosen": st.just([{"role": "assistant", "content": "blue"}]),
        "rejected": st.just([{"role": "assistant", "content": "green"}]),
    }
)


@st.composite
def mutated(draw, base):
    """A good row with one field replaced by an arbitrary value or removed."""
    out = dict(draw(base))
    key = draw(st.sampled_from(["prompt", "chosen", "rejected", "chosen_weights"]))
    if draw(st.booleans()):
        out.pop(key, None)
    else:
        out[key] = draw(st.one_of(values, weights))
    return out


# Mostly good rows with some damage, so that whole datasets both succeed and fail.
row = st.one_of(
    good_standard, good_conversational, mutated(good_standard), mutated(good_conversational), random_row
)
datasets_ = st.lists(row, min_size=1, max_size=5)


def _check(rows, source, prepare_from):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical/empty-prompt warnings are fine here
            out = prepare_from(rows)
    except PreferenceDataError as err:
        message = str(err)
        assert source in message, message
        assert any(word in message for word in ("row", "column", "line")), message
        return
    # Success: every row has a prompt and non-empty completions, all integer ids.
    assert len(out) >= 1
    for item in out:
        assert item["chosen_input_ids"] and item["rejected_input_ids"]
        assert all(isinstance(t, int) for t in item["prompt_input_ids"] + item["chosen_input_ids"])


@settings(max_examples=150, deadline=None)
@given(rows=datasets_, max_length=st.sampled_from([None, 8, 64]))
def test_fuzz_jsonl_files(rows, max_length):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows), encoding="utf-8")
        _check(
            rows,
            "fuzz.jsonl",
            lambda _: prepare_preference_dataset(
                str(path), TOKENIZER, max_length=max_length, max_prompt_length=max_length and max_length // 2
            ),
        )


@settings(max_examples=100, deadline=None)
@given(rows=datasets_)
def test_fuzz_in_memory_rows(rows):
    _check(
        rows,
        "<dataset>",
        lambda r: prepare_preference_dataset(
            r, TOKENIZER, max_length=32, max_prompt_length=16, drop_overlong=True
        ),
    )


def test_fuzz_strategy_reaches_success_and_failure():
    # Guard against a strategy that only ever fails (the fuzz test would then prove little).
    good = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    bad = [{"prompt": "The sky is", "chosen": None, "rejected": " green."}]
    assert len(prepare_preference_dataset(good, TOKENIZER, max_length=32, max_prompt_length=16)) == 1
    try:
        prepare_preference_dataset(bad, TOKENIZER, max_length=32, max_prompt_length=16)
    except PreferenceDataError as err:
        assert "row 0 (0-based), field 'chosen'" in str(err)
    else:
        raise AssertionError("a null chosen must fail")
