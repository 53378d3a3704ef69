"""The decode loop of tidpo.generation samples what transformers' ``generate`` samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import tidpo.generation as gen
from tidpo.generation import anchor_cache, next_tokens, sample_completion_ids, sampling_distribution
from tiny_setup import CONFIGS, VOCAB, build


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What generate() draws from: its warpers in its order, then a softmax over the vocabulary."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers(None, logits.float()).softmax(-1)


def ours_full(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return sampling_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def test_distribution_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, 2.0]])
    # top_k=2 keeps 3.0 and the two tied 2.0s (ties with the k-th stay, as in generate).
    p = ours_full(logits, 1.0, 2, 1.0)[0]
    e = torch.tensor([3.0, 2.0, 2.0]).exp()
    expected = torch.tensor([e[0], 0.0, e[1], 0.0, e[2]]) / e.sum()
    torch.testing.assert_close(p, expected)
    # top_p=0.5: 3.0 alone has probability 0.576 of those three; the tied tail is dropped.
    p = ours_full(logits, 1.0, 2, 0.5)[0]
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 160),
    top_k=st.integers(0, 170),
    top_p=st.sampled_from([1.0, 0.95, 0.9, 0.8, 0.75, 0.5, 0.1, 1e-6]),
    temperature=st.sampled_from([1.0, 0.8, 1.7]),
    grid=st.sampled_from([0.0, 0.25, 1.0, 4.0]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_distribution_equals_generates_warpers(rows, vocab, top_k, top_p, temperature, grid, bf16, seed):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    if grid:  # many exact ties, also with the k-th token and across the nucleus boundary
        logits = (logits / grid).round() * grid
    if bf16:
        logits = logits.bfloat16()
    ours = ours_full(logits, temperature, top_k, top_p)
    torch.testing.assert_close(ours.sum(-1), torch.ones(rows))
    # Where a cumulative probability equals 1 - top_p in exact arithmetic, float rounding decides
    # whether that token goes (generate sums its tied members one by one; we count how many fit): a
    # row must then match generate's with the nucleus boundary moved by 1e-5 to one side.
    nudged = [top_p] if top_p == 1.0 else [top_p, max(top_p - 1e-5, 1e-7), min(top_p + 1e-5, 1.0)]
    for r in range(rows):
        assert any(
            _same_distribution(logits[r], ours[r], hf_probs(logits[r : r + 1], temperature, top_k, p)[0])
            for p in nudged
        ), r


def _same_distribution(logits: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Which of several tied tokens top-p drops is an order generate leaves unspecified: the sorted
    probabilities must agree, and so must the mass on each distinct logit value."""
    close = lambda a, b: bool(torch.isclose(a, b, atol=1e-6, rtol=1e-5).all())  # noqa: E731
    return close(ours.sort().values, theirs.sort().values) and all(
        close(ours[logits == value].sum(), theirs[logits == value].sum()) for value in logits.unique()
    )


def test_a_wide_tie_group_is_kept_whole_by_top_k_and_cut_by_top_p():
    # 200 tokens tied for first place: top_k=50 keeps all 200 in generate, however many the tie holds.
    logits = torch.zeros(2, 300)
    logits[:, :200] = 5.0
    probs = sampling_distribution(logits, top_k=50)
    torch.testing.assert_close(probs, hf_probs(logits, 1.0, 50, 1.0))
    assert int((probs > 0).sum(-1).min()) == 200
    # top_p=0.3 keeps 60 of them (each 1/200; the first 140 in ascending order have cumulative <= 0.7),
    # the lower ids going first.
    probs = sampling_distribution(logits, top_k=50, top_p=0.3)
    assert bool((probs[:, :140] == 0).all()) and bool((probs[:, 200:] == 0).all())
    torch.testing.assert_close(probs[:, 140:200], torch.full((2, 60), 1 / 60))
    # Tied below the top: 3 tokens above, 100 tied with the 10th largest; top_p drops part of the tie.
    logits = torch.zeros(1, 300)
    logits[0, 7:10] = 4.0
    logits[0, 100:200] = 2.0
    theirs = hf_probs(logits, 1.0, 10, 0.9)
    ours = sampling_distribution(logits, top_k=10, top_p=0.9)
    torch.testing.assert_close(ours.sort(-1).values, theirs.sort(-1).values)
    assert 0 < int((ours[0, 100:200] > 0).sum()) < 100 and bool((ours[0, 200:] == 0).all())


