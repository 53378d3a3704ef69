"""TIDPOTrainer against a deliberately naive reference ("oracle") written from the spec alone.

The oracle (the method's spec, sections 1-6, at its defaults) does everything one row at a time:
plain forward passes over the unpadded ``prompt + response`` row, log-probs by ``log_softmax`` +
``gather``, the attribution as its own pass from a leaf embedding, Eq. 7-8 weights, the weighted
DPO / sequential-KL / triplet losses and the baselines. It was written without reading tidpo's loss code, and it catches
misreadings the fast paths could share with their own tests (L2 instead of L1 norm, a target at the
prompt's end, no x n rescaling, sigma = n/2, weights one position off, the KL reversed, IPO on sums, ...
each changes the loss or the gradients by 1e-3 to 8x). Loss, every parameter gradient and the logged
metrics must agree to float32 rounding, on the trainer's own anchors. A second test does the same for
whole optimizer steps of ``train()`` (gradient accumulation, with a step's anchors sampled in one decode
loop; a smaller last batch) and for ``evaluate()``, over the same pairs batch by batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback

from conftest import PAIRS
from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.models import tiny_causal_lm, tiny_tokenizer
from tidpo.training.trainer import window_metrics
from tiny_setup import perturb


@dataclass
class OracleConfig:
    loss_type: str = "ti_dpo"  # ti_dpo | dpo | ipo | simpo | tdpo1 | tdpo2
    beta: float = 0.1
    alpha: float = 0.5  # sequential-KL weight (spec section 4); tdpo1 uses 1 without stop-gradient
    gamma: float = 0.1  # triplet weight (Eq. 14)
    margin: float = 0.1  # triplet margin (spec section 5 decision)
    lam: float = 0.7  # lambda of Eq. 8
    sigma_div: float = 4.0  # Eq. 7
    mode: str = "hybrid"  # hybrid | prior | gradient | uniform | softmax | dataset
    span: str = "response"  # response | sequence
    label_smoothing: float = 0.0  # cDPO (dpo, simpo)
    simpo_gamma: float = 0.5  # SimPO target reward margin
    ipo_average: bool = True  # IPO on length-averaged log-ratios (TRL) if True, else on sums (IPO paper)
    eos_ids: tuple = ()  # stop ids that end an anchor (the EOS is part of the anchor)
    # mode "dataset": the data's weights, by row (prompt + response token ids), one per response token
    given: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    ids: torch.Tensor  # [L] prompt + response, no padding
    prompt_len: int  # response = ids[prompt_len:]


def rows_from_batch(batch: dict) -> list[Row]:
    """Unpadded rows of a collated batch (chosen rows first, then rejected)."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        valid = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][valid]
        comp = batch["completion_mask"][i][valid].bool()
        prompt_len = int(torch.nonzero(comp)[0])
        assert comp[prompt_len:].all() and not comp[:prompt_len].any(), "response must end the row"
        rows.append(Row(ids=ids, prompt_len=prompt_len))
    return rows


# ----------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------


def response_logits(model, row: Row) -> torch.Tensor:
    """Float32 logits at the positions that predict each response token: [T, V]."""
    logits = model(input_ids=row.ids[None]).logits[0].float()
    return logits[row.prompt_len - 1 : -1]


