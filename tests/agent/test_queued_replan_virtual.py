"""Queued work follows capacity, on the virtual cluster: a task queued for a free GPU
(``--queue-timeout``) is re-placed by the core's ``replan_queued`` when the cluster
changes — its awaited node goes ineligible, a node it could use appears, the awaited GPU
is freed — each time with a ``replanned`` row and its reason code in the task's decision
log (``populi task show``). The running task whose GPU it waits for is never moved.

The queued task's one-second retry is pushed out of reach here, so every re-placement
below is woken by a change of the hints this node holds (gossip), not by a timer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from agent.test_placement_v2_virtual import join_small_and, node_config, submit

from populi_peer.agent import submitter as submitter_module
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import node_action, sim_vcluster

GB = 10**9


def replans(task: dict[str, Any]) -> list[tuple[str, str]]:
    """The task's re-placements: (reason code, detail), in order."""
    rows = task["reasons"]
    return [(rows[i + 1][1], rows[i][2]) for i in range(len(rows) - 1) if rows[i][1] == "replanned"]


async def show(cluster: VirtualCluster, task_id: str) -> dict[str, Any]:
    async with cluster.operator_client("cp") as client:
        response = await client.get(f"/v1/populi/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()["task"]
    return task


async def test_a_queued_task_is_replaced_on_each_change_with_its_reason(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submitter_module, "QUEUE_RETRY_S", 10_000.0)
    async with sim_vcluster(
        tmp_path / "c", config=node_config("h100-80gb-hbm3-idle.json"), gossip=True
    ) as (cluster, _host):
        small, big = await join_small_and(cluster, tmp_path, "big")
        await cluster.wait_until(
            lambda: (
                all(cluster.cp.gpu.allocatable_gpus(a.node_id)[0] for a in (small, big))
                and cluster.cp.remote_work.enabled()
            ),
            timeout_s=60,
        )
        submitter = cluster.cp.submitter

        # The 80 GB card runs a long task; a second 40 GB task queues for it (the 16 GB
        # card never fits).
        running = await submit(cluster, command=["sim", "40"], gpu_mem_bytes=40 * GB)
        await cluster.wait_until(
            lambda: submitter.load(running).state == "running_remote", timeout_s=60
        )
        queued = await submit(
            cluster, command=["sim", "1"], gpu_mem_bytes=40 * GB, queue_timeout_s=3600
        )
        control = await _queued(cluster, queued)
        assert control.queued_for == big.node_id

        # The awaited node is cordoned: it can no longer be waited for.
        await node_action(cluster, big.node_id, "cordon")
        await cluster.wait_until(lambda: len(replans(submitter.load(queued).to_json())) == 1)
        assert control.queued_for is None
        # It comes back: a node worth waiting for appeared.
        await node_action(cluster, big.node_id, "resume")
        await cluster.wait_until(lambda: len(replans(submitter.load(queued).to_json())) == 2)
        assert control.queued_for == big.node_id
        # The long task ends; its GPU is free, and the queued task goes there.
        await cluster.wait_until(lambda: submitter.load(queued).terminal, timeout_s=400)

        task = await show(cluster, queued)
        assert task["state"] == "succeeded", task
        assert replans(task) == [
            ("replan_node_ineligible", f"waited_for={big.node_id} waiting_for=None"),
            ("replan_better_node", f"waited_for=None waiting_for={big.node_id}"),
            ("replan_capacity_freed", f"waited_for={big.node_id} node={big.node_id}"),
        ]
        (attempt,) = task["attempts"]
        assert (attempt["where"], attempt["node"]) == ("remote", big.node_id)
        # No migration: the running task kept its one attempt and was never re-placed.
        first = await show(cluster, running)
        assert first["state"] == "succeeded" and len(first["attempts"]) == 1
        assert replans(first) == []


async def _queued(cluster: VirtualCluster, task_id: str) -> Any:
    submitter = cluster.cp.submitter

    def waiting() -> bool:
        control = submitter.controls.get(task_id)
        return control is not None and control.queued

    await cluster.wait_until(waiting, timeout_s=60)
    return submitter.controls[task_id]
