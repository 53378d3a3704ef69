"""The fast paths of the trainer stay correct: fused attribution in bf16, and lean memory.

Speed itself is measured by ``benchmarks/speed.py`` (ratios side by side in one run), never timed here.
What is checked here is deterministic: losses, gradients and allocated bytes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tidpo import TIDPOConfig, TIDPOTrainer, tokenops
from tidpo.models import tiny_causal_lm
from tidpo.profiling import peak_tensor_bytes
from tidpo.tokenops import CPU_BLOCK_BYTES
from tiny_setup import last_metrics, perturb
from tiny_setup import make_config as tiny_config


def make_config(tmp_path, **overrides) -> TIDPOConfig:
    return tiny_config(tmp_path, **{"max_steps": 1, **overrides})


def first_batch(trainer: TIDPOTrainer) -> dict[str, torch.Tensor]:
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def saved_for_backward(fn) -> list[tuple[int, bool]]:
    """(numel, requires_grad) of every tensor that autograd saves for the backward while ``fn()`` runs."""
    seen: list[tuple[int, bool]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen.append((tensor.numel(), tensor.requires_grad))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return seen


def loss_and_grads(trainer: TIDPOTrainer, batch) -> tuple[float, dict[str, torch.Tensor], float]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads, last_metrics(trainer).get("weights/std", 0.0)  # baselines log none


@pytest.fixture
def bf16_llama(tiny_tok):
    return tiny_causal_lm("llama", tokenizer=tiny_tok).to(torch.bfloat16)


def test_bf16_model_trains_a_full_ti_dpo_step_with_fused_attribution(
    tmp_path, tiny_tok, bf16_llama, pairs_dataset
):
    # Defaults: KL (alpha 0.5) and triplet (gamma 0.1) on, fused attribution.
    args = make_config(tmp_path)
    assert args.attribution_pass == "fused" and args.uses_triplet and args.uses_sequential_kl
    trainer = TIDPOTrainer(bf16_llama, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    perturb(trainer.model, seed=4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for key in ("loss", "weights/std", "kl/chosen", "triplet/loss", "rewards/margins"):
        assert math.isfinite(log[key]), (key, log[key])
    assert log["weights/std"] > 0  # attribution produced non-uniform weights
    after = dict(trainer.model.named_parameters())
    assert all(after[n].dtype == torch.bfloat16 for n in after)
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "no parameter changed"


def test_bf16_fused_and_separate_attribution_agree(tmp_path, tiny_tok, bf16_llama, pairs_dataset):
    """Same loss, importance weights and gradients within bf16 tolerance (gamma = 0: no sampling)."""
    results = {}
    for attribution_pass in ("fused", "separate"):
        args = make_config(tmp_path, attribution_pass=attribution_pass, gamma=0.0)
        trainer = TIDPOTrainer(
            copy.deepcopy(bf16_llama), args=args, train_dataset=pairs_dataset, processing_class=tiny_tok
        )
        perturb(trainer.model, seed=5)
        results[attribution_pass] = loss_and_grads(trainer, first_batch(trainer))
    (l_f, g_f, s_f), (l_s, g_s, s_s) = results["fused"], results["separate"]
    assert math.isfinite(l_f) and l_f != pytest.approx(math.log(2), abs=1e-3)
    assert l_f == pytest.approx(l_s, rel=2e-2)
    assert s_f == pytest.approx(s_s, rel=5e-2)
    assert g_f.keys() == g_s.keys()
    for name in g_f:
        # bf16 keeps 8 mantissa bits; the two paths round differently, so compare against the scale of
        # the whole gradient tensor rather than element by element.
        diff = (g_f[name] - g_s[name]).norm()
        assert diff <= 5e-2 * g_s[name].norm() + 1e-6, (name, float(diff), float(g_s[name].norm()))


def _no_output_dtype_kept(monkeypatch) -> None:
    """Give back accelerate's float32 copy of every output (the behaviour before the trainer skipped it)."""
    import contextlib

    import tidpo.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "outputs_in_forward_dtype", lambda module: contextlib.nullcontext())


def _bf16_prepared(trainer: TIDPOTrainer) -> TIDPOTrainer:
    # What Trainer.train() does to the model under bf16: accelerate wraps its forward as
    # convert_outputs_to_fp32(autocast(forward)) (the reference got the same at construction).
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    return trainer


