"""The data layer: load, validate, format, tokenise and collate preference pairs (TRL's formats).

Public API::

    load_preference_dataset(source, split=None) -> Dataset
    validate_preference_rows(dataset, source="<dataset>", drop_identical=False) -> Dataset
    tokenize_preference_dataset(dataset, tokenizer, max_length=512, max_prompt_length=256,
                                drop_overlong=False, source="<dataset>") -> Dataset
    prepare_preference_dataset(source_or_dataset, tokenizer, *, max_length, max_prompt_length,
                               drop_identical=False, drop_overlong=False, split=None) -> Dataset
    check_token_ids(dataset, num_embeddings, pad_token_id, source) -> None
    PreferenceCollator(pad_token_id, pad_to_multiple_of=None)(rows) -> dict[str, Tensor]
    PreferenceDataError(ValueError)
"""

from tidpo.data.collator import PreferenceCollator
from tidpo.data.errors import PreferenceDataError
from tidpo.data.formats import (
    CONVERSATIONAL,
    STANDARD,
    PreferenceFormat,
    preference_format,
    split_implicit_prompt,
    validate_preference_rows,
)
from tidpo.data.loading import SUPPORTED_EXTENSIONS, load_preference_dataset
from tidpo.data.pipeline import ROW_ID_COLUMN, check_token_ids, prepare_preference_dataset
from tidpo.data.tokenize import OUTPUT_COLUMNS, tokenize_preference_dataset

__all__ = [
    "CONVERSATIONAL",
    "OUTPUT_COLUMNS",
    "ROW_ID_COLUMN",
    "STANDARD",
    "SUPPORTED_EXTENSIONS",
    "PreferenceCollator",
    "PreferenceDataError",
    "PreferenceFormat",
    "check_token_ids",
    "load_preference_dataset",
    "preference_format",
    "prepare_preference_dataset",
    "split_implicit_prompt",
    "tokenize_preference_dataset",
    "validate_preference_rows",
]
