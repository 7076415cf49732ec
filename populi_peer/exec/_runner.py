"""The agent's side of a supervised task: start, renew, cancel, watch, adopt, clean up.

Everything goes through the task directory, so a handle made by :func:`adopt` after an
agent restart is as good as the one :func:`start_supervised` returned. The trio-facing
parts only poll small files with ``trio.sleep`` between looks.
"""

from __future__ import annotations

import math
import os
import signal
import site
import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

import populi_peer
from populi_peer import selfexec
from populi_peer.errors import BadRequest
from populi_peer.exec import _cgroup, _files, _proc
from populi_peer.exec._records import (
    STREAMS,
    Stream,
    SupervisorState,
    TaskOutcome,
    TaskSpec,
)
from populi_peer.exec.errors import SpawnFailed, SupervisorFailed, SupervisorLost, TaskDirInUse

#: How long :func:`start_supervised` waits for the supervisor to report.
DEFAULT_STARTUP_TIMEOUT_S = 10.0
#: How long :func:`kill_orphan` waits for killed processes to be gone.
ORPHAN_KILL_TIMEOUT_S = 5.0
DEFAULT_READ_LIMIT_BYTES = 1024 * 1024


def read_state(task_dir: Path) -> SupervisorState | None:
    """``state.json`` of ``task_dir``, or None when it is missing or unreadable."""
    try:
        return SupervisorState.from_json(_files.read_json(task_dir / _files.STATE))
    except (OSError, ValueError):
        return None


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise BadRequest(f"stream must be stdout or stderr, not {stream!r}", code="bad_stream")


class Supervised:
    """A handle on one supervisor, identified by its pid and start time.

    Build one with :func:`start_supervised` or :func:`adopt`. All methods except
    :meth:`wait` are quick, non-blocking file operations.
    """

    def __init__(self, task_dir: Path, supervisor_pid: int, supervisor_starttime_ticks: int):
        self.task_dir = task_dir
        self.supervisor_pid = supervisor_pid
        self.supervisor_starttime_ticks = supervisor_starttime_ticks

    def __repr__(self) -> str:
        return f"<Supervised {self.task_dir} pid={self.supervisor_pid}>"

    def extend_deadline(self, deadline_boot: float) -> None:
        """Move the lease deadline (CLOCK_BOOTTIME seconds) later; an earlier one is ignored.

        Renewals only extend a deadline: a late answer to an older renewal must not cut
        the current lease short. To stop sooner, :meth:`cancel`.
        """
        if isinstance(deadline_boot, bool) or not isinstance(deadline_boot, int | float):
            raise BadRequest(
                f"deadline must be a number, not {deadline_boot!r}", code="bad_deadline"
            )
        if not math.isfinite(deadline_boot):
            raise BadRequest(f"deadline must be finite, not {deadline_boot!r}", code="bad_deadline")
        current = _files.read_deadline(self.task_dir / _files.DEADLINE)
        if current is not None and deadline_boot <= current:
            return
        _files.write_atomic(self.task_dir / _files.DEADLINE, _files.format_deadline(deadline_boot))

    def cancel(self) -> None:
        """Ask the supervisor to stop the task (SIGTERM, grace, SIGKILL); returns at once."""
        _files.write_atomic(self.task_dir / _files.CANCEL, b"cancel\n")

    def state(self) -> SupervisorState:
        """The supervisor's latest ``state.json``."""
        state = read_state(self.task_dir)
        if state is None:
            raise SupervisorLost(
                f"state of task directory {self.task_dir} is missing or unreadable",
                task_dir=str(self.task_dir),
            )
        return state

    def alive(self) -> bool:
        """Whether the supervisor process (this very one, not a pid reuser) still runs."""
        return _proc.is_running(self.supervisor_pid, self.supervisor_starttime_ticks)

    async def wait(self, poll_s: float = 0.05) -> TaskOutcome:
        """Wait until the supervisor wrote its final state; the task's outcome.

        Raises :class:`SupervisorLost` when the supervisor is gone without one: the task
        must then be cleaned up with :func:`kill_orphan`.
        """
        while True:
            alive = self.alive()
            state = read_state(self.task_dir)
            if state is not None and state.status == "exited":
                return TaskOutcome.from_state(state)
            if not alive:
                # It may have written its final state between the two looks.
                state = read_state(self.task_dir)
                if state is not None and state.status == "exited":
                    return TaskOutcome.from_state(state)
                raise SupervisorLost(
                    f"supervisor {self.supervisor_pid} of {self.task_dir} died without a "
                    "final state; clean up with kill_orphan",
                    task_dir=str(self.task_dir),
                )
            await trio.sleep(poll_s)

    def read_output(
        self, stream: Stream, offset: int = 0, limit: int = DEFAULT_READ_LIMIT_BYTES
    ) -> tuple[bytes, int, int]:
        """Kept output of ``stream`` from absolute ``offset``: ``(data, next_offset, total)``.

        Only the last ``output_cap_bytes`` are kept: an offset before them reads from the
        first kept byte (``next_offset - len(data)``). ``total`` counts every byte written.
        """
        _check_stream(stream)
        return _files.read_tail(self.task_dir / stream, offset, limit)


