"""Decisions that must agree on every screen: the fit verdict, and which
precisions a GPU supports. The CLI, ``--json``, the TUI, ``recommend`` and ``run`` all call these, so
one plan can never fit on one screen and not on another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from advisor.problems import Change, Problem

if TYPE_CHECKING:
    from advisor.gpus import Gpu

# --- the fit verdict ------------------------------------------------------------------------------
Status = Literal["fits", "tight", "oom"]
TIGHT_SHARE = 0.90  # above 90% of the card (expected peak) the margin for other processes is thin
STATUS_WORDS = {"fits": "fits", "tight": "tight", "oom": "out of memory"}
# What PyTorch's caching allocator gives back before it fails an allocation: on a cudaMalloc failure
# it frees its cached, unused segments and retries (CUDACachingAllocator.cpp, release_cached_blocks).
# So a run whose cache would outgrow the card still fits while the rest does; it runs at the card's
# limit (and pays for the retries). advisor.gpu_memory names the cache term "allocator_cache".
RELEASABLE = ("allocator_cache",)


@dataclass(frozen=True)
class Verdict:
    """Does a per-GPU peak fit a card? From the expected nvidia-smi peak and its high end (p90)."""

    status: Status
    need_bytes: int  # expected peak reserved per GPU
    high_bytes: int  # high end of the band (p90)
    capacity_bytes: int
    floor_bytes: int | None = None  # what the run cannot do without: tensors + what the allocator cannot free

    @property
    def cache_limited(self) -> bool:
        """The allocator's cache would outgrow the card, but the rest fits: it frees cache and retries."""
        return self.need_bytes > self.capacity_bytes and self.status != "oom"

    @property
    def on_card_bytes(self) -> int:
        """What nvidia-smi is expected to show on this card: the expected peak, or, when only the
        allocator's cache would outgrow the card, the card's memory (it fills the card, frees its cache
        and retries; the reserve cannot grow past the card)."""
        return self.capacity_bytes if self.cache_limited else self.need_bytes

    @property
    def fits(self) -> bool:
        """Launchable: 'fits' or 'tight' (tight may still run out on an unlucky step)."""
        return self.status != "oom"

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.need_bytes

    @property
    def share(self) -> float:
        return self.need_bytes / self.capacity_bytes if self.capacity_bytes else float("inf")

    def as_json(self) -> dict[str, object]:
        return {"status": self.status, "fits": self.fits, "memory_bytes": self.capacity_bytes,
                "need_bytes": self.need_bytes, "need_high_bytes": self.high_bytes,
                "need_floor_bytes": self.floor_bytes, "headroom_bytes": self.headroom_bytes,
                "cache_limited": self.cache_limited, "on_card_bytes": self.on_card_bytes}


def fit_verdict(need: int, capacity: int, high: int | None = None, floor: int | None = None) -> Verdict:
    """oom: the expected peak is over the card (and, given ``floor``, so is what the run cannot do
    without once the allocator has freed its cache); tight: the expected peak is over 90% of the card,
    or its high end (p90) is over the card, or only the allocator's cache is (it frees it and retries);
    fits: otherwise."""
    high = need if high is None else max(high, need)
    if need > capacity:
        status: Status = "tight" if floor is not None and floor <= capacity else "oom"
    elif need > TIGHT_SHARE * capacity or high > capacity:
        status = "tight"
    else:
        status = "fits"
    return Verdict(status, int(need), int(high), int(capacity), None if floor is None else int(floor))


def breakdown_verdict(bd, capacity: int) -> Verdict:
    """The verdict of an estimate (an advisor.breakdown.Breakdown: its expected nvidia-smi peak, the
    band's high end, and its floor: the tensors plus every GPU term but the releasable cache) on a
    card of ``capacity`` bytes."""
    floor = bd.peak_allocated_bytes + sum(v for k, v in bd.overhead.items() if k not in RELEASABLE)
    return fit_verdict(bd.peak_reserved_bytes, capacity, bd.peak_reserved_high_bytes,
                       floor if bd.overhead else None)


def fit_status(need: int, capacity: int, high: int | None = None) -> Status:
    return fit_verdict(need, capacity, high).status


# --- precision support ----------------------------------------------------------------------------
BF16_PRECISIONS = ("bf16", "amp-bf16", "mixed-bf16")


def precision_problem(gpu: Gpu | None, precision: str) -> Problem | None:
    """Why this GPU cannot train in this precision (None when it can)."""
    if gpu is not None and not gpu.bf16 and precision in BF16_PRECISIONS:
        return Problem(f"{gpu.name} has no bf16 support (needs Ampere or newer)", "training.precision",
                       change=Change("training.precision", ("amp-fp16", "fp16")))
    return None


def precision_for(method: str, gpu: Gpu | None, base: str) -> str:
    """bf16 where the card has it; otherwise fp16 (T4, V100). Full fine-tuning without bf16 uses
    AMP fp16 (fp32 master weights + loss scaling): pure fp16 weights underflow their updates."""
    if gpu is None or gpu.bf16:
        return base
    if method == "full" and base in ("bf16", "fp16", "amp-bf16"):
        return "amp-fp16"
    return {"bf16": "fp16", "amp-bf16": "amp-fp16", "mixed-bf16": "amp-fp16"}.get(base, base)


def precision_note(method: str, precision: str, optimizer: str) -> str | None:
    """What the plan's precision means where it matters, for the estimate's notes: a full fine-tune in pure
    fp16 (a warning: without loss scaling its gradients and AdamW's second moment underflow fp16), in pure
    bf16 (its bytes against amp-bf16's, and the updates it rounds away), or LoRA with fp32 frozen weights
    (amp-*: twice bf16's memory for the same adapters). None elsewhere. The words: advisor.spec.PRECISION_WORDS."""
    adam = optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
    if method == "full" and precision == "fp16":
        return ("pure fp16 trains the weights in fp16 with no loss scaling (PyTorch's GradScaler refuses fp16 "
                "parameters): small gradients flush to zero" + (" and AdamW's second moment (g², eps 1e-8) "
                "underflows to 0, so updates vanish or turn to inf/NaN" if adam else "") + "; use amp-fp16 "
                "(fp32 master weights + loss scaling), or bf16 on a card that has it")
    if method == "full" and precision == "bf16" and optimizer == "adamw":
        return ("bf16 here is pure bf16: weights, gradients and AdamW states in bf16, 8 bytes per parameter (10 "
                "during the optimizer step); amp-bf16 keeps fp32 master weights at 16 (20), and keeps the small "
                "updates that bf16 weights round away")
    if method == "lora" and precision.startswith("amp-"):
        return (f"{precision} keeps the frozen weights in fp32 (4 bytes per parameter); LoRA's adapters are fp32 "
                f"in every mode, so {precision.removeprefix('amp-')} holds the same adapters with half the "
                "weights' memory")
    return None
