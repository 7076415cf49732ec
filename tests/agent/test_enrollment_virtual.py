"""Issue acceptance for signed enrollment, on the virtual cluster (real agents, memory
network, virtual time)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.errors import CertificateError
from enrollment.keys import generate_key, load_private_key
from enrollment.revocation import RevocationList, sign_revocations
from enrollment.tokens import mint_token, token_envelope
from populi_peer.agent.agent import Agent
from populi_peer.config import Config
from populi_peer.errors import RefusedError
from support.vcluster import as_node, change_settings, node_action, unsigned_as, vcluster


def _join_rate(per_min: int) -> Config:
    """The default configuration with ``per_min`` joins a minute allowed (0: no limit)."""
    config = Config()
    return dataclasses.replace(
        config, security=dataclasses.replace(config.security, join_rate_per_min=per_min)
    )


async def _join_error(cluster, name: str, token: str, *, force: bool = False) -> RefusedError:
    with pytest.raises(RefusedError) as info:
        await cluster.join(name, token=token, force=force)
    return info.value


def _minted_for(cp: Agent, *, signing_key: Ed25519PrivateKey, ahead_ms: int = 0) -> str:
    """A worker token for ``cp``'s cluster minted outside it, signed by ``signing_key``,
    with a clock ``ahead_ms`` ahead of ``cp``'s."""
    text, _ = mint_token(
        signing_key=signing_key,
        cluster_id=cp.certificates.identity.cluster_id,
        contacts=["cp.populi.test:443"],
        recipients=[cp.node_id],
        roles=["worker"],
        now_ms=int(cp.clock.wall() * 1000) + ahead_ms,
        ttl_ms=600_000,
        token_id=secrets.token_bytes(16),
        token_seed=secrets.token_bytes(32),
    )
    return text


async def test_single_use_token_used_twice(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        token = await cluster.mint_token()
        await cluster.join("w1", token=token)
        error = await _join_error(cluster, "w2", token)
        assert error.code == "token_already_used"
        assert str(error) == "token already used"


async def test_twenty_concurrent_joins_exactly_one_succeeds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, config=_join_rate(0)) as cluster:
        token = await cluster.mint_token()
        outcomes: list[str] = []

        async def attempt(index: int) -> None:
            try:
                await cluster.join(f"c{index}", token=token, start=False)
                outcomes.append("ok")
            except RefusedError as exc:
                outcomes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(attempt, index)
        assert outcomes.count("ok") == 1
        assert outcomes.count("token_already_used") == 19
        rows = cluster.cp.store.execute("SELECT COUNT(*) FROM token_uses").fetchone()[0]
        assert rows == 1


async def test_join_rate_limit_refuses_bursts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, config=_join_rate(2)) as cluster:
        token = await cluster.mint_token(uses=5)
        await cluster.join("w1", token=token, start=False)
        error = await _join_error(cluster, "w2", token)
        assert error.code == "rate_limited"


