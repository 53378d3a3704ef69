"""``prepare_preference_dataset``: load -> validate -> format -> tokenise, the trainer's and CLI's entry."""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tidpo.data.formats import check_columns, validate_preference_rows
from tidpo.data.loading import DatasetSource, load_preference_dataset, source_name
from tidpo.data.tokenize import _check_lengths, _tokenize_validated

# Optional column holding each row's 0-based index in the data as given (before identical or overlong
# rows are dropped), so later errors (e.g. NaN/Inf during training) can name the user's rows.
ROW_ID_COLUMN = "tidpo_row_id"


def prepare_preference_dataset(
    source_or_dataset: DatasetSource,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    drop_identical: bool = False,
    drop_overlong: bool = False,
    split: str | None = None,
    row_ids: bool = False,
) -> Dataset:
    """Load, validate and tokenise preference data into rows ``PreferenceCollator`` can batch.

    ``source_or_dataset`` is anything ``load_preference_dataset`` takes (file path, Dataset, DatasetDict,
    list of row dicts, Hub id). Errors name the file, row (0-based) and field; see
    ``validate_preference_rows`` and ``tokenize_preference_dataset`` for the rules. With ``row_ids``,
    each row also gets its original index in ``ROW_ID_COLUMN``.
    """
    _check_lengths(max_length, max_prompt_length)  # fail on a bad config before reading any data
    source = source_name(source_or_dataset)
    dataset = load_preference_dataset(source_or_dataset, split=split)
    if row_ids and ROW_ID_COLUMN not in dataset.column_names:
        # Added after the column check, so a column error lists only the user's columns.
        check_columns(dataset.column_names, source)
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    dataset = validate_preference_rows(dataset, source=source, drop_identical=drop_identical)
    return _tokenize_validated(dataset, tokenizer, max_length, max_prompt_length, drop_overlong, source)
