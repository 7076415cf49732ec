"""The supervisor with real processes: deadlines, kills, escapes, adoption, spawn failures.

Durations are never asserted; what must hold on the boot clock (the task is gone before
its deadline) is asserted from the times the supervisor recorded, and kill latencies are
printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from populi_peer.exec import (
    SpawnFailed,
    Supervised,
    SupervisorLost,
    SupervisorState,
    TaskDirInUse,
    TaskOutcome,
    _cgroup,
    _files,
    _proc,
    adopt,
    kill_orphan,
    read_state,
    start_supervised,
    tail,
)
from populi_peer.exec._records import Stream
from support.waiting import settle, wait_for_async

if TYPE_CHECKING:
    from conftest import Tasks

FAR_S = 60.0
#: Guard timeout for things that should take milliseconds; never an assertion on speed.
GUARD_S = 20.0

TRAP_TERM = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: print("got TERM", flush=True))
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


async def wait_output(handle: Supervised, marker: bytes, stream: Stream = "stdout") -> None:
    await wait_for_async(
        f"{marker!r} on {stream}",
        lambda: marker in handle.read_output(stream)[0],
        guard_s=GUARD_S,
        every_s=0.01,
    )


async def wait_file(path: Path) -> str:
    def whole_line() -> str | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return text if text.endswith("\n") else None

    text, _ = await wait_for_async(f"a line in {path.name}", whole_line, every_s=0.01)
    return text


async def wait_exited(task_dir: Path) -> SupervisorState:
    state, _ = await wait_for_async(
        "the final state",
        lambda: (s := read_state(task_dir)) is not None and s.status == "exited" and s,
        guard_s=GUARD_S,
        every_s=0.05,
    )
    return state


async def wait_gone(what: str, alive: Callable[[], bool]) -> None:
    await wait_for_async(what, lambda: not alive(), guard_s=GUARD_S, every_s=0.01)


def report(name: str, outcome: TaskOutcome) -> None:
    print(
        f"\n{name}: reason={outcome.stop_reason} exit={outcome.exit_code} "
        f"signal={outcome.signal} isolation={outcome.isolation}",
        end="",
    )
    if outcome.deadline_boot is not None and outcome.stopped_at_boot is not None:
        print(
            f" gone {outcome.deadline_boot - outcome.stopped_at_boot:.3f}s before deadline", end=""
        )


async def test_runs_to_completion_and_keeps_a_bounded_tail(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    code = textwrap.dedent(
        """
        import sys
        out = bytes(i % 251 for i in range(300_000))
        for i in range(0, len(out), 7_000):
            sys.stdout.buffer.write(out[i:i + 7_000]); sys.stdout.flush()
        sys.stderr.write("e" * 2_500)
        sys.exit(3)
        """
    )
    spec = tasks.spec(task_id, tasks.python_argv(code), output_cap_bytes=10_000)
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    outcome = await handle.wait()
    assert outcome.stop_reason == "exited"
    assert (outcome.exit_code, outcome.signal) == (3, None)
    assert outcome.stdout_total_bytes == 300_000
    assert outcome.stderr_total_bytes == 2_500
    expected = bytes(i % 251 for i in range(300_000))
    data, next_offset, total = handle.read_output("stdout", 0, 1 << 20)
    assert (data, next_offset, total) == (expected[-10_000:], 300_000, 300_000)
    # Reading on from an offset inside the kept tail, in small pieces.
    data, next_offset, total = handle.read_output("stdout", 295_000, 3_000)
    assert (data, next_offset, total) == (expected[295_000:298_000], 298_000, 300_000)
    assert handle.read_output("stderr", 0, 100) == (b"e" * 100, 100, 2_500)
    assert tail(task_dir, "stdout", 100) == expected[-100:]
    assert tail(task_dir, "stderr", 1 << 20) == b"e" * 2_500
    # On disk: the finished file holds exactly the kept tail (plus its header).
    assert (task_dir / "stdout").stat().st_size <= 10_000 + 100
    state = handle.state()
    assert (state.stdout.total_bytes, state.stdout.kept_bytes) == (300_000, 10_000)
    assert state.status == "exited" and state.pgid == state.child_pid


async def test_task_gets_exactly_its_environment(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    os.environ["POPULI_TEST_AGENT_SECRET"] = "must-not-leak"
    try:
        spec = tasks.spec(task_id, ["env", "-0"], passed={"FOO": "bar"})
        handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
        outcome = await handle.wait()
    finally:
        del os.environ["POPULI_TEST_AGENT_SECRET"]
    assert outcome.exit_code == 0
    data = tail(task_dir, "stdout", 1 << 20)
    seen = dict(item.split("=", 1) for item in data.decode().split("\0") if item)
    assert seen == dict(spec.env)
    assert seen["FOO"] == "bar" and seen["POPULI_TASK_ID"] == task_id
    assert seen["CUDA_VISIBLE_DEVICES"] == ""


def set_deadline(task_dir: Path, deadline_boot: float) -> None:
    """Write the deadline file as the agent does (atomically), earlier values included."""
    _files.write_atomic(task_dir / "deadline", _files.format_deadline(deadline_boot))


async def test_deadline_without_renewal_stops_before_it(tasks: Tasks, isolation: str) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sleep", "1000"], isolation=isolation)
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    assert handle.state().isolation == isolation
    # The last renewal granted 0.8 s more; none follows. (Set once the task runs, so
    # that a slow start on a loaded machine cannot turn this into "never started".)
    deadline = tasks.boot_now() + 0.8
    set_deadline(task_dir, deadline)
    outcome = await handle.wait()
    report("deadline", outcome)
    assert outcome.stop_reason == "deadline"
    assert outcome.signal == signal.SIGTERM
    assert outcome.deadline_boot == deadline
    assert outcome.stopped_at_boot is not None and outcome.stopped_at_boot <= deadline
    state = handle.state()
    assert state.stop_requested_at_boot is not None
    assert state.stop_requested_at_boot >= deadline - spec.stop_margin_s
    if isolation == "cgroup":
        assert state.cgroup is not None and not Path(state.cgroup).exists()


async def test_extend_deadline_keeps_it_running(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    code = "import time; time.sleep(1.5); print('done', flush=True)"
    spec = tasks.spec(task_id, tasks.python_argv(code), stop_margin_s=0.3, kill_grace_s=0.1)
    first_deadline = tasks.boot_now() + 0.8
    handle = await start_supervised(task_dir, spec, first_deadline)
    # An earlier deadline is ignored: renewals only extend.
    handle.extend_deadline(first_deadline - 10)
    assert float((task_dir / "deadline").read_text()) == first_deadline
    with trio.fail_after(20):
        while handle.state().status != "exited":
            handle.extend_deadline(tasks.boot_now() + 0.8)
            await trio.sleep(0.1)
    outcome = await handle.wait()
    assert (outcome.stop_reason, outcome.exit_code) == ("exited", 0)
    assert outcome.stopped_at_boot is not None and outcome.stopped_at_boot > first_deadline
    assert tail(task_dir, "stdout", 100) == b"done\n"


async def test_sigterm_trapped_is_sigkilled_after_grace(tasks: Tasks, isolation: str) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, tasks.python_argv(TRAP_TERM), kill_grace_s=0.3, isolation=isolation)
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    await wait_output(handle, b"ready")
    handle.cancel()
    outcome = await handle.wait()
    state = handle.state()
    assert outcome.stop_reason == "cancelled"
    assert outcome.signal == signal.SIGKILL
    assert b"got TERM" in tail(task_dir, "stdout", 1000)
    assert state.stop_requested_at_boot is not None and state.sigkill_at_boot is not None
    assert state.sigkill_at_boot - state.stop_requested_at_boot >= spec.kill_grace_s
    assert outcome.stopped_at_boot is not None
    print(
        f"\nkill latency ({isolation}): SIGKILL to empty "
        f"{(outcome.stopped_at_boot - state.sigkill_at_boot) * 1000:.1f} ms",
        end="",
    )


ESCAPES = textwrap.dedent(
    """
    import os, subprocess, sys, time
    # A grandchild in its own session (setsid), left running in the background.
    p = subprocess.Popen(["setsid", "sleep", "1000"])
    # A double fork: the middle process exits, the grandchild is orphaned.
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, b"%d\\n" % os.getpid())
            os.execvp("sleep", ["sleep", "1000"])
        os._exit(0)
    double = int(os.read(r, 100))
    with open("escaped.pids", "w") as f:
        f.write(f"{p.pid} {double}\\n")
    sys.exit(0)
    """
)


async def test_late_stop_skips_the_grace(tasks: Tasks) -> None:
    """What a machine waking from suspend after the deadline sees: SIGKILL at once."""
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, tasks.python_argv(TRAP_TERM), stop_margin_s=30.0, kill_grace_s=20.0)
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    await wait_output(handle, b"ready")
    set_deadline(task_dir, tasks.boot_now() - 60.0)
    outcome = await handle.wait()
    state = handle.state()
    assert (outcome.stop_reason, outcome.signal) == ("deadline", signal.SIGKILL)
    assert state.stop_requested_at_boot is not None and state.sigkill_at_boot is not None
    # No 20 s grace was granted (the guard is generous, the point is "no grace").
    assert state.sigkill_at_boot - state.stop_requested_at_boot < spec.kill_grace_s


async def test_escaped_descendants_are_killed_when_the_command_exits(
    tasks: Tasks, isolation: str
) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, tasks.python_argv(ESCAPES), isolation=isolation)
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    outcome = await handle.wait()
    assert (outcome.stop_reason, outcome.exit_code) == ("exited", 0)
    escaped = [int(x) for x in (tasks.tmp_path / "escaped.pids").read_text().split()]
    assert len(escaped) == 2
    for pid in escaped:
        assert not _proc.is_running(pid), f"escaped process {pid} survived"
    assert tasks.live_task_pids(task_id) == []


async def test_cancel_stops_the_task(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sh", "-c", "echo up; exec sleep 1000"])
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    await wait_output(handle, b"up")
    # The task leads its own session and process group, away from the agent's terminal.
    child = handle.state().child_pid
    assert child is not None
    child_stat = _proc.read_stat(child)
    assert child_stat is not None
    assert (child_stat.session, child_stat.pgrp) == (child, child)
    assert _proc.read_stat(handle.supervisor_pid).session != os.getsid(0)  # type: ignore[union-attr]
    handle.cancel()
    outcome = await handle.wait()
    report("cancel", outcome)
    assert outcome.stop_reason == "cancelled"
    assert outcome.signal == signal.SIGTERM


async def test_sigterm_to_the_supervisor_stops_the_task(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sh", "-c", "echo up; exec sleep 1000"])
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    await wait_output(handle, b"up")
    os.kill(handle.supervisor_pid, signal.SIGTERM)
    outcome = await handle.wait()
    assert (outcome.stop_reason, outcome.signal) == ("cancelled", signal.SIGTERM)


async def test_dropped_handle_still_stops_at_the_deadline(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sleep", "1000"])
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    deadline = tasks.boot_now() + 0.8
    set_deadline(task_dir, deadline)
    del handle
    state = await wait_exited(task_dir)
    assert state.stop_reason == "deadline"
    assert state.stopped_at_boot is not None and state.stopped_at_boot <= deadline


LAUNCHER = textwrap.dedent(
    """
    import json, sys, trio
    from pathlib import Path
    from populi_peer.exec import TaskSpec, start_supervised

    async def main():
        task_dir, spec, deadline = Path(sys.argv[1]), TaskSpec.from_json(json.loads(sys.argv[2])), float(sys.argv[3])
        handle = await start_supervised(task_dir, spec, deadline)
        print(handle.supervisor_pid)

    trio.run(main)
    """
)


async def test_launcher_that_exits_leaves_the_deadline_enforced(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sleep", "1000"])
    deadline = tasks.boot_now() + 2.0
    launcher = await trio.run_process(
        [sys.executable, "-c", LAUNCHER, str(task_dir), json.dumps(spec.to_json()), repr(deadline)],
        env=tasks.python_env(),
        capture_stdout=True,
    )
    supervisor_pid = int(launcher.stdout)
    launcher_gone_at = tasks.boot_now()
    state = await wait_exited(task_dir)
    print(f"\nlauncher exited {deadline - launcher_gone_at:.2f}s before the deadline", end="")
    assert state.supervisor_pid == supervisor_pid
    assert state.stop_reason == "deadline"
    if state.child_pid is None:
        # A loaded machine: the supervisor came up after deadline - margin and rightly
        # refused to start what the lease no longer covered.
        print(", the command never started", end="")
    else:
        assert state.stopped_at_boot is not None and state.stopped_at_boot <= deadline


async def test_supervisor_killed_child_dies_and_kill_orphan_cleans_up(
    tasks: Tasks, isolation: str
) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(
        task_id,
        ["sh", "-c", "sleep 1000 & echo $! > grandchild.pid; exec sleep 1000"],
        isolation=isolation,
    )
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    grandchild = int(await wait_file(tasks.tmp_path / "grandchild.pid"))
    state = handle.state()
    assert state.child_pid is not None
    os.kill(handle.supervisor_pid, signal.SIGKILL)
    child_pid = state.child_pid
    await wait_gone(
        "the supervisor and its main process",
        lambda: handle.alive() or _proc.is_running(child_pid),
    )
    # PR_SET_PDEATHSIG took the main process down with the supervisor; the grandchild
    # does not inherit it, and nobody is left to stop it.
    assert _proc.is_running(grandchild)
    assert adopt(task_dir) is None
    with pytest.raises(SupervisorLost):
        await handle.wait()
    assert await kill_orphan(task_dir) is True
    assert not _proc.is_running(grandchild)
    assert tasks.live_task_pids(task_id) == []
    if isolation == "cgroup":
        assert state.cgroup is not None and not Path(state.cgroup).exists()
    assert await kill_orphan(task_dir) is False


async def test_process_group_mode_loses_what_left_the_session_after_supervisor_death(
    tasks: Tasks,
) -> None:
    """What escapes process-group isolation: after the supervisor died, processes that
    left the task's session cannot be found (with a cgroup they can, see above)."""
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(
        task_id,
        ["sh", "-c", "setsid sleep 1000 & echo $! > escaped.pid; exec sleep 1000"],
        isolation="process_group",
    )
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    escaped = int(await wait_file(tasks.tmp_path / "escaped.pid"))
    os.kill(handle.supervisor_pid, signal.SIGKILL)
    await wait_gone("the supervisor", handle.alive)
    try:
        await kill_orphan(task_dir)
        assert _proc.is_running(escaped), "a setsid process outside any cgroup was found?"
    finally:
        os.kill(escaped, signal.SIGKILL)
    settle(lambda: not _proc.is_running(escaped), guard_s=5)


