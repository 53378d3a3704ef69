"""Token importance for TI-DPO (spec §2, paper Eq. 5-8).

- :func:`gradient_attribution` / :func:`attribution_from_logits` / :func:`attribution_from_targets`: raw scores ``I_i`` by gradient
  attribution on the policy (Eq. 5-6).
- :func:`gaussian_prior`: the positional prior ``P`` (Eq. 7).
- :func:`hybrid_weights`: ``W = lambda I_norm + (1 - lambda) P`` rescaled to mean 1 over the span (Eq. 8).
- :func:`importance_weights`: Eq. 8 and the ablations of spec §8 behind one ``mode`` switch.

All weight tensors are ``[B, T]`` aligned with input positions (the weight multiplying ``r_t`` is the
importance of token ``y_t``'s own input embedding), float32, detached, mean 1 over the span and 0
outside it. NaN/Inf anywhere raise :class:`tidpo.tokenops.NonFiniteError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from tidpo.tokenops import check_finite

__all__ = [
    "IMPORTANCE_MODES",
    "attribution_from_logits",
    "attribution_from_targets",
    "gaussian_prior",
    "gradient_attribution",
    "hybrid_weights",
    "importance_weights",
]

IMPORTANCE_MODES = ("hybrid", "uniform", "random", "prior", "gradient", "softmax")


# ----------------------------------------------------------------------------- attribution (Eq. 5-6)


def _last_valid_position(attention_mask: Tensor) -> Tensor:
    """Index of the last position with mask 1 in each row (right, left or no padding)."""
    mask = attention_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(mask.shape)}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"attention_mask has no attended position in rows {empty.nonzero().flatten().tolist()}"
        )
    length = mask.shape[1]
    # argmax returns the first maximum, so search the flipped mask for the last 1.
    return length - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def attribution_from_targets(
    targets: Tensor, inputs_embeds: Tensor, attention_mask: Tensor, retain_graph: bool = False
) -> Tensor:
    """Gradient attribution from per-row targets already selected (Eq. 6, given Eq. 5's ``L_target``).

    ``I_i = sum_k |d (sum_b targets_b) / d e_i[k]|``, via ``torch.autograd.grad`` w.r.t.
    ``inputs_embeds`` only (parameter ``.grad`` untouched), zeroed where ``attention_mask`` is 0.
    Use it when the targets come from somewhere cheaper than full logits (e.g. the LM head applied
    to the last valid hidden state only); :func:`attribution_from_logits` selects them for you.

    Args:
        targets: ``[B']``, one per row of interest (``B' <= B`` allowed, e.g. pair rows only, the
            other rows then get 0); each target must depend on its own row of ``inputs_embeds`` only.
        inputs_embeds: ``[B, T, D]`` input embeddings (a leaf or not) that require grad.
        attention_mask: ``[B, T]``.
        retain_graph: keep the graph for a later backward through it (fused path).

    Returns:
        float32 ``[B, T]`` detached scores, 0 at padding.
    """
    if targets.dim() != 1 or inputs_embeds.dim() != 3 or inputs_embeds.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"attribution_from_targets: expected targets [B'], inputs_embeds [B, T, D], attention_mask [B, T], got "
            f"{tuple(targets.shape)}, {tuple(inputs_embeds.shape)}, {tuple(attention_mask.shape)}"
        )
    check_finite("attribution targets", targets)
    if not inputs_embeds.requires_grad:
        raise ValueError(
            "inputs_embeds must require grad (make it a leaf with requires_grad_(True)) for attribution"
        )
    # One backward of the summed targets gives every row's gradient at once: rows do not interact in
    # a causal LM forward (no batch norm), so d(sum_b L_b)/d e_{b,i} = d L_b / d e_{b,i}.
    (grad,) = torch.autograd.grad(targets.sum(), inputs_embeds, retain_graph=retain_graph)
    scores = grad.detach().float().abs().sum(dim=-1) * attention_mask.to(torch.float32)
    check_finite("gradient attribution scores", scores)
    return scores


def attribution_from_logits(
    logits: Tensor, inputs_embeds: Tensor, attention_mask: Tensor, retain_graph: bool = False
) -> Tensor:
    """Gradient attribution ``I_i = sum_k |d L_target / d e_i[k]|`` from an existing forward graph (Eq. 5-6).

    ``L_target`` of a row is the largest logit at its LAST attended position (last index where
    ``attention_mask == 1``, so right and left padding both work). The gradient is taken w.r.t.
    ``inputs_embeds`` only with ``torch.autograd.grad``, so parameter ``.grad`` fields are untouched.

    This is the piece a trainer uses on its own policy forward (the fused path): run the policy with
    ``inputs_embeds`` that require grad, call this with ``retain_graph=True``, then backpropagate the
    loss through the same graph. Note the fused path does not switch dropout off (spec §2 wants it
    off); :func:`gradient_attribution` does a separate pass in eval mode.

    Args:
        logits: ``[B, T, V]`` produced from ``inputs_embeds``.
        inputs_embeds: ``[B, T, D]``, requires grad, part of the graph of ``logits``.
        attention_mask: ``[B, T]``; every row needs at least one attended position.
        retain_graph: keep the graph for a later backward through it.

    Returns:
        float32 ``[B, T]`` detached scores, 0 at padding.
    """
    if (
        logits.dim() != 3
        or logits.shape[:2] != attention_mask.shape
        or inputs_embeds.shape[:2] != attention_mask.shape
    ):
        raise ValueError(
            f"attribution_from_logits: expected logits [B, T, V], inputs_embeds [B, T, D] and attention_mask "
            f"[B, T], got {tuple(logits.shape)}, {tuple(inputs_embeds.shape)}, {tuple(attention_mask.shape)}"
        )
    last = _last_valid_position(attention_mask)
    rows = torch.arange(logits.shape[0], device=logits.device)
    targets = logits[rows, last.to(logits.device)].max(dim=-1).values  # Eq. 5
    return attribution_from_targets(targets, inputs_embeds, attention_mask, retain_graph)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes transformers' ``logits_to_keep`` (skip the LM head where unused)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def gradient_attribution(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Raw token importance by gradient attribution on the policy, as a separate pass (Eq. 5-6).

    Feeds the sequences through ``model`` from detached input embeddings made a leaf that requires
    grad, with ``position_ids = cumsum(attention_mask) - 1`` so left padding gives the same scores as
    no padding. The target of each row is its largest logit at its last attended position (Eq. 5);
    ``I_i`` is the L1 norm over the embedding dimension of its gradient (Eq. 6); padding gets 0.

    The model is put in eval mode (dropout off) and its mode restored afterwards, also on error; the
    pass runs under ``torch.enable_grad()`` so it works inside a caller's ``torch.no_grad()``; only
    the embeddings are differentiated, so parameter ``.grad`` fields are left as they were.

    Args:
        model: a causal LM taking ``inputs_embeds``, ``attention_mask``, ``position_ids``.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.

    Returns:
        float32 ``[B, T]`` detached scores, on the model's device.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"gradient_attribution: input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [B, T]"
        )
    last = _last_valid_position(attention_mask)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}
            if accepts_logits_to_keep(model):
                # Only the last valid position's logits are needed: skip the [B, T, V] projection.
                kwargs["logits_to_keep"] = last.unsqueeze(1)
            logits = model(**kwargs, use_cache=False).logits
            if logits.shape[1] == input_ids.shape[1]:
                rows = torch.arange(logits.shape[0], device=logits.device)
                target_logits = logits[rows, last.to(logits.device)]
            elif logits.shape[1] == 1:
                target_logits = logits[:, 0]
            else:
                raise RuntimeError(f"gradient_attribution: unexpected logits shape {tuple(logits.shape)}")
            targets = target_logits.max(dim=-1).values  # Eq. 5
            return attribution_from_targets(targets, embeds, attention_mask, retain_graph=False)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- prior and mixing (Eq. 7-8)


def _prior_on_grid(rank: Tensor, n: Tensor, sigma_div: float) -> Tensor:
    """Unnormalised Eq. 7 evaluated at (float) positions ``rank`` for span lengths ``n``."""
    mu = (n - 1) / 2
    sigma = torch.clamp(n / sigma_div, min=1.0)
    return torch.exp(-0.5 * ((rank - mu) / sigma) ** 2)


def gaussian_prior(n: int, sigma_div: float = 4.0) -> Tensor:
    """Gaussian positional prior over a span of ``n`` tokens (Eq. 7), normalised to sum 1.

    ``P(t) = exp(-0.5 ((t - mu) / sigma)^2)`` with ``mu = (n - 1) / 2``, ``sigma = max(1, n / sigma_div)``,
    ``t = 0..n-1``. ``n = 0`` gives an empty tensor.

    Returns:
        float32 ``[n]``.
    """
    if n < 0:
        raise ValueError(f"gaussian_prior: n must be >= 0, got {n}")
    if sigma_div <= 0:
        raise ValueError(f"gaussian_prior: sigma_div must be > 0, got {sigma_div}")
    t = torch.arange(n, dtype=torch.float64)
    p = _prior_on_grid(t, torch.tensor(float(n), dtype=torch.float64), sigma_div)
    return (p / p.sum()).float() if n else p.float()


def _span_geometry(span_mask: Tensor, sigma_div: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row span mask (bool), span length ``n`` [B, 1] and the Eq. 7 prior on the rank grid (float64)."""
    if span_mask.dim() != 2:
        raise ValueError(f"span_mask must be [B, T], got shape {tuple(span_mask.shape)}")
    if sigma_div <= 0:
        raise ValueError(f"sigma_div must be > 0, got {sigma_div}")
    mask = span_mask.bool()
    n = mask.sum(dim=1, keepdim=True).to(torch.float64)
    # Position of each span token within its span (0..n-1); off-span entries are masked below.
    rank = (mask.cumsum(dim=1) - 1).clamp(min=0).to(torch.float64)
    prior = _prior_on_grid(rank, n, sigma_div) * mask
    prior = prior / prior.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return mask, n, prior


def _check_scores(scores: Tensor | None, span_mask: Tensor, mode: str, nonnegative: bool) -> Tensor:
    if scores is None:
        raise ValueError(f"importance mode {mode!r} needs attribution scores, got scores=None")
    if scores.shape != span_mask.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and span_mask {tuple(span_mask.shape)} must have the same shape"
        )
    check_finite("importance scores", scores)
    if nonnegative:
        negative = (scores < 0) & span_mask.bool()
        if bool(negative.any()):
            rows = negative.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"importance scores must be >= 0 (they are L1 norms of gradients, Eq. 6); negative values in batch rows {rows}"
            )
    return scores.detach().to(torch.float64)


