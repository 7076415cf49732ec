"""The election service without a whole agent (ADR 0011 Decision 7, ADR 0016): real
SQLite, virtual time, the machine driven by trio.

- a lone voter (the ``populi init`` node) elects itself at start; a write is applied at
  once (a majority of one); ``on_records`` gets every stored entry;
- its term, vote and records survive a restart (a new term; the records replayed);
- a refused write names the refusal; a write on a non-leader is ``not_control_plane``;
- a persist that fails carries out nothing more and restarts the machine from storage.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from populi_peer.agent.election import ElectionService
from populi_peer.core.election import ElectionSettings
from populi_peer.core.hlc import Hlc
from populi_peer.core.registers import Stamp
from populi_peer.core.replication import Entry, SetElement, bootstrap_voters
from populi_peer.errors import Conflict, ServiceUnavailable, StorageUnavailable
from populi_peer.store import Store
from populi_peer.store.election import ElectionState
from populi_peer.store.events import EventLog
from populi_peer.testing import VirtualClock
from populi_peer.testing.cluster import open_virtual_cluster
from populi_peer.testing.waiting import wait_for
from support.contract import validate
from support.voters import FAST_ELECTION, Direct

NODE = "n-voter-a"


def token(service: ElectionService, key: str, consumer: str) -> SetElement:
    return SetElement(
        "consumed_tokens", key, {"consumer": consumer}, Stamp(service.term, Hlc(1, 0), NODE)
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Entry, ...]] = []

    def __call__(self, entries: Sequence[Entry]) -> None:
        self.calls.append(tuple(entries))

    @property
    def entries(self) -> list[Entry]:
        return [e for call in self.calls for e in call]


def service_for(store: Store, recorder: Recorder, node_id: str = NODE) -> ElectionService:
    return ElectionService(
        node_id=node_id,
        clock=VirtualClock(),
        state=ElectionState(store),
        events=EventLog(store),
        settings=ElectionSettings(),
        on_records=recorder,
    )


def bootstrap(store: Store, voters: Sequence[str] = (NODE,)) -> Entry:
    entry = bootstrap_voters(voters, "voters/1")
    ElectionState(store).bootstrap(entry)
    return entry


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A new store in ``tmp_path``, closed after the test."""
    opened = Store.open(tmp_path, create=True)
    yield opened
    opened.close()


