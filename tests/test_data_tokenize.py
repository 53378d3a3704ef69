"""Tokenisation: formats, truncation rules, overlong rows, per-token columns, tokenizer checks."""

from __future__ import annotations

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidpo.data import (
    ROW_ID_COLUMN,
    PreferenceDataError,
    check_token_ids,
    prepare_preference_dataset,
    tokenize_preference_dataset,
)
from tidpo.models import tiny_tokenizer

WORDS = ["The", "sky", "is", "blue", "green", "cat", "dog", "park", "music", "story", "great", "boring"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def untruncated(rows, tok):
    return prepare_preference_dataset(rows, tok, max_length=None, max_prompt_length=None)


def test_standard_ids_are_prompt_then_completion_plus_eos(tok):
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    out = untruncated(rows, tok)[0]
    assert out["prompt_input_ids"] == tok("The sky is")["input_ids"]
    assert out["prompt_input_ids"] + out["chosen_input_ids"] == tok("The sky is blue.<|im_end|>")["input_ids"]
    assert tok.decode(out["rejected_input_ids"]) == " green.<|im_end|>"


def test_conversational_ids_follow_the_chat_template(tok):
    prompt = [{"role": "user", "content": "The sky is?"}]
    chosen = [{"role": "assistant", "content": "blue"}]
    out = untruncated(
        [{"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": "no"}]}], tok
    )
    row = out[0]
    assert (
        tok.decode(row["prompt_input_ids"])
        == "<|im_start|>user\nThe sky is?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(row["chosen_input_ids"]) == "blue<|im_end|>\n"
    assert tok.decode(row["rejected_input_ids"]) == "no<|im_end|>\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt_words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    chosen_words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    rejected_words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    max_prompt_length=st.integers(1, 40),
    extra=st.integers(1, 40),
)
def test_truncation_rules(tok, prompt_words, chosen_words, rejected_words, max_prompt_length, extra):
    max_length = max_prompt_length + extra
    row = {
        "prompt": " ".join(prompt_words),
        "chosen": " " + " ".join(chosen_words),
        "rejected": " " + " ".join(rejected_words),
    }
    full = untruncated([row], tok)[0]
    out = prepare_preference_dataset([row], tok, max_length=max_length, max_prompt_length=max_prompt_length)[
        0
    ]
    # The prompt keeps its END (the part next to the response), at most max_prompt_length tokens.
    assert out["prompt_input_ids"] == full["prompt_input_ids"][-max_prompt_length:]
    room = max_length - len(out["prompt_input_ids"])
    for key in ("chosen_input_ids", "rejected_input_ids"):
        # Each completion keeps its START, so that prompt + completion <= max_length.
        assert out[key] == full[key][:room]
        assert 0 < len(out[key])
        assert len(out["prompt_input_ids"]) + len(out[key]) <= max_length


def long_prompt_rows():
    long = " ".join(["The sky is blue and the grass is green."] * 6)
    return [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": long, "chosen": " yes.", "rejected": " no."},
        {"prompt": "A cat", "chosen": " sat.", "rejected": " ran."},
        {"prompt": long + " again", "chosen": " yes.", "rejected": " no."},
    ]


def test_overlong_rows_error_names_settings_and_rows(tok):
    with pytest.raises(PreferenceDataError) as info:
        prepare_preference_dataset(long_prompt_rows(), tok, max_length=20, max_prompt_length=None)
    message = str(info.value)
    assert "2 row(s)" in message and "0-based rows 1, 3" in message
    assert "max_length=20" in message and "max_prompt_length" in message and "drop_overlong=True" in message


def test_overlong_rows_dropped_with_warning(tok):
    rows = long_prompt_rows()
    with pytest.warns(UserWarning, match=r"dropped 2 overlong row\(s\) \(0-based rows 1, 3\)"):
        out = prepare_preference_dataset(rows, tok, max_length=20, max_prompt_length=None, drop_overlong=True)
    assert [r["prompt"] for r in out] == ["The sky is", "A cat"]
    with pytest.raises(PreferenceDataError, match="nothing is left"):
        prepare_preference_dataset([rows[1]], tok, max_length=20, max_prompt_length=None, drop_overlong=True)


def test_max_prompt_length_keeps_long_prompts(tok):
    with pytest.warns(
        UserWarning, match=r"2 of 4 prompt\(s\) \(0-based rows 1, 3\) are longer than max_prompt_length=12"
    ):
        out = prepare_preference_dataset(long_prompt_rows(), tok, max_length=20, max_prompt_length=12)
    assert len(out) == 4
    assert all(len(r["prompt_input_ids"]) <= 12 for r in out)
    assert all(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) <= 20 for r in out)


