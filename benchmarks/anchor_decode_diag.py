"""Where anchor sampling's time goes on a GPU: one 64-token anchor batch, three ways.

1. ``sample_completion_ids`` with the kept static cache (what the trainer uses on CUDA): transformers'
   ``generate`` compiles the decode step (CUDA graphs); its loop (masks, logits processors, stopping)
   stays in Python.
2. ``sample_completion_ids`` with the default growing cache (eager decoding).
3. A hand-written loop: the same compiled decode step, and temperature / top-k / top-p / Gumbel-max
   sampling written out (no ``generate`` machinery). Not used by tidpo: it measures how much of (1) is
   ``generate``'s per-step overhead.

Then a profiler table of (1) and (3). Run on the device from the repo root::

    python benchmarks/anchor_decode_diag.py <arch-dir>   # a folder with config.json + tokenizer

Model in bf16 with random weights (speed depends on shapes), batch 8, 100-token prompts.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

from tidpo.generation import anchor_cache, sample_completion_ids


def main(arch: str) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch), dtype=torch.bfloat16)
    model = model.to(dev).eval()
    batch, prompt_len, new = (8, 100, 64) if dev == "cuda" else (2, 10, 6)
    ids = torch.randint(10, 1000, (batch, prompt_len), device=dev)
    mask = torch.ones_like(ids)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def timeit(label: str, fn, reps: int = 3) -> None:
        for r in range(reps):  # run 0 includes compilation
            sync()
            start = time.perf_counter()
            fn()
            sync()
            print(f"{label} run {r}: {time.perf_counter() - start:.3f}s", flush=True)

    # Token 0 as EOS: random weights rarely produce it, so all 64 steps run.
    kw = dict(max_new_tokens=new, eos_token_id=0, pad_token_id=0)
    cache = anchor_cache(model, prompt_len + new)
    timeit(
        "generate, static cache", lambda: sample_completion_ids(model, ids, mask, static_cache=cache, **kw)
    )
    timeit("generate, dynamic cache", lambda: sample_completion_ids(model, ids, mask, **kw), reps=2)

    length = prompt_len + new
    own_cache = StaticCache(config=model.config, max_cache_len=length)

    @torch.no_grad()
    def step(input_ids, position_ids, attention_mask):
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=own_cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)

    @torch.no_grad()
    def own_loop() -> torch.Tensor:
        own_cache.reset()
        full = torch.zeros(batch, length, dtype=mask.dtype, device=dev)
        full[:, :prompt_len] = mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=own_cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        nxt = pos[:, -1:] + 1
        tokens = []
        for t in range(new):
            x = logits.float() / 0.8
            x = x.masked_fill(x < torch.topk(x, 50, dim=-1).values[:, -1:], float("-inf"))
            srt, idx = torch.sort(x, descending=True)
            probs = srt.softmax(-1)
            srt = srt.masked_fill(probs.cumsum(-1) - probs > 0.95, float("-inf"))
            gumbel = -torch.log(-torch.log(torch.rand_like(srt).clamp_(1e-20, 1.0)))
            tok = idx.gather(-1, (srt + gumbel).argmax(-1, keepdim=True))
            tokens.append(tok)
            full[:, prompt_len + t] = 1
            logits = compiled_step(tok, nxt, full).clone()
            nxt = nxt + 1
        return torch.cat(tokens, 1)

    timeit("hand-written loop, compiled step", own_loop, reps=4)
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (
            (
                "generate, static cache",
                lambda: sample_completion_ids(model, ids, mask, static_cache=cache, **kw),
            ),
            ("hand-written loop", own_loop),
        ):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            print(f"\n{label}:")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/anchor_decode_diag.py <arch-dir>")
    main(sys.argv[1])
