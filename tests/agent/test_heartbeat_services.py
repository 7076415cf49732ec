"""The heartbeat intake and sender, each built alone: no agent, no API server.

Each is given what it uses, as the agent gives it: the real stores of a data directory
that ``populi init`` made (SQLite in a tmp dir), the mock clock, the config sections. The
intake is called as its route calls it (:meth:`HeartbeatIntake.receive`); the sender talks
to a fake control plane (an ASGI app standing for another host) through the real signing
peer client, so the answers it meets are whatever a peer may send.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from enrollment.ca import certificate_public_key
from enrollment.revocation import RevocationList
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.health import Health
from populi_peer.agent.heartbeat import (
    HeartbeatIntake,
    HeartbeatReports,
    HeartbeatSender,
    Leaving,
    Liveness,
    RegisterOutbox,
)
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.api.client import PeerClient
from populi_peer.clock import wall_ms
from populi_peer.cluster import InitResult
from populi_peer.config import Config
from populi_peer.core.addresses import Cidrs, LocalAddress
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    ControlPlaneRef,
    HeartbeatAnswer,
    HeartbeatReport,
    HeldLease,
)
from populi_peer.core.registers import GPU_QUARANTINE_PREFIX, LIFECYCLE, RegisterWrite
from populi_peer.discovery import Sighting
from populi_peer.discovery.service import AddressBook, Sightings
from populi_peer.errors import Conflict, Forbidden, PeerError, PopuliError
from populi_peer.identity import Identity, load_identity
from populi_peer.store import Store
from populi_peer.store.events import EventLog
from populi_peer.testing.clock import VirtualClock
from populi_peer.testing.waiting import wait_for
from support.apps import read_body
from support.members import node_member

CONFIG = Config()
LAN_INTERVAL_S = CONFIG.timings.lan.heartbeat_interval_s
LAN_STALE_S = CONFIG.timings.lan.stale_after_s


@dataclass
class Plane:
    """The cluster-plane state of one data directory, opened as the agent opens it."""

    identity: Identity
    store: Store
    clock: VirtualClock
    membership: Membership
    records: ClusterRecords
    revocations: RevocationState
    registry: Registry
    events: EventLog
    health: Health
    closing: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def link(self, transport: httpx.AsyncBaseTransport | None = None) -> ControlPlaneLink:
        client = PeerClient(
            credential=self.identity.node_credential,
            clock=self.clock,
            transport=transport or httpx.ASGITransport(app=_nobody),
            timeout_s=10.0,
        )
        self.closing.append(client.aclose)
        return ControlPlaneLink(node_id=self.node_id, store=self.store, client=client)

    def add_node(self, name: str) -> str:
        """A node that joined (its member record and lifecycle), as the control plane holds it."""
        member = node_member(name, now_ms=wall_ms(self.clock))
        node_id = member.id
        self.membership.upsert(member)
        self.registry.set_initial(node_id, actor=self.node_id, term=1)
        return node_id

    def event_kinds(self, node_id: str) -> list[str]:
        return [event.kind for event in self.events.page(node_id=node_id, after=0, limit=100)]


async def _nobody(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError("this test calls no peer")


def open_plane(data_dir: Path) -> Plane:
    clock = VirtualClock()
    store = Store.open(data_dir)
    identity = load_identity(data_dir, store)
    membership = Membership(store)
    return Plane(
        identity=identity,
        store=store,
        clock=clock,
        membership=membership,
        records=ClusterRecords(store, membership),
        revocations=RevocationState(
            store,
            cluster_id=identity.cluster_id,
            cluster_key=certificate_public_key(identity.ca_cert),
        ),
        registry=Registry(store, identity, clock, max_skew_s=CONFIG.security.max_skew_s),
        events=EventLog(store),
        health=Health(clock),
    )


async def close(plane: Plane) -> None:
    for aclose in plane.closing:
        await aclose()
    plane.store.close()


@pytest.fixture
async def plane(cluster_dir: tuple[Path, InitResult]) -> AsyncIterator[Plane]:
    """The control plane's stores over a fresh cluster, closed after the test."""
    opened = open_plane(cluster_dir[0])
    try:
        yield opened
    finally:
        await close(opened)


# -- the intake (control plane) -------------------------------------------------------------


