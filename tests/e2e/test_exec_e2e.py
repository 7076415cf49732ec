"""The execution plane end to end: real agents, real supervisors, real TLS and SQLite on
loopback, under short leases (TTL 6 s, expiry margin 2 s, worker stop margin 2 s).

The mesh (module-scoped, healed after every test): ``cp``, the control plane, CPU only;
``w1`` and ``w2``, one replayed H100 each. ``populi run --gpus 1`` from ``w1`` places the
task on ``w2`` (the only other GPU node), and a fallback runs it on ``w1``.

Tasks follow the tick protocol (``exec_support.TICK_SCRIPT``): a line ``node attempt pid
time_ns token boot_ns index`` every 100 ms into a file under ``tmp_path`` that every
attempt can reach. From it the tests read where each attempt ran, with which token, and
that no attempt ticked after the next one began (safety rule 1).

Timings are printed, never asserted; what is asserted is that events happen, in order,
within generous guard timeouts. The one time bound asserted is the safety contract's:
a task whose holder cannot renew is gone before its lease deadline (safety rule 3),
compared on the same clock (CLOCK_BOOTTIME) the supervisor enforces it on.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` pin product bugs found here; each
fails today for the reason it names, and turns red (XPASS) once the bug is fixed.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from e2e.exec_support import (
    LEASE_TTL_S,
    MARK,
    MARK_NAME,
    STOP_MARGIN_S,
    TERMINAL,
    Mesh,
    accepted_results,
    check_tick_order,
    deadline_boot_ns,
    grant_as_cp,
    kill_pids,
    leftovers,
    log_events,
    marked_pids,
    read_ticks,
    supervisor_state,
    task_pids,
    tick_command,
    ticks_of,
    token_key,
    wait_for,
    wait_renewal,
    wait_ticks,
)

from populi_peer.agent.submitter import handoff_message
from populi_peer.store.tasks import TaskRecord
from support.procs import POPULI, pid_alive, populi

pytestmark = pytest.mark.e2e

#: A longer lease for the restart scenarios: a restart (stop + start of a Python agent on
#: two busy cores) must fit between two renewals, and TTL 6 s leaves only 4 s before the
#: supervisor stops the task.
RESTART_TTL_S = 15
#: A lease too short for the workers' stop margin: they refuse it (see refused_handoff).
REFUSED_TTL_S = 3


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started = time.monotonic()
    built = Mesh.create(tmp_path_factory.mktemp("exec-mesh"), ["w1", "w2"])
    print(f"\nmesh of 3 agents up in {time.monotonic() - started:.1f} s")
    try:
        yield built
    finally:
        built.close()


@pytest.fixture(autouse=True)
def no_orphans(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Scenario 7: after each test no process of any task it started is alive (found by
    the mark every task carries, and supervisors by their task directory). Heals the
    shared mesh first: a stopped agent continues, a dead one starts again."""
    yield
    base = tmp_path_factory.getbasetemp()
    if "mesh" in request.fixturenames:
        mesh: Mesh = request.getfixturevalue("mesh")
        mesh.heal()
    try:
        wait_for(
            "no task process or supervisor left", lambda: not leftovers(base) or None, guard_s=30
        )
    finally:
        left = leftovers(base)
        kill_pids(left)
    assert not left, f"processes left behind: {left}"


@contextmanager
def lease_ttl(mesh: Mesh, ttl_s: int) -> Iterator[None]:
    took = mesh.settings(max_lease_ttl_s=str(ttl_s))
    print(f"max_lease_ttl_s={ttl_s} reached every node in {took:.1f} s")
    try:
        yield
    finally:
        # (If the control plane is down, the autouse fixture heals the mesh and restores it.)
        if mesh["cp"].alive() and mesh.ttl_s != LEASE_TTL_S:
            mesh.settings(max_lease_ttl_s=str(LEASE_TTL_S))


# -- helpers ------------------------------------------------------------------------------


def ticking_on_w2(
    mesh: Mesh, ticks: Path, *, n1: int, n2: int = 10, count: int = 3
) -> tuple[str, Path]:
    """A one-GPU ticking task (:func:`tick_command`) submitted on w1 and run on w2, once
    its first attempt ticked ``count`` times: its id and that attempt's directory on w2."""
    task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=n1, n2=n2))
    wait_ticks(ticks, 1, count=count)
    return task_id, mesh.task_dir("w2", "worker", task_id, 1)


