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


# --- the Chat screen: a run loaded in a worker, replies streamed token by token ---------------------------

@dataclass
class ChatOpened(Message):
    """The run directory was read (runner.tuned.TunedRun) and "serve this" worked out; the models load next."""

    key: int  # which load this belongs to (a newer load makes older messages stale)
    run: Any
    serve: Any = None  # advisor.tui.serve_this.ServeThis
    serve_error: str | None = None


@dataclass
class ChatLoaded(Message):
    key: int
    session: Any  # runner.chat.ChatSession
    seconds: float


@dataclass
class ChatFailed(Message):
    """Why the run cannot be used or loaded: the UserError's text."""

    key: int
    text: str


@dataclass
class ChatChunk(Message):
    """The reply so far (the whole text, not the last piece: a newer chunk of the same reply replaces it)."""

    turn: int
    which: str  # "tuned" or "base"
    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ChatChunk) and (message.turn, message.which) == (self.turn, self.which)


@dataclass
class ChatReplied(Message):
    """A reply ended: its text, its stats (runner.chat.ReplyStats.as_dict) or the error that ended it."""

    turn: int
    which: str
    text: str
    stats: dict[str, Any] | None
    error: str | None = None
    last: bool = True  # the worker has finished (the session is free for the next prompt)


# --- after the run (the Chat screen's Eval and Export tabs): runner.api in a worker -------------------------

@dataclass
class EvalProgress(Message):
    """What the evaluation is doing now (runner.evaluate's progress words); a newer one replaces it."""

    key: int  # which run this belongs to (opening another run makes older messages stale)
    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EvalProgress) and message.key == self.key


@dataclass
class EvalDone(Message):
    """An evaluation's result (eval.json's object), or the run's eval.json read when it opened, or why not."""

    key: int
    result: dict[str, Any] | None
    where: str | None = None  # what was written ("wrote RUN_DIR/eval.json; report.json has it under 'eval'")
    error: str | None = None
    ran: bool = False  # from the Evaluate button (written just now), not the eval.json read on opening the run


@dataclass
class ExportChecked(Message):
    """What an export will need (runner.export.ExportPlan.words: RAM, disk, time), or the one line why not."""

    key: int
    check: int  # which check of this run (the choices changed since: stale)
    lines: list[str] | None
    error: str | None = None


@dataclass
class ExportProgress(Message):
    key: int
    text: str


@dataclass
class ExportDone(Message):
    """What the export wrote (runner.api.export_run), or why it failed; "serve this" for the folder it wrote."""

    key: int
    done: dict[str, Any] | None
    error: str | None = None
    serve: Any = None  # advisor.tui.serve_this.ServeThis for the export
