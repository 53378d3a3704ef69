"""The `tidpo` command line: `train`, `eval`, `explain`, `data build`.

`tidpo train --config run.yaml [--key value ...]`: the YAML holds the script options below and any
`TIDPOConfig` field; flags override the file. Unknown keys are an error, with suggestions.

Errors the user can fix (bad data, options, config values, missing files, NaN/Inf during training) are
printed as one line, ``tidpo: error: <message>``, with exit code 2; ``TIDPO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

BUILTIN_DATA = {
    "quickstart": "assets/data/quickstart.jsonl",
    "quickstart-test": "assets/data/quickstart_test.jsonl",
    "sentiment-quickstart": "assets/data/sentiment_quickstart.jsonl",
}


@dataclass
class ScriptArguments:
    """Options of `tidpo train` that are not training arguments.

    Attributes:
        model: policy to train: a built-in short name (``smollm2-135m``), a local folder or a Hub id.
        ref_model: reference model; default a frozen copy (or adapters disabled under LoRA).
        train_data: preference data: a built-in name (``quickstart``), a JSONL/JSON/CSV/Parquet file or
            a Hub dataset id.
        train_split: split to read from a Hub dataset or a DatasetDict.
        eval_data: held-out preference data (same forms); evaluated every ``eval_steps`` when set.
        eval_split: split of ``eval_data``; default: ``test`` for a Hub dataset (as TRL's scripts), the
            file itself for a local file.
        dtype: dtype the model is loaded in (``float32``, ``bfloat16``, ``auto``).
        use_peft: train LoRA adapters instead of all weights.
        lora_r / lora_alpha / lora_dropout / lora_target_modules: the LoRA adapter's shape.
        load_in_4bit: QLoRA: load the base model in 4-bit (needs bitsandbytes and a GPU).
        report: write ``report.html`` in the run folder at the end of training.
        report_pairs: how many training pairs the report pictures (token importance).
        num_processes: >1 relaunches this command under ``accelerate launch`` with that many processes.
        accelerate_config: an accelerate config file for that relaunch (e.g.
            ``configs/accelerate/zero3.yaml``); default: plain DDP over ``num_processes`` processes.
        overwrite_output_dir: a run that starts afresh in an ``output_dir`` holding an earlier run's
            checkpoints or saved model deletes them first (and lists them). Without it such a run stops:
            an old adapter next to a new full model, or an old checkpoint that ``--resume`` would pick
            up, would silently mix the two runs.
    """

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "Policy to train: built-in name (smollm2-135m), local folder or Hub id."},
    )
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "Reference model (default: a frozen copy of --model; adapters disabled under LoRA)."
        },
    )
    train_data: str = field(
        default="quickstart",
        metadata={
            "help": "Preference data: built-in name (quickstart), JSONL/JSON/CSV/Parquet file or Hub id."
        },
    )
    train_split: str = field(
        default="train", metadata={"help": "Split of a Hub dataset or DatasetDict to train on."}
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out preference data (same forms), evaluated every eval_steps."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split of a Hub --eval_data (default: test; a local file is one split)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the model is loaded in: float32, bfloat16, float16 or auto."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str = field(
        default_factory=lambda: "all-linear",
        metadata={"help": "LoRA target modules (names, or 'all-linear')."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit (bitsandbytes, GPU only)."}
    )
    report: bool = field(default=True, metadata={"help": "Write report.html in the run folder at the end."})
    report_pairs: int = field(
        default=3, metadata={"help": "Training pairs pictured in the report (token importance)."}
    )
    num_processes: int = field(
        default=1, metadata={"help": ">1: relaunch under accelerate launch with that many processes."}
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate config file for that relaunch (e.g. configs/accelerate/zero3.yaml)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete an earlier run's checkpoints and model in output_dir before starting afresh."
        },
    )


class CLIError(Exception):
    """A mistake in how ``tidpo`` was called (options, config file), reported as one line by `main`."""


def resolve_data(name_or_path: str) -> str:
    """Map a built-in dataset name to its bundled file; anything else is returned unchanged."""
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    if name_or_path in BUILTIN_DATA:
        return str(Path(__file__).parent / BUILTIN_DATA[name_or_path])
    from tidpo.models import refuse_near_builtin

    refuse_near_builtin(name_or_path, BUILTIN_DATA, "data set")
    return name_or_path


# ------------------------------------------------------------------------------------------ config


def _known_keys() -> dict[str, str]:
    from tidpo.training.config import TIDPOConfig

    keys = {f.name: "script" for f in fields(ScriptArguments)}
    keys.update({f.name: "training" for f in fields(TIDPOConfig) if f.init})
    return keys


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a run YAML and reject unknown keys with a suggestion."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found (resolved to {file.resolve()}).")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold a mapping of option: value, got {type(data).__name__}.")
    known = _known_keys()
    unknown = [k for k in data if k not in known]
    if unknown:
        from tidpo.training.config import unknown_option_hint

        hints = [f"{key!r}{unknown_option_hint(key, known)}" for key in unknown]
        raise CLIError(
            f"unknown option(s) in {path}: {', '.join(hints)}. Options are the fields of TIDPOConfig "
            "(see README, 'Config reference') and the script options of `tidpo train --help`."
        )
    for key, value in data.items():
        if _means_none(key, value):
            data[key] = None
    _check_yaml_types(data, path)
    return data


# Words that stand for None, the default of the optional options: "auto" for the three switches whose
# None picks by device and setup, "none"/"null" for any of them (e.g. max_length: none = no limit).
_AUTO_SWITCHES = ("share_prompt", "anchor_static_cache", "anchor_prompt_cache")


def _means_none(name: str, value: object) -> bool:
    from tidpo.training.config import TIDPOConfig

    if name not in TIDPOConfig._OPTIONAL or not isinstance(value, str):
        return False
    words = ("none", "null", "auto") if name in _AUTO_SWITCHES else ("none", "null")
    return value.strip().lower() in words


def _none_or(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap an optional option's argparse type so that its None words parse to None (in the flags'
    order, so a later ``--x auto`` overrides an earlier ``--x true``)."""

    def convert(text: str) -> Any:
        return None if _means_none(name, text) else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid int value: 'auto'"
    return convert


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_yaml_types(data: dict[str, Any], path: str) -> None:
    """Reject YAML values of the wrong type for plain int/float/bool/str options.

    argparse converts string defaults with the option's type, but leaves other values alone, so without
    this a ``beta: [0.1]`` would reach the config and fail deep inside with a TypeError.
    """
    from tidpo.training.config import TIDPOConfig

    hints = {**typing.get_type_hints(TIDPOConfig), **typing.get_type_hints(ScriptArguments)}
    for key, value in data.items():
        hint = hints.get(key)
        args = typing.get_args(hint)
        optional = type(None) in args and len(args) == 2
        base = next(a for a in args if a is not type(None)) if optional else hint
        if base not in _SCALARS or (value is None and optional):
            continue  # unions and containers: argparse and the config's own validation judge them
        if base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, base)
        if isinstance(value, str) and base is not str:
            ok = True  # a string is parsed like a flag value (e.g. beta: "1e-1"); argparse reports bad ones
        if not ok:
            shown = "null" if value is None else f"{type(value).__name__} {value!r}"
            null = " or null" if optional else ""
            raise CLIError(f"{path}: option {key!r} must be {_SCALARS[base]}{null}, got {shown}.")


