"""Load preference data from a local file, an in-memory dataset or the Hugging Face Hub."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from tidpo.data.errors import PreferenceDataError
from tidpo.data.formats import check_columns, validate_rows

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
# "name" or "owner/name" with the characters the Hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_LIKE_SUFFIX = re.compile(r"\.(jsonl|json|csv|parquet|txt|tsv|arrow|gz|zip|xlsx?)$", re.IGNORECASE)

DatasetSource = str | Path | Dataset | DatasetDict | Sequence[Mapping[str, Any]]


def source_name(source: Any) -> str:
    """The name used for ``source`` in messages: the file path, or ``"<dataset>"``."""
    return str(source) if isinstance(source, (str, Path)) else "<dataset>"


def load_preference_dataset(source: DatasetSource, split: str | None = None) -> Dataset:
    """Load preference rows as a ``datasets.Dataset`` (not yet validated or tokenised).

    Args:
        source: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file; a ``Dataset``; a ``DatasetDict``
            (``split`` is taken, default ``"train"``); a list of row dicts; or a Hub dataset id
            (``"owner/name"``, loaded with ``datasets.load_dataset``; needs network access).
        split: the split to take from a ``DatasetDict`` or Hub dataset (default ``"train"``). A local
            file is one split: anything but ``None`` / ``"train"`` is refused for it.

    Raises:
        FileNotFoundError: a path that does not exist.
        PreferenceDataError: unsupported extension, malformed file (the message names the file and the
            line or row), missing split, or an unreachable Hub.
    """
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        return _pick_split(source, split, "<dataset>")
    if isinstance(source, (IterableDataset, IterableDatasetDict)):
        raise PreferenceDataError(
            "<dataset>: streaming (Iterable) datasets are not supported; load it without streaming=True."
        )
    if isinstance(source, str) and not source.strip():
        raise PreferenceDataError("the data source is an empty string; give a file path or a Hub id.")
    if isinstance(source, Path) or isinstance(source, str):
        path = Path(source).expanduser()
        if path.is_dir():
            raise PreferenceDataError(
                f"{source}: is a directory; give a file ({', '.join(SUPPORTED_EXTENSIONS)}) or a Hub id."
            )
        if path.is_file():
            if split not in (None, "train"):
                # A file holds one split; silently training on it as another would be a silent mix-up.
                raise PreferenceDataError(
                    f"{source}: a local file holds one split, so split={split!r} cannot be taken from it "
                    "(splits apply to Hub datasets and DatasetDicts). Give the file that holds that split "
                    "(CLI: --train_data / --eval_data) and leave the split at 'train'."
                )
            return _load_file(path)
        if isinstance(source, str) and _looks_like_hub_id(source):
            return _load_hub(source, split)
        raise FileNotFoundError(
            f"Preference data file not found: {source} (resolved to {path.resolve()}). Give an existing "
            f"{'/'.join(SUPPORTED_EXTENSIONS)} file or a Hub dataset id like 'owner/name'."
        )
    if isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        return rows_to_dataset([dict(r) for r in source], "<dataset>")
    raise PreferenceDataError(
        f"Cannot load preference data from {type(source).__name__}; give a file path, a datasets.Dataset, a "
        "DatasetDict, a list of row dicts or a Hub id."
    )


def _looks_like_hub_id(text: str) -> bool:
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return False
    return bool(_HUB_ID.match(text)) and not _FILE_LIKE_SUFFIX.search(text)


def _pick_split(dataset_dict: Mapping[str, Dataset], split: str | None, source: str) -> Dataset:
    name = split or "train"
    if name not in dataset_dict:
        raise PreferenceDataError(
            f"{source}: no split {name!r}; available splits: {sorted(dataset_dict)}. Pass split=... to "
            "load_preference_dataset (CLI: --train_split / --eval_split)."
        )
    return dataset_dict[name]


def _load_hub(hub_id: str, split: str | None) -> Dataset:
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as err:  # network, auth, missing repo: all mean "cannot use this id here"
        raise PreferenceDataError(
            f"{hub_id}: not a local file, and loading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). The Hub may be unreachable from this machine (offline?) or the "
            "id may be wrong; give a local .jsonl/.json/.csv/.parquet file instead."
        ) from err
    if isinstance(loaded, Dataset):
        return loaded
    return _pick_split(loaded, split, hub_id)


def _load_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise PreferenceDataError(
            f"{path}: unsupported file extension {path.suffix!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}. "
            "Convert the file or rename it if its content is in one of these formats."
        )
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: drops the BOM spreadsheets write
        except UnicodeDecodeError as err:
            raise PreferenceDataError(
                f"{path}: not valid UTF-8 text (byte {err.start}); save the file as UTF-8."
            ) from err
        if suffix == ".jsonl":
            rows = _parse_jsonl(text, path)
        elif suffix == ".json":
            rows = _parse_json(text, path)
        else:
            rows = _parse_csv(text, path)
    return rows_to_dataset(rows, str(path))


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    # Rows end at "\n" only: str.splitlines() would also break inside strings at U+2028, U+0085, \x1c...,
    # which json.dumps(..., ensure_ascii=False) writes unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(
                f"{path}: line {lineno} (1-based) is not valid JSON ({err.msg} at column {err.colno}); each line "
                "of a .jsonl file must be one JSON object."
            ) from err
        if not isinstance(obj, dict):
            raise PreferenceDataError(
                f"{path}: line {lineno} (1-based) is a JSON {type(obj).__name__}, not an object; each line must "
                'be one object like {"prompt": ..., "chosen": ..., "rejected": ...}.'
            )
        rows.append(obj)
    return rows


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # Several top-level values: JSON Lines saved with a .json name (datasets accepts that too).
            return _parse_jsonl(text, path)
        raise PreferenceDataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    if isinstance(obj, list):
        for i, row in enumerate(obj):
            if not isinstance(row, dict):
                raise PreferenceDataError(
                    f"{path}: row {i} (0-based) is a JSON {type(row).__name__}, not an object; a .json file must "
                    "hold a list of row objects or an object of equal-length column lists."
                )
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) > 1:
            raise PreferenceDataError(
                f"{path}: the column lists have different lengths {lengths}; every column needs one value per row."
            )
        n = next(iter(lengths.values()))
        return [{k: v[i] for k, v in obj.items()} for i in range(n)]
    raise PreferenceDataError(
        f"{path}: a .json file must hold a list of row objects or an object of equal-length column lists; "
        f"got a JSON {type(obj).__name__}."
    )


def _parse_csv(text: str, path: Path) -> list[dict[str, Any]]:
    # The csv module keeps every cell a string (pandas would turn empty cells into NaN floats).
    # newline="": the csv module splits rows itself (quoted newlines, and not at U+2028 and friends).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for i, row in enumerate(reader):
            if None in row:
                raise PreferenceDataError(
                    f"{path}: row {i} (0-based; line {reader.line_num}) has more cells than the header "
                    f"{reader.fieldnames}; quote cells that contain commas."
                )
            rows.append(row)
    except csv.Error as err:
        raise PreferenceDataError(f"{path}: malformed CSV at line {reader.line_num}: {err}") from err
    if reader.fieldnames is None:
        raise PreferenceDataError(f"{path}: the CSV file is empty; it needs a header line and rows.")
    header = list(reader.fieldnames)
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t", "|")):
        raise PreferenceDataError(
            f"{path}: the header is one column {header[0]!r}: the file looks separated by ';', tabs or '|', "
            "not commas. Save it as comma-separated CSV (or as .jsonl)."
        )
    check_columns(header, str(path))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise PreferenceDataError(
            f"{path}: cannot read it as Parquet ({type(err).__name__}: {err})."
        ) from err
    return table.to_pylist()


def rows_to_dataset(rows: list[dict[str, Any]], source: str) -> Dataset:
    """Build a ``Dataset`` from row dicts, keeping every column any row has (nothing silently dropped).

    A row without a column gets null there, which validation then reports by row and field. Columns whose
    type varies between rows are stored as JSON values so that validation, not pyarrow, reports them.
    """
    if not rows:
        raise PreferenceDataError(f"{source}: the file has no rows.")
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    normalised = [{c: row.get(c) for c in columns} for row in rows]
    try:
        return Dataset.from_list(normalised, on_mixed_types="use_json")
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as err:
        # Find the offending row for the message; if the rows look fine, still fail with context.
        validate_rows(normalised, list(columns), source)
        raise PreferenceDataError(
            f"{source}: could not build a table from the rows ({type(err).__name__}: {err}); check that every "
            "column holds values of one type."
        ) from err