def stop_after_renewal(mesh: Mesh, name: str, task_dir: Path) -> float:
    """Stops ``name``'s agent right after a renewal of the lease of ``task_dir``'s attempt
    landed, and checks it exited cleanly; returns the seconds from the renewal to its exit."""
    wait_renewal(task_dir)
    renewed = time.monotonic()
    assert mesh.stop(name, timeout=60) == 0
    return time.monotonic() - renewed


def attempt_pids(task_id: str, attempt: int) -> list[int]:
    return [
        pid
        for pid in task_pids(task_id)
        if pid in marked_pids(f"POPULI_ATTEMPT={attempt}".encode())
    ]


def one_remote_success(mesh: Mesh, task: dict[str, Any], ticks: list[Any], n: int) -> None:
    """The task ran once, remotely on w2, to its end, and nothing ran on w1."""
    assert task["state"] == "succeeded", task["reasons"]
    assert task["exit_status"] == 0
    assert len(task["attempts"]) == 1, task["attempts"]
    attempt = task["attempts"][0]
    assert attempt["where"] == "remote" and attempt["node"] == mesh["w2"].node_id
    assert attempt["outcome"] == "succeeded"
    assert not any(r[1] == "lease_dead_confirmed" for r in task["reasons"]), task["reasons"]
    by_attempt = check_tick_order(ticks)
    assert set(by_attempt) == {1}
    assert {t.node for t in ticks} == {"w2"}
    assert len(ticks) == n, f"{len(ticks)} ticks, expected {n}: the task was cut short or rerun"
    assert ticks[0].token == attempt["token"]
    accepted = accepted_results(task)
    assert len(accepted) == 1 and f"token={attempt['token']} " in accepted[0][2], accepted
    (lease,) = mesh.leases(task=task["task_id"])
    assert lease["state"] == "completed" and lease["token"] == attempt["token"], lease
    assert not mesh.task_dir("w1", "local", task["task_id"], 1).exists()


def fallback_checks(
    mesh: Mesh, task_id: str, ticks_path: Path, n2: int
) -> tuple[dict[str, Any], dict[int, list[Any]]]:
    """The task of a dead remote lease fell back and finished locally, once."""
    task = mesh.show("w1", task_id)
    assert task["state"] == "succeeded", task["reasons"]
    assert task["exit_status"] == 0
    first, second = task["attempts"]
    assert (first["where"], first["node"], first["outcome"]) == (
        "remote",
        mesh["w2"].node_id,
        "lease_dead",
    )
    assert (second["where"], second["node"], second["outcome"]) == (
        "local",
        mesh["w1"].node_id,
        "succeeded",
    )
    assert "lease_dead_confirmed" in second["placement_reasons"]
    assert token_key(second["token"]) > token_key(first["token"])
    by_attempt = check_tick_order(read_ticks(ticks_path))
    assert set(by_attempt) == {1, 2}, "the remote attempt did not run, or a third one did"
    assert {t.node for t in by_attempt[1]} == {"w2"} and {t.node for t in by_attempt[2]} == {"w1"}
    assert by_attempt[1][0].token == first["token"] and by_attempt[2][0].token == second["token"]
    assert len(by_attempt[2]) == n2
    accepted = accepted_results(task)
    assert len(accepted) == 1 and f"token={second['token']} " in accepted[0][2], accepted
    leases = {lease["lease_id"]: lease for lease in mesh.leases(task=task_id)}
    assert leases[first["lease_id"]]["state"] == "expired", leases
    local = leases[second["lease_id"]]
    assert local["kind"] == "local" and local["holder"] == mesh["w1"].node_id
    assert local["state"] == "completed", local
    return task, by_attempt


def stopped_before_deadline(task_dir: Path, attempt_ticks: list[Any]) -> None:
    """safety rule 3 on the worker: with no renewal after the agent went away, the
    supervisor stopped the task by itself, and its last tick came before the lease
    deadline (both on CLOCK_BOOTTIME)."""
    state = supervisor_state(task_dir)
    assert state["status"] == "exited" and state["stop_reason"] == "deadline", state
    deadline_ns = deadline_boot_ns(task_dir)
    last_ns = max(t.boot_ns for t in attempt_ticks)
    assert last_ns < deadline_ns, (
        f"attempt ticked {(last_ns - deadline_ns) / 1e6:.0f} ms after its lease deadline"
    )
    assert not pid_alive(int(state["supervisor_pid"]))
    print(
        f"last tick {(deadline_ns - last_ns) / 1e9:.2f} s before the deadline "
        f"(stop margin {STOP_MARGIN_S:g} s)"
    )


