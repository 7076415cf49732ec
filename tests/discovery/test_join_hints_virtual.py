"""``populi join`` when the token's addresses do not answer: sightings of the token's
recipient are tried, and proven like any contact (virtual cluster: real agents, real
SQLite, the memory network; the real-mDNS version is tests/lab/test_discovery_lab.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from enrollment.tokens import JoinToken, open_token
from populi_peer.errors import PeerError
from populi_peer.joining import join_cluster
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import vcluster


async def _join(cluster: VirtualCluster, token: str, hints: list[str], asked: list[JoinToken]):  # type: ignore[no-untyped-def]
    async def find_contacts(held: JoinToken) -> list[str]:
        asked.append(held)
        await trio.lowlevel.checkpoint()
        return hints

    return await join_cluster(
        token,
        data_dir=cluster.root / f"w1-{os.urandom(4).hex()}",
        name="w1",
        listen="127.0.0.1:0",
        advertise=[],
        clock=cluster.cp.clock,
        transports=lambda _ca: cluster.network.transport_for("joiner-w1"),
        find_contacts=find_contacts,
    )


def _dead_token_address(cluster: VirtualCluster, token: str) -> None:
    """The token's address no longer answers (the control plane moved); the control plane
    answers at another address, where it was seen."""
    contact = open_token(token, now_ms=0, skew_ms=2**52).token.contacts[0]
    host = contact.rsplit(":", 1)[0]
    cluster.network.redirect("joiner-w1", host, "gone.populi.test")
    cluster.network.register(
        node_id=cluster.cp.node_id, host="cp-moved.populi.test", app=cluster.cp.app
    )


async def test_a_dead_token_address_is_replaced_by_a_sighting_of_its_recipient(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        w2 = await cluster.join("w2")
        assert w2 is not None
        token = await cluster.mint_token()
        _dead_token_address(cluster, token)
        asked: list[JoinToken] = []
        # First a sighting that claims the recipient's id at another member's address (a
        # forged announcement): TLS shows a node the token does not name; passed over.
        result = await _join(
            cluster, token, [f"{cluster.nodes['w2'].host}:443", "cp-moved.populi.test:443"], asked
        )
        assert result.contact == "cp-moved.populi.test:443"
        assert result.control_plane_url == "https://cp-moved.populi.test:443"
        assert [held.recipients for held in asked] == [(cluster.cp.node_id,)]
        assert cluster.cp.membership.get(result.node_id) is not None


async def test_sightings_that_prove_to_be_someone_else_join_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        await cluster.join("w2")
        token = await cluster.mint_token()
        _dead_token_address(cluster, token)
        members = {m.id for m in cluster.cp.membership.all()}
        with pytest.raises(PeerError) as caught:
            await _join(cluster, token, [f"{cluster.nodes['w2'].host}:443"], [])
        message = str(caught.value)
        assert "(seen on the LAN)" in message and "does not name" in message, message
        assert {m.id for m in cluster.cp.membership.all()} == members
        # The token was not spent: it still joins once the control plane answers.
        cluster.network.unredirect(
            "joiner-w1",
            open_token(token, now_ms=0, skew_ms=2**52).token.contacts[0].rsplit(":", 1)[0],
        )
        result = await _join(cluster, token, [], [])
        assert cluster.cp.membership.get(result.node_id) is not None