def test_the_tie_group_keeps_its_mass_at_large_logit_scales():
    # 100 tokens tied with the k-th near 30000 (logits of 30 at temperature 0.001), where float32's
    # spacing is 0.004: the group's mass must not be rounded there (review repro, 0.6469 vs 0.6468).
    logits = torch.full((1, 200), -5.0)
    logits[0, 20:120] = 30.0
    logits[0, 150] = 30.004
    for top_p in (1.0, 0.9):
        ours = sampling_distribution(logits, temperature=0.001, top_k=5, top_p=top_p)[0]
        theirs = hf_probs(logits, 0.001, 5, top_p)[0]
        assert float(ours[150]) == pytest.approx(float(theirs[150]), abs=2e-6)
        assert float(ours[20:120].sum()) == pytest.approx(float(theirs[20:120].sum()), abs=2e-6)


@pytest.mark.parametrize("case", ["plain", "ties"])
def test_draws_follow_the_distribution(case):
    torch.manual_seed(0)
    if case == "plain":
        logits = torch.randn(1, 500) * 2
    else:  # the tie group's column, drawn and then resolved to one of its kept members
        logits = torch.full((1, 500), -3.0)
        logits[0, 7:10] = 2.5
        logits[0, 100:140] = 1.0
        logits[0, 300:340] = 1.0
    expected = hf_probs(logits, 0.8, 50, 0.95)[0]
    torch.testing.assert_close(
        sampling_distribution(logits, temperature=0.8, top_k=50, top_p=0.95)[0].sort().values,
        expected.sort().values,
    )
    expected = sampling_distribution(logits, temperature=0.8, top_k=50, top_p=0.95)[0]
    draws = next_tokens(logits.expand(40_000, -1), do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    freq = torch.bincount(draws, minlength=500).float() / draws.numel()
    assert bool((freq[expected == 0] == 0).all()), "a filtered-out token was drawn"
    # 40k draws: a standard error of at most 0.0025 per token.
    assert float((freq - expected).abs().max()) < 0.012
    greedy = next_tokens(logits, do_sample=False, temperature=0.8, top_k=50, top_p=0.95)
    assert int(greedy) == int(logits.argmax())


def _prompts(vocab: int, eos: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    assert not bool((ids == eos).any())
    return ids, mask


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("static", [False, True])
def test_greedy_decoding_equals_generate(arch, static):
    model = build(CONFIGS[arch]())
    eos = 2
    # Make EOS the argmax for some continuations, so rows stop at different steps.
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= 4
    ids, mask = _prompts(VOCAB, eos)
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    cache = anchor_cache(model, ids.shape[1] + 12) if static else None
    ours = sample_completion_ids(
        model,
        ids,
        mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        static_cache=cache,
    )
    assert torch.equal(ours, reference), f"{arch}: {ours.tolist()} != {reference.tolist()}"


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_decoding_from_a_forwarded_prefix_equals_decoding_the_whole_prompt(arch, monkeypatch):
    """``past``: the prompts but their last tokens forwarded beforehand (right-padded, as share_prompt's
    prefix forward leaves them), then only the last tokens' pass: the same next-token logits at every
    step and greedy ids, and with the same seed the same sampled ids, as decoding the left-padded
    prompts from scratch."""
    from transformers import DynamicCache

    logits_seen: list[torch.Tensor] = []
    for fn in ("_last_logits", "_eager_step"):
        original = getattr(gen, fn)

        def recorded(*args, original=original, **kwargs):
            out = original(*args, **kwargs)
            logits_seen.append(out.detach().clone())
            return out

        monkeypatch.setattr(gen, fn, recorded)

    model = build(CONFIGS[arch]())
    eos = 2
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= 4
    ids, mask = _prompts(VOCAB, eos)
    lengths = mask.sum(1)
    width = int(lengths.max()) - 1
    prefix = torch.zeros(ids.shape[0], width, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix)
    for b, n in enumerate(lengths.tolist()):
        prefix[b, : n - 1] = ids[b, ids.shape[1] - n : -1]
        prefix_mask[b, : n - 1] = 1
    for sample in (False, True):
        kw = dict(max_new_tokens=12, do_sample=sample, eos_token_id=eos, pad_token_id=0)
        torch.manual_seed(5)
        logits_seen.clear()
        whole = sample_completion_ids(model, ids, mask, **kw)
        whole_logits = list(logits_seen)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prefix, attention_mask=prefix_mask, cache=cache, use_cache=True)
        torch.manual_seed(5)
        last = ids[:, -1:]
        logits_seen.clear()
        ours = sample_completion_ids(model, last, torch.ones_like(last), past=(cache, prefix_mask), **kw)
        assert torch.equal(ours, whole), f"{arch}, sample={sample}: {ours.tolist()} != {whole.tolist()}"
        assert len(logits_seen) == len(whole_logits) > 1
        for step, (a, b) in enumerate(zip(logits_seen, whole_logits, strict=True)):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-5, msg=lambda m, step=step: f"step {step}: {m}"
            )
    with pytest.raises(ValueError, match="static_cache"):
        sample_completion_ids(
            model,
            last,
            torch.ones_like(last),
            past=(cache, prefix_mask),
            static_cache=anchor_cache(model, 30),
        )