def token_logps(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for the response tokens: [T]."""
    targets = row.ids[row.prompt_len :]
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def seq_kl(ref_logits: torch.Tensor, pol_logits: torch.Tensor) -> torch.Tensor:
    """sum_t KL(pi_ref(.|x,y_<t) || pi_theta(.|x,y_<t)) over the response positions (spec section 4)."""
    ref_lp = torch.log_softmax(ref_logits, -1)
    pol_lp = torch.log_softmax(pol_logits, -1)
    return (ref_lp.exp() * (ref_lp - pol_lp)).sum()


def attribution(model, row: Row) -> torch.Tensor:
    """Raw importance of every position of the row (Eq. 5-6): I_i = sum_k |d max_v logits[last, v] / d e_i[k]|."""
    emb = model.get_input_embeddings()(row.ids[None]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits[0]
    target = logits[-1].max()
    (grad,) = torch.autograd.grad(target, emb)
    return grad[0].abs().sum(-1).float().detach()  # [L]


# ----------------------------------------------------------------------------------------------
# Weights (Eq. 7-8)
# ----------------------------------------------------------------------------------------------


def gaussian_prior(n: int, sigma_div: float) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64)
    mu = (n - 1) / 2
    sigma = max(1.0, n / sigma_div)
    p = torch.exp(-0.5 * ((t - mu) / sigma) ** 2)
    return p / p.sum()


def span_weights(raw: torch.Tensor, cfg: OracleConfig) -> torch.Tensor:
    """Weights over a span of n positions, mean 1 (sum n)."""
    n = raw.numel()
    if n == 0:
        return raw.new_zeros(0)
    raw = raw.double()
    if cfg.mode == "uniform":
        return torch.ones(n, dtype=torch.float32)
    if cfg.mode == "softmax":
        return (torch.softmax(raw, 0) * n).float()
    lam = {"hybrid": cfg.lam, "prior": 0.0, "gradient": 1.0}[cfg.mode]
    prior = gaussian_prior(n, cfg.sigma_div)
    total = raw.sum()
    i_norm = raw / total if total > 0 else prior  # sum 0: the prior alone
    w = lam * i_norm + (1 - lam) * prior
    w = w / w.sum() * n
    return w.float()


def row_weights(model, row: Row, cfg: OracleConfig) -> torch.Tensor:
    """The weight of every response token (weight of y_t = importance of y_t's own input embedding)."""
    T = row.ids.numel() - row.prompt_len
    if cfg.mode == "uniform":
        return torch.ones(T)
    if cfg.mode == "dataset":  # used as given (README glossary: "`dataset` weights are used as given")
        given = torch.tensor(cfg.given[tuple(row.ids.tolist())], dtype=torch.float32)
        assert given.numel() == T
        return given
    raw = attribution(model, row)
    if cfg.span == "response":
        return span_weights(raw[row.prompt_len :], cfg)
    return span_weights(raw, cfg)[row.prompt_len :]  # "sequence": normalised over prompt + response


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


@dataclass
class Terms:
    """One batch's per-pair loss terms (with the graph to the policy's parameters) and raw statistics."""

    base: torch.Tensor  # [B] L_base of each pair
    triplet: torch.Tensor | None  # [B] the triplet hinge of each pair (Eq. 13), None without the triplet
    per_pair: dict[str, list[float]]  # metric -> one value per pair
    logits: dict[str, list[tuple[float, int]]]  # logits/chosen|rejected -> per response (sum, count)
    weights: list[torch.Tensor]  # every response's token weights


def oracle_terms(
    policy, ref, batch: dict, cfg: OracleConfig, anchors: list[torch.Tensor] | None = None
) -> Terms:
    """The loss terms of one batch, pair by pair.

    ``anchors``: per pair, the sampled response token ids (already cut after the first EOS)."""
    rows = rows_from_batch(batch)
    B = len(rows) // 2
    chosen = rows[:B]
    m: dict[str, list[float]] = {}

    def log(key, value):
        m.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))

    # per-row quantities
    lr, lp, kl, wts, logit_stats = [], [], [], [], []
    for row in rows:
        pol_logits = response_logits(policy, row)
        lp_pol = token_logps(pol_logits, row)
        if ref is not None:
            with torch.no_grad():
                ref_logits = response_logits(ref, row)
            lp_ref = token_logps(ref_logits, row)
            lr.append(lp_pol - lp_ref)
            kl.append(seq_kl(ref_logits, pol_logits))
        else:
            lr.append(None)
            kl.append(None)
        lp.append(lp_pol)
        logit_stats.append((float(pol_logits.detach().sum()), pol_logits.numel()))
        if cfg.loss_type == "ti_dpo":
            with torch.enable_grad():
                wts.append(row_weights(policy, row, cfg).detach())
        else:
            wts.append(torch.ones(row.ids.numel() - row.prompt_len))

    losses, triplets = [], []
    for i in range(B):
        c, r = i, B + i
        Tc, Tr = lp[c].numel(), lp[r].numel()
        if cfg.loss_type == "simpo":
            u = cfg.beta * (lp[c].sum() / Tc - lp[r].sum() / Tr) - cfg.simpo_gamma
            eps = cfg.label_smoothing
            loss = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
            rc, rr = cfg.beta * lp[c].sum() / Tc, cfg.beta * lp[r].sum() / Tr
        else:
            sc = (wts[c] * lr[c]).sum()
            sr = (wts[r] * lr[r]).sum()
            delta = sc - sr
            if cfg.loss_type == "ipo":
                h = lr[c].sum() / Tc - lr[r].sum() / Tr if cfg.ipo_average else delta
                loss = (h - 1 / (2 * cfg.beta)) ** 2
            elif cfg.loss_type == "dpo":
                eps = cfg.label_smoothing
                loss = -(1 - eps) * F.logsigmoid(cfg.beta * delta) - eps * F.logsigmoid(-cfg.beta * delta)
            elif cfg.loss_type == "tdpo1":
                loss = -F.logsigmoid(cfg.beta * (delta - (kl[r] - kl[c])))
            elif cfg.loss_type in ("tdpo2", "ti_dpo"):
                if cfg.alpha > 0:
                    z = delta - cfg.alpha * (kl[r] - kl[c].detach())
                else:
                    z = delta
                loss = -F.logsigmoid(cfg.beta * z)
            else:
                raise ValueError(cfg.loss_type)
            rc, rr = cfg.beta * sc, cfg.beta * sr
        losses.append(loss)
        log("rewards/chosen", rc)
        log("rewards/rejected", rr)
        log("rewards/accuracies", float(rc > rr))
        log("rewards/margins", rc - rr)
        log("logps/chosen", lp[c].sum())
        log("logps/rejected", lp[r].sum())
        # Logged where the loss has a KL term (README glossary: when its weight is above 0).
        if kl[c] is not None and (
            cfg.loss_type in ("tdpo1", "tdpo2") or (cfg.alpha > 0 and cfg.loss_type == "ti_dpo")
        ):
            log("kl/chosen", kl[c])
            log("kl/rejected", kl[r])

        # triplet (Eq. 13)
        if cfg.loss_type == "ti_dpo" and cfg.gamma > 0:
            a_ids = anchors[i]
            a_row = Row(
                ids=torch.cat([chosen[i].ids[: chosen[i].prompt_len], a_ids]), prompt_len=chosen[i].prompt_len
            )
            pol_logits = response_logits(policy, a_row)
            with torch.no_grad():
                ref_logits = response_logits(ref, a_row)
            d = token_logps(pol_logits, a_row) - token_logps(ref_logits, a_row)
            b, cc = lr[c], lr[r]
            npos, nneg = min(d.numel(), b.numel()), min(d.numel(), cc.numel())
            dist_pos = ((d[:npos] - b[:npos]) ** 2).sum()
            dist_neg = ((d[:nneg] - cc[:nneg]) ** 2).sum()
            trip = torch.clamp(dist_pos - dist_neg + cfg.margin, min=0)
            triplets.append(trip)
            log("triplet/loss", trip)
            log("triplet/dist_pos", dist_pos)
            log("triplet/dist_neg", dist_neg)
            # tokens that can enter Eq. 13: at most the longer of the pair's two responses (glossary)
            log("anchor/length", min(a_ids.numel(), max(Tc, Tr)))

    return Terms(
        base=torch.stack(losses),
        triplet=torch.stack(triplets) if triplets else None,
        per_pair=m,
        logits={"logits/chosen": logit_stats[:B], "logits/rejected": logit_stats[B:]},
        weights=wts,
    )


