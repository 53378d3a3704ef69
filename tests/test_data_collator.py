"""PreferenceCollator: the [2B, L] batch layout of docs/ARCHITECTURE.md."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo.data import PreferenceCollator, PreferenceDataError, prepare_preference_dataset
from tidpo.models import tiny_tokenizer

PAD = 3
ids = st.lists(st.integers(4, 300), min_size=1, max_size=12)
pair = st.fixed_dictionaries(
    {
        "prompt_input_ids": st.lists(st.integers(4, 300), min_size=0, max_size=10),
        "chosen_input_ids": ids,
        "rejected_input_ids": ids,
    }
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(pair, min_size=1, max_size=5), multiple=st.sampled_from([None, 1, 4, 8]))
def test_layout_invariants(rows, multiple):
    batch = PreferenceCollator(pad_token_id=PAD, pad_to_multiple_of=multiple)(rows)
    n = len(rows)
    seqs = [r["prompt_input_ids"] + r["chosen_input_ids"] for r in rows] + [
        r["prompt_input_ids"] + r["rejected_input_ids"] for r in rows
    ]
    longest = max(len(s) for s in seqs)
    length = batch["input_ids"].shape[1]
    assert length >= longest and (multiple is None or length % multiple == 0)
    assert length - longest < (multiple or 1)
    assert (
        batch["input_ids"].shape
        == batch["attention_mask"].shape
        == batch["completion_mask"].shape
        == (2 * n, length)
    )
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool
    for r, seq in enumerate(seqs):
        pair_row = rows[r % n]
        completion = pair_row["chosen_input_ids"] if r < n else pair_row["rejected_input_ids"]
        n_prompt = len(pair_row["prompt_input_ids"])
        # Right padding; rows 0..B-1 chosen, B..2B-1 rejected.
        assert batch["input_ids"][r, : len(seq)].tolist() == seq
        assert (batch["input_ids"][r, len(seq) :] == PAD).all()
        assert batch["attention_mask"][r].tolist() == [1] * len(seq) + [0] * (length - len(seq))
        # The completion mask marks exactly the response tokens.
        mask = batch["completion_mask"][r]
        assert mask.tolist() == [False] * n_prompt + [True] * len(completion) + [False] * (length - len(seq))
        assert batch["input_ids"][r][mask].tolist() == completion
    # Prompts are LEFT-padded.
    p_len = batch["prompt_input_ids"].shape[1]
    assert batch["prompt_input_ids"].shape == batch["prompt_attention_mask"].shape == (n, p_len)
    for b, row in enumerate(rows):
        p = row["prompt_input_ids"]
        assert batch["prompt_input_ids"][b, p_len - len(p) :].tolist() == p
        assert (batch["prompt_input_ids"][b, : p_len - len(p)] == PAD).all()
        assert batch["prompt_attention_mask"][b].tolist() == [0] * (p_len - len(p)) + [1] * len(p)
    assert "ref_logps" not in batch and "token_weights" not in batch


def test_per_token_values_land_on_completion_positions():
    rows = [
        {
            "prompt_input_ids": [10, 11],
            "chosen_input_ids": [20, 21, 22],
            "rejected_input_ids": [30],
            "ref_chosen_logps": [-1.0, -2.0, -3.0],
            "ref_rejected_logps": [-4.0],
            "chosen_weights": [0.5, 1.0, 1.5],
            "rejected_weights": [2.0],
            "prompt": "ignored text",
            "score": 0.3,
        },
        {
            "prompt_input_ids": [12],
            "chosen_input_ids": [23],
            "rejected_input_ids": [31, 32],
            "ref_chosen_logps": [-5.0],
            "ref_rejected_logps": [-6.0, -7.0],
            "chosen_weights": [1.0],
            "rejected_weights": [0.0, 3.0],
        },
    ]
    batch = PreferenceCollator(pad_token_id=PAD)(rows)
    assert batch["ref_logps"].dtype == torch.float32 and batch["token_weights"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [
        [0, 0, -1, -2, -3],
        [0, -5, 0, 0, 0],
        [0, 0, -4, 0, 0],
        [0, -6, -7, 0, 0],
    ]
    assert batch["token_weights"].tolist() == [
        [0, 0, 0.5, 1, 1.5],
        [0, 1, 0, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 3, 0, 0],
    ]
    # Values sit exactly where the completion mask is on.
    assert ((batch["ref_logps"] != 0) <= batch["completion_mask"]).all()


def test_per_token_length_mismatch_and_missing_pair():
    row = {"prompt_input_ids": [1], "chosen_input_ids": [5, 6], "rejected_input_ids": [7]}
    collate = PreferenceCollator(pad_token_id=PAD)
    with pytest.raises(
        PreferenceDataError, match=r"batch row 0, 'ref_chosen_logps' has 3 values .* 2 tokens"
    ):
        collate([{**row, "ref_chosen_logps": [0.0, 0.0, 0.0], "ref_rejected_logps": [0.0]}])
    with pytest.raises(PreferenceDataError, match="batch row 0 lacks 'rejected_weights'"):
        collate([{**row, "chosen_weights": [1.0, 1.0]}])
    with pytest.raises(PreferenceDataError, match="batch row 1 lacks 'chosen_weights'"):
        collate([{**row, "chosen_weights": [1.0, 1.0], "rejected_weights": [1.0]}, row])


def test_untokenised_rows_and_bad_settings():
    with pytest.raises(PreferenceDataError, match="tokenize_preference_dataset"):
        PreferenceCollator(pad_token_id=PAD)([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(PreferenceDataError, match="empty batch"):
        PreferenceCollator(pad_token_id=PAD)([])
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        PreferenceCollator(pad_token_id=None)


def test_end_to_end_with_a_real_tokenizer_and_dataset():
    tok = tiny_tokenizer()
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green and the dog ran."},
        {"prompt": "A cat sat on the mat and", "chosen": " slept.", "rejected": " ran."},
    ]
    data = prepare_preference_dataset(rows, tok, max_length=64, max_prompt_length=32)
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)([data[0], data[1]])
    decoded = [tok.decode(batch["input_ids"][r][batch["attention_mask"][r].bool()]) for r in range(4)]
    assert decoded == [
        "The sky is blue.<|im_end|>",
        "A cat sat on the mat and slept.<|im_end|>",
        "The sky is green and the dog ran.<|im_end|>",
        "A cat sat on the mat and ran.<|im_end|>",
    ]
    assert (
        tok.decode(batch["input_ids"][2][batch["completion_mask"][2]]) == " green and the dog ran.<|im_end|>"
    )
    assert tok.decode(batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()]) == "The sky is"
