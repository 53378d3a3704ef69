"""Round 9's eager decode profile (decode_profile_eager.log), as run on the H200, reformatted.

tidpo's decode loop with a growing cache (no static cache, no compilation), bf16 weights, 128 prompt
tokens, 64 new: one untimed call, one timed call (sampled, then argmax), then one sampled call under
torch.profiler, at 64 and at 16 rows.

    PYTHONPATH=<site>:src python benchmarks/results/h200/round9/decode_profile_eager.py <llama-1b folder>
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

from tidpo.generation import sample_completion_ids

arch = sys.argv[1]
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch), dtype=torch.bfloat16).cuda().eval()
for rows in (64, 16):
    ids = torch.randint(10, 1000, (rows, 128), device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=64, eos_token_id=0, pad_token_id=0, temperature=0.8, top_k=50, top_p=0.95)
    for greedy in (False, True):
        sample_completion_ids(model, ids, mask, do_sample=not greedy, **kw)
        torch.cuda.synchronize()
        start = time.perf_counter()
        sample_completion_ids(model, ids, mask, do_sample=not greedy, **kw)
        torch.cuda.synchronize()
        print(rows, "greedy" if greedy else "sampled", round(time.perf_counter() - start, 3), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sample_completion_ids(model, ids, mask, **kw)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="device_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