@asynccontextmanager
async def running(service: ElectionService) -> AsyncIterator[ElectionService]:
    """``service`` started, and running until the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def test_a_lone_voter_elects_itself_and_applies_a_write_at_once(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    voters = bootstrap(store)
    recorder = Recorder()
    service = service_for(store, recorder)
    async with running(service):
        assert service.role == "leader" and service.leader_id == NODE
        assert service.term == 1 and service.can_act()
        assert recorder.entries == [voters]  # the stored entries, replayed at start
        entry = await service.write(token(service, "tok-1", "node-x"))
        assert entry.write_id.term == 1 and entry.item == token(service, "tok-1", "node-x")
        assert recorder.calls[-1] == (entry,)
        # Stored before it was acknowledged.
        vote, records = ElectionState(store).load()
        assert vote.term == 1 and vote.voted_for == NODE
        assert entry in records.entries()
        # The election is in the event log, with its cause.
        kinds = [
            (e.detail["role"], e.detail["cause"])
            for e in EventLog(store).page(kind="election", limit=10)
        ]
        assert ("leader", "vote_won") in kinds


async def test_term_vote_and_records_survive_a_restart(
    tmp_path: Path, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    bootstrap(store)
    first = Recorder()
    service = service_for(store, first)
    async with running(service):
        written = await service.write(token(service, "tok-1", "node-x"))
    store.close()

    reopened = Store.open(tmp_path)
    again = Recorder()
    service = service_for(reopened, again)
    async with running(service):
        assert service.role == "leader" and service.term == 2
        assert written in again.calls[0]  # replayed to the materializer at start
        assert service.machine is not None
        assert service.machine.records.set_element("consumed_tokens", "tok-1") == written.item
    reopened.close()


async def test_refusals_name_their_reason(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    bootstrap(store)
    service = service_for(store, Recorder())
    async with running(service):
        await service.write(token(service, "tok-1", "node-x"))
        with pytest.raises(Conflict) as refused:
            await service.write(token(service, "tok-1", "node-y"))
        assert refused.value.code == "token_already_consumed"


async def test_a_node_that_is_not_the_leader_refuses_writes_as_not_control_plane(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    # Two voters and no peer reachable: no leader, ever.
    bootstrap(store, (NODE, "n-voter-b"))
    service = service_for(store, Recorder())
    async with running(service):
        await trio.sleep(60)
        assert service.role in ("follower", "precandidate") and not service.can_act()
        with pytest.raises(Conflict) as refused:
            await service.write(token(service, "tok-1", "node-x"))
        assert refused.value.code == "not_control_plane"
        assert refused.value.details["term"] == service.term


async def failed_write(
    service: ElectionService, failing: dict[str, bool]
) -> tuple[int, ServiceUnavailable]:
    """Once ``service`` leads: its term, and its refusal of a write made with ``failing``
    switched on."""
    await wait_for("the leader", lambda: service.role == "leader")
    term = service.term
    failing["on"] = True
    with pytest.raises(ServiceUnavailable) as refused:
        await service.write(token(service, "tok-1", "node-x"))
    return term, refused.value


async def test_a_write_whose_persist_fails_is_refused_and_the_leader_stays(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """The step's first persist fails (a full disk): nothing of it reached storage, so the
    machine before it still matches storage and stays — same term, still the leader, its
    services running — and the write is refused, stored nowhere."""
    bootstrap(store)
    recorder = Recorder()
    service = service_for(store, recorder)
    failing = {"on": False}
    real_save = service.state.save_records

    def save_records(entries: object, digest: object) -> None:
        if failing["on"]:
            raise StorageUnavailable("disk full", code="storage_unavailable")
        real_save(entries, digest)  # type: ignore[arg-type]

    service.state.save_records = save_records  # type: ignore[method-assign]
    async with running(service):
        term, refused = await failed_write(service, failing)
        assert refused.code == "storage_unavailable"
        assert refused.details["reason"] == "persist_failed"
        # Nothing of that step was carried out: not acknowledged, not materialized.
        assert not any(e.key == ("set", "consumed_tokens", "tok-1") for e in recorder.entries)
        await trio.sleep(30)
        assert service.role == "leader" and service.term == term and service.can_act()
        failing["on"] = False
        assert service.machine is not None
        assert service.machine.records.set_element("consumed_tokens", "tok-1") is None
        entry = await service.write(token(service, "tok-1", "node-y"))
        assert entry.write_id.term == term


async def test_a_failure_after_a_commit_restarts_from_storage(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """A step whose records committed and then failed (here the materializer) left
    storage ahead of the machine: the service drops the machine and restarts it from
    storage (ADR 0011 Decision 7), so it never acts on a state storage does not hold; the
    write's outcome is unknown — and in fact it took effect."""
    bootstrap(store)
    recorder = Recorder()
    service = service_for(store, recorder)
    failing = {"on": False}

    def materialize(entries: Sequence[Entry]) -> None:
        if failing["on"]:
            failing["on"] = False
            raise StorageUnavailable("disk full", code="storage_unavailable")
        recorder(entries)

    service.on_records = materialize
    async with running(service):
        term, unknown = await failed_write(service, failing)
        assert unknown.code == "outcome_unknown"
        await wait_for("a restart", lambda: service.role == "leader" and service.term > term)
        assert service.term == store_term(store)
        # Restarted from storage: the stored write is there, and replayed to the
        # materializer at the start.
        assert service.machine is not None
        assert service.machine.records.set_element("consumed_tokens", "tok-1") is not None
        assert any(e.key == ("set", "consumed_tokens", "tok-1") for e in recorder.entries)


def store_term(store: Store) -> int:
    return ElectionState(store).load()[0].term