def objective(terms: list[Terms], cfg: OracleConfig) -> torch.Tensor:
    """Eq. 14 over the pairs of these batches together: mean L_base + gamma * mean L_triplet, each mean over
    every pair (as one batch of them all)."""
    total = torch.cat([t.base for t in terms]).mean()
    if terms[0].triplet is not None:
        total = total + cfg.gamma * torch.cat([t.triplet for t in terms]).mean()
    return total


def oracle_metrics(terms: list[Terms], cfg: OracleConfig) -> dict[str, float]:
    """The metrics over these batches together (README glossary: means over their pairs, or tokens)."""
    out = {}
    for key in terms[0].per_pair:
        values = [v for t in terms for v in t.per_pair[key]]
        out[key] = sum(values) / len(values)
    for key in terms[0].logits:
        stats = [s for t in terms for s in t.logits[key]]
        out[key] = sum(s for s, _ in stats) / sum(n for _, n in stats)
    if cfg.loss_type == "ti_dpo":
        wts = [w for t in terms for w in t.weights]
        allw = torch.cat(wts)
        out["weights/mean"] = allw.mean().item()
        out["weights/std"] = allw.std().item()  # unbiased; population std reported as weights/std_pop
        out["weights/std_pop"] = allw.std(unbiased=False).item()
        out["weights/max"] = allw.max().item()
        ents = []
        for w in wts:
            p = w / w.sum()
            ents.append(-(p * torch.log(p.clamp_min(1e-30))).sum().item())
        out["weights/entropy"] = sum(ents) / len(ents)
    return out


