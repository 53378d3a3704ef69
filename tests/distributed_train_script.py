"""Training script for tests/test_distributed.py, run once per process by ``accelerate launch``.

Also runs as a plain ``python`` process (one rank), which gives the single-process baseline. It builds
the tiny in-process model with a fixed seed (no download), trains TIDPOTrainer on the shared test pairs
and writes, per rank, what the test compares:

- ``{run}_rank{r}.pt``: the trainable parameters after training (float32, CPU);
- ``{run}_rank{r}.json``: the rank's ``log_history`` and the backend name.

Runs (``--runs`` picks any of them, comma-separated):
- ``equal``: gamma = 0 (no anchors, whose seeds depend on the rank), fused gradient attribution, hybrid
  weights, reference log-probs precomputed across ranks. Its weights must not depend on how the global
  batch is split over processes.
- ``full``: full TI-DPO (anchors, sequential KL, triplet term), full fine-tuning, 2 micro-batches per
  optimizer step (their anchors sampled in one decode loop per rank).
- ``lora``: full TI-DPO with LoRA adapters and gradient checkpointing (fused attribution).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for conftest.PAIRS

import torch
from datasets import Dataset

from conftest import PAIRS
from tidpo import TIDPOConfig, TIDPOTrainer
from tidpo.models import tiny_causal_lm, tiny_tokenizer
from tidpo.training.distributed import backend_name

RUNS = {
    # Plain SGD: the update is linear in the gradient, so equal weights mean equal averaged gradients
    # (Adam's g / sqrt(v) would amplify float rounding where a gradient is near 0).
    "equal": dict(
        gamma=0.0,
        tdpo_alpha=0.0,
        precompute_ref_logps=True,
        attribution_pass="fused",
        optim="sgd",
        learning_rate=0.1,
    ),
    # anchor_prompt_cache=True: the anchors must take the prompt-cache path under DDP (else an error).
    "full": dict(
        gamma=0.1,
        tdpo_alpha=0.5,
        anchor_max_new_tokens=6,
        learning_rate=1e-2,
        anchor_prompt_cache=True,
        gradient_accumulation_steps=2,
    ),
    "lora": dict(
        gamma=0.1,
        tdpo_alpha=0.5,
        anchor_max_new_tokens=6,
        learning_rate=1e-2,
        gradient_checkpointing=True,
    ),
    # Row 5's chosen holds a token whose embedding is NaN: only the rank that gets row 5 skips its batch.
    "skip": dict(gamma=0.0, tdpo_alpha=0.0, learning_rate=1e-2, skip_nonfinite_batches=True),
}


def poison_row_5(model, tokenizer) -> None:
    """NaN into the input embedding of a token that only row 5's chosen response uses."""
    others = {
        t
        for i, p in enumerate(PAIRS)
        for f in p
        if (i, f) != (5, "chosen")
        for t in tokenizer(p[f])["input_ids"]
    }
    own = [t for t in tokenizer(PAIRS[5]["chosen"])["input_ids"] if t not in others]
    with torch.no_grad():
        model.get_input_embeddings().weight[own[0]] = float("nan")


def train_one(
    run: str, out: Path, per_device_batch: int, steps: int, gpu: bool = False, model_dir: str | None = None
) -> None:
    args = TIDPOConfig(
        output_dir=str(out / f"run-{run}"),
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not gpu,
        bf16=gpu,  # accelerate GPU configs ask for bf16 mixed precision
        seed=0,
        max_length=64,
        max_prompt_length=32,
        disable_tqdm=True,
        **RUNS[run],
    )
    if model_dir is None:
        tokenizer = tiny_tokenizer()
        model = tiny_causal_lm("llama", tokenizer=tokenizer, seed=0)
    else:
        # Loaded by path AFTER the config exists, so ZeRO-3 partitions it at load (zero.Init) and
        # the trainer can load the reference the same way.
        from tidpo.models import load_causal_lm, load_tokenizer

        tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir, dtype=torch.float32)
    if run == "skip":
        poison_row_5(model, tokenizer)
    peft_config = None
    if run == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TIDPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    loops = []  # prompts per anchor decode loop
    sample = trainer._sample_anchors

    def count(model, prompt_ids, *args, **kwargs):
        loops.append(int(prompt_ids.shape[0]))
        return sample(model, prompt_ids, *args, **kwargs)

    trainer._sample_anchors = count
    trainer.train()
    rank = trainer.args.process_index
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: p.detach().float().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    torch.save(params, out / f"{run}_rank{rank}.pt")
    # 7 pairs: on 2 ranks of 2 the last eval batch is padded with a row from the start (even batches).
    evaluation = trainer.evaluate(eval_dataset=Dataset.from_list(PAIRS[:7])) if run == "equal" else {}
    info = {
        "evaluation": evaluation,
        "backend": backend_name(trainer.accelerator),
        "num_processes": trainer.accelerator.num_processes,
        "log_history": trainer.state.log_history,
        "ref_model_is_none": trainer.ref_model is None,
        "precomputed": "ref_chosen_logps" in trainer.train_dataset.column_names,
        "anchor_loops": loops,
    }
    (out / f"{run}_rank{rank}.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="equal")
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="train on the GPU in bf16 (manual GPU checks)")
    parser.add_argument("--model_dir", default=None, help="load the model from this folder (ZeRO-3 checks)")
    a = parser.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in a.runs.split(","):
        train_one(run, out, a.per_device_batch, a.steps, a.gpu, a.model_dir)


if __name__ == "__main__":
    main()
