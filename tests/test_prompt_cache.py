"""The prompt-cache paths (tidpo.prompt_cache) compute what full rows compute: the anchors reading the
chosen rows' prompt keys, and pair rows continuing a shared prompt prefix (share_prompt)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma2Config, GPTNeoXConfig, MistralConfig

from tidpo import TIDPOTrainer
from tidpo.data import PreferenceCollator
from tidpo.prompt_cache import (
    CHECKED_MODEL_TYPES,
    CHECKPOINTING_MODEL_TYPES,
    PromptKV,
    continuation_inputs,
    keep_cache_when_checkpointing,
    prompt_cache_unsupported,
    rows_start_with_prompts,
    split_shared_prompt,
)
from tiny_setup import COMMON, CONFIGS, VOCAB, build, last_metrics, make_config, train_loss_and_grads


def test_every_checked_architecture_has_a_test():
    assert set(CONFIGS) == set(CHECKED_MODEL_TYPES)


def test_continuation_inputs_by_hand():
    attn, pos = continuation_inputs(torch.tensor([2, 3]), 3, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert attn.tolist() == [[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[2, 3, 4], [3, 4, 5]]


def test_split_shared_prompt_by_hand():
    # Pair 0: prompt [5, 6, 7], chosen response [8, 9], rejected [3]; pair 1: prompt [4, 2], chosen [1],
    # rejected [7, 7, 7]. Rows right-padded with 0.
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [4, 2, 1, 0, 0, 0], [5, 6, 7, 3, 0, 0], [4, 2, 7, 7, 7, 0]])
    attn = (ids > 0).long()
    cmask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    sp = split_shared_prompt(ids, attn, cmask, torch.tensor([3, 2]))
    assert sp.prefix_ids.tolist() == [[5, 6], [4, 2]] and sp.prefix_mask.tolist() == [[1, 1], [1, 0]]
    assert sp.starts.tolist() == [2, 1, 2, 1]
    assert sp.ids.tolist() == [[7, 8, 9, 0], [2, 1, 0, 0], [7, 3, 0, 0], [2, 7, 7, 7]]
    assert sp.valid.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert sp.completion.long().tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert sp.gather(ids.float() * 10).tolist() == [
        [70, 80, 90, 0],
        [20, 10, 0, 0],
        [70, 30, 0, 0],
        [20, 70, 70, 70],
    ]
    assert sp.gather(torch.ones(4, 2), fill=-1.0)[0].tolist() == [-1, -1, -1, -1]  # narrower input: padded
    mask, pos = sp.attention(sp.valid)
    assert mask.tolist()[1] == [1, 0, 1, 1, 0, 0] and pos.tolist()[1] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["sdpa", "eager", "sdpa+checkpointing"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_rows_continuing_a_shared_prompt_equal_the_full_rows(arch, mode):
    """share_prompt's forward: one prefix forward per pair, both rows continuing it, gives the full rows'
    logits, parameter gradients, and gradients at the response tokens' input embeddings (the
    attribution, which then needs no backward through the prompt)."""
    attention, checkpointing = mode.split("+")[0], mode.endswith("checkpointing")
    config = CONFIGS[arch]()
    config._attn_implementation = attention
    model = build(config)
    if checkpointing:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        if arch not in CHECKPOINTING_MODEL_TYPES:
            return  # prompt_cache_unsupported says so (previous test)
    gen = torch.Generator().manual_seed(3)
    n, width = 3, 12
    lengths = torch.tensor([6, 2, 4])
    ids = torch.randint(1, VOCAB, (2 * n, width), generator=gen)
    ids[n:, :6] = ids[:n, :6]  # rejected rows start with the same prompts
    ends = torch.tensor([12, 5, 9, 8, 12, 4])
    steps = torch.arange(width)[None]
    attn = (steps < ends[:, None]).long()
    cmask = (steps >= lengths.repeat(2)[:, None]) & attn.bool()
    weight = torch.randn(2 * n, width, VOCAB, generator=gen)
    rows = torch.arange(2 * n)

    def embed(input_ids):  # not detached: the embedding matrix gets the gradients of both layouts
        return model.get_input_embeddings()(input_ids)

    def run(loss_weight, embeds, forward, last):
        """Logits, attribution (gradient of each row's last logits at the input embeddings), grads."""
        model.zero_grad()
        logits = forward(embeds)
        (attr,) = torch.autograd.grad(logits[rows, last].sum(), embeds, retain_graph=True)
        (logits * loss_weight).sum().backward()
        return (
            logits,
            attr,
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        )

    sp = split_shared_prompt(ids, attn, cmask, lengths)
    columns = sp.columns[..., None]
    on_cont = ((steps >= sp.starts[:, None]) & attn.bool())[..., None]

    def full_rows(embeds):
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        return model(inputs_embeds=embeds, attention_mask=attn, position_ids=positions).logits

    def continuations(embeds):
        capture = PromptKV(model, n, sp.prefix_ids.size(1))
        with keep_cache_when_checkpointing(model):
            model(input_ids=sp.prefix_ids, attention_mask=sp.prefix_mask, cache=capture, use_cache=True)
            mask, pos = sp.attention(sp.valid)
            cache = capture.continuation(2)
            return model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache).logits

    # The loss weights only the positions both layouts have (the full rows' prompt positions but the
    # last are not in the continuations).
    slow, slow_attr, slow_grads = run(weight * on_cont, embed(ids), full_rows, ends - 1)
    cont_weight = weight.gather(1, columns.expand(-1, -1, VOCAB)) * sp.valid[..., None]
    fast, fast_attr, fast_grads = run(cont_weight, embed(sp.ids), continuations, sp.valid.sum(1) - 1)

    keep = sp.valid.bool()
    torch.testing.assert_close(
        fast[keep], slow.gather(1, columns.expand(-1, -1, VOCAB))[keep], rtol=1e-5, atol=1e-5
    )
    # Attribution on the continuation tokens (the responses and the prompt's last token) is unchanged.
    want = slow_attr.gather(1, columns.expand(-1, -1, slow_attr.size(-1)))
    torch.testing.assert_close(fast_attr[keep], want[keep], rtol=1e-4, atol=1e-6)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["sdpa", "eager", "sdpa+checkpointing"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_continuing_captured_prompts_equals_the_full_rows(arch, mode):
    """Logits of y_a after the captured prompt = logits of the full prompt + y_a rows, and the parameter
    gradients of a loss on them agree, with prompts of different lengths and padded anchors; also with
    (non-reentrant) gradient checkpointing, whose layers replay in the backward."""
    attention, checkpointing = mode.split("+")[0], mode.endswith("checkpointing")
    config = CONFIGS[arch]()
    config._attn_implementation = attention
    model = build(config)
    assert model.config._attn_implementation == attention
    if checkpointing:
        for module in model.modules():  # train mode (checkpointing only acts there), without dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        if arch not in CHECKPOINTING_MODEL_TYPES:
            assert "gradient checkpointing" in prompt_cache_unsupported(model)
            return
    assert prompt_cache_unsupported(model) is None
    gen = torch.Generator().manual_seed(1)
    n, width, new = 3, 10, 5
    lengths = torch.tensor([6, 3, 5])
    # Pair rows (chosen 0..n-1, rejected n..2n-1): right-padded prompt + response.
    ids = torch.randint(1, VOCAB, (2 * n, width), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    attn[4, 7:] = 0
    anchor = torch.randint(1, VOCAB, (n, new), generator=gen)
    valid = torch.ones(n, new, dtype=torch.long)
    valid[2, 3:] = 0
    weight = torch.randn(n, new, VOCAB, generator=gen)

    def pair_positions(mask):
        return (mask.cumsum(1) - 1).clamp(min=0)

    def prompt_cache_path(keep_cache: bool):
        model.zero_grad()
        capture = PromptKV(model, n, int(lengths.max()))
        a_attn, a_pos = continuation_inputs(lengths, int(lengths.max()), valid)
        with keep_cache_when_checkpointing(model) if keep_cache else contextlib.nullcontext():
            model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pair_positions(attn),
                cache=capture,
                use_cache=True,
            )
            fast = model(
                input_ids=anchor,
                attention_mask=a_attn,
                position_ids=a_pos,
                cache=capture.continuation(),
                use_cache=True,
            ).logits
        ((fast * weight).sum(-1) * valid).sum().backward()
        return fast, {name: p.grad.clone() for name, p in model.named_parameters()}

    fast, fast_grads = prompt_cache_path(keep_cache=True)
    if checkpointing:  # control: without letting the caches through, the layers drop them
        with pytest.raises(RuntimeError, match="anchor_prompt_cache=False"):
            prompt_cache_path(keep_cache=False)

    # Full rows: prompt_b + anchor_b, right-padded.
    model.zero_grad()
    full = torch.zeros(n, int(lengths.max()) + new, dtype=torch.long)
    full_attn = torch.zeros_like(full)
    for b in range(n):
        p = int(lengths[b])
        full[b, :p], full[b, p : p + new] = ids[b, :p], anchor[b]
        full_attn[b, :p], full_attn[b, p : p + new] = 1, valid[b]
    slow_all = model(input_ids=full, attention_mask=full_attn, position_ids=pair_positions(full_attn)).logits
    slow = torch.stack([slow_all[b, int(lengths[b]) : int(lengths[b]) + new] for b in range(n)])
    ((slow * weight).sum(-1) * valid).sum().backward()

    keep = valid.bool()
    torch.testing.assert_close(fast[keep], slow[keep], rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        # float32 sums in another order (the kernels' blocking differs by CPU and thread count): the
        # error scales with the gradient's size, ~1e-7 of its largest entry (measured up to 1.2e-7).
        scale = max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_unsupported_models_say_why():
    sliding = build(Gemma2Config(**COMMON, head_dim=8, sliding_window=4))
    assert "sliding" in prompt_cache_unsupported(sliding).lower() or "gemma2" in prompt_cache_unsupported(
        sliding
    )
    windowed = build(MistralConfig(**COMMON, sliding_window=4))
    assert "Sliding" in prompt_cache_unsupported(windowed)
    other = build(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    assert "gpt_neox" in prompt_cache_unsupported(other)
    flash = build(CONFIGS["llama"]())
    flash.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in prompt_cache_unsupported(flash)
    checkpointed = build(CONFIGS["llama"]())
    checkpointed.activation_checkpointing_enable({"use_reentrant": True})
    checkpointed.train()
    assert "reentrant" in prompt_cache_unsupported(checkpointed)


def test_a_layer_that_skipped_the_cache_is_an_error():
    model = build(CONFIGS["llama"]())
    capture = PromptKV(model, 1, 2)  # no forward ran through it
    with pytest.raises(RuntimeError, match="anchor_prompt_cache=False"):
        capture.continuation()


# ----------------------------------------------------------------------------- through the trainer


def _step(trainer):
    """Loss, parameter gradients and triplet metrics of one compute_loss on the first batch, plus how the
    anchors were decoded ("past": from share_prompt's prefix keys, or "prompt") and their layout."""
    layouts = []
    choose = trainer._anchor_layout

    def record(*args, **kwargs):
        layouts.append(choose(*args, **kwargs))
        return layouts[-1]

    trainer._anchor_layout = record
    sample = trainer._sample_anchors

    def record_past(*args, past=None, **kwargs):
        layouts.append("past" if past is not None else "prompt")
        return sample(*args, past=past, **kwargs)

    trainer._sample_anchors = record_past
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
    loss, grads = train_loss_and_grads(trainer)
    metrics = {k: v for k, v in last_metrics(trainer).items() if k.startswith(("triplet", "anchor"))}
    return loss, grads, metrics, layouts


@pytest.mark.parametrize(
    ("attribution_pass", "slow_layout", "lora", "checkpointing"),
    [
        ("fused", "split", False, False),
        ("separate", "joint", False, False),
        ("fused", "split", True, False),
        ("fused", "split", False, True),
        ("fused", "split", True, True),
    ],
)
def test_trainer_step_equals_the_full_row_layouts(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, attribution_pass, slow_layout, lora, checkpointing
):
    """Full TI-DPO (KL + a live triplet term): the fast layouts give the loss, gradients and triplet
    metrics of the full-row layouts they replace: anchors reading the chosen rows' prompt keys
    ("prompt_cache"), and all rows continuing a shared prompt prefix (share_prompt; anchors
    "continuation", or full rows with anchor_prompt_cache=False). Under LoRA the reference side (adapters
    disabled) takes the same path; with (non-reentrant) gradient checkpointing too (opted in: auto
    leaves both off there, see the next test)."""
    opt_in = True if checkpointing else None
    settings = {  # (share_prompt, anchor_prompt_cache) -> (anchors decoded from, anchor layout)
        (False, False): ["prompt", slow_layout],
        (False, opt_in): ["prompt", "prompt_cache"],
        (opt_in, opt_in): ["past", "continuation"],
        (True, False): ["past", "split"],
    }
    results = {}
    for (share, anchor_cache), layout in settings.items():
        args = make_config(
            tmp_path,
            attribution_pass=attribution_pass,
            gamma=0.1,
            tdpo_alpha=0.5,
            share_prompt=share,
            anchor_prompt_cache=anchor_cache,
            gradient_checkpointing=checkpointing,
        )
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama),
            args=args,
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
            peft_config=peft_config,
        )
        if checkpointing:  # what Trainer.train() does with gradient_checkpointing=True
            trainer.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        results[share, anchor_cache] = result = _step(trainer)
        assert result[3] == layout, (share, anchor_cache)
    slow = results[False, False]
    assert slow[2]["triplet/loss"] > 0  # the anchors' path matters for the loss
    for key, fast in results.items():
        assert fast[0] == pytest.approx(slow[0], rel=1e-5), key
        assert fast[2] == pytest.approx(slow[2], rel=1e-4), key
        assert fast[1].keys() == slow[1].keys()
        for name in fast[1]:
            torch.testing.assert_close(
                fast[1][name], slow[1][name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}"
            )


def _ramp_weights(ds):
    """Dataset-mode weights: a different weight per token, aligned with each full row."""
    for side in ("chosen", "rejected"):
        ds = ds.add_column(
            f"{side}_weights", [[1.0 + 0.1 * i for i in range(len(r))] for r in ds[f"{side}_input_ids"]]
        )
    return ds


def _shared_step(trainer):
    """Train-mode loss, gradients and metrics, eval-mode loss, and whether share_prompt served them."""
    used = []
    choose = trainer._shared_prompt

    def record(*args, **kwargs):
        shared = choose(*args, **kwargs)
        used.append(shared is not None)
        return shared

    trainer._shared_prompt = record
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(4)))
    loss, grads = train_loss_and_grads(trainer)
    metrics = last_metrics(trainer)
    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        eval_loss = trainer.compute_loss(trainer.model, batch).item()
    return loss, grads, metrics, eval_loss, used


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "dpo"},
        {"loss_type": "dpo", "precompute_ref_logps": True},
        {"loss_type": "ipo"},
        {"loss_type": "simpo"},
        {"loss_type": "tdpo2"},
        {"loss_type": "ti_dpo", "gamma": 0.0},
        {"loss_type": "ti_dpo", "gamma": 0.0, "importance_mode": "dataset", "tdpo_alpha": 0.0},
        {"loss_type": "ti_dpo", "gamma": 0.0, "importance_mode": "prior"},
        {"loss_type": "ti_dpo", "gamma": 0.0, "importance_mode": "random"},  # one draw per response token
        {"loss_type": "dpo", "importance_span": "sequence"},  # uniform weights: the span is unused
        {"loss_type": "ti_dpo", "gamma": 0.1, "tdpo_alpha": 0.0, "precompute_ref_logps": True},
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_share_prompt_gives_every_loss_the_full_rows_result(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, overrides
):
    """share_prompt changes no number: loss, every gradient and every logged metric in training, and the
    eval loss, for each loss type, with cached reference log-probs and with dataset weights (both
    re-aligned with the continuations)."""
    results = {}
    for share in (None, False):
        args = make_config(tmp_path, share_prompt=share, **overrides)
        train = pairs_dataset
        if overrides.get("importance_mode") == "dataset":
            train = _ramp_weights(TIDPOTrainer.prepare_dataset(pairs_dataset, tiny_tok, args))
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=train, processing_class=tiny_tok
        )
        results[share] = _shared_step(trainer)
    fast, slow = results[None], results[False]
    assert fast[4] == [True, True] and slow[4] == [False, False]
    assert fast[0] == pytest.approx(slow[0], rel=1e-5)
    assert fast[3] == pytest.approx(slow[3], rel=1e-5)
    assert fast[2].keys() == slow[2].keys()
    for key in fast[2]:
        assert fast[2][key] == pytest.approx(slow[2][key], rel=1e-4, abs=1e-6), key
    assert fast[1].keys() == slow[1].keys()
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], slow[1][name], rtol=1e-4, atol=1e-6)


