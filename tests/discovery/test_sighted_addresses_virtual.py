"""A node that does not answer at the address it advertises is tried where discovery saw
it (virtual cluster: real agents, real SQLite, the memory network; sightings are noted as
a verified static peer would be). Every call still names the node it means to reach."""

from __future__ import annotations

from pathlib import Path

import trio

from populi_peer.agent.agent import Agent
from populi_peer.discovery import Sighting
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import change_settings, vcluster


def sighted(cluster: VirtualCluster, seer: Agent, seen: Agent, host: str) -> str:
    """``seen`` answers at ``host`` too, and ``seer`` saw it there; returns that address."""
    cluster.network.register(
        node_id=seen.node_id,
        host=host,
        app=seen.app,
        address=cluster.network.address_of(seen.node_id),
    )
    address = f"{host}:443"
    seer.net.sightings.note_static(
        address,
        Sighting(
            node_id=seen.node_id,
            cluster_digest=seer.net.cluster_digest,
            addresses=(address,),
            source="static",
            verified=True,
        ),
    )
    return address


async def test_a_settings_push_reaches_a_node_where_it_was_seen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        # The control plane no longer reaches w1 at the address it advertises.
        cluster.network.redirect(cp.node_id, cluster.nodes["w1"].host, "gone.populi.test")
        sighted(cluster, cp, w1, "w1-seen.populi.test")
        push = (await change_settings(cluster, kill_switch=True))["push"]
        assert (push["confirmed"], push["unconfirmed"]) == ([w1.node_id], []), push
        assert w1.records.settings["kill_switch"]


async def test_a_control_plane_seen_elsewhere_is_beaten_there_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """w1 no longer reaches the control plane at its URL and backs off; the moment
    discovery sees it at another address, w1 beats there and keeps that address."""
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        sender = w1.heartbeat_sender
        await cluster.wait_until(lambda: sender.reachable)
        cluster.network.redirect(w1.node_id, cluster.nodes["cp"].host, "gone.populi.test")
        await cluster.wait_until(lambda: sender.cp_down)
        await trio.sleep(20)  # backing off by now: beats several seconds apart
        assert not sender.reachable
        started = trio.current_time()
        address = sighted(cluster, w1, cp, "cp-seen.populi.test")
        await cluster.wait_until(lambda: sender.reachable)
        assert trio.current_time() - started < sender.interval_s()
        # Kept where it answered, not moved back to the URL the answer names (it failed).
        assert w1.control_plane.url == f"https://{address}"
        beats = sender.beats
        await cluster.wait_until(lambda: sender.beats > beats + 2)
        assert sender.reachable and w1.control_plane.url == f"https://{address}"
