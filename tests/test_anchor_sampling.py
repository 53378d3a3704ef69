"""How many anchor tokens are decoded, and when: the horizon (Eq. 13 only reads an anchor up to the
longer of its pair's responses) and the anchors of accumulated micro-batches sampled in one loop."""

from __future__ import annotations

import pytest
import torch

from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.generation import sample_completion_ids
from tiny_setup import last_metrics, make_config, perturb, train_loss_and_grads


def _trainer(tiny_llama, tiny_tok, pairs_dataset, tmp_path, **overrides) -> TIDPOTrainer:
    args = make_config(tmp_path, **overrides)
    return TIDPOTrainer(tiny_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)


def _record_sampling(trainer: TIDPOTrainer) -> list[dict]:
    """Record every anchor decode loop of the trainer: its prompts, length, seed group and samples."""
    calls: list[dict] = []
    sample = trainer._sample_anchors

    def record(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs):
        ids = sample(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs)
        calls.append(
            dict(rows=prompt_ids.shape[0], length=max_new_tokens, group=kwargs.get("group"), ids=ids)
        )
        return ids

    trainer._sample_anchors = record
    return calls


def test_a_shorter_decode_is_the_longer_one_cut(tiny_llama, tiny_tok):
    """Token t depends on the tokens before it only: decoding fewer steps from the same seed gives the
    first tokens of the longer decode (what lets the trainer stop at the horizon)."""
    prompts = tiny_tok(
        ["The sky is", "A cat sat on the"], return_tensors="pt", padding=True, padding_side="left"
    )
    runs = {}
    for n in (4, 30):
        torch.manual_seed(11)
        runs[n] = sample_completion_ids(
            tiny_llama,
            prompts["input_ids"],
            prompts["attention_mask"],
            max_new_tokens=n,
            eos_token_id=tiny_tok.eos_token_id,
            pad_token_id=tiny_tok.pad_token_id,
        )
    assert runs[30].shape[1] > 4
    short = runs[4]
    assert torch.equal(short, runs[30][:, : short.shape[1]])


