"""A faithful model of PyTorch's CUDA caching allocator, replayed on an allocation/free sequence.

Pure Python, no torch: ``replay(events)`` returns what ``torch.cuda.max_memory_allocated()`` and
``torch.cuda.max_memory_reserved()`` would report for that sequence on one device. It follows
``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``: ``malloc``, ``round_size``,
``get_pool``, ``get_allocation_size``, ``get_free_block``, ``should_split``,
``alloc_found_block``, ``free_block``/``try_merge_blocks``, ``alloc_block``,
``release_cached_blocks`` and, for ``expandable_segments:True``, ``find_expandable_block``/
``map_block``) rule for rule:

* every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``), or to the next
  power-of-two division with ``roundup_power2_divisions``;
* requests up to 1 MiB (``kSmallSize``) come from the small pool, whose segments are 2 MiB
  (``kSmallBuffer``); larger ones from the large pool, whose segments are 20 MiB
  (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``) and the request rounded up to
  2 MiB (``kRoundLarge``) above that;
* a request takes the smallest cached free block of its pool and stream that is large enough
  (best fit, ties by address); the block is split when the rest is at least 512 bytes (small
  pool) or more than 1 MiB (large pool, and only for requests under ``max_split_size``);
* with ``max_split_size`` set, a request under it never takes a cached block at or over it, and a
  request over it takes a cached block only if it wastes under 20 MiB;
* a freed block merges with its free neighbours of the same segment and stays cached (reserved);
* a segment is given back only when a new segment would not fit (``release_cached_blocks``:
  every cached segment that is entirely free), or never in a steady run;
* ``expandable_segments``: one segment per pool and stream that grows by mapping 2 MiB (small
  pool) or 20 MiB (large pool) pages at its end; any free range of it can be split at 512 bytes.

What it leaves out: CUDA graphs' private pools, IPC, ``garbage_collection_threshold`` (off by
default), and the event-deferred reuse of blocks recorded on other streams (``record_stream``):
streams are kept apart, as in the allocator, but frees are immediate.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from advisor.units import MIB

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize: largest "small" request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: small-pool segment
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: requests under this share 20 MiB segments
LARGE_BUFFER = 20 * MIB  # kLargeBuffer
ROUND_LARGE = 2 * MIB  # kRoundLarge
NO_LIMIT = 2**63  # max_split_size default: SIZE_MAX


@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` settings that change how much is reserved."""

    max_split_size: int = NO_LIMIT  # max_split_size_mb, in bytes
    expandable_segments: bool = False
    roundup_power2_divisions: int = 0

    @classmethod
    def parse(cls, conf: str | None) -> AllocatorConfig:
        """From a ``PYTORCH_CUDA_ALLOC_CONF`` string such as ``expandable_segments:True,max_split_size_mb:128``."""
        kw: dict = {}
        for item in (conf or "").split(","):
            if ":" not in item:
                continue
            key, _, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if key == "max_split_size_mb":
                kw["max_split_size"] = int(value) * MIB
            elif key == "expandable_segments":
                kw["expandable_segments"] = value.lower() == "true"
            elif key == "roundup_power2_divisions" and value.isdigit():
                kw["roundup_power2_divisions"] = int(value)
        return cls(**kw)


def round_size(size: int, divisions: int = 0) -> int:
    """``round_size``: the bytes a request of ``size`` takes from a block."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    if divisions > 1 and size > MIN_BLOCK * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step
    return MIN_BLOCK * -(-size // MIN_BLOCK)


def is_small(rounded: int) -> bool:
    """``get_pool``: the small pool serves requests up to 1 MiB."""
    return rounded <= SMALL_SIZE


def allocation_size(rounded: int) -> int:
    """``get_allocation_size``: the segment cudaMalloc'ed when no cached block fits."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-rounded // ROUND_LARGE)


class OutOfMemory(Exception):
    """The replayed sequence does not fit the given capacity even after freeing the cache."""


