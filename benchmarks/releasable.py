"""How much of the caching allocator's reserve PyTorch can give back when the card is full.

    python benchmarks/releasable.py            # the six 1-GPU PowerLM-3b calibration plans (~2 min)

When a new segment does not fit, CUDACachingAllocator frees its cached segments that are wholly free
and retries (release_cached_blocks); free space inside a segment that still holds a live block stays.
So only part of the reserve beyond the live tensors is releasable, and how much depends on the order
of allocations. This replays simulate mode's allocation sequence (the real step on fake tensors) through
advisor/allocator.py with a capacity, applied once the model is loaded, and bisects for the smallest
capacity at which the run still completes (the floor). non-releasable share = (floor - tensor peak) /
(reserve - tensor peak). The plans are those of ../shared/calibration/fms_a100_80gb_granite.csv
(benchmarks/gpu_fit.py: FSDP-free 1-GPU rows, 4096 tokens, checkpointing, flash-attention 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB, MIB = 1024**3, 1024**2
GRANITE = str(ROOT / "benchmarks" / "configs" / "ibm--PowerLM-3b.json")


def plans() -> list[dict]:
    out = []
    for method in ("lora", "qlora", "full"):
        for b in (4, 8):
            t = {"method": method, "precision": "bf16", "optimizer": "adamw", "micro_batch": b, "seq_len": 4096,
                 "grad_checkpointing": True, "attn_impl": "flash_attention_2"}
            if method != "full":
                t["lora"] = {"r": 16, "alpha": 16, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
            out.append({"model": {"ref": GRANITE}, "training": t,
                        "hardware": {"gpu": "a100-80gb", "gpus": 1, "device": "cuda"}})
    return out


def events_of(plan: dict) -> list:
    """Simulate's allocation sequence of the plan (loading, then the steps), as it hands it to the replay."""
    import advisor.simulate.runs as runs
    import advisor.simulate.tracker as tracker
    from advisor import service

    seen: dict[str, list] = {}
    original = runs.replay_reserved

    def keep(recs, marks=()):
        seen["events"] = tracker.alloc_events(recs, marks)
        return original(recs, marks)

    runs.replay_reserved = keep
    try:
        service.estimate(service.build(plan), mode="simulate")
    finally:
        runs.replay_reserved = original
    return seen["events"]


def run(events: list, capacity: int | None):
    """The replay with ``capacity`` from the end of loading on (advisor.allocator.replay)."""
    from advisor.allocator import replay

    return replay(events, capacity=capacity, capacity_from="loaded")


def floor_bytes(events: list, resolution: int = 32 * MIB) -> tuple[int, int, int]:
    """(tensor peak, reserve peak, floor) of the steps after loading: the floor is the smallest capacity
    (to ``resolution``) at which the sequence still completes, the allocator giving back its cache."""
    from advisor.allocator import OutOfMemory

    free = run(events, None)
    alloc, reserve = free.peak_allocated_bytes, free.peak_reserved_bytes
    lo, hi = alloc, reserve  # hi completes
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        try:
            run(events, mid)
            hi = mid
        except OutOfMemory:
            lo = mid
    return alloc, reserve, hi


def releasable(plan: dict) -> dict:
    alloc, reserve, floor = floor_bytes(events_of(plan))
    cache = reserve - alloc
    return {"tensors_gib": alloc / GIB, "reserve_gib": reserve / GIB, "floor_gib": floor / GIB,
            "non_releasable_share": (floor - alloc) / cache if cache else 0.0}


if __name__ == "__main__":
    for p in plans():
        t = p["training"]
        r = releasable(p)
        print(json.dumps({"plan": f"{t['method']} b{t['micro_batch']}", **{k: round(v, 3) for k, v in r.items()}}),
              flush=True)