def test_share_prompt_falls_back_and_says_why(tmp_path, tiny_tok, tiny_llama, pairs_dataset, caplog):
    def trainer_with(**overrides):
        args = make_config(tmp_path, gamma=0.0, **overrides)
        return TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )

    # Weights normalised over the prompt too need the prompt's attribution: full rows.
    trainer = trainer_with(importance_span="sequence")
    with caplog.at_level("INFO", logger="tidpo.training.trainer"):
        assert _shared_step(trainer)[4] == [False, False]
    assert "no share_prompt" in caplog.text and "importance_span='sequence'" in caplog.text
    with pytest.raises(ValueError, match=r"share_prompt=True.*importance_span='sequence'"):
        _shared_step(trainer_with(importance_span="sequence", share_prompt=True))
    # Gradient checkpointing: on when non-reentrant (the checkpointed layers keep the read-only caches);
    # reentrant checkpointing runs the layers without a graph, so the prompts' keys would get no gradient.
    for reentrant in (False, True):
        trainer = trainer_with(gradient_checkpointing=True, attribution_pass="separate")
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        caplog.clear()
        with caplog.at_level("INFO", logger="tidpo.training.trainer"):
            assert _shared_step(trainer)[4][0] is not reentrant
        assert ("reentrant gradient checkpointing" in caplog.text) is reentrant
    # Batches it cannot serve.
    trainer = trainer_with()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = batch["prompt_input_ids"].size(0)
    assert trainer._prompt_cache_unsupported(trainer.model, batch, both_rows=True) is None
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][n, 0] += 1  # a rejected row's prompt differs from its pair's
    assert "rejected rows do not start" in trainer._prompt_cache_unsupported(
        trainer.model, changed, both_rows=True
    )
    assert trainer._prompt_cache_unsupported(trainer.model, changed) is None  # the anchors only need chosen
    short = dict(batch, prompt_attention_mask=batch["prompt_attention_mask"].clone())
    short["prompt_attention_mask"][0, :-1] = 0
    assert "single token" in trainer._prompt_cache_unsupported(trainer.model, short, both_rows=True)
    # The anchors decode from the prefix forward's keys only when that forward ran without dropout.
    prompts = batch["prompt_input_ids"]
    trainer.model.train()
    assert trainer._decode_from_prefix(trainer.model, prompts)
    attention = [
        m for m in trainer.model.modules() if isinstance(getattr(m, "attention_dropout", None), float)
    ]
    assert attention
    attention[0].attention_dropout = 0.1
    assert not trainer._decode_from_prefix(trainer.model, prompts)
    trainer.model.eval()
    assert trainer._decode_from_prefix(trainer.model, prompts)
    holes = dict(batch, attention_mask=batch["attention_mask"].clone())
    holes["attention_mask"][n, 0] = 0
    assert "right-padded" in trainer._prompt_cache_unsupported(trainer.model, holes, both_rows=True)


