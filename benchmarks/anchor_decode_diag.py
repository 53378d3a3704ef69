"""Anchor sampling alone: tidpo's decode loop against transformers' ``generate``, same model and batch.

1. ``generate`` with the same sampling settings (temperature 0.8, top-k 50, top-p 0.95), a growing
   cache; on CUDA also with a kept static cache, which ``generate`` compiles (CUDA graphs). This is what
   tidpo's trainer ran before its own loop.
2. ``tidpo.generation.sample_completion_ids``: tidpo's loop (top-k candidates before top-p, no
   full-vocabulary sort or draw per token), with a growing cache, and on CUDA with a kept static cache
   and its compiled decode step.

Medians of ``--reps`` timed calls after one untimed call (which compiles on CUDA). Run from the repo
root::

    python benchmarks/anchor_decode_diag.py <arch-dir> [--rows 16] [--prompt-len 48] [--reps 5] [--bf16]
        [--skip-generate] [--greedy] [--profile]

``--greedy`` also times tidpo's loop with argmax tokens (``do_sample=False``): the difference is what
the sampling costs per call. ``--profile`` prints torch.profiler's busiest operations (by device and by
host time) for one call of tidpo's loop (the static cache on CUDA).

``<arch-dir>`` is a folder with a ``config.json`` (e.g. SmolLM2-135M's): random weights, since speed
depends on the shapes only. Token 0 is the EOS, which random weights rarely produce, so every call
decodes all 64 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tidpo.generation import anchor_cache, sample_completion_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("arch")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--skip-generate", action="store_true", help="time tidpo's loop only")
    parser.add_argument("--greedy", action="store_true", help="also time tidpo's loop with argmax tokens")
    parser.add_argument("--profile", action="store_true", help="profile one call of tidpo's loop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = (
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.arch), dtype=dtype).to(dev).eval()
    )
    ids = torch.randint(10, 1000, (args.rows, args.prompt_len), device=dev)
    mask = torch.ones_like(ids)
    mask[0, : args.prompt_len // 2] = 0  # one left-padded row
    length = args.prompt_len + args.new
    settings = dict(temperature=0.8, top_k=50, top_p=0.95)
    config = GenerationConfig(
        max_new_tokens=args.new, do_sample=True, eos_token_id=0, pad_token_id=0, **settings
    )

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def timeit(label: str, fn) -> float:
        fn()  # untimed: compiles on CUDA
        times = []
        for _ in range(args.reps):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - start)
            assert out.shape[-1] >= args.new, "a call stopped early; the timings would not compare"
        median = statistics.median(times)
        print(f"{label:<52} {median:8.3f} s  (min {min(times):.3f}, max {max(times):.3f})", flush=True)
        return median

    @torch.no_grad()
    def hf(**extra):
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)

    kw = dict(max_new_tokens=args.new, eos_token_id=0, pad_token_id=0, **settings)
    print(f"{dev}, {dtype}, {args.rows} rows x {args.prompt_len} prompt tokens, {args.new} new tokens")
    results = {}
    if not args.skip_generate:
        results["generate, growing cache"] = timeit("generate, growing cache", hf)
    results["tidpo loop, growing cache"] = timeit(
        "tidpo loop, growing cache", lambda: sample_completion_ids(model, ids, mask, **kw)
    )
    cache = anchor_cache(model, length) if dev == "cuda" else None
    if dev == "cuda":
        if not args.skip_generate:
            hf_cache = anchor_cache(model, length)
            results["generate, static cache (compiled)"] = timeit(
                "generate, static cache (compiled)", lambda: (hf_cache.reset(), hf(cache=hf_cache))[1]
            )
        results["tidpo loop, static cache (compiled)"] = timeit(
            "tidpo loop, static cache (compiled)",
            lambda: sample_completion_ids(model, ids, mask, static_cache=cache, **kw),
        )
    if args.greedy:
        label = "tidpo loop, argmax tokens" + (", static cache (compiled)" if cache is not None else "")
        results[label] = timeit(
            label, lambda: sample_completion_ids(model, ids, mask, static_cache=cache, do_sample=False, **kw)
        )
    base_label = next(iter(results))
    for label, t in results.items():
        print(f"  {label:<50} {t / results[base_label]:5.2f}x {base_label}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=activities) as prof:
            sample_completion_ids(model, ids, mask, static_cache=cache, **kw)
            sync()
        table = prof.key_averages()
        for key in (["device_time_total"] if dev == "cuda" else []) + ["cpu_time_total"]:
            print(table.table(sort_by=key, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
