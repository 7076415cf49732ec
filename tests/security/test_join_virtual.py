"""Joins that cannot be stolen, half-done or late (issue 10, items 1, 2 and 5), on the
virtual cluster: real agents, real SQLite, the memory network, virtual time.

- a proof made for one node (an impostor that relays) or replayed is refused by the
  control plane, and a captured request (the envelope, without the token's secret) lets
  nobody join;
- the joiner refuses a node its token does not name before it sends anything;
- a join whose commit fails on a full disk (a real tmpfs, filled) leaves nothing in memory
  or on disk; the token still works exactly once; a retry with the same token and key gets
  the first answer;
- a token is refused a few seconds after it expired, whatever the request skew budget.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from enrollment.errors import CertificateError
from enrollment.keys import generate_key, load_private_key, node_id_for, public_to_text
from enrollment.tokens import (
    REDEEM_GRACE_MS,
    JoinClaim,
    mint_token,
    open_token,
    prove_join,
    token_envelope,
)
from populi_peer.agent.agent import Agent
from populi_peer.clock import Clock
from populi_peer.errors import PeerError, RefusedError, ServiceUnavailable
from populi_peer.joining import PEER_NODE_ID_EXTENSION, join_cluster
from populi_peer.testing.cluster import VirtualCluster
from support.disk import fill, small_tmpfs
from support.vcluster import node_action, unsigned_as, vcluster


async def _challenge(client: httpx.AsyncClient) -> str:
    answer = await client.post("/v1/populi/join/challenge", json={})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["challenge"])


async def _enroll(
    client: httpx.AsyncClient,
    token_text: str,
    *,
    recipient: str,
    key: Any,
    name: str,
    token_key: Any = None,
) -> tuple[dict[str, Any], httpx.Response]:
    """Sends through ``client`` what ``populi join`` sends for the token's cluster, with a
    fresh challenge taken by ``client`` and the proofs bound to ``recipient`` (and signed
    with ``token_key`` instead of the token's own, when given: a thief's guess); returns
    that body and the answer."""
    challenge = await _challenge(client)
    held = open_token(token_text, now_ms=0, skew_ms=2**52)
    if token_key is not None:
        held = dataclasses.replace(held, token_key=token_key)
    public = public_to_text(key.public_key())
    claim = JoinClaim(
        recipient=recipient,
        challenge=challenge,
        public_key=public,
        cluster_id=held.token.cluster_id,
        name=name,
        token_id=held.token.token_id,
        addresses=(),
    )
    proofs = prove_join(claim, node_key=key, token_key=held.token_key)
    body = {
        "token": held.envelope,
        "public_key": public,
        "name": name,
        "addresses": [],
        "challenge": challenge,
        "proof": proofs.proof,
        "token_proof": proofs.token_proof,
    }
    return body, await client.post("/v1/populi/join/enroll", json=body)


def _refused(answer: httpx.Response, code: str) -> None:
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == code


def _token_state(cp: Agent, token_text: str) -> tuple[int, list[str]]:
    token_id = open_token(token_text, now_ms=0, skew_ms=2**52).token.token_id
    row = cp.enrollment.tokens.get(token_id)
    assert row is not None
    return row.uses_left, cp.enrollment.tokens.used_by(token_id)


def _nothing_of(cp: Agent, node_id: str) -> None:
    """No trace of ``node_id`` on the control plane, in memory or in its database."""
    assert cp.membership.get(node_id) is None
    assert cp.standing.signer(node_id) is None
    assert cp.registry.lifecycle(node_id) is None
    conn = sqlite3.connect(f"file:{cp.store.path}?mode=ro", uri=True)
    try:
        for table in ("principals", "registers", "token_uses", "events"):
            column = "id" if table == "principals" else "node_id"
            count = conn.execute(
                f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (node_id,)
            ).fetchone()[0]
            assert count == 0, (table, count)
    finally:
        conn.close()


# -- item 1: the token never leaves the joiner; only named nodes receive a join ------------


async def test_a_proof_made_for_another_node_is_refused_and_consumes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An impostor (a retired member) relays: it takes a challenge from the control plane
    and hands it to the joiner, who binds its proofs to the node it verified in TLS — the
    impostor. Forwarded to the control plane, they do not verify."""
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, impostor = cluster.cp, cluster["w1"]
        await node_action(cluster, "w1", "retire")
        token = await cluster.mint_token()
        key = generate_key()
        async with unsigned_as(cluster, impostor.node_id) as relay:
            _, answer = await _enroll(
                relay, token, recipient=impostor.node_id, key=key, name="victim"
            )
        _refused(answer, "proof_invalid")
        assert _token_state(cp, token) == (1, [])
        _nothing_of(cp, node_id_for(key.public_key()))


