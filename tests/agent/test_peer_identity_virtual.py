"""A retired node in the middle of a worker's path to the control plane, in virtual time
(docs/adr/0009-peer-identity-of-answers.md; safety rules 1, 3, 4).

Four nodes on the virtual cluster with simulated tasks: ``cp``, ``w1`` (the submitter),
``w2`` (the worker) and ``w3``, which is retired (its node id revoked) and then comes
back as an impostor: at its old host, an app that answers as node ``w3`` — in TLS terms,
with ``w3``'s certificate, which still chains to the cluster CA. A task submitted on
``w1`` runs on ``w2`` under a lease; then ``network.redirect`` sends ``w2``'s requests for
``cp``'s host to the impostor (a DNAT rule on ``w2``'s machine). The impostor is a man
in the middle: it relays every request to the real control plane unchanged (the
signature is bound to ``cp``, so ``cp`` accepts it) except lease renewals, which it
answers itself by replaying the last genuine renewal answer — what a retired node needs
to keep a remote attempt running after the control plane has declared its lease dead.

Every call of ``w2`` names ``cp`` as the node it expects, so the network refuses the
impostor like a TLS handshake would (``identity_refused``), and the impostor never sees
a request. For ``w2`` that is an unanswered renewal: the supervisor's own deadline stops
the task, the control plane expires the lease, and ``w1`` falls back on its word — never
overlapping the remote run (the observer checks rule 1 after every step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from agent.sim_support import (
    EXPIRY_MARGIN_S,
    REMOTE_TASK_S,
    TTL_S,
    WATCH_S,
    Action,
    Observer,
    Scenario,
    open_small_cluster,
    stopped_at_deadline,
    submit_remote,
)

from populi_peer.core.fencing import FencingToken
from populi_peer.core.messages import StatusAnswer
from populi_peer.testing import Faults
from populi_peer.testing.cluster import VirtualCluster
from support.apps import read_body
from support.vcluster import node_action

RENEW_SUFFIX = "/renew"


class Impostor:
    """An ASGI app: relays to the real control plane, forges renewals from the last
    genuine answer it saw for that lease (given by the test's ``on_response`` hook)."""

    def __init__(self, cluster: VirtualCluster) -> None:
        self.cluster = cluster
        self.received: list[str] = []
        self.forged: list[str] = []
        self.genuine_renewals: dict[str, httpx.Response] = {}

    def on_response(self, request: httpx.Request, response: httpx.Response) -> None:
        path = request.url.path
        if response.is_success and path.endswith(RENEW_SUFFIX):
            self.genuine_renewals[path] = response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.received.append(f"{scope['method']} {path}")
        body = await read_body(receive)
        if path in self.genuine_renewals:
            self.forged.append(path)
            answer = self.genuine_renewals[path]
        else:
            answer = await self._relay(scope, body)
        status, headers, content = answer.status_code, answer.headers.raw, answer.content
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _relay(self, scope: dict[str, Any], body: bytes) -> httpx.Response:
        cp_host = self.cluster.nodes["cp"].host
        query = scope.get("query_string", b"").decode()
        url = f"https://{cp_host}{scope['path']}" + (f"?{query}" if query else "")
        async with httpx.AsyncClient(
            transport=self.cluster.network.transport_for("impostor")
        ) as client:
            return await client.request(
                scope["method"],
                url,
                content=body,
                headers=[(k.decode(), v.decode()) for k, v in scope["headers"]],
            )


async def _retire(cluster: VirtualCluster, name: str) -> None:
    await node_action(cluster, cluster.node_ids[name], "retire", reason="decommissioned")


async def test_a_retired_node_in_the_middle_cannot_extend_the_workers_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    impostor: Impostor | None = None
    renewed: list[tuple[float, str]] = []

    def on_response(request: httpx.Request, response: httpx.Response) -> None:
        if impostor is not None:
            impostor.on_response(request, response)
        path = request.url.path
        if response.is_success and path.endswith(RENEW_SUFFIX):
            renewed.append((trio.current_time(), path.split("/")[-2]))

    async with (
        open_small_cluster(tmp_path, workers=3, on_response=on_response) as (cluster, host),
        trio.open_nursery() as watchers,
    ):
        cp, w1, w2, w3 = (cluster.node_ids[n] for n in ("cp", "w1", "w2", "w3"))
        cluster.network.record = True
        impostor = Impostor(cluster)
        observer = Observer(
            seed=-1,
            scenario=Scenario(seed=-1, faults=Faults(), actions=(Action(0.0, "submit", "w1"),)),
            ledger=host.ledger,
        )

        # w3 is retired: its node id is on the revocation list; its agent is gone.
        await _retire(cluster, "w3")
        await cluster.wait_until(lambda: cluster["w2"].revocations.is_revoked(w3), timeout_s=30)
        await cluster.crash("w3")

        async def watch() -> None:
            while True:
                observer.step(cluster)
                await trio.sleep(WATCH_S)

        watchers.start_soon(watch)
        task_id, remote, lease_id = await submit_remote(cluster, host, observer)
        assert any(lease == lease_id for _, lease in renewed)

        # The retired node comes back at its old host, as itself, and w2's traffic for
        # the control plane is sent to it.
        cluster.network.register(
            node_id=w3,
            host=cluster.nodes["w3"].host,
            app=impostor,
            address=cluster.nodes["w3"].address,
        )
        await trio.sleep(TTL_S / 6)
        cut_at = trio.current_time()
        cluster.network.redirect(w2, cluster.nodes["cp"].host, cluster.nodes["w3"].host)
        observer.note("w2 -> cp redirected to the impostor (w3)")

        # The supervisor stops the task by the deadline of the last genuine renewal.
        await cluster.wait_until(lambda: not remote.running, timeout_s=REMOTE_TASK_S)
        last_renewal = [at for at, lease in renewed if lease == lease_id][-1]
        assert last_renewal < cut_at
        stopped_at_deadline(remote, last_renewal)
        # w2 kept trying to renew; every try was refused at the "handshake"; the impostor
        # never received a request, so it could neither forge nor relay anything.
        refused = [
            d
            for d in cluster.network.log
            if d.outcome == "identity_refused" and d.src == w2 and d.dst == w3
        ]
        assert any(d.path.endswith(RENEW_SUFFIX) for d in refused), refused
        assert impostor.received == [] and impostor.forged == []

        # The control plane declares the lease dead on its own clock; the submitter falls
        # back on its word, after the remote run stopped.
        await cluster.wait_until(lambda: len(host.ledger.for_task(task_id)) == 2, timeout_s=30)
        local = host.ledger.for_task(task_id)[1]
        dead = cluster.cp.leases.table.get(lease_id)
        assert dead.state == "expired", dead
        assert dead.expires_mono == last_renewal + TTL_S
        assert (local.node, local.role, local.attempt) == ("w1", "local", 2)
        assert local.started >= remote.end() + EXPIRY_MARGIN_S
        assert FencingToken.parse(local.token) > FencingToken.parse(remote.token)
        await cluster.wait_until(
            lambda: cluster["w1"].submitter.load(task_id).terminal, timeout_s=REMOTE_TASK_S + 30
        )
        task = cluster["w1"].submitter.load(task_id)
        assert task.state == "succeeded", task
        runs = host.ledger.for_task(task_id)
        assert len(runs) == 2 and runs[0].end() <= runs[1].started
        print(
            f"\nremote run stopped {remote.end() - cut_at:.3f} s after the redirect; "
            f"{len(refused)} calls of w2 refused; the impostor received none"
        )
        watchers.cancel_scope.cancel()
    assert cp and w1  # every node id was read while the cluster ran


@pytest.mark.parametrize("expects", ["the control plane", "a revoked node"])
async def test_a_misrouted_call_fails_like_a_tls_identity_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, expects: str
) -> None:
    """The error a caller sees: one line, a reason code, nothing delivered."""
    from populi_peer.errors import PeerIdentityError

    async with open_small_cluster(tmp_path, workers=2) as (cluster, _host):
        w1, w2 = cluster["w1"], cluster["w2"]
        if expects == "the control plane":
            cluster.network.redirect(w1.node_id, cluster.nodes["cp"].host, cluster.nodes["w2"].host)
            with pytest.raises(PeerIdentityError) as refused:
                await w1.peer_link.sync_members()
            assert refused.value.code == "peer_identity_mismatch"
            assert refused.value.details["presented"] == w2.node_id
            assert cluster.network.stats["identity_refused"] == 1
        else:
            await _retire(cluster, "w2")
            await cluster.wait_until(lambda: w1.revocations.is_revoked(w2.node_id), timeout_s=30)
            member = w1.membership.get(w2.node_id)
            assert member is not None
            before = dict(cluster.network.stats)
            with pytest.raises(PeerIdentityError) as refused:
                await w1.peer_link.call(
                    member, method="GET", path="/v1/populi/status", answer=StatusAnswer
                )
            assert refused.value.code == "peer_revoked"
            assert dict(cluster.network.stats) == before  # not even sent
        assert "\n" not in str(refused.value)
        print(json.dumps({"code": refused.value.code, "message": str(refused.value)}))