def test_horizon_and_valid_tokens_by_hand(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    trainer = _trainer(tiny_llama, tiny_tok, pairs_dataset, tmp_path, anchor_max_new_tokens=5)
    # Two pairs: chosen rows first, then rejected. Response lengths 3 / 6 and 2 / 1.
    completion_mask = torch.zeros(4, 9, dtype=torch.bool)
    for row, (start, length) in enumerate([(2, 3), (1, 2), (3, 6), (4, 1)]):
        completion_mask[row, start : start + length] = True
    horizon = trainer._anchor_horizon({"completion_mask": completion_mask})
    assert horizon.tolist() == [5, 2]  # max(3, 6) capped at anchor_max_new_tokens, max(2, 1)

    eos, t = tiny_tok.eos_token_id, 7  # any non-EOS token
    completion = torch.tensor([[t, t, eos, t, t, t], [t, t, t, t, t, t]])
    valid = trainer._anchor_valid(completion, horizon)
    # Row 0: up to and including its EOS (3 tokens, within 5); row 1: no EOS, cut at its horizon 2.
    assert valid.tolist() == [[True] * 3 + [False] * 3, [True] * 2 + [False] * 4]


def test_the_horizon_changes_no_loss_or_gradient(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    """Decoding to anchor_max_new_tokens and using every token gives the same loss, gradients and
    triplet distances as stopping at the horizon; only anchor/length (the tokens that count) differs."""
    trainer = _trainer(tiny_llama, tiny_tok, pairs_dataset, tmp_path, anchor_max_new_tokens=40)
    perturb(trainer.model, seed=2)
    calls = _record_sampling(trainer)
    loss, grads = train_loss_and_grads(trainer)
    cut = last_metrics(trainer)

    full = trainer._anchor_horizon
    trainer._anchor_horizon = lambda inputs: torch.full_like(full(inputs), 40)
    loss_full, grads_full = train_loss_and_grads(trainer)
    whole = last_metrics(trainer)

    # The tiny pairs' responses are a few tokens: the horizon decoded far fewer than 40.
    assert calls[0]["length"] < 20 and calls[1]["length"] == 40
    assert whole["anchor/length"] > cut["anchor/length"]
    assert cut["triplet/dist_pos"] > 0 and cut["triplet/dist_neg"] > 0
    assert loss == pytest.approx(loss_full, rel=1e-6)
    for key in ("triplet/loss", "triplet/dist_pos", "triplet/dist_neg"):
        assert cut[key] == pytest.approx(whole[key], rel=1e-5), key
    assert grads.keys() == grads_full.keys()
    for name in grads:
        # Float32 sums over anchors of different lengths: rounding-level differences only.
        torch.testing.assert_close(grads[name], grads_full[name], rtol=1e-5, atol=1e-6)


def _run(tiny_llama, tiny_tok, pairs_dataset, tmp_path, rows: int):
    """Three optimizer steps of 2 micro-batches x 2 pairs; argmax anchors (top_k = 1), so sampling
    together or apart must give the same anchors, hence the same run. Returns (losses, params, loops)."""
    trainer = _trainer(
        tiny_llama,
        tiny_tok,
        pairs_dataset,
        tmp_path / str(rows),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        anchor_top_k=1,
        anchor_max_new_tokens=12,
        anchor_sampling_rows=rows,
    )
    perturb(trainer.model, seed=2)
    calls = _record_sampling(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, params, [call["rows"] for call in calls]


def test_micro_batches_sampled_together_train_as_apart(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    import copy

    apart = _run(copy.deepcopy(tiny_llama), tiny_tok, pairs_dataset, tmp_path, rows=0)
    together = _run(tiny_llama, tiny_tok, pairs_dataset, tmp_path, rows=64)
    # One decode loop of 4 prompts per optimizer step, against one of 2 per micro-batch.
    assert together[2] == [4, 4, 4] and apart[2] == [2] * 6
    for a, b in zip(apart[0], together[0], strict=True):
        for key in ("loss", "triplet/loss", "triplet/dist_pos", "triplet/dist_neg", "anchor/length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert together[0][-1]["triplet/dist_pos"] > 0
    for name, value in apart[1].items():
        torch.testing.assert_close(together[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_groups_hold_at_most_anchor_sampling_rows(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    """4 micro-batches of 2 pairs, 4 rows per loop: two loops of 2 micro-batches each."""
    trainer = _trainer(
        tiny_llama,
        tiny_tok,
        pairs_dataset,
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        anchor_sampling_rows=4,
    )
    batches = list(trainer.get_train_dataloader())[:4]
    calls = _record_sampling(trainer)
    fetched, _ = trainer.get_batch_samples(iter(batches), 4, trainer.args.device)
    assert [(call["rows"], call["group"]) for call in calls] == [(4, 1), (4, 2)]
    for batch in fetched:
        horizon = trainer._anchor_horizon(batch)
        anchors = batch["anchor_ids"]
        assert anchors.shape[0] == 2 and 1 <= anchors.shape[1] <= int(horizon.max())
        # Trimmed to the last token that counts in some row.
        assert bool(trainer._anchor_valid(anchors, horizon)[:, -1].any())


def test_micro_batches_sampling_apart_get_seeds_of_their_own(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    """Two identical micro-batches of one step, each sampling its own anchors: different draws."""
    trainer = _trainer(
        tiny_llama, tiny_tok, pairs_dataset, tmp_path, per_device_train_batch_size=2, anchor_sampling_rows=0
    )
    batch = next(iter(trainer.get_train_dataloader()))
    fetched, _ = trainer.get_batch_samples(iter([dict(batch), dict(batch)]), 2, trainer.args.device)
    assert [b["anchor_group"] for b in fetched] == [0, -1]
    calls = _record_sampling(trainer)
    trainer.model.train()
    with torch.no_grad():
        for inputs in fetched:
            trainer.compute_loss(trainer.model, trainer._prepare_inputs(inputs))
    first, second = (call["ids"] for call in calls)
    assert first.shape[1] > 3 and not torch.equal(first, second)


def test_no_presampling_without_accumulation_or_triplet(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    for overrides in (
        dict(per_device_train_batch_size=2, anchor_sampling_rows=3),  # fewer rows than 2 micro-batches
        dict(per_device_train_batch_size=2, gamma=0.0),
    ):
        trainer = _trainer(tiny_llama, tiny_tok, pairs_dataset, tmp_path, **overrides)
        batches = list(trainer.get_train_dataloader())[:2]
        fetched, _ = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
        assert all("anchor_ids" not in batch for batch in fetched)


def test_negative_anchor_sampling_rows_is_refused(tmp_path):
    with pytest.raises(ValueError, match="anchor_sampling_rows=-1"):
        TIDPOConfig(output_dir=str(tmp_path), anchor_sampling_rows=-1, use_cpu=True)


def _favour(model, token: int) -> None:
    """Give the LM head a bias that makes ``token`` the policy's sure next token."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token] = 50.0
    model.lm_head = head


def test_anchors_stop_at_the_generation_configs_extra_stop_ids(tiny_llama, tiny_tok, pairs_dataset, tmp_path):
    """A chat model's end-of-turn id listed in its generation config ends an anchor, as in `generate`."""
    end_of_turn = tiny_tok.convert_tokens_to_ids("<|im_start|>")  # any id other than the tokenizer's EOS
    tiny_llama.generation_config.eos_token_id = [tiny_tok.eos_token_id, end_of_turn]
    _favour(tiny_llama, end_of_turn)
    trainer = _trainer(tiny_llama, tiny_tok, pairs_dataset, tmp_path, anchor_max_new_tokens=8)
    calls = _record_sampling(trainer)
    train_loss_and_grads(trainer)
    anchors = calls[0]["ids"]
    assert (anchors[:, 0] == end_of_turn).all()
    assert last_metrics(trainer)["anchor/length"] == 1.0  # the stop token and nothing after it
    horizon = torch.tensor([4, 4])
    completion = torch.tensor([[7, end_of_turn, 7, 7], [7, 7, 7, 7]])
    assert trainer._anchor_valid(completion, horizon).sum(1).tolist() == [2, 4]


def test_a_tokenizer_without_eos_trains_the_triplet_to_the_horizon(tmp_path):
    """No stop id at all (conversational data needs no EOS): anchors run to their horizon."""
    from datasets import Dataset

    from tidpo.models import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.eos_token = None
    model = tiny_causal_lm("llama", tokenizer=tok)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in [("The sky is", "blue", "green"), ("A cat sat on", "the mat", "the dog")] * 2
    ]
    args = make_config(tmp_path, anchor_max_new_tokens=5)
    trainer = TIDPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    loss, grads = train_loss_and_grads(trainer)
    assert loss > 0 and grads
    # Every anchor counts up to min(5, the longer response), none stops early.
    batch = next(iter(trainer.get_train_dataloader()))
    horizon = trainer._anchor_horizon(batch)
    assert last_metrics(trainer)["anchor/length"] == pytest.approx(horizon.float().mean().item())
