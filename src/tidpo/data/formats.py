"""Preference-row formats (TRL's): standard vs conversational, explicit vs implicit prompt; validation.

- standard: ``prompt``/``chosen``/``rejected`` are strings;
- conversational: they are lists of ``{"role", "content"}`` messages (rendered later with the tokenizer's
  chat template);
- implicit prompt: there is no ``prompt`` column, the prompt is the shared start of ``chosen`` and
  ``rejected`` (characters for standard rows, leading messages for conversational rows).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from datasets import Dataset

from tidpo.data.errors import PreferenceDataError

STANDARD = "standard"
CONVERSATIONAL = "conversational"
FormatKind = Literal["standard", "conversational"]

TEXT_FIELDS = ("prompt", "chosen", "rejected")
WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")
REF_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Per-completion-token float columns: (chosen column, rejected column) pairs, validated alike.
PER_TOKEN_COLUMNS = (WEIGHT_COLUMNS, REF_LOGP_COLUMNS)

# Column names that usually mean "this should have been called X" (checked when X is missing).
_RENAME_HINTS: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "instruction", "query", "input", "context", "prompt_text", "history"),
    "chosen": ("response_chosen", "chosen_response", "preferred", "better", "good", "winner", "chosen_text"),
    "rejected": (
        "response_rejected",
        "rejected_response",
        "dispreferred",
        "worse",
        "bad",
        "loser",
        "rejected_text",
    ),
}
_SHOW_ROWS = 5  # how many row indices an aggregated message lists


@dataclass(frozen=True)
class PreferenceFormat:
    """The format of a validated preference dataset."""

    kind: FormatKind
    explicit_prompt: bool


def format_rows(indices: Sequence[int], limit: int = _SHOW_ROWS) -> str:
    """``"3, 7, 12 and 4 more"``: the first few row indices of a list, for messages."""
    shown = ", ".join(str(i) for i in indices[:limit])
    rest = len(indices) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


def _where(source: str, row: int, field: str) -> str:
    return f"{source}: row {row} (0-based), field {field!r}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_columns(columns: Sequence[str], source: str = "<dataset>") -> bool:
    """Check that the preference columns are there; return whether the prompt is explicit.

    Raises ``PreferenceDataError`` naming the columns found and expected (with a rename hint such as
    ``rename 'response_chosen' to 'chosen'``) when ``chosen``/``rejected`` are missing, or when there is
    no ``prompt`` but a column that looks like one (e.g. ``question``).
    """
    found = list(columns)
    expected = (
        "expected columns 'prompt', 'chosen', 'rejected' (explicit prompt) or 'chosen', 'rejected' "
        "(implicit prompt: the prompt is their shared beginning)"
    )
    hints = []
    for name in TEXT_FIELDS:
        if name in found:
            continue
        candidates = [c for c in found if c.lower() in _RENAME_HINTS[name]]
        candidates += [c for c in found if name in c.lower() and c not in candidates and c not in TEXT_FIELDS]
        # "chosen_weights" and friends are our own columns, never a misnamed "chosen".
        candidates = [c for c in candidates if c not in WEIGHT_COLUMNS + REF_LOGP_COLUMNS]
        if candidates:
            hints.append(f"rename {candidates[0]!r} to {name!r}")
    hint = f" Did you mean to {' and '.join(hints)} (e.g. dataset.rename_column(old, new))?" if hints else ""
    missing = [name for name in ("chosen", "rejected") if name not in found]
    if missing:
        raise PreferenceDataError(
            f"{source}: missing column(s) {missing}; found columns {found}; {expected}.{hint}"
        )
    if "prompt" not in found:
        # Also 'Prompt', 'prompt ' or a BOM-prefixed header: a near-miss would silently make every row
        # implicit-prompt, and the real prompt would never be seen.
        prompt_like = [
            c for c in found if c.strip().lstrip("\ufeff").lower() in ("prompt", *_RENAME_HINTS["prompt"])
        ]
        if prompt_like:
            raise PreferenceDataError(
                f"{source}: there is no 'prompt' column but there is {prompt_like[0]!r}; found columns {found}; "
                f"{expected}. Rename {prompt_like[0]!r} to 'prompt' if it holds the prompt, or remove it if "
                "'chosen'/'rejected' already contain the prompt."
            )
        return False
    return True


def value_kind(value: Any, source: str, row: int, field: str) -> FormatKind:
    """Check one ``prompt``/``chosen``/``rejected`` value and say which format it is in.

    A value must be a non-empty string (standard) or a non-empty list of ``{"role", "content"}`` dicts
    with string role and content (conversational); anything else raises ``PreferenceDataError``.
    """
    where = _where(source, row, field)
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(
                f"{where}: the text is empty or only whitespace; give a non-empty string (or remove the row)."
            )
        return STANDARD
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise PreferenceDataError(
                f"{where}: the message list is empty; give at least one {{'role', 'content'}} message."
            )
        for j, message in enumerate(value):
            if not isinstance(message, Mapping):
                raise PreferenceDataError(
                    f"{where}, message {j}: expected a {{'role': ..., 'content': ...}} dict, got "
                    f"{_type_name(message)} {_short(message)}; a conversational value is a list of such dicts, "
                    "a standard value is a plain string."
                )
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    state = "is missing" if message.get(key) is None else f"is {_type_name(message.get(key))}"
                    raise PreferenceDataError(
                        f"{where}, message {j}: {key!r} {state}; every message needs string 'role' and "
                        f"'content' (got {_short(dict(message))})."
                    )
            if not message["role"].strip():
                raise PreferenceDataError(
                    f"{where}, message {j}: 'role' is empty; use e.g. 'user'/'assistant'."
                )
        return CONVERSATIONAL
    if value is None:
        raise PreferenceDataError(
            f"{where}: the value is missing (null); give a non-empty string or messages."
        )
    raise PreferenceDataError(
        f"{where}: expected a string (standard format) or a list of {{'role', 'content'}} messages "
        f"(conversational format), got {_type_name(value)} {_short(value)}."
    )


def _messages_have_text(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m["content"].strip() for m in messages)


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)`` as TRL's ``extract_prompt`` does.

    The prompt is the longest shared prefix (characters of strings, or whole messages of message lists).
    As in TRL, each completion keeps at least its last element when one is a prefix of the other, and for
    strings a space just before the divergence moves into the completions (``" blue"`` not ``"blue"``).
    Unlike TRL, a divergence at the very first character never wraps around to the end of the string.
    """
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    if i == n:
        # No divergence inside the shorter one: leave its last element to the completions (TRL does too).
        i = max(n - 1, 0)
    elif i > 0 and isinstance(chosen, str) and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _check_per_token(value: Any, source: str, row: int, field: str) -> None:
    where = _where(source, row, field)
    if not isinstance(value, (list, tuple)):
        got = "it is missing (null)" if value is None else f"got {_type_name(value)} {_short(value)}"
        raise PreferenceDataError(
            f"{where}: expected a list with one float per completion token, {got}; every row needs one "
            "when the column exists."
        )
    is_weight = field in WEIGHT_COLUMNS
    for j, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise PreferenceDataError(
                f"{where}, item {j}: expected a number, got {_type_name(x)} {_short(x)}."
            )
        if not math.isfinite(x):
            raise PreferenceDataError(f"{where}, item {j}: {x} is not finite; every value must be finite.")
        if is_weight and x < 0:
            raise PreferenceDataError(
                f"{where}, item {j}: token weights must be non-negative, got {x}; fix or recompute the weights."
            )


