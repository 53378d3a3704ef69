"""Tests of tidpo.losses: hand-computed values, DPO equivalence, gradients (gradcheck), stop-gradient, guards."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidpo.losses import (
    dpo_loss,
    ipo_loss,
    simpo_loss,
    tdpo_loss,
    triplet_loss,
    triplet_terms,
    weighted_margin,
    weighted_preference_loss,
)
from tidpo.tokenops import NonFiniteError


def nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log1p(math.exp(-x))


def rand_pair(seed: int, b: int = 3, t: int = 6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cm = (torch.rand(b, t, generator=gen) > 0.3).to(dtype)
    rm = (torch.rand(b, t, generator=gen) > 0.3).to(dtype)
    rc = torch.randn(b, t, generator=gen, dtype=dtype) * cm
    rr = torch.randn(b, t, generator=gen, dtype=dtype) * rm
    return rc, rr, cm, rm


# ----------------------------------------------------------------------------- weighted preference loss


def test_weighted_hand_computed():
    rc = torch.tensor([[0.0, 1.0, 2.0]])
    rr = torch.tensor([[0.0, -1.0, 0.5]])
    wc = torch.tensor([[0.0, 0.5, 1.5]])
    wr = torch.tensor([[0.0, 2.0, 0.0]])
    chosen, rejected = weighted_margin(rc, rr, wc, wr)
    torch.testing.assert_close(chosen, torch.tensor([3.5]))
    torch.testing.assert_close(rejected, torch.tensor([-2.0]))
    out = weighted_preference_loss(rc, rr, wc, wr, beta=0.1)
    torch.testing.assert_close(out, torch.tensor([nls(0.55)]))
    kc = torch.tensor([[0.0, 0.2, 0.1]])
    kr = torch.tensor([[0.0, 0.5, 0.5]])
    # z = 5.5 - 0.5 * (1.0 - 0.3) = 5.15
    for tdpo2 in (True, False):
        out = weighted_preference_loss(rc, rr, wc, wr, 0.1, kc, kr, alpha=0.5, tdpo2=tdpo2)
        torch.testing.assert_close(out, torch.tensor([nls(0.515)]))
    # alpha = 0 ignores the KL tensors
    torch.testing.assert_close(
        weighted_preference_loss(rc, rr, wc, wr, 0.1, kc, kr), torch.tensor([nls(0.55)])
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 2.0), st.integers(1, 5), st.integers(1, 9))
def test_uniform_weights_alpha_zero_is_dpo_exactly(seed, beta, b, t):
    rc, rr, cm, rm = rand_pair(seed, b, t)
    expected = dpo_loss(rc, rr, beta)
    assert torch.equal(
        weighted_preference_loss(rc, rr, torch.ones_like(rc), torch.ones_like(rr), beta), expected
    )
    # weights 1 on the response only: same, since log-ratios are 0 outside it
    assert torch.equal(weighted_preference_loss(rc, rr, cm, rm, beta), expected)


def test_weighted_loss_different_lengths():
    rc, _, _, _ = rand_pair(1, 2, 4)
    _, rr, _, _ = rand_pair(2, 2, 7)
    out = weighted_preference_loss(rc, rr, torch.ones_like(rc), torch.ones_like(rr), 0.1)
    torch.testing.assert_close(out, dpo_loss(rc, rr, 0.1))


def test_weighted_loss_gradcheck():
    rc, rr, cm, rm = rand_pair(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    wc = torch.rand(rc.shape, generator=gen, dtype=torch.float64) * cm * 2
    wr = torch.rand(rr.shape, generator=gen, dtype=torch.float64) * rm * 2
    kc = torch.rand(rc.shape, generator=gen, dtype=torch.float64) * cm
    kr = torch.rand(rr.shape, generator=gen, dtype=torch.float64) * rm
    inputs = [x.clone().requires_grad_(True) for x in (rc, rr, kc, kr)]

    def tdpo1(a, b, c, d):
        return weighted_preference_loss(a, b, wc, wr, 0.7, c, d, alpha=0.5, tdpo2=False)

    def tdpo2(a, b, d):  # chosen KL is a constant in TDPO2's gradient, so it is not a gradcheck input
        return weighted_preference_loss(a, b, wc, wr, 0.7, kc, d, alpha=0.5, tdpo2=True)

    assert torch.autograd.gradcheck(tdpo1, tuple(inputs))
    assert torch.autograd.gradcheck(tdpo2, (inputs[0], inputs[1], inputs[3]))


def test_tdpo2_stop_gradient_and_constant_weights():
    rc, rr, cm, rm = rand_pair(5)
    kc = (torch.rand(rc.shape) * cm).requires_grad_(True)
    kr = (torch.rand(rr.shape) * rm).requires_grad_(True)
    wc = torch.ones_like(rc).requires_grad_(True)
    wr = torch.ones_like(rr).requires_grad_(True)
    weighted_preference_loss(rc, rr, wc, wr, 0.1, kc, kr, alpha=0.5, tdpo2=True).sum().backward()
    assert kc.grad is None
    assert kr.grad.abs().sum() > 0
    assert wc.grad is None and wr.grad is None  # weights are constants (spec §2)
    kr.grad = None
    weighted_preference_loss(rc, rr, wc, wr, 0.1, kc, kr, alpha=0.5, tdpo2=False).sum().backward()
    assert kc.grad is not None and kc.grad.abs().sum() > 0
    # dL/dKL(y_w) = -dL/dKL(y_l) on each response token (they enter as -alpha (kr - kc))
    torch.testing.assert_close(kc.grad * cm * rm, -kr.grad * cm * rm)


def test_tdpo_loss_is_uniform_weighted():
    rc, rr, cm, rm = rand_pair(6)
    kc, kr = torch.rand(rc.shape) * cm, torch.rand(rr.shape) * rm
    for alpha, tdpo2 in ((1.0, False), (0.5, True)):
        torch.testing.assert_close(
            tdpo_loss(rc, rr, kc, kr, 0.2, alpha=alpha, tdpo2=tdpo2),
            weighted_preference_loss(rc, rr, cm, rm, 0.2, kc, kr, alpha=alpha, tdpo2=tdpo2),
        )
    # TDPO1 by hand: z = D - (KL_l - KL_w)
    d = rc.sum(1) - rr.sum(1) - (kr.sum(1) - kc.sum(1))
    torch.testing.assert_close(
        tdpo_loss(rc, rr, kc, kr, 0.2, alpha=1.0, tdpo2=False), -torch.nn.functional.logsigmoid(0.2 * d)
    )


def test_weighted_loss_errors():
    rc, rr, _, _ = rand_pair(7)
    ones_c, ones_r = torch.ones_like(rc), torch.ones_like(rr)
    with pytest.raises(ValueError, match="chosen_kl and rejected_kl"):
        weighted_preference_loss(rc, rr, ones_c, ones_r, 0.1, alpha=0.5)
    with pytest.raises(ValueError, match="chosen_weights has shape"):
        weighted_preference_loss(rc, rr, ones_c[:, :2], ones_r, 0.1)
    bad = rc.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"chosen_logratios .* batch rows \[2\]"):
        weighted_preference_loss(bad, rr, ones_c, ones_r, 0.1)
    with pytest.raises(NonFiniteError, match="rejected_weights"):
        weighted_preference_loss(rc, rr, ones_c, ones_r * float("inf"), 0.1)
    with pytest.raises(NonFiniteError, match="rejected_kl"):
        weighted_preference_loss(rc, rr, ones_c, ones_r, 0.1, ones_c, ones_r * float("nan"), alpha=0.5)


# ----------------------------------------------------------------------------- triplet


def test_triplet_hand_computed_with_different_lengths():
    d = torch.tensor([[1.0, 2.0, 3.0]])
    dm = torch.tensor([[1, 1, 1]])
    b = torch.tensor([[1.0, 1.0]])
    bm = torch.tensor([[1, 1]])
    c = torch.tensor([[0.0, 2.0, 3.0, 9.0]])
    cm = torch.tensor([[1, 1, 1, 0]])
    terms = triplet_terms(d, dm, b, bm, c, cm, margin=0.1)
    torch.testing.assert_close(terms.dist_pos, torch.tensor([1.0]))  # (2-1)^2 over the 2 shared positions
    torch.testing.assert_close(terms.dist_neg, torch.tensor([1.0]))  # (1-0)^2; position 3 is padding
    torch.testing.assert_close(terms.loss, torch.tensor([0.1]))
    torch.testing.assert_close(triplet_loss(d, dm, b, bm, c, cm, margin=0.1), terms.loss)
    # a shorter rejected response only counts the positions it has (anchor position 2 is ignored)
    t1 = triplet_terms(d, dm, b, bm, c[:, :2], cm[:, :2], margin=0.1)
    torch.testing.assert_close(t1.dist_neg, torch.tensor([1.0]))
    # a shorter anchor only compares its own positions
    t2 = triplet_terms(d[:, :1], dm[:, :1], b, bm, c, cm, margin=0.0)
    torch.testing.assert_close(t2.dist_pos, torch.tensor([0.0]))
    torch.testing.assert_close(t2.dist_neg, torch.tensor([1.0]))
    torch.testing.assert_close(t2.loss, torch.tensor([0.0]))


def test_triplet_hinge_zero_and_no_gradient_when_far():
    d = torch.zeros(2, 4, requires_grad=True)
    b = torch.full((2, 4), 0.01, requires_grad=True)
    c = torch.full((2, 4), 5.0, requires_grad=True)
    m = torch.ones(2, 4)
    out = triplet_loss(d, m, b, m, c, m, margin=0.1)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(d.grad == 0) and torch.all(b.grad == 0) and torch.all(c.grad == 0)


def test_triplet_gradcheck_and_gradient_direction():
    gen = torch.Generator().manual_seed(8)
    d, b, c = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    m = torch.ones(3, 5)
    m[1, 3:] = 0
    margin = 100.0  # far from the kink: the hinge is active everywhere
    inputs = tuple(x.clone().requires_grad_(True) for x in (d, b, c))
    assert torch.autograd.gradcheck(lambda x, y, z: triplet_loss(x, m, y, m, z, m, margin=margin), inputs)
    # away from the kink on the zero side the loss and its gradient vanish
    assert torch.autograd.gradcheck(lambda x, y, z: triplet_loss(x, m, y, m, z, m, margin=-100.0), inputs)
    # gradient pulls the anchor towards the chosen vector: d L / d d = 2 (d - b) - 2 (d - c) on valid entries
    a = d.clone().requires_grad_(True)
    triplet_loss(a, m, b, m, c, m, margin=margin).sum().backward()
    torch.testing.assert_close(a.grad, (2 * (d - b) - 2 * (d - c)) * m)


def test_triplet_uses_no_weights_and_checks_inputs():
    assert not any("weight" in name for name in inspect.signature(triplet_terms).parameters)
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(NonFiniteError, match="anchor_logratios"):
        triplet_loss(x + float("nan"), m, x, m, x, m)
    with pytest.raises(ValueError, match="mask of chosen_logratios"):
        triplet_loss(x, m, x, m[:, :2], x, m)
    with pytest.raises(ValueError, match="batch sizes differ"):
        triplet_loss(x, m, x[:1], m[:1], x, m)


# ----------------------------------------------------------------------------- baselines


def test_dpo_and_cdpo_hand_computed():
    rc = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, -1.0]])
    rr = torch.tensor([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]])
    # D = (3 - 1, -1 - 1) = (2, -2); beta = 0.5
    torch.testing.assert_close(dpo_loss(rc, rr, 0.5), torch.tensor([nls(1.0), nls(-1.0)]))
    eps = 0.1
    expected = torch.tensor([(1 - eps) * nls(1.0) + eps * nls(-1.0), (1 - eps) * nls(-1.0) + eps * nls(1.0)])
    torch.testing.assert_close(dpo_loss(rc, rr, 0.5, label_smoothing=eps), expected)
    # already-summed [B] inputs
    torch.testing.assert_close(dpo_loss(rc.sum(1), rr.sum(1), 0.5), dpo_loss(rc, rr, 0.5))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(rc, rr, 0.5, label_smoothing=0.5)
    with pytest.raises(NonFiniteError):
        dpo_loss(rc * float("inf"), rr, 0.5)


def test_ipo_hand_computed():
    rc = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    cm = torch.tensor([[0, 1, 1], [0, 0, 0]])
    rr = torch.tensor([[0.0, 0.0, -2.0], [0.0, 4.0, 2.0]])
    rm = torch.tensor([[0, 0, 1], [0, 1, 1]])
    # row 0: D = 2 - (-2) = 4, (4 - 1/(2*0.5))^2 = 9; row 1: empty chosen -> 0, D = -3, (-3 - 1)^2 = 16
    torch.testing.assert_close(ipo_loss(rc, rr, cm, rm, 0.5), torch.tensor([9.0, 16.0]))
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(rc, rr, cm, rm, 0.0)


def test_simpo_hand_computed():
    lc = torch.tensor([[-1.0, -3.0]])
    cm = torch.tensor([[1, 1]])
    lr = torch.tensor([[-4.0, -7.0, 0.0]])
    rm = torch.tensor([[1, 0, 0]])  # masked entries are ignored even when nonzero
    # avg chosen -2, avg rejected -4: z = 2 * 2 - 0.5 = 3.5
    torch.testing.assert_close(simpo_loss(lc, lr, cm, rm, 2.0, 0.5), torch.tensor([nls(3.5)]))
    out = simpo_loss(lc, lr, cm, rm, 2.0, 0.5, label_smoothing=0.1)
    torch.testing.assert_close(out, torch.tensor([0.9 * nls(3.5) + 0.1 * nls(-3.5)]))
    # TRL CPO form: beta * (D - gamma / beta)
    torch.testing.assert_close(
        simpo_loss(lc, lr, cm, rm, 2.0, 0.5),
        -torch.nn.functional.logsigmoid(torch.tensor([2.0 * (2.0 - 0.5 / 2.0)])),
    )


def test_baseline_gradients():
    rc, rr, cm, rm = rand_pair(9, dtype=torch.float64)
    inputs = (rc.clone().requires_grad_(True), rr.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, 0.3, 0.2), inputs)
    assert torch.autograd.gradcheck(lambda a, b: ipo_loss(a, b, cm, rm, 0.3), inputs)
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, cm, rm, 2.0, 0.5, 0.1), inputs)
