"""Batched sampling from causal LMs.

Two entry points:

- :func:`generate` takes prompts as text (already templated) or as chat message lists, and returns
  decoded completions, ``K`` per prompt, in prompt order. Evaluation and the data builder use it.
- :func:`sample_completion_ids` takes already LEFT-padded prompt ids and returns only the generated
  token ids. The trainer's anchor sampling (paper Sec. 4.3) uses it on batches from the collator.

Both decode with a KV cache and the sampling rules of transformers' ``generate`` (temperature, top-k,
top-p, stopping at EOS), run under ``torch.no_grad`` with the model in ``eval()`` mode, and put the
model's previous mode back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from transformers import (
    Cache,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from tidpo.importance import accepts_logits_to_keep
from tidpo.models import base_model, cache_kwarg, ensure_pad_token

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]  # noqa: UP007 (runtime alias on py3.10)

__all__ = ["Prompt", "anchor_cache", "generate", "render_prompt", "sample_completion_ids"]


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Dropout off while sampling; each model's train/eval mode is restored even on error."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block only, so sampling is reproducible without side effects."""
    if seed is None:
        yield
        return
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless module: nothing to move inputs to
        return torch.device("cpu")


def _check_sampling(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    num_return_sequences: int,
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if not do_sample:
        return
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def _candidates(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The kept tokens of temperature -> top-k -> top-p sampling; no host sync, and no sort under top-k.

    Returns ``(probs, ids, ranks, skip)``: ``probs`` ``[B, M + 1]`` sums to 1 per row; its first ``M``
    columns are the tokens ``ids`` ``[B, M]``, in descending order of logit, and its last column is the
    whole tie group of the k-th largest logit, of which top-p dropped the first ``skip`` ``[B, 1]`` in
    vocabulary order. ``ranks`` ``[B, V]`` counts the group's members up to each vocabulary id (its last
    column is the group's size; ``None`` without top-k).

    ``torch.topk`` gives the k largest, but generate's top-k keeps *every* token tied with the k-th
    (frequent with bf16 logits), however many. All of them share one value, so they need no order among
    themselves: one column holds their mass, and top-p's rule on the ascending order (where they come
    first) drops a count of them, ``floor((1 - top_p) / q)`` for a member's probability ``q``.
    """
    scores = logits.float() / temperature
    batch, vocab = scores.shape
    top_k = top_k if top_k and top_k < vocab else None
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    ranks = None
    n_tied = scores.new_zeros(batch, 1)
    if top_k is not None:
        values, ids = scores.topk(top_k, dim=-1)
        kth = values[:, -1:]
        ranks = (scores == kth).cumsum(-1, dtype=torch.int32)  # int32: half the bytes of the default
        n_tied = ranks[:, -1:].float()
        # The tie group gets its own column. Shifted by the top logit first: log(n) added at the scale of
        # a large kth (small temperatures) would be rounded to its float32 spacing.
        top = values[:, :1]
        values = values.masked_fill(values == kth, float("-inf")) - top
        group = (kth - top) + n_tied.log()
    else:
        if top_p is not None:
            values, ids = scores.sort(dim=-1, descending=True)  # the nucleus needs the whole order
        else:
            values, ids = scores, torch.arange(vocab, device=scores.device).expand(batch, vocab)
        group = scores.new_full((batch, 1), float("-inf"))
    probs = torch.cat([values, group], -1).softmax(-1)
    skip = torch.zeros_like(n_tied)
    if top_p is not None:
        above, group_mass = probs[:, :-1], probs[:, -1:]
        # generate's rule, on the ascending order (the tie group first, then the tokens above it): drop
        # where the cumulative probability <= 1 - top_p; the most likely token always stays.
        drop = above.flip(-1).cumsum(-1).flip(-1) + group_mass <= 1 - top_p
        drop[:, 0] = False
        q = group_mass / n_tied.clamp(min=1)
        skip = torch.where(q > 0, torch.floor((1 - top_p) / q), n_tied)
        only_group = values[:, :1] == float("-inf")  # every kept token is tied: one member must stay
        skip = torch.minimum(skip, n_tied - only_group.float()).clamp(min=0)
        probs = torch.cat([above.masked_fill(drop, 0.0), (n_tied - skip) * q], -1)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids, ranks, skip


def sampling_distribution(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The next-token distribution of temperature -> top-k -> top-p sampling, ``[B, V]``.

    The same distribution as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
    ``TopPLogitsWarper`` applied in that order (``generate``'s order) followed by a softmax over the
    whole vocabulary: top-k keeps every token tied with the k-th largest, top-p drops, in ascending
    order, the tokens whose cumulative probability stays <= 1 - top_p and always keeps the most likely.
    Where top-p drops some of several tied tokens, which ones is an order generate leaves unspecified
    too; here the lower vocabulary ids of the k-th logit's tie group go first. :func:`next_tokens`
    draws from it without building it (and without sorting under top-k).

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype; computed in float32 as ``generate`` does).
        top_k: ``None`` or 0 disables it. top_p: ``None`` or 1 disables it.
    """
    probs, ids, ranks, skip = _candidates(logits, temperature, top_k, top_p)
    full = torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device)
    full.scatter_add_(-1, ids, probs[:, :-1])
    if ranks is not None:
        tied = ranks.diff(dim=-1, prepend=ranks.new_zeros(ranks.shape[0], 1)) > 0
        kept = tied & (ranks > skip)  # members 1..n in vocabulary order; the first `skip` go
        full += kept * (probs[:, -1:] / kept.sum(-1, keepdim=True).clamp(min=1))
    return full


