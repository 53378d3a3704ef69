"""Tests of tidpo.tokenops: chunked log-probs / KL against naive full-tensor versions, packing, guards."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tidpo.tokenops as tokenops
from tidpo.tokenops import (
    NonFiniteError,
    ReferenceHead,
    check_finite,
    label_logprobs,
    logprobs_and_kl,
    pack_to_response_start,
    sequential_kl,
    token_logprobs,
)

CHUNKS = [1, 4, 7, 1000]  # 7 does not divide B * T = 15; 1000 covers everything in one chunk


def naive_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    full = torch.log_softmax(logits.double(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(full, (1, 0))


def naive_kl(ref: torch.Tensor, pol: torch.Tensor) -> torch.Tensor:
    lr = torch.log_softmax(ref.double(), dim=-1)
    lp = torch.log_softmax(pol.double(), dim=-1)
    return F.pad((lr.exp() * (lr - lp)).sum(-1)[:, :-1], (1, 0))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 3
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    ref = torch.randn(3, 5, 11, generator=gen) * 3
    return logits, ids, ref


# ----------------------------------------------------------------------------- token_logprobs


def test_token_logprobs_hand_computed():
    # One row, V = 2: logits at t=0 are (0, log 3) -> p(token 1) = 3/4.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1]])
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.75)]]))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_logprobs_matches_naive_values_and_grads(batch, chunk):
    logits, ids, _ = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().double().requires_grad_(True)
    out = token_logprobs(a, ids, chunk_size=chunk)
    ref = naive_token_logprobs(b, ids)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 0] == 0)
    upstream = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_token_logprobs_mask_skips_positions(batch, chunk):
    logits, ids, _ = batch
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    a = logits.clone().requires_grad_(True)
    out = token_logprobs(a, ids, chunk_size=chunk, mask=mask)
    full = naive_token_logprobs(logits, ids)
    torch.testing.assert_close(out.double(), full * mask, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    # Logit rows feeding unmasked positions (and the last row) receive no gradient.
    used = torch.zeros(3, 5, dtype=torch.bool)
    used[:, :-1] = mask[:, 1:].bool()
    assert torch.all(a.grad[~used] == 0)
    assert torch.all(a.grad[used].abs().sum(-1) > 0)


def test_token_logprobs_bf16_is_float32_and_close(batch):
    logits, ids, _ = batch
    out = token_logprobs(logits.bfloat16(), ids, chunk_size=4)
    assert out.dtype == torch.float32
    ref = naive_token_logprobs(logits.bfloat16().float(), ids)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    a = logits.bfloat16().requires_grad_(True)
    token_logprobs(a, ids).sum().backward()
    assert a.grad.dtype == torch.bfloat16


def test_token_logprobs_gradcheck():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4), generator=gen)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_size=3), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_size=2, mask=mask), (logits,))


def test_label_logprobs_ignore_index_and_range():
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([1, -100, 5, 0])
    out = label_logprobs(logits, labels, chunk_size=3)
    assert out[1] == 0
    torch.testing.assert_close(out[[0, 2, 3]], torch.log_softmax(logits, -1).detach()[[0, 2, 3], [1, 5, 0]])
    out.sum().backward()
    assert torch.all(logits.grad[1] == 0)
    with pytest.raises(ValueError, match="outside"):
        label_logprobs(logits, torch.tensor([1, 6, 0, 0]))
    with pytest.raises(ValueError, match="do not match"):
        label_logprobs(logits, torch.tensor([1, 2]))


def test_token_logprobs_nan_raises(batch):
    logits, ids, _ = batch
    logits = logits.clone()
    logits[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"batch rows \[1\]"):
        token_logprobs(logits, ids)


def test_token_logprobs_bad_shapes(batch):
    logits, ids, _ = batch
    with pytest.raises(ValueError):
        token_logprobs(logits, ids[:, :-1])


# ----------------------------------------------------------------------------- sequential_kl


def test_sequential_kl_hand_computed():
    # p_ref = (1/2, 1/2), p_theta = (1/4, 3/4): KL = 0.5 log 2 + 0.5 log(2/3).
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    pol = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    out = sequential_kl(ref, pol)
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, expected]]))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sequential_kl_matches_naive(batch, chunk):
    logits, _, ref_logits = batch
    ref_leaf = ref_logits.clone().requires_grad_(True)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().double().requires_grad_(True)
    out = sequential_kl(ref_leaf, a, chunk_size=chunk)
    expected = naive_kl(ref_logits, b)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out >= -1e-6)
    upstream = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)
    assert ref_leaf.grad is None  # the reference is a constant


def test_sequential_kl_mask_zero_when_equal_and_gradcheck(batch):
    logits, _, ref_logits = batch
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    out = sequential_kl(ref_logits, logits, mask, chunk_size=2)
    torch.testing.assert_close(out.double(), naive_kl(ref_logits, logits) * mask, atol=1e-5, rtol=1e-5)
    same = sequential_kl(logits, logits + 7.0)  # a shift of all logits leaves the distribution unchanged
    assert same.abs().max() < 1e-5
    ref64 = ref_logits[:2, :3, :4].double()
    pol64 = logits[:2, :3, :4].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequential_kl(ref64, x, chunk_size=2), (pol64,))
    assert torch.autograd.gradcheck(lambda x: sequential_kl(ref64, x, mask[:2, :3], chunk_size=1), (pol64,))


def test_sequential_kl_reference_zero_probability_tokens():
    # A token the reference rules out (logit -inf) contributes 0, not NaN.
    ref = torch.tensor([[[0.0, float("-inf"), 0.0], [0.0, 0.0, 0.0]]])
    pol = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    out = sequential_kl(ref, pol)
    lp = torch.log_softmax(pol[0, 0], -1)
    expected = 0.5 * (math.log(0.5) - lp[0]) + 0.5 * (math.log(0.5) - lp[2])
    torch.testing.assert_close(out[0, 1], expected)


def test_sequential_kl_nan_raises(batch):
    logits, _, ref_logits = batch
    pol = logits.clone()
    pol[2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"batch rows \[2\]"):
        sequential_kl(ref_logits, pol)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_logprobs_and_kl_equals_the_three_separate_ops(batch, chunk):
    # Values and gradients of the fused kernel == token_logprobs (policy, ref) + sequential_kl, with a
    # mask and an upstream gradient on both differentiable outputs.
    logits, ids, ref_logits = batch
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    fused_in = logits.clone().requires_grad_(True)
    sep_in = logits.clone().requires_grad_(True)
    pol, ref, kl = logprobs_and_kl(fused_in, ref_logits, ids, mask, chunk_size=chunk)
    pol_s = token_logprobs(sep_in, ids, mask=mask)
    ref_s = token_logprobs(ref_logits, ids, mask=mask)
    kl_s = sequential_kl(ref_logits, sep_in, mask)
    for got, want in ((pol, pol_s), (ref, ref_s), (kl, kl_s)):
        torch.testing.assert_close(got, want * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol.double(), naive_token_logprobs(logits, ids) * mask, atol=1e-5, rtol=1e-5)
    assert not ref.requires_grad
    gen = torch.Generator().manual_seed(3)
    up_lp, up_kl = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    ((pol * up_lp).sum() + 0.5 * (kl * up_kl).sum()).backward()
    ((pol_s * up_lp).sum() + 0.5 * (kl_s * up_kl).sum()).backward()
    torch.testing.assert_close(fused_in.grad, sep_in.grad, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(2, 6),
    v=st.integers(2, 9),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_logprobs_and_kl_property(b, t, v, chunk, seed, dtype):
    # Any shapes, masks, chunk sizes and (b)f16 logits: the fused outputs are the naive float64
    # log-softmax gathers and KL at masked positions, exactly 0 elsewhere, and the KL is >= 0.
    gen = torch.Generator().manual_seed(seed)
    pol = (torch.randn(b, t, v, generator=gen) * 3).to(dtype)
    ref = (torch.randn(b, t, v, generator=gen) * 3).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.randint(0, 2, (b, t), generator=gen)
    lp, rp, kl = logprobs_and_kl(pol, ref, ids, mask, chunk_size=chunk)
    m = mask.double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.double(), naive_token_logprobs(pol.float(), ids) * m, **tol)
    torch.testing.assert_close(rp.double(), naive_token_logprobs(ref.float(), ids) * m, **tol)
    torch.testing.assert_close(kl.double(), naive_kl(ref.float(), pol.float()) * m, **tol)
    assert bool((kl >= -1e-5).all())
    assert bool((lp[mask == 0] == 0).all()) and bool((kl[mask == 0] == 0).all())


def test_logprobs_and_kl_hand_computed_and_gradcheck():
    # Position 1 of the hand example of test_sequential_kl_hand_computed, with token 1 as the label:
    # log p_theta(1) = log 3/4, log p_ref(1) = log 1/2.
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    pol = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1]])
    lp, rp, kl = logprobs_and_kl(pol, ref, ids)
    torch.testing.assert_close(lp, torch.tensor([[0.0, math.log(0.75)]]))
    torch.testing.assert_close(rp, torch.tensor([[0.0, math.log(0.5)]]))
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)]]))
    gen = torch.Generator().manual_seed(4)
    ref64 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    pol64 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, 4, (2, 3), generator=gen)
    m = torch.tensor([[0, 1, 1], [0, 0, 1]])

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = logprobs_and_kl(x, ref64, ids, m, chunk_size=1)
        return out[0], out[2]

    assert torch.autograd.gradcheck(both, (pol64,))


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(2, 6),
    v=st.integers(2, 9),
    h=st.integers(1, 5),
    chunk=st.integers(1, 20),
    bias=st.booleans(),
    block_rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_reference_head_equals_its_logits(b, t, v, h, chunk, bias, block_rows, seed):
    # Hidden states + output layer in place of the reference logits: the same three outputs and the
    # same policy gradient as with the logits they project to. Cache-sized blocks of 1-3 rows, so one
    # output-layer matmul (over `chunk` rows) is cut into several blocks.
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    bias_t = torch.randn(v, generator=gen) if bias else None
    head = ReferenceHead(hidden, weight, bias_t, torch.float32)
    ref_logits = torch.nn.functional.linear(hidden, weight, bias_t)
    torch.testing.assert_close(head.logits(hidden), ref_logits)
    pol = (torch.randn(b, t, v, generator=gen) * 2).requires_grad_(True)
    pol2 = pol.detach().clone().requires_grad_(True)
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.randint(0, 2, (b, t), generator=gen) if seed % 2 else None
    with mock.patch.object(tokenops, "CPU_BLOCK_BYTES", 4 * v * block_rows):
        got = logprobs_and_kl(pol, head, ids, mask, chunk_size=chunk)
        want = logprobs_and_kl(pol2, ref_logits, ids, mask, chunk_size=chunk)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        up = torch.randn(b, t, generator=gen)
        ((got[0] + got[2]) * up).sum().backward()
        ((want[0] + want[2]) * up).sum().backward()
    torch.testing.assert_close(pol.grad, pol2.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="equal"):
        logprobs_and_kl(pol, ReferenceHead(hidden, weight[:-1], None, torch.float32), ids)


def test_reference_blocks_cover_every_row_once_in_order():
    # Blocks of 3 rows cut from output-layer matmuls over 7 rows: by slices (all rows) and by index.
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(10, 4, generator=gen), torch.randn(6, 4, generator=gen)
    head = ReferenceHead(hidden, weight, None, torch.float32)
    full = hidden @ weight.T
    for rows in (None, torch.tensor([0, 2, 3, 5, 6, 7, 8, 9])):
        seen = []
        for sel, logits in tokenops._reference_blocks(hidden, head, 10, rows, block=3, outer=7):
            assert logits.shape[0] <= 3
            torch.testing.assert_close(logits, full[sel])
            seen.extend(torch.arange(10)[sel].tolist())
        assert seen == (list(range(10)) if rows is None else rows.tolist())


def test_logprobs_and_kl_rejects_bad_input(batch):
    logits, ids, ref_logits = batch
    with pytest.raises(ValueError, match="equal"):
        logprobs_and_kl(logits, ref_logits[:, :4], ids)
    with pytest.raises(ValueError, match="outside"):
        logprobs_and_kl(logits, ref_logits, ids + 100)
    pol = logits.clone()
    pol[1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"batch rows \[1\]"):
        logprobs_and_kl(pol, ref_logits, ids)


# ----------------------------------------------------------------------------- check_finite


def test_check_finite_messages():
    check_finite("ok", torch.ones(3, 2))
    check_finite("ints", torch.arange(3))
    t = torch.zeros(4, 3)
    t[1, 0] = float("nan")
    t[3, 2] = float("-inf")
    with pytest.raises(NonFiniteError) as err:
        check_finite("chosen_logratios", t, rows=torch.tensor([10, 11, 12, 13]), step=7)
    msg = str(err.value)
    assert "chosen_logratios" in msg
    assert "1 NaN, 1 Inf" in msg
    assert "batch rows [1, 3]" in msg
    assert "row ids [11, 13]" in msg
    assert "step 7" in msg
    assert isinstance(err.value, FloatingPointError)
    with pytest.raises(NonFiniteError, match="loss contains"):
        check_finite("loss", torch.tensor(float("nan")))


# ----------------------------------------------------------------------------- pack_to_response_start


def test_pack_hand_example():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 1]])
    packed, pmask = pack_to_response_start(values, mask)
    torch.testing.assert_close(packed, torch.tensor([[2.0, 4.0, 0.0], [6.0, 7.0, 8.0]]))
    assert pmask.tolist() == [[True, True, False], [True, True, True]]
    packed.sum().backward()
    torch.testing.assert_close(values.grad, mask.float())


def test_pack_nan_outside_mask_does_not_leak():
    values = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    packed, _ = pack_to_response_start(values, torch.tensor([[0, 1], [1, 1]]))
    torch.testing.assert_close(packed, torch.tensor([[1.0, 0.0], [2.0, 3.0]]))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 7).flatmap(
            lambda t: st.tuples(
                st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b),
                st.lists(
                    st.lists(st.floats(-5, 5, allow_nan=False), min_size=t, max_size=t),
                    min_size=b,
                    max_size=b,
                ),
            )
        )
    )
)
def test_pack_property(data):
    mask_rows, value_rows = data
    mask = torch.tensor(mask_rows)
    values = torch.tensor(value_rows, dtype=torch.float64)
    packed, pmask = pack_to_response_start(values, mask)
    n = max(sum(r) for r in mask_rows)
    assert packed.shape == pmask.shape == (len(mask_rows), n)
    for b, (m, v) in enumerate(zip(mask_rows, value_rows, strict=True)):
        kept = [x for x, k in zip(v, m, strict=True) if k]
        assert packed[b, : len(kept)].tolist() == kept
        assert torch.all(packed[b, len(kept) :] == 0)
        assert pmask[b].tolist() == [True] * len(kept) + [False] * (n - len(kept))


# ----------------------------------------------------------------------------- memory


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while running ``fn`` (the forward's residual memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunked_ops_save_no_float32_vocab_copy():
    logits = torch.randn(2, 8, 1000, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(2, 8, 1000, dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 8))
    budget = logits.numel() * 2 * 2 + 16 * 4 * 8  # the (bf16) logits themselves + a few per-row values
    assert _saved_bytes(lambda: token_logprobs(logits, ids, chunk_size=4)) <= budget
    assert _saved_bytes(lambda: sequential_kl(ref, logits, chunk_size=4)) <= budget
    assert _saved_bytes(lambda: logprobs_and_kl(logits, ref, ids, chunk_size=4)) <= budget
    # the naive float32 log-softmax would save at least one [B, T, V] float32 tensor
    naive = _saved_bytes(lambda: torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]))
    assert naive >= logits.numel() * 4