def _to_mean_one(weights: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    """Renormalise per row to sum 1 over the span, times n (mean 1); 0 outside and for empty spans."""
    weights = weights * mask
    total = weights.sum(dim=1, keepdim=True)
    out = torch.where(
        n > 0, weights / total.clamp(min=torch.finfo(torch.float64).tiny) * n, torch.zeros_like(weights)
    )
    return out.float()


def hybrid_weights(
    scores: Tensor, span_mask: Tensor, lambda_importance: float = 0.7, sigma_div: float = 4.0
) -> Tensor:
    """Hybrid token weights ``W = lambda I_norm + (1 - lambda) P`` over each row's span (Eq. 8).

    Per row, over the positions where ``span_mask`` is true re-indexed ``0..n-1`` (vectorised, no loop
    over rows): ``I_norm = I / sum(I)`` (the prior alone when the sum is 0), ``P`` the Gaussian prior
    of Eq. 7, ``W`` renormalised to sum 1 and multiplied by ``n`` so the weights have mean 1 over the
    span (spec §2: the authors' rescaling); 0 outside the span; a one-token span gets 1; an empty
    span gets all zeros.

    Args:
        scores: ``[B, T]`` non-negative raw importance (Eq. 6); NaN/Inf or negatives raise.
        span_mask: ``[B, T]`` bool/0-1 weighting span (response tokens, spec §2).
        lambda_importance: mixing weight ``lambda`` in [0, 1].
        sigma_div: ``sigma = max(1, n / sigma_div)`` in Eq. 7.

    Returns:
        float32 ``[B, T]``, detached.
    """
    if not 0.0 <= lambda_importance <= 1.0:
        raise ValueError(f"lambda_importance must lie in [0, 1], got {lambda_importance}")
    values = _check_scores(scores, span_mask, "hybrid", nonnegative=True)
    mask, n, prior = _span_geometry(span_mask, sigma_div)
    values = values * mask
    total = values.sum(dim=1, keepdim=True)
    # All-zero attribution (e.g. a saturated target) carries no information: fall back to the prior.
    i_norm = torch.where(total > 0, values / total.clamp(min=torch.finfo(torch.float64).tiny), prior)
    mixed = lambda_importance * i_norm + (1.0 - lambda_importance) * prior
    return _to_mean_one(mixed, mask, n).to(span_mask.device)


def importance_weights(
    mode: str,
    scores: Tensor | None,
    span_mask: Tensor,
    lambda_importance: float = 0.7,
    sigma_div: float = 4.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Token weights for TI-DPO and its ablations (Eq. 8; spec §8), mean 1 over the span, 0 outside.

    Modes:
        ``"hybrid"``: Eq. 8 with ``lambda_importance`` (the paper's method).
        ``"uniform"``: 1 on the span (plain DPO weighting).
        ``"random"``: i.i.d. Uniform(0, 1] draws from ``generator``, one per span token in reading
        order (row by row), normalised to mean 1.
        ``"prior"``: Eq. 8 with lambda = 0 (Gaussian prior of Eq. 7 only).
        ``"gradient"``: Eq. 8 with lambda = 1 (no prior).
        ``"softmax"``: softmax of the raw scores over the span, times n (spec §8 decision).

    Args:
        mode: one of :data:`IMPORTANCE_MODES`.
        scores: ``[B, T]`` raw attribution scores; may be None for uniform/random/prior.
        span_mask: ``[B, T]`` weighting span.
        lambda_importance, sigma_div: see :func:`hybrid_weights`.
        generator: random source for ``"random"`` (its device is used for the draws); or one generator
            per row, each drawing that row's span values (draws that follow the data rows).

    Returns:
        float32 ``[B, T]``, detached, on ``span_mask``'s device.
    """
    if mode not in IMPORTANCE_MODES:
        raise ValueError(f"unknown importance mode {mode!r}; valid modes: {', '.join(IMPORTANCE_MODES)}")
    if mode == "hybrid":
        return hybrid_weights(scores, span_mask, lambda_importance, sigma_div)  # type: ignore[arg-type]
    if mode == "gradient":
        return hybrid_weights(_check_scores(scores, span_mask, mode, True), span_mask, 1.0, sigma_div)
    mask, n, prior = _span_geometry(span_mask, sigma_div)
    if mode == "prior":
        return _to_mean_one(prior, mask, n).to(span_mask.device)
    if mode == "uniform":
        return mask.float()
    if mode == "random":
        # One draw per span token, in reading order, so a token's weight does not depend on how many
        # positions come before the span (whole rows or share_prompt's continuations draw alike).
        # 1 - U[0, 1) lies in (0, 1]: strictly positive, so every span token keeps some weight.
        sources = list(generator) if isinstance(generator, Sequence) else [generator] * mask.shape[0]
        if len(sources) != mask.shape[0]:
            raise ValueError(f"random weights: {len(sources)} generators for {mask.shape[0]} rows")
        draws = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
        for row, (source, count) in enumerate(zip(sources, mask.sum(1).tolist(), strict=True)):
            device = source.device if source is not None else mask.device
            uniform = torch.rand(int(count), generator=source, device=device, dtype=torch.float64)
            draws[row, mask[row]] = 1.0 - uniform.to(mask.device)
        return _to_mean_one(draws, mask, n)
    # softmax: any finite real scores are acceptable.
    values = _check_scores(scores, span_mask, mode, nonnegative=False)
    logits = values.masked_fill(~mask, float("-inf"))
    # Rows with an empty span would be softmax over all -inf (NaN); they are zeroed by _to_mean_one.
    soft = torch.softmax(torch.where(n > 0, logits, torch.zeros_like(logits)), dim=1)
    return _to_mean_one(soft, mask, n).to(span_mask.device)
