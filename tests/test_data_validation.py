"""Row validation: columns, value formats, identical pairs, per-token columns, implicit prompts."""

from __future__ import annotations

import math
import warnings

import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo.data import (
    CONVERSATIONAL,
    STANDARD,
    PreferenceDataError,
    PreferenceFormat,
    preference_format,
    split_implicit_prompt,
    validate_preference_rows,
)
from tidpo.data.loading import rows_to_dataset

GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def msg(role, content):
    return {"role": role, "content": content}


def ds(*rows):
    return rows_to_dataset([dict(r) for r in rows], "<test>")


def error_of(dataset, **kwargs) -> str:
    with pytest.raises(PreferenceDataError) as info:
        validate_preference_rows(dataset, source="prefs.jsonl", **kwargs)
    return str(info.value)


def test_good_rows_pass_and_extra_columns_survive():
    data = ds({**GOOD, "score": 1.5, "id": "a"}, {**GOOD, "prompt": "The grass is", "score": 0.5, "id": "b"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        out = validate_preference_rows(data)
    assert out.to_list() == data.to_list()
    assert preference_format(out) == PreferenceFormat(STANDARD, explicit_prompt=True)


def test_missing_columns_name_found_and_expected():
    message = error_of(Dataset.from_list([{"prompt": "p", "response_chosen": "a", "response_rejected": "b"}]))
    assert "missing column(s) ['chosen', 'rejected']" in message
    assert "found columns ['prompt', 'response_chosen', 'response_rejected']" in message
    assert (
        "rename 'response_chosen' to 'chosen'" in message
        and "rename 'response_rejected' to 'rejected'" in message
    )
    assert "prefs.jsonl" in message


def test_question_column_without_prompt_is_an_error_with_a_hint():
    message = error_of(Dataset.from_list([{"question": "p", "chosen": "a", "rejected": "b"}]))
    assert "Rename 'question' to 'prompt'" in message


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (None, ["missing (null)"]),
        (3, ["got int 3"]),
        (2.5, ["got float"]),
        ({"text": "x"}, ["got dict"]),
        ("", ["empty"]),
        ("   ", ["empty"]),
        ([], ["message list is empty"]),
        (["just text"], ["message 0", "got str"]),
        ([{"role": "user"}], ["message 0", "'content' is missing"]),
        ([{"role": "user", "content": 7}], ["message 0", "'content' is int"]),
        ([{"content": "x"}], ["'role' is missing"]),
        ([{"role": "", "content": "x"}], ["'role' is empty"]),
    ],
)
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_bad_values_name_row_and_field(bad, words, field):
    row = {**GOOD, field: bad}
    # Build the table without Arrow coercion surprises: a Python-level list of rows through our loader.
    message = error_of(ds(GOOD, GOOD, row))
    assert f"row 2 (0-based), field {field!r}" in message, message
    for word in words:
        assert word in message, message


def test_mixed_formats_within_a_row_and_across_rows():
    conv = {
        "prompt": [msg("user", "hi")],
        "chosen": [msg("assistant", "a")],
        "rejected": [msg("assistant", "b")],
    }
    message = error_of(ds(GOOD, {**GOOD, "chosen": [msg("assistant", "a")]}))
    assert "row 1 (0-based) mixes formats" in message and "'chosen' is conversational" in message
    message = error_of(ds(GOOD, GOOD, conv))
    assert "row 2 (0-based) is conversational but row 0 is standard" in message


def test_identical_pairs_warn_with_count_and_rows_then_drop():
    rows = [GOOD, {**GOOD, "rejected": " blue."}, GOOD, {**GOOD, "chosen": " x", "rejected": " x"}]
    data = ds(*rows)
    with pytest.warns(
        UserWarning, match=r"2 row\(s\) have chosen identical to rejected \(0-based rows 1, 3\)"
    ):
        kept = validate_preference_rows(data)
    assert len(kept) == 4
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\).*0-based rows 1, 3.*2 row\(s\) remain"):
        dropped = validate_preference_rows(data, drop_identical=True)
    assert len(dropped) == 2
    assert all(r["chosen"] != r["rejected"] for r in dropped)
    only_identical = ds({**GOOD, "rejected": GOOD["chosen"]})
    with pytest.raises(PreferenceDataError, match="nothing is left"):
        validate_preference_rows(only_identical, drop_identical=True)