def test_stopping_checked_every_few_tokens_trims_to_the_same_ids(monkeypatch):
    # On CUDA the loop asks "has every row stopped?" only every 8 tokens and trims afterwards.
    model = build(CONFIGS["llama"]())
    with torch.no_grad():
        model.get_output_embeddings().weight[2] *= 12
    ids, mask = _prompts(VOCAB, 2)
    kw = dict(max_new_tokens=30, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(4)
    every = sample_completion_ids(model, ids, mask, **kw)
    assert every.shape[1] < 30, "the rows must all stop early for this test to mean anything"
    monkeypatch.setattr(gen, "stop_check_interval", lambda device: 8)
    torch.manual_seed(4)
    assert torch.equal(sample_completion_ids(model, ids, mask, **kw), every)


def test_ranks_whose_forwards_communicate_decode_in_step(tmp_path):
    # Real 2-process launch (gloo on CPU): under FSDP / ZeRO-3 a rank whose rows have all stopped keeps
    # running forwards until every rank is done, and the ids are still what each rank gives alone.
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "helpers" / "synced_decode.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    lengths = [len(r["alone"][0]) for r in ranks]
    assert lengths[0] != lengths[1], (
        f"the ranks must stop at different steps for this test to mean anything: {lengths}"
    )
    assert (
        ranks[0]["forwards"] == ranks[1]["forwards"] == max(lengths)
    )  # the prompt pass + one per new token but the last
    for r in ranks:
        assert r["synced"] == r["alone"]


def test_compiled_decode_step_is_kept_on_its_model_and_freed_with_it():
    # Compiled once per model (CUDA graphs need the same function every step); a copy of the model
    # compiles its own; nothing global keeps a model alive. (torch.compile is lazy: nothing compiles here.)
    import copy
    import gc
    import weakref

    model = build(CONFIGS["llama"]())
    step = gen._compiled_step(model)
    assert gen._compiled_step(model) is step
    clone = copy.deepcopy(model)
    assert gen._compiled_step(clone) is not step
    ref = weakref.ref(model)
    del model, step, clone
    gc.collect()
    assert ref() is None
