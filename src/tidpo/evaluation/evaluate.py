"""Evaluate a trained policy against its reference on held-out preference pairs.

``evaluate`` reports, under TRL's metric names plus ours:

- implicit DPO rewards on the pairs (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, and the policy's summed ``logps/chosen`` / ``logps/rejected``): the reward
  of a response is ``beta * sum_t (log pi(y_t) - log pi_ref(y_t))`` over its tokens (spec §1);
- generations from the policy and the reference for the pairs' prompts, sampled with the same seed,
  scored by a judge (``judge/mean``, ``judge/reference_mean``, ``judge/win_rate``);
- diversity of the policy's generations (paper Table B9): ``diversity/self_bleu`` (%),
  ``diversity/distinct_2``, ``diversity/distinct_4``, ``diversity/entropy`` (mean next-token entropy
  of the policy, in nats, over its own generated tokens);
- ``kl``: KL(policy || reference) estimated on the policy's samples: the mean over samples of the
  summed log-ratios of the generated tokens.

``run_eval`` is what ``tidpo eval`` calls. Everything runs without gradients, in eval mode.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tidpo.generation import eval_mode, model_device, seeded, stop_token_ids

__all__ = [
    "evaluate",
    "format_table",
    "mean_token_entropy",
    "run_eval",
    "sequence_logratios",
    "write_eval",
]

# Text/metadata columns handed to judges; the token-id columns of the prepared dataset are not.
_ID_COLUMNS = {
    "prompt_input_ids",
    "chosen_input_ids",
    "rejected_input_ids",
    "chosen_weights",
    "rejected_weights",
    "ref_chosen_logps",
    "ref_rejected_logps",
}


# --------------------------------------------------------------------------- tensor helpers


def mean_token_entropy(logits: Tensor, mask: Tensor, chunk_size: int = 1024) -> tuple[float, int]:
    """Sum and count of next-token entropies (nats) at the masked positions.

    Args:
        logits: ``[B, T, V]`` causal-LM logits of ``input_ids``.
        mask: ``[B, T]`` INPUT-aligned mask of the tokens whose predicting distribution counts: for a
            masked token at position ``t`` the entropy of ``softmax(logits[:, t - 1])`` is taken
            (the distribution the token was drawn from). Position 0 is never counted.
        chunk_size: rows of the vocabulary-sized float32 work done at once.

    Returns:
        ``(sum of entropies, number of positions)``, so callers can pool over batches; the mean is
        their ratio. ``H = logsumexp(l) - sum softmax(l) * l``, at temperature 1.
    """
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"mean_token_entropy: expected logits [B, T, V] and mask [B, T], got {tuple(logits.shape)} "
            f"and {tuple(mask.shape)}"
        )
    predicting = torch.zeros_like(mask, dtype=torch.bool)
    predicting[:, :-1] = mask[:, 1:].bool()
    rows = logits[predicting]  # [N, V]: only the positions that predict a counted token
    total = 0.0
    for start in range(0, rows.shape[0], chunk_size):
        block = rows[start : start + chunk_size].float()
        log_p = torch.log_softmax(block, dim=-1)
        total += float(-(log_p.exp() * log_p).sum())
    return total, int(rows.shape[0])


def _position_ids(attention_mask: Tensor) -> Tensor:
    # Left-padded rows must start at position 0, as generate() numbered them while sampling.
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    )
    return out.logits


def sequence_logratios(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row sums over ``mask`` of the policy log-probs, and of the policy-minus-reference log-ratios.

    Returns ``(policy_logps [B], logratio [B], policy_logits [B, T, V])``. ``reference=None`` means
    "the policy with its PEFT adapters disabled".
    """
    from tidpo.tokenops import token_logprobs

    logits = _logits(policy, input_ids, attention_mask)
    pol = token_logprobs(logits, input_ids, mask=mask)
    with _reference(policy, reference) as ref_model:
        ref_logits = _logits(ref_model, input_ids, attention_mask)
        ref = token_logprobs(ref_logits, input_ids, mask=mask)
    del ref_logits
    m = mask.to(pol.dtype)
    return (pol * m).sum(-1), ((pol - ref) * m).sum(-1), logits


