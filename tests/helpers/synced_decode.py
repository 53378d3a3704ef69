"""Run under ``torch.distributed.run`` (2 CPU processes, gloo): rank 0's prompts stop early, rank 1's
run on. With the model flagged as FSDP-managed (what ``unwrapped_for_generation`` does), both ranks must
run the same number of decode forwards, and return what each would alone. Writes ``<out>/rank<r>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tidpo.generation import sample_completion_ids
from tiny_setup import CONFIGS, build


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(CONFIGS["llama"]())
    with torch.no_grad():
        model.get_output_embeddings().weight[2] *= 12  # EOS (2) is likely: rows stop at different steps
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
    alone = sample_completion_ids(model, ids, mask, **kw)  # not flagged: no waiting for the other rank
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    model._is_fsdp_managed_module = True
    synced = sample_completion_ids(model, ids, mask, **kw)
    result = {"alone": alone.tolist(), "synced": synced.tolist(), "forwards": len(calls)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
