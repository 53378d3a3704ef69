"""`tidpo train` end to end on a tiny model folder: bad input gives one clear line and exit code 2.

Most cases call `tidpo.cli.main` in-process (what the console script runs) to stay fast; one runs the
real console script to check what a user sees on the terminal. Warnings are checked with
`pytest.warns` in-process (pytest captures them before they reach stderr).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PAIRS
from helpers.tiny_run import run_tidpo, train_argv, write_jsonl, write_tiny_model
from tidpo.cli import main
from tidpo.tokenops import NonFiniteError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "model")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `tidpo` in-process; return (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(argv: list[str], capsys, *fragments: str) -> str:
    """Exit code 2, and stderr is one `tidpo: error:` line (plus the TIDPO_DEBUG hint) holding fragments."""
    code, _out, err = cli(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tidpo: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def data_file(tmp_path: Path, rows: list[dict], name: str = "pairs.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)


def argv_for(model_dir: Path, data: Path, tmp_path: Path, **options) -> list[str]:
    return train_argv(model_dir, data, tmp_path / "out", **{"max_steps": 1, **options})


# ------------------------------------------------------------------------------------------ data


def test_misnamed_column_names_the_file_and_suggests_the_rename(model_dir, tmp_path, capsys):
    rows = [{"prompt": p["prompt"], "response_chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
    data = data_file(tmp_path, rows)
    expect_error(
        argv_for(model_dir, data, tmp_path),
        capsys,
        str(data),
        "'chosen'",
        "rename 'response_chosen' to 'chosen'",
    )


def test_missing_column(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, [{"prompt": p["prompt"], "chosen": p["chosen"]} for p in PAIRS])
    expect_error(argv_for(model_dir, data, tmp_path), capsys, "missing column(s) ['rejected']")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(5, "got int 5"), (None, "missing (null)"), ("", "empty"), ("   ", "empty"), ({"text": "x"}, "dict")],
)
def test_bad_chosen_value_names_row_and_field(model_dir, tmp_path, capsys, value, fragment):
    rows = [dict(p) for p in PAIRS]
    rows[2]["chosen"] = value
    data = data_file(tmp_path, rows)
    expect_error(argv_for(model_dir, data, tmp_path), capsys, str(data), "row 2", "'chosen'", fragment)


def test_identical_pairs_are_counted_and_warned_then_train(model_dir, tmp_path, capsys):
    rows = [*PAIRS, {"prompt": "The sky is", "chosen": " blue.", "rejected": " blue."}]
    data = data_file(tmp_path, rows)
    with pytest.warns(UserWarning, match=r"1 row\(s\) have chosen identical to rejected \(0-based rows 8\)"):
        code, _out, err = cli(argv_for(model_dir, data, tmp_path), capsys)
    assert code == 0, err


def test_drop_identical_drops_and_reports(model_dir, tmp_path, capsys):
    rows = [*PAIRS, {"prompt": "The sky is", "chosen": " blue.", "rejected": " blue."}]
    data = data_file(tmp_path, rows)
    with pytest.warns(UserWarning, match=r"dropped 1 row\(s\).*8 row\(s\) remain"):
        code, _out, err = cli(argv_for(model_dir, data, tmp_path, drop_identical="true"), capsys)
    assert code == 0, err


def test_all_identical_with_drop_identical_is_an_error(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, [{"prompt": "a", "chosen": " b", "rejected": " b"}] * 3)
    expect_error(argv_for(model_dir, data, tmp_path, drop_identical="true"), capsys, "nothing is left")


def overlong_config(tmp_path: Path, **extra) -> Path:
    # No prompt truncation, so a long prompt can fill max_length by itself.
    config = {"max_length": 12, "max_prompt_length": None, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def overlong_rows() -> list[dict]:
    rows = [{"prompt": "It was", "chosen": " blue.", "rejected": " green."}] * 4
    long_prompt = (
        "Write a short review of the restaurant. Seek medical advice promptly instead of self-medicating."
    )
    return [*rows[:2], {"prompt": long_prompt, "chosen": " ok.", "rejected": " no."}, *rows[2:]]


def test_prompt_filling_max_length_is_an_error_naming_rows(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, overlong_rows())
    argv = [*argv_for(model_dir, data, tmp_path, max_length=None, max_prompt_length=None)]
    argv += ["--config", str(overlong_config(tmp_path))]
    expect_error(argv, capsys, "max_length=12", "0-based rows 2", "drop-overlong")


def test_drop_overlong_drops_and_reports(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, overlong_rows())
    argv = [*argv_for(model_dir, data, tmp_path, max_length=None, max_prompt_length=None)]
    argv += ["--config", str(overlong_config(tmp_path, drop_overlong=True))]
    with pytest.warns(UserWarning, match=r"dropped 1 overlong row\(s\) \(0-based rows 2\).*4 remain"):
        code, _out, err = cli(argv, capsys)
    assert code == 0, err


def test_everything_overlong_is_an_error(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, [overlong_rows()[2]] * 2)
    argv = [*argv_for(model_dir, data, tmp_path, max_length=None, max_prompt_length=None)]
    argv += ["--config", str(overlong_config(tmp_path, drop_overlong=True))]
    expect_error(argv, capsys, "dropped as overlong", "nothing is left")


def test_missing_data_file(model_dir, tmp_path, capsys):
    expect_error(argv_for(model_dir, tmp_path / "nope.jsonl", tmp_path), capsys, "not found", "nope.jsonl")


def test_malformed_jsonl_line(model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    expect_error(argv_for(model_dir, data, tmp_path), capsys, "line 2", "not valid JSON")


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "nopad", pad=False)
    data = data_file(tmp_path, PAIRS)
    code, _out, err = cli(argv_for(model, data, tmp_path), capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == saved["eos_token"] == "<|im_end|>"


def test_tokenizer_without_pad_and_eos_is_a_clear_error(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "noeos", pad=False, eos=False)
    data = data_file(tmp_path, PAIRS)
    expect_error(argv_for(model, data, tmp_path), capsys, "neither a pad token nor an EOS token")


def test_a_misspelt_built_in_name_is_named_not_looked_up_on_the_hub(model_dir, tmp_path, capsys, monkeypatch):
    import datasets
    import transformers

    def offline(*args, **kwargs):
        raise AssertionError("went to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    data = data_file(tmp_path, PAIRS)
    expect_error(
        train_argv(model_dir, "quickstart_test", tmp_path / "out"),
        capsys,
        "quickstart_test: no such file or folder, and not a built-in data set name: did you mean "
        "'quickstart-test'?",
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    expect_error(
        train_argv(Path("smollm2-135"), data, tmp_path / "out"),
        capsys,
        "--model smollm2-135: no such file or folder, and not a built-in model name: did you mean 'smollm2-135m'?",
    )


def test_missing_model_folder(tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    expect_error(argv_for(tmp_path / "no-model", data, tmp_path), capsys, "no such model folder", "no-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(argv_for(empty, data, tmp_path), capsys, f"--model {empty}: the folder holds no config.json")
    # Not a folder, not built in: a Hub id, which this offline machine cannot fetch; the option is named.
    expect_error(
        argv_for("no-such-model-anywhere", data, tmp_path), capsys, "--model no-such-model-anywhere: "
    )


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--beta", "0"], ["invalid beta=0.0", "> 0"]),
        (["--lambda_importance", "1.5"], ["lambda_importance=1.5", "[0, 1]"]),
        (["--loss_type", "kto"], ["loss_type='kto'", "ti_dpo"]),
        (["--max_prompt_length", "64", "--max_length", "32"], ["max_prompt_length=64", "max_length=32"]),
        (["--label_smoothing", "0.2"], ["label_smoothing=0.2"]),
        (
            [
                "--gradient_checkpointing",
                "true",
                "--gradient_checkpointing_kwargs",
                '{"use_reentrant": true}',
            ],
            ["use_reentrant=True", "attribution_pass='separate'"],
        ),
    ],
)
def test_invalid_hyper_parameters(model_dir, tmp_path, capsys, flags, fragments):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(model_dir, data, tmp_path, max_length=None, max_prompt_length=None)
    expect_error([*argv, *flags], capsys, "TIDPOConfig", *fragments)


def test_unknown_yaml_key_suggests_the_right_one(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("betta: 0.2\nlearning_rate: 1e-3\n")
    data = data_file(tmp_path, PAIRS)
    expect_error(
        [*argv_for(model_dir, data, tmp_path), "--config", str(config)],
        capsys,
        "unknown option(s)",
        "'betta' (did you mean 'beta'?)",
    )


def test_yaml_value_of_the_wrong_type(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("beta: [0.1]\n")
    data = data_file(tmp_path, PAIRS)
    expect_error(
        [*argv_for(model_dir, data, tmp_path), "--config", str(config)], capsys, "'beta' must be a number"
    )


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--dtype", "float17"], "--dtype 'float17': not a torch dtype"),
        (["--report_pairs", "0"], "--report_pairs 0: must be >= 1"),
        (["--resume", "--resume_from_checkpoint", "x"], "not both"),
        (
            ["--precompute_ref_log_probs", "true"],
            "'--precompute_ref_log_probs' (tidpo's name is precompute_ref",
        ),
        (["--betta", "0.2"], "'--betta' (did you mean '--beta'?)"),
        # Prefixes of an option are not that option (argparse's abbreviations are off).
        (["--gam", "0"], "unrecognised argument(s): '--gam' (did you mean '--gamma'?)"),
        (["--gam", "-1"], "unrecognised argument(s): '--gam' (did you mean '--gamma'?)"),
        (["--use_pef", "true"], "'--use_pef' (did you mean '--use_peft'?)"),
        (["--resume_from", "x"], "'--resume_from' (did you mean '--resume_from_checkpoint'?)"),
        (["--model_name_or_path", "m"], "'--model_name_or_path' (tidpo train names it model)"),  # trl dpo's
        pytest.param(
            ["--load_in_4bit", "true", "--use_peft", "true"],
            "--load_in_4bit (QLoRA) needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine may run QLoRA"),
        ),
    ],
)
def test_invalid_script_options(model_dir, tmp_path, capsys, flags, fragment):
    data = data_file(tmp_path, PAIRS)
    expect_error([*argv_for(model_dir, data, tmp_path), *flags], capsys, fragment)


def test_lora_target_modules_of_the_wrong_type(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("use_peft: true\nlora_target_modules: 5\n")
    data = data_file(tmp_path, PAIRS)
    expect_error(
        [*argv_for(model_dir, data, tmp_path), "--config", str(config)], capsys, "--lora_target_modules 5"
    )


def test_invalid_value_in_yaml_is_validated_like_a_flag(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("gamma: -1\n")
    data = data_file(tmp_path, PAIRS)
    expect_error([*argv_for(model_dir, data, tmp_path), "--config", str(config)], capsys, "invalid gamma=-1")


def test_missing_and_broken_config_files(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    base = argv_for(model_dir, data, tmp_path)
    expect_error([*base, "--config", str(tmp_path / "none.yaml")], capsys, "config file", "not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.1\n")
    expect_error([*base, "--config", str(broken)], capsys, "not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- beta\n")
    expect_error([*base, "--config", str(listed)], capsys, "must hold a mapping")


def test_auto_and_none_are_accepted_for_the_options_whose_default_is_none(tmp_path):
    from tidpo.cli import parse_train_args

    _s, config, _r = parse_train_args(
        ["--share_prompt", "auto", "--anchor-prompt-cache=AUTO", "--max_length", "none", "--tdpo_alpha=null"]
    )
    assert (config.share_prompt, config.anchor_prompt_cache, config.max_length, config.tdpo_alpha) == (
        None,
        None,
        None,
        None,
    )
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("share_prompt: false\nanchor_static_cache: auto\nmax_prompt_length: null\n")
    _s, config, _r = parse_train_args(["--config", str(yaml_file)])
    assert (config.share_prompt, config.anchor_static_cache, config.max_prompt_length) == (False, None, None)
    # A flag's auto overrides the YAML's value; other values still parse as before.
    _s, config, _r = parse_train_args(["--config", str(yaml_file), "--share_prompt", "auto", "--beta", "0.2"])
    assert (config.share_prompt, config.beta) == (None, 0.2)
    # The last flag wins, as for any option (a wrapper appending an override to a base command).
    _s, config, _r = parse_train_args(
        ["--share_prompt", "true", "--share_prompt", "auto", "--tdpo_alpha", "0.3", "--tdpo_alpha", "none"]
    )
    assert (config.share_prompt, config.tdpo_alpha) == (None, None)
    _s, config, _r = parse_train_args(
        ["--share_prompt", "auto", "--share_prompt", "false", "--max_length", "none", "--max_length", "300"]
    )
    assert (config.share_prompt, config.max_length) == (False, 300)


def test_a_run_without_length_limits_trains(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(
        model_dir, data, tmp_path, max_length="none", max_prompt_length="none", share_prompt="auto"
    )
    code, _out, err = cli(argv, capsys)
    assert code == 0, err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert "truncat" not in err


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--max_length", "auto"], "argument --max_length/--max-length: invalid int value: 'auto'"),
        (["--beta", "none"], "argument --beta: invalid float value: 'none'"),
        (["--share_prompt", "sometimes"], "Truthy value expected: got sometimes"),
    ],
)
def test_auto_and_none_are_refused_where_none_is_not_a_value(model_dir, tmp_path, capsys, flags, fragment):
    data = data_file(tmp_path, PAIRS)
    code, _out, err = cli([*argv_for(model_dir, data, tmp_path), *flags], capsys)
    assert code == 2
    assert fragment in err


def test_bad_flag_value_is_one_argparse_line(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    code, _out, err = cli([*argv_for(model_dir, data, tmp_path), "--beta", "abc"], capsys)
    assert code == 2
    assert "argument --beta: invalid float value: 'abc'" in err
    assert len(err.strip().splitlines()) <= 3, err  # short usage + the error, not 150 options


def test_misspelt_flag_suggests_the_right_one(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    expect_error(
        [*argv_for(model_dir, data, tmp_path), "--bta", "0.2"], capsys, "'--bta' (did you mean '--beta'?)"
    )


def test_resume_from_a_missing_checkpoint_folder(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    expect_error(
        [*argv_for(model_dir, data, tmp_path), "--resume", str(tmp_path / "checkpoint-9")],
        capsys,
        "no such checkpoint folder",
    )


# ------------------------------------------------------------------------------------------ run folder


def test_a_fresh_run_never_mixes_with_an_earlier_one_in_output_dir(model_dir, tmp_path, capsys):
    """LoRA run, then a full fine-tuning run into the same folder: refused (the old adapter would load on
    top of the new weights); --resume without a checkpoint too; --overwrite_output_dir deletes the old run."""
    data = data_file(tmp_path, PAIRS)
    out = tmp_path / "out"
    code, _, err = cli(
        argv_for(model_dir, data, tmp_path, use_peft="true", save_strategy="steps", save_steps=1), capsys
    )
    assert code == 0, err
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-1").is_dir()
    line = expect_error(
        argv_for(model_dir, data, tmp_path), capsys, str(out), "checkpoint-1", "adapter_model"
    )
    assert "--resume" in line and "--overwrite_output_dir true" in line
    # Without a complete checkpoint, --resume would start afresh on top of the old files: refused too.
    (out / "checkpoint-1" / "trainer_state.json").unlink()
    line = expect_error([*argv_for(model_dir, data, tmp_path), "--resume"], capsys, "no complete checkpoint")
    assert "Pass --resume" not in line and "To start afresh there" in line
    code, stdout, err = cli(argv_for(model_dir, data, tmp_path, overwrite_output_dir="true"), capsys)
    assert code == 0, err
    assert "deleting the earlier run" in stdout and "adapter_model.safetensors" in stdout
    assert (out / "model.safetensors").exists()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "checkpoint-1").exists()


def first_log(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())["log_history"][0]


def test_dpo_on_top_of_a_lora_run_starts_from_its_adapter(model_dir, tmp_path, capsys):
    """`--model <LoRA output folder> --use_peft true`: the SFT-style adapter is merged into the weights the
    new adapter trains on (and the reference); before, PEFT put a fresh adapter in its place, silently."""
    from tidpo.models import load_causal_lm

    data = data_file(tmp_path, PAIRS)
    sft = tmp_path / "sft"
    code, _, err = cli(train_argv(model_dir, data, sft, max_steps=2, use_peft="true"), capsys)
    assert code == 0, err
    runs = {}
    for name, start in (("on_sft", sft), ("on_base", model_dir)):
        code, _, err = cli(train_argv(start, data, tmp_path / name, max_steps=1, use_peft="true"), capsys)
        assert code == 0, err
        runs[name] = first_log(tmp_path / name)
    assert runs["on_sft"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # reference = the merged start
    assert runs["on_sft"]["logps/chosen"] != pytest.approx(runs["on_base"]["logps/chosen"], abs=1e-4)
    # Full fine-tuning of the merged model (transformers had frozen the base under the adapter).
    code, _, err = cli(train_argv(sft, data, tmp_path / "full_on_sft", max_steps=1), capsys)
    assert code == 0, err
    assert first_log(tmp_path / "full_on_sft")["logps/chosen"] == pytest.approx(
        runs["on_sft"]["logps/chosen"]
    )

    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = load_causal_lm(str(sft), merge_adapter=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, load_causal_lm(str(sft))(ids).logits)


def test_runs_on_top_of_a_lora_folder_save_what_they_trained(model_dir, tmp_path, capsys):
    """What a run started from a LoRA folder saves must reload as the model it trained: the merged start
    (saved as `base_model`, the new adapter's recorded base) under a new adapter, and full weights under
    the model's own parameter names (they reloaded as random weights: the adapter load's key renaming
    was reversed on save). learning_rate 0: the trained model is the merged start."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from tidpo.models import load_causal_lm

    data = data_file(tmp_path, PAIRS)
    sft = tmp_path / "sft"
    assert cli(train_argv(model_dir, data, sft, max_steps=2, use_peft="true"), capsys)[0] == 0
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        start = load_causal_lm(str(sft), merge_adapter=True)(ids).logits
        base = load_causal_lm(str(model_dir))(ids).logits
    assert not torch.allclose(start, base, atol=1e-3)  # the SFT adapter changes the model

    code, stdout, err = cli(
        train_argv(sft, data, tmp_path / "lora", max_steps=1, use_peft="true", learning_rate=0), capsys
    )
    assert code == 0, err
    recorded = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "lora" / "base_model").resolve()) and "base_model" in stdout
    code, _, err = cli(train_argv(sft, data, tmp_path / "full", max_steps=1, learning_rate=0), capsys)
    assert code == 0, err
    with torch.no_grad():
        lora = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora"))(ids).logits
        full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))(ids).logits
    torch.testing.assert_close(lora, start, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, start, rtol=1e-5, atol=1e-5)
    # A rerun afresh over it replaces the merged copy; one that is refused removes the one it wrote.
    argv = train_argv(sft, data, tmp_path / "lora", max_steps=1, use_peft="true", overwrite_output_dir="true")
    assert cli(argv, capsys)[0] == 0 and (tmp_path / "lora" / "base_model" / "config.json").is_file()
    bad = train_argv(sft, data, tmp_path / "refused", max_steps=1, use_peft="true", loss_type="simpo")
    assert cli([*bad, "--ref_model", str(model_dir)], capsys)[0] != 0
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    # A refused rerun over a finished run leaves that run's merged copy (its adapter's base) alone.
    merged = (tmp_path / "lora" / "base_model" / "model.safetensors").read_bytes()
    refused = train_argv(
        sft, data, tmp_path / "lora", use_peft="true", overwrite_output_dir="true", loss_type="simpo"
    )
    assert cli([*refused, "--ref_model", str(model_dir)], capsys)[0] != 0
    assert (tmp_path / "lora" / "base_model" / "model.safetensors").read_bytes() == merged
    assert not (tmp_path / "lora" / "base_model.partial").exists()
    # Resuming on another first adapter (its base would not be the merged copy the run trains on): refused.
    ckpt = train_argv(
        sft, data, tmp_path / "ckpt", max_steps=1, use_peft="true", save_strategy="steps", save_steps=1
    )
    assert cli(ckpt, capsys)[0] == 0
    other = tmp_path / "other_sft"
    assert cli(train_argv(model_dir, data, other, max_steps=1, use_peft="true", seed=3), capsys)[0] == 0
    resumed = train_argv(
        other, data, tmp_path / "ckpt", max_steps=2, use_peft="true", save_strategy="steps", save_steps=1
    )
    expect_error([*resumed, "--resume"], capsys, "was merged from", "Resume with the --model it started from")
    # The same adapter moved elsewhere (same weights) resumes.
    shutil.copytree(sft, tmp_path / "sft_moved")
    resumed = train_argv(
        tmp_path / "sft_moved",
        data,
        tmp_path / "ckpt",
        max_steps=2,
        use_peft="true",
        save_strategy="steps",
        save_steps=1,
    )
    assert cli([*resumed, "--resume"], capsys)[0] == 0


