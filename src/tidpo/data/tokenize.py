"""Tokenisation of preference rows, matching TRL 1.16's ``DPOTrainer`` token for token.

Like TRL, the prompt and prompt+completion are tokenised jointly (so tokens that merge across the
boundary come out as the model will see them) and the completion starts where the two token sequences
diverge. Standard rows get the EOS token appended to their completions (unless already there), with the
tokenizer's own special tokens (e.g. BOS) added as ``tokenizer(text)`` adds them; conversational rows
are rendered with the chat template (prompt with ``add_generation_prompt=True``).

Truncation (ours; TRL only cuts prompt+completion at ``max_length``): the prompt keeps its last
``max_prompt_length`` tokens (and its leading BOS, if any: it replaces the oldest kept token), then each
completion keeps its first ``max_length - len(prompt)`` tokens.
Without truncation the ids equal TRL's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, Value
from transformers import PreTrainedTokenizerBase

from tidpo.data.errors import PreferenceDataError
from tidpo.data.formats import (
    CONVERSATIONAL,
    PER_TOKEN_COLUMNS,
    PreferenceFormat,
    format_rows,
    iter_rows,
    preference_format,
    split_implicit_prompt,
    validate_preference_rows,
)
from tidpo.models import ensure_pad_token

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - older datasets
    from datasets import Sequence as _ListFeature

OUTPUT_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_BATCH = 512  # rows tokenised per fast-tokenizer call


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}), or no "
            "completion token would fit after a prompt of that length; lower max_prompt_length or raise max_length."
        )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, fmt: PreferenceFormat, source: str) -> None:
    try:
        ensure_pad_token(tokenizer)
    except ValueError as err:
        raise PreferenceDataError(f"{source}: cannot pad batches with this tokenizer: {err}") from err
    if fmt.kind == CONVERSATIONAL and not getattr(tokenizer, "chat_template", None):
        raise PreferenceDataError(
            f"{source}: the rows are conversational (lists of messages) but the tokenizer has no chat template; "
            "use a chat/instruct model's tokenizer, set tokenizer.chat_template, or convert the rows to plain "
            "strings (standard format)."
        )
    if fmt.kind != CONVERSATIONAL and tokenizer.eos_token is None:
        raise PreferenceDataError(
            f"{source}: the tokenizer has no EOS token; standard-format completions are terminated with EOS (as "
            "TRL does). Set tokenizer.eos_token."
        )


def _template_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    # TRL forwards an optional per-row `tools` (list or JSON string) and `chat_template_kwargs` column.
    # ValueErrors here reach the caller as a PreferenceDataError naming the source and rows.
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"column 'tools': {tools[:60]!r} is not valid JSON ({err.msg}); give a list of tool schemas "
                "or its JSON string."
            ) from err
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"column 'tools': expected a list of tool schemas, got {type(tools).__name__}")
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise ValueError(
            f"column 'chat_template_kwargs': expected a mapping of template arguments, got {type(extra).__name__}"
        )
    return {"tools": tools, **extra}


def _render_conversational(
    tokenizer: PreTrainedTokenizerBase, prompt: list, completion: list, row: dict[str, Any]
) -> tuple[list[int], list[int]]:
    kwargs = _template_kwargs(row)
    prompt_ids = tokenizer.apply_chat_template(
        prompt, tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
    )["input_ids"]
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True, **kwargs)[
        "input_ids"
    ]
    return list(prompt_ids), list(full_ids)


def _split_row(row: dict[str, Any], fmt: PreferenceFormat) -> tuple[Any, Any, Any]:
    if fmt.explicit_prompt:
        return row["prompt"], row["chosen"], row["rejected"]
    return split_implicit_prompt(row["chosen"], row["rejected"])


def _raw_token_ids(
    rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, fmt: PreferenceFormat
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, prompt+chosen ids, prompt+rejected ids) per row, as TRL tokenises them."""
    parts = [_split_row(row, fmt) for row in rows]
    if fmt.kind == CONVERSATIONAL:
        out = []
        for (prompt, chosen, rejected), row in zip(parts, rows, strict=True):
            prompt_ids, chosen_full = _render_conversational(tokenizer, list(prompt), list(chosen), row)
            _, rejected_full = _render_conversational(tokenizer, list(prompt), list(rejected), row)
            out.append((prompt_ids, chosen_full, rejected_full))
        return out
    eos = tokenizer.eos_token
    texts_p, texts_c, texts_r = [], [], []
    for prompt, chosen, rejected in parts:
        texts_p.append(prompt)
        texts_c.append(prompt + (chosen if chosen.endswith(eos) else chosen + eos))
        texts_r.append(prompt + (rejected if rejected.endswith(eos) else rejected + eos))
    # `tokenizer(text=...)` adds the tokenizer's special tokens (e.g. BOS), exactly as TRL calls it.
    ids_p = tokenizer(text=texts_p)["input_ids"]
    ids_c = tokenizer(text=texts_c)["input_ids"]
    ids_r = tokenizer(text=texts_r)["input_ids"]
    return [(list(p), list(c), list(r)) for p, c, r in zip(ids_p, ids_c, ids_r, strict=True)]


