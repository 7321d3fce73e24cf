"""The CPU's exact tensor peak of one training step (torch has no CPU peak counter).

Process RSS also holds library code and allocator caches, so on the CPU the runner measures one
step under ``torch.profiler``'s memory events instead: the live tensors before it (every storage
reachable from Python, no autograd graph alive; :func:`runner.memtrace.gc_live_tensor_bytes`) plus
the running sum of the step's allocations and frees, the method :mod:`runner.memtrace` validates.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any


@contextlib.contextmanager
def _quiet_native_stderr():
    """File descriptor 2 to /dev/null: kineto prints "USDT: ... profiler_start/stop" lines there from
    C++ whatever its log level, on every profiled step; they mean nothing to the user."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiled_step(step_fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int]:
    """Run ``step_fn(*args, **kwargs)`` under the profiler; (its result, peak live tensor bytes).

    One intra-op thread while it runs, so no allocation escapes the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runner.memtrace import gc_live_tensor_bytes

    base = gc_live_tensor_bytes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with _quiet_native_stderr():  # only the profiler's start and stop; the step's own output stays
            prof.__enter__()
        try:
            out = step_fn(*args, **kwargs)
        finally:
            with _quiet_native_stderr():
                prof.__exit__(None, None, None)
    finally:
        torch.set_num_threads(threads)
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, base + peak
