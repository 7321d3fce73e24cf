"""The longest sequence and the largest micro-batch a training plan fits on its GPU.

A search over the analytic estimate (advisor.memory.estimate, ~50 us a call): doubling to bracket the
edge, then bisection, under the one fit policy (advisor.policy.fit_verdict). Peak memory never falls as
seq_len or micro_batch grows (the property tests of advisor.memory check it), so the edges are exact.

Two edges: ``value``, the largest whose expected nvidia-smi peak, the allocator's cache included, is on
the card ("fits" or "tight" by the band); and ``launchable_value``, the largest the verdict still calls
launchable because only the cache would outgrow the card ("tight": PyTorch frees cached segments and
retries). The second is not promised: the allocator can give back only segments that are wholly free,
and how much of the cache that is depends on the allocation sequence (advisor/allocator.py's replay
gives back between none and 90% of it on the calibration plans: benchmarks/releasable.py).
Pure, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from advisor.policy import breakdown_verdict
from advisor.problems import Problem, Problems

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan

MAX_BATCH = 65536  # the plan's own bound on training.micro_batch
MAX_SEQ_NO_POSITION = 1_048_576  # when the config states no max_position_embeddings

Knob = Literal["seq_len", "micro_batch"]


@dataclass(frozen=True)
class Limit:
    """The largest value of one knob at which the plan still fits, its cache included (0: not even 1)."""

    knob: Knob
    value: int
    need_bytes: int  # expected peak reserved per GPU at `value` (at 1 when value is 0)
    status: str  # the verdict at `value`: fits or tight (tight or oom when value is 0)
    capacity_bytes: int
    next_value: int | None  # the first value whose expected peak is over the card; None when `value` is the cap
    next_need_bytes: int | None
    cap: int  # the search's upper bound (max_position for seq_len, 65536 for micro_batch)
    capped_by: str | None  # why the search stopped at `cap` ("max_position" / "plan bound"), else None
    tokens_per_s_per_gpu: float | None  # the time model at `value` (None when value is 0 or no time)
    step_s: float | None
    launchable_value: int | None = None  # beyond `value`, the largest still "tight" (only the cache over)

    def as_json(self) -> dict[str, Any]:
        return {"knob": self.knob, "value": self.value, "need_bytes": self.need_bytes, "status": self.status,
                "memory_bytes": self.capacity_bytes, "next_value": self.next_value,
                "next_need_bytes": self.next_need_bytes, "cap": self.cap, "capped_by": self.capped_by,
                "launchable_value": self.launchable_value,
                "tokens_per_s_per_gpu": None if self.tokens_per_s_per_gpu is None
                else round(self.tokens_per_s_per_gpu, 1),
                "step_s": None if self.step_s is None else round(self.step_s, 4)}


def _with(plan: Plan, knob: Knob, v: int) -> Plan:
    return plan.model_copy(update={"training": plan.training.model_copy(update={knob: v})})


def _need(plan: Plan, shape: ModelShape):
    from advisor.memory import estimate

    return estimate(plan, shape)


def largest(ok: Callable[[int], bool], hi: int) -> int:
    """Largest x in [1, hi] with ok(x) for a monotone ok (true, then false); 0 if ok(1) is false."""
    if not ok(1):
        return 0
    lo, x = 1, 2
    while x <= hi and ok(x):
        lo, x = x, x * 2
    top = min(x - 1, hi)
    while lo < top:  # ok(lo), answer in [lo, top]
        mid = (lo + top + 1) // 2
        if ok(mid):
            lo = mid
        else:
            top = mid - 1
    return lo


def _check(plan: Plan, gpu: Gpu | None) -> None:
    problems = []
    if plan.task != "training":
        problems.append(Problem("--max searches a training plan", "task", "use --task training"))
    if gpu is None:
        problems.append(Problem("--max needs a GPU to fit on", "hardware.gpu", "name one with --gpu, e.g. --gpu a100"))
    if plan.hardware.device != "cuda":
        problems.append(Problem("--max searches GPU memory", "hardware.device", "use --device cuda"))
    if problems:
        raise Problems(problems)


def _limit(plan: Plan, shape: ModelShape, gpu: Gpu, knob: Knob, cap: int, capped_by: str) -> Limit:
    _check(plan, gpu)
    cap_bytes = gpu.memory_bytes
    cache: dict[int, Any] = {}

    def need(v: int):
        if v not in cache:
            cache[v] = _need(_with(plan, knob, v), shape)
        return cache[v]

    def on_card(v: int) -> bool:  # the expected peak, cache included, is on the card
        verdict = breakdown_verdict(need(v), cap_bytes)
        return verdict.fits and not verdict.cache_limited

    def launchable(v: int) -> bool:
        return breakdown_verdict(need(v), cap_bytes).fits

    best = largest(on_card, cap)
    last = largest(launchable, cap) if best < cap and launchable(best + 1) else best
    at = max(best, 1)
    n = need(at).peak_reserved_bytes
    status = breakdown_verdict(need(at), cap_bytes).status
    nxt = best + 1 if best < cap else None
    nxt_need = need(nxt).peak_reserved_bytes if nxt is not None else None
    tps = step = None
    if best >= 1:
        from advisor.throughput import step_time

        try:
            st = step_time(_with(plan, knob, best), shape, gpu)
            tps, step = st.tokens_per_s, st.step_s
        except Problems:
            pass  # no time for this card (no TFLOPS / interconnect): the memory answer stands
    return Limit(knob, best, n, status, cap_bytes, nxt, nxt_need, cap, capped_by if best == cap else None, tps, step,
                 last if last > best else None)


def max_seq(plan: Plan, shape: ModelShape, gpu: Gpu) -> Limit:
    """The longest training.seq_len that fits `gpu` (other settings as in the plan), at most the model's
    max_position_embeddings."""
    cap = shape.max_position or MAX_SEQ_NO_POSITION
    return _limit(plan, shape, gpu, "seq_len", cap, "max_position" if shape.max_position else "search bound")


def max_batch(plan: Plan, shape: ModelShape, gpu: Gpu) -> Limit:
    """The largest training.micro_batch that fits `gpu` (other settings as in the plan)."""
    return _limit(plan, shape, gpu, "micro_batch", MAX_BATCH, "plan bound")


def limit(plan: Plan, shape: ModelShape, gpu: Gpu, what: str) -> Limit:
    """`what` is 'seq' or 'batch' (the CLI's --max)."""
    if what == "seq":
        return max_seq(plan, shape, gpu)
    if what == "batch":
        return max_batch(plan, shape, gpu)
    raise Problems(Problem(f"unknown --max {what!r}", "max", "use --max seq or --max batch"))