@dataclass
class Intake:
    plane: Plane
    intake: HeartbeatIntake
    liveness: Liveness
    heard: list[tuple[str, HeartbeatReport]]


def make_intake(plane: Plane) -> Intake:
    heard: list[tuple[str, HeartbeatReport]] = []
    liveness = Liveness(clock=plane.clock, timings=CONFIG.timings.table())

    def facts_part(node_id: str, answer: HeartbeatAnswer) -> HeartbeatAnswer:
        return replace(answer, gpu_facts_version=f"held-{len(heard)}")

    intake = HeartbeatIntake(
        clock=plane.clock,
        control_plane=plane.link(),
        address=OwnAddress(url="https://cp.test:7431"),
        liveness=liveness,
        scope=CONFIG.scope,
        membership=plane.membership,
        registry=plane.registry,
        records=plane.records,
        revocations=plane.revocations,
        events=plane.events,
        report_listeners=(lambda node_id, report: heard.append((node_id, report)),),
        answer_parts=(facts_part,),
    )
    return Intake(plane, intake, liveness, heard)


def report(**fields: Any) -> HeartbeatReport:
    return HeartbeatReport.from_json({"status": "running", **fields})


def quarantine(plane: Plane, node_id: str, *, writer: str = "self") -> RegisterWrite:
    return plane.registry.make_write(
        node_id,
        GPU_QUARANTINE_PREFIX + "GPU-1",
        {"quarantined": True, "reason": "xid_79"},
        writer_class=writer,  # type: ignore[arg-type]
        actor=node_id,
        reason="xid_79",
        term=1,
    )


