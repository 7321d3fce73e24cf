"""events.jsonl: one JSON object per line, appended and flushed line by line.

The runner writes it, the TUI and ``tuneplan run`` tail it. A line is written with a single
``write`` of the whole line (newline included) and flushed at once, so a run killed at any moment
leaves a file of complete JSON lines plus, at worst, one half-written last line, which
:func:`read_events` leaves for the next call. Light imports only (the TUI imports this module).

Event types and their keys (docs/runner.md has the full schema):
``start`` ``step`` ``memory`` ``eval`` ``checkpoint`` ``end`` ``error``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
MEMORY_KEYS = ("torch_allocated", "torch_reserved", "torch_peak", "nvml_used", "rss")
EVENT_TYPES = ("start", "step", "memory", "eval", "checkpoint", "end", "error")


class EventWriter:
    """Append events to ``run_dir/events.jsonl``; thread-safe (the memory monitor writes too)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled
        self._lock = threading.Lock()
        self._fh = None
        if enabled:
            from advisor.safefile import open_append

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open_append(self.path)  # never through a link (closed in close())
            if _ends_mid_line(self.path):  # a killed writer's half line: end it, so our first event stands alone
                self._fh.write("\n")
                self._fh.flush()

    def emit(self, type: str, **fields: Any) -> dict:
        event = {"type": type, "time": time.time(), **fields}
        if self._fh is None:
            return event
        line = json.dumps(event, default=_jsonable, allow_nan=False) + "\n"
        with self._lock:
            if self._fh is not None:
                self._fh.write(line)
                self._fh.flush()
        return event

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                try:
                    os.fsync(self._fh.fileno())
                except OSError:
                    pass
                self._fh.close()
                self._fh = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def _jsonable(x: Any) -> Any:
    """NaN/inf are not JSON: events carry null instead (allow_nan=False catches the rest)."""
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def clean_number(x: float | None) -> float | None:
    """A float for an event: None for NaN/inf (JSON has no such numbers)."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended since byte ``offset``, and the offset to pass next time.

    Only complete lines are read; a half-written last line (the writer is mid-line or was killed
    there) stays for the next call. A complete line that is not JSON is skipped. A missing file is
    no events yet.
    """
    path = Path(run_dir)
    if path.is_dir() or not path.name.endswith(".jsonl"):
        path = path / EVENTS_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events, offset + end + 1
