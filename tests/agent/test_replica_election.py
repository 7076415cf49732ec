"""The replica behind the real election service (ADR 0017): every voter's tables follow
the records a majority stored, and a new leader's tables hold every acknowledged write.

Three voters in one trio run on virtual time, each with its own data directory (real
SQLite), its own :class:`ElectionService` and :class:`Replica`; messages are handed from
one service to another as the election route does after authenticating the caller.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from populi_peer.agent.election import ElectionService
from populi_peer.agent.replica import ClusterWrites
from populi_peer.clock import wall_ms
from populi_peer.cluster import InitResult
from populi_peer.core.cluster_state import (
    IssuedToken,
    TokenConsumed,
    consumption_item,
    issued_token_item,
    member_item,
)
from populi_peer.core.membership import Member
from populi_peer.core.registers import LIFECYCLE, MEMBER
from populi_peer.core.replication import bootstrap_voters
from populi_peer.errors import Conflict
from populi_peer.store.election import ElectionState
from populi_peer.store.events import EventLog
from populi_peer.store.tokens import JoinTokens
from populi_peer.testing import VirtualClock
from populi_peer.testing.cluster import open_virtual_cluster
from populi_peer.testing.waiting import wait_for
from support.contract import validate
from support.members import node_member
from support.voters import FAST_ELECTION, Direct, ReplicaVoter

NAMES = ("n-v1", "n-v2", "n-v3")


@dataclass
class Voter(ReplicaVoter):
    """A voter's materializer behind its election service (once it runs)."""

    service: ElectionService | None = None

    @property
    def name(self) -> str:
        return self.data_dir.name

    def writes(self) -> ClusterWrites:
        assert self.service is not None
        return ClusterWrites(election=self.service, registry=self.registry, replica=self.replica)

    def holds_member(self, node_id: str) -> bool:
        return self.membership.get(node_id) is not None

    def token_users(self, token_id: str) -> list[str]:
        return JoinTokens(self.store).used_by(token_id)


def new_member(clock: VirtualClock) -> Member:
    return node_member(
        "box",
        now_ms=wall_ms(clock),
        roles=("worker",),
        addresses=("10.0.0.9:7431",),
        cert_serial="c1",
        token_id="tok1",
    )


