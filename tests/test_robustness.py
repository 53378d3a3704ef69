"""Never lose a run, never train on garbage silently.

- crash safety: a `tidpo train` process killed with SIGKILL (between steps, or in the middle of writing
  a checkpoint) resumes with `--resume` to the same final weights as an uninterrupted run;
- atomic checkpoints: a checkpoint folder only ever appears complete; rotation keeps complete ones;
- determinism: the same seed, data and machine give identical metrics, anchors included;
- numerical guards: a NaN names the step and the data rows it came from.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from conftest import PAIRS
from helpers.tiny_run import (
    TIDPO,
    final_weights,
    logged_losses,
    run_tidpo,
    subprocess_env,
    train_argv,
    write_jsonl,
    write_tiny_model,
)
from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.models import tiny_causal_lm
from tidpo.tokenops import NonFiniteError
from tidpo.training.checkpointing import (
    commit_checkpoint,
    last_complete_checkpoint,
    remove_stale_staging,
)
from tiny_setup import make_config as tiny_config

HELPERS = Path(__file__).parent / "helpers"
# Full TI-DPO (attribution weights, sequential KL, policy-sampled anchors): every source of randomness
# a resume has to restore. 8 steps of batch 2 over the 8 pairs is two epochs: the data order of the
# second epoch has to be restored too.
RUN = {"max_steps": 8, "save_strategy": "steps", "save_steps": 2}


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return write_tiny_model(root / "model"), write_jsonl(root / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def uninterrupted(run_inputs, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    model, data = run_inputs
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_tidpo(train_argv(model, data, out, **RUN))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_same_run(resumed: Path, reference: Path) -> None:
    want, got = final_weights(reference), final_weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        # Same ops in the same order on the same machine: equal up to float noise, in practice bitwise.
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)
    # The log of the steps before the crash comes back from the checkpoint; the rest is recomputed.
    assert logged_losses(resumed) == pytest.approx(logged_losses(reference), rel=1e-6)
    assert sorted(logged_losses(resumed)) == list(range(1, RUN["max_steps"] + 1))


def test_sigkill_between_steps_then_resume_gives_the_uninterrupted_weights(
    run_inputs, uninterrupted, tmp_path
):
    model, data = run_inputs
    out = tmp_path / "run"
    argv = train_argv(model, data, out, **RUN)
    proc = subprocess.Popen(
        [TIDPO, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    # Kill as soon as the first checkpoint is there (atomic saves: the folder appears complete).
    deadline = time.monotonic() + 150
    while not (out / "checkpoint-2").is_dir():
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 150 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    killed_at = int(Path(last_complete_checkpoint(str(out))).name.split("-")[1])
    assert killed_at < RUN["max_steps"]

    resumed = run_tidpo([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(out, uninterrupted)


def test_sigkill_in_the_middle_of_a_save_leaves_the_last_complete_checkpoint(
    run_inputs, uninterrupted, tmp_path
):
    model, data = run_inputs
    out = tmp_path / "run"
    argv = train_argv(model, data, out, **RUN)
    died = subprocess.run(
        [sys.executable, str(HELPERS / "die_during_save.py"), "4", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        env=subprocess_env(),
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    # The save of step 4 was cut off after the weights, before the trainer state...
    partial = out / "tmp-checkpoint-4"
    assert (partial / "model.safetensors").exists()
    assert not (partial / "trainer_state.json").exists()
    # ...so there is no checkpoint-4, and transformers' own lookup picks the complete checkpoint-2.
    assert not (out / "checkpoint-4").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = run_tidpo([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert not partial.exists(), "the leftover of the killed save was not cleaned up"
    assert_same_run(out, uninterrupted)


def test_commit_is_atomic_replaces_and_skips_incomplete_folders(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((1, True), (2, True), (3, False)):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("w")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (run / "tmp-checkpoint-4").mkdir()
    # checkpoint-3 lacks the file written last (a non-atomic writer was killed): never resumed from.
    with pytest.warns(UserWarning, match="checkpoint-3 has no trainer_state.json"):
        assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert last_complete_checkpoint(str(tmp_path / "absent")) is None

    # Saving step 2 again (a restart from checkpoint-1) replaces the old folder as a whole.
    staging = run / "tmp-checkpoint-2"
    staging.mkdir()
    (staging / "trainer_state.json").write_text('{"new": 1}')
    commit_checkpoint(str(staging), str(run / "checkpoint-2"))
    assert not staging.exists()
    assert sorted(p.name for p in (run / "checkpoint-2").iterdir()) == ["trainer_state.json"]
    assert (run / "checkpoint-2" / "trainer_state.json").read_text() == '{"new": 1}'

    assert remove_stale_staging(str(run)) == [str(run / "tmp-checkpoint-4")]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def make_config(tmp_path: Path, **overrides) -> TIDPOConfig:
    small = {"per_device_train_batch_size": 2, "max_steps": 3, "anchor_max_new_tokens": 4}
    return tiny_config(tmp_path, **{**small, "max_length": 48, "max_prompt_length": 24, **overrides})


def test_rotation_with_save_total_limit_keeps_only_complete_checkpoints(tmp_path, tiny_tok, pairs_dataset):
    args = make_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2)
    model = tiny_causal_lm("llama", tokenizer=tiny_tok)
    trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    trainer.train()
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    for name in ("checkpoint-3", "checkpoint-4"):
        for file in ("model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"):
            assert (run / name / file).is_file(), (name, file)


def test_same_seed_gives_identical_metrics_anchors_included(tmp_path, tiny_tok, pairs_dataset):
    histories = []
    for attempt in range(2):
        model = tiny_causal_lm("llama", tokenizer=tiny_tok, seed=0)
        args = make_config(tmp_path, output_dir=str(tmp_path / f"run{attempt}"))
        trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        histories.append(logs)
    first, second = histories
    assert len(first) == 3
    # The anchors moved the triplet distances off zero, so the comparison covers the sampled anchors.
    assert any(h["triplet/dist_pos"] > 0 for h in first)
    assert first == second  # every metric, exactly (no tolerance)


def _nan_token_and_row(tokenizer) -> tuple[int, int]:
    """A token id found only inside one pair's chosen response (not its last token), and that row."""
    row = 5
    ids = tokenizer(PAIRS[row]["chosen"])["input_ids"]
    others = set()
    for i, pair in enumerate(PAIRS):
        for field in ("prompt", "chosen", "rejected"):
            if (i, field) != (row, "chosen"):
                others.update(tokenizer(pair[field])["input_ids"])
    candidates = [t for t in ids[:-1] if t not in others]
    assert candidates, "test data changed: no token unique to the chosen response of row 5"
    return candidates[0], row


