"""Membership and heartbeats on the virtual cluster, in virtual time."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import heard_from, node_action
from support.vcluster import vcluster as open_virtual_cluster


async def test_joined_nodes_heartbeat_and_are_fresh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=2) as cluster:
        cp = cluster.cp
        w1 = cluster["w1"]
        await heard_from(cluster, "w1", "w2")
        await trio.sleep(3)
        assert not cp.heartbeats.stale(w1.node_id)
        assert cp.heartbeats.seen[w1.node_id].scope == "lan"
        listing = cp.node_admin.node_view(w1.node_id)
        assert listing.state == "active" and listing.eligible


async def test_stale_exactly_after_the_configured_time(
    one_worker: tuple[VirtualCluster, Agent, Agent], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, cp, w1 = one_worker
    await cluster.crash("w1")
    last = cp.heartbeats.seen[w1.node_id].last_mono
    stale_after = cp.config.timings.lan.stale_after_s
    await trio.sleep_until(last + stale_after)
    assert not cp.heartbeats.stale(w1.node_id)  # exactly at the bound: still fresh
    await trio.sleep_until(last + stale_after + 0.002)
    assert cp.heartbeats.stale(w1.node_id)
    assert "heartbeat_stale" in cp.node_admin.node_view(w1.node_id).ineligible_reasons


async def test_two_second_pause_is_not_stale(
    one_worker: tuple[VirtualCluster, Agent, Agent], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, cp, w1 = one_worker
    cluster.network.pause(w1.node_id)
    # A paused process sends nothing either: cut its outgoing heartbeats for 2 s.
    cluster.network.block(w1.node_id, cp.node_id)
    worst = 0
    for _ in range(40):
        await trio.sleep(0.05)
        worst = max(worst, cp.heartbeats.age_ms(w1.node_id) or 0)
        assert not cp.heartbeats.stale(w1.node_id)
    cluster.network.heal()
    cluster.network.resume(w1.node_id)
    await trio.sleep(3)
    assert not cp.heartbeats.stale(w1.node_id)
    assert worst >= 2000


async def test_partitioned_node_goes_stale_and_comes_back(
    one_worker: tuple[VirtualCluster, Agent, Agent], autojump_clock: trio.testing.MockClock
) -> None:
    cluster, cp, w1 = one_worker
    cluster.network.partition(w1.node_id, cp.node_id)
    went_stale = await cluster.wait_until(lambda: cp.heartbeats.stale(w1.node_id))
    assert 5.0 <= went_stale <= 7.0
    await cluster.wait_until(lambda: cluster["w1"].heartbeat_sender.cp_down)
    cluster.network.heal()
    back = await cluster.wait_until(lambda: not cp.heartbeats.stale(w1.node_id))
    # Backoff is capped at 30 s.
    assert back <= 31.0
    assert not cluster["w1"].heartbeat_sender.cp_down


async def test_maintenance_for_one_minute_clears_after_60_s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        answer = await node_action(
            cluster, "w1", "maintenance", until_in_s=60, reason="kernel update"
        )
        assert answer["node"]["state"] == "maintenance"
        await trio.sleep(59.9)
        assert cp.registry.lifecycle(w1.node_id).state == "maintenance"
        await trio.sleep(0.2)
        lc = cp.registry.lifecycle(w1.node_id)
        assert lc.state == "active" and lc.reason == "maintenance_ended"
        # Derived when read, never written by a timer: the stored record is unchanged.
        assert cp.registry.registers.lifecycle(w1.node_id).state == "maintenance"
        # The worker learns its lifecycle from heartbeat answers.
        await trio.sleep(2)
        assert w1.heartbeat_sender.lifecycle.state == "active"


async def test_retired_node_learns_through_heartbeats_and_is_refused_everywhere(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=2) as cluster:
        w1, w2 = cluster["w1"], cluster["w2"]
        await cluster.wait_until(lambda: w2.membership.get(w1.node_id) is not None)
        await node_action(cluster, "w1", "retire", reason="stolen laptop")
        # w2 pulls the newer revocation list with its next heartbeat answer.
        await cluster.wait_until(lambda: w2.revocations.is_revoked(w1.node_id), timeout_s=5)
        assert w2.standing.signer(w1.node_id) is not None  # still a member record...
        assert w2.revocations.is_revoked(w1.node_id)  # ...but refused by every request check
        await cluster.wait_until(lambda: w1.heartbeat_sender.expelled, timeout_s=10)


async def test_membership_reaches_every_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=2) as cluster:
        await cluster.join("w3")
        w3_id = cluster["w3"].node_id
        took = await cluster.wait_until(lambda: cluster["w1"].membership.get(w3_id) is not None)
        assert took <= 2.5  # within two heartbeats


@pytest.mark.parametrize(
    "skew_s,ok", [(240.0, True), (-240.0, True), (600.0, False), (-600.0, False)]
)
async def test_clock_skew_budget_between_nodes(
    one_worker: tuple[VirtualCluster, Agent, Agent],
    autojump_clock: trio.testing.MockClock,
    skew_s: float,
    ok: bool,
) -> None:
    cluster, cp, w1 = one_worker
    cluster.nodes["w1"].clock.set_skew(skew_s)
    beats = w1.heartbeat_sender.beats
    await trio.sleep(4)
    if ok:
        assert w1.heartbeat_sender.beats > beats
        assert not cp.heartbeats.stale(w1.node_id)
    else:
        assert cp.heartbeats.stale(w1.node_id) or w1.heartbeat_sender.cp_down


async def test_old_inbox_messages_and_task_dirs_are_pruned(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    import json as _json

    async with open_virtual_cluster(tmp_path) as cluster:
        cp = cluster.cp
        now_ms = int(cp.clock.wall() * 1000)
        old_ms = now_ms - int(cp.config.exec.retain_finished_s * 1000) - 1000
        task_dir = cp.certificates.identity.paths.tasks / "worker" / "t-old" / "1"
        task_dir.mkdir(parents=True)
        (task_dir / "stdout").write_text("old output")
        plan = {
            "task_id": "t-old",
            "attempt": 1,
            "role": "worker",
            "submitter": "n-x",
            "token": "1.1",
            "lease_id": "l-1",
            "ttl_s": 6.0,
            "renewable": True,
            "argv": ["true"],
            "env": {},
            "gpus": [],
            "work_class": "agent",
        }
        with cp.store.transaction():
            cp.store.execute(
                "INSERT INTO inbox (message_id, sender, type, body, received_ms) VALUES ('n-x/m-old', 'n-x', 'result', '{}', ?)",
                (old_ms,),
            )
            cp.store.execute(
                "INSERT INTO inbox (message_id, sender, type, body, received_ms) VALUES ('n-x/m-new', 'n-x', 'result', '{}', ?)",
                (now_ms,),
            )
            cp.store.execute(
                # Its end acknowledged (released_ms): until then the node's reports carry
                # it, and it is kept (ADR 0015).
                "INSERT INTO attempts (task_id, attempt, role, submitter, token, lease_id, state, body, result, delivered_ms, updated_ms, released_ms) VALUES ('t-old', 1, 'worker', 'n-x', '1.1', 'l-1', 'finished', ?, '{}', ?, ?, ?)",
                (_json.dumps(plan), old_ms, old_ms, old_ms),
            )
        assert cp.janitor.prune() == {"inbox_messages": 1, "task_dirs": 1}
        assert not task_dir.exists()
        assert [r[0] for r in cp.store.execute("SELECT message_id FROM inbox")] == ["n-x/m-new"]
        # The attempt's record stays.
        assert cp.store.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 1
