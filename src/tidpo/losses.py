"""TI-DPO losses and the baselines it is compared with (spec §3-6, §8; paper Eq. 9-14).

Conventions: per-token inputs are ``[B, T]`` tensors aligned with input positions and ZERO outside
the response (log-ratios ``r_t = log pi_theta - log pi_ref``, per-token KL, weights); every loss
returns the per-pair loss ``[B]`` (the caller averages). Inputs holding NaN/Inf raise
:class:`tidpo.tokenops.NonFiniteError`.

TDPO1 / TDPO2 (spec §4, §8) are :func:`weighted_preference_loss` with uniform weights:
``tdpo_loss`` below passes ``torch.ones_like`` weights (the log-ratios are already 0 outside the
response, so weight 1 everywhere equals weight 1 on the response), ``alpha = 1, tdpo2=False`` for
TDPO1 and ``tdpo2=True`` (usually ``alpha = 0.5``) for TDPO2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tidpo.tokenops import check_finite

__all__ = [
    "TripletTerms",
    "dpo_loss",
    "ipo_loss",
    "simpo_loss",
    "tdpo_loss",
    "triplet_loss",
    "triplet_terms",
    "weighted_margin",
    "weighted_preference_loss",
]


def _per_token(name: str, tensor: Tensor, like: Tensor | None = None) -> Tensor:
    """Check a ``[B, T]`` per-token input (shape, finiteness)."""
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a per-token [B, T] tensor, got shape {tuple(tensor.shape)}")
    if like is not None and tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
    check_finite(name, tensor)
    return tensor


def _sequence_sum(name: str, tensor: Tensor) -> Tensor:
    """Sum a per-token ``[B, T]`` input over tokens; a ``[B]`` input is taken as already summed."""
    if tensor.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B, T] per-token or [B] summed, got shape {tuple(tensor.shape)}")
    check_finite(name, tensor)
    return tensor.sum(dim=-1) if tensor.dim() == 2 else tensor


def _length_mean(name: str, values: Tensor, mask: Tensor) -> Tensor:
    """Mean of a per-token input over its response mask (``sum / max(count, 1)``, as TRL)."""
    _per_token(name, values)
    if mask.shape != values.shape:
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, expected {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (conservative / cDPO form)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


# ----------------------------------------------------------------------------- TI-DPO (Eq. 9-12, spec §4)


def weighted_margin(
    chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_weights: Tensor, rejected_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Token-weighted log-ratio sums ``(sum_t w_t(y_w) r_t(y_w), sum_t w_t(y_l) r_t(y_l))`` (Eq. 9-11).

    Their difference is ``Delta`` of Eq. 12; ``beta`` times each is the logged reward. Weights are
    constants (detached): no gradient flows through them (spec §2).

    Returns:
        ``(chosen [B], rejected [B])``.
    """
    _per_token("chosen_logratios", chosen_logratios)
    _per_token("rejected_logratios", rejected_logratios)
    _per_token("chosen_weights", chosen_weights, like=chosen_logratios)
    _per_token("rejected_weights", rejected_weights, like=rejected_logratios)
    if chosen_logratios.shape[0] != rejected_logratios.shape[0]:
        raise ValueError(
            f"chosen and rejected batch sizes differ: {chosen_logratios.shape[0]} vs {rejected_logratios.shape[0]}"
        )
    chosen = (chosen_weights.detach().to(chosen_logratios.dtype) * chosen_logratios).sum(dim=-1)
    rejected = (rejected_weights.detach().to(rejected_logratios.dtype) * rejected_logratios).sum(dim=-1)
    return chosen, rejected


