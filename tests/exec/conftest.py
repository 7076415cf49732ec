"""Real supervisors, real tasks, and a guard that no test leaves a process behind.

Every task a test starts gets a unique ``POPULI_TASK_ID``; since a process keeps the
environment it was started with (``setsid`` and double forks included), scanning
``/proc/*/environ`` for that id finds every process of the task, whatever the supervisor
itself believes. After each test the ``tasks`` fixture asserts that none is left, that
every supervisor has exited and that every task cgroup is gone, and cleans up if not.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from populi_peer.clock import boot_time
from populi_peer.exec import TaskSpec, _cgroup, _proc, build_task_env, read_state
from support.waiting import settle

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Guard timeout for things that should take milliseconds; never an assertion on speed.
GUARD_S = 20.0


@functools.cache
def cgroup_usable() -> bool:
    """Whether this machine lets us make a task cgroup and move a process into it."""
    for parent in _cgroup.parent_candidates(None):
        try:
            group = _cgroup.create_task_group(parent, f"probe-{uuid.uuid4().hex[:8]}")
        except OSError:
            continue
        probe = subprocess.Popen(["sleep", "30"])
        try:
            (group / "cgroup.procs").write_text(str(probe.pid))
            return True
        except OSError:
            continue
        finally:
            probe.kill()
            probe.wait()
            _cgroup.remove(group)
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``isolation`` runs once per isolation mode."""
    if "isolation" in metafunc.fixturenames:
        metafunc.parametrize(
            "isolation",
            [
                pytest.param(
                    "cgroup",
                    marks=pytest.mark.skipif(
                        not cgroup_usable(), reason="no writable cgroup v2 here"
                    ),
                ),
                "process_group",
            ],
        )


def live_task_pids(task_id: str) -> list[int]:
    """Live processes started with ``POPULI_TASK_ID=task_id`` in their environment."""
    needle = f"\0POPULI_TASK_ID={task_id}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if needle in environ:
            stat = _proc.read_stat(int(name))
            if stat is not None and not stat.dead:
                found.append(int(name))
    return found


class Tasks:
    """Makes task specs and directories for one test, and remembers them for the guard.

    Also carries the helpers tests need (this directory is not a package).
    """

    GUARD_S = GUARD_S
    REPO_ROOT = REPO_ROOT

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[str, Path]] = []

    def new_dir(self) -> tuple[str, Path]:
        task_id = f"test-{uuid.uuid4().hex[:12]}"
        task_dir = self.tmp_path / task_id
        self.started.append((task_id, task_dir))
        return task_id, task_dir

    def spec(
        self,
        task_id: str,
        argv: Sequence[str],
        *,
        stop_margin_s: float = 0.5,
        kill_grace_s: float = 0.2,
        output_cap_bytes: int = 64 * 1024,
        isolation: str = "auto",
        passed: dict[str, str] | None = None,
    ) -> TaskSpec:
        env = build_task_env(
            base=os.environ,
            passed=passed or {},
            task_id=task_id,
            attempt=1,
            fencing_token="1.1",
            cuda_visible_devices=None,
        )
        return TaskSpec(
            task_id=task_id,
            attempt=1,
            argv=tuple(argv),
            env=env,
            cwd=str(self.tmp_path),
            stop_margin_s=stop_margin_s,
            kill_grace_s=kill_grace_s,
            output_cap_bytes=output_cap_bytes,
            isolation=isolation,  # type: ignore[arg-type]
        )

    live_task_pids = staticmethod(live_task_pids)
    cgroup_usable = staticmethod(cgroup_usable)

    @staticmethod
    def python_argv(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    @staticmethod
    def python_env() -> dict[str, str]:
        """An environment in which a plain ``python`` can import this checkout."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    @staticmethod
    def boot_now() -> float:
        return boot_time()


def _force_clean(task_id: str, task_dir: Path) -> list[str]:
    """Kill whatever is left of one task; describe what had to be killed."""
    problems: list[str] = []
    state = read_state(task_dir)
    if state is not None and _proc.is_running(
        state.supervisor_pid, state.supervisor_starttime_ticks
    ):
        problems.append(f"supervisor {state.supervisor_pid} still running")
        os.kill(state.supervisor_pid, signal.SIGKILL)
    if state is not None and state.cgroup and Path(state.cgroup).exists():
        group = Path(state.cgroup)
        if _cgroup.is_populated(group):
            problems.append(f"cgroup {group} still populated")
            _cgroup.kill(group)
            settle(lambda: not _cgroup.is_populated(group), guard_s=5)
        if not _cgroup.remove(group):
            problems.append(f"cgroup {group} not removable")
        else:
            problems.append(f"cgroup {group} left behind")
    pids = live_task_pids(task_id)
    if pids:
        problems.append(f"task processes left: {pids}")
        for pid in pids:
            _proc.send_signal(pid, signal.SIGKILL)
    return problems


def _supervisor_gone(pid: int, start: int) -> bool:
    return not _proc.is_running(pid, start)


def _task_gone(task_id: str) -> bool:
    return not live_task_pids(task_id)


@pytest.fixture
def tasks(tmp_path: Path) -> Iterator[Tasks]:
    tracker = Tasks(tmp_path)
    yield tracker
    problems: list[str] = []
    for task_id, task_dir in tracker.started:
        # The supervisor exits right after its final write: give it a moment.
        state = read_state(task_dir)
        if state is not None:
            pid, start = state.supervisor_pid, state.supervisor_starttime_ticks
            settle(functools.partial(_supervisor_gone, pid, start), guard_s=5)
        settle(functools.partial(_task_gone, task_id), guard_s=2)
        problems.extend(f"{task_id}: {p}" for p in _force_clean(task_id, task_dir))
    if problems:
        pytest.fail("processes left behind: " + "; ".join(problems))