def next_tokens(
    logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """One token per row (``[B]``): a draw from :func:`sampling_distribution`, or the argmax.

    No host sync (a GPU decode loop keeps queueing work) and, under top-k, no sort of the vocabulary.
    """
    if not do_sample:
        return logits.argmax(-1)
    probs, ids, ranks, skip = _candidates(logits, temperature, top_k, top_p)
    column = torch.multinomial(probs, 1)
    token = ids.gather(-1, column.clamp(max=ids.shape[1] - 1))
    if ranks is not None:
        # The tie group's column: one of its kept members, uniformly, found by rank in vocabulary order.
        kept = ranks[:, -1:] - skip
        rank = skip + torch.floor(torch.rand_like(skip) * kept).clamp(max=kept - 1) + 1
        member = torch.searchsorted(ranks, rank.int()).long()
        token = torch.where(column == ids.shape[1], member, token)
    return token.squeeze(-1)


def _eos_list(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(i) for i in (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])]


@torch.no_grad()
def sample_completion_ids(
    model: PreTrainedModel,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = True,
    num_return_sequences: int = 1,
    static_cache: StaticCache | None = None,
    past: tuple[Cache, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample continuations of LEFT-padded prompts and return only the new token ids.

    A plain decode loop over the model's forward with a KV cache: one prompt pass (computing the last
    position's logits only), then one forward per new token. Tokens come from
    :func:`sampling_distribution`, the distribution ``generate`` samples from with the same settings,
    without its full-vocabulary sort and draw per token; stopping and padding follow ``generate``.

    Args:
        model: a causal LM (a PEFT-wrapped model works too).
        prompt_input_ids, prompt_attention_mask: ``[B, P]``, left-padded (the last column is real).
        eos_token_id, pad_token_id: default to the model's generation config.
        do_sample: ``False`` for greedy decoding (then temperature/top_k/top_p are ignored).
        num_return_sequences: ``K`` samples per prompt; the prompt pass runs once and its cache is
            copied ``K`` times.
        static_cache: decode into this ``transformers.StaticCache`` (reset first) instead of a growing
            cache; it must hold ``P + max_new_tokens`` positions of ``B`` rows (:func:`anchor_cache`).
            On CUDA the one-token decode step is then compiled (torch.compile "reduce-overhead", i.e.
            CUDA graphs; eager decoding is bound by kernel launches there). Passing the same cache object
            on every call keeps its tensors at fixed addresses, so later calls replay the recorded graphs.
            Same distribution; only with ``num_return_sequences = 1``.
        past: ``(cache, mask)`` when the prompts' first tokens were already forwarded: a growing cache
            (e.g. ``DynamicCache``) holding their keys/values for the ``B`` rows, which this call extends,
            and their ``[B, P0]`` attention mask (any padding pattern: a row's positions count its ones).
            ``prompt_input_ids`` then holds the rest of each prompt (e.g. its last token), and the prompt
            pass runs over those only. Not with ``static_cache``.

    Returns:
        ``LongTensor[B * num_return_sequences, N]`` with ``N <= max_new_tokens`` (generation stops when
        every row has produced EOS). A row's EOS is kept; positions after it hold ``pad_token_id``.
        Rows ``i*K .. i*K+K-1`` belong to prompt ``i``. On the model's device; no gradient.
    """
    if prompt_input_ids.dim() != 2 or prompt_input_ids.shape != prompt_attention_mask.shape:
        raise ValueError(
            "prompt_input_ids and prompt_attention_mask must both be [batch, length]; got "
            f"{tuple(prompt_input_ids.shape)} and {tuple(prompt_attention_mask.shape)}"
        )
    if prompt_input_ids.shape[1] == 0:
        raise ValueError("sample_completion_ids: the prompts are empty (length 0)")
    if not bool((prompt_attention_mask[:, -1] != 0).all()):
        raise ValueError(
            "sample_completion_ids needs LEFT-padded prompts (the last column of prompt_attention_mask "
            "must be 1 in every row); set tokenizer.padding_side = 'left'"
        )
    _check_sampling(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
    )
    gen_defaults = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_defaults is not None:
        eos_token_id = gen_defaults.eos_token_id
    if pad_token_id is None and gen_defaults is not None:
        pad_token_id = gen_defaults.pad_token_id
    eos = _eos_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else None
    if pad_token_id is None:
        raise ValueError(
            "sample_completion_ids: no pad_token_id and no eos_token_id given or in the model config"
        )
    batch, prompt_len = prompt_input_ids.shape
    if past is not None and static_cache is not None:
        raise ValueError("sample_completion_ids: past extends a growing cache; it cannot fill static_cache")
    if static_cache is not None:
        needed = prompt_len + max_new_tokens
        size = static_cache.layers[0].max_cache_len
        if size < needed:
            raise ValueError(
                f"static_cache holds {size} positions, fewer than {prompt_len} prompt tokens + "
                f"max_new_tokens={max_new_tokens} = {needed}"
            )
        if num_return_sequences > 1:
            raise ValueError("static_cache is for one sample per prompt (num_return_sequences=1)")
        rows = getattr(static_cache.layers[0], "batch_size", None)  # set when first used
        if rows is not None and rows != batch:
            raise ValueError(
                f"static_cache was built for {rows} rows, the prompts have {batch}: use one cache per batch size"
            )
        static_cache.reset()
    device = model_device(model)
    ids, mask = prompt_input_ids.to(device), prompt_attention_mask.to(device).long()
    k = num_return_sequences
    past_mask = mask.new_zeros(batch, 0) if past is None else past[1].to(device).long()
    if past_mask.shape[0] != batch:
        raise ValueError(f"past's mask has {past_mask.shape[0]} rows, the prompts {batch}")
    prompt_len += past_mask.shape[1]  # from here on: the columns of the whole prompt, past included
    mask = torch.cat([past_mask, mask], 1)
    # Every position after the prompt is real; later ones are hidden by causality until decoded. A static
    # cache attends over its whole length, so its mask covers that length.
    width = static_cache.layers[0].max_cache_len if static_cache is not None else prompt_len + max_new_tokens
    full_mask = torch.cat([mask, mask.new_ones(batch, width - prompt_len)], 1).repeat_interleave(k, 0)
    position = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_mask.shape[1] :]
    if past is not None:
        cache = past[0]
    elif static_cache is not None:
        cache = static_cache
    else:
        cache = DynamicCache(config=base_model(model).config)
    name = cache_kwarg(model)
    pick = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    with eval_mode(model):
        logits = _last_logits(
            model,
            input_ids=ids,
            attention_mask=full_mask[::k, : width if static_cache is not None else prompt_len],
            position_ids=position,
            **{name: cache},
        )
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, 0)
        step = _compiled_step(model) if static_cache is not None and device.type == "cuda" else _eager_step
        check_every = stop_check_interval(device)
        synced = synced_ranks(model)
        eos_ids = torch.tensor(eos, device=device, dtype=torch.long)
        finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
        next_position = position[:, -1:].repeat_interleave(k, 0) + 1
        tokens: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            token = next_tokens(logits, **pick).masked_fill(finished, pad_token_id)
            tokens.append(token)
            finished |= torch.isin(token, eos_ids)
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and _all_stopped(finished, synced)):
                break
            attention = full_mask if static_cache is not None else full_mask[:, : prompt_len + t + 1]
            logits = step(model, name, cache, token[:, None], next_position + t, attention)
    out = torch.stack(tokens, 1)
    if eos:
        # Trim the columns decoded after every row had stopped (generate stops at once here; these come
        # from checking every few tokens, or from waiting for other ranks).
        stopped = torch.isin(out, eos_ids).cumsum(1) > 0
        done_at = int((~stopped.all(0)).sum()) + 1
        out = out[:, : min(done_at, out.shape[1])]
    return out


def synced_ranks(model: torch.nn.Module) -> bool:
    """Whether every rank must run as many decode forwards as the slowest one: under ZeRO-3 or FSDP each
    forward gathers weights with the other ranks, and a rank that stopped would leave them waiting
    (transformers' ``synced_gpus`` rule)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)


def _all_stopped(finished: torch.Tensor, synced: bool) -> bool:
    if not synced:
        return bool(finished.all())
    running = (~finished).any().float()
    dist.all_reduce(running)  # summed over ranks: 0 once every rank is done
    return float(running) == 0.0


def stop_check_interval(device: torch.device) -> int:
    """Every how many tokens the decode loop asks whether all rows have stopped."""
    # On CUDA the question costs a host sync that idles the GPU; asking every few tokens keeps it fed.
    return 8 if device.type == "cuda" else 1


def _last_logits(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    if accepts_logits_to_keep(base_model(model)):
        inputs["logits_to_keep"] = 1  # the prompt pass needs the last position's logits only
    return model(use_cache=True, **inputs).logits[:, -1]


def _eager_step(
    model: torch.nn.Module,
    name: str,
    cache: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    return model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        **{name: cache},
    ).logits[:, -1]


class _DecodeStep:
    """A model's compiled decode step, kept on the model (as transformers keeps its compiled forward):
    a reference cycle the garbage collector frees with the model, where a global table would keep every
    model alive. Copies and pickles of the model start without one and compile their own."""

    def __init__(self) -> None:
        self.fn: Any = None

    def __deepcopy__(self, memo: dict) -> _DecodeStep:
        return _DecodeStep()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.fn = None


def _compiled_step(model: torch.nn.Module) -> Any:
    """The decode step compiled once per model: fixed shapes, CUDA graphs replayed on every call."""
    holder = model.__dict__.get("_tidpo_decode_step")
    if holder is None:
        holder = model.__dict__["_tidpo_decode_step"] = _DecodeStep()
    if holder.fn is None:

        def decode(
            name: str, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
        ):
            return _eager_step(model, name, cache, input_ids, position_ids, mask)

        compiled = torch.compile(decode, mode="reduce-overhead", dynamic=False)

        def step(_model: torch.nn.Module, *args: Any) -> torch.Tensor:
            # Each call starts a new CUDA-graph replay that overwrites the last one's output: copy it.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args).clone()

        holder.fn = step
    return holder.fn


def anchor_cache(model: torch.nn.Module, max_cache_len: int) -> StaticCache:
    """A static KV cache of ``max_cache_len`` positions for :func:`sample_completion_ids`.

    Its tensors are created on first use (shapes, dtype and device from the model's own keys and
    values) and then kept, zeroed in place between calls, for as long as the caller keeps the object:
    fixed addresses are what the compiled decode step's CUDA graphs need. One cache per batch size.
    """
    config = base_model(model).config.get_text_config(decoder=True)
    return StaticCache(config=config, max_cache_len=max_cache_len)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """A prompt as the text the model sees: strings as is, message lists through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
        raise TypeError(
            f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
        )
    if tokenizer.chat_template is None:
        raise ValueError(
            "a conversational prompt (message list) needs a tokenizer with a chat template; this "
            "tokenizer has none (set tokenizer.chat_template or pass plain strings)"
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    text = render_prompt(tokenizer, prompt)
    if isinstance(prompt, str):
        # Plain text gets the tokenizer's usual special tokens (e.g. a BOS for base models) unless the
        # text already starts with them, as an already-templated prompt does.
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
    else:
        add_special = False  # the chat template already wrote every special token it wants
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to zero tokens; cannot generate from an empty prompt")
    return list(ids)


def stop_token_ids(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, what: str | None = "generate"
) -> list[int]:
    """The tokenizer's EOS plus any extra stop ids the model's generation config lists (e.g. an
    end-of-turn token), so chat models stop where they were trained to.

    ``what``: the caller named in the error raised when there is no stop id at all; ``None`` returns an
    empty list instead (sampling then runs to its length limit).
    """
    ids: list[int] = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    gen_defaults = getattr(model, "generation_config", None)
    extra = getattr(gen_defaults, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids and what is not None:
        raise ValueError(f"{what}: neither the tokenizer nor the model's generation config has an EOS token")
    return ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = True,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Generate ``num_return_sequences`` completions for each prompt.

    Args:
        prompts: plain strings (used as is, e.g. already templated) or chat message lists (rendered
            with the tokenizer's chat template and ``add_generation_prompt=True``).
        batch_size: how many sequences (prompts x ``num_return_sequences``) one ``generate`` call
            produces at most; a batch always holds at least one prompt.
        seed: makes sampling reproducible (the global RNG state is saved and restored around it).
        progress: show a tqdm bar over batches.

    Returns:
        ``result[i]`` is the list of ``num_return_sequences`` completions (new tokens only, decoded
        with ``skip_special_tokens=True``) for ``prompts[i]``.
    """
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], Mapping)
    ):
        raise TypeError("generate expects a LIST of prompts (wrap a single prompt in a list)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    ensure_pad_token(tokenizer)
    encoded = [_encode(tokenizer, p) for p in prompts]
    k = num_return_sequences
    per_batch = max(1, batch_size // k)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory error shows
    # up on the first batch rather than the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
    device = model_device(model)
    eos_ids = stop_token_ids(model, tokenizer)
    results: list[list[str]] = [[] for _ in prompts]
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", unit="batch")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with seeded(seed, device):
            for batch in iterator:
                enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
                new_ids = sample_completion_ids(
                    model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_token_id=eos_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    do_sample=do_sample,
                    num_return_sequences=k,
                )
                texts = tokenizer.batch_decode(new_ids.cpu(), skip_special_tokens=True)
                for j, i in enumerate(batch):
                    results[i] = texts[j * k : (j + 1) * k]
    finally:
        tokenizer.padding_side = old_side
    return results
