"""Units, in one place: 1024-based sizes labelled GiB / MiB, decimal GB where a vendor or a cloud
counts that way, and their display. Bytes are ints everywhere; conversion happens only here, at
display time (torchtune's training/memory.py keeps the same rule). A foundation: imports nothing.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3
GB = 1000**3  # decimal: a card's marketed size ("80GB"), a cloud's disk_size


def gib(b: int | float, digits: int = 2) -> str:
    """Bytes as a GiB number string, e.g. '12.34' (no unit; tables put it in the header)."""
    return f"{b / GIB:,.{digits}f}"


def gib_str(b: int | float, digits: int = 2) -> str:
    """Bytes with the unit, e.g. '12.34 GiB'."""
    return f"{gib(b, digits)} GiB"


def mib_or_gib(b: int | float | None) -> str:
    """A size for a person: MiB below a quarter GiB, else GiB; 'n/a' for None."""
    if b is None:
        return "n/a"
    return f"{b / GIB:.2f} GiB" if b >= GIB / 4 else f"{b / MIB:.1f} MiB"


def duration(hours: float) -> str:
    """'3.2 h' or '12 min' (display only)."""
    return f"{hours:,.1f} h" if hours >= 1 else f"{max(hours * 60, 1):.0f} min"