def _per_token_columns(columns: Sequence[str]) -> list[tuple[str, str]]:
    """(column, which completion) for the per-token float columns the dataset has."""
    out = []
    for chosen_col, rejected_col in PER_TOKEN_COLUMNS:
        if chosen_col in columns:
            out += [(chosen_col, "chosen"), (rejected_col, "rejected")]
    return out


def tokenize_preference_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    drop_overlong: bool = False,
    source: str = "<dataset>",
) -> Dataset:
    """Add ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (completions exclude the prompt).

    Validates the rows first (see ``validate_preference_rows``). Truncation: the prompt keeps its last
    ``max_prompt_length`` tokens (a leading BOS stays first, in place of the oldest of them; warned,
    with the rows); each completion then keeps its first ``max_length - len(prompt)``
    tokens. A row whose completion would be left with no token is an error naming the rows (or, with
    ``drop_overlong=True``, is dropped with a warning). Per-token columns (``chosen_weights``,
    ``ref_chosen_logps``, ...) must have one value per (untruncated) completion token and are truncated
    with it. Other columns pass through. A tokenizer without a pad token gets EOS as pad.

    Raises:
        PreferenceDataError: bad rows, overlong rows, a tokenizer that cannot handle the format.
        ValueError: invalid ``max_length``/``max_prompt_length``.
    """
    _check_lengths(max_length, max_prompt_length)
    dataset = validate_preference_rows(dataset, source=source)
    return _tokenize_validated(dataset, tokenizer, max_length, max_prompt_length, drop_overlong, source)