def tail(task_dir: Path, stream: Stream, max_bytes: int) -> bytes:
    """The last ``max_bytes`` (at most) of the kept output of ``stream``, for delivery."""
    _check_stream(stream)
    if max_bytes <= 0:
        return b""
    _, _, total = _files.read_tail(task_dir / stream, 0, 0)
    data, _, _ = _files.read_tail(task_dir / stream, max(0, total - max_bytes), max_bytes)
    return data


def _supervisor_env() -> dict[str, str]:
    """The agent's environment without what the single file's loader set for the agent
    (so that the supervisor unpacks a copy of its own, see :mod:`populi_peer.selfexec`),
    plus the path to this package when it is not installed."""
    env = selfexec.child_env()
    if selfexec.frozen():
        return env
    root = str(Path(populi_peer.__file__).resolve().parent.parent)
    installed = {
        str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]
    }
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _prepare_task_dir(task_dir: Path, spec: TaskSpec, deadline_boot: float) -> Path:
    """Create the task directory and write the deadline, then the spec (small local files)."""
    task_dir = task_dir.absolute()
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in (_files.SPEC, _files.STATE):
        if (task_dir / name).exists():
            raise TaskDirInUse(
                f"{task_dir} already holds {name}: use a fresh directory per attempt",
                task_dir=str(task_dir),
            )
    _files.write_atomic(task_dir / _files.DEADLINE, _files.format_deadline(deadline_boot))
    _files.write_json(task_dir / _files.SPEC, spec.to_json())
    return task_dir


