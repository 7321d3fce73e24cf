"""How a run ends when it does not complete: stop requests, errors, exit codes.

SIGTERM and SIGINT ask :class:`runner.recipe.Recipe`'s loop to stop after the current step
(:class:`RunStopped`; it then checkpoints); a second Ctrl-C stops at once (a second SIGTERM does not:
schedulers signal every process and tuneplan forwards the signal too). Any other failure becomes
one ``error`` event and a ``report.json`` with a kind the screens explain (``oom``, ``data``,
``model``, ``plan``, ``disk``, ``interrupted``, ``runtime``), one message, and for an out-of-memory
error the command of a smaller plan (:func:`runner.launch.next_plan`).
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from pathlib import Path

from advisor.problems import Problems
from runner.checkpoint import CheckpointError
from runner.events import EventWriter
from runner.modeldir import ModelLoadError

EXIT_INTERRUPTED = 130
EXIT_FAILED = 1


class RunStopped(Exception):
    """A stop was requested (SIGTERM, Ctrl-C): the loop ends after this step and checkpoints."""


class LossDiverged(Exception):
    """The loss (or, without a gradient scaler, the gradient norm) of a step is not a finite number:
    the weights this step produced are not saved, and the run stops with advice."""

    def __init__(self, step: int, loss: float | None, grad_norm: float | None = None, what: str | None = None):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        parts = [f"loss {_num(loss)}"] + ([f"gradient norm {_num(grad_norm)}"] if grad_norm is not None else [])
        super().__init__(f"the loss diverged at step {step} ({what or ', '.join(parts)})")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"  # nan, inf and -inf print as such


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


def outcome_code(run_dir: Path, launcher_rc: int, since: int = 0) -> int:
    """The exit code of a run launched on several processes, from what rank 0 wrote last (the launcher's
    own when nothing): 0 completed, 130 interrupted, 2 a mistake in the plan or data (rank 0 printed
    it), 1 a failure. ``since``: the size of events.jsonl before the launch (earlier sessions' events
    say nothing about this one)."""
    from runner.events import read_events

    last = None
    for e in read_events(run_dir, since)[0]:
        if e.get("type") in ("start", "end", "error"):
            last = e
    if last is None or last.get("type") == "start":
        return launcher_rc
    if last["type"] == "end":
        return {"completed": 0, "interrupted": EXIT_INTERRUPTED}.get(str(last.get("status")), launcher_rc)
    return {"data": 2, "plan": 2, "model": 2, "interrupted": EXIT_INTERRUPTED}.get(str(last.get("kind")),
                                                                                   EXIT_FAILED)


def install_signal_handlers(recipe):
    """SIGTERM and SIGINT ask the loop to stop after the current step (it then checkpoints); the
    handlers they replace, to give back (None off the main thread, where signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if recipe.stop_requested:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # SIGTERM again (a scheduler signals every process, tuneplan forwards it too): keep saving
        recipe.stop_requested = signal.Signals(signum).name
        recipe.log(f"{recipe.stop_requested}: finishing this step, then saving a checkpoint"
                   + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))

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
    elif isinstance(e, LossDiverged):
        kind = "diverged"
    elif is_disk_full(e):
        kind = "disk"
    elif isinstance(e, DataError):
        kind = "data"
    elif isinstance(e, (ModelLoadError, CheckpointError)):
        kind = "model"
    elif isinstance(e, Problems):
        kind = "plan"
    elif isinstance(e, KeyboardInterrupt):
        kind = "interrupted"
    else:
        kind = "runtime"
    if isinstance(e, (DataError, Problems)):
        message = "; ".join(e.problems)
    elif kind == "interrupted":
        message = "stopped at once (a second Ctrl-C) while the run was starting or saving"
    elif kind == "disk":
        where = _disk_full_file(e)
        message = (f"no space left on the device{f' writing {where}' if where else ''}; free some "
                   "(older checkpoints go with a smaller run.keep_checkpoints), then resume")
    else:
        message = (str(e).splitlines() or [""])[0] or type(e).__name__
    return kind, message


