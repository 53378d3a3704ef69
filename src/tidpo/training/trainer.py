"""`TIDPOTrainer`: a `transformers.Trainer` that optimises TI-DPO (and its baselines).

One training step (paper Algorithm 1):
1. batch of pairs -> one concatenated policy forward over chosen and rejected, by default after a
   forward over each pair's prompt that both rows continue (`share_prompt`, `tidpo.prompt_cache`);
   when gamma > 0, anchors sampled from the policy (from that prompt forward's keys/values, or a kept
   static KV cache with a compiled decode step on CUDA) continue the same prompts in their own forward
   (or read the prompts' keys/values from the chosen rows' forward, or are full prompt + anchor rows
   where neither applies);
2. token importance by gradient attribution (Eq. 5-6): by default taken from the pairs' forward with
   one backward to the input embeddings ("fused"), or from a separate eval-mode pass;
3. hybrid weights (Eq. 7-8), detached;
4. weighted log-ratios against the reference (a frozen copy, the adapter-disabled base under LoRA,
   or cached per-token log-probs) -> weighted DPO with the sequential KL (Eq. 12, spec section 4);
5-6. triplet distances between the anchor's, chosen and rejected per-token log-ratio vectors (Eq. 13);
7. L = L_base + gamma * L_triplet (Eq. 14); the optimizer step is the Trainer's.

The maths lives in `tidpo.importance`, `tidpo.losses` and `tidpo.tokenops`; this module only wires
models, batches and metrics around it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import warnings
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache, Trainer, TrainerCallback
from transformers.trainer_utils import set_seed
from transformers.utils import logging

from tidpo.data import ROW_ID_COLUMN, PreferenceCollator, check_token_ids, prepare_preference_dataset
from tidpo.generation import anchor_cache, sample_completion_ids, stop_token_ids
from tidpo.importance import accepts_logits_to_keep, attribution_from_targets, importance_weights
from tidpo.losses import dpo_loss, ipo_loss, simpo_loss, triplet_terms, weighted_preference_loss
from tidpo.models import (
    adapter_active,
    add_reference_adapter,
    base_model,
    cache_kwarg,
    check_same_vocabulary,
    decoder_and_head,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
)
from tidpo.prompt_cache import (
    PromptKV,
    SharedPrompt,
    checkpointing_in_use,
    continuation_inputs,
    keep_cache_when_checkpointing,
    prompt_cache_unsupported,
    rows_start_with_prompts,
    split_shared_prompt,
)
from tidpo.tokenops import (
    NonFiniteError,
    ReferenceHead,
    check_finite,
    label_logprobs,
    logprobs_and_kl,
    pack_to_response_start,
    token_logprobs,
)
from tidpo.training.checkpointing import save_checkpoint_atomically
from tidpo.training.config import TIDPOConfig
from tidpo.training.distributed import (
    default_reference_model,
    fused_attribution_supported,
    global_sum_count,
    is_fsdp,
    outputs_in_forward_dtype,
    prepare_reference_model,
    rank_slice,
    reduce_batch_stats,
    separate_attribution,
    unwrapped_for_generation,
    zero_stage,
)

logger = logging.get_logger(__name__)


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for users who never train adapters
        return False
    return isinstance(model, PeftModel)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count attended tokens only, so a row's numbers do not depend on its padding.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


def _left_pad_cat(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Concatenate left-padded ``[B_i, T_i]`` batches into one, padding each on the left to the widest."""
    width = max(r.size(1) for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (width - r.size(1), 0), value=value) for r in rows])


def _pad_to(x: torch.Tensor, width: int, value: int | float | bool) -> torch.Tensor:
    if x.size(1) == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)


def _compiled(model: nn.Module) -> bool:
    """Whether ``model``, or a model it wraps (DDP's ``module``), is a ``torch.compile`` module."""
    from torch._dynamo.eval_frame import OptimizedModule

    while model is not None:
        if isinstance(model, OptimizedModule):
            return True
        model = getattr(model, "module", None)
    return False


class _RowIdCollator:
    """Wrap a collator so its batch also carries ``row_ids`` [B] (the ``ROW_ID_COLUMN`` of each row)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(examples)
        if all(ROW_ID_COLUMN in ex for ex in examples):
            batch["row_ids"] = torch.tensor([int(ex[ROW_ID_COLUMN]) for ex in examples], dtype=torch.long)
        return batch


def _repeat_rows(pair_ids: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    # Batch rows are blocks of B pairs (chosen, rejected, anchors), so the ids repeat block-wise.
    return None if pair_ids is None else pair_ids.repeat(n_rows // pair_ids.numel())


def _nonfinite_in_context(err: NonFiniteError, step: int, pair_ids: torch.Tensor | None) -> NonFiniteError:
    """Add the training step and the data rows to a NaN/Inf error raised inside the maths.

    The guards of `tidpo.tokenops` / `importance` / `losses` report positions in the tensor they check
    (``err.batch_rows``), not the step or the data. Every such tensor stacks blocks of B pairs (chosen,
    rejected, anchors), so batch row r belongs to pair r % B, whose data row is ``pair_ids[r % B]``.
    """
    message = str(err)
    extra = []
    if f"step {step}" not in message:
        extra.append(f"at step {step} (0-based optimizer step)")
    if pair_ids is not None and "row ids" not in message:
        n_pairs = pair_ids.numel()
        if err.batch_rows:
            pairs = sorted({r % n_pairs for r in err.batch_rows})
            extra.append(f"row ids {[int(pair_ids[p]) for p in pairs]} (0-based rows of the data)")
        else:
            extra.append(f"the batch held row ids {pair_ids.tolist()} (0-based rows of the data)")
    if not extra:
        return err
    return NonFiniteError(f"{message.rstrip('.')} -- {'; '.join(extra)}.", batch_rows=err.batch_rows)


# Dropout rates kept as plain floats and passed to the functional dropout / attention kernel when the
# module is training: Llama-style `attention_dropout`, OPT/BioGPT/XGLM-style `dropout`,
# `activation_dropout` and `layerdrop`, GPT-2-style config `*_pdrop`.
_RATE_NAME = re.compile(r".*(dropout|pdrop)|layerdrop")


_NO_COMPUTE_METRICS = (
    "TIDPOTrainer: compute_metrics is not supported: evaluation returns no predictions to give it, and "
    "computes its own metrics (eval_loss and the eval_ versions of the training metrics: README, metric "
    "glossary). For metrics of your own, add a TrainerCallback whose on_evaluate reads them, or score "
    "generations with tidpo.evaluation."
)


# What a batch must hold (PreferenceCollator's output): a custom collator is tried on one row at
# construction, so one that returns another layout (TRL's) fails there, saying what is expected.
_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask", "prompt_input_ids", "prompt_attention_mask")


def _check_collator(collator: Any, dataset: Dataset) -> None:
    expected = (
        "a custom data_collator must return the batch tidpo.data.PreferenceCollator returns "
        f"({', '.join(_BATCH_KEYS)}) from the tokenised rows (columns {', '.join(dataset.column_names)})"
    )
    try:
        batch = collator([dataset[0]])
    except Exception as err:
        raise ValueError(f"TIDPOTrainer: the data_collator failed on row 0 ({err!r}): {expected}.") from err
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"TIDPOTrainer: the data_collator's batch has no {', '.join(missing)}: {expected}.")


def _float_rates(obj: object) -> list[str]:
    return [
        name for name, value in vars(obj).items() if isinstance(value, float) and _RATE_NAME.fullmatch(name)
    ]


def _warn_unused_lora_dropout(model: nn.Module) -> None:
    """A PEFT config's dropout that disable_dropout is about to zero (TRL zeroes it silently)."""
    configs = getattr(model, "peft_config", None) or {}
    rates = sorted({c.lora_dropout for c in configs.values() if getattr(c, "lora_dropout", 0) > 0})
    if rates:
        warnings.warn(
            f"lora_dropout={rates[-1]} has no effect: disable_dropout=True (the default, as in TRL) sets every "
            "dropout to 0. Set lora_dropout=0 to silence this, or disable_dropout=False to keep it (the "
            "attribution then runs as its own eval-mode pass: one more forward per step).",
            stacklevel=3,
        )


def _disable_dropout(model: nn.Module) -> None:
    # nn.Dropout modules and the rates modules keep as floats; configs keep their values (they are
    # saved with the model), but for attention_dropout, which some attention code reads from there.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in _float_rates(module):
            setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