def reason_at(task: dict[str, Any], code: str) -> int:
    return int(next(r[0] for r in task["reasons"] if r[1] == code))


def sent_handoff(mesh: Mesh, name: str, task_id: str) -> dict[str, Any]:
    """The handoff ``name``'s submitter sent for ``task_id``'s current attempt, rebuilt
    from its own database (``submitter.handoff_message``)."""
    record = TaskRecord.from_json(mesh.task_record(name, task_id))
    attempt = record.task.current_attempt
    assert attempt is not None and attempt.lease_id is not None
    message = handoff_message(
        record.task,
        record.leases[attempt.lease_id],
        default_ttl_s=float(LEASE_TTL_S),
        settings_serial=None,
    )
    return message.to_json()


def run_one_gpu_task(data_dir: Path, ticks: Path, n: int) -> subprocess.CompletedProcess[str]:
    """``populi run --gpus 1`` of a task that ticks ``n`` times (twice over), waited for."""
    return populi(
        "run",
        "--gpus",
        "1",
        "--data-dir",
        str(data_dir),
        *tick_command(ticks, n1=n, n2=n),
        timeout=120,
    )


def stale_result(task_id: str, suffix: str, *, exit_code: int) -> dict[str, Any]:
    """A result from w2 for attempt 1 of ``task_id`` under the stale token 1.0."""
    return {
        "message_id": f"result-{task_id}-1-{suffix}",
        "type": "result",
        "task_id": task_id,
        # Required by the contract (ADR 0012); the submitter takes the signer anyway.
        "node": "w2",
        "attempt": 1,
        "token": "1.0",
        "outcome": "exited",
        "exit_code": exit_code,
        "signal": None,
    }


# -- 1. lease success ---------------------------------------------------------------------