def step_peaks(tmp_path, tiny_tok, pairs_dataset, vocab: int, configs: dict, bf16: bool = False):
    """Peak tensor bytes of one ``compute_loss`` + backward per configuration, on a one-layer model whose
    logits dominate (after one call that is not compared: lazy inits). ``bf16``: the model prepared as
    ``Trainer.train()`` prepares it under bf16 mixed precision. Returns (peaks, the batch)."""
    base = tiny_causal_lm("llama", tokenizer=tiny_tok, vocab_size=vocab, hidden_size=32, num_layers=1)
    peaks = {}
    for name, overrides in configs.items():
        trainer = TIDPOTrainer(
            copy.deepcopy(base),
            args=make_config(tmp_path, bf16=bf16, **overrides),
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
        )
        if bf16:
            _bf16_prepared(trainer)
        perturb(trainer.model, seed=6, scale=0.02)
        batch = first_batch(trainer)
        trainer.model.train()

        def step(trainer=trainer, batch=batch) -> None:
            trainer.compute_loss(trainer.model, batch).backward()

        step()
        trainer.model.zero_grad(set_to_none=True)
        peaks[name] = peak_tensor_bytes(step)
        trainer.model.zero_grad(set_to_none=True)
    return peaks, batch


def test_fused_ti_dpo_step_peak_memory_stays_near_dpo(tmp_path, tiny_tok, pairs_dataset):
    """With a vocabulary large enough that logits dominate, no step holds extra [B, T, V] float32 copies:
    DPO holds the policy logits and their gradient (plus cache-sized blocks), the fused TI-DPO step
    (gamma = 0, alpha = 0) at most 1.15x that, and the sequential KL adds only the reference logits it
    needs in its backward."""
    vocab = 8192
    configs = {
        "dpo": {"loss_type": "dpo"},
        "ti_fused": {"gamma": 0.0, "tdpo_alpha": 0.0},
        "ti_fused_kl": {"gamma": 0.0, "tdpo_alpha": 0.5},
    }
    peaks, batch = step_peaks(tmp_path, tiny_tok, pairs_dataset, vocab, configs)
    logits_bytes = batch["input_ids"].numel() * vocab * 4
    block = CPU_BLOCK_BYTES  # the chunk kernels' working blocks (a few alive at once)
    assert logits_bytes > 2 * block  # the logits span several blocks: chunking is exercised
    # Policy logits + their gradient, and a few blocks; a third full-size float32 tensor would fail this.
    assert logits_bytes <= peaks["dpo"] <= 2 * logits_bytes + 3 * block, (peaks, logits_bytes)
    assert peaks["ti_fused"] <= 1.15 * peaks["dpo"], (peaks, logits_bytes)
    # The KL keeps the reference logits for its backward, and nothing else of full size.
    assert peaks["ti_fused_kl"] <= peaks["dpo"] + logits_bytes + 2 * block, (peaks, logits_bytes)


@pytest.mark.parametrize("keep_dtype", [True, False])
def test_bf16_run_holds_no_float32_logits(tmp_path, tiny_tok, pairs_dataset, keep_dtype, monkeypatch):
    """Under bf16 mixed precision accelerate returns every forward's outputs as float32 copies; for the
    [B, T, V] logits that copy, kept for the backward, plus its float32 gradient would be two full
    float32 tensors. The trainer's forwards keep their bf16 logits (the kernels upcast block by block):
    a DPO step holds the bf16 logits and their bf16 gradient, and TI-DPO without the triplet stays
    within 1.15x of it. With accelerate's copies (keep_dtype=False) the same bound fails."""
    if not keep_dtype:
        _no_output_dtype_kept(monkeypatch)
    vocab = 32768
    configs = {"dpo": {"loss_type": "dpo"}, "ti_fused": {"gamma": 0.0, "tdpo_alpha": 0.0}}
    peaks, batch = step_peaks(tmp_path, tiny_tok, pairs_dataset, vocab, configs, bf16=True)
    bf16_logits = batch["input_ids"].numel() * vocab * 2
    block = CPU_BLOCK_BYTES
    assert bf16_logits > 2 * block
    bound = 2 * bf16_logits + block  # the bf16 logits and their bf16 gradient, and a working block
    if keep_dtype:
        assert peaks["dpo"] <= bound, (peaks, bf16_logits)
        assert peaks["ti_fused"] <= 1.15 * peaks["dpo"], (peaks, bf16_logits)
    else:
        assert peaks["dpo"] > bound, (peaks, bf16_logits)


def test_bf16_run_keeping_the_logits_dtype_changes_no_number(tmp_path, tiny_tok, pairs_dataset, monkeypatch):
    """bf16 -> float32 is exact and the kernels compute in float32 either way: full TI-DPO (KL, triplet)
    gives the same loss, metrics and gradients with the bf16 logits as with accelerate's float32 copy."""
    base = tiny_causal_lm("llama", tokenizer=tiny_tok)
    perturb(base, seed=3)
    results = []
    for keep_dtype in (True, False):
        if not keep_dtype:
            _no_output_dtype_kept(monkeypatch)
        trainer = TIDPOTrainer(
            copy.deepcopy(base),
            args=make_config(tmp_path, bf16=True, gamma=0.1, tdpo_alpha=0.5),
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
        )
        _bf16_prepared(trainer)
        perturb(trainer.model, seed=6)  # policy != reference: KL, rewards and triplet are non-trivial
        batch = first_batch(trainer)
        torch.manual_seed(0)
        results.append((*loss_and_grads(trainer, batch), last_metrics(trainer)))
    (loss, grads, _, metrics), (loss_fp32, grads_fp32, _, metrics_fp32) = results
    assert metrics["kl/chosen"] != 0 and metrics["triplet/loss"] != 0
    assert loss == loss_fp32 and metrics == metrics_fp32
    assert grads.keys() == grads_fp32.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_fp32[name]), name