def oracle_loss(policy, ref, batch: dict, cfg: OracleConfig, anchors: list[torch.Tensor] | None = None):
    """Loss (a tensor with the graph to the policy's parameters) and the metrics of one batch."""
    terms = oracle_terms(policy, ref, batch, cfg, anchors)
    total = objective([terms], cfg)
    return total, {**oracle_metrics([terms], cfg), "loss": total.item()}


# ------------------------------------------------------------------------------------------ cases

SHORT_PAIRS = [  # two-token responses (one token + the EOS the tokenizer appends) and a long one
    {"prompt": "The sky is", "chosen": ".", "rejected": " green."},
    {"prompt": "The grass is", "chosen": " green.", "rejected": "!"},
    {
        "prompt": "A cat sat on",
        "chosen": " the mat and then it sat on the dog in the park.",
        "rejected": " no.",
    },
    {"prompt": "It was", "chosen": " wonderful acting.", "rejected": " terrible music."},
]

NO_TRIPLET = {"gamma": 0.0, "tdpo_alpha": 0.0}
# name: (trainer options, oracle options, setup); the oracle's defaults are the spec's (full TI-DPO).
CASES = {
    "no_triplet_no_kl": (NO_TRIPLET, {"gamma": 0.0, "alpha": 0.0}, {}),
    "no_triplet": ({"gamma": 0.0}, {"gamma": 0.0}, {}),
    "full": ({}, {}, {}),
    "full_64_token_anchors": ({"anchor_max_new_tokens": 64}, {}, {}),
    "full_whole_rows": ({"share_prompt": False, "anchor_prompt_cache": False}, {}, {}),
    "full_separate_attribution": ({"attribution_pass": "separate"}, {}, {}),
    "full_checkpointing": ({"gradient_checkpointing": True}, {}, {"checkpointing": True}),
    "full_gpt2": ({}, {}, {"arch": "gpt2"}),
    "full_gpt2_whole_rows": ({"share_prompt": False, "anchor_prompt_cache": False}, {}, {"arch": "gpt2"}),
    "full_anchors_stop_early": ({}, {}, {"eos_bias": 0.5}),
    "full_short_and_long": ({}, {}, {"pairs": SHORT_PAIRS}),
    "full_other_hyper_parameters": (
        {"beta": 0.5, "tdpo_alpha": 0.3, "gamma": 0.7, "triplet_margin": 2.0},
        {"beta": 0.5, "alpha": 0.3, "gamma": 0.7, "margin": 2.0},
        {"seed": 3, "scale": 0.15},
    ),
    "prior": ({**NO_TRIPLET, "importance_mode": "prior"}, {"mode": "prior", "gamma": 0.0, "alpha": 0.0}, {}),
    "gradient": (
        {**NO_TRIPLET, "importance_mode": "gradient"},
        {"mode": "gradient", "gamma": 0.0, "alpha": 0.0},
        {},
    ),
    "softmax": (
        {**NO_TRIPLET, "importance_mode": "softmax"},
        {"mode": "softmax", "gamma": 0.0, "alpha": 0.0},
        {},
    ),
    "lambda_sigma": (
        {**NO_TRIPLET, "lambda_importance": 0.3, "sigma_div": 2.0},
        {"lam": 0.3, "sigma_div": 2.0, "gamma": 0.0, "alpha": 0.0},
        {},
    ),
    "dataset_weights": (
        {**NO_TRIPLET, "importance_mode": "dataset"},
        {"mode": "dataset", "gamma": 0.0, "alpha": 0.0},
        {"weights": True},
    ),
    "dataset_weights_full": ({"importance_mode": "dataset"}, {"mode": "dataset"}, {"weights": True}),
    "dataset_weights_whole_rows": (
        {"importance_mode": "dataset", "share_prompt": False, "anchor_prompt_cache": False},
        {"mode": "dataset"},
        {"weights": True},
    ),
    "span_sequence": ({"importance_span": "sequence"}, {"span": "sequence"}, {}),
    "span_sequence_short": ({"importance_span": "sequence"}, {"span": "sequence"}, {"pairs": SHORT_PAIRS}),
    "dpo": ({"loss_type": "dpo"}, {"loss_type": "dpo"}, {}),
    "cdpo": ({"loss_type": "dpo", "label_smoothing": 0.1}, {"loss_type": "dpo", "label_smoothing": 0.1}, {}),
    "dpo_precomputed_reference": (
        {"loss_type": "dpo", "precompute_ref_logps": True},
        {"loss_type": "dpo"},
        {},
    ),
    "ipo": ({"loss_type": "ipo"}, {"loss_type": "ipo"}, {}),
    "tdpo1": ({"loss_type": "tdpo1"}, {"loss_type": "tdpo1"}, {}),
    "tdpo2": ({"loss_type": "tdpo2"}, {"loss_type": "tdpo2"}, {"pairs": SHORT_PAIRS}),
    "simpo": (
        {"loss_type": "simpo", "label_smoothing": 0.2, "simpo_gamma": 0.3, "beta": 2.0},
        {"loss_type": "simpo", "label_smoothing": 0.2, "simpo_gamma": 0.3, "beta": 2.0},
        {},
    ),
}


