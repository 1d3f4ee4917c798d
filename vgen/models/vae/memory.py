"""Peak memory of one call, on CPU (torch's allocator, via the profiler) or CUDA (the caching allocator).

CPU: `torch.profiler` with profile_memory=True records every allocation and free made through torch's
CPU allocator with a timestamp; replaying them in order gives the live-bytes curve and its peak. Python's
tracemalloc cannot be used: torch allocates outside Python's allocator. Library-internal scratch space
that bypasses torch's allocator (e.g. some oneDNN workspaces) is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class MemoryUse:
    peak: int  # most bytes live at once during the call, counted from its start
    retained: int  # bytes still live at its end (mostly the result)

    @property
    def transient(self) -> int:
        """Peak working memory above what the call leaves behind: the part tiling should bound."""
        return self.peak - self.retained


def _cpu_peak(fn: Callable):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # sorted() is stable: ties keep record order
        live += e.nbytes()
        peak = max(peak, live)
    return out, MemoryUse(peak=peak, retained=live)


def _cuda_peak(fn: Callable, device):
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return out, MemoryUse(peak=peak, retained=torch.cuda.memory_allocated(device) - base)


def measure_peak(fn: Callable, device: str | torch.device = "cpu"):
    """Run `fn()` and return (its result, MemoryUse) for allocations on `device`.

    Args:
        fn: a no-argument callable; memory already allocated before it (inputs, weights) is not counted.
        device: "cpu" (profiler-based: slower, run small workloads) or a CUDA device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    return _cpu_peak(fn)