async def test_a_captured_join_request_is_useless_to_whoever_captured_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        cp = cluster.cp
        token = await cluster.mint_token(uses=2)
        key = generate_key()
        async with unsigned_as(cluster, "joiner") as joiner, unsigned_as(cluster, "thief") as thief:
            captured, ok = await _enroll(joiner, token, recipient=cp.node_id, key=key, name="gpu-1")
            assert ok.status_code == 200, ok.text
            # Replayed as is: its challenge was used.
            again = await thief.post("/v1/populi/join/enroll", json=captured)
            _refused(again, "challenge_invalid")
            # With a fresh challenge, the proofs no longer match.
            fresh = {**captured, "challenge": await _challenge(thief)}
            again = await thief.post("/v1/populi/join/enroll", json=fresh)
            _refused(again, "proof_invalid")
            # The thief's own key and a proof by it: it still lacks the token's secret.
            own = generate_key()
            forged, answer = await _enroll(
                thief,
                token,
                recipient=cp.node_id,
                key=own,
                name="thief",
                token_key=generate_key(),  # the envelope, but a token key of its own
            )
            assert forged["token"] == captured["token"]
            _refused(answer, "token_proof_invalid")
        # The control plane keeps no secret: its database holds nothing to join with.
        secret = token.rsplit(".", 1)[1].encode()
        for path in cp.store.path.parent.glob("populi.db*"):
            assert secret not in path.read_bytes(), path
        assert _token_state(cp, token) == (1, [node_id_for(key.public_key())])
        _nothing_of(cp, node_id_for(own.public_key()))


