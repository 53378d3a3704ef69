"""Helpers that keep TI-DPO correct when `accelerate` shards the run (DDP, DeepSpeed ZeRO, FSDP).

TI-DPO does three things a plain DPO trainer does not, and each interacts with sharding:

- it SAMPLES anchors from the policy at every step (spec section 5). Under ZeRO-3 / FSDP every
  forward of a sharded module is a collective, so all ranks must run the same number of forwards:
  :func:`unwrapped_for_generation` gathers the weights (ZeRO-3) or flags the model so the decode loop
  keeps the ranks in step (FSDP; :func:`tidpo.generation.synced_ranks`);
- it takes a GRADIENT TO THE INPUT EMBEDDINGS (Eq. 5-6) with `torch.autograd.grad`. Under DDP and
  ZeRO-1/2 that is safe inside the training forward ("fused": gradient reduction hooks sit on the
  parameters' `AccumulateGrad` nodes, which a gradient w.r.t. the embeddings never reaches). Under
  FSDP and DeepSpeed it is not: their end-of-backward callbacks also fire after that `autograd.grad`
  call and finish (or tear down) the gradient reduction of the forward the loss still needs.
  :func:`fused_attribution_supported` says when the fused pass is safe and
  :func:`separate_attribution` runs the attribution as its own pass on any backend;
- it needs a frozen REFERENCE model next to the policy: :func:`prepare_reference_model` shards it
  like the policy under ZeRO-3 / FSDP (as TRL's ``prepare_deepspeed`` / ``prepare_fsdp`` do) instead
  of keeping a full replica on every device.

Plus small pieces for data-parallel bookkeeping: :func:`rank_slice` (split a precompute pass across
ranks with the same number of batches on each), :func:`reduce_batch_stats` and
:func:`global_sum_count` (metrics that are the same on every rank, whatever the shapes of the per-rank
tensors).

Everything here is a no-op or a plain call on one process and under DDP, so it is exercised by the
CPU test suite on those paths; the DeepSpeed and FSDP branches need GPUs (see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tidpo.importance import attribution_from_targets

if TYPE_CHECKING:  # accelerate is a hard dependency, but keep import time low for the CLI
    from accelerate import Accelerator

__all__ = [
    "backend_name",
    "default_reference_model",
    "fused_attribution_supported",
    "global_sum_count",
    "is_fsdp",
    "outputs_in_forward_dtype",
    "prepare_reference_model",
    "rank_slice",
    "reduce_batch_stats",
    "separate_attribution",
    "unwrapped_for_generation",
    "zero_stage",
]


# ----------------------------------------------------------------------------- backend detection


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of the run, or None when DeepSpeed is not used."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return int(plugin.zero_stage or 0)


def is_fsdp(accelerator: Accelerator) -> bool:
    """True when the run uses FSDP (version 1 or 2)."""
    return getattr(accelerator.state, "fsdp_plugin", None) is not None


def _fsdp_version(accelerator: Accelerator) -> int | None:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1) or 1)


def backend_name(accelerator: Accelerator) -> str:
    """A short name of the parallel setup, for logs and error messages.

    One of ``"single"``, ``"ddp"``, ``"deepspeed-zero{0,1,2,3}"``, ``"fsdp1"``, ``"fsdp2"``.
    """
    stage = zero_stage(accelerator)
    if stage is not None:
        return f"deepspeed-zero{stage}"
    version = _fsdp_version(accelerator)
    if version is not None:
        return f"fsdp{version}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def fused_attribution_supported(accelerator: Accelerator) -> bool:
    """Whether the attribution gradient may be taken from the training forward itself.

    True on one process and under DDP; False under FSDP (both versions) and DeepSpeed (every stage),
    where the trainer runs the separate pass instead. The reason is the same on both: they finish
    gradient reduction in a callback queued at the end of ANY backward pass, so the
    ``autograd.grad`` call to the input embeddings (made before the loss backward) triggers it:
    - FSDP1's root post-backward callback removes the post-backward (reduce-scatter) hooks of the
      forward the loss will backpropagate through (torch ``_runtime_utils._finalize_params``);
      FSDP2 runs its post-backward as an autograd function on module inputs, also reached here;
    - DeepSpeed ZeRO-1/2 (0.19) runs its gradient-reduction epilogue from such a callback: on a GPU
      with ZeRO-2 the fused pass failed with ``IndexError`` in ``reduce_ipg_grads`` (run in this
      project, see docs/scaling.md); ZeRO-3 has the same machinery plus parameter fetch/release.
    DDP reduces gradients from hooks on the parameters' ``AccumulateGrad`` nodes, which a gradient
    w.r.t. the embeddings never executes, so the fused pass is exact there (tested with 2 processes).
    """
    return zero_stage(accelerator) is None and not is_fsdp(accelerator)


# ----------------------------------------------------------------------------- gathered weights


def _zero3_offload(engine: Any) -> Any:
    # DeepSpeed keeps the ZeRO-3 parameter hooks on `optimizer.parameter_offload` (or the optimizer).
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


def _zero3_remove_hooks(engine: Any) -> None:
    """Detach ZeRO-3's fetch/release hooks so a forward on gathered weights is plain PyTorch."""
    offload = _zero3_offload(engine)
    if offload is None:  # before the first optimizer step the engine may have no optimizer yet
        return
    for _, param in offload.module.named_parameters(recurse=True):
        # Same bookkeeping reset as TRL's `remove_hooks`: stale module counts block re-partitioning.
        if hasattr(param, "ds_active_sub_modules"):
            param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks:
        hook.remove()
    for hook in offload.backward_hooks:
        hook.remove()
    offload.forward_hooks = []
    offload.backward_hooks = []


