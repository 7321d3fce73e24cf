"""Messages that workers post to screens. Frequent samples say so with can_replace: stale ones drop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class SimProgress(Message):
    fraction: float
    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SimProgress)


@dataclass
class SimDone(Message):
    result: dict[str, Any] | None
    error: str | None = None


@dataclass
class RunEvents(Message):
    """New lines of a run's events.jsonl (never replaced: every step counts)."""

    run_dir: str
    events: list[dict[str, Any]]


@dataclass
class RunExited(Message):
    run_dir: str
    returncode: int | None


@dataclass
class MemorySample(Message):
    """One poll of the machine: NVML devices (None without a GPU) and system memory."""

    gpus: list[Any] | None
    system: Any
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MemorySample)
