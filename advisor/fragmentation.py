"""Reserved memory over a run of batches of varying shapes: what the caching allocator keeps as new
longest batches come up, and where it settles.

Pure and fast (no torch). A fixed-shape run reserves what advisor.gpu_memory's terms say (the step's
tensors, the allocator's cache, the CUDA context...). Batches padded to their own longest example are
not fixed-shape: the tensors that scale with the batch (activations, logits, their gradients) are
large blocks, each in a segment of its own size (advisor/allocator.py: a request of 10 MiB or more gets
a segment rounded to 2 MiB). A batch longer than every one before it cannot reuse those smaller
cached blocks, so the allocator maps new segments for most of its shape-dependent tensors while the old
ones stay cached (they are given back only when a new segment would not fit: ``release_cached_blocks``).
A shorter batch fits in the blocks already cached (the allocator splits a cached block for a smaller
request). So the reserve grows at each new longest batch and only then:

    reserved after step k = reserved after step 1 + G x sum over new longest batches j <= k of D(j)

where ``D(j)`` is the shape-dependent part of that step's tensors at their peak (the step's peak less
the part that does not change with the batch: weights, gradients, optimizer states, gathered shards),
and ``G`` the share of it that needs new segments (some requests fit in the larger blocks of other
tensors). Capped at the card: there the allocator gives its cache back and retries (slower steps,
no out-of-memory while the tensors themselves fit). The growth stops at the run's longest batch:
where the reserve settles.

The runner's order: its fail-fast probe (runner/failfast.py) runs the longest batch once before step 1,
so the cache is made for the longest batch first and no later batch is a new longest: the reserve is
the fixed-shape estimate of the longest batch from step 1 on, and stays there. Without the probe
(run.fail_fast=false, DeepSpeed ZeRO-1/2, or a trainer that does not probe, as the HF Trainer) it grows.

``G`` is fitted by ``python benchmarks/reserve_growth.py --fit`` on the published per-step reserved
memory of the Llama-3-8B HF Trainer + FSDP baseline of Liger-Kernel's examples only; the other models'
logs are validation (docs/accuracy.md, "Reserved memory over a run of varying shapes").
tests/test_reserve_growth.py replays the mechanism through advisor/allocator.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- fitted by benchmarks/reserve_growth.py --fit (calibration: the Llama-3-8B b32 baseline log only) --------
G_GROWTH = 0.9205  # share of a new longest batch's shape-dependent bytes that needs new segments
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    """The reserve of one ordering over the run: after step 1, at each new longest batch, where it settles."""

    first: int  # bytes reserved after step 1
    settled: int  # after the last new longest batch (or the card's limit)
    settle_step: int  # the step it settles at (1: no growth)
    records: tuple[tuple[int, int], ...]  # (step, reserved after it) at every new longest batch, step 1 first
    at_limit: bool = False  # the growth reached the card: the allocator gives its cache back and retries

    def as_json(self) -> dict[str, Any]:
        return {"first_bytes": self.first, "settled_bytes": self.settled, "settle_step": self.settle_step,
                "records": [{"step": s, "bytes": b} for s, b in self.records], "at_limit": self.at_limit}


@dataclass(frozen=True)
class ReserveOverRun:
    """The nvidia-smi peak over the run for the runner's order (the longest batch first, by the fail-fast
    probe) and for the same batches without the probe."""

    probe: Growth  # the runner's order: the longest batch first
    no_probe: Growth  # the same batch sequence without the probe
    probe_runs: bool  # whether this plan's run probes (run.fail_fast, not DeepSpeed)
    capacity: int | None
    growth_share: float = G_GROWTH
    notes: list[str] = field(default_factory=list)

    @property
    def expected(self) -> Growth:
        return self.probe if self.probe_runs else self.no_probe

    def as_json(self) -> dict[str, Any]:
        return {"probe_runs": self.probe_runs, "with_probe": self.probe.as_json(),
                "without_probe": self.no_probe.as_json(), "capacity_bytes": self.capacity,
                "growth_share": self.growth_share, "notes": list(self.notes)}


def grow(first: int, steps: Sequence[int], start: int, capacity: int | None, g: float = G_GROWTH) -> Growth:
    """The reserve over the run: ``first`` reserved after step 1, ``steps[k]`` the largest shape-dependent
    bytes D of step k+1 (-1: none that could be new), ``start`` the D the cache was made for by step 1
    (the probe's batch, or step 1's own)."""
    reserved, best = first, start
    records = [(1, min(first, capacity) if capacity else first)]
    at_limit = bool(capacity and first > capacity)
    settle = 1
    for k, d in enumerate(steps[1:], 2):
        if d > best:
            best = d
            reserved += int(g * d)
            if capacity and reserved > capacity:
                reserved, at_limit = capacity, True
            records.append((k, reserved))
            settle = k
    if capacity:
        reserved = min(reserved, capacity)
    return Growth(records[0][1], reserved, settle, tuple(records), at_limit)


def over_run(shapes: Sequence[tuple[int, int]], grad_accum: int, reserved_at: Callable[[int, int], int],
             shape_bytes: Callable[[int, int], int], capacity: int | None, probe_runs: bool,
             longest: tuple[int, int]) -> ReserveOverRun:
    """The reserve over the run for process 0's micro-batch ``shapes`` (rows, padded length), in order.
    ``reserved_at(rows, length)``: the fixed-shape nvidia-smi estimate; ``shape_bytes(rows, length)``: its
    shape-dependent bytes D; ``longest``: the probe's batch. D grows with the rows and the length, so only
    a shape that no earlier one covers in both can be a new longest: D is asked for those alone."""
    cache: dict[tuple[int, int], int] = {}

    def d(shape: tuple[int, int]) -> int:
        if shape not in cache:
            cache[shape] = shape_bytes(*shape)
        return cache[shape]

    front: list[tuple[int, int]] = []  # the shapes no other seen shape covers
    per_step: list[int] = []
    for i in range(0, len(shapes), grad_accum):
        new = []
        for s in sorted(set(shapes[i:i + grad_accum])):
            if not any(p[0] >= s[0] and p[1] >= s[1] for p in front):
                front = [p for p in front if not (s[0] >= p[0] and s[1] >= p[1])] + [s]
                new.append(s)
        per_step.append(max((d(s) for s in new), default=-1))
    first = max(set(shapes[:grad_accum]), key=d)
    no_probe = grow(reserved_at(*first), per_step, d(first), capacity)
    probe = grow(reserved_at(*longest), per_step, d(longest), capacity)
    notes = []
    if not probe_runs:
        notes.append("this run does not probe the longest batch first (run.fail_fast=false or DeepSpeed): the "
                     "reserve grows at each new longest batch")
    return ReserveOverRun(probe, no_probe, probe_runs, capacity, G_GROWTH, notes)


# --- a plan's terms at any batch shape (the analytic estimate) --------------------------------------------------

def at_shape(plan, shape, rows: int, length: int):
    """The analytic Breakdown of the plan with micro-batches of ``rows`` x ``length``."""
    from advisor.memory import estimate

    t = plan.training.model_copy(update={"micro_batch": rows, "seq_len": length})
    return estimate(plan.model_copy(update={"training": t}), shape)


def moving_phase(bd) -> str:
    """The largest phase outside the optimizer step: where the batch's tensors are at their peak."""
    return max((k for k in bd.phases if k != "optimizer_step"), key=lambda k: bd.phases[k])


def still_bytes(plan, shape, phase: str) -> int:
    """What ``phase`` holds whatever the batch (weights, states, gathered shards): the 1 x 1 batch's."""
    return at_shape(plan, shape, 1, 1).phases[phase]


def plan_over_run(plan, shape, capacity: int | None, shapes: Sequence[tuple[int, int]],
                  longest: tuple[int, int]) -> ReserveOverRun:
    """:func:`over_run` for a plan: each shape's fixed-shape reserve and its shape-dependent bytes D (its
    peak phase less what that phase holds for a 1 x 1 batch) from the analytic estimate; the probe runs
    unless run.fail_fast is off or DeepSpeed (ZeRO-1/2 on GPUs) runs the step."""
    small = at_shape(plan, shape, 1, 1)

    def d(rows: int, length: int) -> int:
        bd = at_shape(plan, shape, rows, length)
        phase = moving_phase(bd)
        return max(bd.phases[phase] - small.phases[phase], 0)

    hw = plan.hardware
    probes = plan.run.fail_fast and not (hw.gpus > 1 and hw.zero in (1, 2))
    return over_run(shapes, plan.training.grad_accum, lambda r, n: at_shape(plan, shape, r, n).peak_reserved_bytes,
                    d, capacity, probes, longest)
