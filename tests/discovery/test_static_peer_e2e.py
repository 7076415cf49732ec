"""Static peers: a real agent on loopback probed as a joiner's first contact would
(``populi_peer/discovery/_static.py``): its node id from TLS, its cluster by its CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from populi_peer.discovery import cluster_digest
from populi_peer.discovery._static import probe_peer
from populi_peer.errors import PopuliError
from populi_peer.store import Store
from support.procs import Processes, init

pytestmark = pytest.mark.e2e


async def test_a_static_peer_is_verified_ours_only_with_our_pin(
    tmp_path: Path, procs: Processes
) -> None:
    made = init(tmp_path / "cp")
    agent = procs.start_agent(tmp_path / "cp")
    address = agent.url.removeprefix("https://")
    store = Store.open(tmp_path / "cp", readonly=True)
    try:
        pin = store.get_meta("ca_pin")
    finally:
        store.close()
    ours = await probe_peer(address, our_pin=pin, timeout_s=10)
    assert ours.node_id == agent.node_id
    assert ours.cluster_digest == cluster_digest(str(made["cluster"]["id"]))  # type: ignore[index]
    assert ours.verified and ours.source == "static" and ours.addresses == (address,)
    stranger = await probe_peer(address, our_pin="sha256:" + "0" * 64, timeout_s=10)
    assert stranger.node_id == agent.node_id and not stranger.verified
    assert stranger.relation(cluster_digest("c-another")) == "foreign"
    procs.stop(agent)
    with pytest.raises(PopuliError) as caught:
        await probe_peer(address, our_pin=pin, timeout_s=5)
    assert caught.value.code == "peer_unreachable"
