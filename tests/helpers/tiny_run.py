"""Write a tiny model folder and preference files, and run `tidpo train` on them in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

# The `tidpo` console script of the interpreter running the tests (the project's venv).
TIDPO = str(Path(sys.executable).with_name("tidpo"))

# Options that keep a CLI run to a few seconds on two shared CPU cores.
FAST_OPTIONS: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "anchor_max_new_tokens": 4,
    "max_length": 48,
    "max_prompt_length": 24,
    "report": "false",
    "report_to": "none",
    "use_cpu": "true",
    "disable_tqdm": "true",
    "save_strategy": "no",
    "seed": 0,
}


def write_tiny_model(folder: Path, *, pad: bool = True, eos: bool = True, seed: int = 0) -> Path:
    """Save a 2-layer Llama and its byte-level BPE tokenizer with save_pretrained, as a user would."""
    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", tokenizer=tokenizer, seed=seed)
    if not pad:
        tokenizer.pad_token = None
    if not eos:
        tokenizer.eos_token = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_argv(model: Path, data: Path, out: Path, **options: Any) -> list[str]:
    """``train --model M --train_data D --output_dir O`` plus FAST_OPTIONS overridden by ``options``."""
    merged = {**FAST_OPTIONS, **options}
    argv = ["train", "--model", str(model), "--train_data", str(data), "--output_dir", str(out)]
    for key, value in merged.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def subprocess_env() -> dict[str, str]:
    # One thread per process: runs on a shared 2-core machine stay fast, and every process in a
    # comparison does its float reductions in the same order.
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("TIDPO_DEBUG", None)
    return env


def run_tidpo(argv: Sequence[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real `tidpo` console script to completion."""
    return subprocess.run(
        [TIDPO, *argv], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


def final_weights(out: Path) -> dict:
    """The weights `tidpo train` saved at the end of a run."""
    return load_file(str(out / "model.safetensors"))


def logged_losses(out: Path) -> dict[int, float]:
    """step -> logged training loss, from the run's trainer_state.json."""
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