async def test_adopt_after_restart(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sleep", "1000"], stop_margin_s=0.2, kill_grace_s=0.1)
    first_deadline = tasks.boot_now() + 1.2
    original = await start_supervised(task_dir, spec, first_deadline)
    del original  # the "agent" restarts
    adopted = adopt(task_dir)
    assert adopted is not None and adopted.alive()
    assert adopted.state().status == "running"
    adopted.extend_deadline(tasks.boot_now() + FAR_S)
    await trio.sleep(max(0.0, first_deadline - tasks.boot_now()) + 0.1)
    assert adopted.state().status == "running"
    adopted.cancel()
    outcome = await adopted.wait()
    assert outcome.stop_reason == "cancelled"
    await wait_gone("the adopted supervisor", adopted.alive)
    assert adopt(task_dir) is None


async def test_adopt_refuses_a_reused_pid(tmp_path: Path) -> None:
    me = os.getpid()
    real_start = _proc.starttime_ticks(me)
    assert real_start is not None

    def fake(name: str, pid: int, start: int) -> Path:
        task_dir = tmp_path / name
        task_dir.mkdir()
        state = {
            "v": 1,
            "task_id": name,
            "attempt": 1,
            "supervisor_pid": pid,
            "supervisor_starttime_ticks": start,
            "status": "running",
            "isolation": "process_group",
            "child_pid": None,
            "pgid": None,
        }
        (task_dir / "state.json").write_text(json.dumps(state))
        return task_dir

    # A live, unrelated process under the recorded pid: the start time gives it away.
    reused = fake("reused", me, real_start + 1)
    assert adopt(reused) is None
    assert await kill_orphan(reused) is False  # and it is not killed either
    # The same record with the right start time would be adopted: the guard is the time.
    assert adopt(fake("same", me, real_start)) is not None
    assert adopt(fake("gone", 2**22 + 12345, 1)) is None
    assert adopt(tmp_path / "nothing-here") is None


async def test_missing_command_is_127(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["populi-no-such-command-anywhere"])
    with pytest.raises(SpawnFailed) as info:
        await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    assert info.value.details["exit_code"] == 127
    state = read_state(task_dir)
    assert state is not None
    assert (state.status, state.stop_reason, state.exit_code) == ("exited", "spawn_failed", 127)
    assert state.child_pid is None and state.cgroup is None


async def test_not_executable_is_126(tasks: Tasks) -> None:
    script = tasks.tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho never\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, [str(script)])
    with pytest.raises(SpawnFailed) as info:
        await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    assert info.value.details["exit_code"] == 126
    state = read_state(task_dir)
    assert state is not None and (state.stop_reason, state.exit_code) == ("spawn_failed", 126)


