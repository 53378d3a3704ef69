"""Diagnostic for RESULTS.md: how much of each response's hybrid weight lands on its closing tokens.

    python benchmarks/replicate/eos_share.py [--pairs 20]

Runs the separate attribution pass (Eq. 5-6) and the hybrid weights (Eq. 7-8, lambda 0.7) of the
embedded SmolLM2-135M-Instruct (no training) on the first chosen responses of the bundled quickstart
pairs, and prints the mean share of the weight mass on the response's last two tokens (SmolLM2's chat
template closes a turn with `<|im_end|>` and a newline; mean weight is 1 per token, so a uniform
share would be 2/n), and where each row's largest weight sits.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tidpo.data import PreferenceCollator, prepare_preference_dataset
from tidpo.importance import gradient_attribution, importance_weights
from tidpo.models import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--pairs", type=int, default=20)
    a = parser.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m", dtype=torch.float32)
    data = prepare_preference_dataset(
        "src/tidpo/assets/data/quickstart.jsonl", tokenizer, max_length=256, max_prompt_length=128
    )
    batch = PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(a.pairs)])
    ids, attn, span = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    scores = gradient_attribution(model, ids, attn)
    to_end = span.sum(1, keepdim=True) - span.cumsum(1)  # 0 at the last response token
    closing = span & (to_end <= 1)  # the last two response tokens: `<|im_end|>` and "\n"
    first = span & (span.cumsum(1) == 1)  # each row's first response token
    for mode, lam in (("hybrid", 0.7), ("gradient", 1.0), ("prior", 0.0)):
        w = importance_weights(mode, scores, span, lambda_importance=lam)
        n = span.sum(1).float()
        share = (w * closing).sum(1) / w.sum(1)
        print(
            f"{mode:8s} lambda={lam}: share of the weight on the closing 2 tokens {statistics.mean(share.tolist()):.3f} "
            f"(uniform: {statistics.mean((2 / n).tolist()):.3f}); mean response length {n.mean():.1f}"
        )
        top = w.argmax(1)
        from_end = to_end.gather(1, top[:, None]).squeeze(1)
        where = ", ".join(f"{k} from the end: {(from_end == k).float().mean():.0%}" for k in range(3))
        ends = [tokenizer.decode(ids[r, attn[r].sum() - 2 : attn[r].sum()]) for r in range(2)]
        print(
            f"         first-token share {statistics.mean(((w * first).sum(1) / w.sum(1)).tolist()):.3f}; "
            f"max weight {statistics.mean(w.max(1).values.tolist()):.2f}, position of the max: {where} "
            f"(responses end with {ends!r})"
        )


if __name__ == "__main__":
    main()
