"""The anchors' forward reads the prompt's keys and values from the pair rows' forward (a speed path).

An anchor row is ``prompt + y_a`` and its chosen row is ``prompt + y_w`` (spec §5: anchors are sampled
for the same prompt). In a causal LM the keys and values at the prompt's positions depend on the prompt
alone, so the anchors' forward does not need to recompute them: :class:`PromptKV`, passed as the cache
of the pair rows' forward, keeps the chosen rows' prompt keys and values, and the anchors' forward
then runs over ``y_a`` only, attending to them. It is the same computation as
forwarding ``prompt + y_a`` (the triplet term's gradient reaches the prompt through the pair rows'
graph), minus the prompt's share of every anchor row in the policy forward, its backward and the
reference forward.

It needs a model whose cache is a plain key/value store per layer; :func:`prompt_cache_unsupported`
says why not otherwise, and the trainer then forwards full ``prompt + y_a`` rows instead. Under
gradient checkpointing transformers' checkpointed layers drop the cache (a cache that is written
would be written again when the backward replays the layer); both caches here only read or capture,
so :func:`keep_cache_when_checkpointing` lets them through, which is exact for non-reentrant
checkpointing (the replay sees the same keys); reentrant checkpointing runs the layers without a
graph, so the captured keys would carry no gradient, and it is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from tidpo.models import base_model

__all__ = [
    "PromptKV",
    "SharedPrompt",
    "checkpointing_in_use",
    "continuation_inputs",
    "keep_cache_when_checkpointing",
    "prompt_cache_unsupported",
    "rows_start_with_prompts",
    "split_shared_prompt",
]

# Architectures whose equality with the full-row forward the test suite checks on tiny random models
# (tests/test_prompt_cache.py); others may work but are not trusted blindly.
CHECKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
# Of those, the ones whose models hand the cache to their checkpointed layers (GPT-2 withholds it under
# gradient checkpointing), checked with non-reentrant checkpointing by the same tests.
CHECKPOINTING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
# Attention kernels those tests run (flash-attention needs a GPU the suite does not have).
CHECKED_ATTENTION = ("sdpa", "eager")


def prompt_cache_unsupported(model: torch.nn.Module) -> str | None:
    """Why the anchors cannot reuse the pair rows' prompt keys/values on ``model``; None when they can."""
    inner = base_model(model)
    if not isinstance(inner, PreTrainedModel):
        return f"{type(inner).__name__} is not a transformers model"
    config = inner.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in CHECKED_MODEL_TYPES:
        return f"model_type {model_type!r} is not among the checked architectures {CHECKED_MODEL_TYPES}"
    attention = getattr(inner.config, "_attn_implementation", None)
    if attention not in CHECKED_ATTENTION:
        return f"attn_implementation {attention!r} is not among the checked ones {CHECKED_ATTENTION}"
    if inner.config.is_encoder_decoder or getattr(config, "add_cross_attention", False):
        return "encoder-decoder / cross-attention models keep two caches"
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "prompt-learning adapters use the cache themselves"
    checkpointed = _checkpointed_layers(inner) if inner.training else []
    if checkpointed and model_type not in CHECKPOINTING_MODEL_TYPES:
        return f"under gradient checkpointing model_type {model_type!r} does not pass a cache to its layers"
    for layer in checkpointed:
        if not hasattr(type(layer), "_can_checkpoint_with_cache"):
            return "this transformers version's checkpointed layers cannot be told to keep a cache"
        partial_kwargs = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
        if partial_kwargs.get("use_reentrant") is not False:
            return (
                "reentrant gradient checkpointing runs the layers without a graph (the prompts' keys would get "
                'no gradient); use gradient_checkpointing_kwargs={"use_reentrant": False}'
            )
    layers = DynamicCache(config=config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        return f"its cache layers are {kinds}, not plain key/value layers (sliding window, linear attention)"
    return None


def _checkpointed_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    return [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]


def checkpointing_in_use(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` now would checkpoint its layers (enabled and training)."""
    inner = base_model(model)
    return inner.training and bool(_checkpointed_layers(inner))


@contextlib.contextmanager
def keep_cache_when_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Let :class:`PromptKV` and its continuation through transformers' checkpointed layers.

    They never store what a replay would add twice (the capture overwrites, the continuation keeps
    nothing), so a layer recomputed in the backward sees the keys of its first run.
    """
    layers = _checkpointed_layers(base_model(model))
    before = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            if value is None:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = value


class _PromptLayer(DynamicLayer):
    """Keeps the first ``length`` positions of rows ``:rows``; caches nothing for attention."""

    def __init__(self, rows: int, length: int):
        super().__init__()
        self.rows, self.length = rows, length
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # A copy of the slice (differentiable), not a view: a view would keep every row's keys alive
        # where nothing else does (reference forward, checkpointed layers).
        self.prompt = (
            key_states[: self.rows, :, : self.length].clone(),
            value_states[: self.rows, :, : self.length].clone(),
        )
        return key_states, value_states  # the forward attends to its own keys only, as without a cache

    def get_seq_length(self) -> int:
        return 0  # no past: positions and masks of the pair rows' forward are unchanged


class PromptKV(Cache):
    """Cache argument for the pair rows' forward that captures the prompts' keys and values.

    Args:
        model: the (PEFT-wrapped or bare) transformers model the forward runs; sets the layer count.
        rows: the first ``rows`` rows of the batch hold the prompts (the chosen rows).
        length: positions to keep, the longest prompt.
    """

    def __init__(self, model: torch.nn.Module, rows: int, length: int):
        config = base_model(model).config.get_text_config(decoder=True)
        n_layers = len(DynamicCache(config=config).layers)
        super().__init__(layers=[_PromptLayer(rows, length) for _ in range(n_layers)])
        self.config = config

    def _captured(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = [i for i, layer in enumerate(self.layers) if layer.prompt is None]
        if missing:
            raise RuntimeError(
                f"tidpo: the model did not pass layers {missing} through the cache, so the prompts' keys and "
                "values cannot be reused; set anchor_prompt_cache=False and share_prompt=False."
            )
        return [layer.prompt for layer in self.layers]

    def decode_cache(self) -> DynamicCache:
        """The captured prompts, detached, as a growing cache to decode continuations of them from."""
        cache = DynamicCache(config=self.config)
        for i, (keys, values) in enumerate(self._captured()):
            cache.update(keys.detach(), values.detach(), i)
        return cache

    def continuation(self, repeats: int = 1) -> Cache:
        """A cache holding the captured prompts, for a forward that continues them (keeps the graph).

        ``repeats`` tiles the prompts along the batch (row ``r`` continues prompt ``r % rows``), e.g. 2 for
        chosen and rejected rows continuing the same prompts; their gradients add up in the prompts' graph.
        """
        return Cache(
            layers=[
                _ContinuationLayer(*(t.repeat(repeats, 1, 1, 1) if repeats > 1 else t for t in prompt))
                for prompt in self._captured()
            ]
        )


class _ContinuationLayer(DynamicLayer):
    """Attends to a fixed prefix and the forward's own keys; stores nothing, so a forward replayed by
    gradient checkpointing sees the same keys as its first run."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.prefix = (keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.prefix[0], key_states], dim=-2), torch.cat(
            [self.prefix[1], value_states], dim=-2
        )

    def get_seq_length(self) -> int:
        return self.prefix[0].shape[-2]


def continuation_inputs(
    prompt_lengths: torch.Tensor, prefix_len: int, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask ``[B, prefix_len + N]`` and position ids ``[B, N]`` for ``N`` tokens continuing
    right-padded prompts of ``prompt_lengths`` (row ``b``'s prompt is ``prefix[b, :prompt_lengths[b]]``)."""
    prefix = torch.arange(prefix_len, device=completion_mask.device)[None] < prompt_lengths[:, None]
    attention_mask = torch.cat([prefix.long(), completion_mask.long()], dim=1)
    steps = torch.arange(completion_mask.shape[1], device=completion_mask.device)[None]
    return attention_mask, prompt_lengths[:, None] + steps


def rows_start_with_prompts(
    rows: torch.Tensor, completion_mask: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> bool:
    """Whether each right-padded row ``b`` is prompt ``b`` (left-padded in ``prompt_ids``) followed by
    its completion, which starts right after the prompt: what reusing the rows' prompt keys/values for
    continuations sampled from ``prompt_ids`` requires."""
    n, width = prompt_ids.shape
    lengths = prompt_mask.sum(1)
    if rows.shape[0] != n or int(lengths.max()) > rows.shape[1]:
        return False
    cols = min(width, rows.shape[1])
    j = torch.arange(cols, device=rows.device)[None]
    # Column j of a right-padded prompt is column j + width - length of the left-padded one.
    left = prompt_ids.gather(1, (j + width - lengths[:, None]).clamp(max=width - 1))
    same = (rows[:, :cols] == left) | (j >= lengths[:, None])
    starts = completion_mask.long().argmax(1)
    return bool(same.all()) and torch.equal(starts, lengths)


@dataclass
class SharedPrompt:
    """Pair rows re-cut as one prompt prefix per pair plus continuations (:func:`split_shared_prompt`).

    Row ``r`` of ``[chosen; rejected]`` is ``prefix[r % n] + ids[r]``: the prefix is the prompt minus its
    last token, and the continuation starts with that last token, so the continuation's logits at
    position ``j`` predict its token ``j + 1`` exactly as the full row's do, and every per-position
    computation (log-probs, KL, attribution, weights) runs on the continuation unchanged.
    """

    prefix_ids: torch.Tensor  # [n, P] right-padded prompts without their last token
    prefix_mask: torch.Tensor  # [n, P] long
    ids: torch.Tensor  # [R, W] continuations, right-padded
    valid: torch.Tensor  # [R, W] long: the continuation's real tokens
    completion: torch.Tensor  # [R, W] bool: the response tokens (not the prompt's last token)
    columns: torch.Tensor  # [R, W] the full row's column of each continuation position
    starts: torch.Tensor  # [R] prefix length of each row's prompt

    def attention(self, valid: torch.Tensor, starts: torch.Tensor | None = None):
        """(attention mask over prefix + continuation, position ids) for continuation rows ``valid``."""
        return continuation_inputs(self.starts if starts is None else starts, self.prefix_ids.shape[1], valid)

    def gather(self, full: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A ``[R, T']`` tensor aligned with the full rows, re-aligned with the continuations."""
        width = int(self.columns.max()) + 1
        if full.shape[1] < width:  # e.g. cached reference log-probs cut at the longest row of their batch
            full = torch.nn.functional.pad(full, (0, width - full.shape[1]), value=fill)
        return full.gather(1, self.columns).masked_fill(~self.valid.bool(), fill)


def split_shared_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
) -> SharedPrompt:
    """Cut right-padded pair rows ``[chosen; rejected]`` (``2n`` rows, pair ``b``'s rows ``b`` and
    ``n + b`` starting with its prompt of ``prompt_lengths[b] >= 2`` tokens) into :class:`SharedPrompt`.

    The caller checks that the rows do start with their prompts (:func:`rows_start_with_prompts`).
    """
    n = prompt_lengths.shape[0]
    rows, full_width = input_ids.shape
    starts = (prompt_lengths - 1).repeat(rows // n)
    prefix_width = int(starts.max())
    prefix_mask = (torch.arange(prefix_width, device=input_ids.device)[None] < starts[:n, None]).long()
    lengths = attention_mask.sum(1) - starts  # tokens from the prompt's last on (right padding)
    steps = torch.arange(int(lengths.max()), device=input_ids.device)[None]
    valid = steps < lengths[:, None]
    columns = (starts[:, None] + steps).clamp(max=full_width - 1)
    return SharedPrompt(
        prefix_ids=input_ids[:n, :prefix_width],
        prefix_mask=prefix_mask,
        ids=input_ids.gather(1, columns).masked_fill(~valid, 0),
        valid=valid.long(),
        completion=completion_mask.bool().gather(1, columns) & valid,
        columns=columns,
        starts=starts,
    )
