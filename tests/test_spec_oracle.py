"""TIDPOTrainer against a deliberately naive reference ("oracle") written from the spec alone.

The oracle (the method's spec, sections 1-6, at its defaults) does everything one row at a time:
plain forward passes over the unpadded ``prompt + response`` row, log-probs by ``log_softmax`` +
``gather``, the attribution as its own pass from a leaf embedding, Eq. 7-8 weights, the weighted
DPO / sequential-KL / triplet losses and the baselines. It was written without reading tidpo's loss code, and it catches
misreadings the fast paths could share with their own tests (L2 instead of L1 norm, a target at the
prompt's end, no x n rescaling, sigma = n/2, weights one position off, the KL reversed, IPO on sums, ...
each changes the loss or the gradients by 1e-3 to 8x). Loss, every parameter gradient and the logged
metrics must agree to float32 rounding, on the trainer's own anchors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from conftest import PAIRS
from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.models import tiny_causal_lm, tiny_tokenizer
from tidpo.training.trainer import window_metrics


@dataclass
class OracleConfig:
    loss_type: str = "ti_dpo"  # ti_dpo | dpo | ipo | simpo | tdpo1 | tdpo2
    beta: float = 0.1
    alpha: float = 0.5  # sequential-KL weight (spec section 4); tdpo1 uses 1 without stop-gradient
    gamma: float = 0.1  # triplet weight (Eq. 14)
    margin: float = 0.1  # triplet margin (spec section 5 decision)
    lam: float = 0.7  # lambda of Eq. 8
    sigma_div: float = 4.0  # Eq. 7
    mode: str = "hybrid"  # hybrid | prior | gradient | uniform | softmax
    span: str = "response"  # response | sequence
    label_smoothing: float = 0.0  # cDPO (dpo, simpo)
    simpo_gamma: float = 0.5  # SimPO target reward margin
    ipo_average: bool = True  # IPO on length-averaged log-ratios (TRL) if True, else on sums (IPO paper)
    eos_ids: tuple = ()  # stop ids that end an anchor (the EOS is part of the anchor)


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
    raw = attribution(model, row)
    if cfg.span == "response":
        return span_weights(raw[row.prompt_len :], cfg)
    return span_weights(raw, cfg)[row.prompt_len :]  # "sequence": normalised over prompt + response


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def oracle_loss(policy, ref, batch: dict, cfg: OracleConfig, anchors: list[torch.Tensor] | None = None):
    """Loss (a tensor with the graph to the policy's parameters) and the metrics of one batch.

    ``anchors``: per pair, the sampled response token ids (already cut after the first EOS)."""
    rows = rows_from_batch(batch)
    B = len(rows) // 2
    chosen = rows[:B]
    m: dict[str, list[float]] = {}

    def log(key, value):
        m.setdefault(key, []).append(float(value))

    # per-row quantities
    lr, lp, kl, wts, n_logit_sum, n_logit_cnt = [], [], [], [], [], []
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
        n_logit_sum.append(pol_logits.detach().sum())
        n_logit_cnt.append(pol_logits.numel())
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

    total = torch.stack(losses).mean()
    if triplets:
        total = total + cfg.gamma * torch.stack(triplets).mean()

    out = {k: sum(v) / len(v) for k, v in m.items()}
    out["loss"] = total.item()
    out["logits/chosen"] = (sum(n_logit_sum[:B]) / sum(n_logit_cnt[:B])).item()
    out["logits/rejected"] = (sum(n_logit_sum[B:]) / sum(n_logit_cnt[B:])).item()
    if cfg.loss_type == "ti_dpo":
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
    return total, out, wts


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


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_equals_the_spec_oracle(tmp_path, name):
    trainer_options, oracle_options, setup = CASES[name]
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
    options.update(trainer_options)
    if options.get("loss_type", "ti_dpo") == "ti_dpo" and options.get("gamma", 0.1) > 0:
        options.setdefault("anchor_max_new_tokens", 8)
    trainer = TIDPOTrainer(
        base,
        args=TIDPOConfig(**options),
        train_dataset=Dataset.from_list(setup.get("pairs", PAIRS)),
        processing_class=tok,
    )
    perturb(trainer.model, setup.get("seed", 1), setup.get("scale", 0.1))  # log-ratios away from 0
    if setup.get("checkpointing"):
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = window_metrics({k: v[-1:] for k, v in trainer._metrics["train"].items()})

    cfg = OracleConfig(**oracle_options)
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [] if stop is None else [stop]
    cfg.eos_ids = tuple(sorted({tok.eos_token_id, *stop}))
    anchors = None
    if cfg.loss_type == "ti_dpo" and cfg.gamma > 0:
        assert len(sampled) == 1, f"{len(sampled)} decode loops"
        prompt_ids, prompt_mask, ids = sampled[0]
        rows = rows_from_batch(batch)
        anchors = []
        for i in range(len(rows) // 2):
            # The decode loop continued this pair's prompt; an anchor ends with its first stop token.
            assert torch.equal(prompt_ids[i][prompt_mask[i].bool()], rows[i].ids[: rows[i].prompt_len])
            tokens = ids[i].tolist()
            end = next((j + 1 for j, t in enumerate(tokens) if t in cfg.eos_ids), len(tokens))
            anchors.append(torch.tensor(tokens[:end], dtype=torch.long))
    else:
        assert not sampled
    model.zero_grad()
    oracle, oracle_metrics, _ = oracle_loss(model, ref, batch, cfg, anchors)
    oracle.backward()
    oracle_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert loss.item() == pytest.approx(oracle.item(), rel=1e-5, abs=1e-6)
    assert grads.keys() == oracle_grads.keys()
    diff = sum(((grads[n] - oracle_grads[n]) ** 2).sum().item() for n in grads)
    norm = sum((oracle_grads[n] ** 2).sum().item() for n in grads)
    assert math.sqrt(diff / norm) < 1e-5, math.sqrt(diff / norm)
    assert norm > 0
    shared = set(metrics) & set(oracle_metrics)
    assert {k for k in oracle_metrics if "/" in k and k != "weights/std_pop"} <= shared
    for key in shared:
        assert metrics[key] == pytest.approx(oracle_metrics[key], rel=1e-4, abs=1e-6), key
