"""The app's side of a run: following its events (through :mod:`runner.api`, the one runner module the
app imports) and its state folded from them.

Nothing here trains or measures. ``RunState.apply`` is pure, so tests feed it events directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner import api as runner_api


def follow_events(run_dir: str, on_events, cancelled, exited=None, interval: float = 0.5, own_session: bool = False):
    """Tail RUN_DIR/events.jsonl until `cancelled()`; call `on_events(list)` with each new batch.
    With `exited` (returns the process's exit code or None), stop once the run has exited or
    written its end/error event, after reading what it wrote last; returns that exit code.
    ``own_session``: the process was just started on a directory with earlier sessions (a resume): their
    events are passed on first, and only an end of this session stops the tail.
    Runs in a worker thread (it sleeps between reads)."""
    import time

    offset = 0
    if own_session:
        events, offset = runner_api.read_events(run_dir, 0)
        if events:
            on_events(events)
    while not cancelled():
        events, offset = runner_api.read_events(run_dir, offset)
        if events:
            on_events(events)
        if exited is not None:
            code = exited()
            if code is not None or any(e.get("type") in ("end", "error") for e in events):
                events, offset = runner_api.read_events(run_dir, offset)  # what it wrote before exiting
                if events:
                    on_events(events)
                return code
        time.sleep(interval)
    return None


@dataclass
class RunState:
    run_dir: str
    predicted: dict[str, int] = field(default_factory=dict)
    total_steps: int | None = None
    step: int = 0
    epoch: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    tokens_per_s: float | None = None
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)  # the 'memory' objects, in order
    checkpoints: list[str] = field(default_factory=list)
    status: str = "waiting for the first event"
    report: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None  # runner.speed's check: measured vs predicted speed, the job re-projected

    @property
    def finished(self) -> bool:
        return self.report is not None or self.error is not None or self.status in ("finished", "failed", "stopped")

    def apply(self, events: list[dict[str, Any]]) -> None:
        """Fold events into the state. Events come from a file anyone can edit: a value of the wrong type
        is dropped (a number that is not one, a report that is not a mapping), never raised."""
        for e in events:
            if not isinstance(e, dict):
                continue
            kind = e.get("type")
            if kind == "start":  # a session (a resume starts another): its end is what counts
                self.started, self.report, self.error = e, None, None
                self.predicted = {k: v for k, v in _mapping(e.get("predicted")).items() if _number(v) is not None}
                self.total_steps = _count(e.get("total_steps"))
                self.status = "running"
            elif kind == "step":
                self.step = _count(e.get("step")) or self.step
                self.epoch, self.eta_s = _number(e.get("epoch")), _number(e.get("eta_s"))
                self.elapsed_s, self.tokens_per_s = _number(e.get("elapsed_s")), _number(e.get("tokens_per_s"))
                if _number(e.get("loss")) is not None:
                    self.losses.append(_number(e["loss"]))
                if _mapping(e.get("memory")):
                    self.memory.append(_mapping(e["memory"]))
                if _mapping(e.get("speed")).get("words"):
                    self.speed = _mapping(e["speed"])
                self.status = "running"
            elif kind == "memory" and _mapping(e.get("memory")):
                self.memory.append(_mapping(e["memory"]))
            elif kind == "eval" and _number(e.get("val_loss")) is not None:
                self.val_losses.append((_count(e.get("step")) or 0, _number(e["val_loss"])))
            elif kind == "checkpoint":
                self.checkpoints.append(str(e.get("path")))
            elif kind == "end":
                self.status = str(e.get("status") or "finished")
                self.report = e.get("report") if isinstance(e.get("report"), dict) else self.report
                if _mapping(_mapping(self.report).get("speed")).get("words"):
                    self.speed = _mapping(self.report["speed"])
            elif kind == "error":
                self.error = {k: v for k, v in e.items() if k != "suggestion" or isinstance(v, dict)}
                self.status = "failed"

    def series(self, key: str) -> list[float]:
        return [x for x in (_number(m.get(key)) for m in self.memory) if x is not None]

    def load_report(self) -> None:
        """report.json in the run directory (written at the end), if the end event did not carry it."""
        import json
        from pathlib import Path

        path = Path(self.run_dir) / "report.json"
        if self.report is None and path.is_file():
            try:
                self.report = json.loads(path.read_text())
            except (OSError, ValueError):
                pass


def _number(v: Any) -> float | None:
    """A finite number from an event, or None (a string, a bool, a null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
        return None
    return float(v)


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _mapping(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}
