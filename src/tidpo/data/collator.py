"""Batch collation: one concatenated [2B, L] batch of prompt+chosen and prompt+rejected rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidpo.data.errors import PreferenceDataError
from tidpo.data.formats import REF_LOGP_COLUMNS, WEIGHT_COLUMNS

_IDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


@dataclass
class PreferenceCollator:
    """Collate tokenised preference rows into the batch layout of docs/ARCHITECTURE.md.

    For B rows it returns:

    - ``input_ids`` (long), ``attention_mask`` (long), ``completion_mask`` (bool): [2B, L], right-padded;
      rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, L the longest of the 2B sequences
      (rounded up to ``pad_to_multiple_of``); ``completion_mask`` is True exactly at response tokens;
    - ``prompt_input_ids`` (long), ``prompt_attention_mask`` (long): [B, P], LEFT-padded (for sampling);
    - ``ref_logps`` (float32) [2B, L] when rows carry ``ref_chosen_logps``/``ref_rejected_logps``, and
      ``token_weights`` (float32) [2B, L] when they carry ``chosen_weights``/``rejected_weights``: one
      value per completion token, placed at that token's position (the value of token ``input_ids[r, t]``
      is at ``[r, t]``), 0 elsewhere.

    Other keys of the rows (text, scores, ...) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ValueError(
                f"PreferenceCollator: pad_token_id must be an int, got {self.pad_token_id!r}; use "
                "tokenizer.pad_token_id (tidpo.models.ensure_pad_token sets one)."
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}."
            )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise PreferenceDataError("PreferenceCollator: got an empty batch.")
        for b, ex in enumerate(examples):
            missing = [k for k in _IDS if k not in ex]
            if missing:
                raise PreferenceDataError(
                    f"PreferenceCollator: batch row {b} lacks {missing} (has {sorted(ex)}); tokenise the dataset "
                    "with tidpo.data.tokenize_preference_dataset (or prepare_preference_dataset) first."
                )
            for k in ("chosen_input_ids", "rejected_input_ids"):
                if len(ex[k]) == 0:
                    raise PreferenceDataError(f"PreferenceCollator: batch row {b}: {k!r} is empty.")
        prompts = [list(ex["prompt_input_ids"]) for ex in examples]
        completions = [list(ex["chosen_input_ids"]) for ex in examples] + [
            list(ex["rejected_input_ids"]) for ex in examples
        ]
        prompts2 = prompts + prompts
        n_rows = len(completions)
        length = _round_up(
            max(len(p) + len(c) for p, c in zip(prompts2, completions, strict=True)), self.pad_to_multiple_of
        )

        input_ids = torch.full((n_rows, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n_rows, length), dtype=torch.long)
        completion_mask = torch.zeros((n_rows, length), dtype=torch.bool)
        for r, (p, c) in enumerate(zip(prompts2, completions, strict=True)):
            n_p, n = len(p), len(p) + len(c)
            input_ids[r, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[r, :n] = 1
            completion_mask[r, n_p:n] = True

        p_len = _round_up(max(len(p) for p in prompts), self.pad_to_multiple_of)
        prompt_input_ids = torch.full((len(prompts), p_len), self.pad_token_id, dtype=torch.long)
        prompt_attention_mask = torch.zeros((len(prompts), p_len), dtype=torch.long)
        for b, p in enumerate(prompts):
            if p:  # left padding: the prompt ends at the last column, next to where generation starts
                prompt_input_ids[b, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
                prompt_attention_mask[b, p_len - len(p) :] = 1

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "prompt_input_ids": prompt_input_ids,
            "prompt_attention_mask": prompt_attention_mask,
        }
        for out_key, (chosen_key, rejected_key) in (
            ("ref_logps", REF_LOGP_COLUMNS),
            ("token_weights", WEIGHT_COLUMNS),
        ):
            values = self._per_token(examples, prompts2, completions, chosen_key, rejected_key, length)
            if values is not None:
                batch[out_key] = values
        return batch

    @staticmethod
    def _per_token(
        examples: Sequence[Mapping[str, Any]],
        prompts2: list[list[int]],
        completions: list[list[int]],
        chosen_key: str,
        rejected_key: str,
        length: int,
    ) -> torch.Tensor | None:
        has = [chosen_key in ex or rejected_key in ex for ex in examples]
        if not any(has):
            return None
        per_row = []
        for key in (chosen_key, rejected_key):
            for b, ex in enumerate(examples):
                if ex.get(key) is None:
                    raise PreferenceDataError(
                        f"PreferenceCollator: batch row {b} lacks {key!r} while other rows or its pair column "
                        f"have it; give both {chosen_key!r} and {rejected_key!r} for every row, or neither."
                    )
                per_row.append(list(ex[key]))
        out = torch.zeros((len(completions), length), dtype=torch.float32)
        n_pairs = len(examples)
        for r, (p, c, values) in enumerate(zip(prompts2, completions, per_row, strict=True)):
            if len(values) != len(c):
                key = chosen_key if r < n_pairs else rejected_key
                raise PreferenceDataError(
                    f"PreferenceCollator: batch row {r % n_pairs}, {key!r} has {len(values)} values but the "
                    f"completion has {len(c)} tokens; give one value per completion token (tokenise with "
                    "tidpo.data.tokenize_preference_dataset, which truncates them with the completion)."
                )
            out[r, len(p) : len(p) + len(c)] = torch.tensor(values, dtype=torch.float32)
        return out
