"""Build a preference dataset for a built-in task by sampling a model and judging its responses.

For each prompt: sample K responses, score each with the task's judge, keep the best as ``chosen``
and the worst as ``rejected`` (prompts whose best and worst scores tie carry no preference and are
skipped). Rows are written in TRL's conversational format plus metadata::

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], "task": "instructions", "prompt_id": ...,
     "constraints": "<JSON list>", "chosen_score": 1.0, "rejected_score": 0.5, "flipped": false}

The build is restartable: finished prompts are appended (and flushed) batch by batch, and a rerun
with the same ``out`` skips prompts already there (keyed by prompt) and drops a half-written last
line. Tied prompts are recorded in a side file ``<out>.ties`` (prompt and scores), so a rerun skips
them as well instead of sampling them again; the sampling settings in ``<out>.build.json``, and a
rerun with other settings is refused (delete the three files to build anew). Label flipping (for label-noise experiments, paper Table B8) is applied in a final pass over
the whole file, so exactly ``round(flip_fraction * pairs)`` pairs are flipped however often the build
was interrupted.

    python -m tidpo.tasks.build --task instructions --samples 4 --out pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidpo.judges import get_judge
from tidpo.models import EMBEDDED_MODELS, refuse_near_builtin
from tidpo.tasks import Task, get_task, load_prompts

__all__ = ["build_pairs", "main", "prompt_key", "read_pairs", "ties_path"]


def _as_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_key(prompt: str | Sequence[dict[str, Any]]) -> str:
    """Identity of a prompt for restarts: a plain string and its one-user-message form are the same."""
    return json.dumps(_as_messages(prompt), ensure_ascii=False, sort_keys=True)


def read_pairs(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a pairs JSONL file written by :func:`build_pairs`.

    A last line without its newline (or that does not parse) is what an interrupted write leaves: it
    is dropped with a warning, and with ``repair=True`` cut from the file too. A bad line anywhere
    else is an error naming the file and line.
    """
    return _read_jsonl(Path(path), ("prompt", "chosen", "rejected"), repair=repair)