def test_kl_under_checkpointing_holds_the_reference_hidden_states_not_its_logits(
    tmp_path, tiny_tok, pairs_dataset, monkeypatch
):
    """Under gradient checkpointing the KL gets the reference as hidden states + output layer
    (`ReferenceHead`): same loss and gradients as with its logits, and its peak stays near DPO's, where
    holding the reference logits for the backward adds a full [B, T, V] float32 tensor (the control)."""
    # The kernels' CPU blocks (4 MiB, and 24 MiB of logits per output-layer matmul) are small next to a
    # real model's logits (SmolLM2, 4 pairs: ~200 MB) but not next to this tiny batch's (~4 MB, one block
    # with share_prompt's shorter rows): scale them down alike.
    monkeypatch.setattr(tokenops, "CPU_BLOCK_BYTES", CPU_BLOCK_BYTES // 8)
    monkeypatch.setattr(tokenops, "CPU_HEAD_BYTES", CPU_BLOCK_BYTES // 8)
    vocab = 8192
    base = tiny_causal_lm("llama", tokenizer=tiny_tok, vocab_size=vocab, hidden_size=32, num_layers=1)
    peaks, results, saved = {}, {}, {}
    for name, overrides, head in (
        ("dpo", {"loss_type": "dpo"}, True),
        ("kl", {"gamma": 0.0, "tdpo_alpha": 0.5}, True),
        ("kl_logits", {"gamma": 0.0, "tdpo_alpha": 0.5}, False),
    ):
        trainer = TIDPOTrainer(
            copy.deepcopy(base),
            args=make_config(tmp_path, gradient_checkpointing=True, **overrides),
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
        )
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        used = []
        reference_logits = trainer._reference_logits

        def spy(*args, reference_logits=reference_logits, used=used, **kwargs):
            if not kwargs.get("prefix_only"):  # share_prompt's prompt forward returns no logits
                used.append(kwargs.get("as_head", False))
            return reference_logits(*args, **kwargs)

        trainer._reference_logits = spy
        if not head:
            trainer._reference_head = lambda model: False
        perturb(trainer.model, seed=6, scale=0.02)
        batch = first_batch(trainer)
        trainer.model.train()

        def step(trainer=trainer, batch=batch) -> None:
            trainer.compute_loss(trainer.model, batch).backward()

        saved[name] = saved_for_backward(step)
        trainer.model.zero_grad(set_to_none=True)
        peaks[name] = peak_tensor_bytes(step)
        trainer.model.zero_grad(set_to_none=True)
        results[name] = loss_and_grads(trainer, batch)
        assert set(used) == {head and name != "dpo"}, (name, used)
    shared = trainer._shared_prompt(trainer.model, batch)  # the logits cover the continuations only
    assert shared is not None
    logits_numel = shared.ids.numel() * vocab
    # What the graph holds for the backward decides it, whatever the allocator's timing: only the
    # control keeps a [B, T, V] tensor that needs no gradient (the reference logits) until then.
    held = {name: [n for n, grad in s if n >= logits_numel and not grad] for name, s in saved.items()}
    assert held == {"dpo": [], "kl": [], "kl_logits": [logits_numel]}, held
    # And the peak shows it. How much of the control's extra tensor is alive at its peak depends on
    # the CPU's kernels (0.7-1.3 of it, seen on two machines); the head path's margin does not.
    assert peaks["kl"] <= 1.15 * peaks["dpo"], (peaks, logits_numel * 4)
    assert peaks["kl_logits"] >= peaks["kl"] + 0.25 * logits_numel * 4, (peaks, logits_numel * 4)
    (loss_h, grads_h, _), (loss_l, grads_l, _) = results["kl"], results["kl_logits"]
    assert loss_h == pytest.approx(loss_l, rel=1e-5)
    assert grads_h.keys() == grads_l.keys()
    for n in grads_h:
        torch.testing.assert_close(grads_h[n], grads_l[n], rtol=1e-4, atol=1e-6, msg=n)


def test_peak_tensor_bytes_counts_tensors_alive_at_once():
    held = torch.ones(1 << 20, dtype=torch.uint8)  # alive before the block: not counted

    def block() -> None:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 3 MiB alive here
        del a
        c = torch.empty(1 << 20, dtype=torch.uint8)  # 3 MiB again, never 4
        del b, c

    assert peak_tensor_bytes(block) == 3 << 20
    assert held.sum() == 1 << 20
    with pytest.raises(ValueError, match="only CPU and CUDA"):
        peak_tensor_bytes(block, "meta")
