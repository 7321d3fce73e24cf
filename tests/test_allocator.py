"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp."""

import pytest

from advisor.allocator import (
    AllocatorConfig,
    CachingAllocator,
    OutOfMemory,
    allocation_size,
    replay,
    round_size,
)
from advisor.units import MIB


def run(seq, **cfg):
    capacity = cfg.pop("capacity", None)
    events = []
    for item in seq:
        if isinstance(item, tuple):
            events.append(("alloc", item[0], item[1]))
        else:
            events.append(("free", item, 0))
    return replay(events, AllocatorConfig(**cfg), capacity)


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(round_size(1)) == 2 * MIB  # small pool: 2 MiB segments
    assert allocation_size(MIB) == 2 * MIB  # 1 MiB is still small
    assert allocation_size(MIB + 512) == 20 * MIB  # 1-10 MiB share 20 MiB segments
    assert allocation_size(10 * MIB - 512) == 20 * MIB
    assert allocation_size(10 * MIB) == 10 * MIB  # from 10 MiB: rounded to 2 MiB
    assert allocation_size(11 * MIB) == 12 * MIB
    # roundup_power2_divisions:4 -> 1200 rounds to 1280 (the source's own example, above 512*4)
    assert round_size(2100, 4) == 2560 and round_size(4096, 4) == 4096


def test_small_requests_pack_into_2mib_segments():
    r = run([(i, 512 * 1024) for i in range(4)])
    assert r.peak_reserved_bytes == 2 * MIB and r.segments == 1
    r = run([(i, 512 * 1024) for i in range(5)])
    assert r.peak_reserved_bytes == 4 * MIB
    r = run([(i, 100) for i in range(4096)])  # 100 B take 512 B each
    assert r.peak_allocated_bytes == 4096 * 512 == r.peak_reserved_bytes
    assert r.peak_requested_bytes == 409600


def test_medium_requests_share_a_20mib_segment():
    r = run([("a", 8 * MIB), ("b", 8 * MIB)])
    assert r.peak_reserved_bytes == 20 * MIB
    r = run([("a", 8 * MIB), ("b", 8 * MIB), ("c", 8 * MIB)])
    assert r.peak_reserved_bytes == 40 * MIB


def test_freed_blocks_are_cached_and_split():
    r = run([("a", 100 * MIB), "a", ("b", 50 * MIB), ("c", 50 * MIB)])
    assert r.peak_reserved_bytes == 100 * MIB and r.segments == 1
    # a request larger than any cached block needs a new segment: the cache does not shrink
    r = run([("a", 100 * MIB), "a", ("b", 120 * MIB)])
    assert r.peak_reserved_bytes == 220 * MIB and r.reserved_bytes == 220 * MIB


def test_large_remainder_under_1mib_is_not_split():
    r = run([("a", 20 * MIB), "a", ("b", 19 * MIB + 512 * 1024), ("c", 400 * 1024)])
    # b takes the whole 20 MiB block (512 KiB left is not > 1 MiB); c is small-pool: +2 MiB
    assert r.peak_allocated_bytes == 20 * MIB + 400 * 1024
    assert r.peak_reserved_bytes == 22 * MIB


def test_free_merges_neighbours():
    seq = [("a", 30 * MIB), "a", ("b", 10 * MIB), ("c", 10 * MIB), "b", "c", ("d", 30 * MIB)]
    assert run(seq).peak_reserved_bytes == 30 * MIB


def test_fragmentation_a_hole_too_small():
    # two 40 MiB blocks; free the first, then ask for 60 MiB: the 40 MiB hole cannot serve it
    seq = [("a", 40 * MIB), ("b", 40 * MIB), "a", ("c", 60 * MIB)]
    assert run(seq).peak_reserved_bytes == 140 * MIB


def test_max_split_size_keeps_oversize_blocks_whole():
    seq = [("a", 100 * MIB), "a", ("b", 50 * MIB)]
    assert run(seq).peak_reserved_bytes == 100 * MIB
    assert run(seq, max_split_size=64 * MIB).peak_reserved_bytes == 150 * MIB
    # an oversize request reuses an oversize block only within 20 MiB
    assert run([("a", 100 * MIB), "a", ("b", 90 * MIB)], max_split_size=64 * MIB).peak_reserved_bytes == 100 * MIB
    assert run([("a", 100 * MIB), "a", ("b", 70 * MIB)], max_split_size=64 * MIB).peak_reserved_bytes == 170 * MIB


def test_expandable_segments_grow_in_place():
    seq = [("a", 30 * MIB), "a", ("b", 50 * MIB)]
    assert run(seq).peak_reserved_bytes == 80 * MIB  # two segments
    # one segment: 30 MiB maps 40 MiB (20 MiB pages); 50 MiB reuses them and maps 20 MiB more
    assert run(seq, expandable_segments=True).peak_reserved_bytes == 60 * MIB
    # the hole case above: 40+40, free a, 60 MiB -> the segment grows past b
    frag = [("a", 40 * MIB), ("b", 40 * MIB), "a", ("c", 60 * MIB)]
    assert run(frag, expandable_segments=True).peak_reserved_bytes == 140 * MIB
    # small pool pages are 2 MiB
    assert run([("a", 1000)], expandable_segments=True).peak_reserved_bytes == 2 * MIB


def test_parse_alloc_conf():
    c = AllocatorConfig.parse("expandable_segments:True,max_split_size_mb:128")
    assert c.expandable_segments and c.max_split_size == 128 * MIB
    assert AllocatorConfig.parse(None) == AllocatorConfig()


def test_capacity_releases_cache_then_ooms():
    seq = [("a", 100 * MIB), "a", ("b", 120 * MIB)]
    r = run(seq, capacity=150 * MIB)  # the free 100 MiB segment is given back first
    assert r.releases == 1 and r.peak_reserved_bytes == 120 * MIB
    with pytest.raises(OutOfMemory):
        run([("a", 100 * MIB), ("b", 120 * MIB)], capacity=150 * MIB)


def test_marks_and_allocated_counts_rounded_blocks():
    a = CachingAllocator()
    a.malloc("x", 1000)
    assert a.allocated == 1024 and a.requested == 1000
    r = replay([("alloc", 1, 30 * MIB), ("mark", "load", 0), ("alloc", 2, 30 * MIB)])
    assert r.reserved_at == {"load": 30 * MIB} and r.peak_reserved_bytes == 60 * MIB


def test_many_events_fast():
    import time

    seq = []
    for step in range(20):
        for layer in range(50):
            seq.append(("alloc", (step, layer), (layer % 7 + 1) * 3 * MIB + layer * 4096))
        for layer in range(50):
            seq.append(("free", (step, layer), 0))
    t0 = time.perf_counter()
    r = replay(seq)
    assert time.perf_counter() - t0 < 1.0
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes
