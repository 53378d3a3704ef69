"""The CUDA-only paths, checked where a GPU is (skipped elsewhere, so in CI):

    python -m pytest tests/test_cuda.py          # on a machine with a CUDA GPU

What only runs on a GPU: the anchors' decode step compiled with CUDA graphs ("reduce-overhead") on the
kept static cache (also through PEFT's wrapper), the GPU's vocabulary blocks (1024 rows), sampling
on the device, and the fused attribution under CUDA autocast. Each is compared with the path the CPU tests already check.
``TIDPO_TEST_DEVICE=cpu`` runs the same comparisons on the CPU (a smoke run of this file).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.generation import anchor_cache, next_tokens, sample_completion_ids, sampling_distribution
from tidpo.models import tiny_causal_lm
from tiny_setup import CONFIGS, build, last_metrics, make_config, perturb, train_loss_and_grads

DEVICE = os.environ.get("TIDPO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_config(tmp_path, **overrides) -> TIDPOConfig:
    return make_config(tmp_path, use_cpu=DEVICE == "cpu", **overrides)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "llama-lora"])
def test_compiled_decode_gives_the_eager_ids(tiny_tok, arch):
    # The static cache's decode step replays CUDA graphs on a GPU; greedy and seeded sampling must give
    # the eager growing cache's ids, also on a second call into the same cache (its graphs replayed).
    if arch == "qwen3":
        model = build(CONFIGS[arch]())
    else:
        model = tiny_causal_lm(arch.split("-")[0], tokenizer=tiny_tok)
    perturb(model, seed=1)
    if arch.endswith("-lora"):  # the LoRA recipes decode through PEFT's wrapper
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        perturb(model, seed=2)
    model = model.to(DEVICE)
    cache = anchor_cache(model, max_cache_len=48)
    gen = torch.Generator().manual_seed(0)
    for prompt_len in (9, 14):
        ids = torch.randint(3, min(model.config.vocab_size, 90), (3, prompt_len), generator=gen).to(DEVICE)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding in one row
        eager = sample_completion_ids(model, ids, mask, max_new_tokens=20, do_sample=False)
        static = sample_completion_ids(
            model, ids, mask, max_new_tokens=20, do_sample=False, static_cache=cache
        )
        assert eager.shape[1] > 1 and torch.equal(static, eager), (static, eager)
        torch.manual_seed(7)
        eager = sample_completion_ids(model, ids, mask, max_new_tokens=20)
        torch.manual_seed(7)
        static = sample_completion_ids(model, ids, mask, max_new_tokens=20, static_cache=cache)
        assert torch.equal(static, eager), (static, eager)


def test_draws_on_the_device_follow_the_cpu_distribution():
    # The sampling kernels of the device (topk, the tie group's count, cumsum + searchsorted for its
    # member, multinomial) draw from the distribution computed on the CPU, tie group cut by top-p.
    logits = torch.full((1, 600), -3.0)
    logits[0, 7:10] = 2.5
    logits[0, 100:140] = 1.0
    logits[0, 400:440] = 1.0
    expected = sampling_distribution(logits, temperature=0.8, top_k=50, top_p=0.95)[0]
    assert 0 < int((expected[100:140] > 0).sum() + (expected[400:440] > 0).sum()) < 80  # a cut tie
    torch.manual_seed(0)
    rows = logits.to(DEVICE).expand(40_000, -1)
    draws = next_tokens(rows, do_sample=True, temperature=0.8, top_k=50, top_p=0.95).cpu()
    freq = torch.bincount(draws, minlength=600).float() / draws.numel()
    assert bool((freq[expected == 0] == 0).all()), "a filtered-out token was drawn"
    assert float((freq - expected).abs().max()) < 0.012  # standard error <= 0.0025 per token


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16_weights"])
def test_fused_and_separate_attribution_agree(tmp_path, tiny_tok, pairs_dataset, precision, checkpointing):
    """Full TI-DPO (KL + triplet): the fused attribution gives the separate pass's loss, importance
    weights and gradients on the GPU, in fp32, under bf16 autocast and with bf16 weights."""
    base = tiny_causal_lm("llama", tokenizer=tiny_tok)
    if precision == "bf16_weights":
        base = base.to(torch.bfloat16)
    results = {}
    for attribution_pass in ("fused", "separate"):
        args = gpu_config(
            tmp_path,
            attribution_pass=attribution_pass,
            bf16=precision != "fp32",
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            anchor_static_cache=False,  # the decode path is not what is compared here
        )
        trainer = TIDPOTrainer(
            copy.deepcopy(base), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        assert trainer.model.device.type == DEVICE
        perturb(trainer.model, seed=2)  # the policy moves away from its reference: the KL is live
        torch.manual_seed(3)  # the same anchors for both
        loss, grads = train_loss_and_grads(trainer)
        metrics = last_metrics(trainer)
        assert metrics["triplet/loss"] > 0 and metrics["kl/rejected"] > 0
        results[attribution_pass] = (loss, {n: g.float() for n, g in grads.items()}, metrics["weights/std"])
    (l_f, g_f, s_f), (l_s, g_s, s_s) = results["fused"], results["separate"]
    exact = precision == "fp32"
    assert math.isfinite(l_f) and l_f == pytest.approx(l_s, rel=1e-4 if exact else 2e-2)
    assert s_f > 0 and s_f == pytest.approx(s_s, rel=1e-3 if exact else 5e-2)
    assert g_f.keys() == g_s.keys()
    for name in g_f:
        diff = (g_f[name] - g_s[name]).norm()
        assert diff <= (1e-3 if exact else 5e-2) * g_s[name].norm() + 1e-6, (name, float(diff))


def test_shared_prompts_match_whole_rows(tmp_path, tiny_tok, pairs_dataset):
    # share_prompt forwards each prompt once (its KV cache reused by chosen, rejected and the anchors):
    # same loss and gradients as whole rows on the GPU.
    base = tiny_causal_lm("llama", tokenizer=tiny_tok)
    results = {}
    for share in (True, False):
        args = gpu_config(tmp_path, share_prompt=share, anchor_static_cache=False)
        trainer = TIDPOTrainer(
            copy.deepcopy(base), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        perturb(trainer.model, seed=4)
        torch.manual_seed(5)
        results[share] = train_loss_and_grads(trainer)
        assert last_metrics(trainer)["triplet/loss"] > 0
    (l_a, g_a), (l_b, g_b) = results[True], results[False]
    assert l_a == pytest.approx(l_b, rel=1e-4)
    for name in g_a:
        assert (g_a[name] - g_b[name]).norm() <= 1e-3 * g_b[name].norm() + 1e-6, name


def test_bf16_training_run_with_accumulation_saves_and_learns(tmp_path, tiny_tok, pairs_dataset):
    # The shipped recipes' precision (bf16 weights and autocast), anchors of accumulated micro-batches
    # decoded together through the compiled step, and a checkpoint on disk.
    model = tiny_causal_lm("llama", tokenizer=tiny_tok).to(torch.bfloat16)
    args = gpu_config(
        tmp_path,
        bf16=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    trainer = TIDPOTrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    perturb(trainer.model, seed=6)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for log in logs:
        for key in ("loss", "weights/std", "kl/chosen", "triplet/loss", "rewards/margins"):
            assert math.isfinite(log[key]), (key, log)
        assert log["weights/std"] > 0
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").exists()
