"""Which GPU generation a card belongs to, and the share of its tensor peak a training step reaches there.

The step-time model (advisor/throughput.py) takes each card's dense half-precision peak and memory
bandwidth from the GPU table; what differs between generations is how much of that peak the kernels
of a training step reach. FlashAttention-2 and cuBLAS reach a larger share of an A100's peak than of
an H100's (FA2: about 70% of the A100's forward peak, about 35% of the H100's; Dao 2023, Shah et al.
2024, FlashAttention-3, section 1), so Hopper gets its own share, fitted on llm-foundry's paired
A100 / H100 runs (benchmarks/throughput.py, stage C). The other generations have no calibration
row: each borrows the share of the calibrated generation whose kernels it runs (Ada and the GA10x
Ampere cards run the same mma.sync kernels as the A100; Blackwell runs Hopper's), and the time
range says so and widens (advisor.throughput.time_range).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from advisor.gpus import Gpu

# (pattern matched against the card's id and name, generation); the most specific pattern first
GENERATIONS: tuple[tuple[str, str], ...] = (
    (r"rtx[- ]?pro.*blackwell|blackwell|\bb200\b|\bb100\b|gb200|rtx[- ]?50\d\d", "blackwell"),
    (r"\bh100|\bh200|\bgh200|\bh800|\bh20\b", "hopper"),
    (r"6000[- ]?ada|[- ]ada\b|\bl4\b|\bl40|rtx[- ]?40\d\d", "ada"),
    (r"\ba100|\ba30\b|\ba800", "ampere"),
    (r"\ba10g?\b|\ba40\b|rtx[- ]?30\d\d|rtx[- ]?a\d000", "ampere-ga10x"),
    (r"\bt4\b|rtx[- ]?20\d\d|titan rtx|quadro rtx", "turing"),
    (r"\bv100", "volta"),
    (r"\bmi\d{3}", "cdna"),
    (r"apple|\bm\d (max|ultra|pro)", "apple"),
)
# generation -> what its share rests on; only these have calibration rows
CALIBRATED = {"ampere": "A100 runs (fms-acceleration, Qwen README, llm-foundry)",
              "hopper": "H100 runs (llm-foundry, against the same settings on A100)"}
# uncalibrated generation -> the calibrated one whose share it borrows, and why
BORROWS = {
    "ampere-ga10x": ("ampere", "GA10x cards run the A100's mma.sync kernels"),
    "ada": ("ampere", "Ada runs the A100's mma.sync kernels (no wgmma)"),
    "turing": ("ampere", "no calibration row for Turing"),
    "volta": ("ampere", "no calibration row for Volta"),
    "blackwell": ("hopper", "no calibration row for Blackwell"),
    "cdna": ("hopper", "no calibration row for AMD Instinct"),
    "apple": ("ampere", "no calibration row for Apple GPUs (no tensor cores; MPS)"),
    "unknown": ("ampere", "a card the generation table does not know"),
}
NAMES = {"ampere": "Ampere", "ampere-ga10x": "Ampere (GA10x)", "ada": "Ada", "turing": "Turing", "volta": "Volta",
         "hopper": "Hopper", "blackwell": "Blackwell", "cdna": "AMD CDNA", "apple": "Apple", "unknown": "unknown"}


def generation(gpu: Gpu) -> str:
    """The card's generation (a key of NAMES), matched on its id, then its name; 'unknown' when neither matches."""
    for text in (gpu.id, gpu.name):
        t = text.lower()
        for pattern, gen in GENERATIONS:
            if re.search(pattern, t):
                return gen
    return "unknown"


def share(gen: str, c: dict[str, float]) -> float:
    """Share of the calibrated (A100) tensor efficiency this generation reaches: 1 for Ampere, the fitted
    HOPPER_SHARE for Hopper, the borrowed generation's for the rest."""
    base = gen if gen in CALIBRATED else BORROWS.get(gen, BORROWS["unknown"])[0]
    return c["HOPPER_SHARE"] if base == "hopper" else 1.0


def is_calibrated(gen: str) -> bool:
    return gen in CALIBRATED


def why_not(gen: str) -> str:
    """Why this generation's share is borrowed (for the assumptions line)."""
    base, why = BORROWS.get(gen, BORROWS["unknown"])
    return f"{NAMES.get(gen, gen)} not calibrated: the {NAMES[base]} share is assumed ({why})"