async def start_supervised(
    task_dir: Path,
    spec: TaskSpec,
    deadline_boot: float,
    *,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> Supervised:
    """Start a detached supervisor for ``spec`` in ``task_dir`` under ``deadline_boot``.

    ``deadline_boot`` is the lease deadline on CLOCK_BOOTTIME, counted from when the
    renewal that proved the lease was sent (safety rule 3). Returns once the supervisor
    runs the command (or already finished it). Raises :class:`SpawnFailed` when the
    command cannot be started (``details["exit_code"]`` 127 not found, 126 not
    executable), :class:`TaskDirInUse` when ``task_dir`` already holds a task, and
    :class:`SupervisorFailed` when the supervisor does not report in time.

    If this call is cancelled after the supervisor was forked, the task may run without a
    handle: :func:`adopt` the directory (or :func:`kill_orphan` it).
    """
    if (
        isinstance(deadline_boot, bool)
        or not isinstance(deadline_boot, int | float)
        or not math.isfinite(deadline_boot)
    ):
        raise BadRequest(
            f"deadline must be a finite number, not {deadline_boot!r}", code="bad_deadline"
        )
    task_dir = _prepare_task_dir(task_dir, spec, deadline_boot)
    with open(task_dir / _files.LOG, "ab") as log_file:  # noqa: ASYNC230 - local, small
        # cwd "/": pin no mount.
        launcher = await trio.run_process(
            [*selfexec.supervisor_command(), "--detach", str(task_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd="/",
            env=_supervisor_env(),
            start_new_session=True,
            check=False,
        )
    if launcher.returncode != 0:
        raise SupervisorFailed(
            f"supervisor for {task_dir} failed to start (exit {launcher.returncode}): "
            f"{_log_tail(task_dir)}",
            task_dir=str(task_dir),
        )
    with trio.move_on_after(startup_timeout_s):
        while True:
            state = read_state(task_dir)
            if state is not None and state.status != "starting":
                break
            await trio.sleep(0.01)
    if state is None or state.status == "starting":
        # A supervisor too slow to report may still come up: make sure it finds the task
        # cancelled and no deadline to run to, so it never starts the command late.
        _files.write_atomic(task_dir / _files.CANCEL, b"startup timed out\n")
        (task_dir / _files.DEADLINE).unlink(missing_ok=True)
        await kill_orphan(task_dir)
        raise SupervisorFailed(
            f"supervisor for {task_dir} did not report within {startup_timeout_s}s: "
            f"{_log_tail(task_dir)}",
            task_dir=str(task_dir),
        )
    if state.stop_reason == "spawn_failed":
        raise SpawnFailed(
            f"task {spec.task_id} attempt {spec.attempt} did not start: {state.error}",
            exit_code=state.exit_code,
            error=state.error,
            task_dir=str(task_dir),
        )
    return Supervised(task_dir, state.supervisor_pid, state.supervisor_starttime_ticks)


def _log_tail(task_dir: Path, max_bytes: int = 500) -> str:
    try:
        with open(task_dir / _files.LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "(no supervisor log)"
    return text.splitlines()[-1] if text else "(empty supervisor log)"


def adopt(task_dir: Path) -> Supervised | None:
    """A handle on the supervisor recorded in ``task_dir``, if that very process still runs.

    For an agent that restarted (safety rule 3: an upgrade does not kill running work).
    None when there is no state, the recorded pid is gone, or it now belongs to another
    process (its ``/proc`` start time differs from the recorded one).
    """
    state = read_state(task_dir.absolute())
    if state is None:
        return None
    if not _proc.is_running(state.supervisor_pid, state.supervisor_starttime_ticks):
        return None
    return Supervised(task_dir.absolute(), state.supervisor_pid, state.supervisor_starttime_ticks)


async def _wait_gone(check: Callable[[], bool], timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        # /proc and cgroup files have no event to wait on: poll them.
        while check():  # noqa: ASYNC110
            await trio.sleep(0.005)
        return True
    return False


def _session_members(state: SupervisorState) -> list[int]:
    """Live processes of the task's session, guarded against pid reuse."""
    if state.pgid is None:
        return []
    leader = _proc.read_stat(state.pgid)
    if (
        leader is not None
        and state.child_starttime_ticks is not None
        and leader.starttime_ticks != state.child_starttime_ticks
    ):
        # The leader's pid now names another process, so no process of ours holds the
        # session id any more (a live session pins its id): nothing to kill.
        return []
    return [pid for pid in _proc.pids_in_session(state.pgid) if pid != os.getpid()]


def leftovers(task_dir: Path) -> bool:
    """Whether anything ``task_dir`` records may still run: the supervisor, a process in
    the task's cgroup, or one in its session. A lease may be released as stopped only
    when this is False."""
    state = read_state(task_dir)
    if state is None:
        # Nothing recorded, so nothing can be found to prove it gone — unless the
        # supervisor never got as far as writing a state (no spec, nothing started).
        return (task_dir / _files.SPEC).exists() and not (task_dir / _files.CANCEL).exists()
    if state.status == "exited":
        return False
    if _proc.is_running(state.supervisor_pid, state.supervisor_starttime_ticks):
        return True
    group = Path(state.cgroup) if state.cgroup else None
    if group is not None and group.exists() and _cgroup.is_populated(group):
        return True
    return bool(_session_members(state)) if state.isolation != "cgroup" else False


async def kill_orphan(task_dir: Path) -> bool:
    """Kill whatever ``task_dir`` records, for a task that cannot be re-adopted.

    SIGKILLs the recorded supervisor if that very process still runs, then the task's
    cgroup (``cgroup.kill``) and every process still in the task's session, waits until
    they are gone and removes the emptied cgroup. Returns whether anything was killed.
    In process-group isolation, processes that left the session (``setsid``, double
    fork) after the supervisor died cannot be found: docs/adr/0005-task-supervisor.md.
    """
    state = read_state(task_dir)
    if state is None:
        return False
    killed = False
    sup_pid, sup_start = state.supervisor_pid, state.supervisor_starttime_ticks
    if sup_pid != os.getpid() and _proc.is_running(sup_pid, sup_start):
        killed |= _proc.send_signal(sup_pid, signal.SIGKILL)
        await _wait_gone(lambda: _proc.is_running(sup_pid, sup_start), ORPHAN_KILL_TIMEOUT_S)
    group = Path(state.cgroup) if state.cgroup else None
    if group is not None and not _cgroup.looks_like_task_group(group, state.task_id, state.attempt):
        group = None
    if group is not None and group.exists():
        if _cgroup.is_populated(group):
            killed = True
            _cgroup.kill(group)

            def populated() -> bool:
                assert group is not None
                if _cgroup.is_populated(group):
                    _cgroup.kill(group)
                    return True
                return False

            await _wait_gone(populated, ORPHAN_KILL_TIMEOUT_S)
        _cgroup.remove(group)
    # Without a cgroup, the session is what is left to find the task by.
    members = _session_members(state) if state.isolation != "cgroup" else []
    if members:
        killed = True
        state_for_scan = state

        def session_alive() -> bool:
            pids = _session_members(state_for_scan)
            for pid in pids:
                _proc.send_signal(pid, signal.SIGKILL)
            return bool(pids)

        await _wait_gone(session_alive, ORPHAN_KILL_TIMEOUT_S)
    return killed