# What a full disk looks like from each writer: OSError's errno (Python), torch.save's stream writer
# ("PytorchStreamWriter failed writing file ...: file write failed", errno lost), safetensors' Rust
# error ("IoError(Os { code: 28, kind: StorageFull, ... })").
_DISK_WORDS = ("no space left on device", "storagefull", "disk quota exceeded", "quotaexceeded")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """A write failed because the disk (or the quota) is full, whoever wrote: Python, torch.save,
    safetensors; also a torch.save write failure while the run directory's disk has no room left."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x).lower()
        if any(w in text for w in _DISK_WORDS):
            return True
    return False


def _disk_full_file(e: BaseException) -> str | None:
    for x in _chain(e):
        if isinstance(x, OSError) and x.filename:
            return str(x.filename)
    return None


def divergence_advice(recipe, e: LossDiverged) -> dict:
    """After a diverged loss: what to change, as a command that works. A quarter of the learning rate,
    gradient clipping at 1.0 where it was off (both resume from the newest checkpoint, which holds
    only finite weights), and mixed precision instead of pure fp16 (a new run: it changes the
    checkpoint's dtype)."""
    import shlex

    from runner.checkpoint import latest_checkpoint

    plan, t = recipe.plan, recipe.plan.training
    changes: dict = {"training.learning_rate": float(f"{t.learning_rate / 4:.3g}")}
    why = [f"a quarter of the learning rate ({t.learning_rate:g} -> {changes['training.learning_rate']:g})"]
    if not plan.run.max_grad_norm:
        changes["run.max_grad_norm"] = 1.0
        why.append("gradient clipping at 1.0 (it was off)")
    if t.precision == "fp16":
        changes["training.precision"] = "amp-fp16"
        why.append("amp-fp16 instead of pure fp16 (fp32 master weights and a loss scaler; pure fp16 AdamW "
                   "under- and overflows)")
    words = [f"{k}={v}" for k, v in changes.items()]
    ck = latest_checkpoint(recipe.run_dir)
    if ck is not None and "training.precision" not in changes:
        cmd = ["tuneplan", "run", "--resume", str(recipe.run_dir), *words]
        what = f"resume from {ck.name} (its weights are finite) with " + " and ".join(why)
    else:
        retry = recipe.run_dir.with_name(recipe.run_dir.name + "-retry") if ck is not None else recipe.run_dir
        cmd = ["tuneplan", "run", str(recipe.run_dir / "plan.yaml"), *words, "--run-dir", str(retry)]
        what = ("start again" + (" in a new run directory" if ck is not None else "") + " with " + " and ".join(why))
    return {"command": shlex.join(cmd), "changes": changes, "what": what,
            "last_checkpoint": str(ck) if ck is not None else None}


def _retry_suggestion(recipe, peak: int | None) -> dict:
    """After an out-of-memory error: the command of the next smaller plan (runner.launch.next_plan)."""
    try:
        from runner.launch import next_plan
        from runner.rundir import retry_command

        return retry_command(recipe.run_dir, next_plan(recipe.plan, recipe.run_dir, getattr(recipe, "shape", None),
                                                       peak))
    except Exception as err:  # noqa: BLE001 - the advice must never hide the error itself
        return {"command": None, "changes": {}, "note": f"no suggestion: {err}"}


def next_after(recipe, e: BaseException) -> dict | None:
    """What to type after this failure: after a checkpoint that cannot be used, set it aside and resume
    from the one before it (never the same failing resume); otherwise runner.rundir.next_command."""
    ck = getattr(e, "checkpoint", None)
    if isinstance(e, CheckpointError) and ck is not None and Path(ck).parent.name == "checkpoints":
        import shlex

        aside = recipe.run_dir / f"damaged-{Path(ck).name}"
        before = [c for c in Path(ck).parent.glob("step-*") if c != Path(ck) and (c / "state.json").is_file()]
        then = (f"resume from {max(before, key=lambda c: int(c.name[5:])).name}" if before else
                "nothing left to resume: the run starts again from step 0")
        return {"command": f"{shlex.join(['mv', str(ck), str(aside)])} && "
                           f"{shlex.join(['tuneplan', 'run', '--resume', str(recipe.run_dir)])}",
                "what": f"set {Path(ck).name} aside, then {then}"}
    return recipe.next_step("failed")


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
    suggestion = None
    if kind == "oom":
        suggestion = _retry_suggestion(recipe, peak)
    elif kind == "diverged":
        suggestion = divergence_advice(recipe, e)
        message += (f"; the last good checkpoint is {Path(suggestion['last_checkpoint']).name}"
                    if suggestion["last_checkpoint"] else "; no checkpoint was written before it")
    recipe.error = {"kind": kind, "message": message, "measured_peak": peak, "suggestion": suggestion,
                    "next": next_after(recipe, e)}
    try:
        if recipe.events is None:
            recipe.run_dir.mkdir(parents=True, exist_ok=True)
            recipe.events = EventWriter(recipe.run_dir)
        recipe.events.emit("error", **recipe.error)
        if kind == "runtime":
            from advisor.safefile import write_atomic

            write_atomic(recipe.run_dir / "traceback.txt", "".join(traceback.format_exception(e)), durable=False)
    except OSError:
        pass
    try:
        rep = recipe.report("failed")
        rep["error"] = recipe.error
        if recipe.is_main:
            write_json(recipe.run_dir / "report.json", rep)
    except Exception:  # noqa: BLE001 - a report that cannot be written must not hide the error
        pass