def parse_train_args(argv: list[str]):
    """YAML values become parser defaults; command-line flags override them."""
    from transformers import HfArgumentParser

    from tidpo.training.config import TIDPOConfig

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--resume", nargs="?", const="latest", default=None)
    known, rest = pre.parse_known_args(argv)
    # A short usage line: argparse prints it before every flag error, and the full one lists ~150 options.
    parser = HfArgumentParser(
        (ScriptArguments, TIDPOConfig),
        prog="tidpo train",
        usage="tidpo train [--config run.yaml] [--option value ...]  (tidpo train --help lists the options)",
        allow_abbrev=False,  # a misspelt flag (--gam 0) must not set the option it begins (gamma)
    )
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off."  # HfArgumentParser repeats --X's help for --no_X
        elif action.dest in TIDPOConfig._OPTIONAL and action.type is not None:
            action.type = _none_or(action.dest, action.type)
    parser.add_argument("--config", help="YAML file of options (flags override it).")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="Resume from the latest checkpoint in output_dir, or a path.",
    )
    defaults = load_yaml_config(known.config) if known.config else {}
    if "output_dir" not in defaults:
        defaults["output_dir"] = "runs/tidpo"
    # Eval data is evaluated every eval_steps (default: logging_steps) unless an eval_strategy says
    # otherwise; set before TrainingArguments validates the strategies (load_best_model_at_end's match).
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--eval_data")
    flags.add_argument("--eval_strategy")
    given = flags.parse_known_args(rest)[0]
    if (given.eval_data or defaults.get("eval_data")) and not (
        given.eval_strategy or "eval_strategy" in defaults
    ):
        defaults["eval_strategy"] = "steps"
    parser.set_defaults(**defaults)
    # look_for_args_file=False: never read options from a stray `<argv[0]>.args` file.
    *objects, extra = parser.parse_args_into_dataclasses(
        args=rest, return_remaining_strings=True, look_for_args_file=False
    )
    script, config = objects[0], objects[1]  # objects[2], when present, holds --config/--resume
    if extra:
        from tidpo.training.config import unknown_option_hint

        known = _known_keys()
        hints = []
        # The unknown flags, not the values after them (``--gam 0``: '0' is gam's, not a second mistake).
        flagged = [arg for arg in extra if arg.startswith("--")]  # not a negative value such as -1
        for arg in flagged or extra:
            flag = arg.split("=")[0]
            hint = unknown_option_hint(flag[2:], known, prefix="--") if flag.startswith("--") else ""
            hints.append(f"{arg!r}{hint}")
        raise CLIError(f"tidpo train: unrecognised argument(s): {', '.join(hints)}")
    return script, config, known.resume


