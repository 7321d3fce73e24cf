"""The run directory's guard and life cycle: one writer at a time, nothing overwritten that is not the run's.

A run directory is always in one of these states (:func:`inspect`), and each says what works next:

- new (absent or empty): ``tuneplan run PLAN --run-dir D`` starts it;
- restartable (a run that stopped before its first checkpoint): ``tuneplan run PLAN --run-dir D``
  or ``tuneplan run --resume D`` start it again from step 0; the earlier attempt's events and
  report move to ``D/attempts/N/``;
- resumable (a checkpoint and steps left): ``tuneplan run --resume D [run.max_steps=M]``;
- finished: only ``--resume D run.max_steps=M`` with M above the steps done trains further;
- busy: another process holds ``D/run.lock``; everything is refused until it ends.

The lock is an exclusive ``flock`` on ``D/run.lock`` held for the whole run; the file names the
owner (PID, host, start time, command) for the message others get. The kernel drops the lock when
the owner dies, however it dies (SIGKILL included), so a stale lock is taken over by the next run
without anyone deleting anything. Where the file system has no flock, the PID is checked instead.

A run directory must not contain, or be inside, the model directory it trains from (saving
``model/`` or ``checkpoints/`` would overwrite it), and a directory that is not a run's (no
``events.jsonl``) but holds files a run writes (``plan.yaml``, ``model/``, ``adapter/``...) is
refused rather than overwritten. Nothing is written through a symbolic link: a run directory whose
run-written names (:data:`WRITTEN`) are links, or with a link anywhere under ``checkpoints/`` or
``attempts/``, is refused before anything is loaded (:func:`link_problems`), and the files written in
place are opened with ``O_NOFOLLOW`` (:mod:`advisor.safefile`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.problems import Problem, Problems

LOCK_FILE = "run.lock"
EVENTS_FILE = "events.jsonl"
REPORT_FILE = "report.json"
ATTEMPTS = "attempts"
# What a run writes into its directory (a foreign directory holding any of these is not overwritten).
RUN_NAMES = ("plan.yaml", REPORT_FILE, "checkpoints", "adapter", "model", "merged", "traceback.txt")
# What one attempt leaves that a restart moves aside (the checkpoints folder holds no checkpoint then).
ATTEMPT_FILES = (EVENTS_FILE, REPORT_FILE, "traceback.txt")
# Every name a run (or `tuneplan eval` / `export` after it) writes directly in its directory: none may
# be a symbolic link, or the write would land wherever the link points.
WRITTEN = (LOCK_FILE, EVENTS_FILE, *RUN_NAMES, ATTEMPTS, "accelerate_config.yaml", "run.log", "eval.json",
           ".tmp-adapter", ".tmp-model", ".tmp-merged", ".old-adapter", ".old-model", ".old-merged")
# Folders a run fills and deletes in: no link anywhere below them.
WRITTEN_TREES = ("checkpoints", ATTEMPTS)


def default_run_name(plan) -> str:
    ref = plan.model.ref.rstrip("/").replace("\\", "/")
    short = ref.split("/")[-1] or "model"
    short = "".join(c if c.isalnum() or c in "-_." else "-" for c in short)
    return f"{short}-{plan.training.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_run_dir(plan) -> Path:
    return Path(plan.run.output_dir) / (plan.run.name or default_run_name(plan))


# --- the lock --------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _owner_alive(owner: dict[str, Any] | None) -> bool:
    """Without flock: the owner named in the file is alive (on this host; another host's is assumed alive)."""
    if not owner or owner.get("pid") == os.getpid():
        return False
    if owner.get("host") != socket.gethostname():
        return True
    return _alive(owner["pid"])


def busy_problem(run_dir: Path, owner: dict[str, Any] | None) -> Problem:
    who = (f"process {owner['pid']} on {owner.get('host', '?')} (started "
           f"{time.strftime('%H:%M:%S', time.localtime(owner.get('started', 0)))})") if owner else "another process"
    return Problem(f"run directory {run_dir} is in use by {who}", None,
                   "wait for that run to end or stop it (SIGTERM checkpoints it), then --resume it; "
                   "or choose another --run-dir")


class RunLock:
    """The exclusive right to write one run directory (see the module doc). ``release`` when done."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: str | Path, command: list[str] | None = None) -> RunLock:
        """Take the lock or raise Problems naming its owner. Creates the directory."""
        import fcntl

        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        from advisor.safefile import LinkRefused, open_nofollow

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644)
        except LinkRefused:
            raise Problems(link_problem(run_dir, [LOCK_FILE])) from None
        except OSError as e:
            raise Problems(Problem(f"cannot write the run directory {run_dir}: {e.strerror or e}", None,
                                   "give a --run-dir (or run.output_dir) you can write")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Problems(busy_problem(run_dir, _read_owner(path))) from None
        except OSError:  # no flock on this file system: the PID in the file decides
            if _owner_alive(_read_owner(path)):
                os.close(fd)
                raise Problems(busy_problem(run_dir, _read_owner(path))) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                 "command": [str(c) for c in (command or [])][:40]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: no owner
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The live owner of ``run_dir``'s lock ({} when unknown), or None when nobody (or this process) holds it."""
    import fcntl

    from advisor.safefile import open_nofollow

    path = Path(run_dir) / LOCK_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(path)
        return None if owner and owner["pid"] == os.getpid() else (owner or {})
    except OSError:
        owner = _read_owner(path)
        return owner if _owner_alive(owner) else None
    finally:
        os.close(fd)  # also drops the shared lock taken just to test
    return None


# --- the state of a run directory --------------------------------------------------------------

@dataclass
class RunDirState:
    path: Path
    is_file: bool = False
    is_run: bool = False  # events.jsonl exists: a run wrote here
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    finished_steps: int | None = None  # the last session completed, with this many steps
    owner: dict[str, Any] | None = None  # the live lock holder
    foreign: list[str] = field(default_factory=list)  # run-written names in a directory that is no run's

    @property
    def finished(self) -> bool:
        return self.finished_steps is not None


def inspect(run_dir: str | Path) -> RunDirState:
    """What ``run_dir`` holds, read only."""
    from runner.checkpoint import latest_checkpoint, step_of

    d = Path(run_dir)
    st = RunDirState(d)
    if d.exists() and not d.is_dir():
        st.is_file = True
        return st
    if not d.is_dir():
        return st
    # a run wrote here: its events, or an earlier attempt moved aside (a restart killed midway leaves
    # attempts/ with the events and the rest of that attempt's files still here)
    st.is_run = (d / EVENTS_FILE).is_file() or (d / ATTEMPTS).is_dir()
    st.owner = holder(d)
    ck = latest_checkpoint(d)
    if ck is not None:
        st.checkpoint, st.checkpoint_step = ck, step_of(ck)
    if not st.is_run:
        st.foreign = [n for n in RUN_NAMES if (d / n).exists()]
    try:
        rep = json.loads((d / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        rep = None
    if isinstance(rep, dict) and rep.get("status") == "completed" and isinstance(rep.get("steps"), int):
        if st.checkpoint_step is None or rep["steps"] >= st.checkpoint_step:
            st.finished_steps = rep["steps"]
    return st


def links_in(run_dir: str | Path) -> list[str]:
    """The run-written names in ``run_dir`` that are symbolic links, and any link under checkpoints/ or
    attempts/ (relative paths); also checkpoints/ when it resolves outside the run directory."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [n for n in WRITTEN if os.path.islink(d / n)]
    for tree in WRITTEN_TREES:
        root = d / tree
        if root.is_symlink() or not root.is_dir():
            continue
        if not is_inside(root.resolve(), d.resolve()):
            found.append(tree)
            continue
        for here, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                p = Path(here) / name
                if p.is_symlink():
                    found.append(str(p.relative_to(d)))
    return found


def link_problem(run_dir: Path, names: list[str]) -> Problem:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return Problem(f"run directory {run_dir} has symbolic links where a run writes its own files ({shown}); "
                   "tuneplan never writes through a link (it would change files outside the run directory)", None,
                   f"remove the links (rm {shlex.quote(str(Path(run_dir) / names[0]))}) or choose another --run-dir")


def _unwritable(d: Path) -> str | None:
    """Why ``d`` (or the folder it would be created in) cannot be written, or None."""
    p = d.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable" if p == d.absolute() else f"{p} does not exist or is not writable"
    return None


def is_inside(a: Path, b: Path) -> bool:
    """a is b or below it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check(run_dir: str | Path, plan, *, resume: bool) -> RunDirState:
    """Every reason ``run_dir`` must not be written by this run (Problems), or its state.

    Read only: the same checks run again under the lock when the run starts."""
    from runner.modeldir import looks_local

    d = Path(run_dir)
    st = inspect(d)
    if st.is_file:
        raise Problems(Problem(f"run directory {d} is a file", None, "give a directory (it is created if missing)"))
    problems: list[Problem] = []
    links = links_in(d)
    if links:
        problems.append(link_problem(d, links))
    why = _unwritable(d)
    if why:
        problems.append(Problem(f"cannot write the run directory {d}: {why}", None,
                                "give a --run-dir (or run.output_dir) you can write"))
    if looks_local(plan.model.ref):
        model = Path(plan.model.ref).expanduser().resolve()
        here = d.resolve()
        if is_inside(model, here):
            problems.append(Problem(f"run directory {d} contains the model directory {plan.model.ref} it trains "
                                    "from (the run writes model/, adapter/ and checkpoints/ there)", None,
                                    "choose a run directory outside the model directory"))
        elif is_inside(here, model):
            problems.append(Problem(f"run directory {d} is inside the model directory {plan.model.ref} it trains "
                                    "from", None, "choose a run directory outside the model directory"))
    if st.owner is not None:
        problems.append(busy_problem(d, st.owner or None))
    elif resume:
        max_steps = plan.run.max_steps
        if st.finished and st.checkpoint is None:
            problems.append(Problem(f"{d} holds a finished run ({st.finished_steps} steps) with no checkpoint to "
                                    "continue from", None, "start a new run (another --run-dir or run.name)"))
        elif st.finished and (not max_steps or max_steps <= (st.finished_steps or 0)):
            problems.append(Problem(f"{d} holds a finished run ({st.finished_steps} steps); there is nothing "
                                    "to resume", None,
                                    f"to train it further, resume with run.max_steps above {st.finished_steps}"))
        elif st.checkpoint_step is not None and max_steps and max_steps <= st.checkpoint_step:
            problems.append(Problem(f"the newest checkpoint of {d} is at step {st.checkpoint_step}, and "
                                    f"run.max_steps={max_steps} is not beyond it", None,
                                    f"resume with run.max_steps above {st.checkpoint_step}"))
        elif st.checkpoint is not None:
            problems += _identity_problems(st.checkpoint, plan)
    elif st.is_run:
        if st.finished:
            further = (f" (or train it further: tuneplan run --resume {d} run.max_steps=N, N above "
                       f"{st.finished_steps})") if st.checkpoint is not None else ""
            problems.append(Problem(f"{d} holds a finished run ({st.finished_steps} steps)", None,
                                    f"choose another --run-dir or run.name{further}"))
        elif st.checkpoint is not None:
            problems.append(Problem(f"{d} holds a run stopped at step {st.checkpoint_step}", None,
                                    f"continue it with `tuneplan run --resume {d}`, or choose another "
                                    "--run-dir or run.name"))
    elif st.foreign:
        problems.append(Problem(f"{d} is not a run directory (no {EVENTS_FILE}) but holds "
                                f"{', '.join(st.foreign)}, which a run would overwrite", None,
                                "choose an empty or new --run-dir"))
    if problems:
        raise Problems(problems)
    return st


def _identity_problems(ck: Path, plan) -> list[Problem]:
    """Plan fields the checkpoint's weights and optimizer depend on that the resuming plan changes."""
    from runner.checkpoint import CheckpointError, identity, read_state

    try:
        saved = read_state(ck).get("identity")
    except CheckpointError as e:
        return [Problem(str(e))]
    if not isinstance(saved, dict):
        return []  # a checkpoint from before identities were saved
    now = identity(plan.model_dump(mode="json"))
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    return [Problem(f"the checkpoint {ck} was trained with {k}={saved[k]}; resuming cannot change it to {now[k]}",
                    None, "resume without that override, or start a new run") for k in changed]


def restart(run_dir: Path) -> Path | None:
    """Move an earlier attempt's events, report and traceback to attempts/N/ (a clean restart); that folder."""
    present = [n for n in ATTEMPT_FILES if (run_dir / n).exists()]
    if not present:
        return None
    root = run_dir / ATTEMPTS
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    dest = root / str(n)
    dest.mkdir()
    for name in present:
        shutil.move(str(run_dir / name), str(dest / name))
    return dest


# --- advice that works when followed -----------------------------------------------------------

# Plan changes a checkpoint survives (the OOM advice resumes with them): the same weights, optimizer
# and effective batch, another memory/time trade.
RESUMABLE_CHANGES = {"training.grad_checkpointing", "training.micro_batch", "training.grad_accum"}


def next_command(run_dir: Path) -> dict[str, str] | None:
    """What to type after a run stopped: resume where a checkpoint exists, else start the same run
    again from step 0 (both accepted by :func:`check`). None without a plan.yaml there."""
    from runner.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "plan.yaml").is_file():
        return None
    d = str(run_dir)
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        return {"command": shlex.join(["tuneplan", "run", "--resume", d]), "what": f"resume from {ck.name}"}
    return {"command": shlex.join(["tuneplan", "run", str(run_dir / "plan.yaml"), "--run-dir", d]),
            "what": "nothing to resume (no checkpoint yet); start it again from step 0"}


def retry_command(run_dir: Path, suggestion: dict[str, Any]) -> dict[str, Any]:
    """The OOM advice (runner.launch.next_plan) as a command that works: resume this run with the
    changes when a checkpoint exists and the changes keep it loadable, else the advisor's new run."""
    import shlex

    from runner.checkpoint import latest_checkpoint

    changes = suggestion.get("changes") or {}
    if suggestion.get("command") and latest_checkpoint(run_dir) is not None and set(changes) <= RESUMABLE_CHANGES:
        words = {True: "true", False: "false"}
        cmd = ["tuneplan", "run", "--resume", str(run_dir),
               *[f"{k}={words[v] if isinstance(v, bool) else v}" for k, v in changes.items()]]
        suggestion = {**suggestion, "command": shlex.join(cmd), "resumes": True}
    return suggestion