def _zero3_add_hooks(engine: Any) -> None:
    offload = _zero3_offload(engine)
    if offload is None:
        return
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        # The prefetch trace recorded before generation no longer matches the module order.
        coordinator._invalidate_trace()
    offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def outputs_in_forward_dtype(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s forward returns its outputs in the dtype it computed them in.

    Under native mixed precision (bf16/fp16 without DeepSpeed) accelerate makes a prepared model's
    forward ``convert_outputs_to_fp32(autocast(forward))``: the ``[B, T, V]`` logits come back as a
    float32 copy, which the log-prob kernels keep for their backward and which makes their gradient
    float32 too: two full float32 ``[B, T, V]`` tensors. Those kernels read the logits block by block in
    float32 anyway (the same values: bf16 -> float32 is exact), so the copy only costs memory. Here the
    forward keeps its autocast and skips the conversion; code that reads the outputs outside it
    upcasts what it needs. A no-op for forwards without that wrapper (float32, DeepSpeed).
    """
    from accelerate.utils.operations import ConvertOutputsToFp32

    forward = module.__dict__.get("forward")  # the instance attribute accelerate sets
    convert = getattr(getattr(forward, "__func__", forward), "__wrapped__", None)
    if not isinstance(convert, ConvertOutputsToFp32):
        yield
        return
    inner = convert.model_forward  # autocast(original forward), a function or a bound method
    module.forward = types.MethodType(inner, module) if hasattr(forward, "__func__") else inner
    try:
        yield
    finally:
        module.forward = forward


@contextlib.contextmanager
def unwrapped_for_generation(
    model: nn.Module, accelerator: Accelerator, gather_zero3: bool = True
) -> Iterator[nn.Module]:
    """Yield the bare model, ready for forwards that differ between ranks (sampling, attribution).

    - one process, DDP, ZeRO-0/1/2: the unwrapped module (weights are whole on every rank; a forward
      outside the DDP wrapper touches no gradient bookkeeping);
    - ZeRO-3 with ``gather_zero3``: every parameter is gathered on every rank
      (``deepspeed.zero.GatheredParameters``) and ZeRO's hooks are removed for the block, so the model
      is plain PyTorch inside (as TRL's ``unwrap_model_for_generation``). Needs the full model in
      memory on each device for the block; ``gather_zero3=False`` keeps the per-layer gathering and
      relies on the decode loop keeping the ranks in step (slower, lower peak memory);
    - FSDP1: the root's own parameters (embeddings, final norm, head when not wrapped in a unit) are
      summoned with ``summon_full_params(recurse=False, writeback=False)``; the wrapped layers gather
      themselves per forward;
    - FSDP1 and FSDP2: the model is flagged as FSDP-managed for the block (transformers' flag, which
      :func:`tidpo.generation.synced_ranks` reads as ``generate`` does), making every rank run
      forwards until the longest sample on any rank is done (a rank that stopped early would
      otherwise leave the others waiting in an all-gather forever).
    """
    unwrapped = accelerator.unwrap_model(model)
    stage = zero_stage(accelerator)
    if stage == 3 and gather_zero3:
        import deepspeed

        # `model` is the DeepSpeedEngine here: its hooks live on the engine's optimizer.
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            _zero3_remove_hooks(model)
            try:
                yield unwrapped
            finally:
                _zero3_add_hooks(model)
        return
    version = _fsdp_version(accelerator)
    if version is None:
        yield unwrapped
        return
    summon: contextlib.AbstractContextManager = contextlib.nullcontext()
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            summon = FSDP.summon_full_params(model, recurse=False, writeback=False)
    had_flag = hasattr(unwrapped, "_is_fsdp_managed_module")
    previous = getattr(unwrapped, "_is_fsdp_managed_module", None)
    unwrapped._is_fsdp_managed_module = True  # read by tidpo.generation.synced_ranks (and generate())
    try:
        with summon:
            yield unwrapped
    finally:
        if had_flag:
            unwrapped._is_fsdp_managed_module = previous
        else:
            del unwrapped._is_fsdp_managed_module


# ----------------------------------------------------------------------------- attribution pass


def _last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


def _hooked_attribution(
    model: nn.Module, embedding: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 5-6 through a (possibly FSDP-wrapped) model: capture the embedding output as a leaf."""
    captured: dict[str, torch.Tensor] = {}

    def capture(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # A detached leaf: the attribution gradient stops here and never reaches a parameter.
        leaf = output.detach().requires_grad_(True)
        captured["embeds"] = leaf
        return leaf

    was_training = model.training
    model.eval()  # spec section 2: dropout off for the attribution pass
    handle = embedding.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
            ).logits
            rows = torch.arange(input_ids.size(0), device=input_ids.device)
            targets = logits[rows, _last_valid_index(attention_mask)].float().max(dim=-1).values
            return attribution_from_targets(targets, captured["embeds"], attention_mask)
    finally:
        handle.remove()
        model.train(was_training)


def separate_attribution(
    model: nn.Module, accelerator: Accelerator, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw token importance (Eq. 5-6) as its own eval-mode pass, correct on every backend.

    - one process, DDP, ZeRO-0/1/2: `tidpo.importance.gradient_attribution` on the unwrapped model
      (outside DDP, so no reducer state is touched);
    - ZeRO-3: the same, on gathered weights with ZeRO's hooks removed (:func:`unwrapped_for_generation`);
    - FSDP: through the wrapped root, capturing the embedding output with a forward hook. The pass
      runs before the training forward, so FSDP's end-of-backward callback (which fires after this
      ``autograd.grad``) resets its state before the training forward registers fresh hooks.
    Every rank runs exactly one forward here, so the collectives of sharded forwards line up.
    """
    from tidpo.importance import gradient_attribution

    if is_fsdp(accelerator):
        embedding = accelerator.unwrap_model(model).get_input_embeddings()
        return _hooked_attribution(model, embedding, input_ids, attention_mask)
    with unwrapped_for_generation(model, accelerator) as bare:
        return gradient_attribution(bare, input_ids, attention_mask)


# ----------------------------------------------------------------------------- reference model


def default_reference_model(model: nn.Module, model_init_kwargs: dict | None = None) -> nn.Module:
    """The frozen reference when the user gives none: a copy of the policy.

    Under ZeRO-3 the policy was built inside ``deepspeed.zero.Init`` (its parameters are empty
    placeholders for the local shards), so a deep copy would copy placeholders; the reference is then
    loaded again from the policy's checkpoint, inside the same partitioning context (what TRL does).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return copy.deepcopy(model)
    from tidpo.models import load_causal_lm

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "TIDPOTrainer under DeepSpeed ZeRO-3 needs a reference it can load: pass ref_model (a name or "
            "model) or give the policy by name/path, so the reference can be loaded partitioned."
        )
    kwargs = dict(model_init_kwargs or {})
    kwargs.setdefault("dtype", getattr(model, "dtype", None))
    return load_causal_lm(name, **kwargs)


def _prepare_deepspeed_reference(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Wrap a frozen model in an inference-only DeepSpeed engine (after TRL's ``prepare_deepspeed``).

    ZeRO-3: sharded like the policy. ZeRO-0/1/2: stage 0, i.e. a replica in the run's precision
    (there is no optimizer state or gradient to shard for a frozen model).
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config["zero_optimization"]["stage"]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if stage == 3 and hidden is not None:
        config.update(
            {
                "zero_optimization.reduce_bucket_size": hidden * hidden,
                "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
                "zero_optimization.stage3_prefetch_bucket_size": 0.9 * hidden * hidden,
            }
        )
    # No optimizer: drop the training-only blocks, or DeepSpeed builds an optimizer/scheduler for it.
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _prepare_fsdp_reference(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Shard a frozen model with the run's FSDP settings (after TRL's ``prepare_fsdp``).

    ``accelerator.prepare_model(..., evaluation_mode=True)`` does NOT shard under FSDP: it skips the
    wrapping and also skips device placement, which would leave the reference on the CPU.
    """
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            return model.eval()
        plugin.set_auto_wrap_policy(model)
        model = FSDP(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            param_init_fn=plugin.param_init_fn,
            ignored_modules=plugin.ignored_modules,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
        return model.eval()
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not isinstance(model, FSDPModule):
        mesh = getattr(accelerator, "torch_device_mesh", None)
        kwargs: dict[str, Any] = {
            "reshard_after_forward": plugin.reshard_after_forward,
            "offload_policy": plugin.cpu_offload,
            "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        }
        if mesh is not None and accelerator.parallelism_config is not None:
            kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        # Shard each decoder layer, then the root (same granularity as accelerate's policy wrap).
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
    return model.eval()


def prepare_reference_model(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Place (and under ZeRO-3 / FSDP, shard) the frozen reference model for the run.

    - DeepSpeed: an inference-only engine, ZeRO-3 sharded or stage-0 replica;
    - FSDP: wrapped / ``fully_shard``-ed with the run's plugin settings;
    - otherwise ``accelerator.prepare_model(evaluation_mode=True)``: moved to the device and given the
      same autocast wrapper as the policy under mixed precision, never wrapped in DDP (no gradients).
    """
    model.eval()
    model.requires_grad_(False)
    if zero_stage(accelerator) is not None:
        return _prepare_deepspeed_reference(model, accelerator)
    if is_fsdp(accelerator):
        return _prepare_fsdp_reference(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


# ----------------------------------------------------------------------------- data-parallel bookkeeping


def rank_slice(num_rows: int, num_processes: int, process_index: int, batch_size: int) -> list[int]:
    """Row indices this rank handles in a pass split across ranks, padded to equal batch counts.

    Rows are dealt in contiguous blocks of ``ceil(num_rows / num_processes)``; a short (or empty)
    block is padded by repeating row ``num_rows - 1`` so every rank runs the same number of batches
    of ``batch_size`` (under ZeRO-3 / FSDP each forward is a collective, and a rank that stopped
    early would leave the others waiting). Duplicated rows give identical results and are dropped
    when the ranks' results are merged by index.
    """
    if num_rows < 1:
        return []
    block = math.ceil(num_rows / num_processes)
    block = math.ceil(block / batch_size) * batch_size  # whole batches on every rank
    start = process_index * block
    own = list(range(start, min(start + block, num_rows)))
    return own + [num_rows - 1] * (block - len(own))


def global_sum_count(accelerator: Accelerator, values: torch.Tensor) -> tuple[float, float]:
    """``(sum, count)`` of ``values`` over every element on every rank (the same floats on all ranks).

    Metrics are logged as the window's summed sums over its summed counts, so a mean is over pairs (or
    tokens) whatever the batch sizes. Each rank contributes its own (sum, count), so per-rank tensors may
    have different shapes and sizes, which ``gather_for_metrics`` does not allow (and its de-duplication
    of the last uneven batch assumes one value per sample, which per-token statistics are not).
    """
    values = values.detach().float().reshape(-1)
    stats = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    if accelerator.num_processes > 1:
        stats = accelerator.gather(stats.unsqueeze(0)).reshape(-1, 2).sum(0)
    total, count = stats.tolist()
    return total, count


def reduce_batch_stats(
    accelerator: Accelerator, stats: Mapping[str, torch.Tensor], maxima: Collection[str] = ()
) -> dict[str, tuple[float, float]]:
    """One batch's metrics over every rank, in two collectives and one host sync.

    ``stats`` maps each metric to this rank's ``[sum, count]`` tensor, or, for the names in ``maxima``,
    to its largest value (a scalar). Returns ``(sum, count)`` summed over the ranks, or ``(max, 1)``.
    Every rank must call it with the same metric names.
    """
    out: dict[str, tuple[float, float]] = {}
    summed = sorted(k for k in stats if k not in maxima)
    maxed = sorted(k for k in stats if k in maxima)
    if summed:
        table = torch.stack([stats[k].detach().float().reshape(2) for k in summed])
        if accelerator.num_processes > 1:
            table = accelerator.reduce(table, reduction="sum")
        out.update({k: (total, count) for k, (total, count) in zip(summed, table.tolist(), strict=True)})
    if maxed:
        tops = torch.stack([stats[k].detach().float().reshape(()) for k in maxed])
        if accelerator.num_processes > 1:
            tops = accelerator.gather(tops.unsqueeze(0)).amax(0)
        out.update({k: (top, 1.0) for k, top in zip(maxed, tops.tolist(), strict=True)})
    return out
