"""Peak tensor memory of a block of work, on CPU as on CUDA (used by the speed benchmark and its tests).

CUDA keeps a peak counter. torch keeps none for CPU tensors, and process RSS is noisy (the allocator
keeps freed pages, other threads allocate), so on CPU the block runs under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of torch's CPU allocator; the peak is
the maximum of their running sum. Python objects are not counted (tiny next to activations).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["peak_tensor_bytes"]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a block: libkineto prints a start/stop line per profile to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_tensor_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Most bytes of ``device`` tensors alive at once while ``fn()`` runs, above the level at its start.

    Tensors alive before the call (parameters, optimizer states, inputs) are not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak_tensor_bytes: only CPU and CUDA are supported, got {device}")
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas: list[tuple[int, int]] = []  # (time, +size for an allocation / -size for a free)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            deltas.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    level = peak = 0
    for _, size in sorted(deltas):
        level += size
        peak = max(peak, level)
    return peak
