"""The run report: rendered from a saved trainer_state.json, and written by ReportCallback."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tidpo.evaluation.explain import TokenImportance
from tidpo.report import ReportCallback, find_log_history, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log_history(steps: int = 6) -> list[dict]:
    history = []
    for s in range(1, steps + 1):
        history.append(
            {
                "step": s,
                "epoch": s / steps,
                "loss": 0.69 - 0.05 * s,
                "grad_norm": 1.0 + 0.1 * s,
                "learning_rate": 5e-6 * (1 - s / steps),
                "rewards/chosen": 0.01 * s,
                "rewards/rejected": -0.01 * s,
                "rewards/margins": 0.02 * s,
                "rewards/accuracies": min(1.0, 0.5 + 0.08 * s),
                "logps/chosen": -40.0 + s,
                "logps/rejected": -42.0 - s,
                "weights/mean": 1.0,
                "weights/std": 0.4 + 0.01 * s,
                "weights/max": 3.0 + 0.2 * s,
                "weights/entropy": 2.9 - 0.01 * s,
                "triplet/loss": 0.1 - 0.01 * s,
                "triplet/dist_pos": 0.02 * s,
                "triplet/dist_neg": 0.03 * s,
                "kl/chosen": 0.001 * s,
                "kl/rejected": 0.002 * s,
            }
        )
        if s % 3 == 0:
            history.append(
                {
                    "step": s,
                    "epoch": s / steps,
                    "eval_loss": 0.7 - 0.04 * s,
                    "eval_rewards/accuracies": 0.5 + 0.05 * s,
                    "eval_rewards/margins": 0.015 * s,
                    "eval_runtime": 1.2,
                    "eval_samples_per_second": 10.0,
                }
            )
    history.append({"step": steps, "epoch": 1.0, "train_runtime": 12.3, "train_loss": 0.5, "total_flos": 0.0})
    return history


def _ti(scale: float) -> TokenImportance:
    tokens = [" Seek", " medical", " advice", " <now>", "."]
    weights = [1.0 + scale, 1.5, 0.5, 1.0, 1.0 - scale]
    return TokenImportance(
        tokens=tokens,
        weights=weights,
        attribution=[0.2] * 5,
        prior=[0.2] * 5,
        prompt="Should I self-medicate?",
    )


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_from_saved_trainer_state(tmp_path):
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 6, "log_history": _log_history()})
    )
    (tmp_path / "tidpo_config.json").write_text(json.dumps({"beta": 0.1, "lambda_importance": 0.7}))
    eval_results = {"rewards/accuracies": 0.75, "diversity/self_bleu": 30.1, "kl": 0.5}
    path = write_report(
        tmp_path,
        eval_results=eval_results,
        importance_snapshots={"start of training": [_ti(0.0)], "end of training": [_ti(0.5)]},
    )
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    images = _images(page)
    # loss, rewards, accuracy, weights, triplet, KL, logps, other metrics (eval_* overlaid)
    assert len(images) >= 8
    assert all(img.startswith(PNG_MAGIC) for img in images)
    for name in (
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "weights/mean",
        "weights/std",
        "weights/max",
        "weights/entropy",
        "triplet/loss",
        "kl/chosen",
        "kl/rejected",
        "eval_loss",
        "grad_norm",
        "learning_rate",
    ):
        assert name in page, name
    # the evaluation table, the config, the importance pictures (escaped tokens, both moments)
    assert "diversity/self_bleu" in page and "30.1" in page
    assert "lambda_importance" in page
    assert "start of training" in page and "end of training" in page
    assert "&lt;now&gt;" in page and "<now>" not in page
    assert page.count("class='ti-tok'") == 10
    # self-contained: no external resources
    assert not re.search(r"(src|href)=['\"](http|//)", page)
    # bookkeeping numbers are not plotted as curves
    assert "eval_runtime" not in page and "total_flos" not in page


def test_log_history_from_latest_checkpoint(tmp_path):
    for step in (2, 10):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": _log_history(step)}))
    history = find_log_history(tmp_path)
    assert history is not None and max(e["step"] for e in history) == 10
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "rewards/accuracies" in page and _images(page)


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing to report"):
        write_report(tmp_path / "empty")
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"trainer_state\.json: not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(ValueError, match="no 'log_history'"):
        write_report(tmp_path)


def test_report_callback_with_a_real_trainer(tmp_path):
    """A 2-step run of transformers' Trainer on the tiny model, with the callback attached."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok)
    ids = tok("The sky is blue. The grass is green.")["input_ids"]

    class LM(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            t = torch.tensor(ids)
            return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t}

    pairs = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "The grass is green.", "rejected": "The grass is blue."},  # implicit prompt
    ]
    callback = ReportCallback(pairs, tokenizer=tok)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=LM(), callbacks=[callback]).train()
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "start of training" in page and "end of training" in page
    assert page.count("<div class='pair'>") == 2
    assert "loss" in page and _images(page)
    # The weights changed with training (lr 1e-2): the two snapshots differ.
    start, end = callback.snapshots["start of training"], callback.snapshots["end of training"]
    assert [t.tokens for t in start] == [t.tokens for t in end]
    assert start[0].weights != end[0].weights
    assert "".join(start[1].tokens).startswith(" green.")