async def test_auto_falls_back_to_a_process_group_without_a_cgroup(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    not_a_cgroup = tasks.tmp_path / "not-a-cgroup"
    spec = dataclasses.replace(tasks.spec(task_id, ["true"]), cgroup_parent=str(not_a_cgroup))
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    outcome = await handle.wait()
    assert (outcome.stop_reason, outcome.exit_code, outcome.isolation) == (
        "exited",
        0,
        "process_group",
    )
    assert "isolation=process_group" in (task_dir / "supervisor.log").read_text()


async def test_required_cgroup_refuses_to_run_without_one(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = dataclasses.replace(
        tasks.spec(task_id, ["true"], isolation="cgroup"),
        cgroup_parent=str(tasks.tmp_path / "not-a-cgroup"),
    )
    with pytest.raises(SpawnFailed, match="cgroup isolation required") as info:
        await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    assert info.value.details["exit_code"] == 126


@pytest.mark.parametrize("damage", ["garble", "remove", "infinite"])
async def test_unreadable_deadline_stops_at_once(tasks: Tasks, damage: str) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["sleep", "1000"])
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    damaged_at = tasks.boot_now()
    if damage == "garble":
        (task_dir / "deadline").write_text("soon-ish\n")
    elif damage == "remove":
        (task_dir / "deadline").unlink()
    else:
        (task_dir / "deadline").write_text("inf\n")
    outcome = await handle.wait()
    assert outcome.stop_reason == "deadline"
    assert outcome.deadline_boot is None
    assert outcome.stopped_at_boot is not None
    print(f"\n{damage}: stopped {outcome.stopped_at_boot - damaged_at:.3f}s after", end="")


async def test_expired_deadline_never_starts_the_command(tasks: Tasks) -> None:
    """Run by hand (not detached), with a garbled deadline: nothing starts, exit 124."""
    task_id, task_dir = tasks.new_dir()
    task_dir.mkdir()
    spec = tasks.spec(task_id, ["sh", "-c", "touch started"])
    (task_dir / "spec.json").write_text(json.dumps(spec.to_json()))
    (task_dir / "deadline").write_text("not a number\n")
    result = await trio.run_process(
        [sys.executable, "-m", "populi_peer.exec.supervisor", str(task_dir)],
        env=tasks.python_env(),
        check=False,
        capture_stderr=True,
    )
    assert result.returncode == 124
    state = read_state(task_dir)
    assert state is not None
    assert (state.status, state.stop_reason, state.child_pid) == ("exited", "deadline", None)
    assert not (tasks.tmp_path / "started").exists()
    assert b"not starting" in result.stderr


async def test_task_dir_is_single_use(tasks: Tasks) -> None:
    task_id, task_dir = tasks.new_dir()
    spec = tasks.spec(task_id, ["true"])
    handle = await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)
    await handle.wait()
    with pytest.raises(TaskDirInUse):
        await start_supervised(task_dir, spec, tasks.boot_now() + FAR_S)


