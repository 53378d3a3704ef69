"""The training arguments every tiny-model test starts from (imported by the test modules)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from tidpo import TIDPOConfig


def make_config(tmp_path: Path, **overrides) -> TIDPOConfig:
    """A CPU config sized for tiny models: 2 steps of 4 pairs, short anchors, nothing saved."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=64,
        max_prompt_length=32,
        disable_tqdm=True,
    )
    base.update(overrides)
    if base.get("loss_type", "ti_dpo") == "ti_dpo" and base.get("gamma", 0.1) > 0:
        base.setdefault("anchor_max_new_tokens", 6)  # short anchors (without a triplet term: unused, warned)
    return TIDPOConfig(**base)


def train_loss_and_grads(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """One training-mode ``compute_loss`` + backward on the trainer's first batch: (loss, parameter grads)."""
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


# One tiny random model per architecture the prompt cache and the decode loop are checked on.
VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=8),
    "phi3": lambda: Phi3Config(**COMMON),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0
    ),
}


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move the policy away from its reference copy so losses, attribution and the triplet distances are
    not trivial (the noise is drawn on the CPU, so every device gets the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype))


def build(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, gradients still flow


def last_metrics(trainer) -> dict[str, float]:
    """The metrics of the trainer's last training batch, as `log` would report them for it alone."""
    from tidpo.training.trainer import window_metrics

    return window_metrics({k: v[-1:] for k, v in trainer._metrics["train"].items()})