async def test_the_joiner_stops_at_a_node_its_token_does_not_name(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A token signed by the real root, but naming another node: the joiner reaches the
    control plane (a valid cluster certificate) and stops before it asks for anything."""
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        cluster.network.record = True
        text, _ = mint_token(
            signing_key=load_private_key(cp.certificates.identity.paths.cluster_key),
            cluster_id=cp.certificates.identity.cluster_id,
            contacts=["cp.populi.test:443"],
            recipients=[w1.node_id],
            roles=["worker"],
            now_ms=int(cp.clock.wall() * 1000),
            ttl_ms=600_000,
            token_id=os.urandom(16),
            token_seed=os.urandom(32),
        )
        with pytest.raises(CertificateError) as info:
            await cluster.join("victim", token=text, start=False)
        error = info.value
        assert error.code == "join_peer_not_recipient"
        assert error.exit_code == 4
        assert "man in the middle" in str(error) and "\n" not in str(error)
        assert cp.node_id in str(error) and w1.node_id in str(error)
        sent = [(d.method, d.path) for d in cluster.network.log if d.src == "joiner-victim"]
        assert sent == [("GET", "/v1/populi/join/ca"), ("GET", "/v1/populi/join/ca")]
        # And the control plane itself refuses a token that does not name it.
        async with unsigned_as(cluster) as client:
            _, answer = await _enroll(
                client, text, recipient=cp.node_id, key=generate_key(), name="victim"
            )
        _refused(answer, "token_wrong_recipient")


class _SwitchAfterIdentity(httpx.AsyncBaseTransport):
    """Answers the first two requests as the control plane, the rest as ``other``: what
    a path that changes under the joiner (a DNAT rule added mid-join) would look like."""

    def __init__(self, inner: httpx.AsyncBaseTransport, other: str) -> None:
        self.inner = inner
        self.other = other
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.paths.append(request.url.path)
        if len(self.paths) > 2:
            response.extensions[PEER_NODE_ID_EXTENSION] = self.other
        return response


async def test_the_joiner_stops_when_another_node_answers_mid_join(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        cp = cluster.cp
        token = await cluster.mint_token()
        switch = _SwitchAfterIdentity(
            cluster.network.transport_for("joiner-x"), other=cluster["w1"].node_id
        )
        with pytest.raises(CertificateError) as info:
            await _join(cluster, token, "x", key=generate_key(), transport=switch)
        assert info.value.code == "join_peer_changed"
        assert "man in the middle" in str(info.value)
        assert switch.paths[-1] == "/v1/populi/join/challenge"  # the enroll never left
        assert _token_state(cp, token) == (1, [])


async def test_the_token_secret_is_never_sent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    bodies: list[bytes] = []

    def record(request: httpx.Request, response: httpx.Response) -> None:
        from support.contract import validate

        bodies.append(request.content)
        validate(request, response)

    async with vcluster(tmp_path, on_response=record) as cluster:
        token = await cluster.mint_token()
        bodies.clear()
        await cluster.join("w1", token=token, start=False)
        secret = token.rsplit(".", 1)[1]
        assert bodies and all(secret.encode() not in body for body in bodies)
        assert any(token_envelope(token).encode() in body for body in bodies)
        # A request that carries the secret is refused: a joiner never sends it.
        async with unsigned_as(cluster) as client:
            answer = await client.post(
                "/v1/populi/join/enroll",
                json={
                    "token": token,
                    "public_key": "A" * 43,
                    "name": "x",
                    "challenge": await _challenge(client),
                    "proof": "A",
                    "token_proof": "A",
                },
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "token_secret_sent"
        assert secret not in answer.text


# -- item 2: a failed join leaves nothing behind; a retry gets the first outcome ------------


class _LoseFirstEnrollAnswer(httpx.AsyncBaseTransport):
    """Delivers every request; loses the answer to the first enroll (handled, not told)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/v1/populi/join/enroll" and not self.lost:
            self.lost += 1
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


async def _join(
    cluster: VirtualCluster,
    token: str,
    name: str,
    *,
    key: Any,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
) -> tuple[str, str]:
    data_dir = cluster.root / f"{name}-{os.urandom(4).hex()}"
    result = await join_cluster(
        token,
        data_dir=data_dir,
        name=name,
        listen="127.0.0.1:0",
        advertise=[],
        clock=clock or cluster.cp.clock,
        transports=lambda _ca: transport or cluster.network.transport_for(f"joiner-{name}"),
        node_key=key,
    )
    return result.node_id, (data_dir / "tls" / "node.crt").read_text()


async def test_a_lost_answer_is_asked_again_and_gets_the_first_outcome(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        cp = cluster.cp
        token = await cluster.mint_token()
        key = generate_key()
        lossy = _LoseFirstEnrollAnswer(cluster.network.transport_for("joiner-w1"))
        node_id, cert = await _join(cluster, token, "w1", key=key, transport=lossy)
        assert lossy.lost == 1
        assert node_id == node_id_for(key.public_key())
        # The same token and key once more: the same node and certificate, no second use.
        again_id, again_cert = await _join(cluster, token, "w1", key=key)
        assert (again_id, again_cert) == (node_id, cert)
        assert _token_state(cp, token) == (0, [node_id])
        recorded = cp.enrollment.tokens.recorded(
            open_token(token, now_ms=0, skew_ms=2**52).token.token_id, node_id
        )
        assert recorded is not None and recorded.certificate == cert
        # Another key with the same token: used.
        with pytest.raises(RefusedError) as info:
            await _join(cluster, token, "w2", key=generate_key())
        assert info.value.code == "token_already_used"


async def test_two_joins_for_one_name_at_once_enroll_one_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A join is several majority writes (ADR 0017); another join for the same name in
    between must still find the name taken."""
    async with vcluster(tmp_path) as cluster:
        cp = cluster.cp
        tokens = [await cluster.mint_token(), await cluster.mint_token()]
        outcomes: list[object] = []

        async def join(token: str) -> None:
            try:
                outcomes.append(await _join(cluster, token, "w1", key=generate_key()))
            except RefusedError as exc:
                outcomes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(join, token)
        assert sorted(o for o in outcomes if isinstance(o, str)) == ["name_taken"]
        assert [m.name for m in cp.membership.nodes()].count("w1") == 1


async def test_a_join_cut_short_after_its_member_record_is_finished_by_the_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        cp = cluster.cp
        token = await cluster.mint_token()
        key = generate_key()
        node_id = node_id_for(key.public_key())
        proposed: list[object] = []
        real_propose = cp.cluster_writes.propose

        async def propose_until_the_lifecycle(item: Any) -> Any:
            # The control plane stops answering before the node's first lifecycle is stored.
            if getattr(item, "attribute", None) == "lifecycle" and item.node_id == node_id:
                raise ServiceUnavailable("cut short", code="outcome_unknown")
            proposed.append(item)
            return await real_propose(item)

        cp.cluster_writes.propose = propose_until_the_lifecycle  # type: ignore[method-assign]
        with pytest.raises(PeerError):
            await _join(cluster, token, "w1", key=key)
        assert cp.membership.get(node_id) is not None
        assert cp.registry.lifecycle(node_id) is None
        cp.cluster_writes.propose = real_propose  # type: ignore[method-assign]
        joined_id, _ = await _join(cluster, token, "w1", key=key)
        assert joined_id == node_id
        lifecycle = cp.registry.lifecycle(node_id)
        assert lifecycle is not None and lifecycle.state == "active"
        assert _token_state(cp, token) == (0, [node_id])


async def test_a_join_that_fails_on_a_full_disk_leaves_nothing_behind(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with small_tmpfs(tmp_path / "cluster" / "cp") as cp_dir:
        async with vcluster(tmp_path / "cluster") as cluster:
            cp = cluster.cp
            assert cp.store.path.parent == cp_dir
            token = await cluster.mint_token()
            # Start the WAL afresh, so that the next commit must grow it, then fill the disk.
            with sqlite3.connect(cp.store.path) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            filler = fill(cp_dir)
            key = generate_key()
            node_id = node_id_for(key.public_key())
            with pytest.raises(PeerError) as info:
                await _join(cluster, token, "w1", key=key)
            assert info.value.code == "storage_unavailable"
            assert info.value.details["http_status"] == 503
            assert "nothing was kept" in str(info.value)
            _nothing_of(cp, node_id)
            assert _token_state(cp, token) == (1, [])
            assert not list(cluster.root.glob("w1-*/populi.db"))
            # Space comes back: the same joiner tries again and joins, exactly once.
            filler.unlink()
            joined_id, cert = await _join(cluster, token, "w1", key=key)
            assert joined_id == node_id
            assert await _join(cluster, token, "w1", key=key) == (joined_id, cert)
            with pytest.raises(RefusedError) as info:
                await _join(cluster, token, "w2", key=generate_key())
            assert info.value.code == "token_already_used"
            assert _token_state(cp, token) == (0, [node_id])
            # And what was acknowledged is what a restarted control plane knows.
            await cluster.crash("cp")
            cp = await cluster.start("cp")
            assert [m.id for m in cp.membership.nodes() if m.name == "w1"] == [node_id]
            assert _token_state(cp, token) == (0, [node_id])
            await cluster.stop("cp")


# -- item 5: tokens do not live past their TTL ----------------------------------------------


async def test_a_one_second_token_is_refused_seconds_after_it_expired(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        cp = cluster.cp
        assert cp.config.security.max_skew_s == 300  # the request budget stays ±5 min
        token = await cluster.mint_token(ttl_s=1)
        await trio.sleep(1 + REDEEM_GRACE_MS / 1000)
        key = generate_key()
        with pytest.raises(RefusedError) as info:
            await _join(cluster, token, "w1", key=key)
        # Refused by the control plane (the joiner's own pre-check allows the budget).
        assert info.value.code == "token_expired"
        assert info.value.details["http_status"] == 400
        assert _token_state(cp, token) == (1, [])
        _nothing_of(cp, node_id_for(key.public_key()))
        # Within its life (and the grace on the minting clock), a short token works.
        fresh = await cluster.mint_token(ttl_s=1)
        await trio.sleep(1 + REDEEM_GRACE_MS / 1000 - 0.01)
        await _join(cluster, fresh, "w2", key=generate_key())