def with_weights(dataset: Dataset, tok, args: TIDPOConfig) -> tuple[Dataset, dict]:
    """The tokenised dataset with uneven per-token weights (importance_mode="dataset"; some 0, none
    normalised), and the oracle's map from a row's token ids to its weights."""
    dataset = TIDPOTrainer.prepare_dataset(dataset, tok, args)
    gen = torch.Generator().manual_seed(5)
    given, columns = {}, {"chosen_weights": [], "rejected_weights": []}
    for row in dataset:
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_input_ids"])
            weights = (3 * torch.rand(n, generator=gen)).tolist()
            weights[n // 2] = 0.0
            columns[f"{side}_weights"].append(weights)
            given[tuple(row["prompt_input_ids"] + row[f"{side}_input_ids"])] = weights
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset, given


def make_trainer(tmp_path, trainer_options: dict, oracle_options: dict, setup: dict, **extra):
    """The trainer (its policy perturbed away from the reference), the oracle's reference and config."""
    tok = tiny_tokenizer()
    base = tiny_causal_lm(setup.get("arch", "llama"), tokenizer=tok)
    if setup.get("eos_bias"):  # the policy (and reference) stop some anchors early
        embeddings = base.get_input_embeddings().weight.mean(0)
        with torch.no_grad():
            base.get_output_embeddings().weight[tok.eos_token_id] += (
                setup["eos_bias"] * embeddings / (embeddings.norm() ** 2 + 1e-12)
            )
    ref = copy.deepcopy(base).eval().requires_grad_(False)  # the oracle's reference: the start
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, max_length=64, max_prompt_length=32, disable_tqdm=True,
    )  # fmt: skip
    options.update(extra)
    options.update(trainer_options)
    if options.get("loss_type", "ti_dpo") == "ti_dpo" and options.get("gamma", 0.1) > 0:
        options.setdefault("anchor_max_new_tokens", 8)
    args = TIDPOConfig(**options)
    cfg = OracleConfig(**oracle_options)
    data = {"train_dataset": Dataset.from_list(setup.get("pairs", PAIRS))}
    if setup.get("evaluate"):
        data["eval_dataset"] = Dataset.from_list(setup.get("eval_pairs", PAIRS))
    if setup.get("weights"):
        for key, dataset in data.items():
            data[key], given = with_weights(dataset, tok, args)
            cfg.given.update(given)
    trainer = TIDPOTrainer(base, args=args, processing_class=tok, **data)
    perturb(trainer.model, setup.get("seed", 1), setup.get("scale", 0.1))  # log-ratios away from 0
    if setup.get("checkpointing"):
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stop = trainer.model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [] if stop is None else [stop]
    cfg.eos_ids = tuple(sorted({tok.eos_token_id, *stop}))
    return trainer, ref, cfg


