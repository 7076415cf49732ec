"""Process facts from ``/proc`` and the few ``prctl`` calls the supervisor needs (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the supervisor uses (see proc(5))."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime_ticks: int

    @property
    def dead(self) -> bool:
        """Exited (zombie or dead): it runs no more code, whoever reaps it."""
        return self.state in ("Z", "X", "x")


def parse_stat(text: str) -> ProcStat:
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # rest starts at field 3 (state); starttime is field 22.
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        starttime_ticks=int(fields[19]),
    )


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat`` parsed, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def starttime_ticks(pid: int) -> int | None:
    stat = read_stat(pid)
    return None if stat is None else stat.starttime_ticks


def is_running(pid: int, starttime: int | None = None) -> bool:
    """``pid`` exists, has not exited, and (if given) started at ``starttime`` ticks.

    The start time is what tells a process from a later one that reuses its pid.
    """
    stat = read_stat(pid)
    if stat is None or stat.dead:
        return False
    return starttime is None or stat.starttime_ticks == starttime


def iter_stats() -> Iterator[ProcStat]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                yield stat


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads), from ``/proc/PID/task/*/children``."""
    result: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        result.extend(read_pids(f"/proc/{pid}/task/{tid}/children"))
    return result


def read_pids(path: str | os.PathLike[str]) -> list[int]:
    """The pids a kernel file lists (``/proc/PID/task/TID/children``, ``cgroup.procs``),
    up to the first one that does not read; none when the file is gone (its thread or
    group ended meanwhile)."""
    pids: list[int] = []
    try:
        with open(path) as f:
            pids.extend(int(x) for x in f.read().split())
    except (OSError, ValueError):
        pass
    return pids


def descendants_of(pid: int) -> list[int]:
    """Every live process below ``pid`` in the process tree (zombies left out)."""
    result: list[int] = []
    todo = children_of(pid)
    seen: set[int] = set()
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        stat = read_stat(child)
        if stat is None or stat.dead:
            continue
        result.append(child)
        todo.extend(children_of(child))
    return result


def pids_in_session(session: int) -> list[int]:
    """Live processes whose session id is ``session`` (scans /proc)."""
    return [s.pid for s in iter_stats() if s.session == session and not s.dead]


def _signalled(kill: Callable[[int, int], None], target: int, sig: int) -> bool:
    try:
        kill(target, sig)
    except ProcessLookupError:
        return False
    return True


def send_signal(pid: int, sig: int) -> bool:
    """Signal one process; False when it is already gone."""
    return _signalled(os.kill, pid, sig)


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when no process of it is left."""
    return _signalled(os.killpg, pgid, sig)


@functools.cache
def _load_prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.prctl
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    func.restype = ctypes.c_int
    return func


def prctl_available() -> bool:
    return _load_prctl() is not None


def prctl(option: int, arg: int) -> None:
    """``prctl(option, arg, 0, 0, 0)``; raise OSError on failure.

    Call :func:`prctl_available` in the parent first so that a forked child does not load
    libc between fork and exec.
    """
    func = _load_prctl()
    if func is None:
        raise OSError("prctl is not available on this system")
    if func(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to us rather than to init, so we can find them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """The kernel sends ``sig`` to this process when the thread that forked it dies."""
    prctl(PR_SET_PDEATHSIG, int(sig))
