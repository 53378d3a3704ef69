"""End-to-end training on tiny in-process models: every loss type and importance mode trains."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import StaticCache, TrainerCallback

import tidpo.training.trainer
from conftest import PAIRS
from helpers.tiny_run import write_jsonl
from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.models import tiny_causal_lm
from tidpo.training.trainer import window_metrics
from tiny_setup import last_metrics, make_config, train_loss_and_grads

TRAIN_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_trained(trainer, before):
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no trainable parameter changed"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs, "nothing was logged"
    for entry in logs:
        for key in TRAIN_KEYS:
            assert key in entry, f"{key} missing from {sorted(entry)}"
            assert math.isfinite(entry[key]), (key, entry[key])
    return logs


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        ("ti_dpo", {}),
        ("dpo", {}),
        ("dpo", {"label_smoothing": 0.1}),
        ("ipo", {}),
        ("simpo", {}),
        ("tdpo1", {}),
        ("tdpo2", {}),
    ],
)
def test_every_loss_type_trains(tmp_path, tiny_tok, tiny_llama, pairs_dataset, loss_type, extra):
    args = make_config(tmp_path, loss_type=loss_type, **extra)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    before = params_snapshot(trainer.model)
    trainer.train()
    logs = assert_trained(trainer, before)
    if loss_type == "ti_dpo":
        for key in ("weights/mean", "weights/entropy", "triplet/loss", "triplet/dist_pos", "kl/chosen"):
            assert key in logs[-1] and math.isfinite(logs[-1][key])
        assert logs[-1]["weights/mean"] == pytest.approx(1.0, abs=1e-4)
    else:  # the baselines weight every token 1: no weight statistics to log
        assert not [k for k in logs[-1] if k.startswith("weights/")]
    # TDPO1 has no alpha (its KL difference enters with weight 1); the others default to the paper's 0.5.
    alpha = {"tdpo1": 1.0, "ti_dpo": 0.5, "tdpo2": 0.5}.get(loss_type, 0.0)
    assert trainer.args.kl_alpha == alpha and trainer.args.tdpo_alpha is None
    if loss_type == "simpo":
        assert trainer.ref_model is None


@pytest.mark.parametrize("attribution_pass", ["fused", "separate"])
def test_anchors_longer_than_the_pairs(tmp_path, tiny_tok, tiny_llama, pairs_dataset, attribution_pass):
    """An anchor budget (40 tokens) beyond every response: decoding stops at the longer response of each
    pair (nothing past it enters Eq. 13; tests/test_anchor_sampling.py checks the loss is unchanged)."""
    args = make_config(tmp_path, anchor_max_new_tokens=40, max_steps=1, attribution_pass=attribution_pass)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    before = params_snapshot(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    logs = assert_trained(trainer, before)
    # An untrained tiny model rarely samples EOS, so each anchor runs to its pair's horizon.
    horizon = trainer._anchor_horizon(batch).float().mean().item()
    assert 0.6 * horizon < logs[-1]["anchor/length"] <= horizon < 40


@pytest.mark.parametrize("mode", ["hybrid", "uniform", "random", "prior", "gradient", "softmax"])
def test_every_importance_mode_trains(tmp_path, tiny_tok, tiny_llama, pairs_dataset, mode):
    args = make_config(tmp_path, importance_mode=mode, gamma=0.0, tdpo_alpha=0.0)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    before = params_snapshot(trainer.model)
    trainer.train()
    logs = assert_trained(trainer, before)
    assert logs[-1]["weights/mean"] == pytest.approx(1.0, abs=1e-4)
    if mode == "uniform":
        assert logs[-1]["weights/std"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert logs[-1]["weights/std"] > 0


def weighted(ds, chosen: float, rejected: float):
    """A tokenised dataset with constant per-token weights (importance_mode='dataset')."""
    ds = ds.add_column("chosen_weights", [[chosen] * len(r) for r in ds["chosen_input_ids"]])
    return ds.add_column("rejected_weights", [[rejected] * len(r) for r in ds["rejected_input_ids"]])


def test_dataset_weights_mode(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, importance_mode="dataset", gamma=0.0, tdpo_alpha=0.0, max_steps=1)
    with pytest.raises(ValueError, match="train_dataset has no 'chosen_weights'"):
        TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    ds = weighted(TIDPOTrainer.prepare_dataset(pairs_dataset, tiny_tok, args), 2.0, 2.0)
    with pytest.raises(ValueError, match="eval_dataset has no 'chosen_weights'"):  # before any training
        TIDPOTrainer(
            tiny_llama, args=args, train_dataset=ds, eval_dataset=pairs_dataset, processing_class=tiny_tok
        )
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=ds, processing_class=tiny_tok)
    trainer.train()
    assert trainer.state.log_history[0]["weights/mean"] == pytest.approx(2.0)


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_uniform_ti_dpo_equals_dpo_on_a_batch(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """Spec §3: with all weights 1, no KL and no triplet, TI-DPO is exactly DPO."""
    losses = {}
    for loss_type in ("ti_dpo", "dpo"):
        args = make_config(
            tmp_path, loss_type=loss_type, importance_mode="uniform", gamma=0.0, tdpo_alpha=0.0
        )
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        # Move the policy away from the reference so the loss is not log(2) for both.
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
        trainer.model.train()
        losses[loss_type] = trainer.compute_loss(trainer.model, _first_batch(trainer)).item()
    assert losses["ti_dpo"] == pytest.approx(losses["dpo"], rel=1e-6)
    assert losses["dpo"] != pytest.approx(math.log(2), rel=1e-3)


@pytest.mark.parametrize(
    ("checkpointing", "full"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_fused_and_separate_attribution_agree(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, checkpointing, full
):
    """The fused attribution (one backward on the training forward) gives the separate pass's loss and
    parameter gradients, with and without gradient checkpointing. With ``full`` (KL + triplet) the two
    also take the two full-row anchor layouts: own forward (fused) and joined to the pairs' forward
    (separate); the prompt-cache layout is compared with both in tests/test_prompt_cache.py."""
    results = {}
    for attribution_pass in ("fused", "separate"):
        args = make_config(
            tmp_path,
            attribution_pass=attribution_pass,
            gamma=0.1 if full else 0.0,
            tdpo_alpha=0.5 if full else 0.0,
            gradient_checkpointing=checkpointing,
            anchor_prompt_cache=False,
        )
        model = copy.deepcopy(tiny_llama)
        trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        loss, grads = train_loss_and_grads(trainer)
        results[attribution_pass] = (loss, grads, last_metrics(trainer)["weights/std"])
        if full:  # the triplet term is live (not a zero hinge), so the anchors' path is compared too
            assert last_metrics(trainer)["triplet/loss"] > 0
            assert last_metrics(trainer)["kl/rejected"] > 0
    (l_f, g_f, s_f), (l_s, g_s, s_s) = results["fused"], results["separate"]
    assert l_f == pytest.approx(l_s, rel=1e-5)
    assert s_f == pytest.approx(s_s, rel=1e-4)
    assert g_f.keys() == g_s.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_s[name], rtol=1e-4, atol=1e-6)


def test_conversational_rows_train(tmp_path, tiny_tok, tiny_llama):
    rows = [
        {
            "prompt": [{"role": "user", "content": "The sky is"}],
            "chosen": [{"role": "assistant", "content": "blue."}],
            "rejected": [{"role": "assistant", "content": "green."}],
        },
        {
            "prompt": [{"role": "user", "content": "A cat sat on"}],
            "chosen": [{"role": "assistant", "content": "the mat."}],
            "rejected": [{"role": "assistant", "content": "the dog."}],
        },
    ] * 2
    args = make_config(tmp_path, max_steps=1)
    trainer = TIDPOTrainer(
        tiny_llama, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tok
    )
    before = params_snapshot(trainer.model)
    trainer.train()
    assert_trained(trainer, before)


def test_lora_uses_disabled_adapters_as_reference(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    from peft import LoraConfig

    args = make_config(tmp_path, max_steps=2)
    trainer = TIDPOTrainer(
        tiny_llama,
        args=args,
        train_dataset=pairs_dataset,
        processing_class=tiny_tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # no second model in memory
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    before = params_snapshot(trainer.model)
    assert all("lora_" in n for n in before)
    trainer.train()
    assert_trained(trainer, before)
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(base[name], p.detach()), f"base weight {name} changed under LoRA"


def test_precomputed_reference_logps_match_live_reference(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    losses = {}
    for precompute in (False, True):
        args = make_config(tmp_path, precompute_ref_logps=precompute, tdpo_alpha=0.0, gamma=0.0)
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(3)))
        if precompute:
            assert "ref_chosen_logps" in trainer.train_dataset.column_names
        trainer.model.train()
        losses[precompute] = trainer.compute_loss(trainer.model, _first_batch(trainer)).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_eval_logs_the_same_metric_names(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = TIDPOTrainer(
        tiny_llama,
        args=args,
        train_dataset=pairs_dataset,
        eval_dataset=pairs_dataset,
        processing_class=tiny_tok,
    )
    trainer.train()
    metrics = trainer.evaluate()
    for key in (
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_weights/entropy",
        "eval_triplet/loss",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key


def test_eval_metrics_are_per_pair_whatever_the_batch_size(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """Eval metrics are means over pairs (or tokens), not means of batch means: evaluating the same model
    in batches of 1, 3 (3 + 3 + 2, uneven) and 8 pairs logs the same numbers."""
    results = []
    for batch_size in (1, 3, 8):
        args = make_config(tmp_path, gamma=0.0, per_device_eval_batch_size=batch_size)
        model = copy.deepcopy(tiny_llama)
        with torch.no_grad():  # move the policy off the reference, so the rewards are not all 0
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        trainer = TIDPOTrainer(
            model,
            ref_model=copy.deepcopy(tiny_llama),  # the trainer freezes its reference: never the fixture
            args=args,
            train_dataset=pairs_dataset,
            eval_dataset=pairs_dataset,
            processing_class=tiny_tok,
        )
        results.append(trainer.evaluate())
    per_pair = results[0]
    n_pairs = len(pairs_dataset)
    accuracy = per_pair["eval_rewards/accuracies"]
    assert 0 < accuracy < 1 and accuracy * n_pairs == pytest.approx(round(accuracy * n_pairs))
    keys = [k for k in per_pair if "/" in k]  # rewards/*, logps/*, logits/*, weights/*, kl/*
    assert {"eval_rewards/accuracies", "eval_weights/std", "eval_weights/max", "eval_kl/chosen"} <= set(keys)
    for other in results[1:]:
        for key in [*keys, "eval_loss"]:
            assert other[key] == pytest.approx(per_pair[key], rel=1e-4, abs=1e-6), key


def test_eval_metrics_take_the_eval_set_name(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """Several eval sets (a dict) or a custom prefix name every metric, as `Trainer` names eval_loss."""
    args = make_config(tmp_path, gamma=0.0, max_steps=1, eval_strategy="steps", eval_steps=1)
    half = pairs_dataset.select(range(4))
    trainer = TIDPOTrainer(
        tiny_llama,
        args=args,
        train_dataset=pairs_dataset,
        eval_dataset={"all": pairs_dataset, "half": half},
        processing_class=tiny_tok,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if any(k.endswith("_loss") for k in h if k != "loss")]
    names = set().union(*evals)
    assert {"eval_all_loss", "eval_all_rewards/accuracies", "eval_half_rewards/margins"} <= names
    assert not [k for k in names if k.startswith("eval_rewards") or k.startswith("eval_weights")]
    test = trainer.evaluate(half, metric_key_prefix="test")
    assert "test_loss" in test and "test_rewards/accuracies" in test
    assert not [k for k in test if k.startswith("eval_")]


def test_window_metrics_pool_batches_by_hand():
    # Two batches: 3 of 4 pairs right, then 1 of 2; token weights [1, 2, 3] then [5].
    stats = {
        "rewards/accuracies": [(3.0, 4.0), (1.0, 2.0)],
        "weights/mean": [(6.0, 3.0), (5.0, 1.0)],
        "weights/_sq": [(14.0, 3.0), (25.0, 1.0)],
        "weights/max": [(3.0, 1.0), (5.0, 1.0)],
        "nonfinite/skipped": [(1.0, 1.0), (2.0, 1.0)],
        "kl/chosen": [],
    }
    out = window_metrics(stats)
    assert out["rewards/accuracies"] == pytest.approx(4 / 6)
    assert out["weights/mean"] == pytest.approx(2.75)
    # Sample std of [1, 2, 3, 5]: squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75, over 3.
    assert out["weights/std"] == pytest.approx(math.sqrt(8.75 / 3))
    assert out["weights/max"] == 5.0 and out["nonfinite/skipped"] == 2.0
    assert "weights/_sq" not in out and "kl/chosen" not in out


class StopAt(TrainerCallback):
    """Ends training after a given step, as an interrupted run would (the checkpoint is already saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_at_the_saved_step(tmp_path, tiny_tok, pairs_dataset):
    def run(out, resume=None, stop_at=None):
        model = tiny_causal_lm("llama", tokenizer=tiny_tok, seed=0)
        args = make_config(
            tmp_path,
            output_dir=str(tmp_path / out),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            per_device_train_batch_size=2,
        )
        callbacks = [StopAt(stop_at)] if stop_at else None
        trainer = TIDPOTrainer(
            model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok, callbacks=callbacks
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    interrupted = run("partial", stop_at=2)
    assert interrupted.state.global_step == 2
    resumed = run("partial", resume=str(tmp_path / "partial" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # the log of steps 1-2 comes back from the checkpoint
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_losses == pytest.approx(full_losses, rel=1e-5)
    for (n, p_full), (_, p_res) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_full, p_res, rtol=1e-5, atol=1e-6, msg=n)


def test_nan_in_logits_stops_with_the_step(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, max_steps=1)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    with torch.no_grad():
        trainer.model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        trainer.train()


def test_nan_batches_can_be_skipped_and_counted(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, max_steps=1, skip_nonfinite_batches=True)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    with torch.no_grad():
        trainer.model.lm_head.weight[5, 0] = float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        trainer.train()
    assert trainer.state.log_history[0]["nonfinite/skipped"] == 1.0
    # The skipped batch's zero loss only carried a zero gradient: no loss is known for the step.
    assert math.isnan(trainer.state.log_history[0]["loss"])
    assert math.isnan(trainer.state.log_history[-1]["train_loss"])


def test_reentrant_checkpointing_needs_the_separate_attribution_pass(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    reentrant = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"use_reentrant.*attribution_pass=.separate."):
        make_config(tmp_path, **reentrant)
    make_config(tmp_path, importance_mode="prior", **reentrant)  # no attribution: nothing to refuse
    args = make_config(tmp_path, attribution_pass="separate", max_steps=1, **reentrant)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    before = params_snapshot(trainer.model)
    trainer.train()
    assert_trained(trainer, before)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("beta", 0.0),
        ("lambda_importance", 1.5),
        ("loss_type", "kto"),
        ("importance_mode", "attention"),
        ("gamma", -1.0),
        ("anchor_top_p", 0.0),
        ("label_smoothing", 0.2),
        ("beta", "0.1"),  # a string from a hand-written dict fails here, naming the option
        ("beta", math.inf),
        ("gamma", math.nan),
        ("simpo_gamma", -5.0),
        ("sigma_div", math.inf),
        ("anchor_temperature", math.inf),
        ("lambda_importance", None),
        ("max_length", "128"),
        ("anchor_max_new_tokens", 2.5),
        ("anchor_top_k", 2.5),
        ("disable_dropout", "false"),  # would count as True
        ("share_prompt", "no"),
        ("remove_unused_columns", True),  # the collator needs the tokenised columns
    ],
)
def test_invalid_config_raises_naming_the_option(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"invalid {option}="):
        TIDPOConfig(output_dir=str(tmp_path), **{option: value})


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("precompute_ref_log_probs", "tidpo's name is precompute_ref_logps"),  # TRL's name
        ("max_completion_length", "max_length bounds prompt + response, max_prompt_length the prompt"),
        ("betta", "did you mean 'beta'?"),
    ],
)
def test_unknown_options_are_refused_with_what_to_use(tmp_path, option, hint):
    with pytest.raises(TypeError, match=re.escape(f"unknown option(s) '{option}' ({hint})")):
        TIDPOConfig(output_dir=str(tmp_path), **{option: 1})