def weighted_preference_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_weights: Tensor,
    rejected_weights: Tensor,
    beta: float,
    chosen_kl: Tensor | None = None,
    rejected_kl: Tensor | None = None,
    alpha: float = 0.0,
    tdpo2: bool = True,
) -> Tensor:
    """Token-weighted DPO with the optional sequential-KL term: ``L_base`` per pair (Eq. 9-12, spec §4).

    ``Delta = sum_t w_t(y_w) r_t(y_w) - sum_t w_t(y_l) r_t(y_l)``; with ``alpha > 0``
    ``z = Delta - alpha (KL_seq(y_l) - sg(KL_seq(y_w)))`` where ``sg`` is a stop-gradient for TDPO2
    (``tdpo2=True``) and the identity for TDPO1; ``loss = -log sigmoid(beta z)``. ``alpha = 0`` is
    Eq. 12 exactly and, with all weights 1, plain DPO.

    Args:
        chosen_logratios, rejected_logratios: ``[B, T]`` per-token ``r_t``, 0 outside the response
            (chosen and rejected may have different lengths T).
        chosen_weights, rejected_weights: ``[B, T]`` token weights (constants, detached here).
        beta: DPO temperature.
        chosen_kl, rejected_kl: ``[B, T]`` per-token KL(pi_ref || pi_theta) (e.g. from
            :func:`tidpo.tokenops.sequential_kl`), 0 outside the response; summed here, unweighted.
            Required when ``alpha != 0``.
        alpha: weight of the KL term.
        tdpo2: stop the gradient through the chosen KL (TDPO2) or not (TDPO1).

    Returns:
        ``[B]`` per-pair loss.
    """
    chosen, rejected = weighted_margin(chosen_logratios, rejected_logratios, chosen_weights, rejected_weights)
    z = chosen - rejected
    if alpha != 0.0:
        if chosen_kl is None or rejected_kl is None:
            raise ValueError("alpha != 0 needs both chosen_kl and rejected_kl (per-token sequential KL)")
        kl_chosen = _per_token("chosen_kl", chosen_kl, like=chosen_logratios).sum(dim=-1)
        kl_rejected = _per_token("rejected_kl", rejected_kl, like=rejected_logratios).sum(dim=-1)
        if tdpo2:
            kl_chosen = kl_chosen.detach()
        z = z - alpha * (kl_rejected - kl_chosen)
    return -F.logsigmoid(beta * z)


def tdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    beta: float,
    alpha: float = 0.5,
    tdpo2: bool = True,
) -> Tensor:
    """TDPO1 / TDPO2 baselines: :func:`weighted_preference_loss` with uniform weights (spec §4, §8).

    TDPO1: ``alpha = 1, tdpo2 = False``; TDPO2: ``tdpo2 = True`` (stop-gradient on the chosen KL).

    Returns:
        ``[B]`` per-pair loss.
    """
    return weighted_preference_loss(
        chosen_logratios,
        rejected_logratios,
        torch.ones_like(chosen_logratios),
        torch.ones_like(rejected_logratios),
        beta,
        chosen_kl=chosen_kl,
        rejected_kl=rejected_kl,
        alpha=alpha,
        tdpo2=tdpo2,
    )


# ----------------------------------------------------------------------------- triplet (Eq. 13)


class TripletTerms(NamedTuple):
    """Per-pair triplet hinge ``loss`` and the squared distances ``dist_pos``, ``dist_neg`` (all ``[B]``)."""

    loss: Tensor
    dist_pos: Tensor
    dist_neg: Tensor