def test_remote_attempt_completes_under_its_lease(mesh: Mesh, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    started = time.monotonic()
    run = run_one_gpu_task(mesh["w1"].data_dir, ticks, 10)
    print(f"populi run (remote, 1 s task) took {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.stderr
    assert "ticked 10 times on w2 attempt 1" in run.stdout, run.stdout
    task_id = next(
        line.split()[1] for line in run.stderr.splitlines() if " attempt 1: remote" in line
    )
    task = mesh.show("w1", task_id)
    one_remote_success(mesh, task, read_ticks(ticks), 10)
    (lease,) = mesh.leases(task=task_id)
    assert lease["kind"] == "remote" and lease["holder"] == mesh["w2"].node_id
    assert task["results"]["1"]["gpus"] == lease["gpus"] and len(lease["gpus"]) == 1
    (row,) = [r for r in mesh.worker_attempts("w2") if r["task_id"] == task_id]
    assert row["state"] == "finished" and row["delivered_ms"] is not None


# -- 2. lease expiry after the worker's agent dies --------------------------------------------


def test_sigkilled_worker_agent_task_stops_before_deadline_then_falls_back(
    mesh: Mesh, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    task_id, task_dir = ticking_on_w2(mesh, ticks, n1=600)
    mesh.stop("w2", signal.SIGKILL)
    killed_wall_ms = int(time.time() * 1000)
    killed = time.monotonic()
    try:
        wait_ticks(ticks, 2, count=1, guard_s=90)
        fell_back = time.monotonic() - killed
        # Attempt 1 is gone, all of it, before attempt 2 starts.
        assert attempt_pids(task_id, 1) == []
        stopped_before_deadline(task_dir, ticks_of(ticks, 1))
        waited = mesh.wait_cli("w1", task_id)
        assert waited.returncode == 0, waited.stderr
        task, _ = fallback_checks(mesh, task_id, ticks, 10)
        confirmed = reason_at(task, "lease_dead_confirmed")
        print(
            f"fallback after SIGKILL: lease declared dead {(confirmed - killed_wall_ms) / 1000:.1f} s "
            f"after the kill, first local tick {fell_back:.1f} s after it "
            f"(TTL {LEASE_TTL_S} s + margin)"
        )
        assert task_pids(task_id) == []
    finally:
        mesh.start("w2")


# -- 3. the worker's agent paused past its deadline ----------------------------------------


def test_sigstopped_worker_agent_supervisor_stops_task_late_result_ignored(
    mesh: Mesh, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    w2 = mesh["w2"]
    task_id, task_dir = ticking_on_w2(mesh, ticks, n1=600)
    os.kill(w2.pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        wait_ticks(ticks, 2, count=1, guard_s=90)
        print(f"fallback after SIGSTOP: first local tick {time.monotonic() - paused:.1f} s later")
        # The supervisor, a separate process, stopped the task although its agent never ran.
        stopped_before_deadline(task_dir, ticks_of(ticks, 1))
        assert attempt_pids(task_id, 1) == []
    finally:
        os.kill(w2.pid, signal.SIGCONT)
    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 0, waited.stderr
    # The woken worker finds its attempt stopped and delivers that (late) result.
    (row,), took = mesh.wait_delivered(
        "w2", task_id, what="the woken worker delivers its late result"
    )
    print(f"late result delivered {took:.1f} s after the task ended")
    late = json.loads(row["result"])
    assert late["outcome"] == "lease_lost" and late["stop_reason"] == "deadline", late
    task, _ = fallback_checks(mesh, task_id, ticks, 10)
    # Recorded (attempt 1's result is there, from w2, with its old token), and ignored.
    recorded = task["results"]["1"]
    assert recorded["node"] == w2.node_id and recorded["token"] == task["attempts"][0]["token"]
    assert recorded["outcome"] == "lease_lost"
    assert task["results"]["2"]["outcome"] == "exited"


# -- 5. duplicate handoffs and results ---------------------------------------------------------


def test_duplicate_handoff_and_duplicate_or_stale_results(mesh: Mesh, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=40, n2=10))
    wait_ticks(ticks, 1)
    handoff = sent_handoff(mesh, "w1", task_id)
    token = handoff["token"]
    assert token_key(token) > (1, 0)
    with mesh.client("w2", mesh.credential("w1")) as to_worker:
        # The very message the submitter sent: the inbox answers it from its record.
        again = to_worker.post("/v1/populi/inbox", json=handoff)
        assert again.status_code == 200, again.text
        assert again.json()["duplicate"] is True
        assert again.json()["result"]["verdict"] == "start"
        # The same handoff under a new message id reaches the worker's fence: equal token.
        fresh = {**handoff, "message_id": handoff["message_id"] + "-again"}
        for _ in range(2):
            answer = to_worker.post("/v1/populi/inbox", json=fresh)
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"]["verdict"] == "duplicate", answer.json()
        # A lower token for the same task is refused.
        stale = {**handoff, "message_id": handoff["message_id"] + "-stale", "token": "1.0"}
        refused = to_worker.post("/v1/populi/inbox", json=stale)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "stale_token"
    # While it runs: a result with a stale token, posted by the holder, is recorded, ignored.
    with mesh.client("w1", mesh.credential("w2")) as to_submitter:
        bogus = stale_result(task_id, "stale", exit_code=0)
        answer = to_submitter.post("/v1/populi/inbox", json=bogus)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == {"accepted": False, "state": "running_remote"}
    record = mesh.task_record("w1", task_id)
    assert record["task"]["state"] == "running_remote"
    assert [r[1] for r in record["task"]["reasons"]].count("stale_result") == 1
    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 0, waited.stderr
    (row,), _ = mesh.wait_delivered("w2", task_id)
    # The worker's own result, delivered again: by the same id, and under a new one.
    result = {"message_id": f"result-{task_id}-1", "type": "result", **json.loads(row["result"])}
    with mesh.client("w1", mesh.credential("w2")) as to_submitter:
        same = to_submitter.post("/v1/populi/inbox", json=result)
        assert same.status_code == 200 and same.json()["duplicate"] is True, same.text
        renamed = to_submitter.post(
            "/v1/populi/inbox", json={**result, "message_id": f"result-{task_id}-1-again"}
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["result"]["state"] == "succeeded"
    task_after = mesh.show("w1", task_id)
    one_remote_success(mesh, task_after, read_ticks(ticks), 40)
    assert task_after["results"]["1"]["token"] == token
    assert task_after["results"]["1"]["outcome"] == "exited"
    # One worker attempt, started once.
    rows = [r for r in mesh.worker_attempts("w2") if r["task_id"] == task_id]
    assert len(rows) == 1
    assert len(log_events(mesh["w2"].log(), "handoff accepted", task_id=task_id)) == 1
    assert len(log_events(mesh["w2"].log(), "attempt started", task_id=task_id)) == 1


def test_stale_result_after_the_end_keeps_the_accepted_record(mesh: Mesh, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=3, n2=3))
    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 0, waited.stderr
    mesh.wait_delivered("w2", task_id)
    accepted = mesh.show("w1", task_id)["results"]["1"]
    with mesh.client("w1", mesh.credential("w2")) as to_submitter:
        late = to_submitter.post(
            "/v1/populi/inbox", json=stale_result(task_id, "stale-late", exit_code=3)
        )
        assert late.status_code == 200, late.text
        assert late.json()["result"]["state"] == "succeeded"
    after = mesh.show("w1", task_id)
    assert after["state"] == "succeeded" and after["exit_status"] == 0
    assert accepted_results(after) == accepted_results(mesh.show("w1", task_id))
    # The record of what attempt 1 returned is still the accepted one, and so its output.
    assert after["results"]["1"]["token"] == accepted["token"], after["results"]["1"]
    assert after["results"]["1"]["exit_code"] == 0
    with mesh.client("w1", mesh.credential("w1")) as own:
        output = own.get(f"/v1/populi/tasks/{task_id}/output", params={"attempt": 1})
        assert output.status_code == 200, output.text
    assert b"ticked 3 times on w2" in base64.b64decode(output.json()["data_b64"])


# -- 6. the worker's agent restarts mid-task ---------------------------------------------------


def test_worker_agent_restart_readopts_supervisor_task_completes_once(
    mesh: Mesh, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    w2 = mesh["w2"]
    with lease_ttl(mesh, RESTART_TTL_S):
        task_id, task_dir = ticking_on_w2(mesh, ticks, n1=120, count=1)
        supervisor = int(supervisor_state(task_dir)["supervisor_pid"])
        down = stop_after_renewal(mesh, "w2", task_dir)
        down_at = len(read_ticks(ticks))
        # The task outlives its agent: the supervisor keeps it running.
        assert pid_alive(supervisor)
        log_before = len(w2.log())
        took = mesh.start("w2")
        print(f"worker agent stopped {down:.1f} s after a renewal, back {took:.1f} s later")
        assert len(read_ticks(ticks)) > down_at
        waited = mesh.wait_cli("w1", task_id)
        assert log_events(w2.log()[log_before:], "attempt re-adopted", task_id=task_id)
    assert waited.returncode == 0, waited.stderr
    task = mesh.show("w1", task_id)
    one_remote_success(mesh, task, read_ticks(ticks), 120)
    rows = [r for r in mesh.worker_attempts("w2") if r["task_id"] == task_id]
    assert len(rows) == 1 and json.loads(rows[0]["result"])["outcome"] == "exited"
    assert json.loads(rows[0]["result"])["stop_reason"] == "exited"


def test_worker_agent_restarted_within_the_lease_renews_at_once(mesh: Mesh, tmp_path: Path) -> None:
    """TTL 15 s: renewals every 5 s, and the supervisor starts stopping 13 s after the last
    renewal was sent. The agent is stopped right after a renewal and comes back about
    10 s after it, well within the lease: it re-adopts the task and must renew it before
    the stop point. Waiting its usual TTL/3 (5 s) first would let the deadline run out
    under a live agent, which re-adopted the task only to see it stopped (it did, before
    ``AttemptRunner.resume`` renewed at once)."""
    ticks = tmp_path / "ticks"
    w2 = mesh["w2"]
    with lease_ttl(mesh, RESTART_TTL_S):
        task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=600, n2=5))
        try:
            wait_ticks(ticks, 1, count=1)
            task_dir = mesh.task_dir("w2", "worker", task_id, 1)
            stop_after_renewal(mesh, "w2", task_dir)
            deadline_s = deadline_boot_ns(task_dir) / 1e9
            stop_at_s = deadline_s - STOP_MARGIN_S
            renew_interval_s = RESTART_TTL_S / 3
            # Aim the re-adoption at the middle of (stop point - TTL/3, stop point).
            time.sleep(max(0.0, stop_at_s - renew_interval_s / 2 - 1.5 - boot_s()))
            log_before = len(w2.log())
            mesh.start("w2")
            # On a loaded machine the agent may come back only after the supervisor's stop
            # point: the supervisor stopped on its own deadline, as it must with nobody
            # renewing, and there is nothing to re-adopt (the window was missed: skip).
            came_back, _ = wait_for(
                "the restarted agent re-adopts the task, or the supervisor stops first",
                lambda: (
                    "re-adopted"
                    if log_events(w2.log()[log_before:], "attempt re-adopted", task_id=task_id)
                    else ("late" if supervisor_state(task_dir)["status"] == "exited" else None)
                ),
                guard_s=60,
                every_s=0.02,
            )
            if came_back == "late":
                pytest.skip("the agent came back after the supervisor's stop point (slow start)")
            ahead_s = stop_at_s - boot_s()
            print(f"re-adopted {ahead_s:.2f} s before the supervisor's stop point")
            if not 0.5 < ahead_s < renew_interval_s - 0.3:
                pytest.skip(f"re-adopted {ahead_s:.1f} s before the stop point: outside the window")
            # Back to short leases now, so that the fallback that follows a stop takes its
            # local lease for 6 s, not 15 (it outlives the cancel below until it expires).
            mesh.settings(max_lease_ttl_s=str(LEASE_TTL_S))
            outcome, _ = wait_for(
                "a renewal or the supervisor's stop",
                lambda: (
                    "renewed"
                    if deadline_boot_ns(task_dir) / 1e9 > deadline_s
                    else ("stopped" if supervisor_state(task_dir)["status"] == "exited" else None)
                ),
                guard_s=30,
                every_s=0.02,
            )
            assert outcome == "renewed", "re-adopted within its lease, yet stopped unrenewed"
        finally:
            mesh.cli("w1", "task", "cancel", task_id, check=False)
            mesh.wait_cli("w1", task_id)


def boot_s() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# -- 8. a GPU is never granted twice -------------------------------------------------------


def test_twenty_tasks_two_gpus_never_overlap(mesh: Mesh) -> None:
    """20 one-second tasks from the CPU-only control plane against two 1-GPU workers.

    The issue asks for ``--no-fallback --queue-timeout 10m``; with ``--no-fallback`` a
    burst fails all but one or two tasks on the first refused grant (the bug pinned by
    ``test_no_fallback_queue_timeout_waits_out_a_refused_grant``). So the tasks here wait
    with ``--queue-timeout`` alone, and every one must still run remotely: the submitter
    has no GPU, and it runs nothing locally while its queue time lasts. Leases of 15 s:
    20 CLI processes starting at once on two cores can delay a handoff past a 6 s lease
    (which then ends the attempt before it starts, safely, but that is not the point here).
    """
    cp = mesh["cp"]
    command = [
        *POPULI,
        "run",
        "--detach",
        "--gpus",
        "1",
        "--queue-timeout",
        "10m",
        "--env",
        f"{MARK_NAME}={MARK}",
        "--data-dir",
        str(cp.data_dir),
        "--",
        "sleep",
        "1",
    ]
    with lease_ttl(mesh, RESTART_TTL_S):
        started = time.monotonic()
        task_ids: list[str] = []
        submits = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(20)
        ]
        for proc in submits:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            task_ids.append(out.strip())
        print(f"20 tasks submitted in {time.monotonic() - started:.1f} s")
        waited = mesh.wait_cli("cp", *task_ids, guard_s=300)
    print(f"20 one-second tasks on 2 GPUs took {time.monotonic() - started:.1f} s")
    assert waited.returncode == 0, waited.stderr + waited.stdout[-3000:]
    tasks = json.loads(waited.stdout)["tasks"]
    assert sorted(t["task_id"] for t in tasks) == sorted(task_ids)
    assert [t["state"] for t in tasks] == ["succeeded"] * 20
    assert all(len(t["attempts"]) == 1 and t["attempts"][0]["where"] == "remote" for t in tasks)
    refusals = sum(1 for t in tasks for r in t["reasons"] if r[1] == "grant_refused")
    print(f"grants refused on the way (stale hints, re-checked by the control plane): {refusals}")
    # What the workers recorded: start and stop of each run, per GPU, never overlapping.
    runs: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for name in ("w1", "w2"):
        for row in mesh.worker_attempts(name):
            if row["task_id"] not in task_ids:
                continue
            result = json.loads(row["result"])
            assert result["outcome"] == "exited"
            (gpu,) = result["gpus"]
            runs.setdefault((name, gpu), []).append(
                (result["started_wall_ms"], result["stopped_wall_ms"], row["task_id"])
            )
    assert sum(len(r) for r in runs.values()) == 20
    assert {name for name, _ in runs} == {"w1", "w2"}, "both GPUs are used"
    for device, spans in runs.items():
        spans.sort()
        for (_, stop, a), (start, _, b) in itertools.pairwise(spans):
            assert stop <= start, f"{a} and {b} overlap on {device}"
        print(f"{device[0]} ran {len(spans)} tasks")
    # The control plane's side: per GPU, each lease ended before the next was granted.
    leases: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for lease in mesh.leases():
        if lease["task_id"] in task_ids:
            assert lease["state"] == "completed", lease
            for gpu in lease["gpus"]:
                leases.setdefault((lease["holder"], gpu), []).append(
                    (lease["granted_wall_ms"], lease["state_changed_wall_ms"])
                )
    assert sum(len(v) for v in leases.values()) == 20
    for held in leases.values():
        held.sort()
        for (_, ended), (granted, _) in itertools.pairwise(held):
            assert ended <= granted


def grant_directly(mesh: Mesh, target: str, task_id: str) -> dict[str, Any]:
    """A lease granted by the control plane for a task nobody hands off: the GPU is taken
    at the control plane while the worker, running nothing, reports it free."""
    answer = grant_as_cp(mesh, target, task_id, ttl_s=LEASE_TTL_S)
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["lease"])


def test_no_fallback_queue_timeout_waits_out_a_refused_grant(mesh: Mesh) -> None:
    """Both GPUs are held by leases the workers know nothing of (their hints say free);
    the task must wait in its queue until they expire, then run."""
    held = {name: grant_directly(mesh, name, f"t-held-{name}-{MARK[:8]}") for name in ("w1", "w2")}
    try:
        task_id = mesh.run_detached(
            "cp",
            "--gpus",
            "1",
            "--no-fallback",
            "--queue-timeout",
            "10m",
            "--env",
            f"{MARK_NAME}={MARK}",
            "--",
            "true",
        )
        waited = mesh.wait_cli("cp", task_id)
        task = mesh.show("cp", task_id)
        print(f"both GPUs held; task {task['state']} ({task['terminal_reason']})")
        assert waited.returncode == 0, task["reasons"]
        assert task["state"] == "succeeded"
        assert [a["where"] for a in task["attempts"]] == ["remote"]
    finally:
        # Each holder gives its lease back (if it has not expired yet).
        for name, lease in held.items():
            with mesh.client("cp", mesh.credential(name)) as client:
                client.post(
                    f"/v1/populi/exec/leases/{lease['lease_id']}/release",
                    json={"outcome": "stopped"},
                )


def refused_handoff(mesh: Mesh, submitter: str, *args: str) -> tuple[str, dict[str, Any]]:
    """A GPU task whose remote lease dies at once, killing nothing: under a 3 s lease
    every worker here refuses the handoff (its 2 s stop margin must stay below two thirds
    of the TTL) and gives the lease back. Returns the task id and its first attempt."""
    with lease_ttl(mesh, REFUSED_TTL_S):
        task_id = mesh.run_detached(
            submitter, "--gpus", "1", *args, "--env", f"{MARK_NAME}={MARK}", "--", "true"
        )
        first, _ = wait_for(
            "a remote lease is granted",
            lambda: (a := mesh.task_record(submitter, task_id)["task"]["attempts"]) and a[0],
            guard_s=60,
        )
        assert first["where"] == "remote", first
        wait_for(
            "the worker refuses the handoff and releases the lease",
            lambda: mesh.lease_record(first["lease_id"])["state"] == "released",
            guard_s=30,
        )
    return task_id, first


def test_cpu_only_submitter_moves_on_after_a_dead_lease(mesh: Mesh) -> None:
    """The control plane submits a GPU task; its remote lease dies. A fallback here needs
    a local GPU the control plane does not have, so every fallback request is refused
    (no_free_gpu): the task must move on (placed again, or ended with a reason, docs/design.md
    rule 7), not ask forever."""
    task_id, _ = refused_handoff(mesh, "cp")
    try:
        wait_for(
            "the task moves on after its lease died",
            lambda: (
                (task := mesh.task_record("cp", task_id)["task"])["state"] in TERMINAL
                or len(task["attempts"]) > 1
            ),
            guard_s=10,
            every_s=0.5,
        )
    finally:
        task = mesh.task_record("cp", task_id)["task"]
        codes = [r[1] for r in task["reasons"]]
        print(
            f"task {task['state']}: {codes.count('fallback_refused')} fallbacks refused "
            f"({codes.count('no_free_gpu')} no_free_gpu), {len(task['reasons'])} log rows"
        )
        mesh.cli("cp", "task", "cancel", task_id, check=False)


def test_no_fallback_task_takes_no_local_gpu_after_a_dead_lease(mesh: Mesh) -> None:
    """--no-fallback: the task never runs locally, so the submitter has no use for a
    local lease on its GPU when the remote lease dies; nothing releases one either, so it
    would block that GPU until it expires."""
    task_id, first = refused_handoff(mesh, "w1", "--no-fallback")
    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 125, waited.stderr
    task = mesh.show("w1", task_id)
    assert task["state"] == "failed" and task["terminal_reason"] == "lease_dead", task["reasons"]
    assert [a["n"] for a in task["attempts"]] == [1]
    assert "no_fallback" in [r[1] for r in task["reasons"]]
    others = [
        lease for lease in mesh.leases(task=task_id) if lease["lease_id"] != first["lease_id"]
    ]
    assert others == [], others


# -- 4. the control plane restarts while a remote task runs ----------------------------------
# Last of the shared-mesh tests: a restarted control plane grants on a node only once it
# reported, or after max TTL ever allowed + margin (ADR 0015; nodes do not report yet).


def test_control_plane_restart_right_after_renewal_lease_survives(
    mesh: Mesh, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    cp = mesh["cp"]
    with lease_ttl(mesh, RESTART_TTL_S):
        task_id, task_dir = ticking_on_w2(mesh, ticks, n1=100, count=1)
        down = stop_after_renewal(mesh, "cp", task_dir)
        log_before = len(cp.log())
        launched = time.monotonic()
        took = mesh.start("cp")
        print(f"control plane stopped {down:.1f} s after a renewal, back {took:.1f} s later")
        (restored,) = log_events(cp.log()[log_before:], "lease table restored")
        assert restored["holding"] == 1, restored
        # Counted as renewed at restart: it expires a full TTL after the restart at the
        # earliest (the process was launched before it restored the table).
        (lease,) = mesh.leases(task=task_id)
        assert lease["state"] == "live", lease
        assert lease["expires_in_s"] > RESTART_TTL_S - (time.monotonic() - launched), lease
        waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 0, waited.stderr
    task = mesh.show("w1", task_id)
    one_remote_success(mesh, task, read_ticks(ticks), 100)
    (lease,) = mesh.leases(task=task_id)
    assert lease["ttl_s"] == RESTART_TTL_S
    # The holder renewed or released it at the restarted control plane, which said yes.
    after = log_events(cp.log()[log_before:], "request", status=200)
    assert [
        e for e in after if e["path"].startswith(f"/v1/populi/exec/leases/{lease['lease_id']}/")
    ], "the worker never reached the restarted control plane about its lease"


# -- 9. remote execution off -------------------------------------------------------------


def test_remote_off_runs_locally_and_sends_nothing(tmp_path: Path) -> None:
    """Remote execution off (the default): a GPU task runs on the submitter, here the
    CPU-only control plane although a GPU node is in the mesh, as a CPU run
    (``no_local_gpu``), and nothing about it leaves the node."""
    off = Mesh.create(tmp_path / "mesh", ["w1"], remote=False)
    try:
        ticks = tmp_path / "ticks"
        run = run_one_gpu_task(off["cp"].data_dir, ticks, 5)
        assert run.returncode == 0, run.stderr
        assert "ticked 5 times on cp attempt 1 token 0.0" in run.stdout
        cp_log = off["cp"].log()
        w1_log = off["w1"].log()
        (task,) = json.loads(off.cli("cp", "tasks", "--json").stdout)["tasks"]
        task = off.show("cp", task["task_id"])
        assert task["state"] == "succeeded" and task["exit_status"] == 0
        (attempt,) = task["attempts"]
        assert attempt["where"] == "local" and attempt["node"] == off["cp"].node_id
        assert attempt["placement_reasons"] == ["remote_disabled", "no_local_gpu"]
        assert attempt["lease_id"] is None and attempt["token"] is None
        # The control plane heard requests (heartbeats), none of them about execution;
        # the GPU node heard nothing at all about it.
        paths = {e["path"] for e in log_events(cp_log, "request")}
        assert "/v1/populi/heartbeat" in paths
        assert not [p for p in paths if p.startswith("/v1/populi/exec/")], paths
        assert "/v1/populi/exec/" not in cp_log
        assert not [
            e
            for e in log_events(w1_log, "request")
            if e["path"].startswith(("/v1/populi/inbox", "/v1/populi/exec/"))
        ]
        assert off.leases() == []
        by_attempt = check_tick_order(read_ticks(ticks))
        assert set(by_attempt) == {1} and {t.node for t in by_attempt[1]} == {"cp"}
    finally:
        off.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