def test_merging_a_lora_folder_with_modules_saved_whole(model_dir, tmp_path):
    """An adapter with `modules_to_save` (a trained lm_head copy): merged, the model is plain (the base
    model's parameter names, nothing of PEFT left) and computes what the PeftModel did."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tidpo.models import load_causal_lm

    lora = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(load_causal_lm(str(model_dir)), lora)
    torch.manual_seed(0)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data += 0.05 * torch.randn_like(param)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = load_causal_lm(str(tmp_path / "adapter"), merge_adapter=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, BaseTunerLayer) or hasattr(m, "modules_to_save") for m in merged.modules())
    assert set(merged.state_dict()) == set(load_causal_lm(str(model_dir)).state_dict())


def test_an_adapter_saved_without_a_tokenizer_uses_its_base_models(model_dir, tmp_path, capsys):
    """PEFT's save_pretrained writes no tokenizer: `tidpo eval` of such a folder takes the base model's
    (saying so); a model folder without tokenizer files and no adapter is one error naming it."""
    from peft import LoraConfig, get_peft_model

    from tidpo.models import load_causal_lm

    peft_model = get_peft_model(load_causal_lm(str(model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer_config.json").exists()
    data = data_file(tmp_path, PAIRS[:2])
    argv = ["eval", "--model", str(tmp_path / "adapter"), "--reference", str(model_dir), "--data", str(data)]
    code, _out, err = cli([*argv, "--out", str(tmp_path / "ev"), "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "holds no tokenizer files: using its base model's, " + str(model_dir) in err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_pairs"] == 2
    bare = tmp_path / "bare"
    load_causal_lm(str(model_dir)).save_pretrained(bare)
    argv[2] = str(bare)
    expect_error(
        [*argv, "--out", str(tmp_path / "ev2")], capsys, f"{bare} holds no tokenizer", "save_pretrained"
    )


def test_hub_eval_data_defaults_to_its_test_split(model_dir, tmp_path, capsys, monkeypatch):
    """As TRL's scripts: --eval_data of a Hub dataset takes its 'test' split unless --eval_split says;
    training keeps 'train'. (load_dataset stands in for the Hub, which this machine cannot reach.)"""
    import datasets

    import tidpo.data.loading as loading

    hub = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS), "test": datasets.Dataset.from_list(PAIRS[:2])}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id: hub)
    taken = []
    real_pick = loading._pick_split
    monkeypatch.setattr(
        loading, "_pick_split", lambda d, split, source: taken.append(split) or real_pick(d, split, source)
    )
    argv = train_argv(model_dir, "owner/prefs", tmp_path / "out", max_steps=1, eval_data="owner/prefs")
    assert cli(argv, capsys)[0] == 0
    assert taken == ["train", "test"]
    taken.clear()
    argv = [*train_argv(model_dir, "owner/prefs", tmp_path / "out2", max_steps=1, eval_data="owner/prefs")]
    assert cli([*argv, "--eval_split", "train"], capsys)[0] == 0
    assert taken == ["train", "train"]
    # A local eval file is its own split: no 'test' asked of it (also written with ~, as YAML keeps it).
    data_file(tmp_path, PAIRS[:2], "held_out.jsonl")
    monkeypatch.setenv("HOME", str(tmp_path))
    for n, local in enumerate((str(tmp_path / "held_out.jsonl"), "~/held_out.jsonl")):
        argv = train_argv(model_dir, "owner/prefs", tmp_path / f"local{n}", max_steps=1, eval_data=local)
        assert cli(argv, capsys)[0] == 0


def test_a_loaded_adapter_and_a_peft_config_are_refused(model_dir, tmp_path, capsys):
    from peft import LoraConfig

    from tidpo import TIDPOConfig, TIDPOTrainer
    from tidpo.models import load_causal_lm, load_tokenizer

    data = data_file(tmp_path, PAIRS)
    sft = tmp_path / "sft"
    assert cli(train_argv(model_dir, data, sft, max_steps=1, use_peft="true"), capsys)[0] == 0
    args = TIDPOConfig(output_dir=str(tmp_path / "lib"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"LoRA adapters loaded by transformers .*merge_loaded_adapter"):
        TIDPOTrainer(
            load_causal_lm(str(sft)),
            args=args,
            train_dataset=str(data),
            processing_class=load_tokenizer(str(sft)),
            peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        )


def test_overwrite_with_lora_after_full_weights_leaves_a_loadable_adapter(model_dir, tmp_path, capsys):
    """Full fine-tuning, then a LoRA run with --overwrite_output_dir: the old config.json must go too (beside
    the adapter it made the folder load as full weights that are no longer there)."""
    from tidpo.models import load_causal_lm

    data = data_file(tmp_path, PAIRS)
    out = tmp_path / "out"
    assert cli(argv_for(model_dir, data, tmp_path), capsys)[0] == 0
    assert (out / "config.json").exists()
    code, _, err = cli(
        argv_for(model_dir, data, tmp_path, use_peft="true", overwrite_output_dir="true"), capsys
    )
    assert code == 0, err
    assert (out / "adapter_model.safetensors").exists() and not (out / "config.json").exists()
    assert getattr(load_causal_lm(str(out)), "_hf_peft_config_loaded", False)


def test_eval_data_alone_evaluates_every_eval_steps_and_keeps_the_best(model_dir, tmp_path, capsys):
    """--eval_data without --eval_strategy evaluates every eval_steps, set before TrainingArguments checks
    that load_best_model_at_end's save and eval strategies match (they failed as "eval strategy no")."""
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(
        model_dir,
        data,
        tmp_path,
        max_steps=2,
        eval_data=str(data),
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end="true",
        gamma=0.0,
    )
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [1, 2]
    assert state["best_model_checkpoint"].endswith(("checkpoint-1", "checkpoint-2"))