def test_report_callback_labels_a_resumed_start_and_can_defer_the_report(tmp_path):
    """A resumed run's first snapshot says so; write_on_train_end=False leaves the report to finish()."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    state = TrainerState(global_step=3)
    callback = ReportCallback(
        [{"prompt": "The sky is", "chosen": " blue."}], tokenizer=tok, write_on_train_end=False
    )
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    assert list(callback.snapshots) == ["resumed at step 3"]
    assert not (tmp_path / "run" / "report.html").exists()
    callback.eval_results = {"eval_loss": 0.6931}
    state.global_step = 5
    state.log_history = [
        {"loss": 0.7, "step": 2},
        {"loss": 0.69, "step": 4},
        {"train_loss": 0.685, "train_runtime": 1.5, "epoch": 1.0, "step": 5},
    ]
    callback.finish(args, state, model)
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "resumed at step 3" in page and "end of training" in page and "0.6931" in page
    # transformers' train_loss / train_runtime cover the resumed call's steps only: the summary says so.
    assert "train_loss (steps 4-5, since the resume)" in page
    assert "train_runtime (steps 4-5, since the resume)" in page


def test_an_eval_json_is_labelled_and_a_training_runs_report_leaves_it_out(tmp_path):
    """`tidpo eval --out run` leaves eval.json in the run folder: write_report(run) shows it, saying where
    it comes from; a training run's report (resumed there later, say) is not about that model."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 6, "log_history": _log_history()}))
    (run / "eval.json").write_text(json.dumps({"kl": 0.002353, "num_pairs": 2}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "<h2>Evaluation</h2>" in page and "0.002353" in page
    assert "From eval.json (written " in page and "by tidpo eval), not from the training run." in page

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok)
    args = TrainingArguments(output_dir=str(run), report_to=[], use_cpu=True)
    state = TrainerState(global_step=6, log_history=_log_history())
    callback = ReportCallback([{"prompt": "The sky is", "chosen": " blue."}], tokenizer=tok)
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<h2>Evaluation</h2>" not in page and "0.002353" not in page
    callback.eval_results = {"rewards/accuracies": 0.625}  # the run's own eval is shown, unlabelled
    callback.finish(args, state, model)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<h2>Evaluation</h2>" in page and "0.625" in page and "From eval.json" not in page


def test_named_eval_sets_join_their_train_panels(tmp_path):
    history = [
        {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5},
        {"step": 1, "eval_a_loss": 0.68, "eval_a_rewards/accuracies": 0.6, "eval_b_loss": 0.7},
        {"step": 1, "eval_b_rewards/accuracies": 0.4},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75},
    ]
    page = write_report(tmp_path, log_history=history).read_text(encoding="utf-8")
    accuracy = page[page.index("<h2>Reward accuracy</h2>") :].split("<h2>")[1]
    assert "eval_a_rewards/accuracies" in accuracy and "eval_b_rewards/accuracies" in accuracy
    loss = page[page.index("<h2>Loss</h2>") :].split("<h2>")[1]
    assert "eval_a_loss" in loss and "eval_b_loss" in loss
    assert "<h2>Evaluation curves</h2>" not in page  # nothing left over
