"""Three voters in a virtual cluster (real agents, the signed API over the memory network,
virtual time): the election through ``POST /v1/populi/election`` (ADR 0016).

- nodes that join with a ``voter`` token become voters one change at a time, each change
  written by the leader through the election;
- the leader crashes: a survivor leads at a higher term, an operator command (cordon)
  works through it, a worker follows it, and the old leader restarted follows it too;
- a voter that does not lead refuses control-plane calls with the leader's id and term.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from populi_peer.agent.agent import Agent
from populi_peer.agent.voters import JOIN_ADD_RETRY_S
from populi_peer.api.client import SignedAuth
from populi_peer.core.hlc import Hlc
from populi_peer.core.registers import Stamp
from populi_peer.core.replication import SetElement
from populi_peer.errors import Conflict
from populi_peer.testing.cluster import VirtualCluster, open_virtual_cluster
from populi_peer.testing.network import Faults
from support.contract import validate
from support.mesh import meta_of

GUARD_S = 300.0
VOTER_ROLES = ["worker", "submit", "voter"]


def leaders(cluster: VirtualCluster, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if cluster.nodes[n].running and cluster[n].election.can_act()]


async def three_voters(cluster: VirtualCluster) -> tuple[str, ...]:
    """cp, v2 and v3, voters each, settled and known to each."""
    cp = cluster.cp
    await cluster.join("v2", roles=VOTER_ROLES)
    await cluster.wait_until(
        lambda: (v := cp.election.voters) is not None and len(v.voters) == 2,
        timeout_s=GUARD_S,
        what="v2 is a voter",
    )
    await cluster.join("v3", roles=VOTER_ROLES)
    return await three_settled_voters(cluster, "three voters, settled, known to each")


async def three_settled_voters(cluster: VirtualCluster, what: str) -> tuple[str, ...]:
    """Wait until cp, v2 and v3 each hold the voter set of the three, settled."""
    names = ("cp", "v2", "v3")
    ids = {cluster[n].node_id for n in names}
    await cluster.wait_until(
        lambda: all(
            (v := cluster[n].election.voters) is not None and v.voters == ids and v.settled
            for n in names
        ),
        timeout_s=GUARD_S,
        what=what,
    )
    return names


async def test_three_voters_survive_the_leader_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=0, on_response=validate) as cluster:
        cp = cluster.cp
        names = await three_voters(cluster)
        await cluster.join("w1", roles=["worker", "submit"])
        ids = {n: cluster[n].node_id for n in names}
        assert leaders(cluster, names) == ["cp"]
        first_term = cp.election.term
        # A voter that does not lead refuses control-plane calls, naming the leader.
        operator = cp.certificates.identity.operator
        assert operator is not None

        def client(name: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=cluster.network.transport_for("operator"),
                base_url=f"https://{cluster.nodes[name].host}",
                auth=SignedAuth(operator, cluster[name].node_id, cp.clock),
            )

        async with client("v2") as v2:
            refused = await v2.get("/v1/populi/nodes")
        assert refused.status_code == 409, refused.text
        details = refused.json()["error"]["details"]
        assert details["leader_id"] == ids["cp"] and details["term"] == first_term

        # The leader dies without a word; a survivor leads at a higher term.
        await cluster.crash("cp")
        await cluster.wait_until(
            lambda: len(leaders(cluster, names)) == 1, timeout_s=GUARD_S, what="a new leader"
        )
        (second,) = leaders(cluster, names)
        new = cluster[second]
        assert new.election.term > first_term
        # Operator commands work through it (cordon a worker).
        async with client(second) as leader_client:
            cordoned = await leader_client.post(
                f"/v1/populi/admin/nodes/{cluster['w1'].node_id}/cordon", json={}
            )
        assert cordoned.status_code == 200, cordoned.text
        # The worker follows the new leader (its heartbeats go there).
        w1 = cluster["w1"]
        await cluster.wait_until(
            lambda: w1.control_plane.id == new.node_id and w1.heartbeat_sender.reachable,
            timeout_s=GUARD_S,
            what="the worker follows the new leader",
        )
        # The old leader comes back from its disk and follows.
        old: Agent = await cluster.start("cp")
        await cluster.wait_until(
            lambda: (
                old.election.leader_id == new.node_id
                and old.control_plane.id == new.node_id
                and not old.control_plane.is_self
            ),
            timeout_s=GUARD_S,
            what="the old leader follows",
        )
        assert leaders(cluster, names) == [second]


async def test_a_cut_off_leader_stops_acting_before_another_starts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The leader is cut off from both other voters: it stops acting as control plane
    (its routes refuse, its leader-only services stop) when its lease ends, a new leader
    is elected, and at no instant do two nodes act; healed, the old one follows."""
    async with open_virtual_cluster(tmp_path, workers=0, on_response=validate) as cluster:
        names = await three_voters(cluster)
        cp = cluster.cp
        overlap: list[list[str]] = []
        done = trio.Event()

        async def watch() -> None:
            while not done.is_set():
                acting = [n for n in names if cluster[n].control_plane.is_self]
                if len(acting) > 1:
                    overlap.append(acting)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for other in ("v2", "v3"):
                cluster.network.partition(cp.node_id, cluster[other].node_id)
            await cluster.wait_until(
                lambda: not cp.control_plane.is_self, timeout_s=GUARD_S, what="cp stops acting"
            )
            await cluster.wait_until(
                lambda: len(leaders(cluster, names)) == 1 and leaders(cluster, names) != ["cp"],
                timeout_s=GUARD_S,
                what="a new leader among the others",
            )
            (second,) = leaders(cluster, names)
            assert cluster[second].election.term > 1
            async with cluster.operator_client() as client:
                refused = await client.get("/v1/populi/nodes")
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "not_control_plane"
            cluster.network.heal()
            await cluster.wait_until(
                lambda: cp.election.leader_id == cluster[second].node_id,
                timeout_s=GUARD_S,
                what="healed, cp follows",
            )
            done.set()
        assert overlap == []