def test_overwrite_deletes_nothing_before_the_data_and_model_have_loaded(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    out = tmp_path / "out"
    code, _, err = cli(argv_for(model_dir, data, tmp_path), capsys)
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())
    missing = tmp_path / "missing.jsonl"
    expect_error(argv_for(model_dir, missing, tmp_path, overwrite_output_dir="true"), capsys, str(missing))
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier run is intact
    # Nor before the trainer's own checks (here: a reference with another vocabulary).
    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    other = tmp_path / "other_vocab"
    tiny_causal_lm(tokenizer=tiny_tokenizer(vocab_size=400)).save_pretrained(other)
    expect_error(
        [*argv_for(model_dir, data, tmp_path, overwrite_output_dir="true"), "--ref_model", str(other)],
        capsys,
        "vocabulary",
    )
    assert sorted(p.name for p in out.iterdir()) == before
    # The model's own folder as output_dir: refused, with or without --overwrite_output_dir.
    argv = train_argv(model_dir, data, model_dir, max_steps=1, overwrite_output_dir="true")
    expect_error(argv, capsys, "is the --model folder")
    assert (model_dir / "model.safetensors").exists()
    # A model that is part of the earlier run (its checkpoint) would be deleted: refused too.
    code, _, err = cli(
        argv_for(model_dir, data, tmp_path, save_strategy="steps", save_steps=1, overwrite_output_dir="true"),
        capsys,
    )
    assert code == 0, err
    checkpoint = out / "checkpoint-1"
    argv = train_argv(checkpoint, data, out, max_steps=1, overwrite_output_dir="true")
    expect_error(argv, capsys, f"--model {checkpoint} is part of the earlier run", "checkpoint-1")
    assert (checkpoint / "model.safetensors").exists()