def test_trainer_falls_back_where_the_cache_cannot_serve(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset, caplog
):
    # (share_prompt off: with it the anchors continue the shared prompt prefix instead.)
    # Checkpointing for memory: auto keeps full rows (the prompt cache would undo the memory saving).
    args = make_config(tmp_path, gamma=0.1, gradient_checkpointing=True, share_prompt=False)
    trainer = TIDPOTrainer(
        copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with caplog.at_level("INFO", logger="tidpo.training.trainer"):
        assert _step(trainer)[3] == ["prompt", "split"]
    assert "memory saving" in caplog.text
    # Reentrant checkpointing runs the layers without a graph: auto uses full rows, True explains.
    for setting in (None, True):
        # (The fused attribution's autograd.grad refuses reentrant checkpointing itself: separate pass.)
        args = make_config(
            tmp_path,
            gamma=0.1,
            anchor_prompt_cache=setting,
            gradient_checkpointing=True,
            attribution_pass="separate",
            share_prompt=False,
        )
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if setting is None:
            with caplog.at_level("INFO", logger="tidpo.training.trainer"):
                assert _step(trainer)[3] == ["prompt", "joint"]
            assert "no prompt cache" in caplog.text and "reentrant" in caplog.text
        else:
            with pytest.raises(ValueError, match=r"anchor_prompt_cache=True.*reentrant"):
                _step(trainer)


def test_trainer_refuses_prompts_that_do_not_start_the_chosen_rows(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    args = make_config(tmp_path, gamma=0.1)
    trainer = TIDPOTrainer(
        copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer._prompt_cache_unsupported(trainer.model, batch) is None
    changed = dict(batch, prompt_input_ids=batch["prompt_input_ids"].clone())
    changed["prompt_input_ids"][0, -1] += 1
    assert "do not start with" in trainer._prompt_cache_unsupported(trainer.model, changed)
    assert "precomputed" in trainer._prompt_cache_unsupported(trainer.model, dict(batch, ref_logps=None))


# ----------------------------------------------------------------------------- prompt / row alignment

_rows = st.lists(
    st.tuples(
        st.lists(st.integers(4, 90), min_size=1, max_size=6),  # prompt
        st.lists(st.integers(4, 90), min_size=1, max_size=5),  # chosen
        st.lists(st.integers(4, 90), min_size=1, max_size=5),  # rejected
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(rows=_rows, multiple=st.sampled_from([None, 4]), data=st.data())
def test_collated_rows_start_with_their_prompts(rows, multiple, data):
    """PreferenceCollator batches always pass the check the prompt cache relies on; changing one prompt
    token, or where a completion starts, fails it."""
    examples = [{"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r} for p, c, r in rows]
    batch = PreferenceCollator(pad_token_id=1, pad_to_multiple_of=multiple)(examples)
    n = len(rows)
    args = (
        batch["input_ids"][:n],
        batch["completion_mask"][:n],
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
    )
    assert rows_start_with_prompts(*args)

    b = data.draw(st.integers(0, n - 1))
    t = data.draw(st.integers(0, len(rows[b][0]) - 1))
    prompts = batch["prompt_input_ids"].clone()
    prompts[b, prompts.shape[1] - len(rows[b][0]) + t] = 99  # ids in the rows are < 91
    assert not rows_start_with_prompts(args[0], args[1], prompts, args[3])
    shifted = args[1].clone()
    shifted[b] = torch.roll(shifted[b], 1)
    assert not rows_start_with_prompts(args[0], shifted, args[2], args[3])


def test_share_prompt_auto_is_off_on_cuda_unless_checkpointing(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    # Measured on an H200 (benchmarks/README.md, round 8): shared prompts cost a GPU more launches than
    # they save, so `None` keeps whole rows there, except under checkpointing (memory). CPU: on.
    for checkpointing, on_cuda in ((False, False), (True, True)):
        args = make_config(tmp_path, gradient_checkpointing=checkpointing)
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        assert trainer._share_prompt_pays(torch.device("cpu"))
        assert trainer._share_prompt_pays(torch.device("cuda")) is on_cuda
