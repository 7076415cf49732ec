"""One agent per data directory: an exclusive lock held for the agent process's life.

Two agents on one data directory would run two control planes on one database, or fight
over one port and one task directory. ``populi agent`` takes ``flock(LOCK_EX)`` on
``<data dir>/agent.lock`` before it opens the database, and keeps it until it stops; a
second agent finds it taken and says ``already running (pid N)`` (exit 4).

Why ``flock`` on a file that is never removed:

- The kernel drops the lock with the last descriptor of the open file, so an agent that is
  SIGKILLed (or whose machine loses power) leaves nothing to clean up: the next agent starts
  at once. A pid file alone would need a liveness guess, and pids are reused.
- The descriptor is opened ``O_CLOEXEC`` and the task supervisors are started with
  ``close_fds`` (``exec._runner.start``): a supervisor outlives its agent by design (safety
  rule 3), and one that inherited the descriptor would keep the directory locked after the
  agent died, and keep a restarted agent from re-adopting its own task.
- Unlinking the file on stop would let a third process lock a fresh inode while a second
  still holds the old one; the file stays, only the lock comes and goes.

The pid written into the file is for the message only; the lock is the truth.
``populi init --force`` and ``populi join --force`` check the lock too before they wipe
the directory (:func:`refuse_while_locked`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from populi_peer.errors import AlreadyRunning, StoreError

LOCK_FILE_NAME = "agent.lock"


class DataDirLock:
    """The held lock; :meth:`release` (or the end of the process) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Take the lock or raise :class:`AlreadyRunning` naming the holder's pid."""
        path = data_dir / LOCK_FILE_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}", code="lock_failed") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = holder_pid(data_dir)
                raise AlreadyRunning(
                    f"already running (pid {pid if pid is not None else 'unknown'}): an agent "
                    f"holds {path}",
                    pid=pid,
                ) from None
            raise StoreError(f"cannot lock {path}: {exc.strerror}", code="lock_failed") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is only for the message; the lock is held either way
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # An agent built and never run (tests) gives the lock back when it is collected.
        self.release()


def holder_pid(data_dir: Path) -> int | None:
    """The pid the lock holder wrote, if it wrote one."""
    try:
        text = (data_dir / LOCK_FILE_NAME).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def refuse_while_locked(data_dir: Path) -> Iterator[None]:
    """Hold the lock for the block (a command that rewrites the data directory), or raise
    :class:`AlreadyRunning` when an agent runs on it. A directory that does not exist
    yet has no agent."""
    if not data_dir.is_dir():
        yield
        return
    lock = DataDirLock.acquire(data_dir)
    try:
        yield
    finally:
        lock.release()


__all__ = ["LOCK_FILE_NAME", "DataDirLock", "holder_pid", "refuse_while_locked"]