def test_resume_says_when_there_is_nothing_to_resume_or_nothing_left(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    code, stdout, err = cli([*argv_for(model_dir, data, tmp_path), "--resume"], capsys)
    assert code == 0, err
    assert "--resume: no checkpoint in" in stdout and "starting afresh" in stdout
    argv = argv_for(model_dir, data, tmp_path / "done", max_steps=2, save_strategy="steps", save_steps=2)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    # Resuming the finished run: Trainer would take a step past max_steps; refused instead.
    expect_error([*argv, "--resume"], capsys, "is at step 2, already max_steps=2")
    # Its full-weight checkpoint resumed as a LoRA run: said in words (torch's were about param groups).
    expect_error([*argv, "--max_steps", "3", "--use_peft", "true", "--resume"], capsys, "holds full weights")


def test_resume_from_checkpoint_is_read_as_resume(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    code, _, err = cli(
        argv_for(model_dir, data, tmp_path, max_steps=2, save_strategy="steps", save_steps=1), capsys
    )
    assert code == 0, err
    checkpoint = tmp_path / "out" / "checkpoint-1"
    argv = train_argv(
        model_dir, data, tmp_path / "other", max_steps=3, resume_from_checkpoint=str(checkpoint)
    )
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    assert f"resuming from {checkpoint}" in stdout
    state = json.loads((tmp_path / "other" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]  # 1 from the checkpoint


def test_report_holds_the_final_eval_and_both_snapshots(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(
        model_dir, data, tmp_path, max_steps=2, report="true", report_pairs=2, eval_data=str(data)
    )
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "start of training" in page and "end of training" in page
    # The final eval as a table (the metrics, not the timings), the same numbers as metrics.json.
    assert "<h2>Evaluation</h2>" in page and "eval_rewards/accuracies" in page and "eval_runtime" not in page
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert f"{metrics['eval']['eval_loss']:.4g}" in page
    assert "report.html" in stdout
    assert "&lambda;=0.7," in page and "for inspection" not in page  # the run's own weights


@pytest.mark.parametrize(
    ("options", "shown", "note"),
    [
        ({"importance_mode": "prior"}, "&lambda;=0,", None),
        ({"importance_mode": "gradient"}, "&lambda;=1,", None),
        ({"importance_mode": "uniform"}, "&lambda;=0.7,", "importance_mode='uniform'"),
        ({"loss_type": "dpo"}, "&lambda;=0.7,", "loss_type='dpo', which weights every token 1"),
    ],
)
def test_report_pictures_are_the_runs_weights_or_say_they_are_not(
    model_dir, tmp_path, capsys, options, shown, note
):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(model_dir, data, tmp_path, report="true", report_pairs=1, gamma=0.0, **options)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert shown in page
    assert (note in page) if note else ("for inspection" not in page)


def test_a_report_snapshot_that_is_not_finite_says_so(nan_model_dir, tmp_path, capsys):
    """Report pair 5 holds the token whose embedding is NaN: the error names the report and the pair."""
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(
        nan_model_dir, data, tmp_path, report="true", report_pairs=8, skip_nonfinite_batches="true"
    )
    expect_error(argv, capsys, "report.html", "'start of training'", "report pair 5", "not finite")


# ------------------------------------------------------------------------------------------ NaN guards


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    """A saved model whose input embedding of one token, used only in the chosen of row 5, is NaN."""
    from safetensors.torch import load_file, save_file

    from tidpo.models import tiny_tokenizer

    folder = write_tiny_model(tmp_path_factory.mktemp("nan") / "model")
    tokenizer = tiny_tokenizer()
    ids = tokenizer(PAIRS[5]["chosen"])["input_ids"]
    others = {
        t
        for i, p in enumerate(PAIRS)
        for f in p
        if (i, f) != (5, "chosen")
        for t in tokenizer(p[f])["input_ids"]
    }
    token = next(t for t in ids[:-1] if t not in others)
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key][token] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_nan_stops_the_run_naming_step_and_data_row(nan_model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(nan_model_dir, data, tmp_path, per_device_train_batch_size=8, gamma=0.0)
    expect_error(argv, capsys, "non-finite", "at step 0", "row ids [5]")


def test_nan_traceback_with_tidpo_debug(nan_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIDPO_DEBUG", "1")
    data = data_file(tmp_path, PAIRS)
    with pytest.raises(NonFiniteError, match="row ids"):
        main(argv_for(nan_model_dir, data, tmp_path, per_device_train_batch_size=8, gamma=0.0))


def test_skip_nonfinite_batches_skips_and_counts_them(nan_model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    # Two batches of 4 pairs: exactly one holds row 5.
    argv = argv_for(
        nan_model_dir,
        data,
        tmp_path,
        per_device_train_batch_size=4,
        max_steps=2,
        gamma=0.0,
        skip_nonfinite_batches="true",
        eval_data=str(data_file(tmp_path, PAIRS[:5], "clean.jsonl")),
        eval_strategy="steps",
        eval_steps=1,
    )
    with pytest.warns(UserWarning, match=r"row ids \[5\].*batch skipped"):
        code, _out, err = cli(argv, capsys)
    assert code == 0, err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "nonfinite/skipped" in h]
    assert [h["nonfinite/skipped"] for h in steps][-1] == 1.0
    assert len(steps) == 2
    assert not [h for h in state["log_history"] if "eval_nonfinite/skipped" in h]  # a training count
    # The skipped step logs no loss (NaN, not the zero that only carried its zero gradient), and the run's
    # train_loss is the other step's.
    losses = [h["loss"] for h in steps]
    assert sum(math.isnan(x) for x in losses) == 1
    kept = next(x for x in losses if not math.isnan(x))
    assert kept > 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] == pytest.approx(kept)


# ------------------------------------------------------------------------------------------ terminal


def test_console_script_prints_one_line_not_a_traceback(model_dir, tmp_path):
    rows = [dict(p) for p in PAIRS]
    rows[3]["rejected"] = 7
    data = data_file(tmp_path, rows)
    done = run_tidpo(argv_for(model_dir, data, tmp_path), timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("tidpo: error:")]
    assert len(errors) == 1 and "row 3" in errors[0] and "'rejected'" in errors[0], done.stderr


# ------------------------------------------------------------------------------------------ fuzz

_texts = st.sampled_from(["The sky is", " blue.", " green.", "", "  ", "A cat sat on the mat", "\n"])
_values = st.one_of(
    _texts,
    st.none(),
    st.integers(-3, 3),
    st.booleans(),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": _texts}), max_size=2
    ),
)
_row = st.one_of(
    st.just({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "question"]), _values, max_size=4),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=4))
def test_fuzz_rows_through_the_cli_train_or_fail_clearly(model_dir, tmp_path_factory, capsys, rows):
    """Every file either trains or stops with one `tidpo: error:` line (never a deep traceback:
    `main` only catches the project's error types, anything else escapes and fails this test)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    data = data_file(tmp, rows)
    argv = train_argv(model_dir, data, tmp / "out", max_steps=1, anchor_max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical/empty-prompt rows warn; not what this test is about
        code, _out, err = cli(argv, capsys)
    if code == 2:
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("tidpo: error:")]) == 1, err
    else:
        assert code == 0, err
        assert (tmp / "out" / "model.safetensors").exists()


def test_data_build_takes_the_documented_options(model_dir, tmp_path, capsys):
    """`tidpo data build` and `python -m tidpo.tasks.build` share one parser (the data README's commands
    use --no-progress and the sampling options)."""
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: the food was"} for i in range(3)]
    )
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "build", "--task", "sentiment", "--model", str(model_dir), "--prompts", str(prompts)]
    argv += ["--samples", "2", "--out", str(out), "--max-new-tokens", "4", "--temperature", "1.0"]
    argv += ["--top-k", "0", "--top-p", "1.0", "--no-progress"]
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    stats = json.loads(stdout[stdout.index("{") :])
    assert stats["prompts"] == 3 and stats["pairs"] + stats["ties_skipped"] == 3
    assert out.exists()
    code, _, err = cli(["data", "nope"], capsys)
    assert code == 2 and "invalid choice: 'nope'" in err
    argv[5] = "smollm2-135"  # a typo of the built-in name: refused, not looked up on the Hub
    expect_error(argv, capsys, "--model smollm2-135: no such file or folder", "did you mean 'smollm2-135m'?")


def test_with_load_best_model_at_end_the_final_eval_is_the_saved_models(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    argv = argv_for(
        model_dir,
        data,
        tmp_path,
        max_steps=3,
        eval_data=str(data),
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end="true",
        metric_for_best_model="eval_loss",
        greater_is_better="true",  # the highest loss: an early step, so the saved model is not the last
        learning_rate=0.05,
    )
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[-1])
    assert best_step < 3
    at_best = next(h for h in state["log_history"] if "eval_loss" in h and h["step"] == best_step)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval"]["eval_loss"] == at_best["eval_loss"] == state["best_metric"]


@pytest.mark.parametrize(
    ("judge", "fragment"), [("os:nosuch", "has no attribute 'nosuch'"), ("nosuchmod:f", "nosuchmod")]
)
def test_eval_judge_paths_that_do_not_resolve_are_one_line_errors(
    model_dir, tmp_path, capsys, judge, fragment
):
    data = data_file(tmp_path, PAIRS)
    argv = ["eval", "--model", str(model_dir), "--reference", str(model_dir), "--data", str(data)]
    expect_error(
        [*argv, "--judge", judge, "--out", str(tmp_path / "e")], capsys, f"--judge {judge}: ", fragment
    )


def test_lora_options_without_use_peft_are_warned_about(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    with pytest.warns(UserWarning, match=r"--lora_r, --lora_dropout set without --use_peft true"):
        code, _, err = cli(argv_for(model_dir, data, tmp_path, lora_r=4, lora_dropout=0.1, gamma=0.0), capsys)
    assert code == 0, err


def test_unwritable_outputs_fail_before_any_work(model_dir, tmp_path, capsys):
    """An output path under a file (or a folder that takes no files) fails first, naming the option:
    before, training ran to its end and the save failed."""
    data = data_file(tmp_path, PAIRS)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_error(
        train_argv(model_dir, data, blocker / "run"), capsys, "--output_dir", "is a file, not a folder"
    )
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "missing")
    expect_error(
        train_argv(model_dir, data, dangling), capsys, "--output_dir", "symbolic link to a missing folder"
    )
    expect_error(
        [
            "eval",
            "--model",
            str(model_dir),
            "--reference",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(blocker),
        ],
        capsys,
        "--out",
        "is a file",
    )
    expect_error(
        [
            "explain",
            "--model",
            str(model_dir),
            "--prompt",
            "a",
            "--response",
            "b",
            "--out",
            str(blocker / "x"),
        ],
        capsys,
        "--out",
    )


def test_a_lora_folder_whose_base_moved_is_named(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, PAIRS)
    adapter = tmp_path / "adapter"
    assert cli(train_argv(model_dir, data, adapter, max_steps=1, use_peft="true"), capsys)[0] == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved" / "base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for argv in (
        train_argv(adapter, data, tmp_path / "out"),
        [
            "explain",
            "--model",
            str(adapter),
            "--prompt",
            "a",
            "--response",
            "b",
            "--out",
            str(tmp_path / "x"),
        ],
    ):
        expect_error(argv, capsys, "LoRA adapter whose base model folder", str(tmp_path / "moved" / "base"))


def test_resuming_behind_the_runs_last_step_is_warned_about(tmp_path, capsys):
    from tidpo.cli import _warn_if_behind

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    _warn_if_behind(str(tmp_path / "checkpoint-2"), str(tmp_path))
    assert "reached step 4, but its newest complete checkpoint is checkpoint-2" in capsys.readouterr().out
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    _warn_if_behind(str(tmp_path / "checkpoint-2"), str(tmp_path))
    assert capsys.readouterr().out == ""
    # An explicit older checkpoint while later ones are still there: not "later ones were not kept".
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    _warn_if_behind(str(tmp_path / "checkpoint-2"), str(tmp_path))
    out = capsys.readouterr().out
    assert "holds later checkpoints (checkpoint-3, checkpoint-6)" in out and "not kept" not in out


def test_the_final_eval_is_in_trainer_state_and_the_best_checkpoint_in_the_summary(
    model_dir, tmp_path, capsys
):
    data = data_file(tmp_path, PAIRS)
    out = tmp_path / "final"
    code, stdout, err = cli(
        train_argv(model_dir, data, out, max_steps=2, eval_data=data, eval_strategy="no"), capsys
    )
    assert code == 0, err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert [h["eval_loss"] for h in history if "eval_loss" in h] == [metrics["eval_loss"]]
    assert "best checkpoint" not in stdout
    best = tmp_path / "best"
    options = dict(max_steps=2, eval_data=data, eval_strategy="steps", eval_steps=1, save_strategy="steps")
    options.update(save_steps=1, load_best_model_at_end="true")
    code, stdout, err = cli(train_argv(model_dir, data, best, **options), capsys)
    assert code == 0, err
    assert "best checkpoint" in stdout and "checkpoint-" in stdout.split("best checkpoint")[1].split("\n")[0]


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    import tidpo.cli as cli_module

    def interrupted(_argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, "train", interrupted)
    code, _, err = cli(["train"], capsys)
    assert code == 130 and "Traceback" not in err
    assert (
        err.strip() == "tidpo: interrupted (tidpo train --resume continues from the last complete checkpoint)"
    )


def test_eval_sampling_flags_reach_the_evaluation(model_dir, tmp_path, capsys, monkeypatch):
    import importlib

    evaluate_module = importlib.import_module("tidpo.evaluation.evaluate")  # the package exports a function
    seen = {}
    monkeypatch.setattr(evaluate_module, "run_eval", lambda **kwargs: seen.update(kwargs))
    data = data_file(tmp_path, PAIRS)
    argv = ["eval", "--model", str(model_dir), "--reference", str(model_dir), "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    assert (seen["temperature"], seen["top_k"], seen["top_p"]) == (0.8, 50, 0.95)  # spec §5 settings
    # Plain sampling from the policy (an unbiased `kl`): 0 and 1 turn top-k / top-p off.
    assert (
        main([*argv, "--out", str(tmp_path / "e"), "--temperature", "1", "--top-k", "0", "--top-p", "1"]) == 0
    )
    assert (seen["temperature"], seen["top_k"], seen["top_p"]) == (1.0, None, None)
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "e"), "--top-p", "0"])
    assert "--top-p in (0, 1]" in capsys.readouterr().err
