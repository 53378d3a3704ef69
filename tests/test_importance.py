"""Tests of tidpo.importance: attribution (Eq. 5-6), Gaussian prior (Eq. 7), hybrid weights (Eq. 8), modes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo.importance import (
    IMPORTANCE_MODES,
    attribution_from_logits,
    attribution_from_targets,
    gaussian_prior,
    gradient_attribution,
    hybrid_weights,
    importance_weights,
)
from tidpo.models import tiny_causal_lm, tiny_tokenizer
from tidpo.tokenops import NonFiniteError

# ----------------------------------------------------------------------------- gaussian_prior (Eq. 7)


def test_gaussian_prior_hand_values():
    torch.testing.assert_close(gaussian_prior(1), torch.tensor([1.0]))
    # n = 2: mu = 0.5, sigma = max(1, 0.5) = 1 -> symmetric.
    torch.testing.assert_close(gaussian_prior(2), torch.tensor([0.5, 0.5]))
    # n = 3: mu = 1, sigma = 1 -> (e^-0.5, 1, e^-0.5) / (1 + 2 e^-0.5).
    a = math.exp(-0.5)
    torch.testing.assert_close(gaussian_prior(3), torch.tensor([a, 1.0, a]) / (1 + 2 * a))
    # n = 4: mu = 1.5, sigma = 1 -> exp(-1.125), exp(-0.125), ...
    e1, e2 = math.exp(-1.125), math.exp(-0.125)
    expected = torch.tensor([e1, e2, e2, e1]) / (2 * (e1 + e2))
    torch.testing.assert_close(gaussian_prior(4), expected)
    assert abs(expected[0].item() - 0.134471) < 1e-5
    # n = 8: sigma = 8 / 4 = 2, mu = 3.5; sigma_div changes the width.
    p8 = gaussian_prior(8)
    raw = torch.tensor([math.exp(-0.5 * ((t - 3.5) / 2) ** 2) for t in range(8)])
    torch.testing.assert_close(p8, raw / raw.sum())
    assert gaussian_prior(8, sigma_div=2.0)[0] > p8[0]  # wider prior -> more mass at the ends


def test_gaussian_prior_edges():
    assert gaussian_prior(0).shape == (0,)
    with pytest.raises(ValueError):
        gaussian_prior(-1)
    with pytest.raises(ValueError):
        gaussian_prior(3, sigma_div=0.0)
    for n in range(1, 30):
        p = gaussian_prior(n)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.sum(), torch.tensor(1.0))
        torch.testing.assert_close(p, p.flip(0))


# ----------------------------------------------------------------------------- hybrid_weights (Eq. 8)


def reference_hybrid(scores: torch.Tensor, span: torch.Tensor, lam: float, sigma_div: float) -> torch.Tensor:
    """Row-by-row restatement of Eq. 8 using gaussian_prior (the implementation is vectorised)."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for b in range(scores.shape[0]):
        idx = span[b].bool().nonzero().flatten()
        n = idx.numel()
        if n == 0:
            continue
        prior = gaussian_prior(n, sigma_div).double()
        i = scores[b, idx].double()
        i_norm = i / i.sum() if i.sum() > 0 else prior
        w = lam * i_norm + (1 - lam) * prior
        out[b, idx] = w / w.sum() * n
    return out.float()


def test_hybrid_hand_example():
    scores = torch.tensor([[9.0, 1.0, 3.0, 0.0]])  # position 0 is outside the span: ignored
    span = torch.tensor([[0, 1, 1, 1]])
    a = math.exp(-0.5)
    prior = [a / (1 + 2 * a), 1 / (1 + 2 * a), a / (1 + 2 * a)]
    i_norm = [0.25, 0.75, 0.0]
    w = [0.7 * i + 0.3 * p for i, p in zip(i_norm, prior, strict=True)]
    expected = torch.tensor([[0.0] + [3 * x / sum(w) for x in w]])
    out = hybrid_weights(scores, span)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.771661, 1.981677, 0.246661]]), atol=1e-5, rtol=0)


def test_hybrid_special_rows():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 2.0, 7.0, 1.0], [3.0, 4.0, 5.0, 6.0]])
    span = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    out = hybrid_weights(scores, span)
    # zero attribution -> prior alone (times n)
    torch.testing.assert_close(out[0, :3], gaussian_prior(3) * 3)
    assert out[0, 3] == 0
    # one-token span -> weight 1 (spec §2 decision)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # empty span -> zeros
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_hybrid_matches_per_row_reference(lam):
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 9, generator=gen) * 10
    span = torch.rand(6, 9, generator=gen) > 0.4
    span[0] = False
    scores[1] = 0
    out = hybrid_weights(scores, span, lambda_importance=lam, sigma_div=3.0)
    torch.testing.assert_close(out, reference_hybrid(scores, span, lam, 3.0))


