"""The per-task supervisor: ``python -m populi_peer.exec.supervisor [--detach] TASK_DIR``
(``populi _supervisor [--detach] TASK_DIR`` in the single-file build).

One supervisor process runs one task attempt and enforces its lease deadline by itself
(safety rule 3), so that a paused, starved or dead agent cannot keep the task alive past
it. It runs apart from the agent (own session, re-parented to init with ``--detach``) and
talks to it only through files in ``TASK_DIR`` (see :mod:`populi_peer.exec._files`):

- it re-reads ``deadline`` (seconds on CLOCK_BOOTTIME) every tick of at most 50 ms; a
  missing, garbled or non-finite deadline counts as expired;
- at ``deadline - stop_margin_s``, when ``cancel`` appears, or on SIGTERM/SIGINT, it
  sends SIGTERM to the whole task, SIGKILL after ``kill_grace_s``, and waits until no
  process of the task is left;
- when the command exits by itself, whatever it left behind gets the same treatment;
- it records everything in ``state.json`` and exits after the final write.

The task runs in a fresh cgroup v2 group when one can be made (``cgroup.kill`` takes
everything, ``setsid`` or not), else in its own session and process group. Either way
its main process has ``PR_SET_PDEATHSIG(SIGKILL)``, so it dies with the supervisor, and
the supervisor is a child subreaper, so orphaned descendants come back to it to be found
and reaped. docs/adr/0005-task-supervisor.md says why.

This module imports no trio: it starts in a few tens of milliseconds. It loads all it
will need before it detaches, so that it reads no file of the installation afterwards: a
single-file build's unpacked folder is removed as soon as the supervisor detaches, and an
upgrade may replace every file of the agent that started it.

Exit status (useful when run by hand): the task's own exit code, 128 + signal when a
signal ended it, 126/127 when it could not be started, 124 when it was stopped before it
started, 125 when the supervisor itself failed.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import locale
import logging
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

from populi_peer.clock import boot_time
from populi_peer.errors import BadRequest
from populi_peer.exec import _cgroup, _files, _proc, _timing
from populi_peer.exec._records import (
    StopReason,
    StreamTotals,
    SupervisorState,
    TaskSpec,
)

#: Longest sleep between two looks at the deadline and cancel files.
TICK_S = 0.05
#: Tick while a stop is under way, so that the end of the task is seen promptly.
STOP_TICK_S = 0.005
#: After the last process is gone, how long to wait for the output pipes to close (a
#: stranger handed one of their write ends could keep them open forever).
DRAIN_AFTER_EMPTY_S = 0.5
#: How often a running supervisor refreshes the output totals in state.json.
STATE_REFRESH_S = 1.0
READ_CHUNK_BYTES = 64 * 1024

EXIT_STOPPED_BEFORE_START = 124
EXIT_SUPERVISOR_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

log = logging.getLogger("populi.exec.supervisor")


def _child_setup(parent_pid: int, cgroup_procs: str | None) -> Callable[[], None]:
    """What the task's main process does between fork and exec.

    The supervisor is single-threaded, so running Python here is safe. The order matters:
    the parent-death signal first, then a check that the parent did not die before it
    took effect, then the move into the task cgroup, so that the process cannot fork
    before it is contained.
    """
    has_prctl = _proc.prctl_available()

    def setup() -> None:
        if has_prctl:
            _proc.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        if cgroup_procs is not None:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return setup


class _Supervisor:
    def __init__(self, task_dir: Path) -> None:
        self.dir = task_dir
        self.pid = os.getpid()
        self.starttime = _proc.starttime_ticks(self.pid) or 0
        self.spec: TaskSpec | None = None
        self.st: SupervisorState | None = None
        self.signalled = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.main_pid: int | None = None
        self.main_reaped = False
        self.group: Path | None = None
        self.pidfd: int | None = None
        self.writers: dict[int, tuple[_files.TailWriter, IO[bytes]]] = {}
        self.tails: dict[str, _files.TailWriter] = {}
        self.stopping = False
        self.kill_at = math.inf
        self.killed = False

    # -- state ---------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        assert self.st is not None
        for name, tail in self.tails.items():
            changes[name] = StreamTotals(tail.total_bytes, tail.kept_bytes)
        self.st = dataclasses.replace(self.st, **changes, updated_at_wall=time.time())

    def _write(self, *, durable: bool = False) -> None:
        assert self.st is not None
        try:
            _files.write_json(self.dir / _files.STATE, self.st.to_json(), durable=durable)
        except OSError as exc:
            # Losing a state write must not kill the task; the final one is retried by
            # nobody, which the launcher sees as a lost supervisor.
            log.warning("cannot write %s: %s", _files.STATE, exc)

    # -- entry ---------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.spec = TaskSpec.from_json(_files.read_json(self.dir / _files.SPEC))
        except (OSError, ValueError, BadRequest) as exc:
            log.error("cannot read %s: %s", self.dir / _files.SPEC, exc)
            self.st = SupervisorState(
                task_id=self.dir.name,
                attempt=0,
                supervisor_pid=self.pid,
                supervisor_starttime_ticks=self.starttime,
                status="exited",
                stop_reason="spawn_failed",
                exit_code=EXIT_SUPERVISOR_FAILED,
                error=f"unreadable spec: {exc}",
                stopped_at_boot=boot_time(),
                stopped_at_wall=time.time(),
                updated_at_wall=time.time(),
            )
            self._write(durable=True)
            return EXIT_SUPERVISOR_FAILED
        spec = self.spec
        self.st = SupervisorState(
            task_id=spec.task_id,
            attempt=spec.attempt,
            supervisor_pid=self.pid,
            supervisor_starttime_ticks=self.starttime,
            status="starting",
            updated_at_wall=time.time(),
        )
        log.info("supervising task %s attempt %d: %s", spec.task_id, spec.attempt, list(spec.argv))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            _proc.set_child_subreaper()
        except OSError as exc:
            log.warning("cannot become a child subreaper (%s): orphans escape the tree walk", exc)
        self._write()
        try:
            return self._supervise(spec)
        except BaseException as exc:
            log.exception("supervisor failed; killing the task")
            self._kill_everything()
            self._close_outputs()
            self._update(
                status="exited",
                stop_reason="supervisor_error",
                error=f"supervisor failed: {exc!r}",
                stopped_at_boot=boot_time(),
                stopped_at_wall=time.time(),
            )
            self._write(durable=True)
            return EXIT_SUPERVISOR_FAILED

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signalled = True

    def _cancel_requested(self) -> bool:
        return self.signalled or (self.dir / _files.CANCEL).exists()

    # -- the task ------------------------------------------------------------------
    def _supervise(self, spec: TaskSpec) -> int:
        now = boot_time()
        deadline = _files.read_deadline(self.dir / _files.DEADLINE)
        # Rule 3: never start what the lease no longer covers.
        reason: StopReason | None = None
        if self._cancel_requested():
            reason = "cancelled"
        elif not _timing.may_start(now, deadline, spec.stop_margin_s):
            reason = "deadline"
        if reason is not None:
            log.info("not starting: %s (deadline %s, now %.3f)", reason, deadline, now)
            self._update(
                status="exited",
                stop_reason=reason,
                deadline_boot=deadline,
                stop_requested_at_boot=now,
                stopped_at_boot=now,
                stopped_at_wall=time.time(),
            )
            self._write(durable=True)
            return EXIT_STOPPED_BEFORE_START
        if not self._spawn(spec):
            return self._finish()
        self._loop(spec)
        return self._finish()

    def _make_group(self, spec: TaskSpec) -> tuple[Path | None, str]:
        name = _cgroup.task_group_name(spec.task_id, spec.attempt)
        reasons: list[str] = []
        candidates = _cgroup.parent_candidates(spec.cgroup_parent)
        if not candidates:
            return None, "no cgroup2 hierarchy is mounted"
        for parent in candidates:
            try:
                return _cgroup.create_task_group(parent, name), ""
            except OSError as exc:
                reasons.append(f"{parent}: {exc.strerror or exc}")
        return None, "; ".join(reasons)

    def _spawn(self, spec: TaskSpec) -> bool:
        assert self.st is not None
        group: Path | None = None
        why_not = "process_group isolation was asked for"
        if spec.isolation in ("auto", "cgroup"):
            group, why_not = self._make_group(spec)
            if group is None and spec.isolation == "cgroup":
                return self._spawn_failed(
                    EXIT_CANNOT_EXECUTE, f"cgroup isolation required but unavailable: {why_not}"
                )
        # Planned before the fork: if we die between fork and the next write, whoever
        # cleans up still knows where the task went.
        self._update(cgroup=str(group) if group else None)
        self._write()
        while True:
            try:
                proc = subprocess.Popen(
                    list(spec.argv),
                    env=dict(spec.env),
                    cwd=spec.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=_child_setup(  # noqa: PLW1509 - single-threaded parent
                        self.pid, str(group / "cgroup.procs") if group else None
                    ),
                )
                break
            except subprocess.SubprocessError as exc:
                if group is not None and spec.isolation == "auto":
                    why_not = f"cannot move a process into {group}: {exc}"
                    log.warning("%s; falling back to a process group", why_not)
                    _cgroup.remove(group)
                    group = None
                    continue
                if group is not None:
                    _cgroup.remove(group)
                return self._spawn_failed(EXIT_CANNOT_EXECUTE, f"child setup failed: {exc}")
            except FileNotFoundError as exc:
                if group is not None:
                    _cgroup.remove(group)
                if exc.filename == spec.cwd and spec.cwd != spec.argv[0]:
                    return self._spawn_failed(
                        EXIT_CANNOT_EXECUTE, f"working directory {spec.cwd} does not exist"
                    )
                return self._spawn_failed(EXIT_NOT_FOUND, f"command not found: {spec.argv[0]}")
            except OSError as exc:
                if group is not None:
                    _cgroup.remove(group)
                return self._spawn_failed(
                    EXIT_CANNOT_EXECUTE, f"cannot execute {spec.argv[0]}: {exc.strerror or exc}"
                )
        self.proc = proc
        self.main_pid = proc.pid
        self.group = group
        assert proc.stdout is not None and proc.stderr is not None
        self.tails = {
            "stdout": _files.TailWriter(self.dir / "stdout", spec.output_cap_bytes),
            "stderr": _files.TailWriter(self.dir / "stderr", spec.output_cap_bytes),
        }
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.writers[pipe.fileno()] = (self.tails[name], pipe)
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        isolation = "cgroup" if group else "process_group"
        if group:
            log.info("isolation=cgroup group=%s pid=%d", group, proc.pid)
        else:
            log.warning(
                "isolation=process_group pid=%d (%s): processes that leave the session are "
                "found only while this supervisor lives",
                proc.pid,
                why_not,
            )
        self._update(
            status="running",
            isolation=isolation,
            cgroup=str(group) if group else None,
            child_pid=proc.pid,
            child_starttime_ticks=_proc.starttime_ticks(proc.pid),
            pgid=proc.pid,
            started_at_boot=boot_time(),
            started_at_wall=time.time(),
        )
        self._write()
        return True

    def _spawn_failed(self, exit_code: int, error: str) -> bool:
        log.error("spawn failed (%d): %s", exit_code, error)
        self._update(
            status="exited",
            stop_reason="spawn_failed",
            exit_code=exit_code,
            error=error,
            cgroup=None,
            stopped_at_boot=boot_time(),
            stopped_at_wall=time.time(),
        )
        return False

    # -- the loop ------------------------------------------------------------------
    def _loop(self, spec: TaskSpec) -> None:
        assert self.st is not None
        # poll(2) underneath: a hang-up or an error counts as readable, as with POLLIN.
        poller = selectors.PollSelector()
        for fd in self.writers:
            poller.register(fd, selectors.EVENT_READ)
        if self.pidfd is not None:
            poller.register(self.pidfd, selectors.EVENT_READ)
        empty_since: float | None = None
        last_refresh = boot_time()
        stop_at = math.inf
        while True:
            self._reap()
            now = boot_time()
            if not self.stopping:
                deadline = _files.read_deadline(self.dir / _files.DEADLINE)
                stop_at = _timing.stop_at(deadline, spec.stop_margin_s)
                if self.main_reaped:
                    self._begin_stop("exited", now, deadline, spec)
                elif self._cancel_requested():
                    self._begin_stop("cancelled", now, deadline, spec)
                elif now >= stop_at:
                    self._begin_stop("deadline", now, deadline, spec)
            if self.stopping:
                alive = self._tree_alive()
                if alive and now >= self.kill_at:
                    if not self.killed:
                        self.killed = True
                        self._update(sigkill_at_boot=now)
                        log.info("grace over: SIGKILL to the task")
                    # Repeated every tick: also catches what forked between two kills.
                    self._signal_tree(signal.SIGKILL)
                if not alive and self.main_reaped:
                    if empty_since is None:
                        empty_since = now
                        self._update(stopped_at_boot=now, stopped_at_wall=time.time())
                    if not self.writers or now - empty_since >= DRAIN_AFTER_EMPTY_S:
                        return
            # While running, wake exactly at the stop point, not up to a tick after it.
            timeout_s = STOP_TICK_S if self.stopping else min(TICK_S, max(0.0, stop_at - now))
            for key, _events in poller.select(timeout_s):
                fd = key.fd
                if fd == self.pidfd:
                    self._reap()
                    if self.main_reaped:
                        poller.unregister(fd)
                        os.close(fd)
                        self.pidfd = None
                    continue
                if not self._pump(fd):
                    poller.unregister(fd)
            if not self.stopping and now - last_refresh >= STATE_REFRESH_S:
                last_refresh = now
                self._update()
                self._write()

    def _pump(self, fd: int) -> bool:
        """Move what is readable from one output pipe into its tail; False at EOF."""
        writer, pipe = self.writers[fd]
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return True
        if not data:
            pipe.close()
            del self.writers[fd]
            return False
        had_error = writer.error is not None
        writer.write(data)
        if writer.error is not None and not had_error:
            # A full disk loses output, never the supervision of the task; the totals
            # keep counting.
            log.warning("cannot store %s any more: %s", writer.path.name, writer.error)
        return True

    def _begin_stop(
        self, reason: StopReason, now: float, deadline: float | None, spec: TaskSpec
    ) -> None:
        self.stopping = True
        alive = self._tree_alive()
        changes: dict[str, Any] = {"status": "stopping", "stop_reason": reason}
        if reason != "exited":
            changes["deadline_boot"] = deadline
        if alive or reason != "exited":
            changes["stop_requested_at_boot"] = now
            # A late stop gets only what is left of the grace (exec/_timing.py).
            self.kill_at = _timing.plan_stop(
                now, deadline, stop_margin_s=spec.stop_margin_s, kill_grace_s=spec.kill_grace_s
            ).kill_at
            if reason == "exited":
                log.info("command exited; stopping what it left behind")
            else:
                log.info(
                    "stopping (%s): deadline %s, now %.3f, grace %.3fs",
                    reason,
                    deadline,
                    now,
                    spec.kill_grace_s,
                )
            self._signal_tree(signal.SIGTERM)
        self._update(**changes)
        self._write()

    def _tree_alive(self) -> bool:
        if self.group is not None and _cgroup.is_populated(self.group):
            return True
        if self.main_pid is not None and not self.main_reaped:
            stat = _proc.read_stat(self.main_pid)
            if stat is not None and not stat.dead:
                return True
        return bool(_proc.descendants_of(self.pid))

    def _signal_tree(self, sig: int) -> None:
        """Signal every process of the task once: cgroup, process group, descendants."""
        targets: set[int] = set()
        if self.group is not None:
            if sig == signal.SIGKILL:
                _cgroup.kill(self.group)
            else:
                targets.update(_cgroup.procs(self.group))
        targets.update(_proc.descendants_of(self.pid))
        if self.main_pid is not None and not self.main_reaped:
            # The unreaped main process pins its pid, so the group id cannot have been
            # reused by a stranger.
            _proc.signal_group(self.main_pid, sig)
            for pid in list(targets):
                stat = _proc.read_stat(pid)
                if stat is not None and stat.pgrp == self.main_pid:
                    targets.discard(pid)
        targets.discard(self.pid)
        for pid in targets:
            _proc.send_signal(pid, sig)

    def _reap(self) -> None:
        """Reap every exited child: the main process and orphans re-parented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.main_pid:
                code = os.waitstatus_to_exitcode(status)
                self.main_reaped = True
                if self.proc is not None:
                    self.proc.returncode = code
                if code < 0:
                    self._update(signal=-code, exit_code=None)
                    log.info("command ended by signal %d", -code)
                else:
                    self._update(exit_code=code, signal=None)
                    log.info("command exited with %d", code)

    def _kill_everything(self) -> None:
        try:
            if self.group is not None:
                _cgroup.kill(self.group)
            self._signal_tree(signal.SIGKILL)
            self._reap()
        except Exception:
            log.exception("emergency kill failed")

    def _close_outputs(self) -> None:
        for _writer, pipe in self.writers.values():
            pipe.close()
        self.writers.clear()
        for name, tail in self.tails.items():
            tail.close()
            if tail.error is not None:
                log.warning("output %s is incomplete: %s", name, tail.error)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def _finish(self) -> int:
        assert self.st is not None
        self._close_outputs()
        if self.group is not None and not _cgroup.remove(self.group):
            log.warning("cannot remove cgroup %s", self.group)
        self._update(status="exited")
        if self.st.stopped_at_boot is None:
            self._update(stopped_at_boot=boot_time(), stopped_at_wall=time.time())
        self._write(durable=True)
        st = self.st
        timings = ""
        if st.stopped_at_boot is not None and st.stop_requested_at_boot is not None:
            timings += f" stop took {st.stopped_at_boot - st.stop_requested_at_boot:.3f}s"
        if st.stopped_at_boot is not None and st.sigkill_at_boot is not None:
            timings += f" (SIGKILL to empty {st.stopped_at_boot - st.sigkill_at_boot:.4f}s)"
        if st.stopped_at_boot is not None and st.deadline_boot is not None:
            timings += f", {st.deadline_boot - st.stopped_at_boot:.3f}s before the deadline"
        log.info(
            "done: %s exit_code=%s signal=%s%s", st.stop_reason, st.exit_code, st.signal, timings
        )
        if st.exit_code is not None:
            return st.exit_code
        if st.signal is not None:
            return 128 + st.signal
        return EXIT_STOPPED_BEFORE_START