# ------------------------------------------------------------------------------------------ train


def _relaunch_with_accelerate(
    num_processes: int, argv: list[str], accelerate_config: str | None = None, use_cpu: bool = False
) -> int:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise CLIError("--num_processes > 1 needs accelerate (pip install accelerate).")
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise CLIError(f"--accelerate_config {accelerate_config}: no such file.")
    forwarded, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--num_processes", "--accelerate_config"):
            skip = True
            continue
        if arg.startswith(("--num_processes=", "--accelerate_config=")):
            continue
        forwarded.append(arg)
    # The launcher of this interpreter, so no `accelerate` on PATH is needed (e.g. venv not activated).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config is not None:
        # The file picks the backend (DDP, DeepSpeed, FSDP); --multi_gpu here would override it.
        cmd += ["--config_file", accelerate_config]
    else:
        # Without a config file and fewer than 2 GPUs, `accelerate launch` silently starts ONE process;
        # --multi_gpu always starts N (gloo on CPU-only machines, NCCL on GPUs). Port 0 = a free port,
        # so two single-node runs on one machine do not collide on the default 29500.
        cmd += ["--multi_gpu", "--main_process_port", "0"]
        import torch

        if not torch.cuda.is_available() and not use_cpu:
            # Without it each CPU worker would train alone (transformers sees no distributed setup).
            forwarded += ["--use_cpu", "true"]
    cmd += ["-m", "tidpo.cli", "train", *forwarded]
    print("tidpo: relaunching under accelerate:", " ".join(cmd), flush=True)
    launcher = subprocess.Popen(cmd)
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the launcher too (same process group): it stops its workers, which run in their
        # own sessions, so killing it now would leave them training. Give it time, then ask it with
        # SIGTERM (a second SIGINT could cut its shutdown short), and only then kill it.
        print("tidpo: interrupted; waiting for the workers to stop...", file=sys.stderr, flush=True)
        try:
            launcher.wait(timeout=15)
        except subprocess.TimeoutExpired:
            launcher.terminate()
            try:
                launcher.wait(timeout=45)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        return 130


def _check_script_args(script: ScriptArguments) -> None:
    """Script options whose mistakes would otherwise surface deep inside torch or peft."""
    import torch

    if script.dtype != "auto" and not isinstance(getattr(torch, script.dtype, None), torch.dtype):
        raise CLIError(
            f"--dtype {script.dtype!r}: not a torch dtype; use float32, bfloat16, float16 or auto."
        )
    modules = script.lora_target_modules
    if not (
        isinstance(modules, str) or (isinstance(modules, list) and all(isinstance(m, str) for m in modules))
    ):
        raise CLIError(
            f"--lora_target_modules {modules!r}: give module names (e.g. q_proj v_proj) or 'all-linear'."
        )
    if script.load_in_4bit:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise CLIError(
                "--load_in_4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package (pip install "
                "bitsandbytes>=0.46.1); without them set load_in_4bit: false (LoRA on the full-precision model)."
            )
    for option in ("num_processes", "report_pairs"):
        if getattr(script, option) < 1:
            raise CLIError(f"--{option} {getattr(script, option)}: must be >= 1.")
    if not script.use_peft:
        defaults = ScriptArguments()
        changed = [
            f"--{f.name}"
            for f in fields(ScriptArguments)
            if f.name.startswith("lora_") and getattr(script, f.name) != getattr(defaults, f.name)
        ]
        if changed:
            warnings.warn(
                f"{', '.join(changed)} set without --use_peft true: this run fine-tunes every weight and "
                "does not use them (add --use_peft true to train LoRA adapters).",
                UserWarning,
                stacklevel=2,
            )


def _peft_config(script: ScriptArguments):
    if not script.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        target_modules=script.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def _latest_checkpoint(output_dir: str) -> str | None:
    # The newest COMPLETE checkpoint: tmp-checkpoint-* folders of a save that was killed never count.
    from tidpo.training.checkpointing import last_complete_checkpoint

    return last_complete_checkpoint(output_dir)