def test_numpy_scalars_and_0_1_flags_are_stored_as_python_values(tmp_path):
    import numpy as np

    config = TIDPOConfig(
        output_dir=str(tmp_path), beta=np.float32(0.25), max_length=np.int64(64), max_prompt_length=32,
        share_prompt=np.bool_(True), drop_identical=1,
    )  # fmt: skip
    values = (config.beta, config.max_length, config.share_prompt, config.drop_identical)
    assert values == (0.25, 64, True, True)
    assert [type(v) for v in values] == [float, int, bool, bool]
    assert '"beta": 0.25' in config.to_json_string()  # numpy scalars would not serialise
    with pytest.raises(ValueError, match="invalid drop_identical=2"):
        TIDPOConfig(output_dir=str(tmp_path), drop_identical=2)


def test_the_kl_weight_follows_the_loss_type_of_a_copied_config(tmp_path):
    """tdpo_alpha keeps what was given (None: the loss type's own weight), so a config copied with
    another loss_type gets that loss type's weight, not the first one's."""
    config = TIDPOConfig(output_dir=str(tmp_path))
    assert (config.tdpo_alpha, config.kl_alpha) == (None, 0.5)
    assert dataclasses.replace(config, loss_type="tdpo1").kl_alpha == 1.0
    tdpo1 = TIDPOConfig(output_dir=str(tmp_path), loss_type="tdpo1")
    assert (tdpo1.kl_alpha, dataclasses.replace(tdpo1, loss_type="ti_dpo").kl_alpha) == (1.0, 0.5)
    assert dataclasses.replace(config, loss_type="dpo").kl_alpha == 0.0
    assert TIDPOConfig(output_dir=str(tmp_path), tdpo_alpha=0.2, loss_type="tdpo2").kl_alpha == 0.2
    with pytest.warns(UserWarning, match=r"tdpo_alpha=0.3 .*TDPO1's KL difference enters with weight 1"):
        assert TIDPOConfig(output_dir=str(tmp_path), loss_type="tdpo1", tdpo_alpha=0.3).kl_alpha == 1.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_static_cache_anchors_give_the_same_step(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, checkpointing
):
    """Anchors decoded into the kept static cache (what CUDA runs use by default) are the dynamic
    cache's anchors: same loss and triplet metrics on the same batch, and the cache is reused; also
    with gradient checkpointing (sampling runs in eval mode, the cache still applies)."""
    results = {}
    for static in (False, True):
        args = make_config(
            tmp_path,
            gamma=0.1,
            tdpo_alpha=0.5,
            anchor_static_cache=static,
            gradient_checkpointing=checkpointing,
        )
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
        if checkpointing:  # what Trainer.train() does with gradient_checkpointing=True
            trainer.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            assert trainer.model.is_gradient_checkpointing
        trainer.model.train()
        batch = _first_batch(trainer)
        loss = trainer.compute_loss(trainer.model, batch).item()
        caches = dict(trainer._anchor_caches)
        trainer.compute_loss(trainer.model, batch)
        assert trainer._anchor_caches == caches  # the same objects, kept across steps
        assert bool(caches) == static
        results[static] = (
            loss,
            window_metrics({"d": trainer._metrics["train"]["triplet/dist_pos"][:1]})["d"],
        )
    assert results[True] == pytest.approx(results[False], rel=1e-6)