def settings_path(out: str | Path) -> Path:
    """The side file holding the sampling settings a build's pairs and ties came from."""
    out = Path(out)
    return out.with_name(out.name + ".build.json")


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A rerun continues an earlier build only with its settings: mixed pairs would be silent, and a
    prompt skipped as a tie would stay skipped whatever the new settings."""
    path = settings_path(out)
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in settings.items() if earlier.get(k) != v]
        if changed:
            raise ValueError(
                f"{out} was built with other settings ({'; '.join(changed)}), and a rerun continues that build. "
                f"To build with the new settings, delete {out}, {ties_path(out)} and {path}, or write to "
                "another --out."
            )


def _record_settings(out: Path, settings: dict[str, Any], rows_before: int) -> None:
    """Record the settings once this build is about to write (a build that failed before, e.g. on a
    mistyped model, must not hold the corrected rerun to its settings)."""
    path = settings_path(out)
    if path.exists():
        return
    if rows_before:
        warnings.warn(
            f"{out} holds {rows_before} pair(s)/tie(s) from a build whose settings were not recorded: they "
            f"cannot be checked against this build's, which are recorded in {path} from now on.",
            stacklevel=3,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def ties_path(out: str | Path) -> Path:
    """The side file where a build records prompts skipped for a tie (so a restart skips them too)."""
    out = Path(out)
    return out.with_name(out.name + ".ties")


def _read_jsonl(path: Path, required: Sequence[str], *, repair: bool) -> list[dict[str, Any]]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After a final newline split() leaves an empty last element; anything else there is partial.
    partial = lines.pop()
    rows: list[dict[str, Any]] = []
    keep_bytes = len(data) - len(partial)
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as err:
            if lineno == len(lines) and not partial.strip():
                # The last complete-looking line is broken: treat it as the interrupted write.
                warnings.warn(
                    f"{path}, line {lineno}: dropping an unreadable last line ({err})", stacklevel=2
                )
                keep_bytes -= len(raw) + 1
                break
            raise ValueError(f"{path}, line {lineno}: not a valid pairs row ({err})") from err
        for field in required:
            if field not in row:
                raise ValueError(f"{path}, line {lineno}: missing field {field!r}")
        rows.append(row)
    if partial.strip():
        warnings.warn(f"{path}, line {len(lines) + 1}: dropping a half-written last line", stacklevel=2)
    if repair and keep_bytes != len(data):
        with path.open("r+b") as f:
            f.truncate(keep_bytes)
    return rows


def _write_rows_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _apply_flips(rows: list[dict[str, Any]], fraction: float, seed: int) -> bool:
    """Make exactly round(fraction * len(rows)) rows flipped (seeded choice); True if anything changed.

    Idempotent: rows already flipped by an earlier pass are flipped back when not chosen now.
    """
    n_flip = round(fraction * len(rows))
    chosen_idx = set(random.Random(seed).sample(range(len(rows)), n_flip))
    changed = False
    for i, row in enumerate(rows):
        want = i in chosen_idx
        if bool(row.get("flipped", False)) != want:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["chosen_score"], row["rejected_score"] = row.get("rejected_score"), row.get("chosen_score")
            row["flipped"] = want
            changed = True
    return changed


def _validate_args(
    samples: int,
    flip_fraction: float,
    max_new_tokens: int,
    batch_size: int,
    out: Any,
    temperature: float,
    top_k: int,
    top_p: float,
) -> Path:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2 (best and worst of K responses), got {samples!r}")
    if not 0.0 <= float(flip_fraction) <= 1.0:
        raise ValueError(f"flip_fraction must be between 0 and 1, got {flip_fraction!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature must be a positive finite number (the build samples), got {temperature}"
        )
    if not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"top_p must be in (0, 1] and top_k >= 0 (0: no top-k), got top_p={top_p}, top_k={top_k}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out is None or str(out) == "":
        raise ValueError("out: give the path of the JSONL file to write")
    out_path = Path(out)
    if out_path.is_dir():
        raise ValueError(
            f"out: {out_path} is a directory; give a file path such as {out_path / 'pairs.jsonl'}"
        )
    return out_path


def build_pairs(
    task: str | Task,
    model: Any = "smollm2-135m",
    prompts: str | Path | None = None,
    samples: int = 4,
    *,
    out: str | Path,
    flip_fraction: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    progress: bool = True,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Sample ``samples`` responses per prompt, judge them, and write best/worst pairs to ``out``.

    Args:
        task: a built-in task name (see ``tidpo.tasks.TASKS``) or a :class:`~tidpo.tasks.Task`.
        model: a built-in model name, a local path / Hub id, or a loaded model (then pass ``tokenizer``).
        prompts: a JSONL prompts file (rows with ``prompt``; default: the task's train prompts).
        samples: responses per prompt, K >= 2.
        out: the JSONL file to write; if it exists, its prompts are skipped (restart). Prompts skipped
            for a tie go to ``<out>.ties``.
        flip_fraction: fraction of pairs whose labels are swapped (marked ``flipped``), in [0, 1].
        seed: seeds sampling and the choice of flipped pairs.
        max_new_tokens, temperature, top_k, top_p: sampling settings.
        batch_size: sequences per ``generate`` call (``batch_size // samples`` prompts, at least one);
            the output is flushed after each.
        progress: tqdm progress bar.

    Returns:
        Statistics: ``prompts`` (distinct prompts), ``resumed`` (already in ``out``), ``generated``
        (sampled in this call), ``pairs_new``, ``ties_skipped`` (in this call), ``ties_total``,
        ``pairs`` (in the file), ``flipped``,
        ``mean_chosen_score``, ``mean_rejected_score`` (over the file, as labelled), ``seconds``.
    """
    from tidpo.generation import generate  # deferred: pulls torch/transformers

    start = time.perf_counter()
    task_obj = get_task(task) if isinstance(task, str) else task
    out_path = _validate_args(
        samples, flip_fraction, max_new_tokens, batch_size, out, temperature, top_k, top_p
    )
    prompts_path = Path(prompts) if prompts is not None else task_obj.train_prompts
    rows = load_prompts(prompts_path, task_obj)

    # Distinct prompts, first occurrence wins (the output is keyed by prompt).
    todo_by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        todo_by_key.setdefault(prompt_key(row["prompt"]), row)
    n_prompts = len(todo_by_key)

    done_keys: set[str] = set()
    if out_path.exists():
        # Read-only until the file is known to be this build's: never cut a line off someone else's file.
        for i, existing in enumerate(read_pairs(out_path), start=1):
            if existing.get("task") != task_obj.name:
                raise ValueError(
                    f"{out_path}, row {i}: field 'task' is {existing.get('task')!r}, but this build is for "
                    f"task {task_obj.name!r}; write to a different --out file"
                )
            done_keys.add(prompt_key(existing["prompt"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the read above already warned about a half-written line
            read_pairs(out_path, repair=True)
    model_name = (
        model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    )
    if model_name and Path(model_name).exists():  # one folder, however it is spelled
        model_name = str(Path(model_name).resolve())
    settings = {
        "task": task_obj.name,
        "model": str(model_name),
        "samples": samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
    }
    _check_settings(out_path, settings)
    tie_file = ties_path(out_path)
    if tie_file.exists():
        done_keys.update(prompt_key(t["prompt"]) for t in _read_jsonl(tie_file, ("prompt",), repair=True))
    todo = [(k, r) for k, r in todo_by_key.items() if k not in done_keys]
    resumed = n_prompts - len(todo)

    stats: dict[str, Any] = {
        "task": task_obj.name,
        "prompts_file": str(prompts_path),
        "out": str(out_path),
        "prompts": n_prompts,
        "resumed": resumed,
        "generated": 0,
        "pairs_new": 0,
        "ties_skipped": 0,
    }
    if todo:
        if isinstance(model, str):
            from tidpo.models import load_causal_lm, load_tokenizer

            if tokenizer is None:
                tokenizer = load_tokenizer(model)
            lm = load_causal_lm(model)
            stats["model"] = model
        else:
            if tokenizer is None:
                raise ValueError("build_pairs: a loaded model needs its tokenizer (pass tokenizer=...)")
            lm = model
            stats["model"] = getattr(getattr(lm, "config", None), "name_or_path", "") or type(lm).__name__
        judge = get_judge(task_obj.judge)  # a number from every judge, text refused (tidpo.judges)
        per_chunk = max(1, batch_size // samples)
        chunks = [todo[i : i + per_chunk] for i in range(0, len(todo), per_chunk)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_prompts, initial=resumed, desc=f"build {task_obj.name}", unit="prompt")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("a", encoding="utf-8") as f, tie_file.open("a", encoding="utf-8") as tf:
            for chunk in chunks:
                # Seeded by the chunk's first prompt, not its position: a resumed run draws the same
                # way for a chunk that starts at the same prompt.
                chunk_seed = (seed * 1_000_003 + zlib.crc32(chunk[0][0].encode("utf-8"))) % (2**63)
                completions = generate(
                    lm,
                    tokenizer,
                    [_as_messages(r["prompt"]) for _, r in chunk],
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    num_return_sequences=samples,
                    batch_size=batch_size,
                    seed=chunk_seed,
                )
                lines, tie_lines = [], []
                for (_, row), texts in zip(chunk, completions, strict=True):
                    texts = [t.strip() for t in texts]
                    scores = [judge(t, row) for t in texts]
                    if not all(math.isfinite(x) for x in scores):
                        raise ValueError(
                            f"the {task_obj.name} judge scored a sample of prompt {row.get('id', '')!r} "
                            f"({prompt_key(row['prompt'])[:80]!r}) {scores}: judges must return finite numbers."
                        )
                    best = max(range(len(texts)), key=lambda j: scores[j])
                    worst = min(range(len(texts)), key=lambda j: scores[j])
                    if scores[best] == scores[worst]:
                        stats["ties_skipped"] += 1
                        tie_lines.append(
                            json.dumps({"prompt": _as_messages(row["prompt"]), "scores": scores}) + "\n"
                        )
                        continue
                    lines.append(
                        json.dumps(
                            {
                                "prompt": _as_messages(row["prompt"]),
                                "chosen": [{"role": "assistant", "content": texts[best]}],
                                "rejected": [{"role": "assistant", "content": texts[worst]}],
                                "task": task_obj.name,
                                "prompt_id": str(row.get("id", "")),
                                "constraints": json.dumps(row.get("constraints", []), ensure_ascii=False),
                                "chosen_score": scores[best],
                                "rejected_score": scores[worst],
                                "flipped": False,
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                # Recorded once this build writes its first results: a build that failed before (a wrong
                # model, out of memory in the first chunk) must not hold the corrected rerun to its settings.
                _record_settings(out_path, settings, rows_before=resumed)
                # One write per chunk and file, then flush to disk: an interruption loses at most this
                # chunk and leaves at most one partial line per file (dropped on restart).
                # Ties first: a crash between the two writes then re-samples nothing that has a pair.
                for handle, text in ((tf, "".join(tie_lines)), (f, "".join(lines))):
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                stats["generated"] += len(chunk)
                stats["pairs_new"] += len(lines)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()

    pairs = read_pairs(out_path) if out_path.exists() else []
    if _apply_flips(pairs, float(flip_fraction), seed):
        _write_rows_atomically(out_path, pairs)
    if not out_path.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()  # every prompt tied: still leave the (empty) file the caller asked for
    n = len(pairs)
    stats.update(
        {
            "pairs": n,
            "flipped": sum(bool(p.get("flipped")) for p in pairs),
            "ties_total": sum(1 for _ in _read_jsonl(tie_file, ("prompt",), repair=False))
            if tie_file.exists()
            else 0,
            # None (JSON null) for an empty file: NaN is not valid JSON.
            "mean_chosen_score": sum(p["chosen_score"] for p in pairs) / n if n else None,
            "mean_rejected_score": sum(p["rejected_score"] for p in pairs) / n if n else None,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return stats


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``tidpo data build`` and ``python -m tidpo.tasks.build`` (one parser for both)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Sample K responses per prompt, judge them, write best-vs-worst pairs.",
        allow_abbrev=False,
    )
    parser.add_argument("--task", required=True, help="Built-in task: instructions, sentiment.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default=None, help="Prompt JSONL (default: the task's train prompts).")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--flip-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    model_path = Path(args.model).expanduser()
    if args.model.startswith((".", "/", "~")) and not model_path.is_dir():
        raise ValueError(f"--model {args.model}: no such model folder (resolved to {model_path.resolve()}).")
    refuse_near_builtin(args.model, EMBEDDED_MODELS, "model", option="--model ")
    stats = build_pairs(
        args.task,
        model=args.model,
        prompts=args.prompts,
        samples=args.samples,
        out=args.out,
        flip_fraction=args.flip_fraction,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        progress=not args.no_progress,
    )
    json.dump(stats, sys.stdout, indent=2)
    print()
    if stats["pairs"] == 0:
        print(
            f"tidpo: warning: {args.out} holds no pairs: every prompt's samples scored the same (ties are "
            f"skipped; see {args.out}.ties). Raise --samples or use prompts the judge can tell apart (and delete "
            f"{args.out}, {args.out}.ties and {args.out}.build.json first: a rerun continues this build).",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