# What a run writes into its output_dir that a later run must not mix with its own: checkpoints and
# saved weights (an adapter beside full weights loads as both), plus the run's records.
_RUN_FILE = re.compile(
    r"(tmp-)?checkpoint-\d+|adapter_(model\.(safetensors|bin)|config\.json)|"
    r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?|"
    r"(trainer_state|metrics|run_config|eval)\.json|report\.html|base_model"
)


def _earlier_run(output_dir: str) -> list[Path]:
    """The files and checkpoint folders an earlier run left in ``output_dir`` (sorted)."""
    out = Path(output_dir)
    return sorted(p for p in out.iterdir() if _RUN_FILE.fullmatch(p.name)) if out.is_dir() else []


def _names(found: list[Path]) -> str:
    return ", ".join(p.name for p in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")


def _check_output_dir(script: ScriptArguments, output_dir: str, why: str | None) -> None:
    """Before any work: the run must not write into its input model's folder, nor (``why``: it starts
    afresh) on top of an earlier run unless ``--overwrite_output_dir`` (which :func:`_delete_earlier_run`
    then honours, once the data and the model have loaded)."""
    out = Path(output_dir).resolve()
    found = _earlier_run(output_dir) if why else []
    for option, model in (("model", script.model), ("ref_model", script.ref_model)):
        if not model or not Path(model).exists():
            continue  # a built-in name or a Hub id
        path = Path(model).resolve()
        if path == out:
            raise CLIError(
                f"--output_dir {output_dir} is the --{option} folder: the run would write over (or with "
                "--overwrite_output_dir delete) the model it loads. Choose another --output_dir."
            )
        inside = [f for f in found if f.resolve() in (path, *path.parents)]
        if inside:
            raise CLIError(
                f"--{option} {model} is part of the earlier run in --output_dir {output_dir} ({inside[0].name}), "
                "which this run would replace. Choose another --output_dir (or copy the model out first)."
            )
    if found and not script.overwrite_output_dir:
        how = "choose another --output_dir, or pass --overwrite_output_dir true to delete those files first."
        if why == "this run starts afresh":
            how = "Pass --resume to continue it, " + how
        else:
            how = "To start afresh there, " + how
        raise CLIError(f"--output_dir {output_dir} holds an earlier run ({_names(found)}) and {why}. {how}")


# Saved beside full weights; a new run's LoRA adapter does not rewrite them, and a config.json left
# beside adapter files makes the folder load as a full model without its weights.
_MODEL_FILES = ("config.json", "generation_config.json")


def _delete_earlier_run(output_dir: str) -> None:
    """``--overwrite_output_dir``: delete what an earlier run left in ``output_dir`` (checked before)."""
    found = _earlier_run(output_dir)
    if not found:
        return
    found += [path for name in _MODEL_FILES if (path := Path(output_dir) / name).is_file()]
    print(
        f"tidpo: --overwrite_output_dir: deleting the earlier run in {output_dir}: {_names(found)}",
        flush=True,
    )
    for path in found:  # every rank may get here: tolerate files another rank already removed
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(option: str, name: str) -> Iterator[None]:
    """Prefix a loading error (from_pretrained's "not a folder nor a Hub id", offline Hub...) with the
    option that named the model."""
    try:
        yield
    except OSError as err:
        raise OSError(f"--{option} {name}: {err}") from err


def _check_writable(folder: str, option: str) -> None:
    """The output folder (or the nearest existing folder above it) must take files: fail before the work,
    not when its results are saved."""
    if Path(folder).is_symlink() and not Path(folder).exists():
        raise CLIError(
            f"--{option} {folder}: a symbolic link to a missing folder. Create it, or give another folder."
        )
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(
            f"--{option} {folder}: {existing} is a file, not a folder. Give a folder to write into."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CLIError(
            f"--{option} {folder}: cannot write into {existing} ({err.strerror}). Give a writable folder."
        ) from err


def _check_model_path(name_or_path: str, option: str) -> None:
    """A model given as a path must exist: fail here with the path, not deep inside from_pretrained."""
    from tidpo.models import EMBEDDED_MODELS, refuse_near_builtin

    if name_or_path.lower() in EMBEDDED_MODELS:
        return
    path = Path(name_or_path)
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise FileNotFoundError(
                f"--{option} {name_or_path}: the folder holds no config.json (nor adapter_config.json), so it "
                "is not a model written by save_pretrained. Give the folder the model was saved to."
            )
        if not (path / "config.json").exists():  # a LoRA folder: its base loads from where it was
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
            if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
                raise FileNotFoundError(
                    f"--{option} {name_or_path}: a LoRA adapter whose base model folder {base} (its "
                    "adapter_config.json's base_model_name_or_path) does not exist (here). Put the base model "
                    "there, or set base_model_name_or_path to the folder (or Hub id) it is in now."
                )
        return
    if path.exists():
        raise FileNotFoundError(f"--{option} {name_or_path}: a file, not a model folder.")
    refuse_near_builtin(name_or_path, EMBEDDED_MODELS, "model", option=f"--{option} ")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or (os.sep in name_or_path and Path(name_or_path).parent.exists()):
        raise FileNotFoundError(
            f"--{option} {name_or_path}: no such model folder (resolved to {Path(name_or_path).resolve()}). "
            f"Give a folder written by save_pretrained, a built-in name ({', '.join(EMBEDDED_MODELS)}) or a "
            "Hub id."
        )


def train(argv: list[str]) -> int:
    script, config, resume = parse_train_args(argv)
    _check_script_args(script)
    if config.resume_from_checkpoint:  # TrainingArguments' own spelling of --resume PATH
        if resume:
            raise CLIError("give --resume or --resume_from_checkpoint, not both")
        resume = config.resume_from_checkpoint
    in_launcher = "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    if script.num_processes > 1 and not in_launcher:
        return _relaunch_with_accelerate(script.num_processes, argv, script.accelerate_config, config.use_cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and config.world_size != world:
        # e.g. `accelerate launch` on a machine without GPUs, without use_cpu: every worker would train
        # on its own, into the same output_dir.
        raise CLIError(
            f"launched as {world} processes, but the training sees {config.world_size}: on a machine without "
            "GPUs add --use_cpu true (gloo), or check the launcher's configuration."
        )

    from tidpo.models import load_causal_lm, load_tokenizer
    from tidpo.training.trainer import TIDPOTrainer

    _check_model_path(script.model, "model")
    if script.ref_model:
        _check_model_path(script.ref_model, "ref_model")
    _check_writable(config.output_dir, "output_dir")
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder.")
    checkpoint = _latest_checkpoint(config.output_dir) if resume == "latest" else resume
    if checkpoint is not None:
        adapter = (Path(checkpoint) / "adapter_config.json").is_file()
        if adapter != script.use_peft:  # else the optimizer state fails to load, in torch's words
            raise CLIError(
                f"{checkpoint} holds {'LoRA adapters' if adapter else 'full weights'}, so --use_peft must be "
                f"{'true' if adapter else 'false'} to resume it (as in the run that wrote it)."
            )
    afresh = None
    if checkpoint is None:
        afresh = "--resume found no complete checkpoint in it" if resume else "this run starts afresh"
    _check_output_dir(script, config.output_dir, afresh)
    if resume and checkpoint is None:
        print(f"tidpo: --resume: no checkpoint in {config.output_dir}; starting afresh.", flush=True)
    if checkpoint is not None and config.max_steps > 0:
        done = _step_of(Path(checkpoint) / "trainer_state.json")
        if done >= config.max_steps:  # Trainer would still take one more step
            raise CLIError(
                f"{checkpoint} is at step {done}, already max_steps={config.max_steps}: nothing is left to "
                "train. Raise --max_steps to train further (the optimizer and learning-rate schedule then "
                "continue from the checkpoint's state, where a decaying schedule had reached 0), or start a new "
                "run from the saved model."
            )

    model_kwargs = dict(config.model_init_kwargs or {})
    model_kwargs.setdefault("dtype", script.dtype)
    if script.load_in_4bit:
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        if "device_map" not in model_kwargs:
            from accelerate import PartialState

            # 4-bit weights are quantised on load, onto this process's GPU (one whole copy per rank).
            model_kwargs["device_map"] = {"": PartialState().local_process_index}
    with _naming("model", script.model):
        tokenizer = load_tokenizer(script.model)

    def prepared(name: str, split: str | None, hub_split: str = "train"):
        # By name (file path or Hub id), so data errors name it rather than "<dataset>". A Hub dataset
        # without a split given: hub_split (a local file is its own split).
        source = resolve_data(name)
        if split is None and not Path(source).expanduser().exists():
            split = hub_split
        return TIDPOTrainer.prepare_dataset(source, tokenizer, config, split=split)

    # Data before weights: a bad row fails in seconds, not after the model has loaded.
    train_data = prepared(script.train_data, script.train_split)
    # Held-out pairs from a Hub dataset: its test split unless told (as TRL's scripts).
    eval_data = prepared(script.eval_data, script.eval_split, hub_split="test") if script.eval_data else None
    with _naming("model", script.model):
        model = load_causal_lm(script.model, merge_adapter=True, **model_kwargs)
    ref_model = None
    if script.ref_model:
        with _naming("ref_model", script.ref_model):
            ref_model = load_causal_lm(script.ref_model, merge_adapter=True, **model_kwargs)

    report = None
    if script.report:
        from tidpo.report import ReportCallback

        pairs = [train_data[i] for i in range(min(script.report_pairs, len(train_data)))]
        report = ReportCallback(
            pairs=pairs,
            tokenizer=tokenizer,
            # The pictures show the weights the run trains with: lambda 0 / 1 for the prior / gradient
            # ablations (other weightings: the report says so).
            lambda_importance={"prior": 0.0, "gradient": 1.0}.get(
                config.effective_importance_mode, config.lambda_importance
            ),
            sigma_div=config.sigma_div,
            span=config.importance_span,
            write_on_train_end=False,  # written below, once the model is saved and evaluated
        )

    base_copy = _save_merged_base(model, tokenizer, script, config.output_dir, afresh=afresh is not None)
    try:
        trainer = TIDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=_peft_config(script),
            callbacks=[report] if report else None,
        )
    except BaseException:
        if base_copy is not None and base_copy.staged is not None:
            shutil.rmtree(base_copy.staged, ignore_errors=True)  # a refused run leaves nothing behind
        raise
    if afresh:  # only now that the data, the models and the trainer's own checks have passed
        _delete_earlier_run(config.output_dir)
    _accept_merged_base(base_copy)
    if checkpoint is not None:
        print(f"tidpo: resuming from {checkpoint}", flush=True)
        _warn_if_behind(checkpoint, config.output_dir)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)
    eval_metrics = _final_eval(trainer) if eval_data is not None else {}
    trainer.save_state()  # after the final eval, which joins its log_history
    if trainer.is_world_process_zero():
        _write_run_files(config, script, result.metrics, eval_metrics)
    if report is not None:
        # The final eval's metrics as the report's table (not its timings).
        shown = {k: v for k, v in eval_metrics.items() if not k.endswith(("_runtime", "_per_second"))}
        report.eval_results = shown  # {} (no eval data): no eval section, not a stale eval.json
        report.finish(trainer.args, trainer.state, trainer.model)
    if trainer.is_world_process_zero():
        _print_summary(trainer, config, result.metrics, eval_metrics)
    return 0


def _step_of(state_file: Path) -> int:
    return json.loads(state_file.read_text()).get("global_step", 0) if state_file.is_file() else 0


def _warn_if_behind(checkpoint: str, output_dir: str) -> None:
    """A finished run's newest checkpoint can be older than its end (save_total_limit with
    load_best_model_at_end keeps the best one): resuming from it trains those steps again."""
    reached = _step_of(Path(output_dir) / "trainer_state.json")
    at = _step_of(Path(checkpoint) / "trainer_state.json")
    from tidpo.training.checkpointing import checkpoint_folders

    later = [name for step, name in checkpoint_folders(output_dir) if step > at]
    if later:  # an explicit older --resume: the saves of this run go beside another history's
        print(
            f"tidpo: warning: resuming from {Path(checkpoint).name} (step {at}), but {output_dir} holds later "
            f"checkpoints ({', '.join(later)}) of the run that went on from it: this run's "
            "checkpoints replace those of the same step, the others stay, and a later plain --resume takes "
            "the newest step whichever run wrote it. Move them away first to keep the two runs apart.",
            flush=True,
        )
    elif reached > at:
        print(
            f"tidpo: warning: the run in {output_dir} reached step {reached}, but its newest complete checkpoint "
            f"is {Path(checkpoint).name} (later ones were not kept, e.g. save_total_limit with "
            f"load_best_model_at_end): steps {at + 1}-{reached} are trained again.",
            flush=True,
        )


@dataclass
class _BaseCopy:
    path: Path  # output_dir/base_model, the new adapter's recorded base
    staged: Path | None  # written by this invocation, moved to `path` once the run is accepted


def _merged_from(adapter: str) -> dict[str, str]:
    """What identifies the merged model: the adapter folder and its weights' digest."""
    folder = Path(adapter).resolve()
    weights = next(
        (folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()),
        None,
    )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights else ""
    return {"model": str(folder), "adapter_sha256": digest}


def _save_merged_base(
    model, tokenizer, script: ScriptArguments, output_dir: str, afresh: bool
) -> _BaseCopy | None:
    """A new adapter on top of a LoRA folder (``--model <adapter> --use_peft true``) trains on the model
    with that adapter merged in, which exists nowhere on disk: save it as ``output_dir/base_model`` and
    make it the new adapter's recorded base, so the output loads (PEFT, ``tidpo eval``) as the model
    trained. It is written beside (``base_model.partial``) and moved in by :func:`_accept_merged_base`
    once the run is accepted, so a refused run leaves an earlier run's copy alone. A resumed run keeps
    the copy its first part saved, if it was merged from the same adapter."""
    if not (script.use_peft and (Path(script.model) / "adapter_config.json").is_file()):
        return None
    from accelerate import PartialState
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise CLIError(
            f"--model {script.model} is a LoRA folder, merged into its base before the new adapter trains; under "
            "ZeRO-3 that merged model cannot be saved beside the adapter. Merge it first (load it with "
            "tidpo.models.load_causal_lm(path, merge_adapter=True) and save_pretrained), then pass that folder."
        )
    path = (Path(output_dir) / "base_model").resolve()
    model.name_or_path = model.config._name_or_path = str(path)  # what PEFT records as the base
    origin = _merged_from(script.model)
    staged = path.with_name("base_model.partial")
    state = PartialState()
    if not afresh and (path / "config.json").is_file():
        marker = path / "merged_from.json"
        earlier = json.loads(marker.read_text()) if marker.is_file() else None
        if state.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)  # left by a killed attempt to start over
        # The adapter's weights identify it (a moved or copied folder is the same adapter).
        if earlier is None or earlier.get("adapter_sha256") != origin["adapter_sha256"]:
            raise CLIError(
                f"{path} (the base of the adapter this run resumes) was merged from "
                f"{earlier['model'] if earlier else 'an adapter it did not record'}"
                f"{' with other weights' if earlier and earlier['model'] == origin['model'] else ''}, not from "
                f"--model {script.model} as it is now: the resumed adapter would load on another model. Resume with "
                "the --model it started from, or start afresh."
            )
        return _BaseCopy(path, None)
    if state.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)  # a killed earlier attempt's
        print(
            f"tidpo: saving the model merged from {script.model} to {path} (the new adapter's base)",
            flush=True,
        )
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "merged_from.json").write_text(json.dumps(origin, indent=2))
    state.wait_for_everyone()
    return _BaseCopy(path, staged)