def test_static_cache_failure_says_how_to_turn_it_off(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, gamma=0.1, anchor_static_cache=True)
    trainer = TIDPOTrainer(
        copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    batch = _first_batch(trainer)
    trainer.model.train()

    forward = trainer.model.forward

    def no_static_cache(*args, **kwargs):  # fault injection: a model that cannot decode into a static cache
        if any(isinstance(v, StaticCache) for v in kwargs.values()):
            raise RuntimeError("static cache unsupported by this model")
        return forward(*args, **kwargs)

    trainer.model.forward = no_static_cache
    with pytest.raises(RuntimeError, match="unsupported") as info:
        trainer.compute_loss(trainer.model, batch)
    assert any("anchor_static_cache=False" in note for note in getattr(info.value, "__notes__", []))


def test_prepare_dataset_picks_the_split(tmp_path, tiny_tok, pairs_dataset):
    from datasets import DatasetDict

    args = make_config(tmp_path)
    both = DatasetDict({"train": pairs_dataset, "test": pairs_dataset.select(range(2))})
    assert len(TIDPOTrainer.prepare_dataset(both, tiny_tok, args)) == len(pairs_dataset)
    assert len(TIDPOTrainer.prepare_dataset(both, tiny_tok, args, split="test")) == 2


def test_a_model_with_nothing_to_train_is_refused(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """A LoRA adapter loaded frozen (PeftModel.from_pretrained without is_trainable) would train nothing."""
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = tmp_path / "adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(copy.deepcopy(tiny_llama), lora).save_pretrained(folder)
    frozen = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), folder)
    with pytest.raises(ValueError, match="no trainable parameter: its LoRA adapters were loaded frozen"):
        TIDPOTrainer(
            frozen, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tiny_tok
        )
    trainable = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), folder, is_trainable=True)
    TIDPOTrainer(
        trainable, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    tiny_llama.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter has requires_grad=False"):
        TIDPOTrainer(
            tiny_llama, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tiny_tok
        )


def test_predict_returns_the_eval_metrics_and_keeps_them_apart(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, gamma=0.0)
    trainer = TIDPOTrainer(
        tiny_llama,
        args=args,
        train_dataset=pairs_dataset,
        eval_dataset=pairs_dataset,
        processing_class=tiny_tok,
    )
    first = trainer.evaluate()
    out = trainer.predict(PAIRS[:2])  # raw rows, as the constructor takes them
    assert {"test_loss", "test_rewards/accuracies", "test_weights/std"} <= set(out.metrics)
    again = trainer.evaluate()  # predict's batches did not leak into this one
    assert again["eval_rewards/margins"] == pytest.approx(first["eval_rewards/margins"], rel=1e-6)
    from_path = trainer.evaluate(str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)))
    assert from_path["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)


def test_the_end_of_training_summary_holds_no_partial_window(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """4 steps logged every 3: the last step's metrics are not passed off as the run's in the summary."""
    args = make_config(tmp_path, max_steps=4, logging_steps=3, per_device_train_batch_size=2, gamma=0.0)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    result = trainer.train()
    assert "train_loss" in result.metrics
    assert not [k for k in result.metrics if "/" in k], result.metrics


def test_a_model_object_without_a_tokenizer_says_to_pass_one(tmp_path, tiny_llama, pairs_dataset):
    tiny_llama.config._name_or_path = ""
    with pytest.raises(ValueError, match="Pass processing_class="):
        TIDPOTrainer(tiny_llama, args=make_config(tmp_path), train_dataset=pairs_dataset)


def _with_attention_dropout(model, rate: float):
    model.config.attention_dropout = rate
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = rate
    return model


def test_attention_dropout_is_off_by_default_and_never_reaches_the_attribution(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    """Spec section 2: the attribution runs without dropout. disable_dropout also zeroes Llama's
    attention_dropout rate; with disable_dropout=False the fused pass gives way to the eval-mode pass,
    so both attribution settings give the same weights."""
    from tidpo.training.trainer import _dropout_active

    trainer = TIDPOTrainer(
        _with_attention_dropout(copy.deepcopy(tiny_llama), 0.3),
        args=make_config(tmp_path),
        train_dataset=pairs_dataset,
        processing_class=tiny_tok,
    )
    assert not _dropout_active(trainer.model) and trainer.model.config.attention_dropout == 0.0
    stds = {}
    for attribution_pass in ("fused", "separate"):
        args = make_config(tmp_path, disable_dropout=False, gamma=0.0, attribution_pass=attribution_pass)
        trainer = TIDPOTrainer(
            _with_attention_dropout(copy.deepcopy(tiny_llama), 0.3),
            args=args,
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
        )
        assert _dropout_active(trainer.model)
        train_loss_and_grads(trainer)
        stds[attribution_pass] = last_metrics(trainer)["weights/std"]
    assert stds["fused"] == pytest.approx(stds["separate"], rel=1e-6)


@pytest.mark.parametrize(
    ("weights", "checkpointing"), [("bfloat16", False), ("bfloat16", True), ("float32", True)]
)
def test_bf16_mixed_precision_trains_and_starts_at_zero_kl(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, weights, checkpointing
):
    """bf16 autocast (accelerate wraps the forward; the trainer keeps its outputs' dtype): the fused
    attribution's output-layer call and the checkpointed KL's reference head run in the forward's
    precision, so a bf16 model trains and, with the policy equal to the reference, step 1 has KL 0 and
    loss log 2 (up to rounding: on CPUs without AVX-512 the grad and no-grad bf16 forwards can differ in
    the last bits, KL ~4e-10, where a forward outside the autocast gives ~1e-6)."""
    args = make_config(
        tmp_path, bf16=True, gamma=0.0, max_steps=1, gradient_checkpointing=checkpointing, learning_rate=1e-3
    )
    model = copy.deepcopy(tiny_llama).to(getattr(torch, weights))
    trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    trainer.train()
    first = trainer.state.log_history[0]
    assert abs(first["kl/chosen"]) < 1e-8 and abs(first["kl/rejected"]) < 1e-8, first
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["weights/std"] > 0


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_gradients_behind_a_finite_loss_never_reach_the_weights(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, skip
):
    """Per-token weights of 3e38: at step 0 the log-ratios are 0, so the loss is log 2, but the
    gradients overflow. The step stops the run (or, with skip_nonfinite_batches, is not applied)."""
    args = make_config(
        tmp_path,
        importance_mode="dataset",
        gamma=0.0,
        tdpo_alpha=0.0,
        max_steps=1,
        skip_nonfinite_batches=skip,
    )
    ds = weighted(TIDPOTrainer.prepare_dataset(pairs_dataset, tiny_tok, args), 3e38, 1.0)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=ds, processing_class=tiny_tok)
    if not skip:
        with pytest.raises(FloatingPointError, match="gradient norm is nan at step 0"):
            trainer.train()
        return
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[0]["nonfinite/skipped"] == 1.0


def test_gamma_given_to_a_baseline_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"gamma=1.0 is the triplet weight.*simpo_gamma"):
        TIDPOConfig(output_dir=str(tmp_path), loss_type="simpo", gamma=1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "dpo", "importance_mode": "prior"}, "importance_mode='prior' weights the tokens"),
        ({"loss_type": "ipo", "tdpo_alpha": 0.2}, "tdpo_alpha=0.2 is the sequential KL weight"),
        ({"loss_type": "ti_dpo", "simpo_gamma": 1.0}, "simpo_gamma=1.0 is the target margin"),
        (
            {"loss_type": "ti_dpo", "gamma": 0.0, "anchor_top_k": 10},
            "anchor_top_k=10 is not used: it samples the triplet term's",
        ),
        ({"loss_type": "ti_dpo", "gamma": 0.0, "triplet_margin": 0.5}, "triplet_margin=0.5 is not used"),
        ({"loss_type": "dpo", "anchor_max_new_tokens": 8}, "anchor_max_new_tokens=8 is not used"),
        (
            {"loss_type": "ti_dpo", "importance_mode": "uniform", "lambda_importance": 0.5},
            "lambda_importance=0.5 is not used: it mixes attribution and prior",
        ),
        (
            {"loss_type": "ti_dpo", "importance_mode": "uniform", "sigma_div": 2.0},
            "sigma_div=2.0 is not used",
        ),
        (
            {"loss_type": "ti_dpo", "importance_mode": "prior", "attribution_pass": "separate"},
            "attribution_pass='separate' is not used",
        ),
    ],
)
def test_options_a_loss_does_not_read_are_warned_about(tmp_path, options, message):
    with pytest.warns(UserWarning, match=re.escape(message) + ".*(does not use it|does without)") as caught:
        TIDPOConfig(output_dir=str(tmp_path), **options)
    assert {w.filename for w in caught if "TIDPOConfig" in str(w.message)} == {__file__}  # the caller's line
    with warnings.catch_warnings(record=True) as caught:  # defaults, and a copy of a config: quiet
        warnings.simplefilter("always")
        dataclasses.replace(TIDPOConfig(output_dir=str(tmp_path), loss_type=options["loss_type"]))
    assert not [w for w in caught if "does not use it" in str(w.message) or "is not used" in str(w.message)]