def batch_anchors(batch: dict, loop: tuple, offset: int, cfg: OracleConfig) -> list[torch.Tensor]:
    """The anchors of a batch's pairs: rows ``offset..`` of a decode loop ``(prompt_ids, prompt_mask, ids)``,
    each up to its first stop token."""
    prompt_ids, prompt_mask, ids = loop
    rows = rows_from_batch(batch)
    anchors = []
    for i in range(len(rows) // 2):
        # The decode loop continued this pair's prompt; an anchor ends with its first stop token.
        j = offset + i
        assert torch.equal(prompt_ids[j][prompt_mask[j].bool()], rows[i].ids[: rows[i].prompt_len])
        tokens = ids[j].tolist()
        end = next((k + 1 for k, t in enumerate(tokens) if t in cfg.eos_ids), len(tokens))
        anchors.append(torch.tensor(tokens[:end], dtype=torch.long))
    return anchors


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(grads: dict, oracle_grads: dict) -> None:
    assert grads.keys() == oracle_grads.keys()
    diff = sum(((grads[n] - oracle_grads[n]) ** 2).sum().item() for n in grads)
    norm = sum((oracle_grads[n] ** 2).sum().item() for n in grads)
    assert math.sqrt(diff / norm) < 1e-5, math.sqrt(diff / norm)
    assert norm > 0


def assert_same_metrics(metrics: dict, oracle_metrics: dict, prefix: str = "") -> None:
    """Every metric the oracle has (but the population std) is logged, with its value."""
    expected = {prefix + k: v for k, v in oracle_metrics.items() if "/" in k and k != "weights/std_pop"}
    assert expected.keys() <= metrics.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_equals_the_spec_oracle(tmp_path, name):
    trainer_options, oracle_options, setup = CASES[name]
    trainer, ref, cfg = make_trainer(tmp_path, trainer_options, oracle_options, setup)
    sampled = []
    sample = trainer._sample_anchors

    def record(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs):
        ids = sample(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs)
        sampled.append((prompt_ids.clone(), prompt_mask.clone(), ids.clone()))
        return ids

    trainer._sample_anchors = record
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = grads_of(model)
    metrics = window_metrics({k: v[-1:] for k, v in trainer._metrics["train"].items()})

    anchors = None
    if cfg.loss_type == "ti_dpo" and cfg.gamma > 0:
        assert len(sampled) == 1, f"{len(sampled)} decode loops"
        anchors = batch_anchors(batch, sampled[0], 0, cfg)
    else:
        assert not sampled
    model.zero_grad()
    oracle, oracle_metrics = oracle_loss(model, ref, batch, cfg, anchors)
    oracle.backward()

    assert loss.item() == pytest.approx(oracle.item(), rel=1e-5, abs=1e-6)
    assert_same_grads(grads, grads_of(model))
    assert_same_metrics(metrics, oracle_metrics)


# ------------------------------------------------------------------- whole optimizer steps, evaluation

# name: (trainer options, oracle options, setup). setup: "steps", optimizer steps run by `train()` (each
# checked: its accumulated gradient, before the optimizer, and its logged loss and metrics); "loops", the
# anchor decode loops each step runs (triplet cases); "evaluate": then `evaluate()` on the eval pairs
# (default: the 8 training pairs), checked batch by batch. 8 pairs: batches of 3 leave a last one of 2.
STEP_CASES = {
    "accumulation": ({"gradient_accumulation_steps": 2}, {}, {"loops": [1]}),
    "accumulation_4_micro_batches": (
        {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2},
        {},
        {"loops": [1]},
    ),
    "accumulation_sampling_apart": (
        {"gradient_accumulation_steps": 2, "anchor_sampling_rows": 0},
        {},
        {"loops": [2]},
    ),
    # 4 rows per loop of 2-pair micro-batches: step 1 samples micro-batches 1-2 together and 3 on its
    # own; step 2 (the epoch's 4th micro-batch) on its own.
    "accumulation_loop_groups": (
        {
            "gradient_accumulation_steps": 3,
            "per_device_train_batch_size": 2,
            "anchor_sampling_rows": 4,
            "max_steps": 2,
        },
        {},
        {"steps": 2, "loops": [2, 1]},
    ),
    "accumulation_whole_rows": (
        {"gradient_accumulation_steps": 2, "share_prompt": False, "anchor_prompt_cache": False},
        {},
        {"loops": [1]},
    ),
    "accumulation_checkpointing": (
        {"gradient_accumulation_steps": 2, "gradient_checkpointing": True},
        {},
        {"loops": [1]},
    ),
    "accumulation_gpt2": ({"gradient_accumulation_steps": 2}, {}, {"loops": [1], "arch": "gpt2"}),
    "accumulation_no_triplet": ({"gradient_accumulation_steps": 2, "gamma": 0.0}, {"gamma": 0.0}, {}),
    "accumulation_dataset_weights": (
        {"gradient_accumulation_steps": 2, "importance_mode": "dataset"},
        {"mode": "dataset"},
        {"loops": [1], "weights": True},
    ),
    "uneven_batches": (  # 3 + 3 + 2 pairs, one optimizer step each
        {"per_device_train_batch_size": 3, "max_steps": 3},
        {},
        {"steps": 3, "loops": [1, 1, 1]},
    ),
    "uneven_accumulation": (  # one optimizer step of 3 + 3 + 2 pairs
        {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3},
        {},
        {"loops": [1]},
    ),
    "uneven_accumulation_two_steps": (  # 3 + 3 pairs, then the epoch's last 2 alone
        {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "max_steps": 2},
        {},
        {"steps": 2, "loops": [1, 1]},
    ),
    "uneven_accumulation_dpo": (
        {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3, "loss_type": "dpo"},
        {"loss_type": "dpo"},
        {},
    ),
    "uneven_accumulation_tdpo2": (
        {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3, "loss_type": "tdpo2"},
        {"loss_type": "tdpo2"},
        {},
    ),
    "evaluate": ({}, {}, {"steps": 0, "evaluate": True}),
    "evaluate_no_triplet": ({"gamma": 0.0}, {"gamma": 0.0}, {"steps": 0, "evaluate": True}),
    "evaluate_uneven_batches": ({"per_device_eval_batch_size": 3}, {}, {"steps": 0, "evaluate": True}),
    "evaluate_uneven_batches_dpo": (
        {"per_device_eval_batch_size": 3, "loss_type": "dpo"},
        {"loss_type": "dpo"},
        {"steps": 0, "evaluate": True},
    ),
    "evaluate_dataset_weights": (
        {"importance_mode": "dataset"},
        {"mode": "dataset"},
        {"steps": 0, "evaluate": True, "weights": True},
    ),
    "accumulation_then_evaluate": (
        {"gradient_accumulation_steps": 2, "per_device_eval_batch_size": 4},
        {},
        {"loops": [1], "evaluate": True, "eval_pairs": SHORT_PAIRS},
    ),
}


@dataclass
class Call:
    """One `_compute_loss` call: the batch, the decode loops it ran itself, the mode."""

    batch: dict
    loops: list[tuple]
    training: bool


@dataclass
class Step:
    """One optimizer step as `train()` ran it: its `_compute_loss` calls, the policy's parameters and the
    accumulated gradients right before the optimizer, its decode loops (its own and its micro-batches')."""

    calls: list[Call]
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    loops: list[tuple]


class Recorder(TrainerCallback):
    """Records every decode loop, `_compute_loss` call and optimizer step of a trainer."""

    def __init__(self, trainer: TIDPOTrainer):
        self.trainer = trainer
        self.loops: list[tuple] = []
        self.calls: list[Call] = []
        self.steps: list[Step] = []
        self._seen = (0, 0)  # calls, loops up to the last step
        sample, compute = trainer._sample_anchors, trainer._compute_loss

        def record_loop(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs):
            ids = sample(model, prompt_ids, prompt_mask, max_new_tokens, **kwargs)
            self.loops.append((prompt_ids.clone(), prompt_mask.clone(), ids.clone()))
            return ids

        def record_call(model, inputs):
            before = len(self.loops)
            out = compute(model, inputs)
            self.calls.append(Call(dict(inputs), self.loops[before:], model.training))
            return out

        trainer._sample_anchors, trainer._compute_loss = record_loop, record_call
        trainer.add_callback(self)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.model
        calls, loops = self._seen
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.steps.append(Step(self.calls[calls:], params, grads_of(model), self.loops[loops:]))
        self._seen = (len(self.calls), len(self.loops))

    def anchors(self, call: Call, loops: list[tuple], cfg: OracleConfig) -> list[torch.Tensor]:
        """The anchors `call` used: from its own decode loop, or from the loop that sampled them with the
        other micro-batches of its step (`anchor_ids`, found among ``loops``)."""
        if "anchor_ids" not in call.batch:
            assert len(call.loops) == 1, f"{len(call.loops)} decode loops"
            return batch_anchors(call.batch, call.loops[0], 0, cfg)
        assert not call.loops
        given = call.batch["anchor_ids"]
        n = given.size(0)
        for loop in loops:
            ids = loop[2]
            for offset in range(ids.size(0) - n + 1):
                if torch.equal(ids[offset : offset + n, : given.size(1)], given):
                    return batch_anchors(call.batch, loop, offset, cfg)
        raise AssertionError("no decode loop sampled this micro-batch's anchors")


def oracle_over(model, ref, calls: list[Call], loops: list[tuple], recorder: Recorder, cfg: OracleConfig):
    """The oracle's objective over these batches together (graph to the parameters) and its metrics."""
    triplet = cfg.loss_type == "ti_dpo" and cfg.gamma > 0
    terms = [
        oracle_terms(model, ref, c.batch, cfg, recorder.anchors(c, loops, cfg) if triplet else None)
        for c in calls
    ]
    return objective(terms, cfg), oracle_metrics(terms, cfg)


def set_params(model, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_steps_and_evaluation_equal_the_spec_oracle(tmp_path, name):
    """`train()`'s optimizer steps (gradient accumulation, a smaller last batch) and `evaluate()` against
    the oracle over the same pairs: each step's objective is Eq. 14 over all of its pairs, as one batch of
    them (its micro-batches weigh by their pairs), and so is the eval loss over the eval set."""
    trainer_options, oracle_options, setup = STEP_CASES[name]
    steps = setup.get("steps", 1)
    trainer, ref, cfg = make_trainer(
        tmp_path, trainer_options, oracle_options, setup,
        max_steps=max(steps, 1), logging_steps=1, max_grad_norm=0.0, learning_rate=1e-3,
    )  # fmt: skip
    triplet = cfg.loss_type == "ti_dpo" and cfg.gamma > 0
    recorder = Recorder(trainer)
    model = trainer.model
    accumulate = trainer.args.gradient_accumulation_steps
    if steps:
        trainer.train()
        assert len(recorder.steps) == steps
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry]
    eval_metrics = {}
    if setup.get("evaluate"):
        eval_calls = len(recorder.calls)
        eval_loops = len(recorder.loops)
        eval_metrics = trainer.evaluate()
        eval_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    for k, step in enumerate(recorder.steps):
        assert all(call.training for call in step.calls)
        assert len(step.calls) <= accumulate
        if triplet:
            assert len(step.loops) == setup["loops"][k], f"step {k}: {len(step.loops)} decode loops"
        else:
            assert not step.loops
        set_params(model, step.params)
        model.zero_grad()
        oracle, oracle_metrics = oracle_over(model, ref, step.calls, step.loops, recorder, cfg)
        oracle.backward()
        assert_same_grads(step.grads, grads_of(model))
        assert logs[k]["loss"] == pytest.approx(oracle.item(), rel=1e-5, abs=1e-6), f"step {k}"
        assert_same_metrics(logs[k], oracle_metrics)

    if setup.get("evaluate"):
        calls = recorder.calls[eval_calls:]
        assert calls and not any(call.training for call in calls)
        if triplet:  # each eval batch samples its own anchors from the current policy
            assert len(recorder.loops) - eval_loops == len(calls)
        set_params(model, eval_params)
        model.zero_grad()
        with torch.no_grad():
            oracle, oracle_metrics = oracle_over(model, ref, calls, [], recorder, cfg)
        assert eval_metrics["eval_loss"] == pytest.approx(oracle.item(), rel=1e-5, abs=1e-6)
        assert_same_metrics(eval_metrics, oracle_metrics, prefix="eval_")