def _dropout_active(model: nn.Module) -> bool:
    """Whether a forward of ``model`` in training mode would drop anything (see `_disable_dropout`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        if any(getattr(module, name) > 0 for name in _float_rates(module)):
            return True
    return False


# Metrics whose value over a logging window is their largest, not their mean.
_MAX_METRICS = frozenset({"weights/max", "nonfinite/skipped"})


def window_metrics(stats: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """The logged value of each metric over a logging window (or a whole evaluation).

    ``stats`` holds, per metric, the ``(sum, count)`` of each batch. A mean is the summed sums over the
    summed counts, a mean over pairs (or tokens) whatever the batch sizes; ``_MAX_METRICS`` take the
    largest sum; ``weights/std`` is pooled from the weights' first two moments (sample std).
    """
    out: dict[str, float] = {}
    for key, entries in stats.items():
        if not entries:
            continue
        if key in _MAX_METRICS:
            out[key] = max(total for total, _ in entries)
            continue
        count = sum(c for _, c in entries)
        out[key] = sum(total for total, _ in entries) / count if count else float("nan")
    if "weights/_sq" in out:
        n = sum(c for _, c in stats["weights/_sq"])
        mean, mean_sq = out["weights/mean"], out.pop("weights/_sq")
        out["weights/std"] = math.sqrt(max(mean_sq - mean * mean, 0.0) * n / (n - 1)) if n > 1 else 0.0
    return out


class TIDPOTrainer(Trainer):
    """Train a causal LM with TI-DPO, used like TRL's `DPOTrainer`.

    Args:
        model: the policy, as a model object or a name/path (built-in short names such as
            ``"smollm2-135m"`` resolve to the embedded model).
        ref_model: the frozen reference. Default: a frozen copy of ``model``; under LoRA
            (``peft_config`` or a ``PeftModel``) no copy is made and the reference is the base model
            with adapters disabled. Not used by ``loss_type="simpo"``.
        args: a `TIDPOConfig`.
        train_dataset / eval_dataset: preference data (a path to JSONL/JSON/CSV/Parquet or a
            `datasets.Dataset`) in TRL's standard or conversational format, or already tokenised rows.
            ``eval_dataset`` may be a dict of named datasets.
        processing_class: the tokenizer (default: loaded from ``model``'s name).
        peft_config: a `peft.PeftConfig` to wrap the model with adapters.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: TIDPOConfig | None = None,
        *,
        train_dataset: Dataset | str | None = None,
        eval_dataset: Dataset | str | dict[str, Dataset | str] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        data_collator: Any | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        compute_metrics: Any = None,
    ):
        if compute_metrics is not None:
            raise ValueError(_NO_COMPUTE_METRICS)
        model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        if args is None:
            args = TIDPOConfig(output_dir=f"{str(model_name).rstrip('/').split('/')[-1]}-TIDPO")
        elif not isinstance(args, TIDPOConfig):
            raise TypeError(f"TIDPOTrainer: args must be a TIDPOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("TIDPOTrainer: train_dataset is required (a file path or a datasets.Dataset).")
        # PEFT initialises adapters randomly: seed before building them, as TRL does.
        set_seed(args.seed)

        if isinstance(model, str):
            model = load_causal_lm(model, **(args.model_init_kwargs or {}))
        elif args.model_init_kwargs and not isinstance(ref_model, str):
            warnings.warn(
                "TIDPOTrainer: model_init_kwargs apply to models given by name, and model (and ref_model) "
                "came already built: they are not used. Load the model with them yourself, or pass its name.",
                stacklevel=2,
            )
        if processing_class is None:
            try:
                processing_class = load_tokenizer(model_name)
            except OSError as err:
                raise ValueError(
                    f"TIDPOTrainer: no processing_class given, and no tokenizer loads from the model's name "
                    f"{model_name!r} ({err}). Pass processing_class=<the model's tokenizer>."
                ) from err
        ensure_pad_token(processing_class)
        model.config.pad_token_id = processing_class.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = processing_class.pad_token_id
        # Anchors end at the first of these (EOS, or a chat model's end-of-turn id in its generation
        # config, as `generate` stops); none at all (a tokenizer without EOS): at the horizon.
        self._anchor_stop_ids = stop_token_ids(model, processing_class, what=None)

        if peft_config is not None:
            from peft import get_peft_model

            if _is_peft_model(model):
                raise ValueError(
                    "TIDPOTrainer: got a PeftModel and a peft_config. Pass the base model with the "
                    "peft_config, or the PeftModel alone."
                )
            if getattr(model, "_hf_peft_config_loaded", False):
                # get_peft_model would put a fresh adapter in place of the loaded one, without a word.
                raise ValueError(
                    "TIDPOTrainer: the model carries LoRA adapters loaded by transformers (a LoRA output "
                    "folder) and a peft_config was given, which would replace them. To train a new adapter "
                    "on top, merge them first (tidpo.models.merge_loaded_adapter(model), or "
                    "load_causal_lm(path, merge_adapter=True)); to train them further, load them with "
                    "PeftModel.from_pretrained(base_model, path, is_trainable=True) and pass no peft_config."
                )
            with warnings.catch_warnings():
                # peft 0.21 asks transformers 5's deprecated alias: a FutureWarning in every LoRA run that
                # is neither the user's to fix nor ours.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = get_peft_model(model, peft_config)
        self.is_peft = _is_peft_model(model)
        # A PeftModel passed in may carry a trained adapter (SFT): the reference is then a frozen copy of
        # it (adapter "ref", as in TRL), not the base model under it. None: adapters disabled.
        self._reference_adapter = None
        if self.is_peft and peft_config is None and ref_model is None and args.uses_reference:
            self._reference_adapter = add_reference_adapter(model)
        if not any(p.requires_grad for p in model.parameters()):
            if self.is_peft or getattr(model, "_hf_peft_config_loaded", False):
                why = (
                    "its LoRA adapters were loaded frozen (a LoRA output folder loaded as a plain model, or "
                    "PeftModel.from_pretrained without is_trainable=True). To train them further load them with "
                    "PeftModel.from_pretrained(base_model, path, is_trainable=True) (or resume the run from its "
                    "checkpoint); to train a new adapter on top, merge them first (merge_and_unload)"
                )
            else:
                why = "every parameter has requires_grad=False"
            raise ValueError(f"TIDPOTrainer: the model has no trainable parameter: {why}.")

        if ref_model is model:
            raise ValueError("TIDPOTrainer: model and ref_model are the same object; omit ref_model instead.")
        if not args.uses_reference:
            if ref_model is not None:
                raise ValueError(
                    "TIDPOTrainer: loss_type='simpo' is reference-free; do not pass a ref_model."
                )
        elif ref_model is None and not self.is_peft:
            # A copy of the policy; reloaded from its checkpoint under ZeRO-3 (partitioned weights).
            ref_model = default_reference_model(model, args.model_init_kwargs)
        elif isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, **(args.model_init_kwargs or {}))
        if ref_model is not None:
            check_same_vocabulary(model, ref_model)
            ref_model.eval()
            ref_model.requires_grad_(False)
        if args.disable_dropout:
            _warn_unused_lora_dropout(model)
            _disable_dropout(model)
            if ref_model is not None:
                _disable_dropout(ref_model)

        with args.main_process_first(desc="tokenising the preference data"):
            train_dataset = self.prepare_dataset(train_dataset, processing_class, args)
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    k: self.prepare_dataset(v, processing_class, args) for k, v in eval_dataset.items()
                }
            elif eval_dataset is not None:
                eval_dataset = self.prepare_dataset(eval_dataset, processing_class, args)
        named = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            named.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        elif eval_dataset is not None:
            named["eval_dataset"] = eval_dataset
        # .weight, not .num_embeddings: a PEFT-wrapped embedding (LoRA on it, trainable tokens) has only
        # the former (its base layer's).
        rows = model.get_input_embeddings().weight.shape[0]
        for name, data in named.items():  # fail now, not with an IndexError in the first forward
            check_token_ids(data, rows, processing_class.pad_token_id, name)
        if args.effective_importance_mode == "dataset":
            for name, data in named.items():
                if "chosen_weights" not in data.column_names:
                    raise ValueError(
                        f"TIDPOTrainer: importance_mode='dataset' needs per-token weights, and {name} has no "
                        "'chosen_weights'/'rejected_weights' columns (one float per response token)."
                    )

        if data_collator is not None:
            _check_collator(data_collator, train_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator
            or _RowIdCollator(PreferenceCollator(pad_token_id=processing_class.pad_token_id)),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # Per mode, per metric: the (sum, count) of each batch since the last log (`window_metrics`).
        self._metrics: dict[str, dict[str, list[tuple[float, float]]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._nonfinite_skipped = 0  # batches this rank skipped
        self._skipped_total = 0.0  # batches skipped on any rank (skip_nonfinite_batches)
        # (pairs, micro-batches) of the current optimizer step on this rank (`get_batch_samples`)
        self._step_pairs: tuple[int, int] | None = None
        self._eval_prefix = "eval"
        # skip_nonfinite_batches: losses of the kept training batches and skipped count since the last log,
        # and the run's (sum, count, skipped) of them.
        self._kept_losses: list[float] = []
        self._skipped_in_window = 0
        self._run_losses = [0.0, 0.0, 0.0]
        self._anchor_caches: dict[int, StaticCache] = {}  # batch size -> static KV cache for anchors
        self._fallbacks_logged: set[str] = set()  # why a speed path fell back, logged once each
        half = {
            p.dtype
            for p in model.parameters()
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
        }
        if half and not self.is_deepspeed_enabled:  # DeepSpeed keeps float32 master weights
            warnings.warn(
                f"TIDPOTrainer: trainable weights are stored in {', '.join(sorted(str(d) for d in half))}: "
                "the optimizer updates them in that precision, where an update smaller than ~1/256 of a weight "
                f"rounds away: small learning rates (here {args.learning_rate:g}) barely move the model. Load "
                "the model in float32 and train with bf16=True (autocast), train LoRA adapters (use_peft; kept "
                "in float32), or use DeepSpeed (float32 master weights).",
                stacklevel=2,
            )

        # Sharded like the policy under ZeRO-3 / FSDP, a device replica otherwise (distributed.py).
        self.ref_model = (
            prepare_reference_model(ref_model, self.accelerator) if ref_model is not None else None
        )
        if args.skip_nonfinite_batches and (zero_stage(self.accelerator) == 3 or is_fsdp(self.accelerator)):
            # A rank that skips stops mid-step, while the others' sharded forwards wait for it in gathers.
            raise ValueError(
                "TIDPOConfig: skip_nonfinite_batches=True cannot keep the ranks in step under DeepSpeed ZeRO-3 "
                "or FSDP (every forward gathers weights from all ranks). Leave it False there: a non-finite "
                "batch then stops the run naming its step and rows."
            )
        if (
            args.uses_attribution
            and args.attribution_pass == "fused"
            and not fused_attribution_supported(self.accelerator)
        ):
            warnings.warn(
                "attribution_pass='fused' is not safe under DeepSpeed or FSDP (their end-of-backward hooks "
                "would fire on the attribution gradient): the "
                "attribution runs as a separate eval-mode pass instead (same weights without dropout). "
                "See tidpo.training.distributed.fused_attribution_supported.",
                stacklevel=2,
            )

        if args.precompute_ref_logps:
            self.train_dataset = self._precompute_ref_logps(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_ref_logps(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset)

    # ------------------------------------------------------------------ data

    @staticmethod
    def prepare_dataset(
        dataset: Dataset | str,
        tokenizer: PreTrainedTokenizerBase,
        args: TIDPOConfig,
        split: str | None = None,
    ) -> Dataset:
        """Validate and tokenise preference data as the trainer does (already tokenised data passes).

        ``split``: which split of a Hub dataset or ``DatasetDict`` (default ``train``)."""
        if isinstance(dataset, Dataset) and "chosen_input_ids" in dataset.column_names:
            return dataset
        return prepare_preference_dataset(
            dataset,
            tokenizer,
            split=split,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            drop_identical=args.drop_identical,
            drop_overlong=args.drop_overlong,
            row_ids=True,
        )

    @torch.no_grad()
    def _precompute_ref_logps(self, dataset: Dataset) -> Dataset:
        """Cache the reference's per-token log-probs of every response token as dataset columns.

        The rows are split across ranks (each rank runs ~1/N of the data, the same number of batches on
        every rank) and the results gathered, so every rank ends with the same full columns.
        """
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        acc = self.accelerator
        if self.ref_model is None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # Under LoRA the reference is the policy itself, which DeepSpeed/FSDP only place and shard
            # in train(); a forward here would run on unplaced (or partitioned) weights.
            raise ValueError(
                "precompute_ref_logps=True with LoRA is not supported under DeepSpeed or FSDP (the policy is "
                "not placed yet when the cache is built). Set precompute_ref_logps=False."
            )
        batch_size = self.args.per_device_eval_batch_size
        indices = rank_slice(len(dataset), acc.num_processes, acc.process_index, batch_size)
        local: list[tuple[int, list[float], list[float]]] = []
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            batch = self.data_collator([dataset[i] for i in rows])
            ids = batch["input_ids"].to(acc.device)
            attn = batch["attention_mask"].to(acc.device)
            mask = batch["completion_mask"].to(acc.device).bool()
            ref = token_logprobs(
                self._reference_logits(ids, attn), ids, chunk_size=self.args.logits_chunk_size
            ).float()
            n = len(rows)  # rows 0..n-1 are prompt+chosen, n..2n-1 prompt+rejected
            for k, index in enumerate(rows):
                chosen_row = ref[k][mask[k]].cpu().tolist()
                rejected_row = ref[n + k][mask[n + k]].cpu().tolist()
                local.append((index, chosen_row, rejected_row))
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        by_index = {index: (c, r) for index, c, r in local}  # padding repeats rows: same values
        chosen = [by_index[i][0] for i in range(len(dataset))]
        rejected = [by_index[i][1] for i in range(len(dataset))]
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    # ------------------------------------------------------------------ model pieces

    def _reference_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
        as_head: bool = False,
        prefix_only: bool = False,
    ) -> torch.Tensor | ReferenceHead | None:
        """The reference's logits, or with ``as_head`` its final hidden states and output layer
        (:class:`ReferenceHead`, for :meth:`_reference_head` models) so the logits are never held whole.

        ``prefix_only``: a forward for its keys and values alone (into ``cache``); returns None.
        """
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": _position_ids(attention_mask) if position_ids is None else position_ids,
            "use_cache": cache is not None,
        }
        ref = self._reference_module()
        if prefix_only and accepts_logits_to_keep(base_model(ref)):
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[cache_kwarg(self.accelerator.unwrap_model(ref))] = cache
        if self.ref_model is not None:
            adapters_off = contextlib.nullcontext()
        elif self._reference_adapter is not None:
            adapters_off = adapter_active(ref, self._reference_adapter)
        else:
            adapters_off = ref.disable_adapter()
        with torch.no_grad(), adapters_off, outputs_in_forward_dtype(self.accelerator.unwrap_model(ref)):
            if prefix_only:
                ref(**kwargs)
                return None
            if not as_head:
                return ref(**kwargs).logits
            decoder, head = decoder_and_head(ref)
            device_type = head.weight.device.type
            # The decoder is called directly, outside the forward that accelerate wraps in autocast.
            with self._forward_precision(device_type):
                hidden = decoder(**kwargs).last_hidden_state
            dtype = self._autocast_dtype(device_type) or head.weight.dtype
            return ReferenceHead(hidden, head.weight, head.bias, dtype)

    def _forward_precision(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast the models' forwards run under (see `_autocast_dtype`), for code outside them."""
        dtype = self._autocast_dtype(device_type)
        return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _autocast_dtype(self, device_type: str) -> torch.dtype | None:
        """The dtype the models' matmuls run in under mixed precision, or None without it.

        Accelerate runs the model's forward under autocast (see `outputs_in_forward_dtype`); code
        outside the forward that redoes one of its matmuls (an output layer) must use the same dtype.
        """
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        if getattr(self.accelerator, "native_amp", False):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
        return None

    def _reference_module(self) -> nn.Module:
        """The reference: the separate reference model, or (LoRA) the unwrapped policy, which the
        reference forwards run with its adapters disabled."""
        return self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)

    def _reference_head(self, model: nn.Module) -> bool:
        """Whether the sequential KL gets the reference as hidden states + output layer this step.

        Only under gradient checkpointing: there the reference's ``[B, T, V]`` logits, which the KL's
        backward needs, are the largest thing alive, and recomputing them block by block in the backward
        (one more output-layer matmul) is the trade checkpointing already makes. Not under ZeRO / FSDP
        (sharded output layer) or for models whose logits are not a plain projection.
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        if not checkpointing_in_use(self.accelerator.unwrap_model(model)):
            return False
        return decoder_and_head(self._reference_module()) is not None

    def _anchor_seed(self, training: bool, group: int = 0) -> int:
        """Seed of one anchor decode loop: per step (reproducible, and identical after a resume from a
        checkpoint), rank, mode and group: 1, 2, ... for the loops of `_presample_anchors`, 0, -1, ... for
        the micro-batches of a step that sample their own (`get_batch_samples` numbers them)."""
        mode_offset = 0 if training else 7_919
        base = self.args.seed * 1_000_003 + self.state.global_step * 101 + self.args.process_index
        return (base + mode_offset + group * 7_907_713) % (2**31)

    def _random_weight_generators(
        self, device: torch.device, pair_ids: torch.Tensor | None, training: bool, group: int
    ) -> torch.Generator | list[torch.Generator]:
        """Random sources of the random-weights ablation (spec section 8): one per row, seeded by the data
        row, its side and the step, so each micro-batch, rank and eval batch draws its own weights, and a
        resumed run draws the same ones. Without row ids (a custom collator): one per step, rank, mode
        and micro-batch."""
        if pair_ids is None:
            return torch.Generator(device=device).manual_seed(self._anchor_seed(training, group) + 1)
        step = self.state.global_step
        # hash() of a tuple of ints is the same in every process and run (PYTHONHASHSEED only salts str).
        return [
            torch.Generator(device=device).manual_seed(
                hash((self.args.seed, step, training, row, side)) % 2**63
            )
            for side in (0, 1)
            for row in pair_ids.tolist()
        ]

    def _sample_anchors(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        *,
        training: bool,
        group: int = 0,
        past: Any = None,
    ) -> torch.Tensor:
        """Sample one response per (left-padded) prompt from the current policy (spec section 5), no
        gradient.

        ``past``: ``(cache, mask, last_tokens)`` when the prompts but their last tokens are already in a
        growing cache of the policy's keys/values (share_prompt's prefix forward): decoding then starts
        from there (:meth:`_decode_from_prefix` says when that is exact).

        Returns the sampled ids ``[B, N]``, ``N <= max_new_tokens``: row ``b`` continues prompt ``b``;
        positions after a row's first EOS are padding (:meth:`_anchor_valid`).
        """
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self._anchor_seed(training, group))
            try:
                # Whole weights for sampling: ZeRO-3 gathers them, FSDP keeps ranks in step.
                with unwrapped_for_generation(model, self.accelerator) as bare:
                    completion = self._sample(bare, prompt_ids, prompt_mask, max_new_tokens, past)
            except RuntimeError as err:
                # torch.multinomial's "probability tensor contains either inf, nan or element < 0".
                if "inf" in str(err) and "nan" in str(err):
                    raise NonFiniteError(
                        f"anchor sampling at step {self.state.global_step}: the policy's next-token "
                        f"probabilities are not finite ({err})."
                    ) from err
                raise
        return completion

    def _sample(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        past: Any = None,
    ) -> torch.Tensor:
        args, tokenizer = self.args, self.processing_class
        policy = self.accelerator.unwrap_model(model)
        static = self._anchor_static_cache(prompt_ids)
        if past is not None:
            cache, past_mask, prompt_ids = past
            past, prompt_mask = (cache, past_mask), torch.ones_like(prompt_ids, dtype=torch.bool)
        try:
            return sample_completion_ids(
                policy,
                prompt_ids,
                prompt_mask.long(),
                max_new_tokens=max_new_tokens,
                temperature=args.anchor_temperature,
                top_k=args.anchor_top_k,
                top_p=args.anchor_top_p,
                eos_token_id=self._anchor_stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                static_cache=self._anchor_cache(policy, prompt_ids) if static else None,
                past=past,
            )
        except Exception as err:
            if static and hasattr(err, "add_note"):  # same exception, one more line in its message
                err.add_note(
                    "tidpo: anchors were decoded with a static KV cache (anchor_static_cache, compiled on "
                    "CUDA); if this model does not support static caches or torch.compile, set "
                    "anchor_static_cache=False."
                )
            raise

    def _anchor_horizon(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per pair (``[B]``), how many anchor tokens can enter the loss.

        Eq. 13's distances compare the anchor with the chosen and with the rejected response at the
        positions valid in both, counted from each response's first token; so anchor tokens past the
        longer of the two responses never count. At most ``anchor_max_new_tokens``.
        """
        lengths = inputs["completion_mask"].sum(1)
        n_pairs = lengths.size(0) // 2
        longer = torch.maximum(lengths[:n_pairs], lengths[n_pairs:])
        return longer.clamp(min=1, max=self.args.anchor_max_new_tokens)

    def _decode_length(self, horizons: torch.Tensor) -> int:
        """Decode steps for anchors with these horizons: the longest. With several processes, the longest
        on any rank: under ZeRO-3 / FSDP every decode forward gathers weights with all ranks, so they
        must run as many (one small all-gather per decode loop, on every backend alike)."""
        longest = horizons.max().reshape(1)
        if self.accelerator.num_processes > 1:
            longest = self.accelerator.gather(longest).max()
        return int(longest)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        # The Trainer fetches an optimizer step's micro-batches before the first of them runs: the place
        # to sample their anchors together.
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Pairs in this optimizer step on this rank: `compute_loss` weighs each micro-batch by its share.
        # (Trainer divides each micro-batch's loss by their number, `current_gradient_accumulation_steps`.)
        self._step_pairs = (sum(int(batch["input_ids"].shape[0]) // 2 for batch in batches), len(batches))
        if self.args.uses_triplet:
            self._presample_anchors(batches)
            # Micro-batches that sample in their own step get seeds of their own (groups 0, -1, -2, ...;
            # the shared loops are 1, 2, ...): the same seed would reuse the same random draws.
            for index, batch in enumerate(batches):
                if "anchor_ids" not in batch:
                    batch["anchor_group"] = -index
        return batches, num_items

    def _presample_anchors(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Sample the anchors of one optimizer step's micro-batches in groups of up to
        ``anchor_sampling_rows`` rows, one decode loop per group, into each batch's ``"anchor_ids"``.

        The weights do not change until the optimizer step, so every anchor is a sample of the current
        policy, as when each micro-batch samples its own; a decode loop costs about the same for one
        micro-batch's rows as for several (each token reads every weight once). A group of one micro-batch
        is left to its own step, which can decode from its shared prompt forward (`_decode_from_prefix`).
        """
        if len(batches) < 2:
            return
        # From the first micro-batch's size (the same on every rank), so all ranks run as many loops.
        per_loop = self.args.anchor_sampling_rows // max(1, batches[0]["prompt_input_ids"].size(0))
        if per_loop < 2:
            return
        pad = self.processing_class.pad_token_id
        for group, start in enumerate(range(0, len(batches), per_loop), start=1):
            chunk = batches[start : start + per_loop]
            if len(chunk) < 2:
                continue
            horizons = [self._anchor_horizon(batch) for batch in chunk]
            ids = _left_pad_cat([batch["prompt_input_ids"] for batch in chunk], pad)
            mask = _left_pad_cat([batch["prompt_attention_mask"] for batch in chunk], 0).bool()
            length = self._decode_length(torch.cat(horizons))
            completion = self._sample_anchors(
                self.model_wrapped, ids, mask, length, training=True, group=group
            )
            for batch, rows, horizon in zip(
                chunk, completion.split([len(h) for h in horizons]), horizons, strict=True
            ):
                used = int(self._anchor_valid(rows, horizon).sum(1).max())  # >= 1: token 0 always counts
                batch["anchor_ids"] = rows[:, :used]

    def _decode_from_prefix(self, model: nn.Module, prompt_ids: torch.Tensor) -> bool:
        """Whether the anchors may decode from the keys/values of share_prompt's prefix forward.

        That forward ran in the step's mode: in training with dropout active its keys differ from what
        sampling (no dropout) would compute. The kept static cache on CUDA is filled by its own prompt pass.
        """
        if self._anchor_static_cache(prompt_ids):
            return False
        policy = self.accelerator.unwrap_model(model)
        return not (policy.training and _dropout_active(policy))

    def _anchor_static_cache(self, prompt_ids: torch.Tensor) -> bool:
        if self.args.anchor_static_cache is not None:
            return self.args.anchor_static_cache
        # Auto: CUDA without parameter sharding (ZeRO-3 / FSDP gather the weights into new buffers), and
        # with Triton, which torch.compile's GPU backend needs.
        return (
            prompt_ids.device.type == "cuda"
            and zero_stage(self.accelerator) is None
            and not is_fsdp(self.accelerator)
            and importlib.util.find_spec("triton") is not None
        )

    def _anchor_cache(self, policy: nn.Module, prompt_ids: torch.Tensor) -> StaticCache:
        """One static cache per batch size, kept across steps (fixed addresses for the CUDA graphs).

        Sized for the longest prompt the data allows (``max_prompt_length``) plus the anchor, so one
        size serves the whole run; without a prompt limit it grows (and the decode step recompiles)
        when a longer prompt arrives.
        """
        batch, prompt_len = prompt_ids.shape
        new_tokens = self.args.anchor_max_new_tokens
        size = max(self.args.max_prompt_length or 0, prompt_len) + new_tokens
        cache = self._anchor_caches.get(batch)
        if cache is None or cache.layers[0].max_cache_len < prompt_len + new_tokens:
            cache = self._anchor_caches[batch] = anchor_cache(policy, size)
        return cache

    def _anchor_valid(self, completion: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
        """The anchor tokens that enter the loss (bool, ``[B, N]``, a prefix of each row): up to and
        including the first stop id (EOS), and within the pair's horizon (`_anchor_horizon`)."""
        # Compared id by id: a tensor of the ids would be a host-to-device copy (a sync) every step.
        is_eos = torch.zeros_like(completion, dtype=torch.bool)
        for stop in self._anchor_stop_ids:
            is_eos |= completion == stop
        is_eos = is_eos.long()
        positions = torch.arange(completion.size(1), device=completion.device)
        return ((is_eos.cumsum(1) - is_eos) == 0) & (positions < horizon[:, None])

    def _anchor_rows(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion: torch.Tensor,
        completion_valid: torch.Tensor,
    ):
        """Right-padded prompt + anchor rows: (input_ids, attention_mask, completion_mask)."""
        tokenizer = self.processing_class
        ids = torch.cat([prompt_ids, completion], dim=1)
        valid = torch.cat([prompt_mask, completion_valid], dim=1)
        is_completion = torch.cat([torch.zeros_like(prompt_mask), completion_valid], dim=1)
        # Move valid tokens to the front (stable), giving right-padded rows like the chosen/rejected ones.
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        ids, valid, is_completion = (t.gather(1, order) for t in (ids, valid, is_completion))
        ids = ids.masked_fill(~valid, tokenizer.pad_token_id)
        width = int(valid.sum(1).max())
        return ids[:, :width], valid[:, :width].long(), is_completion[:, :width]

    def _anchor_layout(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], fused: bool, shared: bool
    ) -> str:
        """How the anchors enter the step's forwards (see `_compute_loss`)."""
        setting = self.args.anchor_prompt_cache
        if shared:  # the pair rows continue a shared prompt prefix: the anchors continue it too
            return "split" if setting is False else "continuation"
        if setting is not False:
            reason = self._prompt_cache_unsupported(model, inputs)
            if (
                reason is None
                and setting is None
                and checkpointing_in_use(self.accelerator.unwrap_model(model))
            ):
                # Measured: the anchors' gradient reaches every checkpointed pair layer through the prompts'
                # keys before the main backward does, so all their recomputed activations are alive at once
                # (peak memory 1.83x DPO against 1.34x with full rows). Checkpointing is there for memory.
                reason = (
                    "gradient checkpointing (the prompt cache would give up its memory saving; True opts in)"
                )
            if reason is None:
                return "prompt_cache"
            if setting:
                raise ValueError(
                    f"anchor_prompt_cache=True, but the anchors cannot reuse the prompts' keys/values: {reason}. "
                    "Set anchor_prompt_cache=None (auto) or False."
                )
            self._log_fallback(f"anchors forward full prompt + anchor rows (no prompt cache): {reason}.")
        return "split" if fused else "joint"

    def _log_fallback(self, message: str, warn: bool = False) -> None:
        """Say once per reason (not every step) which path a step takes; ``warn``: shown at the default
        log level, for a fallback that costs a whole pass the configuration asked to save."""
        if message not in self._fallbacks_logged:
            self._fallbacks_logged.add(message)
            (logger.warning if warn else logger.info)(f"tidpo: {message}")

    def _shared_prompt(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> SharedPrompt | None:
        """The pair rows cut into a shared prompt prefix and continuations (`share_prompt`), or None."""
        setting = self.args.share_prompt
        if setting is False:
            return None
        args = self.args
        if setting is None and not self._share_prompt_pays(inputs["input_ids"].device):
            self._log_fallback("each pair row forwards its own prompt (share_prompt auto: off on CUDA).")
            return None
        reason = None
        if args.importance_span == "sequence" and args.effective_importance_mode not in (
            "uniform",
            "dataset",
        ):
            reason = "importance_span='sequence' weights the prompt's tokens too"
        # Unlike the anchors' prompt cache it stays on under gradient checkpointing: measured (CPU,
        # SmolLM2 + LoRA) to lower peak memory there too, since the prompt forward is its own graph.
        reason = reason or self._prompt_cache_unsupported(model, inputs, both_rows=True)
        if reason is not None:
            if setting:
                raise ValueError(
                    f"share_prompt=True, but the pair rows cannot continue a shared prompt: {reason}. "
                    "Set share_prompt=None (auto) or False."
                )
            self._log_fallback(f"each pair row forwards its own prompt (no share_prompt): {reason}.")
            return None
        return split_shared_prompt(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
            inputs["prompt_attention_mask"].sum(1),
        )

    def _share_prompt_pays(self, device: torch.device) -> bool:
        """`share_prompt=None`: whether a shared prompt is worth its extra forward on this device."""
        # Measured on an H200 (benchmarks/README.md, round 8): the prompt's own forward and backward add
        # kernel launches that cost more than the saved tokens (DPO step 2.0-2.1x slower on SmolLM2,
        # 1.12-1.15x on Llama-3.2-1B shapes), for 0.83-0.87x the peak memory. Under checkpointing memory
        # is what the run is short of: it stays on there.
        return device.type != "cuda" or bool(self.args.activation_checkpointing)

    def _prompt_cache_unsupported(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], both_rows: bool = False
    ) -> str | None:
        """Why a forward cannot reuse the prompts' keys/values: the anchors' (after the chosen rows'), or
        with ``both_rows`` the chosen and rejected rows' (after a prompt prefix forward, `share_prompt`)."""
        if "ref_logps" in inputs and not both_rows:
            return "the reference log-probs are precomputed, so no reference forward over the prompts runs"
        if not fused_attribution_supported(self.accelerator):
            return "DeepSpeed / FSDP (each forward of its own is one more parameter gather)"
        for label, candidate in (("policy", model), ("reference", self.ref_model)):
            if candidate is not None:
                reason = prompt_cache_unsupported(self.accelerator.unwrap_model(candidate))
                if reason is not None:
                    return f"the {label}: {reason}"
        prompt_ids, prompt_mask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"]
        n_pairs = prompt_ids.size(0)
        shortest = int(prompt_mask.sum(1).min())
        if shortest < 1:
            return "a prompt is empty (its first anchor token has no prompt position to be predicted from)"
        if both_rows and shortest < 2:
            return "a prompt has a single token (nothing to share before the token each row continues from)"
        ids, cmask, attn = inputs["input_ids"], inputs["completion_mask"], inputs["attention_mask"]
        # The rows must start with exactly the prompts (true for PreferenceCollator batches; a custom
        # data_collator might differ), and be right-padded.
        halves = {"chosen": slice(0, n_pairs), "rejected": slice(n_pairs, 2 * n_pairs)}
        for name in ("chosen", "rejected") if both_rows else ("chosen",):
            rows = halves[name]
            if not rows_start_with_prompts(ids[rows], cmask[rows], prompt_ids, prompt_mask):
                return f"the {name} rows do not start with the sampled prompts (a custom data_collator?)"
        if both_rows:
            steps = torch.arange(attn.size(1), device=attn.device)[None]
            if not torch.equal(attn.bool(), steps < attn.sum(1, keepdim=True)):
                return "the pair rows are not right-padded (a custom data_collator?)"
        return None

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = False
        try:
            loss, metrics = self._compute_loss(model, inputs)
        except NonFiniteError as raw:
            err = _nonfinite_in_context(raw, self.state.global_step, inputs.get("row_ids"))
            if not self.args.skip_nonfinite_batches:
                raise err from raw
            self._nonfinite_skipped += 1
            skipped = True
            warnings.warn(f"{err} -- batch skipped (skip_nonfinite_batches=True).", stacklevel=2)
            # A zero loss that still reaches every trainable parameter, so DDP and the optimizer see a
            # zero gradient rather than a missing one.
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            metrics = {}
        mode = "train" if model.training else "eval"
        if mode == "train" and self._step_pairs:
            # The loss is a mean over the micro-batch's pairs and Trainer divides it by the number of
            # micro-batches: right when they are equal. A step's last, smaller micro-batch (end of an
            # epoch) must weigh by its pairs, as in one batch of all of them.
            pairs, micro_batches = self._step_pairs
            share = inputs["input_ids"].shape[0] // 2 * micro_batches / pairs
            if share != 1.0:
                loss = loss * share
        if self.args.skip_nonfinite_batches:
            skipped_here = float(skipped)
            if self.accelerator.num_processes > 1:
                # The ranks must make the same collectives below: a batch skipped on any rank logs no
                # metrics on any.
                flag = torch.tensor([skipped_here], device=self.accelerator.device)
                skipped_here = float(self.accelerator.reduce(flag, reduction="sum"))
                if skipped_here > 0:
                    metrics = {}
            self._skipped_total += skipped_here  # over all ranks: every rank logs the same count
        if mode == "train" and self.args.skip_nonfinite_batches:  # for `_loss_without_skipped`
            if skipped:
                self._skipped_in_window += 1
            else:
                self._kept_losses.append(float(loss.detach()))
        for key, value in reduce_batch_stats(self.accelerator, metrics, _MAX_METRICS).items():
            self._metrics[mode][key].append(value)
        if self.args.skip_nonfinite_batches and mode == "train":  # the running total (a max over the window)
            self._metrics[mode]["nonfinite/skipped"].append((self._skipped_total, 1.0))
        return (loss, {}) if return_outputs else loss

    def _policy_forward(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        attn: torch.Tensor,
        fused: bool,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
        prefix_only: bool = False,
    ):
        """Policy forward through the (wrapped) model; returns (outputs, input embeddings or None).

        ``prefix_only``: a forward for its keys and values alone (into ``cache``; one position's logits).

        The input embeddings are captured through a hook, so the forward still goes through the wrapped
        model (DDP / DeepSpeed / FSDP bookkeeping) and the fused attribution gradient can target them.
        """
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, _inputs, output):
            if not output.requires_grad:  # frozen embeddings (LoRA): make them a leaf to attribute to
                output = output.detach().requires_grad_(True)
            captured["embeds"] = output
            return output

        bare = self.accelerator.unwrap_model(model)
        embedding = bare.get_input_embeddings()
        handle = embedding.register_forward_hook(capture) if fused else None
        extra = {}
        if cache is not None:
            extra[cache_kwarg(bare)] = cache
        if prefix_only and accepts_logits_to_keep(base_model(bare)):
            extra["logits_to_keep"] = 1
        # The prompt caches only read or capture keys, so checkpointed layers may keep them (prompt_cache).
        keep_cache = keep_cache_when_checkpointing(bare) if cache is not None else contextlib.nullcontext()
        try:
            with keep_cache, outputs_in_forward_dtype(bare):
                outputs = model(
                    input_ids=ids,
                    attention_mask=attn,
                    position_ids=_position_ids(attn) if position_ids is None else position_ids,
                    use_cache=cache is not None,
                    output_hidden_states=fused,
                    **extra,
                )
        finally:
            if handle is not None:
                handle.remove()
        return outputs, captured.get("embeds")

    def _compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        args = self.args
        step = self.state.global_step
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        cmask = inputs["completion_mask"].bool()
        n_pairs = ids.size(0) // 2
        n_rows = 2 * n_pairs
        width = ids.size(1)  # the pairs' width; anchor rows may make a joint forward batch wider
        chunk = args.logits_chunk_size
        pair_ids = inputs.get("row_ids")  # data-row index of each pair, for NaN/Inf messages
        pad = self.processing_class.pad_token_id

        mode = args.effective_importance_mode
        fused = args.uses_attribution and args.attribution_pass == "fused" and model.training
        fused = fused and torch.is_grad_enabled() and fused_attribution_supported(self.accelerator)
        if fused and _dropout_active(self.accelerator.unwrap_model(model)):
            # Spec section 2: the attribution pass runs without dropout, which the training forward has.
            self._log_fallback(
                "the model has active dropout (disable_dropout=False): the attribution runs as its own "
                "eval-mode pass instead of from the training forward (one more forward per step).",
                warn=True,
            )
            fused = False
        if fused and _compiled(model):
            # A compiled forward is one autograd node (its inner embeddings have no path to the logits),
            # and inductor's backward refuses the retain_graph the fused pass needs.
            self._log_fallback(
                "the model is compiled (torch_compile): the attribution runs as its own pass on the "
                "uncompiled model instead of from the training forward (one more forward per step).",
                warn=True,
            )
            fused = False
        scores = None
        if args.uses_attribution and not fused:
            scores = separate_attribution(model, self.accelerator, ids, attn)

        # share_prompt: each pair's prompt (minus its last token) is forwarded once, and the pair rows
        # become continuations of it (`SharedPrompt`); every per-position tensor below is then in the
        # continuations' frame, which predicts the same tokens from the same positions.
        shared = self._shared_prompt(model, inputs)
        policy = self.accelerator.unwrap_model(model)
        capture = ref_capture = None
        if shared is not None:
            ids, attn, cmask = shared.ids, shared.valid, shared.completion
            width = ids.size(1)
            if scores is not None:
                scores = shared.gather(scores)
            capture = PromptKV(policy, n_pairs, shared.prefix_ids.size(1))
            self._policy_forward(
                model, shared.prefix_ids, shared.prefix_mask, False, cache=capture, prefix_only=True
            )

        # Anchors (spec section 5), in one of four layouts (`_anchor_layout`):
        # - "continuation" (share_prompt): anchor rows continue the pairs' shared prompt prefix, joined to
        #   the pairs' forward, or in their own forward when the fused attribution needs the pairs' alone;
        # - "prompt_cache": their own forward over the anchor tokens only, attending to the prompts' keys
        #   and values captured from the pairs' forward (tidpo.prompt_cache); the first anchor token is
        #   predicted at the prompt's last position of the chosen row;
        # - "split": their own forward over prompt + anchor rows (so the fused attribution's backward
        #   covers the pair rows only, as in "prompt_cache": the anchors need no weights);
        # - "joint": prompt + anchor rows joined to the pairs' forward (one parameter gather under
        #   ZeRO-3 / FSDP, where the attribution is a separate pass anyway).
        a_ids = a_attn = a_cmask = a_pos = None
        layout = None
        if args.uses_triplet:
            horizon = self._anchor_horizon(inputs)
            completion = inputs.get("anchor_ids")  # sampled with the other micro-batches of this step
            if completion is None:
                prompt_ids, prompt_mask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"].bool()
                past = None
                if shared is not None and self._decode_from_prefix(model, prompt_ids):
                    past = (capture.decode_cache(), shared.prefix_mask, shared.ids[:n_pairs, :1])
                length = self._decode_length(horizon)
                group = inputs.get("anchor_group", 0)  # set by get_batch_samples
                completion = self._sample_anchors(
                    model, prompt_ids, prompt_mask, length, training=model.training, group=group, past=past
                )
            valid = self._anchor_valid(completion, horizon)
            layout = self._anchor_layout(model, inputs, fused, shared is not None)
            if layout == "continuation":
                # Like the pair rows: the prompt's last token, then the anchor.
                a_ids = torch.cat([ids[:n_pairs, :1], completion], dim=1)
                a_attn = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1).long()
                a_cmask = torch.cat([torch.zeros_like(valid[:, :1]), valid], dim=1)
            elif layout == "prompt_cache":
                prompt_lengths = inputs["prompt_attention_mask"].sum(1)
                prefix_len = int(prompt_lengths.max())
                a_ids, a_cmask = completion, valid
                a_attn, a_pos = continuation_inputs(prompt_lengths, prefix_len, a_cmask)
                capture = PromptKV(policy, n_pairs, prefix_len)
                ref_capture = PromptKV(
                    self.accelerator.unwrap_model(self._reference_module()), n_pairs, prefix_len
                )
            else:
                a_ids, a_attn, a_cmask = self._anchor_rows(
                    inputs["prompt_input_ids"], inputs["prompt_attention_mask"].bool(), completion, valid
                )
        joint = layout == "joint" or (layout == "continuation" and not fused)
        if joint:
            full = max(width, a_ids.size(1))
            ids, attn, cmask = _pad_to(ids, full, pad), _pad_to(attn, full, 0), _pad_to(cmask, full, False)
            a_ids, a_attn = _pad_to(a_ids, full, pad), _pad_to(a_attn, full, 0)
            a_cmask = _pad_to(a_cmask, full, False)

        fwd_ids, fwd_attn = (torch.cat([ids, a_ids]), torch.cat([attn, a_attn])) if joint else (ids, attn)
        fwd_pos = pair_cache = None
        if shared is not None:  # continuations attend to the prefix: mask over prefix + own tokens
            repeats = fwd_ids.size(0) // n_pairs
            fwd_attn, fwd_pos = shared.attention(fwd_attn, shared.starts[:n_pairs].repeat(repeats))
            pair_cache = capture.continuation(repeats)
        elif layout == "prompt_cache":
            pair_cache = capture
        if layout == "continuation" and not joint:
            a_attn, a_pos = shared.attention(a_attn, shared.starts[:n_pairs])
        outputs, embeds = self._policy_forward(
            model, fwd_ids, fwd_attn, fused, cache=pair_cache, position_ids=fwd_pos
        )
        logits = outputs.logits[:n_rows]  # a view: first-dimension slices of contiguous logits stay so
        a_logits = None
        if joint:
            a_logits = outputs.logits[n_rows:]
        elif layout is not None:
            cont = capture.continuation() if layout in ("prompt_cache", "continuation") else None
            a_logits = self._policy_forward(model, a_ids, a_attn, False, cache=cont, position_ids=a_pos)[
                0
            ].logits

        if fused:
            # Eq. 5-6 target: the largest logit at each pair row's last valid position. Taken from the
            # final hidden state so the backward skips the [rows, T, vocab] LM head; models whose head
            # is not a plain projection of it (e.g. logit soft-capping) use the logits themselves.
            last = _last_valid_index(attn)
            rows = torch.arange(n_rows, device=ids.device)
            last_logits = logits[rows, last]
            head = policy.get_output_embeddings()
            hidden_logits = None
            if head is not None:
                # As the forward computed the logits: under its autocast.
                with self._forward_precision(ids.device.type):
                    hidden_logits = head(outputs.hidden_states[-1][rows, last])
            if hidden_logits is not None and torch.allclose(
                hidden_logits.float(), last_logits.float(), rtol=1e-3, atol=1e-3
            ):
                last_logits = hidden_logits
            targets = last_logits.float().max(dim=-1).values
            scores = attribution_from_targets(targets, embeds, attn, retain_graph=True)[:, :width]

        # Reference forwards and the per-token log-probs (only response positions enter any loss).
        ref_logits = a_ref_logits = None
        cached = "ref_logps" in inputs  # never together with the KL (the config refuses it)
        ref_pairs = args.uses_reference and (not cached or args.uses_sequential_kl)
        if shared is not None and (ref_pairs or (args.uses_reference and args.uses_triplet)):
            ref_capture = PromptKV(
                self.accelerator.unwrap_model(self._reference_module()), n_pairs, shared.prefix_ids.size(1)
            )
            self._reference_logits(shared.prefix_ids, shared.prefix_mask, cache=ref_capture, prefix_only=True)
        if args.uses_reference:
            if joint:
                cache = ref_capture.continuation(fwd_ids.size(0) // n_pairs) if shared is not None else None
                both = self._reference_logits(fwd_ids, fwd_attn, cache=cache, position_ids=fwd_pos)
                ref_logits, a_ref_logits = both[:n_rows], both[n_rows:]
            else:
                if ref_pairs:
                    as_head = args.uses_sequential_kl and self._reference_head(model)
                    if shared is not None:
                        cache = ref_capture.continuation(2)
                    else:  # "prompt_cache": this forward captures the prompts for the anchors' below
                        cache = ref_capture
                    ref_logits = self._reference_logits(
                        ids, fwd_attn, cache=cache, position_ids=fwd_pos, as_head=as_head
                    )
                if args.uses_triplet:
                    cont = ref_capture.continuation() if layout in ("prompt_cache", "continuation") else None
                    a_ref_logits = self._reference_logits(a_ids, a_attn, cache=cont, position_ids=a_pos)
        kl = None
        if args.uses_sequential_kl:
            policy_logps, ref_logps, kl = logprobs_and_kl(logits, ref_logits, ids, cmask, chunk_size=chunk)
            kl = kl[:, :width]
        else:
            policy_logps = token_logprobs(logits, ids, chunk_size=chunk, mask=cmask)
            ref_logps = None
            if args.uses_reference:
                if not cached:
                    ref_logps = token_logprobs(ref_logits, ids, chunk_size=chunk, mask=cmask)
                elif shared is not None:
                    ref_logps = _pad_to(shared.gather(inputs["ref_logps"].float()), ids.size(1), 0.0)
                else:
                    ref_logps = _pad_to(inputs["ref_logps"].float(), ids.size(1), 0.0)
        check_finite(
            "policy log-probs",
            policy_logps.masked_fill(~cmask, 0.0),
            rows=_repeat_rows(pair_ids, n_rows),
            step=step,
        )
        logratios = (policy_logps - ref_logps if ref_logps is not None else policy_logps) * cmask
        logratios, policy_logps = logratios[:, :width], policy_logps[:, :width]
        ids, attn, cmask = ids[:, :width], attn[:, :width], cmask[:, :width]
        a_logratios = None
        if args.uses_triplet:
            a_logps = token_logprobs(a_logits, a_ids, chunk_size=chunk, mask=a_cmask)
            a_ref = token_logprobs(a_ref_logits, a_ids, chunk_size=chunk, mask=a_cmask)
            if layout == "prompt_cache":
                # Token 0 of the anchor is predicted at the prompt's last position, in the chosen rows.
                rows, at = torch.arange(n_pairs, device=ids.device), prompt_lengths - 1
                first = label_logprobs(logits[rows, at], a_ids[:, 0], chunk)
                at_prompt_end = (
                    ref_logits.logits(ref_logits.hidden[rows, at])
                    if isinstance(ref_logits, ReferenceHead)
                    else ref_logits[rows, at]
                )
                first_ref = label_logprobs(at_prompt_end, a_ids[:, 0], chunk)
                a_logps = torch.cat([first[:, None], a_logps[:, 1:]], dim=1)
                a_ref = torch.cat([first_ref[:, None], a_ref[:, 1:]], dim=1)
            check_finite(
                "anchor log-probs",
                a_logps.masked_fill(~a_cmask, 0.0),
                rows=_repeat_rows(pair_ids, a_ids.size(0)),
                step=step,
            )
            a_logratios = (a_logps - a_ref) * a_cmask

        span = cmask if args.importance_span == "response" else attn.bool()
        if mode == "dataset":
            if "token_weights" not in inputs:
                raise ValueError(
                    "importance_mode='dataset' needs per-token weights in the data: add "
                    "'chosen_weights' and 'rejected_weights' columns (one float per response token)."
                )
            weights = inputs["token_weights"].float()
            weights = shared.gather(weights) if shared is not None else weights
        else:
            generator = None
            if mode == "random":
                generator = self._random_weight_generators(
                    ids.device, pair_ids, model.training, inputs.get("anchor_group", 0)
                )
            weights = importance_weights(
                mode,
                scores,
                span,
                lambda_importance=args.lambda_importance,
                sigma_div=args.sigma_div,
                generator=generator,
            )
        weights = weights * cmask  # prompt weights (span "sequence") never enter the loss
        check_finite("importance weights", weights, rows=_repeat_rows(pair_ids, n_rows), step=step)

        c_lr, r_lr = logratios[:n_pairs], logratios[n_pairs:]
        c_mask, r_mask = cmask[:n_pairs], cmask[n_pairs:]
        c_w, r_w = weights[:n_pairs], weights[n_pairs:]
        c_kl, r_kl = (kl[:n_pairs], kl[n_pairs:]) if kl is not None else (None, None)

        lt = args.loss_type
        if lt == "ti_dpo":
            losses = weighted_preference_loss(
                c_lr, r_lr, c_w, r_w, args.beta, c_kl, r_kl, alpha=args.kl_alpha, tdpo2=True
            )
            chosen_rewards = args.beta * (c_w * c_lr).sum(1)
            rejected_rewards = args.beta * (r_w * r_lr).sum(1)
        elif lt in ("tdpo1", "tdpo2"):
            ones_c, ones_r = c_mask.to(c_lr.dtype), r_mask.to(r_lr.dtype)
            losses = weighted_preference_loss(
                c_lr, r_lr, ones_c, ones_r, args.beta, c_kl, r_kl, alpha=args.kl_alpha, tdpo2=lt == "tdpo2"
            )
            chosen_rewards, rejected_rewards = args.beta * c_lr.sum(1), args.beta * r_lr.sum(1)
        elif lt == "dpo":
            losses = dpo_loss(c_lr, r_lr, args.beta, label_smoothing=args.label_smoothing)
            chosen_rewards, rejected_rewards = args.beta * c_lr.sum(1), args.beta * r_lr.sum(1)
        elif lt == "ipo":
            losses = ipo_loss(c_lr, r_lr, c_mask, r_mask, args.beta)
            chosen_rewards, rejected_rewards = args.beta * c_lr.sum(1), args.beta * r_lr.sum(1)
        else:  # simpo
            losses = simpo_loss(
                c_lr, r_lr, c_mask, r_mask, args.beta, args.simpo_gamma, label_smoothing=args.label_smoothing
            )
            chosen_rewards = args.beta * c_lr.sum(1) / c_mask.sum(1).clamp(min=1)
            rejected_rewards = args.beta * r_lr.sum(1) / r_mask.sum(1).clamp(min=1)
        check_finite("per-pair loss", losses.detach(), rows=pair_ids, step=step)

        # An eval batch's loss and metrics cover its data pairs only (`_real_pairs`): the first `keep`
        # pairs; `rows` takes their chosen and rejected rows.
        keep = n_pairs if model.training else self._real_pairs(n_pairs)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if keep == n_pairs else torch.cat([t[:keep], t[n_pairs : n_pairs + keep]])

        # (A rank whose eval batch is all padding returns its batch's loss: `gather_for_metrics` drops it.)
        counted = keep or n_pairs
        loss = losses[:counted].mean()

        metrics: dict[str, torch.Tensor] = {}  # this rank's stats, reduced in `compute_loss`
        if args.uses_triplet:
            b, b_mask = pack_to_response_start(c_lr, c_mask)
            c, c_mask_p = pack_to_response_start(r_lr, r_mask)
            d, d_mask = pack_to_response_start(a_logratios, a_cmask)
            triplet = triplet_terms(d, d_mask, b, b_mask, c, c_mask_p, args.triplet_margin)
            loss = loss + args.gamma * triplet.loss[:counted].mean()
            metrics["triplet/loss"] = self._gather_mean(triplet.loss[:keep])
            metrics["triplet/dist_pos"] = self._gather_mean(triplet.dist_pos[:keep])
            metrics["triplet/dist_neg"] = self._gather_mean(triplet.dist_neg[:keep])
            metrics["anchor/length"] = self._gather_mean(a_cmask[:keep].sum(1).float())
        check_finite("loss", loss.detach().reshape(1), step=step)

        metrics.update(
            self._pair_metrics(
                chosen_rewards[:keep],
                rejected_rewards[:keep],
                rows(policy_logps),
                rows(logits[:, :width]),
                rows(cmask),
                keep,
            )
        )
        if kl is not None:
            metrics["kl/chosen"] = self._gather_mean(c_kl[:keep].sum(1))
            metrics["kl/rejected"] = self._gather_mean(r_kl[:keep].sum(1))
        if lt == "ti_dpo":  # the baselines weight every token 1
            metrics.update(self._weight_metrics(rows(weights), rows(cmask)))
        return loss, metrics

    def _real_pairs(self, n_pairs: int) -> int:
        """How many of this eval batch's pairs are data. On several processes accelerate fills the last
        batch of an eval set with rows from its start, so every rank has a full batch; those rows come
        last in the ranks' order, and `gather_for_metrics` drops them from gathered predictions. The
        metrics here are sums over the ranks: they must drop them too."""
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return n_pairs
        return max(0, min(n_pairs, state.remainder - self.accelerator.process_index * n_pairs))

    def _get_grad_norm(self, model, grad_norm=None):
        # `Trainer` computes the norm (clipping) right before the optimizer step: a finite loss whose
        # gradients hold NaN/Inf (e.g. huge per-token weights) must not reach the weights either.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is None or math.isfinite(float(grad_norm)):
            return grad_norm
        message = (
            f"the gradient norm is {float(grad_norm)} at step {self.state.global_step} (0-based optimizer "
            "step): the loss was finite but its gradients hold NaN/Inf (e.g. huge per-token weights or "
            "reference log-probs in the data)"
        )
        if not self.args.skip_nonfinite_batches:
            raise NonFiniteError(f"{message}; the step was not applied, saved checkpoints are untouched.")
        warnings.warn(
            f"{message} -- step skipped (skip_nonfinite_batches=True): gradients zeroed.", stacklevel=2
        )
        model.zero_grad(set_to_none=False)
        self._skipped_total += 1
        self._metrics["train"]["nonfinite/skipped"].append((self._skipped_total, 1.0))
        return grad_norm

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Written into tmp-checkpoint-N and renamed when complete, so a run killed mid-save never leaves
        # a checkpoint-N that resume would pick up half-written (tidpo.training.checkpointing).
        save_checkpoint_atomically(self, model, trial)

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def _gather_mean(values: torch.Tensor) -> torch.Tensor:
        # This rank's [sum, count]; `compute_loss` sums them over the ranks (`reduce_batch_stats`) and
        # `log` divides a window's sums by its counts (`window_metrics`).
        values = values.detach().float().reshape(-1)
        return torch.stack([values.sum(), values.new_tensor(float(values.numel()))])

    @staticmethod
    def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # [sum, count] over the masked tokens, like `_gather_mean` (no boolean indexing: no host sync).
        mask = mask.float()
        return torch.stack([(values.detach().float() * mask).sum(), mask.sum()])

    def _pair_metrics(self, chosen_rewards, rejected_rewards, policy_logps, logits, cmask, n_pairs):
        with torch.no_grad():
            mask = cmask[: 2 * n_pairs]
            seq_logps = (policy_logps[: 2 * n_pairs] * mask).sum(1)
            # Mean logit over the response tokens of all chosen (rejected) rows together, as TRL pools
            # them (a long response counts more than a short one); a token's logits sit one position
            # earlier.
            shifted = torch.zeros_like(mask)
            shifted[:, :-1] = mask[:, 1:]
            vocab_means = logits[: 2 * n_pairs].mean(dim=-1, dtype=torch.float32)
        return {
            "rewards/chosen": self._gather_mean(chosen_rewards),
            "rewards/rejected": self._gather_mean(rejected_rewards),
            "rewards/accuracies": self._gather_mean((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": self._gather_mean(chosen_rewards - rejected_rewards),
            "logps/chosen": self._gather_mean(seq_logps[:n_pairs]),
            "logps/rejected": self._gather_mean(seq_logps[n_pairs:]),
            "logits/chosen": self._token_mean(vocab_means[:n_pairs], shifted[:n_pairs]),
            "logits/rejected": self._token_mean(vocab_means[n_pairs:], shifted[n_pairs:]),
        }

    def _weight_metrics(self, weights: torch.Tensor, cmask: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            w = weights[cmask].float()
            # Entropy (nats) of each row's weights read as a distribution over its response tokens.
            p = (weights / weights.sum(1, keepdim=True).clamp(min=1e-12)) * cmask
            entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(1)
        return {
            "weights/mean": self._gather_mean(w),
            "weights/_sq": self._gather_mean(w * w),  # with the mean, the pooled std (window_metrics)
            "weights/max": w.max() if w.numel() else w.new_tensor(float("-inf")),
            "weights/entropy": self._gather_mean(entropy),
        }

    def _prepared_for_eval(self, dataset: Any) -> Any:
        """Preference data in any form the constructor takes (path, rows, raw Dataset), prepared the same
        way; a name of one of the trainer's eval sets (`Trainer`'s meaning of a string) is kept."""
        if dataset is None or (
            isinstance(dataset, str) and isinstance(self.eval_dataset, dict) and dataset in self.eval_dataset
        ):
            return dataset
        if isinstance(dataset, Dataset) and "chosen_input_ids" in dataset.column_names:
            return dataset
        dataset = self.prepare_dataset(dataset, self.processing_class, self.args)
        return self._precompute_ref_logps(dataset) if self.args.precompute_ref_logps else dataset

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.compute_metrics is not None:
            raise ValueError(_NO_COMPUTE_METRICS)
        if not isinstance(eval_dataset, dict):
            eval_dataset = self._prepared_for_eval(eval_dataset)
        # `log` names the eval metrics with this prefix, as `Trainer` names eval_loss (e.g. a dict of eval
        # sets gives eval_<name>_loss and eval_<name>_rewards/accuracies).
        self._eval_prefix = metric_key_prefix
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`: the loss and every metric of `evaluate` on ``test_dataset`` (no predictions:
        the output's ``predictions`` are None), named with ``metric_key_prefix``."""
        self._metrics["eval"].clear()
        output = super().predict(self._prepared_for_eval(test_dataset), ignore_keys, metric_key_prefix)
        # `predict` does not log: take its batches' metrics here, so they never leak into a later eval.
        for key, value in window_metrics(self._metrics["eval"]).items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        self._metrics["eval"].clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # The end-of-training summary (train_runtime, train_loss) covers the run, not the steps since the
        # last log: their metrics are left out of it, as `Trainer` leaves out their loss.
        metrics = {} if "train_runtime" in logs else window_metrics(self._metrics[mode])
        if mode == "eval":
            metrics = {f"{self._eval_prefix}_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        if self.args.skip_nonfinite_batches:
            self._loss_without_skipped(logs)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _loss_without_skipped(self, logs: dict[str, float]) -> None:
        """Replace the logged training loss by the mean over the batches that were not skipped.

        A skipped batch returns a zero loss (it only carries a zero gradient), which `Trainer` would average
        into `loss` and `train_loss` as if it were a real value. Every rank calls `log` with the same keys,
        so the gathers below run everywhere.
        """
        if "loss" in logs:
            kept = global_sum_count(self.accelerator, torch.tensor(self._kept_losses, dtype=torch.float64))
            skipped = global_sum_count(self.accelerator, torch.tensor([float(self._skipped_in_window)]))[0]
            self._run_losses[0] += kept[0]
            self._run_losses[1] += kept[1]
            self._run_losses[2] += skipped
            if skipped:
                logs["loss"] = kept[0] / kept[1] if kept[1] else float("nan")
            self._kept_losses.clear()
            self._skipped_in_window = 0
        if "train_loss" in logs and self._run_losses[2]:
            total, count, _ = self._run_losses
            logs["train_loss"] = total / count if count else float("nan")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        skipped = self._nonfinite_skipped
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
        if self._nonfinite_skipped != skipped:  # as in training_step: left out of eval_loss
            loss = torch.full_like(loss, float("nan"))
        return loss, None, None