def test_hybrid_errors_and_detached():
    span = torch.tensor([[1, 1, 0]])
    with pytest.raises(NonFiniteError, match="importance scores"):
        hybrid_weights(torch.tensor([[1.0, float("nan"), 0.0]]), span)
    with pytest.raises(NonFiniteError):
        hybrid_weights(torch.tensor([[1.0, float("inf"), 0.0]]), span)
    with pytest.raises(ValueError, match=">= 0"):
        hybrid_weights(torch.tensor([[1.0, -0.5, 0.0]]), span)
    with pytest.raises(ValueError, match="lambda_importance"):
        hybrid_weights(torch.tensor([[1.0, 0.5, 0.0]]), span, lambda_importance=1.5)
    with pytest.raises(ValueError, match="same shape"):
        hybrid_weights(torch.tensor([[1.0, 0.5]]), span)
    scores = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    out = hybrid_weights(scores, span)
    assert not out.requires_grad and out.dtype == torch.float32


# ----------------------------------------------------------------------------- importance_weights


def test_modes_relationships():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 6, generator=gen)
    span = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    torch.testing.assert_close(importance_weights("prior", None, span), hybrid_weights(scores, span, 0.0))
    torch.testing.assert_close(
        importance_weights("gradient", scores, span), hybrid_weights(scores, span, 1.0)
    )
    torch.testing.assert_close(
        importance_weights("hybrid", scores, span, 0.3), hybrid_weights(scores, span, 0.3)
    )
    torch.testing.assert_close(importance_weights("uniform", None, span), span.float())
    # gradient mode is I / sum(I) * n
    expected = scores * span / (scores * span).sum(1, keepdim=True) * span.sum(1, keepdim=True)
    torch.testing.assert_close(importance_weights("gradient", scores, span), expected)


def test_softmax_mode_hand_example():
    scores = torch.tensor([[7.0, 0.0, math.log(3.0)]])
    span = torch.tensor([[0, 1, 1]])
    # softmax over (0, log 3) = (1/4, 3/4), times n = 2
    torch.testing.assert_close(importance_weights("softmax", scores, span), torch.tensor([[0.0, 0.5, 1.5]]))
    # negative scores are acceptable for softmax
    out = importance_weights("softmax", torch.tensor([[-1.0, -2.0, -3.0]]), span)
    torch.testing.assert_close(out.sum(), torch.tensor(2.0))