def _tokenize_validated(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    max_prompt_length: int | None,
    drop_overlong: bool,
    source: str,
) -> Dataset:
    _check_lengths(max_length, max_prompt_length)
    fmt = preference_format(dataset)
    _prepare_tokenizer(tokenizer, fmt, source)
    per_token = _per_token_columns(dataset.column_names)
    wanted = [
        c
        for c in ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", *(c for c, _ in per_token))
        if c in dataset.column_names
    ]
    prompts: list[list[int]] = []
    chosens: list[list[int]] = []
    rejecteds: list[list[int]] = []
    per_token_out: dict[str, list[list[float]]] = {c: [] for c, _ in per_token}
    keep: list[int] = []
    overlong: list[int] = []
    prompt_mismatch: list[int] = []
    empty_prompt: list[int] = []
    same_after_cut: list[int] = []  # responses that differ only past max_length
    cut_prompts: list[int] = []  # prompts longer than max_prompt_length
    bos = tokenizer.bos_token_id

    rows_iter = iter_rows(dataset, wanted)
    index = 0
    while True:
        batch = [row for _, row in zip(range(_BATCH), rows_iter, strict=False)]
        if not batch:
            break
        try:
            raw = _raw_token_ids(batch, tokenizer, fmt)
        except PreferenceDataError:
            raise
        except Exception as err:  # tokenizers / jinja errors: say which rows they came from
            raise PreferenceDataError(
                f"{source}: tokenising rows {index}..{index + len(batch) - 1} (0-based) failed "
                f"({type(err).__name__}: {err}); check those rows' text, and the tokenizer's chat template for "
                "conversational rows."
            ) from err
        for offset, (row, (p_ids, c_full, r_full)) in enumerate(zip(batch, raw, strict=True)):
            i = index + offset
            # The completion starts where prompt and prompt+completion diverge (TRL's rule).
            plen = min(_common_prefix_length(p_ids, c_full), _common_prefix_length(p_ids, r_full))
            if plen < len(p_ids):
                prompt_mismatch.append(i)
            prompt, chosen, rejected = p_ids[:plen], c_full[plen:], r_full[plen:]
            for name, ids in (("chosen", chosen), ("rejected", rejected)):
                if not ids:
                    raise PreferenceDataError(
                        f"{source}: row {i} (0-based), field {name!r}: the completion tokenises to no token "
                        "after the prompt; check the text and the chat template."
                    )
            lengths = {"chosen": len(chosen), "rejected": len(rejected)}
            for col, which in per_token:
                values = row[col]
                if len(values) != lengths[which]:
                    raise PreferenceDataError(
                        f"{source}: row {i} (0-based), field {col!r}: {len(values)} values but the {which} "
                        f"completion has {lengths[which]} tokens with this tokenizer (EOS included for standard "
                        "rows); give one value per completion token, computed with the same tokenizer."
                    )
            if not prompt:
                empty_prompt.append(i)
                continue
            if max_prompt_length is not None and len(prompt) > max_prompt_length:
                # Keep the end (the part next to the response), and a leading BOS: models are trained
                # never to see a sequence without it.
                head = prompt[:1] if prompt[0] == bos and max_prompt_length > 1 else []
                prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
                cut_prompts.append(i)
            room = None if max_length is None else max_length - len(prompt)
            if room is not None and room <= 0:
                overlong.append(i)
                continue
            if room is not None and chosen != rejected and chosen[:room] == rejected[:room]:
                same_after_cut.append(i)
            keep.append(i)
            prompts.append(prompt)
            chosens.append(chosen[:room])
            rejecteds.append(rejected[:room])
            for col, _ in per_token:
                per_token_out[col].append([float(x) for x in row[col][:room]])
        index += len(batch)

    if empty_prompt:
        # Nothing to condition on: the first response token would have no logits (log-prob 0, no gradient)
        # and anchors could not be sampled.
        raise PreferenceDataError(
            f"{source}: {len(empty_prompt)} row(s) have a prompt of no tokens (0-based rows "
            f"{format_rows(empty_prompt)}): implicit-prompt rows whose 'chosen' and 'rejected' share no "
            "beginning, or a prompt whose tokens merge into the response's first token. Give those rows a "
            "'prompt' column (or remove them), and end prompts on a token boundary (e.g. a trailing space "
            "or newline)."
        )
    if same_after_cut:
        warnings.warn(
            f"{source}: in {len(same_after_cut)} row(s) (0-based rows {format_rows(same_after_cut)}) 'chosen' and "
            f"'rejected' differ only past max_length={max_length}: truncated, they are the same tokens and carry "
            "no preference signal. Raise max_length (or lower max_prompt_length) to keep the difference.",
            UserWarning,
            stacklevel=3,
        )
    if cut_prompts:
        warnings.warn(
            f"{source}: {len(cut_prompts)} of {index} prompt(s) (0-based rows {format_rows(cut_prompts)}) are "
            f"longer than max_prompt_length={max_prompt_length} tokens and lose their beginning (a leading BOS "
            "token is kept; a chat template's system and earlier turns are not). Raise max_prompt_length (and "
            "max_length) to train on whole prompts.",
            UserWarning,
            stacklevel=3,
        )
    if prompt_mismatch:
        warnings.warn(
            f"{source}: for {len(prompt_mismatch)} row(s) (0-based rows {format_rows(prompt_mismatch)}) the "
            "tokenised prompt is not a prefix of the tokenised prompt+completion (the chat template renders the "
            "prompt differently, tokens merge across the boundary, or the tokenizer appends EOS to every text); "
            "the completion starts where they diverge, as in TRL. End prompts on a token boundary to avoid it.",
            UserWarning,
            stacklevel=3,
        )
    if overlong:
        how = (
            f"max_length={max_length} leaves no room for a completion token after the prompt "
            f"(max_prompt_length={max_prompt_length})"
        )
        rows = format_rows(overlong)
        if not drop_overlong:
            raise PreferenceDataError(
                f"{source}: {len(overlong)} row(s) would keep no completion token: {how}; 0-based rows {rows}. "
                "Raise max_length, lower max_prompt_length, or pass drop_overlong=True (CLI: --drop-overlong) "
                "to drop them."
            )
        if not keep:
            raise PreferenceDataError(
                f"{source}: all {len(overlong)} row(s) were dropped as overlong ({how}); nothing is left. Raise "
                "max_length or lower max_prompt_length."
            )
        warnings.warn(
            f"{source}: dropped {len(overlong)} overlong row(s) (0-based rows {rows}): {how}; {len(keep)} remain.",
            UserWarning,
            stacklevel=3,
        )
        dataset = dataset.select(keep)

    replaced = [c for c in (*OUTPUT_COLUMNS, *per_token_out) if c in dataset.column_names]
    if replaced:
        dataset = dataset.remove_columns(replaced)
    ids_feature = _ListFeature(Value("int64"))
    for name, values in zip(OUTPUT_COLUMNS, (prompts, chosens, rejecteds), strict=True):
        dataset = dataset.add_column(name, values, feature=ids_feature)
    for name, values in per_token_out.items():
        dataset = dataset.add_column(name, values, feature=_ListFeature(Value("float32")))
    return dataset