async def test_status_names_the_leader_and_the_voters_and_events_name_each_election(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=1, on_response=validate) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        async with cluster.operator_client() as client:
            status = (await client.get("/v1/populi/status")).json()
            events = (await client.get("/v1/populi/events", params={"kind": "election"})).json()
        assert status["term"] == cp.election.term
        assert status["leader"] == {"id": cp.node_id, "name": "cp", "url": cp.control_plane.url}
        assert [v["id"] for v in status["voters"]] == [cp.node_id]
        assert status["election_role"] == "leader"
        causes = [(e["detail"]["role"], e["detail"]["cause"]) for e in events["events"]]
        assert ("leader", "vote_won") in causes
        async with cluster.operator_client(via="w1") as client:
            status = (await client.get("/v1/populi/status")).json()
        # A worker holds no voter set; its leader is the control plane it follows.
        assert status["voters"] == [] and status["leader"]["id"] == cp.node_id
        assert w1.election.voters is None


def test_a_settings_record_leaves_out_election_timings_at_their_default() -> None:
    """A node of the version before the election refuses settings keys it does not know:
    a record signs the election timings only when they differ from their values then
    (``ELECTION_OMITTED``; ADR 0019 changed the defaults), so a rolling upgrade keeps
    taking records (the timings an older node never uses)."""
    from populi_peer.core import settings as cluster_settings

    values = cluster_settings.validate_settings(
        {"remote_exec_enabled": True, "leader_lease_s": 5.0}
    )
    body = cluster_settings.signed_body(values)
    assert not cluster_settings.ELECTION_KEYS & body.keys()
    assert cluster_settings.validate_settings(body) == values
    changed = cluster_settings.validate_settings(
        {"leader_lease_s": 4.0, "election_heartbeat_s": 0.5}
    )
    assert cluster_settings.signed_body(changed)["election_heartbeat_s"] == 0.5