def _pad_to(values: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (with 0 / False) or truncate packed ``[B, N]`` vectors to ``length``."""
    extra = length - values.shape[1]
    if extra >= 0:
        return F.pad(values, (0, extra)), F.pad(mask.bool(), (0, extra))
    return values[:, :length], mask.bool()[:, :length]


def triplet_terms(
    anchor_logratios: Tensor,
    anchor_mask: Tensor,
    chosen_logratios: Tensor,
    chosen_mask: Tensor,
    rejected_logratios: Tensor,
    rejected_mask: Tensor,
    margin: float = 0.1,
) -> TripletTerms:
    """Triplet loss on per-token log-ratio vectors with its distances (Eq. 13, spec §5).

    Inputs are PACKED (index 0 = first response token, e.g. from
    :func:`tidpo.tokenops.pack_to_response_start`); the three may have different lengths and are
    padded to a common one. With ``b = r(y_w)``, ``c = r(y_l)``, ``d = r(y_a)``:
    ``dist_pos = sum_t (d_t - b_t)^2`` over positions valid in both anchor and chosen,
    ``dist_neg = sum_t (d_t - c_t)^2`` over positions valid in both anchor and rejected,
    ``loss = max(0, dist_pos - dist_neg + margin)``. Token weights are not used (spec §5).

    Returns:
        :class:`TripletTerms` of ``[B]`` tensors; gradients flow through all three log-ratio inputs.
    """
    names = ("anchor_logratios", "chosen_logratios", "rejected_logratios")
    values = (anchor_logratios, chosen_logratios, rejected_logratios)
    masks = (anchor_mask, chosen_mask, rejected_mask)
    for name, v, m in zip(names, values, masks, strict=True):
        _per_token(name, v)
        if m.shape != v.shape:
            raise ValueError(f"mask of {name} has shape {tuple(m.shape)}, expected {tuple(v.shape)}")
    if len({v.shape[0] for v in values}) != 1:
        raise ValueError(f"batch sizes differ: {[tuple(v.shape) for v in values]}")
    length = max(v.shape[1] for v in values)
    (d, dm), (b, bm), (c, cm) = (_pad_to(v, m, length) for v, m in zip(values, masks, strict=True))
    # Masked-out entries are replaced (not multiplied) so garbage there cannot leak in.
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    dist_pos = torch.where(dm & bm, (d - b) ** 2, zero).sum(dim=-1)
    dist_neg = torch.where(dm & cm, (d - c) ** 2, zero).sum(dim=-1)
    loss = torch.clamp(dist_pos - dist_neg + margin, min=0.0)
    return TripletTerms(loss, dist_pos, dist_neg)


def triplet_loss(
    anchor_logratios: Tensor,
    anchor_mask: Tensor,
    chosen_logratios: Tensor,
    chosen_mask: Tensor,
    rejected_logratios: Tensor,
    rejected_mask: Tensor,
    margin: float = 0.1,
) -> Tensor:
    """Per-pair triplet hinge ``max(0, dist_pos - dist_neg + margin)`` (Eq. 13); see :func:`triplet_terms`.

    Returns:
        ``[B]`` per-pair loss (``L_triplet`` of spec §5 is its mean).
    """
    return triplet_terms(
        anchor_logratios,
        anchor_mask,
        chosen_logratios,
        chosen_mask,
        rejected_logratios,
        rejected_mask,
        margin,
    ).loss


# ----------------------------------------------------------------------------- baselines (spec §8)


def dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO and cDPO: ``-(1 - eps) log sigmoid(beta D) - eps log sigmoid(-beta D)`` (spec §1, §8).

    ``D = sum_t r_t(y_w) - sum_t r_t(y_l)``; ``eps = label_smoothing`` (0 gives plain DPO, TRL's
    ``loss_type="sigmoid"``). The smoothed form is the conservative DPO of Mitchell (2023) as in TRL's
    CPO trainer and pre-1.0 DPO trainer; note TRL 1.16's DPO ``"sigmoid"`` ignores ``label_smoothing``
    (it only feeds its ``"robust"``/``"exo_pair"`` losses). Inputs are per-token ``[B, T]`` (0 outside
    the response) or already-summed ``[B]``.

    Returns:
        ``[B]`` per-pair loss.
    """
    delta = _sequence_sum("chosen_logratios", chosen_logratios) - _sequence_sum(
        "rejected_logratios", rejected_logratios
    )
    return _smoothed_sigmoid_loss(beta * delta, label_smoothing)


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
) -> Tensor:
    """IPO as in TRL 1.16 (``loss_type="ipo"``): ``(D - 1 / (2 beta))^2`` (spec §8; IPO paper Eq. 17).

    ``D`` is the difference of LENGTH-AVERAGED log-ratios: ``sum_t r_t / max(n, 1)`` per response,
    ``n`` = number of response tokens (TRL's normalisation, confirmed with the IPO authors).

    Returns:
        ``[B]`` per-pair loss.
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta must be > 0, got {beta}")
    delta = _length_mean("chosen_logratios", chosen_logratios, chosen_mask) - _length_mean(
        "rejected_logratios", rejected_logratios, rejected_mask
    )
    return (delta - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO as in TRL's CPO trainer (``loss_type="simpo"``, ``cpo_alpha=0``) (spec §8).

    Reference-free: ``z = beta (avg log pi_theta(y_w) - avg log pi_theta(y_l)) - simpo_gamma`` with
    per-token POLICY log-probs averaged over each response (``sum / max(n, 1)``; TRL divides by ``n``
    and gives NaN for an empty response); ``loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``.
    (TRL writes ``z = beta (D - simpo_gamma / beta)``, the same thing.)

    Returns:
        ``[B]`` per-pair loss.
    """
    delta = _length_mean("chosen_logps", chosen_logps, chosen_mask) - _length_mean(
        "rejected_logps", rejected_logps, rejected_mask
    )
    return _smoothed_sigmoid_loss(beta * delta - simpo_gamma, label_smoothing)
