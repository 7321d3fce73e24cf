"""Files written so that a link cannot redirect them and a crash cannot leave half of them.

Run directories and plan files get shared, downloaded and prepared by other people, so every file
tuneplan writes in place is opened with ``O_NOFOLLOW`` (a symbolic link planted under its name makes
the open fail instead of writing through the link), and every whole-file write goes to a temporary
file created with ``O_EXCL`` beside it, is flushed to the disk (``fsync``), renamed over the name
(``os.replace`` replaces a link itself, never its target) and the directory is flushed too, so the
rename survives a power loss. POSIX only (``O_NOFOLLOW``); elsewhere the flags are 0 and the checks
by ``lstat`` in :mod:`runner.rundir` remain.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class LinkRefused(OSError):
    """A path tuneplan writes is a symbolic link (or leads through one where it must not)."""


def _refuse_link(path: Path, e: OSError) -> None:
    # open(O_NOFOLLOW) on a link fails with ELOOP (Linux, macOS) or EMLINK (FreeBSD)
    if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
        raise LinkRefused(e.errno, "is a symbolic link; tuneplan never writes through one", str(path)) from None


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (LinkRefused)."""
    path = Path(path)
    try:
        return os.open(path, flags | NOFOLLOW | CLOEXEC, mode)
    except OSError as e:
        _refuse_link(path, e)
        raise


def open_append(path: str | Path):
    """A text file opened for appending, never through a link; created if missing."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def _fsync(path: str | Path, flags: int) -> None:
    """Flush one file or directory to the disk; nothing where it cannot be opened or flushed."""
    try:
        fd = os.open(path, os.O_RDONLY | flags | CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to the disk; a no-op where directories cannot be opened."""
    _fsync(path, getattr(os, "O_DIRECTORY", 0))


def fsync_tree(root: str | Path) -> None:
    """Flush every file and directory under ``root`` (a folder about to be renamed into place)."""
    for here, _dirs, files in os.walk(Path(root), followlinks=False):
        for name in files:
            _fsync(os.path.join(here, name), NOFOLLOW)
        fsync_dir(here)


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` whole: a temporary file beside it (created exclusively, never a
    link), flushed, renamed over ``path`` (a link at ``path`` is replaced, not followed), and the
    directory flushed (``durable``). OSError when it cannot be written; no temporary file is left."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.is_symlink():  # planted under our temporary name: remove the link (never its target)
        tmp.unlink()
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def is_link(path: str | Path) -> bool:
    return os.path.islink(path)