def test_nan_stops_the_run_naming_the_step_and_the_data_rows(tmp_path, tiny_tok, pairs_dataset):
    token, row = _nan_token_and_row(tiny_tok)
    model = tiny_causal_lm("llama", tokenizer=tiny_tok)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    # Batches of 8 hold every pair: the NaN row is in the first batch at some shuffled position.
    args = make_config(tmp_path, per_device_train_batch_size=8, max_steps=1, gamma=0.0)
    trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    with pytest.raises(NonFiniteError) as caught:
        trainer.train()
    message = str(caught.value)
    # The first guard the NaN reaches: the fused attribution's targets (its backward runs before the
    # log-probs are formed), or the log-probs themselves.
    assert ("attribution targets" in message or "log-probs" in message) and "at step 0" in message, message
    assert f"row ids [{row}]" in message, message  # the data row, whatever its place in the batch
    assert not math.isnan(float(trainer.model.lm_head.weight.detach().sum()))  # stopped before any update


def test_row_ids_name_rows_of_the_users_data_after_dropping(tmp_path, tiny_tok):
    """Dropped identical rows do not shift the ids: they stay row numbers of the data as given."""
    from datasets import Dataset

    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " blue."}, *PAIRS]
    args = make_config(tmp_path, drop_identical=True)
    with pytest.warns(UserWarning, match="dropped 1 row"):
        trainer = TIDPOTrainer(
            tiny_causal_lm("llama", tokenizer=tiny_tok),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tok,
        )
    assert trainer.train_dataset["tidpo_row_id"] == list(range(1, len(rows)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 3)])
    assert batch["row_ids"].tolist() == [1, 4]
