"""The CPU's exact tensor peak of one training step (torch has no CPU peak counter).

Process RSS also holds library code and allocator caches, so on the CPU the runner measures one
step under ``torch.profiler``'s memory events instead: the live tensors before it (every storage
reachable from Python, no autograd graph alive; :func:`runner.memtrace.gc_live_tensor_bytes`) plus
the running sum of the step's allocations and frees, the method :mod:`runner.memtrace` validates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def profiled_step(step_fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int]:
    """Run ``step_fn(*args, **kwargs)`` under the profiler; (its result, peak live tensor bytes).

    One intra-op thread while it runs, so no allocation escapes the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runner.memtrace import gc_live_tensor_bytes

    base = gc_live_tensor_bytes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = step_fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, base + peak
