"""Our tokenisation and collation give the same ids, masks, DPO loss and metrics as TRL 1.16's DPOTrainer."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers.processors import TemplateProcessing
from trl import DPOConfig, DPOTrainer

from tidpo.data import PreferenceCollator, prepare_preference_dataset
from tidpo.models import tiny_causal_lm, tiny_tokenizer

STANDARD_EXPLICIT = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "The grass is", "chosen": " green and the dog ran in the park.", "rejected": " blue."},
    # Already ends with EOS: TRL does not append a second one.
    {
        "prompt": "Write a short review:",
        "chosen": " I loved this film!<|im_end|>",
        "rejected": " It was boring.",
    },
    # The prompt ends inside a word: tokens merge across the boundary.
    {"prompt": "A cat sat on the m", "chosen": "at.", "rejected": "oon."},
]
STANDARD_IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Please answer briefly: yes", "rejected": "Please answer briefly: no, it was terrible"},
]
CONV_EXPLICIT = [
    {
        "prompt": [{"role": "user", "content": "What colour is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Write a short review of the restaurant."},
        ],
        "chosen": [{"role": "assistant", "content": "Wonderful food and a great story behind it."}],
        "rejected": [{"role": "assistant", "content": "Terrible."}],
    },
]
CONV_IMPLICIT = [
    {
        "chosen": [
            {"role": "user", "content": "The sky is?"},
            {"role": "assistant", "content": "blue"},
        ],
        "rejected": [
            {"role": "user", "content": "The sky is?"},
            {"role": "assistant", "content": "green, like grass"},
        ],
    },
    {
        "chosen": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Tell me about the dog."},
            {"role": "assistant", "content": "The dog ran in the park."},
        ],
        "rejected": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Tell me about the dog."},
            {"role": "assistant", "content": "No."},
        ],
    },
]
CASES = {
    "standard-explicit": STANDARD_EXPLICIT,
    "standard-implicit": STANDARD_IMPLICIT,
    "conversational-explicit": CONV_EXPLICIT,
    "conversational-implicit": CONV_IMPLICIT,
}


def _bos_tokenizer():
    """The tiny tokenizer, made to prepend a BOS token like Llama tokenizers do."""
    tok = tiny_tokenizer()
    tok.bos_token = "<|endoftext|>"
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", bos_id)],
    )
    assert tok(text="The sky")["input_ids"][0] == bos_id
    return tok


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def tokenizer(request):
    return tiny_tokenizer() if request.param == "no-bos" else _bos_tokenizer()


def _trl_trainer(rows, tokenizer, tmp_path) -> DPOTrainer:
    model = tiny_causal_lm(tokenizer=tokenizer, seed=0)
    ref = tiny_causal_lm(tokenizer=tokenizer, seed=1)  # differs from the policy: a non-trivial loss
    config = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        report_to=[],
        per_device_train_batch_size=len(rows),
    )
    return DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_ids_batch_and_loss_match_trl(case, tokenizer, tmp_path):
    rows = CASES[case]
    trainer = _trl_trainer(rows, tokenizer, tmp_path)
    theirs = trainer.train_dataset
    ours = prepare_preference_dataset(rows, tokenizer, max_length=None, max_prompt_length=None)

    assert len(ours) == len(theirs) == len(rows)
    for i in range(len(rows)):
        assert ours[i]["prompt_input_ids"] == theirs[i]["prompt_ids"], (case, i)
        assert ours[i]["chosen_input_ids"] == theirs[i]["chosen_ids"], (case, i)
        assert ours[i]["rejected_input_ids"] == theirs[i]["rejected_ids"], (case, i)
        assert len(ours[i]["chosen_input_ids"]) > 0

    # Same batch tensors as TRL's collator (our completion mask is bool, TRL's long).
    their_batch = trainer.data_collator([theirs[i] for i in range(len(rows))])
    our_batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)([ours[i] for i in range(len(rows))])
    assert torch.equal(our_batch["input_ids"], their_batch["input_ids"])
    assert torch.equal(our_batch["attention_mask"], their_batch["attention_mask"])
    assert torch.equal(our_batch["completion_mask"].long(), their_batch["completion_mask"])

    # And therefore the same DPO loss when TRL computes it on our batch.
    trainer.model.eval()
    trainer.ref_model.eval()
    with torch.no_grad():
        their_loss = trainer.compute_loss(trainer.model, their_batch)
        our_loss = trainer.compute_loss(
            trainer.model,
            {
                "input_ids": our_batch["input_ids"],
                "attention_mask": our_batch["attention_mask"],
                "completion_mask": our_batch["completion_mask"].long(),
            },
        )
    assert torch.isfinite(their_loss)
    assert abs(their_loss.item() - 0.6931) > 1e-4  # policy != reference: the comparison is not trivial
    assert our_loss.item() == pytest.approx(their_loss.item(), abs=1e-6)


def test_standard_completions_end_with_exactly_one_eos(tokenizer):
    ours = prepare_preference_dataset(STANDARD_EXPLICIT, tokenizer, max_length=None, max_prompt_length=None)
    eos = tokenizer.eos_token_id
    for row in ours:
        for ids in (row["chosen_input_ids"], row["rejected_input_ids"]):
            assert ids[-1] == eos
            assert ids.count(eos) == 1
    # BOS, when the tokenizer adds one, starts the prompt (as `tokenizer(text)` does in TRL).
    if tokenizer.bos_token_id is not None:
        assert all(row["prompt_input_ids"][0] == tokenizer.bos_token_id for row in ours)


def test_training_metrics_match_trl_on_one_batch(tmp_path):
    # Same models, same batch: every metric both trainers log must agree (logits/* pools the response
    # tokens of all rows, so responses of different lengths tell a per-row mean apart).
    from tidpo import TIDPOConfig, TIDPOTrainer
    from tiny_setup import last_metrics

    tokenizer = tiny_tokenizer()
    rows = STANDARD_EXPLICIT
    theirs = _trl_trainer(rows, tokenizer, tmp_path / "trl")
    config = TIDPOConfig(
        output_dir=str(tmp_path / "ours"),
        use_cpu=True,
        loss_type="dpo",
        beta=0.1,
        max_length=None,
        max_prompt_length=None,
        report_to=[],
        per_device_train_batch_size=len(rows),
    )
    ours = TIDPOTrainer(
        tiny_causal_lm(tokenizer=tokenizer, seed=0),
        ref_model=tiny_causal_lm(tokenizer=tokenizer, seed=1),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    for trainer in (theirs, ours):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch)
    their_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    our_metrics = last_metrics(ours)
    lengths = {int(m.sum()) for m in batch["completion_mask"][: len(rows)]}
    assert len(lengths) > 1  # responses of different lengths
    names = [f"{kind}/{which}" for kind in ("rewards", "logps", "logits") for which in ("chosen", "rejected")]
    names += ["rewards/accuracies", "rewards/margins"]
    for name in names:
        assert our_metrics[name] == pytest.approx(their_metrics[name], rel=1e-5, abs=1e-6), name
