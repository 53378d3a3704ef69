"""Batched sampling from causal LMs.

Two entry points:

- :func:`generate` takes prompts as text (already templated) or as chat message lists, and returns
  decoded completions, ``K`` per prompt, in prompt order. Evaluation and the data builder use it.
- :func:`sample_completion_ids` takes already LEFT-padded prompt ids and returns only the generated
  token ids. The trainer's anchor sampling (paper Sec. 4.3) uses it on batches from the collator.

Both build on ``model.generate`` (KV cache, logits processors, stopping), run under ``torch.no_grad``
with the model in ``eval()`` mode, and put the model's previous mode back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)

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


def _generation_config(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    num_return_sequences: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
) -> GenerationConfig:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        sampling: dict[str, Any] = {
            "do_sample": True,
            "temperature": float(temperature),
            "top_k": int(top_k) if top_k else 0,
            "top_p": float(top_p) if top_p is not None else 1.0,
        }
    else:
        sampling = {"do_sample": False}
    # A fresh config: only what is asked for here applies, not sampling defaults a checkpoint ships.
    # K is only validated here: sample_completion_ids makes the K copies of each prompt itself, so
    # generate() always runs with 1 (it also refuses K > 1 for greedy decoding).
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_return_sequences=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        **sampling,
    )


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
) -> torch.Tensor:
    """Sample continuations of LEFT-padded prompts and return only the new token ids.

    Args:
        model: a causal LM with ``generate`` (a PEFT-wrapped model works too).
        prompt_input_ids, prompt_attention_mask: ``[B, P]``, left-padded (the last column is real).
        eos_token_id, pad_token_id: default to the model's generation config.
        do_sample: ``False`` for greedy decoding (then temperature/top_k/top_p are ignored).
        static_cache: decode into this ``transformers.StaticCache`` (reset first) instead of a growing
            cache; it must hold ``P + max_new_tokens`` positions of ``B`` rows (:func:`anchor_cache`).
            On GPU transformers compiles the decode step for a static cache (torch.compile
            "reduce-overhead", i.e. CUDA graphs): eager decoding is bound by kernel launches there.
            Passing the same cache object on every call keeps its tensors at fixed addresses, so later
            calls replay the recorded graphs instead of recording new ones. Same distribution; only
            with ``num_return_sequences = 1``.

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
    gen_defaults = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_defaults is not None:
        eos_token_id = gen_defaults.eos_token_id
    if pad_token_id is None and gen_defaults is not None:
        pad_token_id = gen_defaults.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    if pad_token_id is None:
        raise ValueError(
            "sample_completion_ids: no pad_token_id and no eos_token_id given or in the model config"
        )
    if static_cache is not None:
        needed = prompt_input_ids.shape[1] + max_new_tokens
        size = static_cache.layers[0].max_cache_len
        if size < needed:
            raise ValueError(
                f"static_cache holds {size} positions, fewer than {prompt_input_ids.shape[1]} prompt tokens + "
                f"max_new_tokens={max_new_tokens} = {needed}"
            )
        if num_return_sequences > 1:
            raise ValueError("static_cache is for one sample per prompt (num_return_sequences=1)")
        rows = getattr(static_cache.layers[0], "batch_size", None)  # set when first used
        if rows is not None and rows != prompt_input_ids.shape[0]:
            raise ValueError(
                f"static_cache was built for {rows} rows, the prompts have {prompt_input_ids.shape[0]}: "
                "use one cache per batch size"
            )
        static_cache.reset()
    config = _generation_config(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    device = model_device(model)
    ids, mask = prompt_input_ids.to(device), prompt_attention_mask.to(device)
    with eval_mode(model):
        cache = None
        if num_return_sequences > 1:
            # Copies made here rather than by generate(), which would run the prompt pass K times.
            if _can_share_prefill(model, mask):
                cache = _shared_prefill(model, ids, mask, num_return_sequences)
            ids = ids.repeat_interleave(num_return_sequences, dim=0)
            mask = mask.repeat_interleave(num_return_sequences, dim=0)
        cache = static_cache if static_cache is not None else cache
        extra = {} if cache is None else {cache_kwarg(model): cache}
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return sequences[:, prompt_input_ids.shape[1] :]


def _can_share_prefill(model: torch.nn.Module, mask: torch.Tensor) -> bool:
    # Only for plain transformers models (wrappers may not route past_key_values the same way), and
    # only when every prompt keeps a real token in the shared part (an all-padding row would attend
    # to nothing).
    return isinstance(model, PreTrainedModel) and mask.shape[1] >= 2 and bool((mask[:, :-1].sum(1) > 0).all())


def anchor_cache(model: torch.nn.Module, max_cache_len: int) -> StaticCache:
    """A static KV cache of ``max_cache_len`` positions for :func:`sample_completion_ids`.

    Its tensors are created on first use (shapes, dtype and device from the model's own keys and
    values) and then kept, zeroed in place between calls, for as long as the caller keeps the object:
    fixed addresses are what the compiled decode step's CUDA graphs need. One cache per batch size.
    """
    config = base_model(model).config.get_text_config(decoder=True)
    return StaticCache(config=config, max_cache_len=max_cache_len)


def _shared_prefill(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, k: int) -> DynamicCache:
    """Run the prompts (all but their last token) once and copy the KV cache for the K samples.

    ``generate`` would otherwise repeat each prompt K times before its first forward, and on CPU the
    prompt pass dominates short generations. ``generate`` then sees a cache covering all but the last
    prompt token and only feeds that token, exactly as it does after its own prefill.
    """
    cache = DynamicCache(config=model.config)
    head_ids, head_mask = ids[:, :-1], mask[:, :-1]
    # Same position ids as generate() derives from a left-padded mask.
    position_ids = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
    model(
        input_ids=head_ids,
        attention_mask=head_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kwarg(model): cache},
    )
    cache.batch_repeat_interleave(k)
    return cache


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


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus any extra stop ids the model's generation config lists (e.g. an
    end-of-turn token), so chat models stop where they were trained to."""
    ids: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_defaults = getattr(model, "generation_config", None)
    extra = getattr(gen_defaults, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("generate: neither the tokenizer nor the model's generation config has an EOS token")
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
    eos_ids = _eos_ids(model, tokenizer)
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