def _accept_merged_base(copy: _BaseCopy | None) -> None:
    """Move the merged copy written for this run into place (after any earlier run was deleted)."""
    if copy is None or copy.staged is None:
        return
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # every rank has deleted the earlier run (its base_model too) before
    if state.is_main_process:
        shutil.rmtree(copy.path, ignore_errors=True)  # an unfinished earlier copy without config.json
        copy.staged.rename(copy.path)
    state.wait_for_everyone()


def _final_eval(trainer) -> dict:
    """Eval metrics of the saved model: the periodic eval of the step it comes from (the final step, or
    the best checkpoint's under load_best_model_at_end) when there was one, else a new evaluation."""
    step = trainer.state.global_step
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        step = int(Path(best).name.rsplit("-", 1)[-1])
    evals = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    if evals:
        return {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def _write_run_files(config, script: ScriptArguments, train_metrics: dict, eval_metrics: dict) -> None:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"script": vars(script), "training": config.to_dict()}
    (out / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    (out / "metrics.json").write_text(json.dumps({"train": train_metrics, "eval": eval_metrics}, indent=2))


def _print_summary(trainer, config, train_metrics: dict, eval_metrics: dict) -> None:
    history = [h for h in trainer.state.log_history if "loss" in h]
    last = history[-1] if history else {}
    lines = ["", "=" * 64, "tidpo train: done"]
    lines.append(f"  steps                     {trainer.state.global_step}")
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "weights/entropy",
        "triplet/loss",
        "kl/chosen",
    ):
        if key in last:
            lines.append(f"  {key:<26}{last[key]:.4f}   (last logged step {last.get('step')})")
    if "train_runtime" in train_metrics:
        lines.append(f"  runtime                   {train_metrics['train_runtime']:.1f} s")
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in eval_metrics:
            lines.append(f"  {key:<26}{eval_metrics[key]:.4f}")
    out = Path(config.output_dir).resolve()
    best = trainer.state.best_model_checkpoint
    if config.load_best_model_at_end and best:
        lines.append(
            f"  best checkpoint           {Path(best).name}  (load_best_model_at_end: the saved model and eval)"
        )
    lines.append(f"  model saved in            {out}")
    lines.append(f"  run folder                {out}  (metrics.json, trainer_state.json, checkpoints)")
    if (out / "report.html").exists():
        lines.append(f"  report                    {out / 'report.html'}")
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------------ others


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tidpo eval", description="Evaluate a policy against its reference.", allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="Trained policy (folder, built-in name or Hub id).")
    parser.add_argument(
        "--reference", required=True, help="Reference model (e.g. the model before training)."
    )
    parser.add_argument("--data", required=True, help="Held-out preference pairs (file or built-in name).")
    parser.add_argument("--judge", default=None, help="Judge name (see tidpo.judges) or module:function.")
    parser.add_argument("--out", required=True, help="Output folder (eval.json).")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="Beta of the implicit rewards (default: the training run's, from --model's run_config.json; else 0.1).",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="Longest generation, in tokens (default 64)."
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="Generate for the first N prompts only (default all)."
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="Sampling temperature of the generations (default 0.8).",
    )
    parser.add_argument("--top-k", type=int, default=50, help="Top-k of the sampling (default 50; 0: off).")
    parser.add_argument(
        "--top-p", type=float, default=0.95, help="Top-p of the sampling (default 0.95; 1: off)."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="Pairs per forward / prompts per generation batch (the sampled generations depend on it).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Truncation of the pairs (default: the training run's, from --model's run_config.json; else 512).",
    )
    parser.add_argument(
        "--max-prompt-length", type=int, default=None, help="Prompt truncation (same default rule; else 256)."
    )
    a = parser.parse_args(argv)
    if not a.temperature > 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        parser.error("--temperature must be > 0, --top-k >= 0 and --top-p in (0, 1]")
    _check_model_path(a.model, "model")
    _check_model_path(a.reference, "reference")
    _check_writable(a.out, "out")
    if a.judge is not None:
        from tidpo.judges import get_judge

        try:  # a 'module:function' path that does not import or resolve: say so in one line
            get_judge(a.judge)
        except (ImportError, AttributeError, TypeError) as err:
            raise CLIError(f"--judge {a.judge}: {err}") from err
    from tidpo.evaluation.evaluate import run_eval

    run_eval(
        model=a.model,
        reference=a.reference,
        data=resolve_data(a.data),
        judge=a.judge,
        out=a.out,
        beta=a.beta,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k or None,
        top_p=a.top_p if a.top_p < 1 else None,
        num_prompts=a.num_prompts,
        batch_size=a.batch_size,
        seed=a.seed,
        max_length=a.max_length,
        max_prompt_length=a.max_prompt_length,
    )
    return 0