def iter_rows(dataset: Dataset, columns: Sequence[str], batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of ``columns`` as plain Python dicts, read in batches (faster than row-by-row access)."""
    view = dataset.select_columns(list(columns))
    for batch in view.iter(batch_size=batch_size):
        n = len(next(iter(batch.values()))) if batch else 0
        for k in range(n):
            yield {c: batch[c][k] for c in columns}


@dataclass
class _RowReport:
    fmt: PreferenceFormat
    identical: list[int]
    repeated_prompt: list[int]  # explicit prompt that both responses begin with again


def _begins_with_prompt(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """Whether both responses start with the (non-blank) prompt: whole conversations given next to a
    'prompt' column, so the prompt would be trained on as part of each response."""
    if isinstance(prompt, str):
        return bool(prompt.strip()) and chosen.startswith(prompt) and rejected.startswith(prompt)
    n = len(prompt)
    return n > 0 and list(chosen[:n]) == list(prompt) and list(rejected[:n]) == list(prompt)


def validate_rows(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], source: str) -> _RowReport:
    """Validate rows given as Python dicts (shared by ``validate_preference_rows`` and the file loader)."""
    explicit = check_columns(columns, source)
    fields = TEXT_FIELDS if explicit else TEXT_FIELDS[1:]
    per_token = [c for pair in PER_TOKEN_COLUMNS for c in pair if c in columns]
    for pair in PER_TOKEN_COLUMNS:
        if (pair[0] in columns) != (pair[1] in columns):
            have, lack = (pair[0], pair[1]) if pair[0] in columns else (pair[1], pair[0])
            raise PreferenceDataError(
                f"{source}: column {have!r} is present but {lack!r} is not; give both or neither."
            )
    first_kind: FormatKind | None = None
    identical: list[int] = []
    repeated_prompt: list[int] = []
    n_rows = 0
    for i, row in enumerate(rows):
        n_rows += 1
        kinds = {f: value_kind(row.get(f), source, i, f) for f in fields}
        row_kinds = set(kinds.values())
        if len(row_kinds) > 1:
            detail = ", ".join(f"{f!r} is {k}" for f, k in kinds.items())
            raise PreferenceDataError(
                f"{source}: row {i} (0-based) mixes formats ({detail}); all of a row's fields must be strings "
                "(standard) or all message lists (conversational). If 'chosen'/'rejected' hold whole "
                "conversations including the prompt, remove the 'prompt' column so it is extracted from them."
            )
        kind = row_kinds.pop()
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise PreferenceDataError(
                f"{source}: row {i} (0-based) is {kind} but row 0 is {first_kind}; a dataset must use one format "
                "throughout (all strings, or all message lists)."
            )
        chosen, rejected = row["chosen"], row["rejected"]
        if explicit and chosen != rejected and _begins_with_prompt(row["prompt"], chosen, rejected):
            repeated_prompt.append(i)
        if chosen == rejected:
            identical.append(i)
        elif kind == CONVERSATIONAL:
            prompt, c, r = (
                (row["prompt"], chosen, rejected) if explicit else split_implicit_prompt(chosen, rejected)
            )
            if not explicit and len(prompt) == 0:
                raise PreferenceDataError(
                    f"{source}: row {i} (0-based): 'chosen' and 'rejected' share no leading message, so no "
                    "prompt can be extracted; add a 'prompt' column (list of messages)."
                )
            for f, messages in (("chosen", c), ("rejected", r)):
                if not _messages_have_text(messages):
                    raise PreferenceDataError(
                        f"{_where(source, i, f)}: the completion messages have no text; give a non-empty reply."
                    )
        for f in per_token:
            _check_per_token(row.get(f), source, i, f)
    if n_rows == 0:
        raise PreferenceDataError(f"{source}: the dataset has no rows.")
    assert first_kind is not None
    return _RowReport(PreferenceFormat(first_kind, explicit), identical, repeated_prompt)


def validate_preference_rows(
    dataset: Dataset, source: str = "<dataset>", drop_identical: bool = False
) -> Dataset:
    """Check a preference dataset row by row; return it (without identical pairs if ``drop_identical``).

    Checks: the columns (``prompt``/``chosen``/``rejected`` or ``chosen``/``rejected``), every value's
    format (non-empty string or non-empty message list, one format for the whole dataset), optional
    ``chosen_weights``/``rejected_weights`` (finite non-negative floats) and
    ``ref_chosen_logps``/``ref_rejected_logps`` (finite floats). Pairs whose chosen equals rejected carry
    no preference signal: they are counted and reported with ``warnings.warn`` (kept), or dropped and
    reported when ``drop_identical=True``. Extra columns pass through untouched.

    Raises:
        PreferenceDataError: naming ``source``, the row (0-based) and the field, and how to fix it.
    """
    if not isinstance(dataset, Dataset):
        raise PreferenceDataError(
            f"{source}: expected a datasets.Dataset, got {type(dataset).__name__}; load it with "
            "tidpo.data.load_preference_dataset first."
        )
    columns = list(dataset.column_names)
    check_columns(columns, source)
    wanted = [c for c in (*TEXT_FIELDS, *WEIGHT_COLUMNS, *REF_LOGP_COLUMNS) if c in columns]
    report = validate_rows(iter_rows(dataset, wanted), columns, source)
    if report.repeated_prompt:
        warnings.warn(
            f"{source}: in {len(report.repeated_prompt)} row(s) (0-based rows {format_rows(report.repeated_prompt)}) "
            "'chosen' and 'rejected' both begin with the row's 'prompt': the prompt comes twice and its second "
            "copy is trained on as part of each response. If they hold whole conversations, remove the "
            "'prompt' column (the prompt is then their shared beginning); otherwise strip it from them.",
            UserWarning,
            stacklevel=2,
        )
    if report.identical:
        n = len(report.identical)
        rows = format_rows(report.identical)
        if drop_identical:
            drop = set(report.identical)
            keep = [i for i in range(len(dataset)) if i not in drop]
            if not keep:
                raise PreferenceDataError(
                    f"{source}: every row has chosen identical to rejected; nothing is left after dropping them."
                )
            warnings.warn(
                f"{source}: dropped {n} row(s) whose chosen is identical to rejected (0-based rows {rows}); "
                f"{len(keep)} row(s) remain.",
                UserWarning,
                stacklevel=2,
            )
            dataset = dataset.select(keep)
        else:
            warnings.warn(
                f"{source}: {n} row(s) have chosen identical to rejected (0-based rows {rows}); they carry no "
                "preference signal. Pass drop_identical=True (CLI: --drop-identical) to drop them.",
                UserWarning,
                stacklevel=2,
            )
    return dataset


def preference_format(dataset: Dataset) -> PreferenceFormat:
    """The format of a (validated) preference dataset, read from its columns and first row."""
    explicit = check_columns(dataset.column_names, "<dataset>")
    if len(dataset) == 0:
        raise PreferenceDataError("<dataset>: the dataset has no rows.")
    kind = value_kind(dataset[0]["chosen"], "<dataset>", 0, "chosen")
    return PreferenceFormat(kind, explicit)
