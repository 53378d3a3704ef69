"""Built-in preference tasks: prompt sets plus an offline judge that scores responses.

``TASKS`` maps a task name to a :class:`Task`; ``tidpo.tasks.build.build_pairs`` samples responses from
a model, scores them with the task's judge and writes best/worst pairs as a TRL-style dataset.

Judges have the signature ``judge(text, row=None) -> float`` where ``row`` is the prompt row (for
``instructions`` it carries the constraints). They are importable as ``tidpo.tasks.instructions:judge``
and ``tidpo.tasks.sentiment:judge``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidpo.tasks import instructions, sentiment

__all__ = ["PROMPTS_DIR", "TASKS", "Task", "get_task", "load_prompts"]

PROMPTS_DIR = Path(__file__).parent / "prompts"

Judge = Callable[..., float]


@dataclass(frozen=True)
class Task:
    """A built-in preference task."""

    name: str
    description: str
    judge: Judge
    """``judge(text, row=None) -> float``; higher is better."""
    judge_path: str
    """Import path of the judge (``module:function``), as the judge registry refers to it."""
    train_prompts: Path
    test_prompts: Path
    validate_row: Callable[[Mapping[str, Any], str], None] | None = None
    """Task-specific checks of a prompt row (beyond having a ``prompt``); gets ``(row, where)``."""


TASKS: dict[str, Task] = {
    "instructions": Task(
        name="instructions",
        description=(
            "Verifiable instructions (IFEval-style): each prompt states 1-3 checkable constraints "
            "(word limits, keywords, lowercase, bullet counts, ...); score = fraction met."
        ),
        judge=instructions.judge,
        judge_path="tidpo.tasks.instructions:judge",
        train_prompts=PROMPTS_DIR / "instructions_train.jsonl",
        test_prompts=PROMPTS_DIR / "instructions_test.jsonl",
        validate_row=instructions.validate_row,
    ),
    "sentiment": Task(
        name="sentiment",
        description=(
            "Positive sentiment: neutral requests for short reviews and story openings; score = "
            "VADER compound mapped to [0, 1] (higher = more positive)."
        ),
        judge=sentiment.judge,
        judge_path="tidpo.tasks.sentiment:judge",
        train_prompts=PROMPTS_DIR / "sentiment_train.jsonl",
        test_prompts=PROMPTS_DIR / "sentiment_test.jsonl",
    ),
}


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (``ValueError`` listing the known tasks otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}") from None


def load_prompts(path: str | Path, task: Task | str | None = None) -> list[dict[str, Any]]:
    """Read a JSONL prompts file: one object per line with a ``prompt`` (string or message list).

    Blank lines are skipped. Errors name the file, the line and the field. With ``task``, its own row
    checks run too (e.g. ``instructions`` rows need valid ``constraints``).
    """
    path = Path(path)
    if isinstance(task, str):
        task = get_task(task)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "prompt" not in row:
                raise ValueError(f"{where}: missing field 'prompt' (fields: {sorted(row)})")
            _check_prompt(row["prompt"], where)
            if task is not None and task.validate_row is not None:
                task.validate_row(row, where)
            rows.append(row)
    if not rows:
        raise ValueError(f"prompts file {path} has no rows")
    return rows


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' is empty")
        return
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: field 'prompt'[{i}] must be a {{'role', 'content'}} message, got {m!r}"
                )
        return
    raise ValueError(f"{where}: field 'prompt' must be a non-empty string or message list, got {prompt!r}")
