"""A signed request is never accepted twice, across control-plane restarts too.

The nonce of a request that commits something is written in the same transaction as its
effect (``populi_peer.store``), so a captured request replayed after a restart is refused
(401 ``signature_replayed``) and writes nothing. Requests that commit nothing (heartbeats,
renewals) leave no row — no extra fsync — and replaying them after a restart does no harm:
they change nothing on disk, and a dead lease stays dead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from populi_peer.agent.agent import Agent
from populi_peer.api.client import SignedAuth
from populi_peer.config import Config
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import grant_body, vcluster

GUARD_S = 60.0


@dataclasses.dataclass(frozen=True)
class Captured:
    """One request exactly as it went on the wire."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    content: bytes

    def nonce(self) -> str:
        value = dict(self.headers)["populi-signature-input"]
        return value.rsplit("nonce=", 1)[1].strip()


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Captured] = []

    async def __call__(self, request: httpx.Request) -> None:
        await request.aread()
        self.requests.append(
            Captured(
                request.method,
                str(request.url),
                tuple(request.headers.multi_items()),
                request.content,
            )
        )


def signed(
    cluster: VirtualCluster, *, sender: Agent | None, recipient: str, recorder: Recorder
) -> httpx.AsyncClient:
    """A client signing as ``sender``'s node key (the operator where ``sender`` is None),
    recording every request it sends."""
    target = cluster[recipient]
    if sender is None:
        credential = cluster.cp.certificates.identity.operator
        assert credential is not None
        clock, source = cluster.cp.clock, "operator"
    else:
        credential, clock, source = (
            sender.certificates.identity.node_credential,
            sender.clock,
            sender.node_id,
        )
    return httpx.AsyncClient(
        transport=cluster.network.transport_for(source),
        base_url=f"https://{cluster.nodes[recipient].host}",
        auth=SignedAuth(credential, target.node_id, clock),
        event_hooks={"request": [recorder]},
    )


async def replay(cluster: VirtualCluster, captured: Captured, source: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=cluster.network.transport_for(source)) as client:
        request = httpx.Request(
            captured.method, captured.url, headers=list(captured.headers), content=captured.content
        )
        return await client.send(request)


def count(agent: Agent, sql: str, *params: Any) -> int:
    return int(agent.store.execute(sql, params).fetchone()[0])


def durable_state(agent: Agent) -> dict[str, Any]:
    """What the replayed requests would change: tokens, events, lifecycles, settings."""
    store = agent.store
    return {
        "tokens": count(agent, "SELECT COUNT(*) FROM join_tokens"),
        "events": count(agent, "SELECT COUNT(*) FROM events"),
        "registers": sorted(
            tuple(row) for row in store.execute("SELECT node_id, attribute, body FROM registers")
        ),
        "settings": store.execute(
            "SELECT serial, text FROM cluster_records WHERE kind = 'settings'"
        ).fetchone()[:],
    }


def everything(agent: Agent) -> dict[str, list[str]]:
    tables = [
        row[0]
        for row in agent.store.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        table: sorted(repr(tuple(row)) for row in agent.store.execute(f"SELECT * FROM {table}"))
        for table in tables
    }