async def test_the_init_node_of_a_cluster_is_the_sole_voter_and_leads(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Wired into the agent: the ``populi init`` node holds the voter record, elects itself
    at start and writes through its service; a joined worker is no voter and never leads."""
    async with open_virtual_cluster(tmp_path, workers=1, on_response=validate) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        assert cp.election.role == "leader" and cp.election.can_act()
        voters = cp.election.voters
        assert voters is not None and voters.voters == {cp.node_id}
        assert cp.control_plane.is_self and cp.control_plane.term == cp.election.term == 1
        entry = await cp.election.write(
            SetElement(
                "revoked_nodes",
                "n-gone",
                {"reason": "test"},
                Stamp(cp.election.term, Hlc(1, 0), cp.node_id),
            )
        )
        assert entry.write_id.term == cp.election.term
        await trio.sleep(30)
        assert w1.election.voters is None and w1.election.role == "follower"
        assert not w1.election.can_act()
        # The worker still follows the init node as its control plane.
        assert w1.control_plane.id == cp.node_id


async def test_three_voters_elect_one_leader_and_a_survivor_keeps_every_applied_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    names = ("n-v1", "n-v2", "n-v3")
    stores = {}
    for name in names:
        (tmp_path / name).mkdir()
        stores[name] = Store.open(tmp_path / name, create=True)
        ElectionState(stores[name]).bootstrap(bootstrap_voters(names, "voters/1"))
    services: dict[str, ElectionService] = {}
    down: set[str] = set()
    scopes: dict[str, trio.CancelScope] = {}

    clocks = {name: VirtualClock() for name in names}

    def build(name: str, seed: int) -> ElectionService:
        service = ElectionService(
            node_id=name,
            clock=clocks[name],
            state=ElectionState(stores[name]),
            events=EventLog(stores[name]),
            settings=FAST_ELECTION,
            transport=Direct(name, services.get, down),  # type: ignore[arg-type]
            rng=random.Random(seed),
        )
        services[name] = service
        return service

    async def run(name: str, seed: int, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            scopes[name] = scope
            await build(name, seed).run(task_status=task_status)

    def leaders() -> list[str]:
        return [n for n in names if n not in down and services[n].can_act()]

    async with trio.open_nursery() as nursery:
        for seed, name in enumerate(names):
            await nursery.start(run, name, seed)
        await wait_for("one leader", lambda: len(leaders()) == 1)
        first = leaders()[0]
        term = services[first].term
        assert all(services[n].leader_id == first for n in names)
        entry = await services[first].write(
            SetElement(
                "consumed_tokens",
                "tok-1",
                {"consumer": "node-x"},
                Stamp(term, Hlc(1, 0), first),
            )
        )
        # Applied: a majority stored it (the leader and at least one more, on disk).
        holders = [n for n in names if entry in ElectionState(stores[n]).load()[1].entries()]
        assert len(holders) >= 2 and first in holders

        # The leader dies (nothing graceful); a survivor leads at a higher term, with it.
        down.add(first)
        scopes[first].cancel()
        await wait_for("a new leader", lambda: len(leaders()) == 1 and leaders()[0] != first)
        second = leaders()[0]
        assert services[second].term > term
        machine = services[second].machine
        assert machine is not None
        assert machine.records.set_element("consumed_tokens", "tok-1") == entry.item
        with pytest.raises(Conflict) as refused:
            await services[second].write(
                SetElement(
                    "consumed_tokens",
                    "tok-1",
                    {"consumer": "node-y"},
                    Stamp(services[second].term, Hlc(2, 0), second),
                )
            )
        assert refused.value.code == "token_already_consumed"

        # The old leader comes back from its disk and follows the new one.
        down.discard(first)
        await nursery.start(run, first, 99)
        await wait_for("the old leader following", lambda: services[first].leader_id == second)
        assert services[first].term == services[second].term and leaders() == [second]

        # The leader's machine sleeps past its lease (suspend: the boot clock moves, trio's
        # does not): it may not act the moment it wakes, before any timer of its fires.
        assert services[second].can_act()
        clocks[second].suspend(FAST_ELECTION.leader_lease_s * 2)
        assert not services[second].can_act()
        nursery.cancel_scope.cancel()
    for store in stores.values():
        store.close()


async def test_a_control_plane_made_before_the_election_becomes_the_sole_voter(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A data directory from before the election (schema 5: no voter record) is migrated,
    and its control plane writes the first voter record at start and leads."""
    from populi_peer.cluster import init_cluster

    data_dir = tmp_path / "cp"
    init_cluster(
        data_dir,
        cluster_name="old",
        node_name="cp",
        listen="127.0.0.1:0",
        advertise=["cp.populi.test:443"],
        force=False,
        now_wall_s=VirtualClock().wall(),
    )
    store = Store.open(data_dir)
    with store.transaction():
        store.execute("DROP TABLE election_entries")
        store.execute("DROP TABLE election_vote")
        store.execute("DROP TABLE replica_applied")  # migration 7 (ADR 0017)
        store.execute("PRAGMA user_version = 5")
    store.close()
    async with open_virtual_cluster(tmp_path / "new", template=tmp_path) as cluster:
        cp = cluster.cp
        voters = cp.election.voters
        assert voters is not None and voters.voters == {cp.node_id}
        assert cp.election.role == "leader" and cp.control_plane.is_self
