"""The virtual cluster as the tests use it: every response any agent produces is checked
against the OpenAPI contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from populi_peer.agent.agent import Agent
from populi_peer.api.client import PeerClient, SignedAuth
from populi_peer.testing.cluster import VirtualCluster, open_virtual_cluster
from populi_peer.testing.sim import SimHost, open_sim_host
from support.contract import validate


@contextlib.asynccontextmanager
async def vcluster(root: Path, **kwargs: Any) -> AsyncIterator[VirtualCluster]:
    kwargs.setdefault("on_response", validate)
    async with open_virtual_cluster(root, **kwargs) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def sim_vcluster(
    root: Path, *, host_changes: bool = False, **kwargs: Any
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    """:func:`vcluster` whose agents run simulated tasks on one :class:`SimHost` (with
    ``host_changes``, the cluster also waits on the host's changes)."""
    async with open_sim_host() as host:
        kwargs.setdefault("agent_factory", host.agent_factory)
        if host_changes:
            kwargs["changes"] = host.changes
        async with vcluster(root, **kwargs) as cluster:
            yield cluster, host


async def operator_post(cluster: VirtualCluster, path: str, **body: Any) -> dict[str, Any]:
    """POST ``body`` to the control plane as the operator; the answer must be 200.
    Returns its body."""
    async with cluster.operator_client() as op:
        answer = await op.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def change_settings(cluster: VirtualCluster, **changes: Any) -> dict[str, Any]:
    """``populi settings set`` as the operator (see :func:`operator_post`)."""
    return await operator_post(cluster, "/v1/populi/admin/settings", changes=changes)


async def node_action(
    cluster: VirtualCluster, node: str, action: str, **body: Any
) -> dict[str, Any]:
    """``populi node <action> <node>`` (retire, cordon, ...; ``node`` a name or an id) as
    the operator (see :func:`operator_post`)."""
    return await operator_post(cluster, f"/v1/populi/admin/nodes/{node}/{action}", **body)


def as_node(
    cluster: VirtualCluster,
    sender: Agent,
    recipient: str = "cp",
    *,
    signed_for: str | None = None,
    **client: Any,
) -> httpx.AsyncClient:
    """A client that signs with ``sender``'s own node credential and sends over
    ``sender``'s transport to the node named ``recipient``; the signature names
    ``recipient`` unless ``signed_for`` gives another node id."""
    return httpx.AsyncClient(
        transport=cluster.network.transport_for(sender.node_id),
        base_url=f"https://{cluster.nodes[recipient].host}",
        auth=SignedAuth(
            sender.certificates.identity.node_credential,
            signed_for or cluster[recipient].node_id,
            sender.clock,
        ),
        **client,
    )


def unsigned_as(
    cluster: VirtualCluster, source: str = "stranger", recipient: str = "cp"
) -> httpx.AsyncClient:
    """A client with no credential that sends over ``source``'s transport (a name the
    network does not know is a stranger) to the node named ``recipient``."""
    return httpx.AsyncClient(
        transport=cluster.network.transport_for(source),
        base_url=f"https://{cluster.nodes[recipient].host}",
    )


def peer_client_as(cluster: VirtualCluster, agent: Agent) -> PeerClient:
    """The signing peer client with ``agent``'s node credential, over its transport (the
    agent itself may be stopped)."""
    return PeerClient(
        credential=agent.certificates.identity.node_credential,
        clock=agent.clock,
        transport=cluster.network.transport_for(agent.node_id),
        timeout_s=10.0,
    )


def grant_body(task_id: str, target: Agent, **changes: Any) -> dict[str, Any]:
    """A lease grant request (``POST /v1/populi/exec/leases``): attempt 1 of ``task_id``,
    class ``agent``, one of ``target``'s GPUs for 30 s; ``changes`` replace or add fields."""
    return {
        "task_id": task_id,
        "attempt": 1,
        "work_class": "agent",
        "target": target.node_id,
        "gpus_wanted": 1,
        "ttl_s": 30,
        **changes,
    }


async def heard_from(cluster: VirtualCluster, *names: str) -> None:
    """Until the control plane has taken a heartbeat from each node in ``names``."""
    await cluster.wait_until(
        lambda: all(cluster.cp.heartbeats.age_ms(cluster[n].node_id) is not None for n in names)
    )
