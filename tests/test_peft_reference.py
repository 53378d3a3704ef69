"""A PeftModel passed in with a trained adapter (e.g. from SFT) trains against a frozen copy of it, as in
TRL: the reference is where training starts, not the base model under the adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model

from tidpo import TIDPOTrainer
from tidpo.models import REFERENCE_ADAPTER, adapter_active
from tiny_setup import last_metrics, make_config, train_loss_and_grads

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)


def sft_adapter(base, tmp_path, scale: float = 0.3):
    """A LoRA adapter that changes the model (B != 0), saved and loaded back as a user would."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(tmp_path / "sft")
    return PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "sft", is_trainable=True)


def test_a_trained_adapter_is_its_own_reference(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    args = make_config(tmp_path, gamma=0.0)
    trainer = TIDPOTrainer(
        sft_adapter(tiny_llama, tmp_path), args=args, train_dataset=pairs_dataset, eval_dataset=pairs_dataset,
        processing_class=tiny_tok,
    )  # fmt: skip
    assert trainer._reference_adapter == REFERENCE_ADAPTER
    metrics = trainer.evaluate()
    # Before any update policy == reference: every log-ratio, reward and KL is 0, the loss log 2.
    assert metrics["eval_rewards/chosen"] == 0.0 and metrics["eval_rewards/margins"] == 0.0
    assert abs(metrics["eval_kl/chosen"]) < 1e-7
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Only the trained adapter is trainable; its copy is frozen and stays where it started.
    model = trainer.model
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    assert ref and not any(p.requires_grad for n, p in model.named_parameters() if n in ref)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n and n not in ref)
    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in ref.items())
    moved = [n for n in after if ".default." in n and "lora_B" in n]
    assert any(
        not torch.equal(after[n], after[n.replace(".default.", f".{REFERENCE_ADAPTER}.")]) for n in moved
    )
    assert model.active_adapter == "default"
    # Saved as TRL saves it: the trained adapter at the top, the reference copy in ref/.
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / REFERENCE_ADAPTER / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "out")
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_reference_adapter_equals_a_merged_reference_model(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """Same loss and gradients as passing the merged SFT model as ref_model, with the KL and anchors on."""
    args = make_config(tmp_path, tdpo_alpha=0.5, gamma=0.1)
    policy = sft_adapter(tiny_llama, tmp_path)
    merged = copy.deepcopy(policy).merge_and_unload()
    a = TIDPOTrainer(policy, args=args, train_dataset=pairs_dataset, processing_class=tiny_tok)
    with torch.no_grad():  # the policy moves a little from the SFT start: log-ratios and KL are not 0
        for name, p in a.model.named_parameters():
            if "lora_A.default." in name:
                p.add_(0.1 * torch.randn_like(p))
    b = TIDPOTrainer(copy.deepcopy(a.model), ref_model=merged, args=args, train_dataset=pairs_dataset,
                     processing_class=tiny_tok)  # fmt: skip
    assert b._reference_adapter is None  # (its copy of "ref" is inactive: the ref_model is the reference)
    loss_a, grads_a = train_loss_and_grads(a)
    loss_b, grads_b = train_loss_and_grads(b)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert last_metrics(a)["kl/chosen"] > 1e-5, last_metrics(a)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_fresh_adapter_needs_no_copy(tmp_path, tiny_tok, tiny_llama, pairs_dataset):
    """B = 0 (PEFT's initialisation): the base model is the reference already; adapters are disabled."""
    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(**LORA))
    trainer = TIDPOTrainer(
        model, args=make_config(tmp_path), train_dataset=pairs_dataset, processing_class=tiny_tok
    )
    assert trainer._reference_adapter is None and REFERENCE_ADAPTER not in trainer.model.peft_config


def test_adapter_active_switches_the_forward_and_nothing_else(tmp_path, tiny_llama):
    model = sft_adapter(tiny_llama, tmp_path)
    model.add_adapter("other", LoraConfig(**LORA))
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        sft = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
        with adapter_active(model, "other"):  # fresh: B = 0, so the base model's logits
            other = model(input_ids=ids).logits
            assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
        again = model(input_ids=ids).logits
    assert not torch.allclose(sft, base)
    torch.testing.assert_close(other, base)
    torch.testing.assert_close(again, sft, rtol=0, atol=0)


VARIANTS = {
    "lora_all_linear": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": lambda: LoraConfig(**LORA, use_dora=True),
    "lora_modules_to_save": lambda: LoraConfig(**LORA, modules_to_save=["lm_head"]),
    "lora_on_embeddings": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "trainable_tokens": lambda: LoraConfig(**LORA, trainable_token_indices=[5, 6, 7]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "adalora": lambda: AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_adapter_type_is_copied_exactly(tmp_path, tiny_tok, tiny_llama, pairs_dataset, variant):
    """Adapter types keep their weights under other names (parameter dicts, embeddings, token deltas):
    the copy goes through PEFT's state dict, and before any update the policy is its reference."""
    model = get_peft_model(copy.deepcopy(tiny_llama), VARIANTS[variant]())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained adapter: every adapter weight moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    args = make_config(tmp_path, gamma=0.0)
    trainer = TIDPOTrainer(
        model, args=args, train_dataset=pairs_dataset, eval_dataset=pairs_dataset, processing_class=tiny_tok
    )
    assert trainer._reference_adapter == REFERENCE_ADAPTER
    metrics = trainer.evaluate()
    assert abs(metrics["eval_rewards/margins"]) < 1e-6 and abs(metrics["eval_kl/chosen"]) < 1e-6, metrics
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and not [n for n in trained if f".{REFERENCE_ADAPTER}" in n]
    with adapter_active(trainer.model, REFERENCE_ADAPTER), torch.no_grad():
        ids = torch.arange(1, 9)[None]
        with_copy = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(with_copy, trainer.model(input_ids=ids).logits, rtol=0, atol=1e-6)