async def test_consumed_token_stays_consumed_after_retire_and_delete(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        token = await cluster.mint_token()
        await cluster.join("w1", token=token)
        await node_action(cluster, "w1", "retire", reason="gone")
        deleted = await node_action(cluster, "w1", "delete")
        assert deleted["name_blocked"] is True
        await cluster.crash("w1")
        error = await _join_error(cluster, "w9", token)
        assert error.code == "token_already_used"


async def test_retired_name_is_blocked_until_unretire(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        await cluster.join("w1")
        await node_action(cluster, "w1", "retire")
        async with cluster.operator_client() as client:
            # A token bound to the old name cannot even be minted...
            minted = await client.post("/v1/populi/admin/tokens", json={"name": "w1"})
            assert minted.status_code == 409 and minted.json()["error"]["code"] == "name_retired"
        await cluster.crash("w1")
        # ...and a fresh unbound token cannot take the name either.
        token = await cluster.mint_token()
        cluster.nodes.pop("w1")
        error = await _join_error(cluster, "w1", token, force=True)
        assert error.code == "name_retired"
        assert "populi node unretire w1" in str(error)
        async with cluster.operator_client() as client:
            assert (
                await client.post("/v1/populi/admin/names/w1/unretire", json={})
            ).status_code == 200
            bound = (await client.post("/v1/populi/admin/tokens", json={"name": "w1"})).json()[
                "token"
            ]
        cluster.nodes.pop("w1")
        agent = await cluster.join("w1", token=bound, force=True)
        assert agent is not None
        old = [m for m in cluster.cp.membership.nodes() if m.name == "w1"]
        assert len(old) == 2  # the retired record stays until deleted; the new one is fresh


async def test_token_bound_to_a_name_refuses_another(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        token = await cluster.mint_token(name="gpu-box")
        error = await _join_error(cluster, "laptop", token)
        assert error.code == "token_name_mismatch"
        await cluster.join("gpu-box", token=token)


async def test_expired_and_not_yet_valid_tokens(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        short = await cluster.mint_token(ttl_s=60)
        await trio.sleep(60 + 301)  # past expiry plus the skew budget
        error = await _join_error(cluster, "w1", short)
        assert error.code == "token_expired"
        # A token minted with a clock an hour ahead (signed by the real cluster key).
        cp = cluster.cp
        key = load_private_key(cp.certificates.identity.paths.cluster_key)
        text = _minted_for(cp, signing_key=key, ahead_ms=3_600_000)
        error = await _join_error(cluster, "w2", text)
        assert error.code == "token_not_yet_valid"


async def test_token_of_another_cluster_or_signer_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        foreign = _minted_for(cluster.cp, signing_key=generate_key())
        # The joiner itself refuses: the CA at the contact does not match the token's pin.
        with pytest.raises(CertificateError) as info:
            await cluster.join("w1", token=foreign)
        assert info.value.code == "ca_pin_mismatch"
        # And the control plane refuses it too, should anyone send it there directly.
        async with unsigned_as(cluster) as client:
            challenge = (await client.post("/v1/populi/join/challenge", json={})).json()[
                "challenge"
            ]
            answer = await client.post(
                "/v1/populi/join/enroll",
                json={
                    "token": token_envelope(foreign),
                    "public_key": "A" * 43,
                    "name": "w1",
                    "challenge": challenge,
                    "proof": "A" * 86,
                    "token_proof": "A" * 86,
                },
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "token_foreign_signer"


async def test_ttl_above_24h_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster, cluster.operator_client() as client:
        response = await client.post("/v1/populi/admin/tokens", json={"ttl_s": 25 * 3600})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "token_ttl_too_long"
    assert response.json()["error"]["message"] == "token TTL 25h exceeds the 24h maximum"


async def test_worker_credential_on_operator_route_is_403(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        w1 = cluster["w1"]
        async with as_node(cluster, w1) as client:
            response = await client.post("/v1/populi/admin/tokens", json={})
            status = await client.get("/v1/populi/status")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "role_required"
    assert status.status_code == 200


async def test_operator_token_enrolls_an_admin_machine(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        admin = await cluster.join("admin", roles=["operator"])
        assert admin is not None and admin.certificates.identity.roles == ("operator",)
        async with as_node(cluster, admin) as client:
            response = await client.post("/v1/populi/admin/tokens", json={"roles": ["worker"]})
        assert response.status_code == 200


async def test_only_health_and_join_routes_answer_unsigned(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        app = cluster.cp.app
        open_routes = sorted(r.pattern for r in app.route_table() if r.roles is None)
        assert open_routes == [
            "/v1/populi/health",
            "/v1/populi/join/ca",
            "/v1/populi/join/challenge",
            "/v1/populi/join/enroll",
        ]
        async with unsigned_as(cluster) as client:
            for route in app.route_table():
                if route.roles is None:
                    continue
                path = (
                    route.pattern.replace("{node}", "w1")
                    .replace("{action}", "cordon")
                    .replace("{token_id}", "x")
                    .replace("{name}", "w1")
                )
                for key, value in (("{task_id}", "t"), ("{lease_id}", "l"), ("{uuid}", "u")):
                    path = path.replace(key, value)
                response = await client.request(
                    route.method, path, json={} if route.method == "POST" else None
                )
                assert response.status_code == 401, (
                    route.method,
                    route.pattern,
                    response.status_code,
                )


async def test_revocation_lists_with_lower_serial_or_foreign_signer_are_ignored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        await node_action(cluster, "w1", "retire")
        current = cp.revocations.current
        assert current is not None and current.serial == 1
        now_ms = int(cp.clock.wall() * 1000)
        cluster_key = load_private_key(cp.certificates.identity.paths.cluster_key)
        lower = sign_revocations(
            RevocationList.empty(cp.certificates.identity.cluster_id, now_ms=now_ms), cluster_key
        )
        assert cp.revocations.offer(lower, now_ms=now_ms) == "ignored_not_newer"
        forged = sign_revocations(
            dataclasses.replace(current, serial=7, revoked=()), generate_key()
        )
        assert cp.revocations.offer(forged, now_ms=now_ms) == "ignored_foreign_signer"
        assert cp.revocations.serial == 1 and cp.revocations.is_revoked(w1.node_id)


async def test_certificate_renewal_and_expiry_in_virtual_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        await change_settings(cluster, node_cert_lifetime_s=900)
        w1 = await cluster.join("w1")
        first = w1.certificates.identity.node_cert.serial_number
        # Renewed at two thirds of 900 s (+ the 1 h back-date counts in the lifetime).
        await cluster.wait_until(
            lambda: w1.certificates.identity.node_cert.serial_number != first, timeout_s=4000
        )
        # The file holds the new certificate, then the issuer certificate that signed it.
        assert (
            w1.certificates.identity.paths.node_cert.read_bytes().count(b"BEGIN CERTIFICATE") == 2
        )
        member = cluster.cp.membership.get(w1.node_id)
        assert format(w1.certificates.identity.node_cert.serial_number, "x") == member.cert_serial
        # A node whose certificate has expired is refused: stop it, let the cert lapse.
        await cluster.crash("w1")
        await trio.sleep(900 + 301)
        assert cluster.cp.standing.signer(w1.node_id) is None
        restarted = await cluster.start("w1")
        await cluster.wait_until(lambda: restarted.heartbeat_sender.expelled, timeout_s=30)
        standing = restarted.node_status.answer().to_json()["standing"]
        assert standing["state"] == "unknown_to_control_plane" and standing["rejoin"]
        assert not restarted.remote_work.enabled()


async def test_signature_for_another_recipient_is_refused_between_nodes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        w1 = cluster["w1"]
        async with as_node(cluster, w1, signed_for=w1.node_id) as client:
            response = await client.get("/v1/populi/status")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "signature_wrong_recipient"
