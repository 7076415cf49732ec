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
import trio
import trio.testing

from populi_peer.agent.agent import Agent
from populi_peer.api.client import SignedAuth
from populi_peer.testing.cluster import VirtualCluster, open_virtual_cluster
from support.contract import validate

GUARD_S = 300.0
VOTER_ROLES = ["worker", "submit", "voter"]


def leaders(cluster: VirtualCluster, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if cluster.nodes[n].running and cluster[n].election.can_act()]


async def test_three_voters_survive_the_leader_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_virtual_cluster(tmp_path, workers=0, on_response=validate) as cluster:
        cp = cluster.cp
        await cluster.join("v2", roles=VOTER_ROLES)
        await cluster.wait_until(
            lambda: (v := cp.election.voters) is not None and len(v.voters) == 2,
            timeout_s=GUARD_S,
            what="v2 is a voter",
        )
        await cluster.join("v3", roles=VOTER_ROLES)
        await cluster.join("w1", roles=["worker", "submit"])
        names = ("cp", "v2", "v3")
        ids = {n: cluster[n].node_id for n in names}
        await cluster.wait_until(
            lambda: all(
                (v := cluster[n].election.voters) is not None
                and v.voters == set(ids.values())
                and v.settled
                for n in names
            ),
            timeout_s=GUARD_S,
            what="three voters, settled, known to each",
        )
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
