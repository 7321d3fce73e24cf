"""Ground truth: the live tensor bytes of a real workload, from every CPU allocator event.

``torch.profiler.profile(activities=[CPU], profile_memory=True)`` makes the CPU allocator report
each allocation (+nbytes) and free (-nbytes) as a ``[memory]`` event with a timestamp. The running
sum of those events, **starting from 0 when the profiler starts**, is the number of bytes held by
tensors allocated since then and still alive. That is why :func:`measure` must wrap the *whole*
workload, model creation included: a tensor allocated before the profiler started is invisible
(its later free is not reported either, the allocator only warns "Memory block of unknown size was
allocated before the profiling started"), so the running sum would miss it. Started before the
model exists, the running sum is the absolute number of live tensor bytes of the workload.

What the profiler does not see, and how this module guards against it:

* Allocations made on a thread the profiler was not enabled on. Memory reporting is thread-local:
  a plain ``threading.Thread`` (e.g. transformers' asynchronous weight loading) allocates silently.
  (``_ExperimentalConfig(profile_all_threads=True)`` records other threads' *ops* but, in torch
  2.13, drops every ``[memory]`` event, so it cannot be used for the counting itself.)
  Guards: importing this module sets ``HF_DEACTIVATE_ASYNC_LOAD=1`` (sequential weight loading);
  :func:`ops_by_thread` lists which threads run aten ops during a workload (to show that training
  steps run on the calling thread; autograd's CPU backward does); :func:`gc_live_tensor_bytes`
  counts the storages of all live Python-visible tensors, to compare with the trace at a quiet
  point (after loading, between steps).
* Memory that is not a CPU-allocator tensor (Python objects, mmap'ed files, library buffers) is
  not counted; that is intended, the estimate covers tensors.

The profiler itself allocates no tensors (no ``record_shapes``/``with_stack``; ``record_function``
handles are not tensors), so it does not disturb the numbers it records.

Steps and phases are ``torch.profiler.record_function`` ranges: ``tuneplan:step`` around a step,
and any ``tuneplan:<phase>`` range inside it is a phase of that step -- ``forward`` / ``backward`` /
``optimizer`` / ``zero_grad`` for training, ``prefill`` / ``decode`` for generation (see
:mod:`advisor.stack`). A ``tuneplan:*`` range outside every step (e.g. ``tuneplan:load``) is a mark.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Sequential weight loading: transformers >= 5 converts weights on a thread pool, whose
# allocations the (thread-local) memory profiler would not see.
os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from advisor.stack import PHASE_PREFIX, phase  # noqa: F401  (phase: re-exported for tests)

__all__ = [
    "PHASES", "INFER_PHASES", "PREFIX", "StepTrace", "Trace", "measure", "phase", "ops_by_thread",
    "gc_live_tensor_bytes",
]

PREFIX = PHASE_PREFIX
STEP = PREFIX + "step"
PHASES: tuple[str, ...] = ("forward", "backward", "optimizer", "zero_grad")  # training step phases
INFER_PHASES: tuple[str, ...] = ("prefill", "decode")  # generate_step phases


@dataclass
class StepTrace:
    """One ``tuneplan:step`` range. Bytes are absolute live tensor bytes (see module doc)."""

    start_bytes: int  # live when the step began (weights + optimizer states + leftovers)
    end_bytes: int  # live when it ended
    peak_bytes: int  # highest live count inside the step
    phase_peaks: dict[str, int] = field(default_factory=dict)  # highest live count inside each phase
    phase_start: dict[str, int] = field(default_factory=dict)  # live when each phase began
    peak_phase: str | None = None  # the phase holding the step's peak (None: between phases)
    duration_s: float = 0.0


@dataclass
class Trace:
    peak_bytes: int  # highest live count over the whole workload (model loading included)
    final_bytes: int  # live when the workload returned
    steps: list[StepTrace]  # every tuneplan:step range, in order
    marks: dict[str, dict[str, int]]  # other tuneplan:* ranges: {"start", "end", "peak"} (last occurrence)
    n_memory_events: int
    result: Any = None  # what fn returned

    @property
    def last(self) -> StepTrace:
        """The last step: steady state (optimizer states exist, caches warmed)."""
        if not self.steps:
            raise ValueError("no tuneplan:step range was recorded")
        return self.steps[-1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("result", None)
        return d


def _events(prof) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """Memory events (t, nbytes) in time order, and tuneplan:* ranges (name, start, end)."""
    mem: list[tuple[int, int, int]] = []
    ranges: list[tuple[str, int, int]] = []
    for i, e in enumerate(prof.profiler.kineto_results.events()):
        try:
            name = e.name()
        except UnicodeDecodeError:  # seen with with_stack=True: a garbled name; classify by payload
            name = "[memory]" if e.nbytes() != 0 else ""
        if name == "[memory]":
            if e.device_type() == torch.autograd.DeviceType.CPU:
                mem.append((e.start_ns(), i, e.nbytes()))
        elif name.startswith(PREFIX):
            ranges.append((name, e.start_ns(), e.start_ns() + e.duration_ns()))  # end_ns() is newer than torch 2.4
    mem.sort()  # by time, ties kept in recording order
    ranges.sort(key=lambda r: r[1])
    return [(t, n) for t, _, n in mem], ranges


class _Timeline:
    """Running sum over time-ordered memory events with range queries."""

    def __init__(self, mem: list[tuple[int, int]]):
        import bisect

        self._bisect = bisect
        self.t = [t for t, _ in mem]
        self.live = []
        s = 0
        for _, n in mem:
            s += n
            self.live.append(s)

    def at(self, t: int) -> int:
        """Live bytes just before time t (events at exactly t are counted as after)."""
        i = self._bisect.bisect_left(self.t, t)
        return self.live[i - 1] if i > 0 else 0

    def after(self, t: int) -> int:
        """Live bytes just after time t (events at exactly t included)."""
        i = self._bisect.bisect_right(self.t, t)
        return self.live[i - 1] if i > 0 else 0

    def peak(self, t0: int, t1: int) -> int:
        """Highest live count in [t0, t1], including the level on entry."""
        i0 = self._bisect.bisect_left(self.t, t0)
        i1 = self._bisect.bisect_right(self.t, t1)
        best = self.live[i0 - 1] if i0 > 0 else 0
        if i1 > i0:
            best = max(best, max(self.live[i0:i1]))
        return best


def _chrome_events(prof) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """As :func:`_events`, from the profiler's Chrome trace (which names each block's address), leaving out
    the blocks a ``c10d::`` collective allocates itself: gloo's copies of a collective's input
    (``_reduce_scatter_base_`` clones it), held by its work object, which gloo's worker thread or the caller
    drops, whichever lets go last, sometimes only after a later collective, and a free on gloo's thread is
    not recorded at all (the profiler's memory events are thread-local). NCCL, which GPU runs use, works
    on the tensors it is given and makes no such copy. The tensors the caller itself passes to a
    collective share the race; benchmarks/fsdp_cpu.py makes the caller let go of them last."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    ns = lambda us: int(round(float(us) * 1000))  # noqa: E731
    ranges: list[tuple[str, int, int]] = []
    collectives: list[tuple[int, int]] = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and (name.startswith(PREFIX) or name.startswith("c10d::")):
            t0 = ns(e["ts"])
            (ranges if name.startswith(PREFIX) else collectives).append((name, t0, t0 + ns(e.get("dur", 0))))
    blocks = sorted((e for e in events if e.get("name") == "[memory]" and str(e["args"].get("Device Type", 0)) == "0"),
                    key=lambda e: (float(e["ts"]), e["args"].get("Ev Idx", 0)))
    mem: list[tuple[int, int, int]] = []
    moved: set = set()  # addresses of live blocks a collective allocated (not counted, nor their free)
    for i, e in enumerate(blocks):
        a = e["args"]
        t, n, addr = ns(e["ts"]), int(a["Bytes"]), a["Addr"]
        if n < 0 and addr in moved:
            moved.discard(addr)
            continue
        if n > 0 and any(c0 <= t <= c1 for _, c0, c1 in collectives):  # they may overlap (async ones)
            moved.add(addr)
            continue
        mem.append((t, i, n))
    mem.sort()
    ranges.sort(key=lambda r: r[1])
    return [(t, n) for t, _, n in mem], ranges


def _analyse(prof, result, collectives: bool = False) -> Trace:
    mem, ranges = _chrome_events(prof) if collectives else _events(prof)
    tl = _Timeline(mem)
    steps: list[StepTrace] = []
    marks: dict[str, dict[str, int]] = {}
    step_ranges = [r for r in ranges if r[0] == STEP]
    for _, s0, s1 in step_ranges:
        st = StepTrace(start_bytes=tl.at(s0), end_bytes=tl.after(s1), peak_bytes=tl.peak(s0, s1),
                       duration_s=(s1 - s0) / 1e9)
        best = -1
        for name, p0, p1 in ranges:
            ph = name[len(PREFIX):]
            if name != STEP and s0 <= p0 and p1 <= s1:
                pk = tl.peak(p0, p1)
                # a phase recorded twice in a step (e.g. gradient accumulation): keep the max
                st.phase_peaks[ph] = max(st.phase_peaks.get(ph, 0), pk)
                st.phase_start.setdefault(ph, tl.at(p0))
                if pk > best:
                    best = pk
                    st.peak_phase = ph
        if best < st.peak_bytes:
            st.peak_phase = None
        steps.append(st)
    for name, r0, r1 in ranges:
        ph = name[len(PREFIX):]
        if name == STEP or any(s0 <= r0 and r1 <= s1 for _, s0, s1 in step_ranges):
            continue
        marks[ph] = {"start": tl.at(r0), "end": tl.after(r1), "peak": tl.peak(r0, r1)}
    peak = max(tl.live) if tl.live else 0
    return Trace(peak_bytes=max(peak, 0), final_bytes=tl.live[-1] if tl.live else 0, steps=steps,
                 marks=marks, n_memory_events=len(mem), result=result)


def measure(fn: Callable[[], Any], collectives: bool = False) -> Trace:
    """Run ``fn()`` under the CPU memory profiler and return its :class:`Trace`.

    ``fn`` must create the model itself (the profiler has to be running before the first
    weight is allocated, see the module doc) and run its steps inside
    ``record_function("tuneplan:step")`` ranges, as :func:`advisor.stack.train_step` does.
    ``Trace.result`` is what ``fn`` returned; keep it small (it is alive at the end).
    ``collectives``: ``fn`` runs torch.distributed collectives on gloo; the blocks they allocate
    themselves are left out (see :func:`_chrome_events`).
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False,
                 with_stack=False) as prof:
        result = fn()
    trace = _analyse(prof, result, collectives)
    del prof
    return trace


def ops_by_thread(fn: Callable[[], Any]) -> dict[int, dict[str, int]]:
    """Which threads run aten ops during ``fn()``: {thread id: {op name: count}}.

    Uses ``profile_all_threads=True``, which sees every thread's ops (but no memory events).
    Thread 1 in the profiler's numbering is usually the calling thread; an allocating op
    (``aten::empty*``) on any other thread means :func:`measure` would miss that allocation.
    """
    cfg = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=cfg) as prof:
        fn()
    out: dict[int, dict[str, int]] = {}
    for e in prof.profiler.kineto_results.events():
        d = out.setdefault(e.start_thread_id(), {})
        d[e.name()] = d.get(e.name(), 0) + 1
    return out


def gc_live_tensor_bytes() -> int:
    """Bytes of the distinct storages behind every live Python-visible CPU tensor.

    An independent count to compare with a trace at a quiet moment (no autograd graph alive):
    it finds tensors whatever thread allocated them. Tensors held only by C++ (saved autograd
    tensors) are not seen; bitsandbytes quant states are Python objects, so theirs are. It also
    counts tensors that existed before the profiler started (take a baseline first).
    """
    import warnings

    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated module attributes warns
        objs = gc.get_objects()
        tensors = [o for o in objs if isinstance(o, torch.Tensor)]
    del objs
    for obj in tensors:
        try:
            if obj.device.type != "cpu" or obj.is_meta:
                continue
            st = obj.untyped_storage()
            ptr = st.data_ptr()
            if ptr:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:  # sparse/odd tensors without storage
            continue
    return sum(seen.values())