def test_weight_and_ref_columns_are_checked():
    base = {**GOOD, "chosen_weights": [1.0, 0.5], "rejected_weights": [0.0, 2.0]}
    validate_preference_rows(ds(base))
    assert "'chosen_weights', item 1: token weights must be non-negative" in error_of(
        ds(base, {**base, "chosen_weights": [1.0, -0.1]})
    )
    assert "row 0 (0-based), field 'rejected_weights', item 0: nan is not finite" in error_of(
        ds({**base, "rejected_weights": [math.nan]})
    )
    assert "expected a list with one float per completion token, got float" in error_of(
        ds({**base, "chosen_weights": 1.0})
    )
    assert "'ref_rejected_logps' is not" in error_of(ds({**GOOD, "ref_chosen_logps": [-1.0]}))
    # Reference log-probs may be negative, but must be finite numbers.
    validate_preference_rows(ds({**GOOD, "ref_chosen_logps": [-1.0, -2.0], "ref_rejected_logps": [-0.5]}))
    assert "item 0: expected a number, got str" in error_of(
        ds({**GOOD, "ref_chosen_logps": ["x"], "ref_rejected_logps": [-0.5]})
    )


def test_empty_dataset_and_non_dataset():
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    assert "the dataset has no rows" in error_of(empty)
    with pytest.raises(PreferenceDataError, match=r"expected a datasets\.Dataset, got list"):
        validate_preference_rows([GOOD])


def test_conversational_formats_detected():
    explicit = ds(
        {
            "prompt": [msg("user", "hi")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        }
    )
    assert preference_format(validate_preference_rows(explicit)) == PreferenceFormat(CONVERSATIONAL, True)
    implicit = ds(
        {
            "chosen": [msg("user", "hi"), msg("assistant", "a")],
            "rejected": [msg("user", "hi"), msg("assistant", "b")],
        }
    )
    assert preference_format(validate_preference_rows(implicit)) == PreferenceFormat(CONVERSATIONAL, False)


def test_conversational_implicit_without_shared_message():
    data = ds(
        {
            "chosen": [msg("user", "hi"), msg("assistant", "a")],
            "rejected": [msg("user", "yo"), msg("assistant", "b")],
        }
    )
    assert "row 0 (0-based): 'chosen' and 'rejected' share no leading message" in error_of(data)


def test_conversational_completion_without_text():
    data = ds(
        {
            "prompt": [msg("user", "hi")],
            "chosen": [msg("assistant", " ")],
            "rejected": [msg("assistant", "b")],
        }
    )
    assert "row 0 (0-based), field 'chosen': the completion messages have no text" in error_of(data)


def test_split_implicit_prompt_examples():
    assert split_implicit_prompt("The sky is blue.", "The sky is green.") == (
        "The sky is",
        " blue.",
        " green.",
    )
    assert split_implicit_prompt("ab", "abc") == ("a", "b", "bc")  # TRL keeps one char in each completion
    assert split_implicit_prompt("Yes ", "No") == ("", "Yes ", "No")  # TRL would wrap around here
    chat_c = [msg("user", "q"), msg("assistant", "a")]
    chat_r = [msg("user", "q"), msg("assistant", "b")]
    assert split_implicit_prompt(chat_c, chat_r) == (
        [msg("user", "q")],
        [msg("assistant", "a")],
        [msg("assistant", "b")],
    )


@settings(deadline=None)
@given(st.text(max_size=12), st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12))
def test_split_implicit_prompt_reassembles(prefix, a, b):
    chosen, rejected = prefix + a, prefix + b
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt + c == chosen and prompt + r == rejected
    assert c and r  # every completion keeps at least one character
    assert len(prompt) >= min(len(prefix), len(chosen) - 1, len(rejected) - 1) - 1


@pytest.mark.parametrize("conversational", [False, True])
def test_responses_that_repeat_the_prompt_are_warned_about(conversational):
    if conversational:
        user = {"role": "user", "content": "Hi"}
        row = {
            "prompt": [user],
            "chosen": [user, {"role": "assistant", "content": "Hello!"}],
            "rejected": [user, {"role": "assistant", "content": "Go away."}],
        }
        ok = {**row, "chosen": row["chosen"][1:], "rejected": row["rejected"][1:]}
    else:
        row = {
            "prompt": "Q: sky colour?",
            "chosen": "Q: sky colour? Blue.",
            "rejected": "Q: sky colour? Green.",
        }
        ok = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    with pytest.warns(
        UserWarning, match=r"in 1 row\(s\) \(0-based rows 1\).*both begin with the row's 'prompt'"
    ):
        validate_preference_rows(Dataset.from_list([ok, row]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_preference_rows(Dataset.from_list([ok]))  # nothing to say
