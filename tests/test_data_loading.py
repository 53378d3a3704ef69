"""Loading preference data from real files, datasets and (unreachable) Hub ids."""

from __future__ import annotations

import csv
import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from tidpo.data import PreferenceDataError, load_preference_dataset, prepare_preference_dataset
from tidpo.models import tiny_tokenizer

STANDARD_EXPLICIT = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "score": 0.9},
    {"prompt": "The grass is", "chosen": " green.", "rejected": " blue.", "score": 0.4},
]
STANDARD_IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "The grass is green.", "rejected": "The grass is blue."},
]
CONV_EXPLICIT = [
    {
        "prompt": [{"role": "user", "content": "The sky is?"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "green"}],
    }
]
CONV_IMPLICIT = [
    {
        "chosen": [{"role": "user", "content": "The sky is?"}, {"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "user", "content": "The sky is?"}, {"role": "assistant", "content": "green"}],
    }
]
ALL_FORMATS = {
    "standard-explicit": STANDARD_EXPLICIT,
    "standard-implicit": STANDARD_IMPLICIT,
    "conversational-explicit": CONV_EXPLICIT,
    "conversational-implicit": CONV_IMPLICIT,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_file(path, rows):
    """Write rows in the format the extension says."""
    suffix = path.suffix
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


PAIR_ROW = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


@pytest.mark.parametrize("fmt", sorted(ALL_FORMATS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_format_from_every_file_type(fmt, suffix, tmp_path, tok):
    rows = ALL_FORMATS[fmt]
    if suffix == ".csv" and fmt.startswith("conversational"):
        pytest.skip("CSV cells are strings: conversational rows need JSON/JSONL/Parquet")
    path = write_file(tmp_path / f"data{suffix}", rows)
    loaded = load_preference_dataset(path)
    assert len(loaded) == len(rows)
    got = loaded.to_list()
    for want, have in zip(rows, got, strict=True):
        for key, value in want.items():
            # CSV stores every cell as text.
            assert have[key] == (str(value) if suffix == ".csv" else value)
    prepared = prepare_preference_dataset(str(path), tok, max_length=64, max_prompt_length=32)
    assert len(prepared) == len(rows)
    for row in prepared:
        assert row["chosen_input_ids"] and row["rejected_input_ids"]
        assert all(isinstance(t, int) for t in row["prompt_input_ids"])
    if "score" in rows[0]:
        assert "score" in prepared.column_names  # extra columns pass through


def test_json_column_layout_and_jsonl_named_json(tmp_path):
    columns = {"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    assert load_preference_dataset(tmp_path / "cols.json").to_dict() == columns
    lines = write_jsonl(tmp_path / "lines.json", STANDARD_EXPLICIT)
    assert len(load_preference_dataset(lines)) == 2


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_preference_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match=r"data/train\.csv"):
        load_preference_dataset("data/train.csv")


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(PreferenceDataError) as info:
        load_preference_dataset(path)
    message = str(info.value)
    assert "data.txt" in message and ".txt" in message
    for ext in (".jsonl", ".json", ".csv", ".parquet"):
        assert ext in message


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(STANDARD_EXPLICIT[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(PreferenceDataError) as info:
        load_preference_dataset(path)
    assert "bad.jsonl" in str(info.value) and "line 3" in str(info.value)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(STANDARD_EXPLICIT[0]) + "\n[1, 2]\n")
    with pytest.raises(PreferenceDataError, match=r"list.jsonl: line 2 .*not an object"):
        load_preference_dataset(path)


def test_rows_missing_a_key_are_reported_not_dropped(tmp_path, tok):
    rows = [dict(STANDARD_EXPLICIT[0]), {"prompt": "The sky is", "chosen": " blue."}]
    path = write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(PreferenceDataError) as info:
        prepare_preference_dataset(path, tok, max_length=64, max_prompt_length=32)
    message = str(info.value)
    assert "missing.jsonl" in message and "row 1 (0-based)" in message and "'rejected'" in message


def test_mixed_types_in_a_column_name_the_row(tmp_path, tok):
    rows = [dict(STANDARD_EXPLICIT[0]), {"prompt": "p", "chosen": 5, "rejected": "r"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(PreferenceDataError) as info:
        prepare_preference_dataset(path, tok, max_length=64, max_prompt_length=32)
    message = str(info.value)
    assert (
        "mixed.jsonl" in message
        and "row 1 (0-based)" in message
        and "'chosen'" in message
        and "int" in message
    )


def test_csv_extra_cells_and_empty_cell(tmp_path, tok):
    bad = tmp_path / "extra.csv"
    bad.write_text("prompt,chosen,rejected\na,b,c\nd,e,f,g\n")
    with pytest.raises(PreferenceDataError, match=r"extra.csv: row 1 \(0-based; line 3\)"):
        load_preference_dataset(bad)
    empty = tmp_path / "empty_cell.csv"
    empty.write_text('prompt,chosen,rejected\na,b,c\nd,"",f\n')
    with pytest.raises(
        PreferenceDataError, match=r"empty_cell.csv: row 1 \(0-based\), field 'chosen'.*empty"
    ):
        prepare_preference_dataset(empty, tok, max_length=64, max_prompt_length=32)


def test_csv_with_misnamed_header(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("question,response_chosen,response_rejected\na,b,c\n")
    with pytest.raises(PreferenceDataError) as info:
        load_preference_dataset(path)
    message = str(info.value)
    assert "named.csv" in message
    assert "rename 'response_chosen' to 'chosen'" in message
    assert "question" in message


def test_csv_saved_with_a_byte_order_mark_keeps_its_prompt(tmp_path, tok):
    """Excel's "CSV UTF-8" starts with a BOM: the header must still read 'prompt', not '\ufeffprompt'
    (which would make every row implicit-prompt and lose the prompt)."""
    path = tmp_path / "bom.csv"
    path.write_bytes(
        "\ufeffprompt,chosen,rejected\nWhat colour is the sky?,It is blue,It is green\n".encode()
    )
    data = prepare_preference_dataset(path, tok)
    assert tok.decode(data[0]["prompt_input_ids"]).startswith("What colour is the sky?")


@pytest.mark.parametrize("header", ["Prompt", "prompt ", " PROMPT"])
def test_a_near_miss_prompt_column_is_an_error_not_an_implicit_prompt(tmp_path, tok, header):
    path = tmp_path / "near.jsonl"
    path.write_text(
        json.dumps({header: "What colour is the sky?", "chosen": "Blue", "rejected": "Green"}) + "\n"
    )
    with pytest.raises(PreferenceDataError, match=f"there is {header!r}.*Rename {header!r} to 'prompt'"):
        prepare_preference_dataset(path, tok)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x1c", "\x0c"])
def test_line_separator_characters_inside_values_stay_in_the_value(tmp_path, char):
    """json.dumps(..., ensure_ascii=False) and csv.writer leave these unescaped; str.splitlines() would cut
    the row there."""
    rows = [{"prompt": "Two lines:", "chosen": f" one{char}two", "rejected": " no"}, PAIR_ROW]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with (tmp_path / "rows.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    for path in (jsonl, tmp_path / "rows.csv"):
        loaded = load_preference_dataset(path)
        assert loaded.to_list() == rows, path.name


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(PreferenceDataError, match=r"broken\.parquet: cannot read it as Parquet"):
        load_preference_dataset(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(PreferenceDataError, match=r"empty\.jsonl: the file has no rows"):
        load_preference_dataset(path)


def test_dataset_and_dataset_dict():
    ds = Dataset.from_list(STANDARD_EXPLICIT)
    assert load_preference_dataset(ds) is ds
    dd = DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_preference_dataset(dd)) == 2
    assert len(load_preference_dataset(dd, split="test")) == 1
    with pytest.raises(PreferenceDataError) as info:
        load_preference_dataset(dd, split="validation")
    assert "'validation'" in str(info.value) and "['test', 'train']" in str(info.value)


def test_unreachable_hub_says_so(monkeypatch):
    # Offline mode makes the Hub lookup fail at once instead of retrying for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreferenceDataError) as info:
        load_preference_dataset("someone/some-preference-data")
    message = str(info.value)
    assert "someone/some-preference-data" in message
    assert "Hub" in message and "local" in message
    assert info.value.__cause__ is not None


def test_a_csv_separated_by_semicolons_says_so(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("prompt;chosen;rejected\nThe sky is; blue.; green.\n")
    with pytest.raises(PreferenceDataError, match=r"looks separated by ';', tabs or '\|'"):
        load_preference_dataset(path)


def test_an_empty_source_string_says_so():
    with pytest.raises(PreferenceDataError, match="empty string"):
        load_preference_dataset("")


def test_a_local_file_refuses_another_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in STANDARD_EXPLICIT) + "\n")
    assert len(load_preference_dataset(path, split="train")) == len(STANDARD_EXPLICIT)
    assert len(load_preference_dataset(str(path))) == len(STANDARD_EXPLICIT)
    with pytest.raises(
        PreferenceDataError, match=r"pairs\.jsonl: a local file holds one split, so split='test'"
    ):
        load_preference_dataset(str(path), split="test")
