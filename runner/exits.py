"""How a run ends when it does not complete: stop requests, errors, exit codes.

SIGTERM and SIGINT ask :class:`runner.recipe.Recipe`'s loop to stop after the current step
(:class:`RunStopped`; it then checkpoints); a second Ctrl-C stops at once. Any other failure becomes
one ``error`` event and a ``report.json`` with a kind the screens explain (``oom``, ``data``,
``model``, ``plan``, ``disk``, ``interrupted``, ``runtime``), one message, and for an out-of-memory
error the command of a smaller plan (:func:`runner.launch.next_plan`).
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback

from advisor.problems import Problems
from runner.checkpoint import CheckpointError
from runner.events import EventWriter
from runner.modeldir import ModelLoadError

EXIT_INTERRUPTED = 130
EXIT_FAILED = 1


class RunStopped(Exception):
    """A stop was requested (SIGTERM, Ctrl-C): the loop ends after this step and checkpoints."""


# What allocators say when they fail: CUDA's and other backends' ("out of memory"), torch's CPU
# allocator (c10 alloc_cpu.cpp: "DefaultCPUAllocator: can't allocate memory" / "not enough memory")
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    """Out of memory on the GPU or the host: torch's OutOfMemoryError, an allocator's RuntimeError that
    says so (the CPU allocator, older torch, other backends), or Python's MemoryError."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def install_signal_handlers(recipe):
    """SIGTERM and SIGINT ask the loop to stop after the current step (it then checkpoints); the
    handlers they replace, to give back (None off the main thread, where signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if recipe.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        recipe.stop_requested = signal.Signals(signum).name
        recipe.log(f"{recipe.stop_requested}: finishing this step, then saving a checkpoint "
                   "(again to stop at once)")

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    return previous


def restore_signal_handlers(previous) -> None:
    if previous:
        for s, h in previous.items():
            signal.signal(s, h)


def classify(e: BaseException) -> tuple[str, str]:
    """The error's kind and its one message."""
    from runner.data import DataError

    if is_oom(e):
        kind = "oom"
    elif isinstance(e, DataError):
        kind = "data"
    elif isinstance(e, (ModelLoadError, CheckpointError)):
        kind = "model"
    elif isinstance(e, Problems):
        kind = "plan"
    elif isinstance(e, KeyboardInterrupt):
        kind = "interrupted"
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        kind = "disk"
    else:
        kind = "runtime"
    if isinstance(e, (DataError, Problems)):
        message = "; ".join(e.problems)
    elif kind == "interrupted":
        message = "stopped at once (a second Ctrl-C) while the run was starting or saving"
    elif kind == "disk":
        message = (f"no space left on the device{f' writing {e.filename}' if e.filename else ''}; free some "
                   "(older checkpoints go with a smaller run.keep_checkpoints), then resume")
    else:
        message = (str(e).splitlines() or [""])[0] or type(e).__name__
    return kind, message


def _retry_suggestion(recipe, peak: int | None) -> dict:
    """After an out-of-memory error: the command of the next smaller plan (runner.launch.next_plan)."""
    try:
        from runner.launch import next_plan
        from runner.rundir import retry_command

        return retry_command(recipe.run_dir, next_plan(recipe.plan, recipe.run_dir, getattr(recipe, "shape", None),
                                                       peak))
    except Exception as err:  # noqa: BLE001 - the advice must never hide the error itself
        return {"command": None, "changes": {}, "note": f"no suggestion: {err}"}


def record_error(recipe, e: BaseException) -> None:
    """The ``error`` event, traceback.txt for an unexpected error, and report.json: best effort,
    since the disk may be full and the error itself must still reach the user."""
    from runner.report import write_json

    recipe.stop_sampling()
    kind, message = classify(e)
    peak = None
    if kind == "oom":
        measured = recipe.measured()
        if measured:
            peak = measured["torch_peak_allocated"] or measured["nvml_peak"] or measured["rss_peak"]
    recipe.error = {"kind": kind, "message": message, "measured_peak": peak,
                    "suggestion": _retry_suggestion(recipe, peak) if kind == "oom" else None,
                    "next": recipe.next_step("failed")}
    try:
        if recipe.events is None:
            recipe.run_dir.mkdir(parents=True, exist_ok=True)
            recipe.events = EventWriter(recipe.run_dir)
        recipe.events.emit("error", **recipe.error)
        if kind == "runtime":
            (recipe.run_dir / "traceback.txt").write_text("".join(traceback.format_exception(e)))
    except OSError:
        pass
    try:
        rep = recipe.report("failed")
        rep["error"] = recipe.error
        if recipe.is_main:
            write_json(recipe.run_dir / "report.json", rep)
    except Exception:  # noqa: BLE001 - a report that cannot be written must not hide the error
        pass