class _Block:
    __slots__ = ("ptr", "size", "requested", "stream", "small", "allocated", "prev", "next", "segment", "mapped")

    def __init__(self, ptr: int, size: int, stream: int, small: bool, segment: _Segment, mapped: bool = True):
        self.ptr, self.size, self.stream, self.small = ptr, size, stream, small
        self.segment, self.mapped = segment, mapped
        self.requested = 0
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None

    @property
    def split(self) -> bool:
        return self.prev is not None or self.next is not None


@dataclass
class _Segment:
    expandable: bool
    page: int = 0  # expandable: mapping granularity


class _Pool:
    """Cached free blocks of one (pool, stream), ordered as the allocator's std::set: (size, ptr)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[tuple[int, int], _Block] = {}
        self.unmapped: dict[int, _Block] = {}  # expandable segments: ptr -> unmapped block

    def add(self, b: _Block) -> None:
        k = (b.size, b.ptr)
        bisect.insort(self.keys, k)
        self.blocks[k] = b

    def remove(self, b: _Block) -> None:
        k = (b.size, b.ptr)
        i = bisect.bisect_left(self.keys, k)
        assert self.keys[i] == k
        del self.keys[i]
        del self.blocks[k]


@dataclass
class ReplayResult:
    """What torch.cuda.memory_stats would say after the sequence."""

    peak_allocated_bytes: int  # max_memory_allocated (block sizes: rounded to 512 B)
    peak_reserved_bytes: int  # max_memory_reserved
    peak_requested_bytes: int  # the live bytes as requested (the tensors' own nbytes)
    allocated_bytes: int  # at the end
    reserved_bytes: int
    segments: int  # cudaMalloc calls (or expandable mappings)
    releases: int = 0  # times the cache was freed to make room (only with a capacity)
    reserved_at: dict[str, int] = field(default_factory=dict)  # peak reserved up to each mark


class CachingAllocator:
    """One device's ``DeviceCachingAllocator`` (default pools, no CUDA graphs)."""

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None):
        self.cfg = config or AllocatorConfig()
        self.capacity = capacity
        self.pools: dict[tuple[bool, int], _Pool] = {}
        self.live: dict[object, _Block] = {}
        self.allocated = self.reserved = self.requested = 0
        self.peak_allocated = self.peak_reserved = self.peak_requested = 0
        self.segments = self.releases = 0
        self._addr = itertools.count(1)
        self._next_ptr = 1 << 40

    # -- helpers --------------------------------------------------------------------------------
    def _pool(self, small: bool, stream: int) -> _Pool:
        p = self.pools.get((small, stream))
        if p is None:
            p = self.pools[(small, stream)] = _Pool()
        return p

    def _new_address(self, size: int) -> int:
        ptr = self._next_ptr
        self._next_ptr += size + ROUND_LARGE  # segments never touch (they are separate cudaMallocs)
        return ptr

    def _grow(self, nbytes: int) -> bool:
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            return False
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    # -- malloc ---------------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int, stream: int = 0) -> None:
        if nbytes <= 0:  # torch returns a null pointer for empty tensors
            return
        size = round_size(nbytes, self.cfg.roundup_power2_divisions)
        small = is_small(size)
        pool = self._pool(small, stream)
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._alloc_block(pool, small, stream, size)
            if block is None and self.capacity is not None:
                self._release_cached_blocks()
                block = self._alloc_block(pool, small, stream, size)
            if block is None:
                raise OutOfMemory(f"tried to allocate {size} bytes with {self.reserved} reserved of "
                                  f"{self.capacity}")
        if self._should_split(block, size):
            rest = _Block(block.ptr + size, block.size - size, stream, small, block.segment)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.add(rest)
        block.allocated = True
        block.requested = nbytes
        self.live[key] = block
        self.allocated += block.size
        self.requested += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)

    def _should_split(self, b: _Block, size: int) -> bool:
        remaining = b.size - size
        if b.small or b.segment.expandable:
            return remaining >= MIN_BLOCK
        return size < self.cfg.max_split_size and remaining > SMALL_SIZE

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        i = bisect.bisect_left(pool.keys, (size, -1))
        if i == len(pool.keys):
            return None
        b = pool.blocks[pool.keys[i]]
        if b.segment.expandable:
            # best fit counts a block followed by unmapped space as the size it can grow to
            def grow(x: _Block) -> int:
                return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)

            j = i + 1
            while b.segment.expandable and j < len(pool.keys):
                nb = pool.blocks[pool.keys[j]]
                if grow(nb) >= grow(b):
                    break
                b, j = nb, j + 1
        mss = self.cfg.max_split_size
        if size < mss and b.size >= mss:
            return None  # do not return an oversized block for a smaller request
        if size >= mss and b.size >= size + LARGE_BUFFER:
            return None  # oversized blocks are reused only within 20 MiB
        pool.remove(b)
        return b

    def _alloc_block(self, pool: _Pool, small: bool, stream: int, size: int) -> _Block | None:
        if self.cfg.expandable_segments:
            return self._alloc_expandable(pool, small, stream, size)
        seg_size = allocation_size(size)
        if not self._grow(seg_size):
            return None
        self.segments += 1
        return _Block(self._new_address(seg_size), seg_size, stream, small, _Segment(False))

    # -- expandable segments ----------------------------------------------------------------------
    def _alloc_expandable(self, pool: _Pool, small: bool, stream: int, size: int) -> _Block | None:
        cand = self._find_expandable(pool, small, stream, size)
        if not cand.mapped and not self._map(pool, cand, min(cand.size, size)):
            return None
        while cand.size < size:
            nxt = cand.next
            assert nxt is not None
            if not self._map(pool, nxt, min(size - cand.size, nxt.size)):
                return None
            cand = nxt  # map() merged the free block before it into nxt
        pool.remove(cand)
        return cand

    def _find_expandable(self, pool: _Pool, small: bool, stream: int, size: int) -> _Block:
        for ptr in sorted(pool.unmapped):
            c = pool.unmapped[ptr]
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            got, b = 0, c  # type: tuple[int, _Block | None]
            while got < size and b is not None and not b.allocated:
                got += b.size
                b = b.next
            if got >= size:
                return c
        seg = _Segment(True, SMALL_BUFFER if small else LARGE_BUFFER)
        span = 1 << 46  # address space: far more than any card
        c = _Block(self._new_address(span), span, stream, small, seg, mapped=False)
        pool.unmapped[c.ptr] = c
        return c

    def _map(self, pool: _Pool, b: _Block, size: int) -> bool:
        page = b.segment.page
        mapped = min(b.size, page * -(-size // page))
        if not self._grow(mapped):
            return False
        self.segments += 1
        del pool.unmapped[b.ptr]
        b.mapped = True
        if mapped < b.size:
            rest = _Block(b.ptr + mapped, b.size - mapped, b.stream, b.small, b.segment, mapped=False)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = mapped
            pool.unmapped[rest.ptr] = rest
        self._merge(pool, b, b.prev)
        self._merge(pool, b, b.next)
        pool.add(b)
        return True

    # -- free -----------------------------------------------------------------------------------
    def free(self, key: object) -> None:
        b = self.live.pop(key, None)
        if b is None:
            return
        b.allocated = False
        self.allocated -= b.size
        self.requested -= b.requested
        pool = self._pool(b.small, b.stream)
        self._merge(pool, b, b.prev)
        self._merge(pool, b, b.next)
        pool.add(b)

    def _merge(self, pool: _Pool, dst: _Block, src: _Block | None) -> None:
        """``try_merge_blocks``: absorb a free neighbour of the same mapping state."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.remove(src)
        else:
            del pool.unmapped[src.ptr]
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    # -- out of memory: give the cache back ------------------------------------------------------
    def _release_cached_blocks(self) -> None:
        """Free every cached segment that is entirely free; unmap the free pages of expandable ones."""
        self.releases += 1
        for pool in self.pools.values():
            for b in list(pool.blocks.values()):
                if b.segment.expandable:
                    page = b.segment.page
                    lo = page * -(-b.ptr // page) if b.ptr % page else b.ptr
                    hi = ((b.ptr + b.size) // page) * page
                    if hi > lo:
                        pool.remove(b)
                        self.reserved -= hi - lo
                        pieces = [(b.ptr, lo - b.ptr, True), (lo, hi - lo, False), (hi, b.ptr + b.size - hi, True)]
                        prev = b.prev
                        after = b.next
                        made = []
                        for ptr, size, mapped in pieces:
                            if size <= 0:
                                continue
                            nb = _Block(ptr, size, b.stream, b.small, b.segment, mapped=mapped)
                            made.append(nb)
                        for x, y in zip([prev, *made], [*made, after], strict=True):
                            if x is not None:
                                x.next = y
                            if y is not None:
                                y.prev = x
                        for nb in made:
                            if nb.mapped:
                                pool.add(nb)
                            else:
                                pool.unmapped[nb.ptr] = nb
                                self._merge(pool, nb, nb.prev)
                                self._merge(pool, nb, nb.next)
                elif not b.split:
                    pool.remove(b)
                    self.reserved -= b.size

    def result(self, marks: dict[str, int] | None = None) -> ReplayResult:
        return ReplayResult(self.peak_allocated, self.peak_reserved, self.peak_requested, self.allocated,
                            self.reserved, self.segments, self.releases, dict(marks or {}))


Event = tuple[str, object, int]  # ("alloc", key, nbytes) | ("free", key, 0) | ("mark", name, 0)


def replay(events: Iterable[Event], config: AllocatorConfig | None = None,
           capacity: int | None = None, capacity_from: str | None = None) -> ReplayResult:
    """Run an allocation/free sequence through the allocator. ``("mark", name, 0)`` events record
    the peak reserved so far under that name (e.g. the end of model loading, of the first step).
    With ``capacity`` (bytes the allocator may reserve) the cache is given back when a new segment
    would not fit, and :class:`OutOfMemory` is raised when even that is not enough. With
    ``capacity_from`` (a mark's name) the capacity applies from that mark on, and the peaks restart
    there (e.g. the training steps after loading)."""
    a = CachingAllocator(config, None if capacity_from else capacity)
    marks: dict[str, int] = {}
    waiting = capacity_from is not None
    for op, key, nbytes in events:
        if op == "alloc":
            a.malloc(key, nbytes)
        elif op == "free":
            a.free(key)
        elif op == "mark":
            if waiting and key == capacity_from:
                waiting = False
                a.peak_reserved, a.peak_allocated, a.peak_requested = a.reserved, a.allocated, a.requested
                a.capacity = capacity
                if capacity is not None and a.reserved > capacity:
                    raise OutOfMemory(f"{a.reserved} bytes reserved at {key!r}, over {capacity}")
            marks[str(key)] = a.peak_reserved
    return a.result(marks)


@dataclass
class StepReserve:
    """One step of :func:`replay_steps`: its peaks (the peaks reset when it starts, as
    ``torch.cuda.reset_peak_memory_stats`` does) and the cache given back so far."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    reserved_bytes: int  # at the step's end
    releases: int


def replay_steps(persistent: Iterable[int], steps: Iterable[Iterable[Event]], config: AllocatorConfig | None = None,
                 capacity: int | None = None) -> list[StepReserve]:
    """Allocate ``persistent`` blocks (weights, states: they live through the run), then replay each step's
    allocation sequence on the same allocator, one :class:`StepReserve` per step: how the reserve of a run of
    batches of varying shapes grows (advisor/fragmentation.py). Keys of different steps may repeat."""
    a = CachingAllocator(config, capacity)
    for i, nbytes in enumerate(persistent):
        a.malloc(("persistent", i), nbytes)
    out = []
    for events in steps:
        a.peak_reserved, a.peak_allocated = a.reserved, a.allocated
        for op, key, nbytes in events:
            if op == "alloc":
                a.malloc(key, nbytes)
            elif op == "free":
                a.free(key)
        out.append(StepReserve(a.peak_allocated, a.peak_reserved, a.reserved, a.releases))
    return out