def test_random_weights_follow_the_data_rows(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    # The random-weights ablation draws per data row, side and step (one draw per step would give every
    # micro-batch, rank and eval batch of the same shape the same weights): a pair keeps its weights in
    # another batch of that step, chosen and rejected differ, and the next step draws anew.
    args = make_config(tmp_path, importance_mode="random", gamma=0.0, tdpo_alpha=0.0)
    trainer = TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    data = trainer.train_dataset
    captured = []
    real = tidpo.training.trainer.importance_weights

    def spy(*a, **kw):
        captured.append(real(*a, **kw))
        return captured[-1]

    def weights_of(indices):
        batch = trainer.data_collator([data[i] for i in indices])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tidpo.training.trainer, "importance_weights", spy)
            trainer.compute_loss(trainer.model, batch)
        return captured[-1], batch["completion_mask"].bool()

    a, mask_a = weights_of([0, 1])
    c, _ = weights_of([1, 0])  # the same pairs in another order: each row keeps its draws
    torch.testing.assert_close(c[[1, 0, 3, 2]], a)
    assert not torch.equal(a[0], a[2]) or not torch.equal(mask_a[0], mask_a[2])  # chosen vs rejected
    trainer.state.global_step += 1
    d, _ = weights_of([0, 1])
    assert not torch.allclose(d, a)


def test_torch_compile_trains_ti_dpo_as_uncompiled(tmp_path, tiny_tok, pairs_dataset, caplog):
    # TrainingArguments' torch_compile: the fused attribution cannot take its gradient through a compiled
    # forward (one autograd node), so it falls back to the separate pass; same losses as without compile.
    # aot_eager: AOTAutograd's graph like inductor's, without the code generation.
    losses = {}
    for compiled in (False, True):
        args = make_config(
            tmp_path / str(compiled),
            gamma=0.0,
            torch_compile=compiled,
            torch_compile_backend="aot_eager" if compiled else None,
        )
        model = tiny_causal_lm(tokenizer=tiny_tok)
        trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
        with caplog.at_level("WARNING", logger="tidpo.training.trainer"):
            trainer.train()
        assert ("the model is compiled (torch_compile)" in caplog.text) is compiled
        losses[compiled] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_lora_dropout_that_disable_dropout_zeroes_is_warned_about(tmp_path, tiny_tok, pairs_dataset, caplog):
    from peft import LoraConfig

    def trainer(lora_dropout, **options):
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout)
        model = tiny_causal_lm(tokenizer=tiny_tok)
        args = make_config(tmp_path, gamma=0.0, max_steps=1, **options)
        return TIDPOTrainer(
            model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok, peft_config=lora
        )

    with pytest.warns(UserWarning, match=r"lora_dropout=0.05 has no effect: disable_dropout=True") as caught:
        zeroed = trainer(0.05)
    assert [w.filename for w in caught if "lora_dropout" in str(w.message)] == [__file__]  # the caller's line
    assert all(m.p == 0 for m in zeroed.model.modules() if isinstance(m, torch.nn.Dropout))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(0.0)
        kept = trainer(0.05, disable_dropout=False)
    assert any(m.p == 0.05 for m in kept.model.modules() if isinstance(m, torch.nn.Dropout))
    # Kept, the dropout makes the fused attribution run as its own pass: a visible warning, once.
    with caplog.at_level("WARNING", logger="tidpo.training.trainer"):
        kept.train()
    assert caplog.text.count("the model has active dropout (disable_dropout=False)") == 1