def test_random_mode_generator():
    span = torch.ones(2, 5, dtype=torch.bool)
    a = importance_weights("random", None, span, generator=torch.Generator().manual_seed(5))
    b = importance_weights("random", None, span, generator=torch.Generator().manual_seed(5))
    c = importance_weights("random", None, span, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert torch.all(a > 0)
    assert a.std() > 0.01  # not uniform
    # One generator per row: row i's weights are what its generator draws, whatever the other rows.
    rows = importance_weights(
        "random", None, span, generator=[torch.Generator().manual_seed(s) for s in (5, 6)]
    )
    alone = importance_weights("random", None, span[:1], generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(rows[1:], alone)
    assert not torch.allclose(rows[0], rows[1])
    with pytest.raises(ValueError, match="1 generators for 2 rows"):
        importance_weights("random", None, span, generator=[torch.Generator()])


def test_mode_errors():
    span = torch.ones(1, 3)
    with pytest.raises(ValueError, match=r"valid modes: hybrid, uniform, random, prior, gradient, softmax"):
        importance_weights("attention", None, span)
    for mode in ("hybrid", "gradient", "softmax"):
        with pytest.raises(ValueError, match="needs attribution scores"):
            importance_weights(mode, None, span)
    with pytest.raises(NonFiniteError):
        importance_weights("softmax", torch.tensor([[1.0, float("nan"), 0.0]]), span)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(IMPORTANCE_MODES),
    st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 12).flatmap(
            lambda t: st.tuples(
                st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b),
                st.lists(
                    st.lists(
                        st.floats(0, 1e3, allow_nan=False, allow_subnormal=False), min_size=t, max_size=t
                    ),
                    min_size=b,
                    max_size=b,
                ),
            )
        )
    ),
    st.floats(0.0, 1.0),
    st.floats(0.5, 8.0),
)
def test_every_mode_mean_one_on_span(mode, data, lam, sigma_div):
    mask_rows, score_rows = data
    span = torch.tensor(mask_rows)
    scores = torch.tensor(score_rows)
    out = importance_weights(mode, scores, span, lam, sigma_div, generator=torch.Generator().manual_seed(0))
    assert out.shape == span.shape and out.dtype == torch.float32 and not out.requires_grad
    assert torch.isfinite(out).all()
    assert torch.all(out[~span] == 0)
    assert torch.all(out >= 0)
    n = span.sum(1).float()
    torch.testing.assert_close(out.sum(1), n, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- attribution (Eq. 5-6)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return tiny_causal_lm(request.param, tokenizer=tokenizer, seed=0)


def explicit_row_attribution(model, ids: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 for one unpadded row, written out directly on the full logits (eval mode)."""
    model.eval()
    emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    target = logits[0, -1].max()
    (grad,) = torch.autograd.grad(target, emb)
    return grad[0].abs().sum(-1)


def sequences(tokenizer):
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 4, 9]
    return [torch.randint(0, len(tokenizer) - 4, (n,), generator=gen) for n in lengths]


def pad_batch(seqs, pad_id: int, side: str):
    length = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(0, s.numel()) if side == "right" else slice(length - s.numel(), length)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_gradient_attribution_padding_matches_unpadded_rows(model, tokenizer, side):
    seqs = sequences(tokenizer)
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    scores = gradient_attribution(model, ids, mask)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert torch.all(scores[mask == 0] == 0)
    for b, s in enumerate(seqs):
        alone = gradient_attribution(model, s[None], torch.ones(1, s.numel(), dtype=torch.long))[0]
        explicit = explicit_row_attribution(model, s)
        torch.testing.assert_close(scores[b][mask[b].bool()], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone, explicit, rtol=1e-4, atol=1e-5)
        assert torch.all(alone > 0)


def test_gradient_attribution_keeps_grads_mode_and_works_under_no_grad(tokenizer):
    model = tiny_causal_lm("gpt2", tokenizer=tokenizer, seed=1)  # GPT-2 has dropout: mode matters
    ids, mask = pad_batch(sequences(tokenizer), tokenizer.pad_token_id, "right")
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    model.train()
    with torch.no_grad():
        first = gradient_attribution(model, ids, mask)
    second = gradient_attribution(model, ids, mask)
    torch.testing.assert_close(first, second)  # dropout was off: deterministic
    assert model.training
    assert torch.all(params[0].grad == 3.0)
    assert all(p.grad is None for p in params[1:])
    model.eval()
    gradient_attribution(model, ids, mask)
    assert not model.training
    # mode restored on error too (out-of-range id makes the embedding lookup fail)
    model.train()
    with pytest.raises(IndexError):
        gradient_attribution(model, torch.full_like(ids, 10_000), mask)
    assert model.training


def test_gradient_attribution_rejects_empty_rows(model, tokenizer):
    ids, mask = pad_batch(sequences(tokenizer), tokenizer.pad_token_id, "right")
    mask[1] = 0
    with pytest.raises(ValueError, match=r"no attended position in rows \[1\]"):
        gradient_attribution(model, ids, mask)


def test_attribution_from_logits_fused_path(tokenizer):
    model = tiny_causal_lm("llama", tokenizer=tokenizer, seed=2).eval()
    ids, mask = pad_batch(sequences(tokenizer), tokenizer.pad_token_id, "left")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
    scores = attribution_from_logits(logits, emb, mask, retain_graph=True)
    torch.testing.assert_close(scores, gradient_attribution(model, ids, mask), rtol=1e-4, atol=1e-5)
    # the graph survives for the loss backward; parameter grads only come from that backward
    assert all(p.grad is None for p in model.parameters())
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None
    logits2 = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
    attribution_from_logits(logits2, emb, mask)
    with pytest.raises(RuntimeError):
        logits2.sum().backward()  # graph freed without retain_graph
    with pytest.raises(ValueError, match="require grad"):
        attribution_from_logits(logits.detach(), emb.detach(), mask)


def test_attribution_from_logits_hand_computed():
    # logits = e @ A, one row, D = 2, V = 2: the target is the max logit at the last valid position.
    emb = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]]], requires_grad=True)
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # position 1 sees 0 and 1
    logits = torch.einsum("ts,bsd,dv->btv", mix, emb, weight)
    mask = torch.tensor([[1, 1, 0]])
    # logits at position 1 = 0.5 (e0 + e1) @ W = (2, 0.5) @ W = (2.25, -2) -> target uses column W[:, 0]
    # dL/de0 = dL/de1 = 0.5 * (1, 0.5) -> L1 = 0.75 each; padding -> 0
    scores = attribution_from_logits(logits, emb, mask)
    torch.testing.assert_close(scores, torch.tensor([[0.75, 0.75, 0.0]]))


def test_attribution_from_targets_subset_and_non_leaf_embeds(tokenizer):
    model = tiny_causal_lm("gpt2", tokenizer=tokenizer, seed=3).eval()
    ids, mask = pad_batch(sequences(tokenizer), tokenizer.pad_token_id, "right")
    captured = {}
    # The trainer's fused path captures the embedding output (a non-leaf) with a forward hook.
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: captured.setdefault("e", o))
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    emb = captured["e"]
    assert not emb.is_leaf and emb.requires_grad
    last = torch.tensor([s.numel() - 1 for s in sequences(tokenizer)])
    targets = logits[torch.arange(2), last[:2]].max(-1).values  # pair rows only: rows 0 and 1
    scores = attribution_from_targets(targets, emb, mask, retain_graph=True)
    full = gradient_attribution(model, ids, mask)
    torch.testing.assert_close(scores[:2], full[:2], rtol=1e-4, atol=1e-5)
    assert torch.all(scores[2] == 0)  # no target depends on row 2
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="targets"):
        attribution_from_targets(targets[:, None], emb, mask)
    with pytest.raises(NonFiniteError, match="attribution targets"):
        attribution_from_targets(targets * float("nan"), emb, mask)
