"""A node started with POPULI_EXEC_REMOTE=0 (``exec.remote = false``) takes no remote work:
the control plane knows it from its heartbeats and never places any there. With remote
execution off, a GPU task still runs on this node's own GPU, under a ``local`` lease."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
import trio.testing
from agent.sim_support import open_gpu_cluster

from populi_peer.config import Config
from support.vcluster import as_node, change_settings, grant_body, vcluster


def _gpu_config(remote: bool) -> Config:
    config = Config()
    return dataclasses.replace(
        config,
        gpu=dataclasses.replace(config.gpu, fixture="h100-80gb-hbm3-idle.json"),
        exec=dataclasses.replace(config.exec, remote=remote),
    )


async def test_node_with_remote_execution_off_is_never_a_target(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        off = await cluster.join("off", config=_gpu_config(remote=False))
        on = await cluster.join("on", config=_gpu_config(remote=True))
        assert off is not None and on is not None
        await change_settings(cluster, remote_exec_enabled=True)
        cp = cluster.cp
        await cluster.wait_until(lambda: off.node_id in cp.gpu.nodes and on.node_id in cp.gpu.nodes)
        listing = {n["name"]: n for n in (await _get(cluster, on, "/v1/populi/nodes"))["nodes"]}
        assert listing["off"]["accepts_remote_work"] is False
        assert listing["on"]["accepts_remote_work"] is True
        async with as_node(cluster, on) as client:
            refused = await client.post(
                "/v1/populi/exec/leases",
                json=grant_body("t-gate", off, work_class="inference"),
            )
            granted = await client.post(
                "/v1/populi/exec/leases",
                json=grant_body("t-gate2", on, work_class="inference", gpus_wanted=0),
            )
        assert refused.status_code == 409
        assert "remote_off_on_node" in refused.json()["error"]["details"]["reasons"]
        assert granted.status_code == 200


async def test_remote_off_gpu_task_runs_on_this_nodes_gpu_under_a_local_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Remote execution off (the default): two one-GPU tasks on a one-GPU node both get
    that GPU in CUDA_VISIBLE_DEVICES, one after the other (the second waits for the first's
    lease); a task wanting more GPUs than the node has runs as a CPU run (``no_local_gpu``),
    a task wanting none takes no lease at all."""
    async with open_gpu_cluster(tmp_path) as (cluster, host):
        w1 = cluster["w1"]
        assert not w1.remote_work.enabled()
        (gpu,) = w1.gpu.verified_uuids()

        async def submit(gpus: int) -> str:
            async with cluster.operator_client("w1") as client:
                response = await client.post(
                    "/v1/populi/tasks",
                    json={"command": ["sim", "5"], "gpus": gpus, "queue_timeout_s": 60},
                )
            assert response.status_code == 200, response.text
            return str(response.json()["task"]["task_id"])

        first, second, big, cpu = [await submit(g) for g in (1, 1, 2, 0)]
        await cluster.wait_until(
            lambda: all(w1.submitter.load(t).terminal for t in (first, second, big, cpu)),
            timeout_s=60,
        )
        env = {
            e.spec.task_id: e.spec.env["CUDA_VISIBLE_DEVICES"]
            for e in host.executors["w1"].executions.values()
        }
        assert env == {first: gpu, second: gpu, big: "", cpu: ""}
        (a,), (b,) = host.ledger.for_task(first), host.ledger.for_task(second)
        assert {a.node, b.node} == {"w1"} and a.stopped is not None
        assert a.stopped <= b.started, "two tasks ran on one GPU at once"
        table = cluster.cp.leases.table
        assert table is not None
        for task_id in (first, second):
            task = w1.submitter.load(task_id)
            assert task.state == "succeeded"
            (attempt,) = task.attempts
            assert attempt.where == "local" and attempt.placement_reasons == ("remote_disabled",)
            assert attempt.lease_id is not None and attempt.token is not None
            lease = table.leases[attempt.lease_id]
            assert (lease.kind, lease.holder, lease.gpus) == ("local", w1.node_id, (gpu,))
            assert lease.state == "completed"
        no_lease = {big: ("remote_disabled", "no_local_gpu"), cpu: ("remote_disabled",)}
        for task_id, reasons in no_lease.items():
            task = w1.submitter.load(task_id)
            (attempt,) = task.attempts
            assert task.state == "succeeded" and attempt.placement_reasons == reasons
            assert attempt.lease_id is None and attempt.token is None
        assert len(table.leases) == 2


async def _get(cluster, agent, path: str) -> dict:
    async with as_node(cluster, agent) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()