def _bos_tokenizer():
    """The tiny tokenizer, adding a BOS (``<|endoftext|>``) in front of every text, as Llama's does."""
    from tokenizers import processors

    bos_tok = tiny_tokenizer()
    bos = bos_tok.convert_tokens_to_ids("<|endoftext|>")
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    bos_tok.bos_token = "<|endoftext|>"
    return bos_tok


def test_a_cut_prompt_keeps_its_bos():
    bos_tok = _bos_tokenizer()
    rows = long_prompt_rows()
    full = prepare_preference_dataset(rows, bos_tok, max_length=None, max_prompt_length=None)
    with pytest.warns(UserWarning, match="a leading BOS token is kept"):
        out = prepare_preference_dataset(rows, bos_tok, max_length=30, max_prompt_length=12)
    for whole, cut in zip(full, out, strict=True):
        assert whole["prompt_input_ids"][0] == bos_tok.bos_token_id
        if len(whole["prompt_input_ids"]) <= 12:  # short prompts stay whole
            assert cut["prompt_input_ids"] == whole["prompt_input_ids"]
        else:  # BOS, then the last 11 tokens (the part next to the response)
            assert cut["prompt_input_ids"] == [bos_tok.bos_token_id, *whole["prompt_input_ids"][-11:]]
        assert cut["chosen_input_ids"] == whole["chosen_input_ids"]


def test_token_ids_outside_the_embeddings_are_refused_by_row():
    data = Dataset.from_dict(
        {
            "prompt_input_ids": [[1, 2], [3, 4], [5]],
            "chosen_input_ids": [[5], [9], [6]],
            "rejected_input_ids": [[6], [7], [8]],
        }
    )
    check_token_ids(data, 10, 0, "train.jsonl")  # every id (and the pad id) below 10: no error
    with pytest.raises(
        PreferenceDataError, match=r"train.jsonl: row 1 \(0-based\), chosen_input_ids: token id 9 "
    ):
        check_token_ids(data, 9, 0, "train.jsonl")
    with pytest.raises(PreferenceDataError, match=r"rejected_input_ids: token id -1 "):
        check_token_ids(
            Dataset.from_dict({**data.to_dict(), "rejected_input_ids": [[6], [7], [-1]]}), 10, 0, "x"
        )
    with pytest.raises(PreferenceDataError, match="pad token id 10 is outside the model's 10 embeddings"):
        check_token_ids(data, 10, 10, "train.jsonl")
    # A selection of rows is checked as selected (not the table under it): row 1 alone is row 0.
    with pytest.raises(PreferenceDataError, match="row 0 "):
        check_token_ids(data.select([1]), 9, 0, "train.jsonl")
    check_token_ids(data.select([0, 2]), 9, 0, "train.jsonl")
    # Rows carrying their data row numbers (rows dropped before, e.g. identical ones) are named by them.
    numbered = data.add_column(ROW_ID_COLUMN, [1, 2, 5])
    with pytest.raises(PreferenceDataError, match=r"row 2 \(0-based\), chosen_input_ids: token id 9 "):
        check_token_ids(numbered, 9, 0, "train.jsonl")


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "pattern"),
    [
        (0, None, "max_length must be a positive integer"),
        (10, 10, "must be smaller than max_length"),
        (8, -1, "max_prompt_length"),
    ],
)
def test_bad_length_settings(tok, max_length, max_prompt_length, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare_preference_dataset(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}],
            tok,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )


def test_per_token_columns_are_checked_and_truncated_with_the_completion(tok):
    row = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    full = untruncated([row], tok)[0]
    n_c, n_r = len(full["chosen_input_ids"]), len(full["rejected_input_ids"])
    weighted = {
        **row,
        "chosen_weights": [float(i) for i in range(n_c)],
        "rejected_weights": [1.0] * n_r,
        "ref_chosen_logps": [-0.5] * n_c,
        "ref_rejected_logps": [-1.5] * n_r,
    }
    max_length = len(full["prompt_input_ids"]) + 2
    out = prepare_preference_dataset([weighted], tok, max_length=max_length, max_prompt_length=None)[0]
    assert out["chosen_weights"] == [0.0, 1.0]
    assert out["rejected_weights"] == [1.0, 1.0]
    assert out["ref_chosen_logps"] == [-0.5, -0.5]
    wrong = {**weighted, "rejected_weights": [1.0] * (n_r + 1)}
    with pytest.raises(PreferenceDataError) as info:
        prepare_preference_dataset([weighted, wrong], tok, max_length=None, max_prompt_length=None)
    message = str(info.value)
    assert "row 1 (0-based), field 'rejected_weights'" in message
    assert f"{n_r + 1} values" in message and f"{n_r} tokens" in message