def _detach(task_dir: Path) -> None:
    """Fork; the parent exits at once (its launcher reaps it) and the child carries on.

    The supervisor is then nobody's child but init's (or a subreaper's), so no agent has
    to reap it and its death is not tied to the agent's.
    """
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        out = os.open(task_dir / _files.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def _load_everything() -> None:
    """Load now what would otherwise be loaded on first use: the libc handle for prctl,
    the codec of text files. After this the supervisor opens no file of the installation
    (module docstring)."""
    _proc.prctl_available()
    codecs.lookup(locale.getpreferredencoding(False))
    codecs.lookup(sys.getfilesystemencoding())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m populi_peer.exec.supervisor",
        description="Run one task under a lease deadline (see populi_peer.exec).",
    )
    parser.add_argument("--detach", action="store_true", help="fork into the background")
    parser.add_argument("task_dir", type=Path)
    args = parser.parse_args(argv)
    task_dir: Path = args.task_dir.absolute()
    if not task_dir.is_dir():
        print(f"supervisor: {task_dir} is not a directory", file=sys.stderr)
        return EXIT_SUPERVISOR_FAILED
    _load_everything()
    if args.detach:
        _detach(task_dir)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s supervisor[%(process)d] %(message)s",
    )
    return _Supervisor(task_dir).run()


if __name__ == "__main__":
    sys.exit(main())
