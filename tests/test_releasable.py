"""benchmarks/releasable.py: the floor under a capacity is the tensors plus what the allocator cannot
give back (free space in segments that still hold a live block); wholly free segments are released."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from advisor.units import MIB
from benchmarks import releasable as rel  # noqa: E402


def seq(*ops):
    out = [("mark", "loaded", 0)]
    for op, key, mib in ops:
        out.append((op, key, mib * MIB))
    return out


def test_a_wholly_free_segment_is_given_back():
    events = seq(("alloc", "a", 200), ("free", "a", 0), ("alloc", "b", 300))
    alloc, reserve, floor = rel.floor_bytes(events, resolution=MIB)
    assert (alloc, reserve) == (300 * MIB, 500 * MIB)
    assert floor - alloc <= MIB  # the 200 MiB segment is released: nothing but the tensors is needed


def test_a_segment_split_by_a_live_block_stays():
    # a 50 MiB block that lives on takes the front of the freed 200 MiB segment: its 150 MiB tail is stuck
    events = seq(("alloc", "a", 200), ("free", "a", 0), ("alloc", "k", 50), ("alloc", "b", 300))
    alloc, reserve, floor = rel.floor_bytes(events, resolution=MIB)
    assert (alloc, reserve) == (350 * MIB, 500 * MIB)
    assert reserve - floor <= MIB  # nothing can be given back
