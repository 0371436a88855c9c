"""One writer per output folder: two generations appending to the same `manifest.jsonl` would
interleave their lines and each would take the other's images for its own. (Training holds the same
lock on its run directory.)

The lock is an `flock` on `OUT/.lock`, so the kernel releases it when the process ends, crashed or
not: a stale lock never blocks the next run. A second writer fails at once instead of waiting,
because a generation can run for hours and a silent wait looks like a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from synthcxr.errors import ConfigError

LOCK_FILE = ".lock"
_ATTEMPTS = 20


class OutputBusyError(ConfigError):
    """Another process holds the output folder's lock."""


GENERATE_BUSY = ("another `synthcxr generate` is writing into this output folder",
                 "wait for it to finish (re-running then resumes and skips its images), "
                 "or choose another output folder (--out)")
"""(message, fix) when the folder is busy; training passes its own."""


def _open_locked(out: Path, busy: tuple[str, str] = GENERATE_BUSY, name: str = LOCK_FILE) -> tuple[int, bool]:
    """Open and lock `out/name`; return (fd, whether this call created `out`)."""
    lock_path = out / name
    created = False
    for _ in range(_ATTEMPTS):
        if not out.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            created = True
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed by a writer that gave up; make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(f"{busy[0]} (lock {lock_path} is held by {_holder(lock_path)})", file=out,
                                      fix=busy[1]) from None
            raise
        # the previous holder unlinks the file before releasing it: a lock on an unlinked file
        # guards nothing, so try again with the file now at that path
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for the refused
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OutputBusyError("could not take the output folder's lock (it keeps being replaced)", file=out,
                          fix="check that no other program is creating and removing files in this folder")


def _holder(lock_path: Path) -> str:
    """'process PID on HOST' as the holder wrote it into the lock file (or 'another process')."""
    try:
        pid, host = lock_path.read_text().split()
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"


@contextmanager
def output_lock(out: str | os.PathLike, busy: tuple[str, str] = GENERATE_BUSY, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the exclusive lock on output folder `out` (created if missing) for the `with` block.

    On exit the lock file is removed, and so is `out` when this call created it and nothing else
    was written there (a run that failed before its first file leaves no empty folder behind).
    `name`: another lock file in `out` (one shard of a cluster generation locks its own).
    """
    out = Path(out)
    fd, created = _open_locked(out, busy, name)
    try:
        yield out
    finally:
        try:
            os.unlink(out / name)  # still held: a waiter that opened it sees the inode change
            if created:
                out.rmdir()  # only when empty
        except OSError:
            pass
        os.close(fd)