def _explain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tidpo explain", description="Show TI-DPO's token importance.", allow_abbrev=False
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt")
    parser.add_argument("--response")
    parser.add_argument("--data", help="Preference file to take a row from (with --row).")
    parser.add_argument("--row", type=int, help="0-based row index in --data.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lambda-importance", type=float, default=0.7)
    parser.add_argument("--sigma-div", type=float, default=4.0)
    a = parser.parse_args(argv)
    if a.data is None and (a.prompt is None or a.response is None):
        parser.error("give --prompt and --response, or --data FILE --row N")
    if a.data is not None and a.row is None:
        parser.error("--data needs --row N")
    _check_model_path(a.model, "model")
    _check_writable(a.out, "out")
    from tidpo.evaluation.explain import run_explain

    run_explain(
        model=a.model,
        prompt=a.prompt,
        response=a.response,
        out=a.out,
        data=resolve_data(a.data) if a.data else None,
        row=a.row,
        lambda_importance=a.lambda_importance,
        sigma_div=a.sigma_div,
    )
    return 0


def _data(argv: list[str]) -> int:
    if not argv or argv[0] != "build":
        parser = argparse.ArgumentParser(
            prog="tidpo data", description="Build preference data.", allow_abbrev=False
        )
        parser.add_argument("action", choices=["build"])
        parser.parse_args(argv[:1])  # exits 2 with argparse's message (or prints --help)
    from tidpo.tasks.build import main as build_main

    return build_main(argv[1:], prog="tidpo data build")


