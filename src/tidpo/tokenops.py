"""Token-level tensor operations shared by the TI-DPO losses and the trainer.

Every per-token tensor ``[B, T]`` here is ALIGNED WITH INPUT POSITIONS: the value at position ``t``
belongs to the token ``input_ids[:, t]`` (its log-prob comes from ``logits[:, t - 1]``), and position 0
always holds 0. A response mask is 1 at the positions whose token is a response token.

Memory (spec §4, §10): the log-probs of the labels and the sequential KL are computed over the
vocabulary in chunks of ``chunk_size`` flattened ``B * T`` rows by custom autograd functions. The
forward pass keeps only one ``[chunk_size, V]`` float32 block alive at a time and saves for backward
just the logits themselves (already alive in the caller's graph) plus one float32 log-normaliser per
row; the backward pass recomputes the softmax chunk by chunk. So no ``[B, T, V]`` log-softmax is ever
materialised, in either direction; the only full-size tensor created is the gradient of the logits,
which autograd needs anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "NonFiniteError",
    "ReferenceHead",
    "check_finite",
    "label_logprobs",
    "logprobs_and_kl",
    "pack_to_response_start",
    "sequential_kl",
    "token_logprobs",
]

# 1024 rows x 49k vocab x 4 bytes = 200 MB per float32 block: small next to a model, large enough
# that the Python loop overhead is negligible.
DEFAULT_CHUNK_SIZE = 1024
IGNORE_INDEX = -100
# On CPU the chunk loops are memory-bound: each chunk goes through several elementwise passes, which
# run about twice as fast when the float32 block stays in cache than when it streams from RAM (KL
# forward+backward at 1024 x 49k: 1.9 s with one 200 MB block, 0.9 s with 3 MB blocks). So on CPU the
# rows per block are capped to about this many bytes; ``chunk_size`` stays the upper bound. GPUs keep
# ``chunk_size`` as given (big blocks keep them busy).
CPU_BLOCK_BYTES = 4 * 2**20
# Logits per output-layer matmul of a ReferenceHead on CPU (128 rows at a 49k vocabulary). Measured at
# SmolLM2's shapes (1016 rows, one thread), the KL's forward + backward took 0.79 s from logits; from
# hidden states 3.42 s in cache-sized 21-row matmuls (each re-reads the 113 MB weight), 1.85 s in
# 128-row ones, 1.76 s in 256-row ones (two matmuls of 0.48 s are the floor); 128 rows hold half the
# memory of 256.
CPU_HEAD_BYTES = 24 * 2**20


class ReferenceHead(NamedTuple):
    """The reference's logits as its final hidden states and output layer: ``hidden @ weight.T + bias``.

    :func:`logprobs_and_kl` takes this in place of ``[B, T, V]`` reference logits and computes the logits
    block by block (again in its backward) instead of holding them: ``H`` numbers per position instead of
    ``V``, for one more output-layer matmul. For models whose logits are exactly that projection.
    """

    hidden: Tensor  # [B, T, H]
    weight: Tensor  # [V, H]
    bias: Tensor | None
    dtype: torch.dtype  # of the matmul: what the reference's own head computes in (autocast included)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits of some hidden states ``[..., H] -> [..., V]``, as the reference's head computes them."""
        with torch.autocast(hidden.device.type, enabled=False):
            w = self.weight.detach().to(self.dtype)
            b = None if self.bias is None else self.bias.detach().to(self.dtype)
            return torch.nn.functional.linear(hidden.detach().to(self.dtype), w, b)


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite holds NaN or Inf (the run is broken; never hidden, spec §10).

    ``batch_rows`` lists the offending positions along the checked tensor's first dimension (None for a
    scalar), so callers can map them to data rows without parsing the message.
    """

    def __init__(self, message: str, batch_rows: list[int] | None = None):
        super().__init__(message)
        self.batch_rows = batch_rows


def check_finite(name: str, tensor: Tensor, *, rows: Tensor | None = None, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or Inf (spec §10: fail loudly).

    Not an equation of the paper: a guard around all of them (Eq. 5-14).

    Args:
        name: what the tensor is, used in the message.
        tensor: any shape; dimension 0 is taken as the batch dimension.
        rows: optional identifiers of the batch rows (e.g. dataset indices), shape ``[B]``; when given,
            the message lists these identifiers next to the row numbers.
        step: optional training step, quoted in the message.
    """
    if not torch.is_floating_point(tensor) and not torch.is_complex(tensor):
        return  # integer tensors cannot hold NaN/Inf
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    parts = [f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf"]
    bad = None
    if tensor.dim() == 0:
        parts.append(")")
    else:
        bad = (~finite).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        parts.append(f") in batch rows {bad}")
        if rows is not None:
            ids = rows.detach().flatten().cpu()
            parts.append(f" (row ids {[ids[i].item() for i in bad if i < ids.numel()]})")
    if step is not None:
        parts.append(f" at step {step}")
    parts.append(f"; shape {tuple(tensor.shape)}, dtype {tensor.dtype}.")
    raise NonFiniteError("".join(parts), batch_rows=bad)


def _chunks(n_rows: int, rows: Tensor | None, chunk_size: int) -> Iterator[slice | Tensor]:
    """Row selectors of at most ``chunk_size`` rows: slices (views) for all rows, index tensors otherwise."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rows is None:
        for start in range(0, n_rows, chunk_size):
            yield slice(start, min(start + chunk_size, n_rows))
    else:
        for start in range(0, rows.numel(), chunk_size):
            yield rows[start : start + chunk_size]


def _reference_blocks(
    ref: Tensor, head: ReferenceHead | None, n_rows: int, rows: Tensor | None, block: int, outer: int
) -> Iterator[tuple[slice | Tensor, Tensor]]:
    """``(row selector, reference logits of those rows)`` per block of at most ``block`` rows.

    ``ref`` holds the logits, or with a ``head`` the hidden states: then the output-layer matmul runs
    over ``outer`` rows at a time and its result is cut into blocks, so that one read of the layer's
    weight serves many cache-sized blocks.
    """
    if head is None:
        for sel in _chunks(n_rows, rows, block):
            yield sel, ref[sel]
        return
    for big in _chunks(n_rows, rows, max(outer, block)):
        logits = head.logits(ref[big])
        for start in range(0, logits.shape[0], block):
            part = slice(start, min(start + block, logits.shape[0]))
            sel = (
                big[part] if isinstance(big, Tensor) else slice(big.start + part.start, big.start + part.stop)
            )
            yield sel, logits[part]


def _block_rows(chunk_size: int, logits: Tensor) -> int:
    """Rows per block for ``[N, V]`` logits: ``chunk_size``, capped on CPU to stay cache-sized."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, CPU_BLOCK_BYTES // (4 * max(1, logits.shape[-1]))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/float32 logits (softmax sums need it), float64 kept (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LabelLogprob(torch.autograd.Function):
    """log softmax(z)[label] per row of a 2-D ``[N, V]`` tensor, chunked (see module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, rows: Tensor | None, chunk_size: int) -> Tensor:  # type: ignore[override]
        ctx.dtype = _compute_dtype(logits.dtype)
        out = torch.zeros(logits.shape[0], dtype=ctx.dtype, device=logits.device)
        lse = torch.zeros(logits.shape[0], dtype=ctx.dtype, device=logits.device)
        for sel in _chunks(logits.shape[0], rows, chunk_size):
            block = logits[sel].to(ctx.dtype)
            lse_sel = torch.logsumexp(block, dim=-1)
            lse[sel] = lse_sel
            out[sel] = block.gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1) - lse_sel
        ctx.save_for_backward(logits, labels, lse, rows if rows is not None else torch.empty(0))
        ctx.all_rows = rows is None
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, labels, lse, rows = ctx.saved_tensors
        rows = None if ctx.all_rows else rows
        grad = torch.zeros_like(logits)
        for sel in _chunks(logits.shape[0], rows, ctx.chunk_size):
            g = grad_out[sel].to(ctx.dtype).unsqueeze(-1)
            # d/dz (z_label - lse(z)) = onehot(label) - softmax(z). One float32 block per chunk, updated
            # in place (the subtraction promotes half/bf16 logits to float32 without a separate copy).
            block = logits[sel] - lse[sel].unsqueeze(-1)
            block.exp_().mul_(-g)
            block.scatter_add_(-1, labels[sel].unsqueeze(-1), g)
            grad[sel] = block.to(grad.dtype)
        return grad, None, None, None


def label_logprobs(
    logits: Tensor, labels: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, *, mask: Tensor | None = None
) -> Tensor:
    """Log-probability of each label under its own logits row, without a full log-softmax.

    Implements ``log pi(y_t | x, y_<t)``, the ingredient of the log-ratios ``r_t`` (spec §1, Eq. 9-12):
    ``out[..., i] = logits[..., i, labels[..., i]] - logsumexp(logits[..., i, :])``. NO shift is applied
    (the caller aligns labels with logits); see :func:`token_logprobs` for input-aligned log-probs.

    Args:
        logits: ``[..., V]`` in any float dtype.
        labels: ``[...]`` integer token ids; ``-100`` (ignore index) gives 0 and no gradient.
        chunk_size: at most this many flattened rows are processed at once (float32 per chunk; on
            CPU fewer, see ``CPU_BLOCK_BYTES``).
        mask: optional ``[...]``; rows where it is 0 are skipped (0 output, no compute).

    Returns:
        float32 ``[...]`` (float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"label_logprobs: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # a view for contiguous logits: no copy
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    bad = valid & ((flat_labels < 0) | (flat_labels >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"label_logprobs: label ids outside [0, {vocab}) at flattened rows {bad.nonzero()[:5].flatten().tolist()}"
        )
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    rows = None if bool(valid.all()) else valid.nonzero().flatten()
    out = _LabelLogprob.apply(flat, safe_labels, rows, _block_rows(chunk_size, flat))
    out = out.reshape(labels.shape)
    check_finite("label log-probs (logits hold NaN/Inf, or a label has probability 0)", out)
    return out


def token_logprobs(
    logits: Tensor, input_ids: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, *, mask: Tensor | None = None
) -> Tensor:
    """Per-token log-probs aligned with input positions: ``out[:, t] = log pi(input_ids[:, t] | <t)``.

    The building block of ``r_t = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)`` (spec §1,
    Eq. 9-12). ``out[:, t]`` comes from ``logits[:, t - 1]``; ``out[:, 0] = 0``. Computed in chunks of
    flattened rows, never as a full ``[B, T, V]`` log-softmax (see the module docstring).

    Args:
        logits: ``[B, T, V]`` causal-LM logits for ``input_ids``.
        input_ids: ``[B, T]``.
        chunk_size: flattened rows per float32 chunk.
        mask: optional ``[B, T]`` input-aligned mask (e.g. the completion mask): only those positions
            are computed, the others are 0 — saves the prompt's share of the vocabulary work.

    Returns:
        float32 ``[B, T]`` (float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: expected logits [B, T, V] and input_ids [B, T], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    # Row (b, t) of the logits predicts input_ids[b, t + 1]; the last row predicts nothing. Using
    # every row of the (contiguous) logits keeps the reshape a view instead of copying logits[:, :-1].
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    if mask is not None:
        shifted = torch.zeros_like(mask, dtype=torch.bool)
        shifted[:, :-1] = mask[:, 1:].bool()
        labels = labels.masked_fill(~shifted, IGNORE_INDEX)
    next_token = label_logprobs(logits, labels, chunk_size)
    return torch.nn.functional.pad(next_token[:, :-1], (1, 0))


class _LogprobsAndKL(torch.autograd.Function):
    """Per row of ``[N, V]`` policy and reference logits, in one pass over the vocabulary:
    ``log softmax(policy)[label]``, ``log softmax(ref)[label]`` and ``KL(softmax(ref) || softmax(policy))``.

    One kernel instead of three (policy log-probs, reference log-probs, KL) because each is
    memory-bound: fused, the two log-normalisers are computed once and the backward writes one
    gradient block instead of two that autograd would then add. Gradient to the policy only.
    """

    @staticmethod
    def forward(
        ctx,
        policy: Tensor,
        ref: Tensor,
        head: ReferenceHead | None,
        labels: Tensor,
        rows: Tensor | None,
        chunk_size: int,
        head_rows: int,
    ):  # type: ignore[override]
        ctx.dtype = _compute_dtype(policy.dtype)
        ctx.head = head
        n = policy.shape[0]
        pol_lp, ref_lp, kl, lse_pol, lse_ref = (
            torch.zeros(n, dtype=ctx.dtype, device=policy.device) for _ in range(5)
        )
        for sel, r in _reference_blocks(ref, head, n, rows, chunk_size, head_rows):
            p, lab = policy[sel], labels[sel].unsqueeze(-1)
            lr_norm = torch.logsumexp(r.to(ctx.dtype), dim=-1, keepdim=True)
            lp_norm = torch.logsumexp(p.to(ctx.dtype), dim=-1, keepdim=True)
            pol_lp[sel] = (p.gather(-1, lab).to(ctx.dtype) - lp_norm).squeeze(-1)
            ref_lp[sel] = (r.gather(-1, lab).to(ctx.dtype) - lr_norm).squeeze(-1)
            # Two float32 blocks per chunk, updated in place: term = log p_ref - log p_theta
            # = (r - lse_r) - (p - lse_p), then times p_ref.
            term = r - lr_norm
            p_ref = term.exp()
            term.sub_(p).add_(lp_norm).mul_(p_ref)
            # 0 * log 0 = 0: tokens the reference rules out (logit -inf) contribute nothing.
            term.masked_fill_(p_ref == 0, 0.0)
            kl[sel] = term.sum(dim=-1)
            lse_pol[sel] = lp_norm.squeeze(-1)
            lse_ref[sel] = lr_norm.squeeze(-1)
        ctx.save_for_backward(
            policy, ref, labels, lse_pol, lse_ref, rows if rows is not None else torch.empty(0)
        )
        ctx.all_rows = rows is None
        ctx.chunk_size, ctx.head_rows = chunk_size, head_rows
        ctx.mark_non_differentiable(ref_lp)
        return pol_lp, ref_lp, kl

    @staticmethod
    def backward(ctx, grad_pol_lp: Tensor, _grad_ref_lp: Tensor, grad_kl: Tensor):  # type: ignore[override]
        policy, ref, labels, lse_pol, lse_ref, rows = ctx.saved_tensors
        rows = None if ctx.all_rows else rows
        grad = torch.zeros_like(policy)
        blocks = _reference_blocks(ref, ctx.head, policy.shape[0], rows, ctx.chunk_size, ctx.head_rows)
        for sel, r in blocks:
            g_lp = grad_pol_lp[sel].to(ctx.dtype).unsqueeze(-1)
            g_kl = grad_kl[sel].to(ctx.dtype).unsqueeze(-1)
            # d/dz_theta [g_lp (z_label - lse(z)) + g_kl KL] = g_lp (onehot - s) + g_kl (s - p_ref)
            # = s (g_kl - g_lp) - g_kl p_ref + g_lp onehot, with s = softmax(z_theta). Two float32 blocks.
            block = (policy[sel] - lse_pol[sel].unsqueeze(-1)).exp_().mul_(g_kl - g_lp)
            p_ref = (r - lse_ref[sel].unsqueeze(-1)).exp_().mul_(g_kl)
            block.sub_(p_ref).scatter_add_(-1, labels[sel].unsqueeze(-1), g_lp)
            grad[sel] = block.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _next_token_rows(mask: Tensor | None, bsz: int, length: int, device: torch.device) -> Tensor:
    """Flattened logits rows that predict a masked (input-aligned) position: row (b, t) for mask[b, t + 1]."""
    needed = torch.zeros(bsz, length, dtype=torch.bool, device=device)
    if mask is None:
        needed[:, :-1] = True
    else:
        if mask.shape != (bsz, length):
            raise ValueError(f"mask {tuple(mask.shape)} does not match logits [B, T] = {(bsz, length)}")
        needed[:, :-1] = mask[:, 1:].bool()
    return needed.reshape(-1).nonzero().flatten()


def logprobs_and_kl(
    policy_logits: Tensor,
    ref_logits: Tensor | ReferenceHead,
    input_ids: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Policy log-probs, reference log-probs and the per-position KL, in one pass (spec §1, §4).

    Equal to ``token_logprobs(policy_logits, input_ids)``, ``token_logprobs(ref_logits, input_ids)``
    and ``sequential_kl(ref_logits, policy_logits)`` (all input-aligned, 0 at position 0 and where
    ``mask`` is 0), at about half the vocabulary passes of the three separately: the TDPO-KL variants
    (alpha > 0) need all three at every response position.

    Args:
        policy_logits: ``[B, T, V]``; the gradient flows to it only.
        ref_logits: ``[B, T, V]``, or a :class:`ReferenceHead` whose ``[B, T, H]`` hidden states stand in
            for them: the backward needs the reference's probabilities, and holding ``H`` numbers per
            position instead of ``V`` until then is what keeps the KL's memory down under gradient
            checkpointing (the logits blocks are computed twice instead).
        input_ids: ``[B, T]``.
        mask: optional ``[B, T]`` input-aligned response mask; only those positions are computed.
        chunk_size: flattened rows per float32 chunk (on CPU fewer, see ``CPU_BLOCK_BYTES``).

    Returns:
        ``(policy_logps, ref_logps, kl)``, float32 ``[B, T]`` each (float64 for float64 logits);
        ``ref_logps`` carries no gradient.
    """
    head = ref_logits if isinstance(ref_logits, ReferenceHead) else None
    ref = head.hidden if head is not None else ref_logits
    ref_width = head.weight.shape[0] if head is not None else ref.shape[-1]
    if (
        ref.shape[:2] != policy_logits.shape[:2]
        or ref_width != policy_logits.shape[-1]
        or policy_logits.dim() != 3
    ):
        raise ValueError(
            f"logprobs_and_kl: expected equal [B, T, V] logits, got {tuple(policy_logits.shape)} and "
            f"{(*ref.shape[:2], ref_width)}"
        )
    bsz, length, vocab = policy_logits.shape
    if input_ids.shape != (bsz, length):
        raise ValueError(
            f"logprobs_and_kl: input_ids {tuple(input_ids.shape)} do not match logits {(bsz, length)}"
        )
    labels = torch.zeros_like(input_ids, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    rows = _next_token_rows(mask, bsz, length, policy_logits.device)
    flat_labels = labels.reshape(-1)
    if rows.numel() and bool(((flat_labels[rows] < 0) | (flat_labels[rows] >= vocab)).any()):
        raise ValueError(f"logprobs_and_kl: token ids outside [0, {vocab}) at masked positions")
    outs = _LogprobsAndKL.apply(
        policy_logits.reshape(-1, vocab),
        ref.detach().reshape(bsz * length, -1),
        head,
        flat_labels,
        rows,
        _block_rows(chunk_size, policy_logits),
        # On CPU a cache-sized block is a few dozen rows: the head's matmul runs over more rows at a
        # time (CPU_HEAD_BYTES of logits), or every block would re-read the whole output layer.
        chunk_size
        if policy_logits.device.type != "cpu"
        else min(chunk_size, max(1, CPU_HEAD_BYTES // (4 * vocab))),
    )
    pol_lp, ref_lp, kl = (torch.nn.functional.pad(o.reshape(bsz, length)[:, :-1], (1, 0)) for o in outs)
    check_finite("policy log-probs (logits hold NaN/Inf, or a label has probability 0)", pol_lp)
    check_finite("reference log-probs (logits hold NaN/Inf, or a label has probability 0)", ref_lp)
    check_finite("sequential KL (logits hold NaN/Inf, or the policy rules out a reference token)", kl)
    return pol_lp, ref_lp, kl


def sequential_kl(
    ref_logits: Tensor,
    policy_logits: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Per-position ``KL(pi_ref(.|<t) || pi_theta(.|<t))`` over the full vocabulary (spec §4, TDPO term).

    ``out[:, t] = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` with both distributions taken from
    the logits at ``t - 1`` (input-aligned like :func:`token_logprobs`); ``out[:, 0] = 0``. Summing
    ``out`` over the response gives ``KL_seq(y)`` of spec §4. Computed in chunks of flattened rows;
    gradient flows to ``policy_logits`` only (the reference is treated as a constant). Use
    :func:`logprobs_and_kl` when the label log-probs are needed too.

    Args:
        ref_logits, policy_logits: ``[B, T, V]``.
        mask: optional ``[B, T]`` input-aligned response mask; positions where it is 0 are not
            computed and hold 0. Without it every position is computed (caller masks).
        chunk_size: flattened rows per float32 chunk.

    Memory: besides the policy logits, the (detached) reference logits are kept alive until the
    backward pass, in their own dtype; no float32 ``[B, T, V]`` copy of either is saved.

    Returns:
        float32 ``[B, T]`` (float64 for float64 logits).
    """
    if ref_logits.shape != policy_logits.shape or policy_logits.dim() != 3:
        raise ValueError(
            f"sequential_kl: expected equal [B, T, V] shapes, got {tuple(ref_logits.shape)} and "
            f"{tuple(policy_logits.shape)}"
        )
    bsz, length, _ = policy_logits.shape
    if mask is not None and mask.shape != (bsz, length):
        raise ValueError(
            f"sequential_kl: mask {tuple(mask.shape)} does not match logits [B, T] = {(bsz, length)}"
        )
    # The kernel also returns label log-probs; any in-range labels do (here token 0), then dropped.
    dummy_ids = torch.zeros(bsz, length, dtype=torch.long, device=policy_logits.device)
    return logprobs_and_kl(policy_logits, ref_logits, dummy_ids, mask, chunk_size=chunk_size)[2]


def pack_to_response_start(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's masked values to the front, in order: index 0 = first response token.

    Builds the per-response vectors ``b = r(y_w)``, ``c = r(y_l)``, ``d = r(y_a)`` of the triplet
    loss (spec §5, Eq. 13), so that position ``t`` of each vector is the ``t``-th response token.

    Args:
        values: ``[B, T]``.
        mask: ``[B, T]``, nonzero at the positions to keep.

    Returns:
        ``(packed, packed_mask)``, both ``[B, N]`` with ``N`` the largest count of kept positions in a
        row; ``packed`` is zero past each row's count and differentiable w.r.t. ``values`` (a gather);
        ``packed_mask`` is bool.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(
            f"pack_to_response_start: expected equal [B, T] shapes, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    keep = mask.bool()
    counts = keep.sum(dim=1)
    n = int(counts.max()) if keep.numel() else 0
    # A stable sort that puts kept positions (key 0) before dropped ones (key 1) keeps their order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    packed_mask = torch.arange(n, device=values.device).unsqueeze(0) < counts.unsqueeze(1)
    # where, not a product: a NaN in a dropped slot must not leak into the padding.
    packed = torch.where(
        packed_mask, values.gather(1, order), torch.zeros((), dtype=values.dtype, device=values.device)
    )
    return packed, packed_mask
