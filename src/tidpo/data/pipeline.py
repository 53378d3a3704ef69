"""``prepare_preference_dataset``: load -> validate -> format -> tokenise, the trainer's and CLI's entry."""

from __future__ import annotations

import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tidpo.data.errors import PreferenceDataError
from tidpo.data.formats import check_columns, validate_preference_rows
from tidpo.data.loading import DatasetSource, load_preference_dataset, source_name
from tidpo.data.tokenize import OUTPUT_COLUMNS, _check_lengths, _tokenize_validated

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


def check_token_ids(dataset: Dataset, num_embeddings: int, pad_token_id: int | None, source: str) -> None:
    """Refuse tokenised rows (or a pad id) outside the model's embedding matrix, naming the first row.

    The usual cause is a tokenizer that gained tokens (e.g. ``add_special_tokens({"pad_token": ...})``)
    without ``model.resize_token_embeddings``; the forward would otherwise fail with a bare IndexError.
    """
    fix = (
        "the tokenizer has tokens the model has no embedding for (e.g. a pad token added with "
        "add_special_tokens): call model.resize_token_embeddings(len(tokenizer)) before training, or use "
        "a token the model knows (e.g. tokenizer.pad_token = tokenizer.eos_token)."
    )
    if pad_token_id is not None and not 0 <= pad_token_id < num_embeddings:
        raise PreferenceDataError(
            f"{source}: the pad token id {pad_token_id} is outside the model's {num_embeddings} embeddings: {fix}"
        )
    table = dataset.with_format("arrow")  # (respects a selection of rows, unlike dataset.data)
    for column in OUTPUT_COLUMNS:
        if column not in dataset.column_names:
            continue
        values = pc.list_flatten(table[column])
        if len(values) == 0:
            continue
        low, high = pc.min_max(values).values()
        if low.as_py() >= 0 and high.as_py() < num_embeddings:
            continue
        # Named by the data's own row numbers where the dataset carries them (rows may have been dropped).
        row_ids = dataset[ROW_ID_COLUMN] if ROW_ID_COLUMN in dataset.column_names else range(len(dataset))
        for i, ids in zip(row_ids, dataset[column], strict=True):
            bad = [t for t in ids if not 0 <= t < num_embeddings]
            if bad:
                raise PreferenceDataError(
                    f"{source}: row {i} (0-based), {column}: token id {bad[0]} is outside the model's "
                    f"{num_embeddings} embeddings: {fix}"
                )
