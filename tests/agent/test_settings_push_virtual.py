"""Settings reach every node at once, and the control plane enforces remote-off itself.

- ``settings set`` pushes the new record to every node before it answers, and names the
  nodes that did not confirm;
- a GPU task submitted right after ``remote_exec_enabled true`` returns runs remotely;
- a worker that holds an older record than the handoff names fetches the signed record
  before it decides, and never trusts the serial alone;
- after ``kill_switch true`` the control plane refuses the worker's renewal before start
  (a lease granted just before), so no remote attempt starts; a running one is refused at
  its next renewal, stops before its lease's deadline, and its task falls back locally
  with the reason ``kill_switch``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from agent.sim_support import open_gpu_cluster, submit

from populi_peer.agent.agent import Agent
from populi_peer.testing.cluster import VirtualCluster
from populi_peer.testing.sim import SimHost
from support.vcluster import as_node, change_settings, grant_body

GUARD_S = 60.0


@pytest.fixture
async def mesh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    async with open_gpu_cluster(tmp_path, workers=2) as (cluster, host):
        yield cluster, host


async def settings_set_missing(
    cluster: VirtualCluster, node: Agent, **changes: Any
) -> dict[str, Any]:
    """``settings set`` while ``node`` is cut off (so it misses the push and no heartbeat
    answer brings the record meanwhile); afterwards it reaches the control plane again but
    the control plane still cannot reach it."""
    cp = cluster.cp
    cluster.network.partition(cp.node_id, node.node_id)
    answer = await change_settings(cluster, **changes)
    cluster.network.heal(node.node_id)
    cluster.network.block(cp.node_id, node.node_id)
    assert [u["node_id"] for u in answer["push"]["unconfirmed"]] == [node.node_id]
    return answer


async def grant(
    cluster: VirtualCluster,
    submitter: Agent,
    target: Agent,
    task_id: str,
    *,
    ttl_s: float = 30,
    gpus: int = 1,
) -> dict:
    async with as_node(cluster, submitter, "cp") as client:
        answer = await client.post(
            "/v1/populi/exec/leases",
            json=grant_body(task_id, target, gpus_wanted=gpus, ttl_s=ttl_s),
        )
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["lease"])


def handoff(lease: dict[str, Any], settings_serial: int) -> dict[str, Any]:
    return {
        "message_id": f"handoff-{lease['task_id']}-1",
        "type": "handoff",
        "task_id": lease["task_id"],
        "attempt": 1,
        "lease_id": lease["lease_id"],
        "token": lease["token"],
        "command": ["sim", "5"],
        "gpus": lease["gpus"],
        "ttl_s": lease["ttl_s"],
        "work_class": "agent",
        "settings_serial": settings_serial,
    }


async def test_settings_set_pushes_to_every_node_before_it_answers(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, _ = mesh
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    started = trio.current_time()
    answer = await change_settings(cluster, remote_exec_enabled=True)
    serial = answer["settings"]["serial"]
    # No heartbeat went by: the record was pushed while the request was handled.
    assert trio.current_time() - started < 0.1
    assert w1.records.settings_serial == w2.records.settings_serial == serial
    assert w1.remote_work.enabled() and w2.remote_work.enabled()
    assert answer["push"] == {
        "serial": serial,
        "confirmed": sorted([w1.node_id, w2.node_id]),
        "unconfirmed": [],
    }
    # A node that cannot be reached is named; it gets the record with its next heartbeat.
    cluster.network.partition(cp.node_id, w2.node_id)
    answer = await change_settings(cluster, kill_switch=True)
    assert answer["push"]["confirmed"] == [w1.node_id]
    (missing,) = answer["push"]["unconfirmed"]
    assert (missing["node_id"], missing["name"]) == (w2.node_id, "w2")
    assert missing["reason"] and missing["detail"]
    assert w1.records.settings["kill_switch"] and not w2.records.settings["kill_switch"]
    cluster.network.heal()
    await cluster.wait_until(lambda: w2.records.settings["kill_switch"], timeout_s=GUARD_S)


async def test_a_gpu_task_right_after_remote_is_switched_on_runs_remotely(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, host = mesh
    w1 = cluster["w1"]
    await change_settings(cluster, remote_exec_enabled=True)
    async with cluster.operator_client("w1") as client:
        response = await client.post(
            "/v1/populi/tasks",
            json={
                "command": ["sim", "2"],
                "gpus": 1,
                "work_class": "agent",  # the virtual hosts' path scope is overlay
                "no_fallback": True,
            },
        )
    assert response.status_code == 200, response.text
    task_id = response.json()["task"]["task_id"]
    await cluster.wait_until(lambda: w1.submitter.load(task_id).terminal, timeout_s=GUARD_S)
    task = w1.submitter.load(task_id)
    assert task.state == "succeeded", [(r.code, r.detail) for r in task.reasons]
    (attempt,) = task.attempts
    assert attempt.where == "remote" and attempt.node != w1.node_id
    (run,) = host.ledger.for_task(task_id)
    assert run.node != "w1" and cluster[run.node].node_id == attempt.node


async def test_a_worker_with_an_older_record_fetches_the_signed_one_before_it_decides(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, host = mesh
    w1, w2 = cluster["w1"], cluster["w2"]
    # w2 misses the push (and has no heartbeat answer yet): it still holds "remote off".
    answer = await settings_set_missing(cluster, w2, remote_exec_enabled=True)
    serial = answer["settings"]["serial"]
    assert not w2.remote_work.enabled() and w2.records.settings_serial < serial
    lease = await grant(cluster, w1, w2, "t-fetch")
    # Two copies of the handoff at once (a retry racing the first): both wait for the
    # fetch, and still only one starts (safety rule 2).
    answers: list[httpx.Response] = []

    async def send(message_id: str) -> None:
        async with as_node(cluster, w1, "w2") as to_worker:
            message = handoff(lease, serial) | {"message_id": message_id}
            answers.append(await to_worker.post("/v1/populi/inbox", json=message))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "h-first")
        nursery.start_soon(send, "h-retry")
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    verdicts = sorted(a.json()["result"]["verdict"] for a in answers)
    assert verdicts == ["duplicate", "start"]
    assert w2.records.settings_serial == serial  # fetched from the control plane, verified
    await cluster.wait_until(lambda: bool(host.ledger.for_task("t-fetch")), timeout_s=GUARD_S)
    await trio.sleep(5)
    assert len(host.ledger.for_task("t-fetch")) == 1


async def test_a_stamp_alone_never_turns_remote_execution_on(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, host = mesh
    w1, w2 = cluster["w1"], cluster["w2"]
    held = w2.records.settings_serial
    fake = {
        "lease_id": "l-0000000000000001",
        "task_id": "t-stamp",
        "token": "1.999",
        "gpus": w2.gpu.verified_uuids(),
        "ttl_s": 6,
    }
    async with as_node(cluster, w1, "w2") as to_worker:
        refused = await to_worker.post("/v1/populi/inbox", json=handoff(fake, held + 50))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "remote_disabled"
    assert w2.records.settings_serial == held
    assert not host.ledger.for_task("t-stamp")


async def test_no_remote_attempt_starts_after_the_kill_switch_and_a_running_one_stops(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, host = mesh
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    answer = await change_settings(cluster, remote_exec_enabled=True)
    on_serial = answer["settings"]["serial"]
    # One attempt runs already; another's lease is granted but not yet handed off.
    running = await grant(cluster, w1, w2, "t-running")
    async with as_node(cluster, w1, "w2") as to_worker:
        started = await to_worker.post(
            "/v1/populi/inbox", json=handoff(running, on_serial) | {"command": ["sim", "120"]}
        )
    assert started.status_code == 200, started.text
    await cluster.wait_until(lambda: bool(host.ledger.for_task("t-running")), timeout_s=GUARD_S)
    late = await grant(cluster, w1, w2, "t-late", gpus=0)  # w2's one GPU is busy
    # The kill switch; w2 misses the push, so only the control plane can stop the start.
    thrown = trio.current_time()
    await settings_set_missing(cluster, w2, kill_switch=True)
    assert w2.remote_work.enabled()
    async with as_node(cluster, w1, "w2") as to_worker:
        accepted = await to_worker.post("/v1/populi/inbox", json=handoff(late, on_serial))
    assert accepted.status_code == 200, accepted.text
    table = cp.leases.table
    assert table is not None
    # The renewal before start is refused (kill_switch): nothing ran, the lease, revoked
    # for the kill switch, is given back at once.
    await cluster.wait_until(
        lambda: cp.leases.table.get(late["lease_id"]).state == "revoked",  # type: ignore[union-attr]
        timeout_s=GUARD_S,
    )
    assert cp.leases.table.get(late["lease_id"]).reason == "kill_switch"
    assert not host.ledger.for_task("t-late")
    row = w2.runner.row("t-late", 1, "worker")
    assert row is not None and row.state == "finished"
    assert row.result is not None and row.result["outcome"] == "lease_lost"
    # The running attempt is refused at its next renewal (TTL/3 = 10 s) and stopped, well
    # before its lease's deadline; its lease ends revoked, for the kill switch.
    (run,) = host.ledger.for_task("t-running")
    await cluster.wait_until(lambda: not run.running, timeout_s=GUARD_S)
    assert run.stopped is not None and run.stopped - thrown <= 30 / 3 + 1
    assert run.stopped_boot is not None and run.stopped_boot <= run.deadline_boot
    await cluster.wait_until(
        lambda: cp.leases.table.get(running["lease_id"]).state == "revoked",  # type: ignore[union-attr]
        timeout_s=GUARD_S,
    )
    assert cp.leases.table.get(running["lease_id"]).reason == "kill_switch"
    # Nothing new starts remotely anywhere: a GPU task submitted now runs on its submitter.
    task_id = await submit(cluster, "w1", ["sim", "1"])
    await cluster.wait_until(lambda: w1.submitter.load(task_id).terminal, timeout_s=GUARD_S)
    task = w1.submitter.load(task_id)
    (attempt,) = task.attempts
    assert (task.state, attempt.where, attempt.placement_reasons) == (
        "succeeded",
        "local",
        ("kill_switch",),
    )
    assert [run.node for run in host.ledger.for_task(task_id)] == ["w1"]
    now = cp.leases.table
    assert not any(lease.kind == "remote" and lease.holding for lease in now.leases.values())


async def test_a_remote_task_falls_back_locally_for_the_kill_switch(
    mesh: tuple[VirtualCluster, SimHost], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, host = mesh
    w1 = cluster["w1"]
    await change_settings(cluster, remote_exec_enabled=True)
    task_id = await submit(cluster, "w1", ["sim", "300"])
    await cluster.wait_until(
        lambda: (
            w1.submitter.load(task_id).state == "running_remote"
            and bool(host.ledger.for_task(task_id))
        ),
        timeout_s=GUARD_S,
    )
    (remote,) = host.ledger.for_task(task_id)
    await change_settings(cluster, kill_switch=True)
    await cluster.wait_until(lambda: len(host.ledger.for_task(task_id)) == 2, timeout_s=GUARD_S)
    first, second = host.ledger.for_task(task_id)
    # Never in two places at once: the remote run ended before the local one started.
    assert first is remote and remote.node != "w1" and second.node == "w1"
    assert remote.stopped is not None and remote.stopped <= second.started
    assert remote.stopped_boot is not None and remote.stopped_boot <= remote.deadline_boot
    task = w1.submitter.load(task_id)
    codes = [entry.code for entry in task.reasons]
    fell_back = codes.index("lease_dead_confirmed")
    assert "kill_switch" in codes[fell_back:], codes
    local = task.attempts[-1]
    assert local.where == "local" and "kill_switch" in local.placement_reasons, local