def test_task_group_guard_refuses_strangers() -> None:
    mount = _cgroup.cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 here")
    assert not _cgroup.looks_like_task_group(mount[0], "t", 1)
    assert not _cgroup.looks_like_task_group(mount[0] / "populi.slice" / "other", "t", 1)
    assert _cgroup.looks_like_task_group(mount[0] / "populi.slice" / "task-t-1", "t", 1)
    assert not _cgroup.looks_like_task_group(Path("/tmp/task-t-1"), "t", 1)


async def test_leftovers_tells_whether_a_lease_may_be_released(tmp_path: Path) -> None:
    """A lease is released as stopped only when nothing the task directory records can
    still run: a live supervisor counts, an exited one does not, nor an empty directory."""
    from populi_peer.clock import boot_time
    from populi_peer.exec import TaskSpec, kill_orphan, leftovers, start_supervised

    task_dir = tmp_path / "t"
    assert not leftovers(task_dir)
    spec = TaskSpec(
        task_id="lo-1",
        attempt=1,
        argv=("sleep", "30"),
        env={"PATH": "/usr/bin:/bin"},
        cwd=str(tmp_path),
        stop_margin_s=1.0,
        kill_grace_s=0.5,
    )
    supervised = await start_supervised(task_dir, spec, boot_time() + 60)
    try:
        assert leftovers(task_dir)
        supervised.cancel()
        await supervised.wait()
        assert not leftovers(task_dir)
    finally:
        await kill_orphan(task_dir)
