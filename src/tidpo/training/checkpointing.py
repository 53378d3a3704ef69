"""Crash-safe checkpoints: a checkpoint folder exists under its final name only once it is complete.

`transformers.Trainer._save_checkpoint` writes straight into ``output_dir/checkpoint-N``: a run killed
while saving (SIGKILL, OOM killer, pre-emption) leaves a ``checkpoint-N`` folder that holds, say, the
weights but no optimizer or trainer state. `get_last_checkpoint` then picks that folder and the resume
fails, or worse resumes from a half state. Here every file of a checkpoint is written into
``output_dir/tmp-checkpoint-N`` first, flushed to disk, and the folder is renamed to ``checkpoint-N``
with one atomic ``os.replace`` after every process has finished writing. Names starting with ``tmp-``
never match the ``checkpoint-N`` pattern of `get_last_checkpoint` / `sort_checkpoints`, so leftovers of
an interrupted save are invisible to resume and rotation; the next save deletes them.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Any

from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

if TYPE_CHECKING:
    from torch import nn
    from transformers import Trainer

TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last; we use it as "complete" marker
STAGING_PREFIX = f"tmp-{PREFIX_CHECKPOINT_DIR}-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

__all__ = [
    "STAGING_PREFIX",
    "checkpoint_folders",
    "commit_checkpoint",
    "last_complete_checkpoint",
    "remove_stale_staging",
    "save_checkpoint_atomically",
]


def _fsync_path(path: str, directory: bool = False) -> None:
    # Directories need their own fsync for a rename or a new entry to survive a power cut; some
    # filesystems (network mounts) refuse to open or fsync them, which must not fail the save.
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder, directory=True)


def commit_checkpoint(staging_dir: str, final_dir: str) -> None:
    """Flush ``staging_dir`` to disk and rename it to ``final_dir`` in one atomic step.

    An existing ``final_dir`` (a run restarted from an earlier checkpoint saves the same step again) is
    first moved aside under a ``tmp-`` name, so at no moment does ``final_dir`` hold a mixture of the two.
    """
    _fsync_tree(staging_dir)
    parent = os.path.dirname(os.path.abspath(final_dir))
    replaced = None
    if os.path.exists(final_dir):
        # os.replace cannot overwrite a non-empty directory: move the old one out of the way first.
        replaced = os.path.join(
            parent, STAGING_PREFIX + os.path.basename(final_dir).split("-")[-1] + "-replaced"
        )
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final_dir, replaced)
    os.replace(staging_dir, final_dir)
    _fsync_path(parent, directory=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_stale_staging(run_dir: str) -> list[str]:
    """Delete the ``tmp-checkpoint-*`` folders an interrupted save left in ``run_dir``; return their paths."""
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def checkpoint_folders(run_dir: str) -> list[tuple[int, str]]:
    """``(step, name)`` of every ``checkpoint-N`` folder of ``run_dir``, by step (complete or not;
    ``tmp-checkpoint-*`` staging folders never count)."""
    if not os.path.isdir(run_dir):
        return []
    steps = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            steps.append((int(match.group(1)), name))
    return sorted(steps)


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``run_dir`` that is complete, or None.

    Like `transformers.trainer_utils.get_last_checkpoint` (``tmp-checkpoint-*`` folders never count),
    and in addition a folder without ``trainer_state.json`` — the file written last — is skipped with a
    warning: it is a checkpoint some other (non-atomic) writer left half-written.
    """
    for _step, name in reversed(checkpoint_folders(run_dir)):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        warnings.warn(
            f"{path} has no {TRAINER_STATE_NAME} (an interrupted save?); skipping it for resume.",
            UserWarning,
            stacklevel=2,
        )
    return None


def save_checkpoint_atomically(trainer: Trainer, model: nn.Module, trial: Any = None) -> str:
    """What `Trainer._save_checkpoint` does (transformers 5), but through a staging folder; returns the path.

    Order: weights, optimizer/scheduler, scaler, RNG states, then ``trainer_state.json``, all inside
    ``tmp-checkpoint-N``; a barrier (every process has written its shard or RNG file); the main process
    renames the folder to ``checkpoint-N``; a barrier; then checkpoint rotation (``save_total_limit``),
    which only ever sees complete folders.
    """
    args, state = trainer.args, trainer.state
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = trainer._get_output_dir(trial=trial)
    final_dir = os.path.join(run_dir, name)
    staging_dir = os.path.join(run_dir, STAGING_PREFIX + str(state.global_step))

    if args.should_save:
        # Saves are sequential, so every staging folder present now is the remains of a killed save
        # (possibly of this very step): never let its stale files mix with the new ones.
        remove_stale_staging(run_dir)
    trainer.accelerator.wait_for_everyone()

    trainer.save_model(staging_dir, _internal_call=True)

    if (
        args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        and state.best_global_step
    ):
        trainer.accelerator.wait_for_everyone()
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        # The checkpoint being written is not under its final name yet, but it will be.
        if state.best_global_step == state.global_step or os.path.exists(best_dir):
            state.best_model_checkpoint = best_dir

    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(staging_dir)
        trainer._save_scaler(staging_dir)
        trainer._save_rng_state(staging_dir)

    if args.should_save:
        for cb in [
            c
            for c in [*trainer.callback_handler.callbacks, trainer.control]
            if isinstance(c, ExportableState)
        ]:
            cb_name = cb.__class__.__name__
            if isinstance(state.stateful_callbacks.get(cb_name), list):
                state.stateful_callbacks[cb_name].append(cb.state())
            else:
                state.stateful_callbacks[cb_name] = cb.state()
        state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

    trainer.accelerator.wait_for_everyone()  # every process has finished writing into the staging folder
    if args.should_save:
        commit_checkpoint(staging_dir, final_dir)
    trainer.accelerator.wait_for_everyone()  # nobody reads checkpoint-N before it exists

    if args.push_to_hub:
        trainer._push_from_checkpoint(final_dir)
    if args.should_save:
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    return final_dir