COMMANDS = {"train": train, "eval": _eval, "explain": _explain, "data": _data}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors `main` reports as one line: each names what is wrong and how to fix it."""
    from tidpo.data import PreferenceDataError
    from tidpo.tokenops import NonFiniteError

    # ValueError covers TIDPOConfig/TrainingArguments validation (and PreferenceDataError, a subclass);
    # OSError covers missing files and from_pretrained's "not a folder nor a Hub id".
    return (CLIError, PreferenceDataError, ValueError, OSError, NonFiniteError)


def main(argv: list[str] | None = None) -> int:
    """Run a ``tidpo`` command; user errors print ``tidpo: error: <message>`` and return 2.

    ``TIDPO_DEBUG=1`` re-raises them instead, with the full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tidpo {train,eval,explain,data} ...\n")
        print("  train    train with TI-DPO (or a baseline) from a YAML config and flags")
        print("  eval     evaluate a trained policy against its reference")
        print("  explain  show the token-importance weights of a response")
        print("  data     build preference data from a model and a judge (data build ...)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntidpo: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        if os.environ.get("TIDPO_DEBUG", "").strip() not in ("", "0"):
            raise
        hint = (
            " (tidpo train --resume continues from the last complete checkpoint)"
            if argv[0] == "train"
            else ""
        )
        print(f"\ntidpo: interrupted{hint}", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get("TIDPO_DEBUG", "").strip() not in ("", "0"):
            raise
        # One line, whatever the source; notes added on the way (which judge, which setting) included.
        message = " ".join(" ".join([str(err), *getattr(err, "__notes__", [])]).split()) or type(err).__name__
        print(f"tidpo: error: {message}", file=sys.stderr)
        print("tidpo: (set TIDPO_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