async def test_an_acknowledged_join_is_on_a_majority_of_tables_and_the_next_leader_has_it(
    tmp_path: Path,
    cluster_dir: tuple[Path, InitResult],
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = VirtualClock()
    dirs = {}
    for name in NAMES:
        dirs[name] = tmp_path / name
        shutil.copytree(cluster_dir[0], dirs[name])
    voters: dict[str, Voter] = {}
    for name in NAMES:
        voter = Voter.open(dirs[name], clock, now_ms=lambda: wall_ms(clock))
        # The copied directory's election state is the init node's alone: these three
        # voters start from one three-voter record instead.
        with voter.store.transaction():
            voter.store.execute("DELETE FROM election_entries")
            voter.store.execute("DELETE FROM election_vote")
        ElectionState(voter.store).bootstrap(bootstrap_voters(NAMES, "voters/1"))
        voters[name] = voter
    down: set[str] = set()
    scopes: dict[str, trio.CancelScope] = {}

    async def run(name: str, seed: int, task_status: trio.TaskStatus[None]) -> None:
        voter = voters[name]
        voter.service = ElectionService(
            node_id=name,
            clock=clock,
            state=ElectionState(voter.store),
            events=EventLog(voter.store),
            settings=FAST_ELECTION,
            transport=Direct(name, lambda to: voters[to].service, down),  # type: ignore[arg-type]
            on_records=voter.replica.apply,
            rng=random.Random(seed),
        )
        with trio.CancelScope() as scope:
            scopes[name] = scope
            await voter.service.run(task_status=task_status)

    def leaders() -> list[str]:
        return [
            n
            for n in NAMES
            if n not in down and (s := voters[n].service) is not None and s.can_act()
        ]

    async with trio.open_nursery() as nursery:
        for seed, name in enumerate(NAMES):
            await nursery.start(run, name, seed)
        await wait_for("one leader", lambda: len(leaders()) == 1)
        first = leaders()[0]
        writes = voters[first].writes()
        member = new_member(clock)
        token = IssuedToken("tok1", "digest1", ("worker",), None, 1, 0, 2**50, 0, "op")
        await writes.propose(issued_token_item(token, stamp=writes.stamp()))
        await writes.propose(
            consumption_item(TokenConsumed("tok1", 1, member.id), stamp=writes.stamp())
        )
        await writes.propose(
            member_item(
                member,
                certificate="CERT",
                stamp=writes.stamp(),
                writer_class="leader",
                actor="token:tok1",
                reason="joined",
                at_wall_ms=wall_ms(clock),
            )
        )
        # Acknowledged: on the tables of a majority (the leader's and one more at least).
        holders = [n for n in NAMES if voters[n].holds_member(member.id)]
        assert first in holders and len(holders) >= 2
        for name in holders:
            assert voters[name].token_users("tok1") == [member.id]

        # The leader dies; a survivor leads at a higher term with the join in its tables.
        down.add(first)
        scopes[first].cancel()
        await wait_for("a new leader", lambda: len(leaders()) == 1 and leaders()[0] != first)
        second = voters[leaders()[0]]
        assert second.holds_member(member.id)
        assert second.token_users("tok1") == [member.id]
        recorded = JoinTokens(second.store).recorded("tok1", member.id)
        assert recorded is not None and recorded.certificate == "CERT"
        # The token's use is taken there too: another joiner is refused, the same one not.
        writes2 = second.writes()
        assert writes2.token_use("tok1", member.id, 1) == 1
        assert writes2.token_use("tok1", "node-other", 1) is None
        with pytest.raises(Conflict) as refused:
            await writes2.propose(
                consumption_item(TokenConsumed("tok1", 1, "node-other"), stamp=writes2.stamp())
            )
        assert refused.value.code == "token_already_consumed"
        await writes2.propose(
            consumption_item(TokenConsumed("tok1", 1, member.id), stamp=writes2.stamp())
        )

        # The third voter, whatever it held at the crash, catches up from the new leader.
        third = next(n for n in NAMES if n not in (first, second.name))
        await wait_for("the third voter's tables", lambda: voters[third].holds_member(member.id))
        nursery.cancel_scope.cancel()
    for voter in voters.values():
        voter.store.close()


async def test_a_join_on_a_lone_voter_is_proposed_item_by_item_and_read_from_the_replica(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The agent's write sites propose through its election service: a join is three
    items (the token use, the member record, the first lifecycle) in the voter's records;
    the tables the agent answers from are the replica's, and survive a restart."""
    async with open_virtual_cluster(tmp_path, workers=0, on_response=validate) as cluster:
        cp = cluster.cp
        await cluster.join("w1")
        w1 = cluster["w1"].node_id
        machine = cp.election.machine
        assert machine is not None
        records = machine.records
        uses = [
            records.set_element("consumed_tokens", key)
            for key in records.members("consumed_tokens")
        ]
        assert [u.value for u in uses if u is not None] == [{"consumer": w1}]
        assert records.registers.get(w1, MEMBER) is not None
        assert records.registers.get(w1, LIFECYCLE) is not None
        token_id = uses[0].key.rpartition("/")[0]  # type: ignore[union-attr]
        assert records.set_element("issued_tokens", token_id) is not None
        # What the tables held before the election ran (the init node's and the operator's
        # records, the first settings record) was imported when the node first led; once.
        for member in cp.membership.all():
            assert records.registers.get(member.id, MEMBER) is not None, member.kind
        assert records.cluster_record("settings") is not None
        assert await cp.cluster_writes.import_tables() == 0
        # Everything the leader stored is in its tables, and nothing is pending.
        assert cp.replica.applied.entries() == records.entries()
        assert not cp.replica.lagging
        assert cp.membership.get(w1) is not None
        assert cp.enrollment.tokens.used_by(token_id) == [w1]
        # Cordon goes through the election too: the register and the table change together.
        async with cluster.operator_client() as client:
            answer = await client.post(f"/v1/populi/admin/nodes/{w1}/cordon", json={"reason": "t"})
            assert answer.status_code == 200, answer.text
            # A settings change: the record held since init goes first, then the change.
            answer = await client.post(
                "/v1/populi/admin/settings", json={"changes": {"node_cert_lifetime_s": 3 * 86400}}
            )
            assert answer.status_code == 200, answer.text
        stored = cp.election.machine.records.cluster_record("settings")
        assert stored is not None and stored.serial == 2
        assert stored.body["node_cert_lifetime_s"] == 3 * 86400
        assert cp.records.settings_serial == 2
        assert cp.records.settings["node_cert_lifetime_s"] == 3 * 86400
        cordoned = cp.election.machine.records.registers.get(w1, LIFECYCLE)
        assert cordoned is not None and cordoned.value["state"] == "cordoned"
        assert cp.registry.registers.get(w1, LIFECYCLE) == cordoned
        await cluster.crash("cp")
        cp = await cluster.start("cp")
        assert cp.membership.get(w1) is not None
        assert cp.registry.registers.get(w1, LIFECYCLE) == cordoned
        assert cp.records.settings_serial == 2


async def test_a_settings_change_of_the_election_timings_keeps_the_election_in_step(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The replica installs a settings record inside the election's own step (on_records);
    the election hears of new timings after that step, not inside it (where it would
    handle them on the machine of before the step and drop the step's own)."""
    async with open_virtual_cluster(tmp_path, workers=0, on_response=validate) as cluster:
        cp = cluster.cp
        async with cluster.operator_client() as client:
            for serial, write_timeout in ((2, 12), (3, 14)):
                answer = await client.post(
                    "/v1/populi/admin/settings",
                    json={"changes": {"election_write_timeout_s": write_timeout}},
                )
                assert answer.status_code == 200, answer.text
                machine = cp.election.machine
                assert machine is not None
                stored = machine.records.cluster_record("settings")
                assert stored is not None and stored.serial == serial
                assert cp.records.settings_serial == serial
                await trio.sleep(0)
                assert cp.election.settings.write_timeout_s == write_timeout