@contextlib.contextmanager
def _reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    if reference is not None:
        yield reference
        return
    disable = getattr(policy, "disable_adapter", None)
    if disable is None:
        raise ValueError(
            "evaluate: no reference model given and the policy is not a PEFT model (whose reference would be "
            "the base model with adapters disabled); pass reference=..."
        )
    with disable():
        yield policy


def _generated_mask(new_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """1 for generated tokens up to and including the first EOS, 0 for the padding after it."""
    is_eos = torch.zeros_like(new_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new_ids == e
    # Tokens after the first EOS are padding (pad may equal EOS, so ids alone cannot tell).
    after = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0
    return (~after).long()


# --------------------------------------------------------------------------- evaluate


def _judged(
    judge_fn: Callable[..., float], judge: Any, texts: list[str], rows: list[Any], whose: str
) -> list[float]:
    """The judge's score of each generation; an error in the judge says which judge and prompt."""
    scores = []
    for i, (text, row) in enumerate(zip(texts, rows, strict=True)):
        try:
            scores.append(judge_fn(text, row))
        except Exception as err:
            err.add_note(
                f"tidpo: judge {judge!r} failed on the {whose}'s generation for prompt {i}: {text[:80]!r}"
            )
            raise
    return scores


def _rows_for_judge(dataset: Any) -> list[dict[str, Any]]:
    from tidpo.data import split_implicit_prompt

    columns = [c for c in dataset.column_names if c not in _ID_COLUMNS]
    rows = [
        dict(zip(columns, values, strict=True)) for values in zip(*(dataset[c] for c in columns), strict=True)
    ]
    for row in rows:
        if "prompt" not in row:
            # Implicit prompt: the prompt is the shared start of chosen and rejected.
            row["prompt"], row["chosen"], row["rejected"] = split_implicit_prompt(
                row["chosen"], row["rejected"]
            )
    return rows


def _sample(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    eos_ids: list[int],
    pad_id: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> list[Tensor]:
    from tidpo.generation import sample_completion_ids

    out = []
    with seeded(seed, model_device(model)):
        for batch in batches:
            out.append(
                sample_completion_ids(
                    model,
                    batch["prompt_input_ids"],
                    batch["prompt_attention_mask"],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                ).cpu()
            )
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


_DEFAULT_LENGTHS = {"max_length": 512, "max_prompt_length": 256}  # evaluate()'s, also named by tidpo eval
_DEFAULT_BETA = 0.1


def evaluate(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    data: Any,
    *,
    judge: str | Callable[..., float] | None = None,
    beta: float = _DEFAULT_BETA,
    max_new_tokens: int = 64,
    num_prompts: int | None = None,
    num_pairs: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    max_length: int | None = _DEFAULT_LENGTHS["max_length"],
    max_prompt_length: int | None = _DEFAULT_LENGTHS["max_prompt_length"],
    return_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``policy`` against ``reference`` on preference pairs.

    Args:
        policy, reference: causal LMs sharing ``tokenizer``. ``reference=None`` with a PEFT policy
            uses the policy with its adapters disabled (the LoRA reference).
        data: anything ``tidpo.data.prepare_preference_dataset`` takes (a file path, a Dataset, a
            list of row dicts); tokenised exactly as for training. Rows it already prepared pass as they
            are (``max_length`` / ``max_prompt_length`` then do not apply).
        judge: a judge name, ``"module:function"`` path or callable (see ``tidpo.judges``); without
            one the ``judge/*`` metrics are left out.
        beta: the DPO beta of the implicit reward.
        num_pairs: use only the first ``num_pairs`` pairs (default: all).
        num_prompts: generate for only the first ``num_prompts`` of those pairs' prompts (default: all).
            With one prompt there is no ``diversity/self_bleu`` (it compares generations with each other).
        batch_size: pairs per forward pass / prompts per ``generate`` call.
        seed: sampling seed, the same for the policy and the reference. The generations (so the
            ``judge/*``, ``diversity/*`` and ``kl`` metrics) depend on it and on ``batch_size`` (the
            random draws follow the batch layout); the ``rewards/*`` and ``logps/*`` do not.
        temperature, top_k, top_p, max_new_tokens: sampling settings (spec §5 defaults).
        max_length, max_prompt_length: truncation of the pairs, by the training rules (pass the
            training run's values to score the pairs as it saw them; ``run_eval`` reads them from the
            run folder).
        return_samples: also return ``"samples"``: per prompt, its text, both generations and scores.

    Returns:
        A flat dict of floats (plus ``"samples"`` when asked): ``rewards/*``, ``logps/*``, ``judge/*``,
        ``diversity/*``, ``kl``, ``num_pairs``, ``num_prompts``.
    """
    from tidpo.data import PreferenceCollator, prepare_preference_dataset
    from tidpo.judges import check_judge_rows, get_judge
    from tidpo.metrics import diversity
    from tidpo.models import ensure_pad_token

    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if not temperature > 0:
        raise ValueError(
            f"evaluate: temperature must be > 0 (the generations are sampled), got {temperature}"
        )
    if beta <= 0:
        raise ValueError(f"evaluate: beta must be > 0, got {beta}")
    judge_fn = get_judge(judge) if judge is not None else None  # fail on a bad name before any work
    ensure_pad_token(tokenizer)
    prepared = hasattr(data, "column_names") and "chosen_input_ids" in data.column_names
    dataset = (
        data
        if prepared
        else prepare_preference_dataset(
            data, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
        )
    )
    if num_pairs is not None:
        if num_pairs < 1:
            raise ValueError(f"evaluate: num_pairs must be >= 1, got {num_pairs}")
        dataset = dataset.select(range(min(num_pairs, len(dataset))))
    n_gen = len(dataset) if num_prompts is None else min(num_prompts, len(dataset))
    if n_gen < 1:
        raise ValueError(
            f"evaluate: num_prompts must be >= 1 (prompts to generate for), got {num_prompts} "
            f"(pairs: {len(dataset)})"
        )
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    device = model_device(policy)
    results: dict[str, Any] = {}

    with torch.no_grad(), eval_mode(policy, reference):
        # ---- implicit rewards on the pairs
        chosen_r: list[float] = []
        rejected_r: list[float] = []
        chosen_lp: list[float] = []
        rejected_lp: list[float] = []
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collate(list(rows))
            b = len(rows)
            logps, logratio, logits = sequence_logratios(
                policy,
                reference,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["completion_mask"].to(device),
            )
            del logits
            rewards = (beta * logratio).cpu().tolist()
            chosen_r += rewards[:b]
            rejected_r += rewards[b:]
            chosen_lp += logps[:b].cpu().tolist()
            rejected_lp += logps[b:].cpu().tolist()
        results["rewards/chosen"] = _mean(chosen_r)
        results["rewards/rejected"] = _mean(rejected_r)
        results["rewards/margins"] = _mean([c - r for c, r in zip(chosen_r, rejected_r, strict=True)])
        results["rewards/accuracies"] = _mean(
            [float(c > r) for c, r in zip(chosen_r, rejected_r, strict=True)]
        )
        results["logps/chosen"] = _mean(chosen_lp)
        results["logps/rejected"] = _mean(rejected_lp)

        # ---- generations: policy and reference from the same prompts and seed. The prompt ids are
        # the data layer's (as training sees them), and the exact sampled ids are kept for the KL.
        gen_rows = dataset.select(range(n_gen))
        judge_rows = _rows_for_judge(gen_rows)
        if judge_fn is not None:
            check_judge_rows(judge_fn, judge, judge_rows)  # before the generations it would score
        batches = [
            collate(list(gen_rows.select(range(s, min(s + batch_size, n_gen)))))
            for s in range(0, n_gen, batch_size)
        ]
        sampling = {
            "pad_id": tokenizer.pad_token_id,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
        }
        eos_ids = stop_token_ids(policy, tokenizer, what="evaluate")
        pol_ids = _sample(policy, batches, eos_ids=eos_ids, **sampling)
        with _reference(policy, reference) as ref_model:
            ref_eos = stop_token_ids(ref_model, tokenizer, what="evaluate")
            ref_ids = _sample(ref_model, batches, eos_ids=ref_eos, **sampling)

        # ---- KL(policy || reference) and entropy on the policy's own samples
        kl_per_sample: list[float] = []
        entropy_sum, entropy_count = 0.0, 0
        for batch, new_ids in zip(batches, pol_ids, strict=True):
            gen_mask = _generated_mask(new_ids, eos_ids)
            input_ids = torch.cat([batch["prompt_input_ids"], new_ids], dim=1).to(device)
            attention_mask = torch.cat([batch["prompt_attention_mask"], gen_mask], dim=1).to(device)
            mask = torch.cat([torch.zeros_like(batch["prompt_attention_mask"]), gen_mask], dim=1).to(device)
            _, logratio, logits = sequence_logratios(policy, reference, input_ids, attention_mask, mask)
            kl_per_sample += logratio.cpu().tolist()
            s, c = mean_token_entropy(logits, mask)
            entropy_sum, entropy_count = entropy_sum + s, entropy_count + c
            del logits

    decode = tokenizer.batch_decode
    pol_texts = [t for ids in pol_ids for t in decode(ids, skip_special_tokens=True)]
    ref_texts = [t for ids in ref_ids for t in decode(ids, skip_special_tokens=True)]

    if judge_fn is not None:
        pol_scores = _judged(judge_fn, judge, pol_texts, judge_rows, "policy")
        ref_scores = _judged(judge_fn, judge, ref_texts, judge_rows, "reference")
        for name, scores in (("policy", pol_scores), ("reference", ref_scores)):
            bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
            if bad:
                raise ValueError(
                    f"evaluate: the judge returned a non-finite score for the {name} on prompts {bad[:5]}"
                )
        results["judge/mean"] = _mean(pol_scores)
        results["judge/reference_mean"] = _mean(ref_scores)
        results["judge/win_rate"] = _mean(
            [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(pol_scores, ref_scores, strict=True)]
        )
    results.update(diversity(pol_texts))
    # No generated token at all is impossible (max_new_tokens >= 1), so the count is positive.
    results["diversity/entropy"] = entropy_sum / entropy_count
    results["kl"] = _mean(kl_per_sample)
    results["num_pairs"] = float(len(dataset))
    results["num_prompts"] = float(n_gen)

    if return_samples:
        results["samples"] = [
            {
                "prompt": row["prompt"],
                "policy": p,
                "reference": r,
                **({"policy_score": pol_scores[i], "reference_score": ref_scores[i]} if judge_fn else {}),
            }
            for i, (row, p, r) in enumerate(zip(judge_rows, pol_texts, ref_texts, strict=True))
        ]
    return results


# --------------------------------------------------------------------------- output

_GROUPS = (
    ("rewards/", "implicit rewards on held-out pairs"),
    ("logps/", "policy log-probs"),
    ("judge/", "judge (policy vs reference generations)"),
    ("diversity/", "diversity of policy generations"),
    ("kl", "KL(policy || reference) on policy samples"),
)
_NOTES = {
    "rewards/accuracies": "higher is better",
    "rewards/margins": "higher is better",
    "judge/mean": "higher is better",
    "judge/win_rate": "ties count 0.5",
    "diversity/self_bleu": "%, lower = more diverse",
    "diversity/distinct_2": "higher = more diverse",
    "diversity/distinct_4": "higher = more diverse",
    "diversity/entropy": "nats per token",
    "kl": "nats per sample",
}


def _format_value(key: str, value: float) -> str:
    if key.startswith("num_"):
        return f"{int(value)}"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def format_table(results: Mapping[str, Any]) -> str:
    """A readable plain-text table of the numeric metrics, grouped, with what "better" means."""
    numeric = {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not numeric:
        return "(no metrics)"
    width = max(len(k) for k in numeric) + 2
    lines: list[str] = []
    done: set[str] = set()
    for prefix, title in _GROUPS:
        keys = [k for k in numeric if k.startswith(prefix) and k not in done]
        if not keys:
            continue
        lines.append(f"{title}:")
        for k in keys:
            note = f"   ({_NOTES[k]})" if k in _NOTES else ""
            lines.append(f"  {k:<{width}}{_format_value(k, numeric[k]):>12}{note}")
            done.add(k)
    rest = [k for k in numeric if k not in done]
    if rest:
        lines.append("other:")
        lines += [f"  {k:<{width}}{_format_value(k, numeric[k]):>12}" for k in rest]
    return "\n".join(lines)


def write_eval(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/eval.json`` (the metrics) and, when present, ``out_dir/samples.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in results.items() if k != "samples"}
    path = out / "eval.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if "samples" in results:
        with (out / "samples.jsonl").open("w", encoding="utf-8") as fh:
            for sample in results["samples"]:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return path


def _training_settings(model: str) -> dict[str, Any]:
    """``max_length`` / ``max_prompt_length`` / ``beta`` of the ``tidpo train`` run that wrote ``model``
    (its ``run_config.json``; for a ``checkpoint-N`` folder, its run's), so ``tidpo eval`` truncates the
    pairs as that training did and its rewards are on the training's scale; {} otherwise."""
    path = Path(model) / "run_config.json"
    if not path.is_file() and re.fullmatch(r"checkpoint-\d+", Path(model).name):
        path = Path(model).parent / "run_config.json"  # written when the run ends
    if not path.is_file():
        return {}
    training = json.loads(path.read_text(encoding="utf-8")).get("training", {})
    return {k: training[k] for k in ("max_length", "max_prompt_length", "beta") if k in training}


def run_eval(
    model: str,
    reference: str,
    data: str,
    judge: str | None,
    out: str,
    *,
    dtype: str = "float32",
    print_table: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """What ``tidpo eval`` does: load both models (by path or built-in name) and the policy's
    tokenizer, ``evaluate`` on ``data``, print the table, write ``out/eval.json`` and
    ``out/samples.jsonl``. ``options`` go to :func:`evaluate` (``beta``, ``max_new_tokens``, ...);
    ``max_length`` / ``max_prompt_length`` / ``beta`` not given (or None) are those of the training run
    that wrote ``model`` (its ``run_config.json``), else :func:`evaluate`'s defaults."""
    from tidpo.data import prepare_preference_dataset
    from tidpo.judges import check_judge_rows, get_judge
    from tidpo.models import check_same_vocabulary, load_causal_lm, load_tokenizer

    trained = _training_settings(model)
    defaults = {**_DEFAULT_LENGTHS, "beta": _DEFAULT_BETA}
    defaulted = []
    for key in ("max_length", "max_prompt_length", "beta"):
        if options.get(key) is None:  # not given: the training run's, else evaluate's default
            options.pop(key, None)
            if key in trained:
                options[key] = trained[key]
            else:
                defaulted.append(f"--{key.replace('_', '-')} {defaults[key]}")  # tidpo eval's flags
    if defaulted and print_table and Path(model).is_dir():
        print(
            f"tidpo eval: no run_config.json of {model}'s training run found, so {', '.join(defaulted)} (the "
            "defaults) apply; give them to truncate the pairs and scale the rewards as the training did."
        )
    tokenizer = load_tokenizer(model)
    # The judge and the data first: a typo fails in seconds, not after two models have loaded.
    judge_fn = get_judge(judge) if judge is not None else None
    data = prepare_preference_dataset(
        data,
        tokenizer,
        max_length=options.get("max_length", _DEFAULT_LENGTHS["max_length"]),
        max_prompt_length=options.get("max_prompt_length", _DEFAULT_LENGTHS["max_prompt_length"]),
    )
    if judge_fn is not None:
        first = options.get("num_prompts") or len(data)
        check_judge_rows(judge_fn, judge, _rows_for_judge(data.select(range(min(first, len(data))))))
    policy = load_causal_lm(model, dtype=dtype)
    ref = load_causal_lm(reference, dtype=dtype)
    check_same_vocabulary(policy, ref, "reference")
    if torch.cuda.is_available():
        policy, ref = policy.to("cuda"), ref.to("cuda")
    results = evaluate(policy, ref, tokenizer, data, judge=judge, return_samples=True, **options)
    path = write_eval(results, out)
    if print_table:
        print(format_table(results))
        print(f"\nwrote {path} and {path.parent / 'samples.jsonl'}")
    return results
