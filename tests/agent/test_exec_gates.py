"""A node started with POPULI_EXEC_REMOTE=0 (``exec.remote = false``) takes no remote work:
the control plane knows it from its heartbeats and never places any there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import trio

from populi_peer.api.client import SignedAuth
from populi_peer.config import Config
from support.vcluster import vcluster


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
        async with cluster.operator_client() as op:
            assert (
                await op.post(
                    "/v1/populi/admin/settings", json={"changes": {"remote_exec_enabled": True}}
                )
            ).status_code == 200
        cp = cluster.cp
        await cluster.wait_until(lambda: off.node_id in cp.gpu.nodes and on.node_id in cp.gpu.nodes)
        listing = {n["name"]: n for n in (await _get(cluster, on, "/v1/populi/nodes"))["nodes"]}
        assert listing["off"]["accepts_remote_work"] is False
        assert listing["on"]["accepts_remote_work"] is True
        async with _client(cluster, on) as client:
            refused = await client.post(
                "/v1/populi/exec/leases",
                json={
                    "task_id": "t-gate",
                    "attempt": 1,
                    "work_class": "inference",
                    "target": off.node_id,
                    "gpus_wanted": 1,
                    "ttl_s": 30,
                },
            )
            granted = await client.post(
                "/v1/populi/exec/leases",
                json={
                    "task_id": "t-gate2",
                    "attempt": 1,
                    "work_class": "inference",
                    "target": on.node_id,
                    "gpus_wanted": 0,
                    "ttl_s": 30,
                },
            )
        assert refused.status_code == 409
        assert "remote_off_on_node" in refused.json()["error"]["details"]["reasons"]
        assert granted.status_code == 200


def _client(cluster, agent) -> httpx.AsyncClient:
    cp = cluster.cp
    return httpx.AsyncClient(
        transport=cluster.network.transport_for(agent.node_id),
        base_url="https://cp.populi.test:443",
        auth=SignedAuth(agent.identity.node_credential, cp.node_id, agent.clock),
    )


async def _get(cluster, agent, path: str) -> dict:
    async with _client(cluster, agent) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()