@pytest.fixture
async def cluster(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[VirtualCluster]:
    async with vcluster(tmp_path, workers=2, config=Config()) as cluster:
        w1, w2 = cluster["w1"], cluster["w2"]
        await cluster.wait_until(
            lambda: all(cluster.cp.heartbeats.age_ms(w.node_id) is not None for w in (w1, w2)),
            timeout_s=GUARD_S,
        )
        yield cluster


async def restart_cp(cluster: VirtualCluster) -> Agent:
    await cluster.crash("cp")
    return await cluster.start("cp")


async def test_operator_requests_replayed_after_a_restart_are_refused_and_write_nothing(
    cluster: VirtualCluster, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    async with signed(cluster, sender=None, recipient="cp", recorder=recorder) as op:
        minted = await op.post("/v1/populi/admin/tokens", json={"ttl_s": 3600})
        cordoned = await op.post("/v1/populi/admin/nodes/w1/cordon", json={"reason": "captured"})
        switched = await op.post(
            "/v1/populi/admin/settings", json={"changes": {"remote_exec_enabled": True}}
        )
        captured = list(recorder.requests)
        # Undo the effects, so that a replay that got through would show.
        assert (await op.post("/v1/populi/admin/nodes/w1/resume")).status_code == 200
        back = await op.post(
            "/v1/populi/admin/settings", json={"changes": {"remote_exec_enabled": False}}
        )
    assert [r.status_code for r in (minted, cordoned, switched, back)] == [200] * 4
    cp = cluster.cp
    # Each request that committed left its nonce, written with its effect.
    for request in captured:
        assert cp.store.nonce_used(cp.certificates.identity.operator.principal_id, request.nonce())
    # Within one process the in-memory cache refuses them already.
    for request in captured:
        again = await replay(cluster, request, "operator")
        assert (again.status_code, again.json()["error"]["code"]) == (401, "signature_replayed")

    cp = await restart_cp(cluster)
    before = durable_state(cp)
    for request in captured:
        again = await replay(cluster, request, "operator")
        assert again.status_code == 401, f"{request.url}: {again.status_code} {again.text}"
        assert again.json()["error"]["code"] == "signature_replayed"
    assert durable_state(cp) == before
    lifecycle = cp.registry.lifecycle(cluster["w1"].node_id)
    assert lifecycle is not None and lifecycle.state == "active"
    assert cp.records.settings["remote_exec_enabled"] is False


async def test_heartbeats_and_renewals_commit_no_nonce_and_their_replay_after_restart_is_harmless(
    cluster: VirtualCluster, autojump_clock: trio.testing.MockClock
) -> None:
    w1, w2 = cluster["w1"], cluster["w2"]
    async with signed(cluster, sender=None, recipient="cp", recorder=Recorder()) as op:
        answer = await op.post(
            "/v1/populi/admin/settings", json={"changes": {"remote_exec_enabled": True}}
        )
        assert answer.status_code == 200
    cp = cluster.cp
    grant = grant_body("t-replay", w2, gpus_wanted=0)
    beats, renewals = Recorder(), Recorder()
    async with signed(cluster, sender=w1, recipient="cp", recorder=Recorder()) as submitter:
        granted = await submitter.post("/v1/populi/exec/leases", json=grant)
    assert granted.status_code == 200, granted.text
    lease_id = granted.json()["lease"]["lease_id"]
    rows = count(cp, "SELECT COUNT(*) FROM request_nonces")
    async with signed(cluster, sender=w1, recipient="cp", recorder=beats) as node:
        beat = await node.post("/v1/populi/heartbeat", json=w1.heartbeat_sender.payload().to_json())
    async with signed(cluster, sender=w2, recipient="cp", recorder=renewals) as holder:
        renewed = await holder.post(f"/v1/populi/exec/leases/{lease_id}/renew", json={})
        # The lease ends for good (written durably) before the restart.
        released = await holder.post(
            f"/v1/populi/exec/leases/{lease_id}/release", json={"outcome": "stopped"}
        )
    assert [r.status_code for r in (beat, renewed, released)] == [200] * 3
    # The heartbeat and the renewal wrote nothing, not even their nonce (no fsync); the
    # release wrote its nonce with the lease.
    assert count(cp, "SELECT COUNT(*) FROM request_nonces") == rows + 1
    assert not cp.store.nonce_used(w1.node_id, beats.requests[0].nonce())
    assert not cp.store.nonce_used(w2.node_id, renewals.requests[0].nonce())

    cp = await restart_cp(cluster)
    before = everything(cp)
    again = await replay(cluster, renewals.requests[0], w2.node_id)
    # A dead lease stays dead: the replayed renewal cannot revive it.
    assert again.status_code == 409, again.text
    assert again.json()["error"]["details"]["reasons"] == ["lease_not_live"]
    assert cp.leases.table is not None and cp.leases.table.get(lease_id).state == "released"
    beat_again = await replay(cluster, beats.requests[0], w1.node_id)
    # Accepted once more in this process (nothing of it is durable), and it writes nothing.
    assert beat_again.status_code == 200, beat_again.text
    assert everything(cp) == before
    # ...and only once: the in-memory cache has it now.
    third = await replay(cluster, beats.requests[0], w1.node_id)
    assert third.json()["error"]["code"] == "signature_replayed"
