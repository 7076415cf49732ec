"""Placement v2 on the virtual cluster: ``--gpu-mem`` and ``--gpu-model`` reach the
placement, the nearest path wins, and every refused node is in the task record with its
reason codes; the control plane re-checks memory and model at grant time on its own
facts (safety rule 6: ``gpu_misfit``).

The GPUs are replayed NVML captures: the shipped H100 80GB, and a 16 GB card made from it
here (this machine has no GPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import trio
import trio.testing
from agent.sim_support import sim_config

from populi_peer.agent.agent import Agent
from populi_peer.config import Config
from populi_peer.gpu._replay import load_fixture
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import as_node, change_settings, grant_body, sim_vcluster, vcluster

GB = 10**9
SMALL_NAME = "NVIDIA RTX A4000"


def small_capture(folder: Path) -> Path:
    """The H100 capture turned into a 16 GB card (16 GiB total, ~15.8 GB free)."""
    capture = load_fixture("h100-80gb-hbm3-idle.json").captures[0][1]
    capture = json.loads(json.dumps(capture))
    for device in capture["devices"]:
        device["name"] = SMALL_NAME
        device["memory"] = {"total": 16 * 2**30, "free": 15_800_000_000, "used": 1_379_000_000}
    path = folder / "a4000-16gb-idle.json"
    path.write_text(json.dumps(capture))
    return path


def node_config(fixture: str | Path) -> Config:
    config = sim_config()
    return dataclasses.replace(
        config,
        gpu=dataclasses.replace(config.gpu, fixture=str(fixture)),
        exec=dataclasses.replace(config.exec, remote=True),
    )


async def join_small_and(cluster: VirtualCluster, folder: Path, name: str) -> tuple[Agent, Agent]:
    """``small`` (the 16 GB card, its capture written in ``folder``) and ``name`` (an 80 GB
    one) joined, and remote execution switched on."""
    small = await cluster.join("small", config=node_config(small_capture(folder)))
    other = await cluster.join(name, config=node_config("h100-80gb-hbm3-idle.json"))
    assert small is not None and other is not None
    await change_settings(cluster, remote_exec_enabled=True)
    return small, other


async def submit(cluster: VirtualCluster, **fields: Any) -> str:
    async with cluster.operator_client("cp") as client:
        response = await client.post(
            "/v1/populi/tasks",
            json={"command": ["sim", "1"], "gpus": 1, "work_class": "agent", **fields},
        )
    assert response.status_code == 200, response.text
    return str(response.json()["task"]["task_id"])


async def finished(cluster: VirtualCluster, task_id: str) -> dict[str, Any]:
    submitter = cluster.cp.submitter
    await cluster.wait_until(lambda: submitter.load(task_id).terminal, timeout_s=60)
    async with cluster.operator_client("cp") as client:
        response = await client.get(f"/v1/populi/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()["task"]
    assert task["state"] == "succeeded", task
    return task


async def test_needs_nearest_path_and_every_rejection_with_its_reason(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    small_fixture = small_capture(tmp_path)
    async with sim_vcluster(tmp_path / "c", config=node_config("h100-80gb-hbm3-idle.json")) as (
        cluster,
        host,
    ):
        small = await cluster.join("small", config=node_config(small_fixture))
        big = await cluster.join("big", config=node_config("h100-80gb-hbm3-idle.json"))
        # An 80 GB card too, but over the overlay (100.64.0.0/10 by default).
        far = await cluster.join(
            "far", config=node_config("h100-80gb-hbm3-idle.json"), address="100.64.0.9"
        )
        await change_settings(cluster, remote_exec_enabled=True)
        ids = {n: cluster[n].node_id for n in ("small", "big", "far")}
        await cluster.wait_until(
            lambda: (
                all(
                    cluster.cp.gpu.allocatable_gpus(i)[0] and cluster.cp.heartbeats.scope(i)
                    for i in ids.values()
                )
                and cluster.cp.remote_work.enabled()
            ),
            timeout_s=60,
        )
        assert small and big and far

        # A 40 GB task skips the 16 GB card; of the two 80 GB nodes the LAN one wins.
        task = await finished(cluster, await submit(cluster, gpu_mem_bytes=40 * GB))
        (attempt,) = task["attempts"]
        assert (attempt["where"], attempt["node"]) == ("remote", ids["big"])
        assert attempt["placement_reasons"] == ["nearest_scope", "scope_lan"]
        assert attempt["rejected"] == {ids["small"]: ["gpu_mem_insufficient"]}
        assert task["options"]["gpu_mem_bytes"] == 40 * GB
        assert [r.node for r in host.ledger.for_task(task["task_id"])] == ["big"]

        # A model pattern is honoured: only the A4000 matches, the H100s are refused.
        task = await finished(cluster, await submit(cluster, gpu_model="a4000"))
        (attempt,) = task["attempts"]
        assert (attempt["where"], attempt["node"]) == ("remote", ids["small"])
        assert attempt["placement_reasons"] == ["only_fit", "scope_lan"]
        assert attempt["rejected"] == {
            ids["big"]: ["gpu_model_mismatch"],
            ids["far"]: ["gpu_model_mismatch"],
        }

        # Nothing fits: the task runs here, and says why each node was refused.
        task = await finished(
            cluster, await submit(cluster, gpu_mem_bytes=100 * GB, gpu_model="H100")
        )
        (attempt,) = task["attempts"]
        assert (attempt["where"], attempt["node"]) == ("local", cluster.cp.node_id)
        assert attempt["placement_reasons"] == [
            "no_remote_candidate",
            "gpu_model_mismatch",
            "gpu_mem_insufficient",
        ]
        assert attempt["rejected"] == {
            ids["small"]: ["gpu_model_mismatch", "gpu_mem_insufficient"],
            ids["big"]: ["gpu_mem_insufficient"],
            ids["far"]: ["gpu_mem_insufficient"],
        }


async def test_grant_rechecks_memory_and_model_on_the_control_planes_facts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A submitter that trusted a wrong hint asks for a 40 GB GPU on the 16 GB card: the
    control plane refuses from its own view (``gpu_misfit``, with the codes)."""
    async with vcluster(tmp_path / "c", config=node_config("h100-80gb-hbm3-idle.json")) as cluster:
        small, sub = await join_small_and(cluster, tmp_path, "sub")
        await cluster.wait_until(
            lambda: (
                bool(cluster.cp.gpu.allocatable_gpus(small.node_id)[0])
                and sub.node_id in cluster.cp.gpu.nodes
            ),
            timeout_s=60,
        )

        async def grant(task_id: str, **needs: Any) -> tuple[int, Any]:
            async with as_node(cluster, sub) as client:
                response = await client.post(
                    "/v1/populi/exec/leases",
                    json=grant_body(task_id, small, **needs),
                )
            return response.status_code, response.json()

        status, body = await grant("t-big", gpu_mem_bytes=40 * GB)
        assert status == 409, body
        assert body["error"]["details"]["reasons"] == ["gpu_misfit", "gpu_mem_insufficient"]
        status, body = await grant("t-model", gpu_model="H100")
        assert status == 409, body
        assert body["error"]["details"]["reasons"] == ["gpu_misfit", "gpu_model_mismatch"]
        status, body = await grant("t-fits", gpu_mem_bytes=15 * GB, gpu_model="*A4000")
        assert status == 200, body
        assert body["lease"]["holder"] == small.node_id and len(body["lease"]["gpus"]) == 1