def test_tokenizer_without_pad_token_gets_eos(tok):
    nopad = tiny_tokenizer()
    nopad.pad_token = None
    assert nopad.pad_token_id is None
    prepare_preference_dataset(
        [{"prompt": "a", "chosen": "b", "rejected": "c"}], nopad, max_length=16, max_prompt_length=8
    )
    assert nopad.pad_token_id == nopad.eos_token_id


def test_tokenizer_without_pad_or_eos_fails_clearly():
    bare = tiny_tokenizer()
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(PreferenceDataError, match="cannot pad batches with this tokenizer"):
        prepare_preference_dataset(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}], bare, max_length=16, max_prompt_length=8
        )


def test_conversational_rows_need_a_chat_template():
    plain = tiny_tokenizer()
    plain.chat_template = None
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    ]
    with pytest.raises(PreferenceDataError, match=r"conversational.*no chat template"):
        prepare_preference_dataset(rows, plain, max_length=64, max_prompt_length=32)


def test_tokenize_validates_its_input_and_passes_extra_columns(tok):
    data = Dataset.from_list(
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "score": 3}]
    )
    out = tokenize_preference_dataset(data, tok, max_length=32, max_prompt_length=16)
    assert out[0]["score"] == 3
    assert set(out.column_names) >= {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "score"}
    with pytest.raises(PreferenceDataError, match=r"train.jsonl: row 0 \(0-based\), field 'chosen'"):
        tokenize_preference_dataset(
            Dataset.from_list([{"prompt": "a", "chosen": "", "rejected": "b"}]), tok, source="train.jsonl"
        )


def test_retokenising_replaces_the_id_columns(tok):
    data = Dataset.from_list([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    once = tokenize_preference_dataset(data, tok, max_length=None, max_prompt_length=None)
    twice = tokenize_preference_dataset(once, tok, max_length=8, max_prompt_length=4)
    assert len(twice[0]["prompt_input_ids"]) == 4
    assert twice.column_names.count("prompt_input_ids") == 1


def test_rows_with_a_prompt_of_no_tokens_are_an_error_naming_them(tok):
    """Implicit-prompt rows sharing no beginning have nothing to condition on: the first response token
    would get no logits (log-prob 0) and no anchor could be sampled. An error, not a silent zero."""
    rows = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # prompt "The sky is"
        {"chosen": "Blue.", "rejected": "Green."},  # no shared beginning
        {"chosen": "Yes", "rejected": "No"},
    ]
    with pytest.raises(
        PreferenceDataError, match=r"2 row\(s\) have a prompt of no tokens \(0-based rows 1, 2\)"
    ):
        prepare_preference_dataset(Dataset.from_list(rows), tok)
    assert len(prepare_preference_dataset(Dataset.from_list(rows[:1]), tok)) == 1


def test_pairs_that_differ_only_past_max_length_are_warned_about(tok):
    rows = [
        {
            "prompt": "Say it:",
            "chosen": " a a a a a a a a a a a a yes",
            "rejected": " a a a a a a a a a a a a no",
        },
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ]
    with pytest.warns(UserWarning, match=r"in 1 row\(s\) \(0-based rows 0\).*differ only past max_length=12"):
        data = prepare_preference_dataset(Dataset.from_list(rows), tok, max_length=12, max_prompt_length=4)
    assert data[0]["chosen_input_ids"] == data[0]["rejected_input_ids"]


@pytest.mark.parametrize(
    ("column", "value", "fragment"),
    [
        ("tools", "[not json", "column 'tools': '[not json' is not valid JSON"),
        ("tools", '{"name": "f"}', "column 'tools': expected a list of tool schemas, got dict"),
        ("chat_template_kwargs", "think", "column 'chat_template_kwargs': expected a mapping"),
    ],
)
def test_bad_template_columns_name_the_column_and_rows(tok, column, value, fragment):
    user, bot = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    row = {"prompt": [user], "chosen": [bot], "rejected": [{**bot, "content": "Go"}], column: value}
    with pytest.raises(PreferenceDataError, match=r"tokenising rows 0\.\.0 \(0-based\) failed") as info:
        prepare_preference_dataset(Dataset.from_list([row]), tok)
    assert fragment in str(info.value)