async def test_an_operator_removes_and_adds_back_a_voter_one_change_at_a_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=1, on_response=validate) as cluster:
        names = await three_voters(cluster)
        cp, v3 = cluster.cp, cluster["v3"]
        # A write proposed to a voter that does not lead names the leader.
        with pytest.raises(Conflict) as refused:
            await v3.election.write(
                SetElement(
                    "revoked_nodes",
                    "n-x",
                    {"reason": "test"},
                    Stamp(v3.election.term, Hlc(1, 0), v3.node_id),
                )
            )
        details = refused.value.details
        assert refused.value.code == "not_control_plane" and details["leader_id"] == cp.node_id
        assert details["leader_url"] == cp.control_plane.url and details["term"] == cp.election.term
        async with cluster.operator_client() as client:
            removed = await client.post(
                "/v1/populi/admin/voters", json={"action": "remove", "node": "v3"}
            )
            assert removed.status_code == 200, removed.text
            body = removed.json()
            assert body["changed"] and v3.node_id not in body["voters"]
            assert v3.node_id in body["previous"]
            again = await client.post(
                "/v1/populi/admin/voters", json={"action": "remove", "node": "v3"}
            )
            assert again.status_code == 200 and again.json()["changed"] is False
            # A node that did not join as a voter cannot be one.
            worker = await client.post(
                "/v1/populi/admin/voters", json={"action": "add", "node": "w1"}
            )
            assert (
                worker.status_code == 409 and worker.json()["error"]["code"] == "not_a_voter_node"
            )
            await cluster.wait_until(
                lambda: all(
                    (v := cluster[n].election.voters) is not None
                    and v.voters == {cp.node_id, cluster["v2"].node_id}
                    and v.settled
                    for n in names[:2]
                ),
                timeout_s=GUARD_S,
                what="two voters, settled",
            )
            added = await client.post(
                "/v1/populi/admin/voters", json={"action": "add", "node": v3.node_id}
            )
            assert added.status_code == 200, added.text
            assert set(added.json()["voters"]) == {cluster[n].node_id for n in names}
        events = cp.events.page(kind="voters_changed", limit=10)
        assert [e.detail["action"] for e in events][-2:] == ["remove", "add"]
        assert leaders(cluster, names) == ["cp"]


async def test_a_joined_voter_is_added_once_its_leader_leads_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """v2 and v3 joined as voters. v2's addition is stored, and v2 stops before the
    leader's mark that the change is settled reaches it, so the leader's lease, which
    now needs v2, lapses; v3, heard meanwhile, waits for that mark
    (``voter_change_pending``), and its next try meets ``not_control_plane`` naming no
    leader: an election under way, which this node may win again. It is tried again,
    and once the leader leads again (v2 back) v3 is a voter too."""
    async with open_virtual_cluster(
        tmp_path, workers=0, on_response=validate, faults=Faults(delay_s=(0.05, 0.1))
    ) as cluster:
        cp = cluster.cp
        await cluster.join("v2", roles=VOTER_ROLES, start=False)
        await cluster.join("v3", roles=VOTER_ROLES, start=False)

        v2 = meta_of(cluster.nodes["v2"].data_dir, "node_id")

        async def cut_v2_before_the_mark() -> None:
            await cluster.wait_until(
                lambda: (
                    (v := cp.election.voters) is not None
                    and len(v.voters) == 2
                    and cp.election.machine is not None
                    and cp.election.machine.voter_set is not None
                    and cp.election.machine.voter_set.settled
                    and not cp.election.voters_settled()
                ),
                timeout_s=GUARD_S,
                poll_s=0.001,
                what="v2's addition stored, its settled mark not yet",
            )
            cluster.network.partition(cp.node_id, v2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_v2_before_the_mark)
            await cluster.start("v2")
        await cluster.crash("v2")
        cluster.network.heal()
        v3 = await cluster.start("v3")
        await cluster.wait_until(
            lambda: v3.heartbeat_sender.reachable or not cp.election.can_act(),
            timeout_s=GUARD_S,
            what="cp hears v3",
        )
        assert v3.heartbeat_sender.reachable, "cp's lease lapsed before it heard v3"
        await cluster.wait_until(
            lambda: not cp.election.can_act(), timeout_s=GUARD_S, what="cp's lease lapses"
        )
        # Long enough for v3's addition to be tried again while cp may not act.
        await trio.sleep(3 * JOIN_ADD_RETRY_S)
        # v2 comes back, unable to reach cp for a while: cp, whose calls reach it, leads
        # again (the addition is this leader's to make; a new leader knows nothing of it).
        cluster.network.block(v2, cp.node_id)
        await cluster.start("v2")
        await cluster.wait_until(cp.election.can_act, timeout_s=GUARD_S, what="cp leads again")
        cluster.network.heal()
        names = await three_settled_voters(cluster, "three settled voters")
        assert leaders(cluster, names) == ["cp"]