def test_a_reference_with_another_vocabulary_is_refused(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    from tidpo.models import tiny_tokenizer

    other = tiny_causal_lm(tokenizer=tiny_tokenizer(vocab_size=400))
    assert other.config.vocab_size != tiny_llama.config.vocab_size
    args = make_config(tmp_path, tdpo_alpha=0.0)  # no KL: nothing else would notice
    with pytest.raises(
        ValueError, match=r"ref_model has a vocabulary of \d+ tokens and the policy one of \d+"
    ):
        TIDPOTrainer(
            tiny_llama, ref_model=other, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )


def test_tokens_the_model_has_no_embedding_for_are_refused_up_front(tmp_path, tiny_llama, pairs_dataset):
    """A pad token added to the tokenizer without resizing the model: a clear error at construction,
    not an IndexError in the first forward."""
    from tidpo.data import PreferenceDataError
    from tidpo.models import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = tiny_llama.get_input_embeddings().num_embeddings
    tok.add_special_tokens({"pad_token": "<new-pad>"})
    assert tok.pad_token_id >= rows
    with pytest.raises(
        PreferenceDataError, match=rf"train_dataset: the pad token id {tok.pad_token_id} is outside"
    ):
        TIDPOTrainer(
            tiny_llama, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tok
        )
    tiny_llama.resize_token_embeddings(len(tok))  # the fix the message names
    TIDPOTrainer(tiny_llama, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tok)


def test_half_precision_trainable_weights_are_warned_about(tmp_path, tiny_tok, pairs_dataset):
    """bf16 weights trained in place lose most small updates to rounding; LoRA adapters (float32 in
    PEFT) on a bf16 base do not."""
    import warnings

    from peft import LoraConfig

    args = make_config(tmp_path, loss_type="dpo")
    bf16 = tiny_causal_lm(tokenizer=tiny_tok).to(torch.bfloat16)
    with pytest.warns(
        UserWarning, match=r"trainable weights are stored in torch.bfloat16.*learning rates \(here 0.01\)"
    ):
        TIDPOTrainer(bf16, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TIDPOTrainer(
            tiny_causal_lm(tokenizer=tiny_tok).to(torch.bfloat16),
            args=args,
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
            peft_config=lora,
        )
    assert not [w for w in caught if "trainable weights are stored" in str(w.message)]


def test_float_dropout_rates_are_off_too(tmp_path, tiny_tok, pairs_dataset):
    # OPT-style models keep their dropout rates as floats (`dropout`, `activation_dropout`, `layerdrop`)
    # and call the functional dropout: disable_dropout must zero them (training forwards deterministic,
    # as the fused attribution needs), and with disable_dropout=False they must count as active dropout.
    from transformers import OPTConfig, OPTForCausalLM

    from tidpo.training.trainer import _dropout_active

    def opt():
        torch.manual_seed(0)
        config = OPTConfig(
            vocab_size=len(tiny_tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.3, activation_dropout=0.3,
            layerdrop=0.3, pad_token_id=tiny_tok.pad_token_id,
        )  # fmt: skip
        return OPTForCausalLM(config)

    assert _dropout_active(opt())
    trainer = TIDPOTrainer(
        opt(), args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    assert trainer.model.config.dropout == 0.3  # the saved config keeps the model's own rates
    for model in (trainer.model, trainer.ref_model):
        assert not _dropout_active(model)
        model.train()
        ids = torch.randint(5, 90, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
            )
    args = make_config(tmp_path, disable_dropout=False)
    trainer = TIDPOTrainer(opt(), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    assert _dropout_active(trainer.model)


def test_a_smaller_last_micro_batch_weighs_by_its_pairs(tmp_path, tiny_tok, pairs_dataset):
    # 8 pairs as micro-batches of 3 + 3 + 2 in one optimizer step = one batch of 8 (SGD: the update is
    # the gradient); a plain mean per micro-batch would weigh the 2 pairs as much as the 3.
    assert len(pairs_dataset) == 8
    params = {}
    for batch, accumulation in ((8, 1), (3, 3)):
        args = make_config(
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=-1,
            num_train_epochs=1,
            gamma=0.0,
            optim="sgd",
            learning_rate=0.5,
        )
        model, ref = tiny_causal_lm(tokenizer=tiny_tok), tiny_causal_lm(tokenizer=tiny_tok, seed=1)
        trainer = TIDPOTrainer(
            model, ref_model=ref, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )  # a reference apart from the policy: the pairs' losses differ
        trainer.train()
        assert trainer.state.global_step == 1
        params[batch] = params_snapshot(trainer.model)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        params[f"loss{batch}"] = losses[0]
    assert params["loss3"] == pytest.approx(params["loss8"], rel=1e-5)
    for name, value in params[8].items():
        torch.testing.assert_close(params[3][name], value, rtol=0, atol=2e-6, msg=name)


def test_trl_trainer_arguments_that_do_not_apply_are_refused_or_warned(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    args = make_config(tmp_path, gamma=0.0)
    # TRL's positional order puts data_collator before train_dataset: only keywords after args.
    with pytest.raises(TypeError, match="positional"):
        TIDPOTrainer(tiny_llama, None, args, pairs_dataset)
    # No predictions reach compute_metrics: refused when given, and when set afterwards.
    with pytest.raises(ValueError, match=r"compute_metrics is not supported.*on_evaluate"):
        TIDPOTrainer(
            tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok, compute_metrics=len
        )
    trainer = TIDPOTrainer(
        tiny_llama,
        args=args,
        train_dataset=pairs_dataset,
        eval_dataset=pairs_dataset,
        processing_class=tiny_tok,
    )
    trainer.compute_metrics = len
    with pytest.raises(ValueError, match="compute_metrics is not supported"):
        trainer.evaluate()
    # model_init_kwargs only apply to models given by name.
    kwargs_args = make_config(tmp_path, gamma=0.0, model_init_kwargs={"dtype": "bfloat16"})
    with pytest.warns(UserWarning, match="model_init_kwargs apply to models given by name"):
        TIDPOTrainer(tiny_llama, args=kwargs_args, train_dataset=pairs_dataset, processing_class=tiny_tok)


def test_a_collator_of_another_layout_is_refused_at_construction(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tidpo.data import PreferenceCollator

    args = make_config(tmp_path, gamma=0.0)
    with pytest.raises(ValueError, match=r"data_collator failed on row 0 .*PreferenceCollator returns"):
        TIDPOTrainer(
            tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok,
            data_collator=DataCollatorForPreference(pad_token_id=tiny_tok.pad_token_id),
        )  # fmt: skip
    with pytest.raises(
        ValueError, match="the data_collator's batch has no completion_mask, prompt_input_ids"
    ):
        TIDPOTrainer(
            tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok,
            data_collator=lambda rows: {"input_ids": None, "attention_mask": None},
        )  # fmt: skip
    # tidpo's own collator, passed explicitly, is fine
    TIDPOTrainer(
        tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok,
        data_collator=PreferenceCollator(pad_token_id=tiny_tok.pad_token_id),
    )  # fmt: skip
