"""`TIDPOConfig`: the training arguments of TI-DPO and its baselines.

Every field below documents what it is, the paper equation it controls and its default. Defaults are
the paper's final hyper-parameters (spec section 6: beta 0.1, alpha 0.5, gamma 0.1, lambda 0.7,
sigma = n/4) and, where the paper is silent, the authors' code (lr 5e-6, max_length 256, prompt 128).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy
from transformers import TrainingArguments

LOSS_TYPES = ("ti_dpo", "dpo", "ipo", "simpo", "tdpo1", "tdpo2")
IMPORTANCE_MODES = ("hybrid", "uniform", "random", "prior", "gradient", "softmax", "dataset")
IMPORTANCE_SPANS = ("response", "sequence")
ATTRIBUTION_PASSES = ("fused", "separate")


@dataclass
class TIDPOConfig(TrainingArguments):
    r"""Configuration of [`TIDPOTrainer`]: `transformers.TrainingArguments` plus the TI-DPO options.

    Parameters:
        > The objective

        loss_type (`str`, defaults to `"ti_dpo"`):
            `"ti_dpo"`: token-weighted DPO (Eq. 9-12) with the sequential KL term (`tdpo_alpha`) and the
            triplet term (`gamma`, Eq. 13-14). Baselines on the same pipeline: `"dpo"` (sigmoid DPO; cDPO
            with `label_smoothing`), `"ipo"` (length-averaged log-ratios, squared loss),
            `"simpo"` (reference-free, length-normalised, target margin `simpo_gamma`), `"tdpo1"` and
            `"tdpo2"` (token-level DPO with the sequential KL, uniform weights; TDPO2 stops the gradient of
            the chosen KL).
        beta (`float`, defaults to `0.1`):
            Temperature of the implicit reward, the beta of `-log sigmoid(beta * Delta)` (Eq. 12).
        label_smoothing (`float`, defaults to `0.0`):
            cDPO's assumed probability that a label is flipped (`"dpo"` and `"simpo"` only), in [0, 0.5).
        tdpo_alpha (`float` or `None`, defaults to `None`):
            Weight alpha of the sequential KL term `alpha * (KL_seq(y_l) - sg(KL_seq(y_w)))` inside the
            sigmoid (spec section 4; the paper's "TDPO KL weight"). Used by `"ti_dpo"`, `"tdpo1"`,
            `"tdpo2"`; 0 turns it off (then `"ti_dpo"` is exactly Eq. 12 plus the triplet term). `None`:
            0.5 (the paper's table). `"tdpo1"` has no alpha: its KL difference always enters with weight 1
            (a value set here is warned about and not used). The field keeps what was given; the weight
            the loss uses is `kl_alpha`, so a config copied with another `loss_type`
            (`dataclasses.replace`) gets that loss type's weight.
        gamma (`float`, defaults to `0.1`):
            Weight of the triplet loss in `L = L_base + gamma * L_triplet` (Eq. 14). 0 disables the triplet
            term and anchor sampling (the "no triplet" ablation).
        triplet_margin (`float`, defaults to `0.1`):
            Margin of the triplet hinge `max(0, d_pos - d_neg + margin)` (Eq. 13). The paper never gives
            its value; 0.1 is our decision.
        simpo_gamma (`float`, defaults to `0.5`):
            SimPO's target reward margin (`"simpo"` only).

        > Token importance (Eq. 5-8)

        importance_mode (`str`, defaults to `"hybrid"`):
            How token weights are made: `"hybrid"` (gradient attribution mixed with the Gaussian prior,
            Eq. 8), `"uniform"` (all 1: plain DPO/TDPO maths), `"random"` (Uniform(0, 1] draws per token,
            new at every step, seeded by `seed`, the step and the data row), `"prior"` (lambda = 0),
            `"gradient"` (lambda = 1, no prior), `"softmax"` (softmax of the raw attribution times n), or
            `"dataset"` (TIS-DPO-style precomputed `chosen_weights`/`rejected_weights` columns).
            Only `"ti_dpo"` uses weights; the baselines always use uniform weights.
        lambda_importance (`float`, defaults to `0.7`):
            Mixing weight lambda of `W = lambda * I_norm + (1 - lambda) * P` (Eq. 8), in [0, 1].
        sigma_div (`float`, defaults to `4.0`):
            The prior's width: `sigma = max(1, n / sigma_div)` (Eq. 7), so sigma = n/4 by default.
        importance_span (`str`, defaults to `"response"`):
            Positions the weights are normalised over: `"response"` (n = T, the paper's wording) or
            `"sequence"` (prompt + response, as the authors' code does; prompt weights are then ignored).
        attribution_pass (`str`, defaults to `"fused"`):
            `"fused"` takes the attribution gradient (Eq. 5-6) from the policy forward the loss already runs
            (one extra backward to the input embeddings, no extra forward); `"separate"` runs its own
            forward in eval mode first. They give the same weights when the model has no active dropout.
            `"fused"` falls back to the separate pass where it cannot apply: active dropout and a compiled
            model (`torch_compile`), each warned about once, and DeepSpeed / FSDP (docs/scaling.md).

        share_prompt (`bool` or `None`, defaults to `None`):
            Forward each pair's prompt once for both of its rows: the prompt without its last token runs as
            its own forward, and the chosen and rejected rows continue its keys and values
            (`tidpo.prompt_cache.SharedPrompt`). Same loss and gradients as forwarding `prompt + response`
            twice, without the prompt's second share of the policy forward, its backward and the reference
            forward; and the fused attribution's backward runs over the continuations only (the response
            tokens' gradients never pass through the prompt's layers). Every loss type uses it, DPO too.
            `None`: on where `anchor_prompt_cache` may apply (same architectures, attention kernels and
            backends; non-reentrant gradient checkpointing), every prompt has 2+ tokens and the weights'
            span is the response; on CUDA only under gradient checkpointing. On a GPU the prompt's own
            forward and backward cost more kernel launches than its saved tokens are worth (H200, bf16:
            the DPO step 2.0-2.1x slower on SmolLM2, 1.12-1.15x on Llama-3.2-1B shapes), for 0.83-0.87x
            the peak memory; under checkpointing memory is what the run is short of. Under checkpointing
            it also lowers peak memory on the CPU (measured), so unlike `anchor_prompt_cache` it stays on
            there; the anchors then continue the prompts too.
            `True` raises an error saying why where it does not apply.

        > Anchors for the triplet term (spec section 5)

        anchor_max_new_tokens (`int`, defaults to `64`): longest anchor sampled from the policy. Decoding
            stops earlier once no pair can use more tokens: Eq. 13 compares the anchor with the chosen and
            the rejected response only at positions valid in both, so tokens past the longer of a pair's
            two responses never enter the loss (same loss and gradients; `anchor/length` counts the
            tokens that can enter it).
        anchor_temperature (`float`, defaults to `0.8`): sampling temperature of anchors.
        anchor_top_k (`int`, defaults to `50`): top-k filter of anchor sampling (0 disables it).
        anchor_top_p (`float`, defaults to `0.95`): nucleus filter of anchor sampling.
        anchor_static_cache (`bool` or `None`, defaults to `None`):
            Decode anchors into a static KV cache of `max_prompt_length + anchor_max_new_tokens`
            positions, kept across steps. On GPU the one-token decode step is then compiled with CUDA
            graphs (torch.compile "reduce-overhead"): eager decoding there is bound by kernel launches,
            and the anchors' sequential decode steps would otherwise cost several training steps. The
            first step (and each new batch size) pays the compilation, tens of seconds. `None`: on for
            CUDA without parameter sharding (single GPU, DDP); off on CPU (decoding is bound by memory
            bandwidth there; no gain) and under DeepSpeed ZeRO / FSDP (weights gathered into new buffers).
        anchor_prompt_cache (`bool` or `None`, defaults to `None`):
            Forward only the anchor `y_a` and let it attend to the prompt's keys and values from the chosen
            row's forward (`tidpo.prompt_cache`), instead of forwarding `prompt + y_a` again: same loss and
            gradients, without the prompt's share of the anchors' policy forward, backward and reference
            forward. `None`: on where it applies (architectures whose equality the tests check: Llama,
            Mistral, Qwen2/3, Gemma, Phi-3, GPT-2 without sliding windows, with sdpa or eager attention;
            no DeepSpeed ZeRO / FSDP, no precomputed reference log-probs), full rows otherwise. Under
            gradient checkpointing `None` keeps full rows: the anchors' gradient would make every
            checkpointed pair layer's recomputed activations live at once (measured: peak memory 1.83x
            DPO against 1.34x, for 4-5% less time); `True` opts in there (non-reentrant checkpointing, not
            GPT-2). `True` raises an error saying why where it does not apply. With `share_prompt` on, the
            anchors continue the pair rows' shared prompt prefix instead (same saving; `False` gives them
            full rows in their own forward).
        anchor_sampling_rows (`int`, defaults to `64`):
            Under gradient accumulation, sample the anchors of several micro-batches of one optimizer step
            in one decode loop, before the first of them runs. The policy does not change within an
            optimizer step, so these are samples of the current policy as spec section 5 asks; decoding
            reads every weight once per token whatever the number of rows, so `k` micro-batches cost about
            one decode loop instead of `k`. At most this many rows per loop (their KV cache is alive while
            they decode: lower it if sampling runs out of memory). `0`, or fewer rows than two
            micro-batches, samples each micro-batch's anchors in its own step.

        > Data

        max_length (`int` or `None`, defaults to `256`): longest prompt + response, in tokens.
        max_prompt_length (`int` or `None`, defaults to `128`): prompts are truncated from the left to this
            (a leading BOS token is kept; the truncated rows are warned about).
        drop_overlong (`bool`, defaults to `False`):
            Drop rows whose response gets no token after truncation (and report how many) instead of
            raising an error naming them.
        drop_identical (`bool`, defaults to `False`):
            Drop rows whose chosen and rejected are identical (they are always counted and warned about).
        precompute_ref_logps (`bool`, defaults to `False`):
            Run the frozen reference once over the datasets before training and cache its per-token
            log-probs, so no reference forward runs during training. Requires a frozen reference and no
            sequential KL term (`tdpo_alpha = 0` or a loss without it); anchors still need the reference.

        > Models

        model_init_kwargs (`dict` or `None`, defaults to `None`):
            Keyword arguments for `from_pretrained` when `model` / `ref_model` are given by name (e.g.
            `{"dtype": "bfloat16"}`).
        disable_dropout (`bool`, defaults to `True`):
            Set every dropout probability of the policy and the reference to 0: the `nn.Dropout` modules
            (as TRL does) and the rates models keep as floats: Llama-style `attention_dropout`, OPT-style
            `dropout` / `activation_dropout` / `layerdrop`.
            The attribution of Eq. 5-6 is defined without dropout: with `False` and a model that drops
            anything, the attribution runs as its own eval-mode pass (`attribution_pass="separate"`).

        > Safety

        skip_nonfinite_batches (`bool`, defaults to `False`):
            By default a NaN/Inf in log-probs, weights or the loss, or in the gradients of a finite loss
            (their norm, checked before each optimizer step), stops the run with a message naming the step
            (and the rows). When True such a batch contributes a zero gradient (such a step: all gradients
            zeroed), is counted in the logs (`nonfinite/skipped`, a running total over all ranks) and warned
            about, and its loss is left out of the logged loss. The optimizer still steps, so momentum and
            weight decay still move the weights on that step. Under DDP the ranks agree on a skip; not
            available under ZeRO-3 / FSDP (their sharded forwards cannot skip out of step).
        logits_chunk_size (`int`, defaults to `1024`):
            Rows of [rows, vocab] logits processed at once by the chunked log-prob and KL kernels; bounds
            the float32 working memory.
    """

    loss_type: str = field(default="ti_dpo", metadata={"help": f"One of {LOSS_TYPES}."})
    beta: float = field(default=0.1, metadata={"help": "Implicit-reward temperature beta (Eq. 12)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing ('dpo', 'simpo')."})
    tdpo_alpha: float | None = field(
        default=None, metadata={"help": "Sequential KL weight alpha (spec §4); none: 0.5 (tdpo1: always 1)."}
    )
    gamma: float = field(default=0.1, metadata={"help": "Triplet loss weight gamma (Eq. 14)."})
    triplet_margin: float = field(default=0.1, metadata={"help": "Triplet hinge margin (Eq. 13)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})

    importance_mode: str = field(default="hybrid", metadata={"help": f"One of {IMPORTANCE_MODES}."})
    lambda_importance: float = field(default=0.7, metadata={"help": "lambda of Eq. 8, in [0, 1]."})
    sigma_div: float = field(default=4.0, metadata={"help": "sigma = max(1, n / sigma_div) (Eq. 7)."})
    importance_span: str = field(default="response", metadata={"help": f"One of {IMPORTANCE_SPANS}."})
    attribution_pass: str = field(default="fused", metadata={"help": f"One of {ATTRIBUTION_PASSES}."})

    share_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Forward each pair's prompt once; chosen and rejected continue it (true, false or auto)."
        },
    )

    anchor_max_new_tokens: int = field(default=64, metadata={"help": "Longest policy-sampled anchor."})
    anchor_temperature: float = field(default=0.8, metadata={"help": "Anchor sampling temperature."})
    anchor_top_k: int = field(default=50, metadata={"help": "Anchor sampling top-k (0 = off)."})
    anchor_top_p: float = field(default=0.95, metadata={"help": "Anchor sampling top-p."})
    anchor_static_cache: bool | None = field(
        default=None,
        metadata={"help": "Static KV cache + compiled decoding for anchors (true, false or auto: CUDA)."},
    )
    anchor_prompt_cache: bool | None = field(
        default=None,
        metadata={
            "help": "Anchors' forward reuses the prompt's keys/values of the pair rows (true, false or auto)."
        },
    )
    anchor_sampling_rows: int = field(
        default=64,
        metadata={
            "help": "Rows per anchor decode loop across accumulated micro-batches (0 = per micro-batch)."
        },
    )

    max_length: int | None = field(
        default=256, metadata={"help": "Longest prompt + response (tokens; none = no limit)."}
    )
    max_prompt_length: int | None = field(
        default=128, metadata={"help": "Longest prompt (left-truncated; none = no limit)."}
    )
    drop_overlong: bool = field(default=False, metadata={"help": "Drop rows left without response tokens."})
    drop_identical: bool = field(default=False, metadata={"help": "Drop rows with chosen == rejected."})
    precompute_ref_logps: bool = field(default=False, metadata={"help": "Cache reference log-probs."})

    model_init_kwargs: dict | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when model is a name."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout to 0 (policy, reference)."}
    )

    skip_nonfinite_batches: bool = field(default=False, metadata={"help": "Skip (and count) NaN batches."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Rows per chunk of logits kernels."})

    # Defaults that differ from TrainingArguments, as TRL's DPOConfig does.
    learning_rate: float = field(
        default=5e-6, metadata={"help": "AdamW learning rate (authors' code: 5e-6)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator needs the tokenised columns (others are ignored)."},
    )

    def __post_init__(self) -> None:
        self._validate_tidpo()
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing supports autograd.grad, which the attribution backward uses.
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()
        kwargs = self.activation_checkpointing_kwargs or {}
        if (
            self.activation_checkpointing
            and kwargs.get("use_reentrant") is True
            and self.uses_attribution
            and self.attribution_pass == "fused"
        ):
            raise ValueError(
                "TIDPOConfig: gradient checkpointing with use_reentrant=True cannot run the fused attribution "
                "pass (torch's reentrant checkpoint does not support the autograd.grad call it makes). Use "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (the default here), or "
                "attribution_pass='separate'."
            )

    def _validate_tidpo(self) -> None:
        def bad(option: str, value: object, expected: str) -> ValueError:
            return ValueError(f"TIDPOConfig: invalid {option}={value!r}: expected {expected}.")

        if self.loss_type not in LOSS_TYPES:
            trl = " (TRL's 'sigmoid' is 'dpo' here)" if self.loss_type == "sigmoid" else ""
            raise bad("loss_type", self.loss_type, f"one of {', '.join(LOSS_TYPES)}{trl}")
        self._check_types(bad)
        if self.importance_mode not in IMPORTANCE_MODES:
            raise bad("importance_mode", self.importance_mode, f"one of {', '.join(IMPORTANCE_MODES)}")
        if self.importance_span not in IMPORTANCE_SPANS:
            raise bad("importance_span", self.importance_span, f"one of {', '.join(IMPORTANCE_SPANS)}")
        if self.attribution_pass not in ATTRIBUTION_PASSES:
            raise bad("attribution_pass", self.attribution_pass, f"one of {', '.join(ATTRIBUTION_PASSES)}")
        if not self.beta > 0:
            raise bad("beta", self.beta, "a number > 0")
        if not 0.0 <= self.lambda_importance <= 1.0:
            raise bad("lambda_importance", self.lambda_importance, "a number in [0, 1]")
        if not self.sigma_div > 0:
            raise bad("sigma_div", self.sigma_div, "a number > 0")
        if not self.gamma >= 0:
            raise bad("gamma", self.gamma, "a number >= 0 (0 disables the triplet term)")
        # Options set away from their defaults for a loss that does not read them: say so (defaults are
        # left alone, so a config re-created from its own values stays quiet).
        unused = []
        if self.loss_type != "ti_dpo" and self.gamma not in (0.0, 0.1):
            hint = " (SimPO's target margin is simpo_gamma)" if self.loss_type == "simpo" else ""
            unused.append(f"gamma={self.gamma} is the triplet weight of loss_type='ti_dpo'{hint}")
        if self.loss_type != "ti_dpo" and self.importance_mode != "hybrid":
            unused.append(
                f"importance_mode={self.importance_mode!r} weights the tokens of loss_type='ti_dpo'"
            )
        if self.loss_type in ("dpo", "ipo", "simpo") and self.tdpo_alpha not in (None, 0.0, 0.5):
            unused.append(f"tdpo_alpha={self.tdpo_alpha} is the sequential KL weight of ti_dpo / tdpo2")
        if self.loss_type == "tdpo1" and self.tdpo_alpha not in (None, 1.0):
            unused.append(
                f"tdpo_alpha={self.tdpo_alpha} is the sequential KL weight of ti_dpo / tdpo2 (TDPO1's KL "
                "difference enters with weight 1)"
            )
        if self.loss_type != "simpo" and self.simpo_gamma != 0.5:
            unused.append(f"simpo_gamma={self.simpo_gamma} is the target margin of loss_type='simpo'")
        unused = [f"{what}; loss_type={self.loss_type!r} does not use it." for what in unused]
        for what in unused + self._unused_by_the_weights_or_anchors():
            # stacklevel: the caller of TIDPOConfig(...) (past the generated __init__ and its wrapper)
            warnings.warn(f"TIDPOConfig: {what}", UserWarning, stacklevel=5)
        if self.tdpo_alpha is not None and not self.tdpo_alpha >= 0:
            raise bad("tdpo_alpha", self.tdpo_alpha, "a number >= 0 (0 disables the sequential KL)")
        if not self.simpo_gamma >= 0:
            raise bad("simpo_gamma", self.simpo_gamma, "a number >= 0")
        if not self.triplet_margin >= 0:
            raise bad("triplet_margin", self.triplet_margin, "a number >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if self.label_smoothing > 0 and self.loss_type not in ("dpo", "simpo"):
            raise bad("label_smoothing", self.label_smoothing, "0 unless loss_type is 'dpo' or 'simpo'")
        if self.anchor_max_new_tokens < 1:
            raise bad("anchor_max_new_tokens", self.anchor_max_new_tokens, "an integer >= 1")
        if not self.anchor_temperature > 0:
            raise bad("anchor_temperature", self.anchor_temperature, "a number > 0")
        if self.anchor_top_k < 0:
            raise bad("anchor_top_k", self.anchor_top_k, "an integer >= 0 (0 disables top-k)")
        if not 0.0 < self.anchor_top_p <= 1.0:
            raise bad("anchor_top_p", self.anchor_top_p, "a number in (0, 1]")
        if self.anchor_sampling_rows < 0:
            raise bad(
                "anchor_sampling_rows", self.anchor_sampling_rows, "an integer >= 0 (0: per micro-batch)"
            )
        if self.max_length is not None and self.max_length < 2:
            raise bad("max_length", self.max_length, "an integer >= 2 or None")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise bad("max_prompt_length", self.max_prompt_length, "an integer >= 1 or None")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise bad(
                "max_prompt_length",
                self.max_prompt_length,
                f"less than max_length={self.max_length}, so responses keep at least one token",
            )
        if self.logits_chunk_size < 1:
            raise bad("logits_chunk_size", self.logits_chunk_size, "an integer >= 1")
        if self.precompute_ref_logps and self.uses_sequential_kl:
            fix = (
                "Set tdpo_alpha=0 or precompute_ref_logps=False"
                if self.loss_type == "ti_dpo"
                else f"{self.loss_type} always has the KL: set precompute_ref_logps=False"
            )
            raise ValueError(
                "TIDPOConfig: precompute_ref_logps=True cannot be combined with the sequential KL term "
                f"(loss_type={self.loss_type!r}, KL weight {self.kl_alpha}): the KL needs the reference's "
                f"full distribution at every step. {fix}."
            )
        if self.remove_unused_columns:
            raise bad(
                "remove_unused_columns",
                True,
                "False (the default): the trainer's collator reads the tokenised columns, which the model's "
                "forward does not name; columns nothing reads are ignored anyway",
            )
        if self.precompute_ref_logps and self.loss_type == "simpo":
            raise ValueError(
                "TIDPOConfig: precompute_ref_logps=True is pointless with loss_type='simpo' "
                "(SimPO has no reference model). Set precompute_ref_logps=False."
            )

    # Field kinds checked before any value is compared: a string "0.1" or "false" from a hand-written
    # dict would otherwise fail in a comparison naming no option, or count as true.
    _FLOATS = (
        "beta", "label_smoothing", "tdpo_alpha", "gamma", "triplet_margin", "simpo_gamma",
        "lambda_importance", "sigma_div", "anchor_temperature", "anchor_top_p",
    )  # fmt: skip
    _INTS = (
        "anchor_max_new_tokens", "anchor_top_k", "anchor_sampling_rows", "max_length", "max_prompt_length",
        "logits_chunk_size",
    )  # fmt: skip
    _BOOLS = (
        "share_prompt", "anchor_static_cache", "anchor_prompt_cache", "drop_overlong", "drop_identical",
        "precompute_ref_logps", "disable_dropout", "skip_nonfinite_batches",
    )  # fmt: skip
    _OPTIONAL = ("tdpo_alpha", "max_length", "max_prompt_length", "share_prompt", "anchor_static_cache",
                 "anchor_prompt_cache")  # fmt: skip

    def _check_types(self, bad: Callable[[str, object, str], ValueError]) -> None:
        """Refuse values of the wrong kind; store numpy scalars (sweeps, pandas rows) and 0/1 flags as the
        Python float / int / bool they stand for (they must serialise into the run's config JSON)."""
        for name in self._FLOATS + self._INTS + self._BOOLS:
            value = getattr(self, name)
            if value is None and name in self._OPTIONAL:
                continue
            is_bool = isinstance(value, (bool, numpy.bool_))
            if name in self._BOOLS:
                ok = is_bool or (isinstance(value, numbers.Integral) and value in (0, 1))
                kind, expected = bool, "True or False"
            elif name in self._INTS:
                ok, kind, expected = isinstance(value, numbers.Integral) and not is_bool, int, "an integer"
            else:
                ok = isinstance(value, numbers.Real) and not is_bool and math.isfinite(value)
                kind, expected = float, "a finite number"
            if not ok:
                expected += " or None" if name in self._OPTIONAL else ""
                raise bad(name, value, expected)
            setattr(self, name, kind(value))

    def _unused_by_the_weights_or_anchors(self) -> list[str]:
        """Importance and anchor options set away from their defaults where nothing reads them."""
        defaults = {f.name: f.default for f in self.__dataclass_fields__.values()}
        mode = self.effective_importance_mode
        readers = {
            "lambda_importance": ("mixes attribution and prior (importance_mode='hybrid')", mode == "hybrid"),
            "sigma_div": ("sets the positional prior's width (importance_mode 'hybrid' or 'prior')",
                          mode in ("hybrid", "prior")),
            "attribution_pass": ("runs the gradient attribution (importance_mode 'hybrid', 'gradient' or "
                                 "'softmax')", self.uses_attribution),
        }  # fmt: skip
        triplet = "samples the triplet term's anchors (loss_type='ti_dpo' with gamma > 0)"
        for name in ("anchor_max_new_tokens", "anchor_temperature", "anchor_top_k", "anchor_top_p",
                     "anchor_static_cache", "anchor_prompt_cache", "anchor_sampling_rows"):  # fmt: skip
            readers[name] = (triplet, self.uses_triplet)
        readers["triplet_margin"] = ("is the triplet term's margin (loss_type='ti_dpo' with gamma > 0)",
                                     self.uses_triplet)  # fmt: skip
        setting = (
            f"loss_type={self.loss_type!r}, importance_mode={self.importance_mode!r}, gamma={self.gamma}"
        )
        return [
            f"{name}={getattr(self, name)!r} is not used: it {what}, which {setting} does without."
            for name, (what, read) in readers.items()
            if not read and getattr(self, name) != defaults[name]
        ]

    # Derived switches, so the trainer reads intent rather than re-deriving it from several fields.
    @property
    def kl_alpha(self) -> float:
        """The weight of the sequential KL term the loss uses: 1 for TDPO1, `tdpo_alpha` (None: 0.5) for
        TI-DPO and TDPO2, 0 for losses without the term."""
        if self.loss_type == "tdpo1":
            return 1.0
        if self.loss_type in ("ti_dpo", "tdpo2"):
            return 0.5 if self.tdpo_alpha is None else float(self.tdpo_alpha)
        return 0.0

    @property
    def uses_sequential_kl(self) -> bool:
        return self.loss_type in ("tdpo1", "tdpo2") or (self.loss_type == "ti_dpo" and self.kl_alpha > 0)

    @property
    def uses_triplet(self) -> bool:
        return self.loss_type == "ti_dpo" and self.gamma > 0

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"

    @property
    def effective_importance_mode(self) -> str:
        """The weighting actually used: baselines always weight tokens uniformly."""
        return self.importance_mode if self.loss_type == "ti_dpo" else "uniform"

    @property
    def uses_attribution(self) -> bool:
        return self.effective_importance_mode in ("hybrid", "gradient", "softmax")


# TRL DPOConfig options a TRL user may pass, which tidpo has under another name or not at all: named in
# the error instead of Python's bare "unexpected keyword argument".
TRL_OPTIONS = {
    "precompute_ref_log_probs": "tidpo's name is precompute_ref_logps",
    "max_completion_length": "max_length bounds prompt + response, max_prompt_length the prompt",
    "truncation_mode": "prompts are truncated from the left (a leading BOS kept), responses from the right",
    "ref_model_init_kwargs": "model_init_kwargs apply to the reference too",
    "ref_adapter_name": "a PeftModel's adapter named 'ref' is the reference (README, 'Use it from Python')",
    "model_adapter_name": "the PeftModel's active adapter is trained",
    "sync_ref_model": "not supported: the reference stays frozen",
    "loss_weights": "not supported: one loss_type per run",
    "rpo_alpha": "not supported",
    "padding_free": "not supported",
    "use_logits_to_keep": "not needed: only response positions enter the log-prob kernels",
    "dataset_num_proc": "not supported: tokenising runs in one process",
    "generate_during_eval": "not supported: `tidpo eval` generates and scores",
    # TRL's script arguments (`trl dpo`), which `tidpo train` names after what they are
    "model_name_or_path": "tidpo train names it model",
    "ref_model_name_or_path": "tidpo train names it ref_model",
    "dataset_name": "tidpo train names it train_data (a file, a Hub id or quickstart)",
    "dataset_train_split": "tidpo train names it train_split",
    "dataset_test_split": "tidpo train names it eval_split (with eval_data)",
    "lora_task_type": "tidpo always trains CAUSAL_LM adapters",
}


def unknown_option_hint(key: str, known: Iterable[str], prefix: str = "") -> str:
    """What to use instead of the unknown option ``key``, as `` (...)`` (empty when nothing is close):
    tidpo's name for a TRL option, or the closest known option; ``prefix`` (``--`` for command-line
    flags) is matched and shown with the names."""
    close = difflib.get_close_matches(prefix + key, [prefix + k for k in known], n=1)
    why = TRL_OPTIONS.get(key) or (f"did you mean {close[0]!r}?" if close else "")
    return f" ({why})" if why else ""


def _refuse_unknown_options(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        known = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = [f"{k!r}{unknown_option_hint(k, known)}" for k in kwargs if k not in known]
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {', '.join(unknown)}. Options are the fields of "
                "TIDPOConfig and transformers.TrainingArguments (help(tidpo.TIDPOConfig))."
            )
        init(self, *args, **kwargs)

    return __init__


TIDPOConfig.__init__ = _refuse_unknown_options(TIDPOConfig.__init__)