async def test_the_intake_notes_applies_and_answers_a_report(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    built = make_intake(plane)
    w1 = plane.add_node("w1")
    write = quarantine(plane, w1)
    sent = report(
        addresses=["10.0.0.7:7431"],
        registers=[write.to_json()],
        revocation_serial=plane.revocations.serial,
        settings_serial=plane.records.settings_serial,
        exec_remote=False,
    )
    await trio.sleep(3)
    answer = built.intake.receive(w1, sent, address="10.0.0.7")

    # The answer: who holds the role, where, the node's lifecycle and its timings.
    assert answer.term == 1
    assert answer.control_plane == ControlPlaneRef(
        node_id=plane.node_id, url="https://cp.test:7431", addresses=("cp.test:7431",)
    )
    assert answer.lifecycle is not None and answer.lifecycle.state == "active"
    # The timing table's row for the path's scope.
    assert (
        answer.scope,
        answer.heartbeat_interval_s,
        answer.heartbeat_timeout_s,
        answer.stale_after_s,
    ) == ("lan", LAN_INTERVAL_S, CONFIG.timings.lan.heartbeat_timeout_s, LAN_STALE_S)
    assert answer.membership_version == plane.membership.version
    # It lacks nothing: no list nor record inline.
    assert answer.revocations is None and answer.settings_record is None
    # The answer parts completed it; the listeners heard the typed report.
    assert answer.gpu_facts_version == "held-1"
    assert built.heard == [(w1, sent)]
    # Noted on the monotonic clock, from where, with what it said.
    liveness = built.liveness
    assert liveness.age_ms(w1) == 0 and not liveness.stale(w1)
    assert liveness.scope(w1) == "lan" and liveness.status(w1) == "running"
    assert liveness.accepts_remote_work(w1) is False
    # Its address and its own register were applied, and the register recorded.
    member = plane.membership.get(w1)
    assert member is not None and member.addresses == ("10.0.0.7:7431",)
    assert plane.registry.registers.node(w1)[write.attribute] == write
    assert plane.event_kinds(w1) == ["register"]


async def test_staleness_is_derived_from_the_arrival_when_read(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    built = make_intake(plane)
    w1 = plane.add_node("w1")
    assert built.liveness.age_ms(w1) is None and built.liveness.stale(w1)  # never heard
    built.intake.receive(w1, report(), address="10.0.0.7")
    await trio.sleep(LAN_STALE_S)
    assert built.liveness.age_ms(w1) == int(LAN_STALE_S * 1000)
    assert not built.liveness.stale(w1)
    await trio.sleep(0.001)
    assert built.liveness.stale(w1)
    # A name (not an address) is the most patient scope.
    built.intake.receive(w1, report(), address="w1.example")
    assert built.liveness.scope(w1) == "overlay" and not built.liveness.stale(w1)


async def test_the_intake_answers_only_what_the_sender_lacks(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    built = make_intake(plane)
    w1 = plane.add_node("w1")
    now_ms = wall_ms(plane.clock)
    key = plane.identity.cluster_key
    assert key is not None
    plane.revocations.publish(
        RevocationList(
            cluster_id=plane.identity.cluster_id,
            serial=plane.revocations.serial + 1,
            issued_ms=now_ms,
        ),
        signing_key=key,
        now_ms=now_ms,
    )
    behind = built.intake.receive(
        w1, report(revocation_serial=-1, settings_serial=0), address="10.0.0.7"
    )
    assert behind.revocations == plane.revocations.text
    record = plane.records.settings_record
    assert record is not None and behind.settings_record == record.text
    current = built.intake.receive(
        w1,
        report(
            revocation_serial=plane.revocations.serial,
            settings_serial=plane.records.settings_serial,
        ),
        address="10.0.0.7",
    )
    assert current.revocations is None and current.settings_record is None


async def test_a_lifecycle_of_its_own_is_applied_and_recorded_once(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    built = make_intake(plane)
    w1 = plane.add_node("w1")
    left = NodeLifecycle("left", wall_ms(plane.clock), w1, "bye")
    write = plane.registry.make_write(
        w1, LIFECYCLE, left.to_json(), writer_class="self", actor=w1, reason="bye", term=1
    )
    leaving = report(status="leaving", registers=[write.to_json()])
    answer = built.intake.receive(w1, leaving, address="10.0.0.7")
    assert answer.lifecycle is not None and answer.lifecycle.state == "left"
    assert built.liveness.status(w1) == "leaving"
    built.intake.receive(w1, leaving, address="10.0.0.7")  # the same write again
    (event,) = [e for e in plane.events.page(node_id=w1, after=0, limit=10)]
    assert (event.kind, event.detail["command"], event.detail["to"]) == (
        "lifecycle",
        "leave",
        "left",
    )


@pytest.mark.parametrize("what", ["register-of-another", "register-as-operator", "bad-address"])
async def test_a_report_the_intake_refuses_changes_nothing(
    plane: Plane, autojump_clock: trio.testing.MockClock, what: str
) -> None:
    built = make_intake(plane)
    w1, w2 = plane.add_node("w1"), plane.add_node("w2")
    if what == "register-of-another":
        refused = report(registers=[quarantine(plane, w2).to_json()])
    elif what == "register-as-operator":
        refused = report(registers=[quarantine(plane, w1, writer="operator").to_json()])
    else:
        refused = report(addresses=["w1:port"])
    registers = plane.registry.registers
    version = plane.membership.version
    with pytest.raises(PopuliError) as raised:
        built.intake.receive(w1, refused, address="10.0.0.7")
    assert raised.value.code == ("bad_request" if what == "bad-address" else "writer_not_allowed")
    assert built.liveness.age_ms(w1) is None and built.heard == []
    assert plane.registry.registers is registers and plane.membership.version == version
    assert plane.event_kinds(w1) == []


async def test_only_the_control_plane_takes_heartbeats_and_only_from_nodes(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    built = make_intake(plane)
    w1 = plane.add_node("w1")
    with pytest.raises(Forbidden) as not_a_node:
        built.intake.receive("n-nobody", report(), address="10.0.0.7")
    assert not_a_node.value.code == "not_a_node"
    plane.store.set_meta("control_plane_id", w1)  # another node holds the role now
    with pytest.raises(Conflict) as not_cp:
        built.intake.receive(w1, report(), address="10.0.0.7")
    assert not_cp.value.code == "not_control_plane"
    assert built.liveness.seen == {}


# -- the sender (every other node) ----------------------------------------------------------

FAKE_CP = "n-fakecontrolplane"


class FakeControlPlane:
    """Another host: takes heartbeats and answers whatever ``respond`` makes of the
    report it got (a dict is sent as JSON with status 200, ``(status, dict)`` with that
    status, ``bytes`` as they are)."""

    def __init__(self, answer: Callable[[HeartbeatReport], Any]) -> None:
        self.respond = answer
        self.reports: list[HeartbeatReport] = []
        #: ``host:port`` each heartbeat was sent to.
        self.reached: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http" and scope["path"] == "/v1/populi/heartbeat"
        self.reached.append(dict(scope["headers"])[b"host"].decode())
        body = await read_body(receive)
        got = HeartbeatReport.from_json(json.loads(body))
        self.reports.append(got)
        out = self.respond(got)
        status = 200
        if isinstance(out, tuple):
            status, out = out
        payload = out if isinstance(out, bytes) else json.dumps(out).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class Unreachable(httpx.AsyncBaseTransport):
    """The network between this node and the fake: requests to a host in ``dead`` find
    no one (nothing is sent), the others reach the fake."""

    def __init__(self, fake: FakeControlPlane, dead: set[str]) -> None:
        self.inner = httpx.ASGITransport(app=fake)
        self.dead = dead

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host in self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


def good_answer(
    plane: Plane,
    *,
    state: str = "active",
    membership_version: int | None = None,
    url: str = "https://cp-moved.test:7431",
    addresses: tuple[str, ...] = (),
    timeout_s: float | None = None,
) -> dict[str, Any]:
    return HeartbeatAnswer(
        term=1,
        control_plane=ControlPlaneRef(node_id=FAKE_CP, url=url, addresses=addresses),
        membership_version=plane.membership.version
        if membership_version is None
        else membership_version,
        lifecycle=NodeLifecycle.from_json(
            {"state": state, "since_wall_ms": 1, "actor": "op", "reason": ""}
        ),
        scope="lan",
        heartbeat_interval_s=LAN_INTERVAL_S,
        heartbeat_timeout_s=timeout_s,
        stale_after_s=LAN_STALE_S,
        revocation_serial=plane.revocations.serial,
        revocations=None,
        settings_serial=plane.records.settings_serial,
        settings_record=None,
        gpu_facts_version="f-1",
        gpu_registers=(),
    ).to_json()


@dataclass
class Sender:
    plane: Plane
    sender: HeartbeatSender
    outbox: RegisterOutbox
    leaving: Leaving
    heard: list[HeartbeatAnswer]
    syncs: list[int]
    refusals: list[str]


HELD = HeldLease.from_json(
    {"task_id": "t-1", "attempt": 1, "token": "1.1", "lease_id": "l-1", "state": "running"}
)


def address_book(local: tuple[LocalAddress, ...] = ()) -> AddressBook:
    """The real address book of a machine with ``local`` interfaces (no overlay CIDRs
    configured: its tunnel networks count as overlay)."""
    overlay = tuple(str(a.network) for a in local if a.tunnel)
    return AddressBook(
        local=local, cidrs=Cidrs(overlay=overlay), sightings=Sightings(), cluster_digest="d"
    )


def make_sender(
    plane: Plane,
    fake: FakeControlPlane,
    *,
    url: str = "https://cp.test:7431",
    dead: set[str] | None = None,
    book: AddressBook | None = None,
) -> Sender:
    # This node is not the control plane: the fake holds the role.
    plane.store.set_meta("control_plane_id", FAKE_CP)
    plane.store.set_meta("control_plane_url", url)
    heard: list[HeartbeatAnswer] = []
    syncs: list[int] = []
    refusals: list[str] = []
    outbox = RegisterOutbox()
    leaving = Leaving(node_id=plane.node_id, clock=plane.clock, events=plane.events)

    async def sync_members() -> None:
        syncs.append(1)
        await trio.lowlevel.checkpoint()

    def out_of_cluster(exc: PopuliError) -> bool:
        refusals.append(exc.code)
        return exc.code == "node_retired"

    reports = HeartbeatReports(
        address=OwnAddress(url="https://10.0.0.7:7431", advertise=["w1.example:7431"]),
        revocations=plane.revocations,
        membership=plane.membership,
        records=plane.records,
        uptime_s=lambda: 12.5,
        exec_remote=True,
        parts=(lambda r: replace(r, leases=(HELD,)),),
    )
    sender = HeartbeatSender(
        clock=plane.clock,
        control_plane=plane.link(Unreachable(fake, dead or set())),
        reports=reports,
        outbox=outbox,
        leaving=leaving,
        scope=CONFIG.scope,
        timings=CONFIG.timings.table(),
        address_book=book or address_book(),
        revocations=plane.revocations,
        records=plane.records,
        membership=plane.membership,
        sync_members=sync_members,
        out_of_cluster=out_of_cluster,
        health=plane.health,
        answer_listeners=[heard.append],
    )
    return Sender(plane, sender, outbox, leaving, heard, syncs, refusals)


async def test_a_beat_sends_the_report_and_absorbs_the_typed_answer(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeControlPlane(
        lambda got: good_answer(
            plane, state="cordoned", membership_version=plane.membership.version + 1
        )
    )
    built = make_sender(plane, fake)
    write = quarantine(plane, plane.node_id)
    built.outbox.put(write)
    answer = await built.sender.beat_once()

    (sent,) = fake.reports
    assert sent.status == "running" and sent.registers == (write,)
    assert sent.addresses == ("10.0.0.7:7431", "w1.example:7431")
    assert (sent.uptime_s, sent.leases, sent.exec_remote) == (12.5, (HELD,), True)
    assert sent.settings_serial == plane.records.settings_serial
    # Absorbed: the lifecycle (typed), the listeners, a membership pull, where the
    # control plane answers from now on; the register was delivered.
    assert built.sender.lifecycle is not None and built.sender.lifecycle.state == "cordoned"
    assert built.heard == [answer] and answer.gpu_facts_version == "f-1"
    assert built.syncs == [1]
    assert plane.store.get_meta("control_plane_url") == "https://cp-moved.test:7431"
    assert built.outbox.pending == []
    assert built.sender.beats == 1 and built.sender.reachable


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("no-term", lambda a: {k: v for k, v in a.items() if k != "term"}, "term"),
    (
        "lifecycle-state",
        lambda a: {**a, "lifecycle": {**a["lifecycle"], "state": "x"}},
        "lifecycle.state",
    ),
    (
        "registers-malformed",
        lambda a: {**a, "gpu_registers": [{"node_id": "x"}]},
        "gpu_registers[0].attribute",
    ),
    ("not-json", lambda a: b"<html>bad gateway</html>", ""),
]


@pytest.mark.parametrize(("label", "spoil", "where"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_a_malformed_answer_fails_the_beat_and_keeps_what_was_queued(
    plane: Plane,
    autojump_clock: trio.testing.MockClock,
    label: str,
    spoil: Callable[[dict[str, Any]], Any],
    where: str,
) -> None:
    fake = FakeControlPlane(lambda got: spoil(good_answer(plane)))
    built = make_sender(plane, fake)
    write = quarantine(plane, plane.node_id)
    built.outbox.put(write)
    with pytest.raises(PeerError) as raised:
        await built.sender.beat_once()
    assert raised.value.code == "bad_peer_answer", str(raised.value)
    if where:
        assert raised.value.details.get("field") == where
    assert built.outbox.pending == [write]  # sent again with the next beat
    assert built.heard == [] and built.sender.lifecycle is None and built.sender.beats == 0
    assert plane.store.get_meta("control_plane_url") == "https://cp.test:7431"


async def test_the_loop_backs_off_while_the_answers_fail_and_recovers(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    failing = [True]

    def respond(got: HeartbeatReport) -> Any:
        if failing[0]:
            return {"not": "an answer"}
        return good_answer(plane)

    fake = FakeControlPlane(respond)
    built = make_sender(plane, fake)
    sender = built.sender
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await wait_for("unreachable", lambda: sender.cp_down and len(fake.reports) >= 3)
        assert not sender.reachable and sender.beats == 0
        # Backing off: fewer beats than one per interval, never a crash.
        await trio.sleep(60)
        assert len(fake.reports) < 60 / LAN_INTERVAL_S
        failing[0] = False
        await wait_for("reachable again", lambda: sender.reachable)
        assert "heartbeat" not in plane.health.problems
        # Back at one beat per interval.
        beats = sender.beats
        await trio.sleep(LAN_INTERVAL_S * 3 + 0.01)
        assert sender.beats == beats + 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("voters", "fast"), [(1, False), (3, True)], ids=["one-voter", "three"])
async def test_a_node_whose_control_plane_is_gone_retries_fast_only_while_another_can_lead(
    plane: Plane, autojump_clock: trio.testing.MockClock, voters: int, fast: bool
) -> None:
    """ADR 0019: with other voters, a new leader can be elected within the longest
    election timeout, so the node retries one interval apart through it; with a lone
    voter nothing is elected and the node backs off after the first two, as before."""
    sent: list[float] = []

    def respond(got: HeartbeatReport) -> Any:
        sent.append(trio.current_time())
        return {"not": "an answer"}

    built = make_sender(plane, FakeControlPlane(respond))
    built.sender.control_plane.voters = lambda: [(f"v{n}", ()) for n in range(voters)]
    timeout_max_s = float(plane.records.settings["election_timeout_max_s"])
    interval = built.sender.timing().heartbeat_interval_s
    async with trio.open_nursery() as nursery:
        await nursery.start(built.sender.run)
        await wait_for("eight beats", lambda: len(sent) >= 8, timeout_s=300)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    fast_gaps = 2 + math.ceil(timeout_max_s / interval) if fast else 2
    assert fast_gaps < len(gaps)
    assert all(abs(g - interval) < 0.1 for g in gaps[:fast_gaps]), gaps
    # Then 2, 4, 8 intervals, each jittered down to half at the least.
    assert all(g > interval + 0.1 for g in gaps[fast_gaps + 1 :]), gaps
    assert sum(gaps[fast_gaps:]) >= interval * (len(gaps) - fast_gaps) + 0.5, gaps


async def test_a_new_register_is_sent_at_once(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeControlPlane(lambda got: good_answer(plane))
    built = make_sender(plane, fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(built.sender.run)
        await wait_for("first beat", lambda: built.sender.beats == 1)
        started = trio.current_time()
        write = quarantine(plane, plane.node_id)
        built.outbox.put(write)
        await wait_for("the register sent", lambda: built.sender.beats == 2)
        assert trio.current_time() - started < LAN_INTERVAL_S / 10
        assert fake.reports[-1].registers == (write,) and built.outbox.pending == []
        nursery.cancel_scope.cancel()


async def test_a_refusal_that_says_the_node_is_out_stops_the_loop(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    refusal = {"error": {"code": "node_retired", "message": "retired"}}
    fake = FakeControlPlane(lambda got: (401, refusal))
    built = make_sender(plane, fake)
    with trio.fail_after(60):
        await built.sender.run()  # returns: heartbeats stop
    assert built.sender.expelled and built.refusals == ["node_retired"]
    assert len(fake.reports) == 1


async def test_leaving_ends_once_the_control_plane_answers_left(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeControlPlane(
        lambda got: good_answer(plane, state="left" if len(fake.reports) > 1 else "active")
    )
    built = make_sender(plane, fake)
    built.leaving.begin()
    with trio.fail_after(60):
        await built.sender.run()
    assert [r.status for r in fake.reports] == ["leaving", "leaving"]
    assert built.leaving.done.is_set()
    (event,) = [
        e for e in plane.events.page(node_id=plane.node_id, after=0, limit=10) if e.kind == "left"
    ]
    assert (event.actor, event.reason) == (plane.node_id, "acknowledged late")


# -- where the control plane is reached, and when ---------------------------------------------

ETH = LocalAddress("eth0", "192.168.1.20", 24)
WG = LocalAddress("wg0", "10.8.0.2", 24, tunnel=True)


def add_control_plane_member(plane: Plane, addresses: tuple[str, ...]) -> None:
    """The fake control plane's member record, as this node's membership view holds it."""
    plane.membership.upsert(
        node_member(
            "cp",
            now_ms=wall_ms(plane.clock),
            roles=("voter",),
            addresses=addresses,
            node_id=FAKE_CP,
        )
    )


async def test_a_beat_tries_the_other_addresses_and_keeps_the_one_that_answered(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    """The URL held does not answer (the control plane's LAN address changed): the beat
    goes to its next address, best first from here, and the node keeps that one, even
    though the answer still names the dead URL as the control plane's own."""
    fake = FakeControlPlane(
        lambda got: good_answer(
            plane,
            url="https://192.168.1.30:7431",
            addresses=("192.168.1.30:7431", "10.8.0.3:7431", "192.168.1.31:7431"),
            timeout_s=3.0,
        )
    )
    add_control_plane_member(plane, ("192.168.1.30:7431", "10.8.0.3:7431", "192.168.1.31:7431"))
    built = make_sender(
        plane,
        fake,
        url="https://192.168.1.30:7431",
        dead={"192.168.1.30"},
        book=address_book((ETH, WG)),
    )
    sender = built.sender
    # Its own row until the control plane answered: the path is on the LAN.
    assert sender.timing() == CONFIG.timings.lan.timings()
    # The held URL first, then the LAN address before the overlay one.
    assert sender.control_plane_addresses() == [
        "192.168.1.30:7431",
        "192.168.1.31:7431",
        "10.8.0.3:7431",
    ]
    await sender.beat_once()
    assert fake.reached == ["192.168.1.31:7431"]
    assert plane.store.get_meta("control_plane_url") == "https://192.168.1.31:7431"
    # The answer's row from now on (its timeout included).
    assert sender.timing().heartbeat_timeout_s == 3.0
    await sender.beat_once()
    assert fake.reached == ["192.168.1.31:7431", "192.168.1.31:7431"]


async def test_an_answer_without_a_timeout_keeps_the_senders_own(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    """An older control plane says no ``heartbeat_timeout_s``: the sender's own row's."""
    fake = FakeControlPlane(lambda got: good_answer(plane))
    built = make_sender(plane, fake)
    await built.sender.beat_once()
    assert built.sender.last_answer is not None
    assert built.sender.last_answer.heartbeat_timeout_s is None
    timing = built.sender.timing()
    # cp.test is a name: the overlay row of its own table, the answer's interval.
    own = CONFIG.timings.overlay.timings()
    assert (timing.heartbeat_interval_s, timing.heartbeat_timeout_s) == (
        LAN_INTERVAL_S,
        own.heartbeat_timeout_s,
    )


@pytest.mark.parametrize(
    ("local", "kept"),
    [
        # Beside the control plane on its LAN: the LAN address stays.
        ((ETH, WG), "https://192.168.1.30:7431"),
        # On another LAN, on the same overlay: the overlay address is nearer.
        ((LocalAddress("eth0", "192.168.7.5", 24), WG), "https://10.8.0.3:7431"),
    ],
    ids=["beside-on-the-lan", "elsewhere-on-the-overlay"],
)
async def test_the_answers_url_is_taken_only_if_at_least_as_reachable(
    plane: Plane,
    autojump_clock: trio.testing.MockClock,
    local: tuple[LocalAddress, ...],
    kept: str,
) -> None:
    """The control plane calls its overlay address its URL (an overlay cluster); a node
    that reaches it over a LAN they share does not move off the LAN address."""
    fake = FakeControlPlane(lambda got: good_answer(plane, url="https://10.8.0.3:7431"))
    built = make_sender(plane, fake, url="https://192.168.1.30:7431", book=address_book(local))
    await built.sender.beat_once()
    assert plane.store.get_meta("control_plane_url") == kept


async def test_the_control_plane_sighted_while_it_does_not_answer_is_beaten_at_once(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    failing = [True]

    def respond(got: HeartbeatReport) -> Any:
        return {"not": "an answer"} if failing[0] else good_answer(plane)

    fake = FakeControlPlane(respond)
    built = make_sender(plane, fake)
    sender = built.sender

    def seen(node_id: str) -> Sighting:
        return Sighting(node_id=node_id, cluster_digest="d", addresses=("10.0.0.9",))

    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        # Backing off by now (the waits grow past one interval).
        await wait_for("backing off", lambda: sender.cp_down and len(fake.reports) >= 6)
        failing[0] = False
        before, started = len(fake.reports), trio.current_time()
        sender.on_sighting(seen("n-someoneelse"))  # another node: no beat for it
        await trio.sleep(LAN_INTERVAL_S / 2)
        assert len(fake.reports) == before
        sender.on_sighting(seen(FAKE_CP))
        await wait_for("the beat", lambda: sender.reachable)
        assert trio.current_time() - started < LAN_INTERVAL_S
        # Answered: a sighting now changes nothing.
        beats = sender.beats
        sender.on_sighting(seen(FAKE_CP))
        await trio.sleep(LAN_INTERVAL_S / 2)
        assert sender.beats == beats
        nursery.cancel_scope.cancel()
