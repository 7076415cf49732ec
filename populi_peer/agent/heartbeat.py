"""Heartbeats over HTTP: every node tells the control plane it is alive, every interval.

Sender (:class:`HeartbeatSender`; every node but the control plane, which notes its own
liveness in process with :class:`SelfBeat`): POST ``/v1/populi/heartbeat`` with a
:class:`HeartbeatReport` built by :class:`HeartbeatReports` (status, addresses, the serials
it holds, and what other services add: held leases, the GPU summary) and its own register
writes from the :class:`RegisterOutbox`. The answer carries the term, the node's lifecycle
as the control plane sees it, and whatever the node lacks: a newer revocation list or
settings record inline, a newer membership version to pull; other services absorb the rest
(the GPU service: the facts version held and operator decisions about its GPUs). The
timings come from the one table (:mod:`populi_peer.core.timings`): the control plane's
answer says the row it judges this node by (interval, timeout, staleness), else this
node's own row for the scope of its path. A beat tries the control plane's URL, then its
other addresses best first from here (``call_first``: the next only when nothing reached
the one before) and keeps the one that answered; the URL an answer names is adopted only
if at least as reachable from here. A lost beat is retried one interval later, then with
backoff (``heartbeat_retry_delay_s``); the control plane sighted by discovery while it does
not answer makes the sender beat at once. A control plane that goes away is logged once,
and once again when it comes back. A malformed answer is a ``bad_peer_answer`` error for
that beat, like an unreachable control plane.

Intake (:class:`HeartbeatIntake`, control plane): the route parses the report before the
handler runs; the intake checks what the message cannot (the caller's own registers,
``host:port`` addresses), notes the arrival in the :class:`Liveness` book, applies the
registers, hands the report to its listeners and builds the typed answer (the control
plane's addresses, the timing table's row for the path's scope), which its answer parts
complete. Arrival times live in memory on the monotonic clock, so staleness
is derived when read (``heartbeat_age_ms``), never stored; after a restart every node reads
``heartbeat_never`` until its next heartbeat. The path scope of a node is derived from the
address its heartbeat came from.

What other services add or take is given to these classes as callables (ADR 0012):
:data:`ReportPart` and :data:`AnswerListener` on the sender's side, :data:`ReportListener`
and :data:`AnswerPart` on the intake's.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Protocol

import trio

from populi_peer import __version__
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.health import RETRIED, Health
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.config import Config, ScopeConfig, parse_host_port
from populi_peer.core.eligibility import heartbeat_age_ms, is_stale
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    ControlPlaneRef,
    EventKind,
    HeartbeatAnswer,
    HeartbeatReport,
)
from populi_peer.core.messages.heartbeat import HeartbeatStatus
from populi_peer.core.registers import LIFECYCLE, RegisterWrite
from populi_peer.core.scope import Scope, path_scope
from populi_peer.core.timings import ScopeTimings, TimingTable, heartbeat_retry_delay_s
from populi_peer.discovery import Sighting
from populi_peer.discovery.service import NOT_SENT_CODES, call_first
from populi_peer.discovery.site import url_address
from populi_peer.errors import BadRequest, Forbidden, PopuliError
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store.events import EventLog

#: A service's part of this node's heartbeat (held leases, the GPU summary): it takes the
#: report built so far and returns it with its own fields set.
ReportPart = Callable[[HeartbeatReport], HeartbeatReport]
#: What a service does with a heartbeat answer (the GPU service: the facts version the
#: control plane holds, operator decisions about this node's GPUs).
AnswerListener = Callable[[HeartbeatAnswer], None]
#: Control plane: what a service does with a node's accepted report (node id, report).
ReportListener = Callable[[str, HeartbeatReport], None]
#: Control plane: a service's part of the answer to a node (node id, answer so far).
AnswerPart = Callable[[str, HeartbeatAnswer], HeartbeatAnswer]
#: Control plane: a service that answers what a report carries (node id, the report, the
#: answer so far): the lease service takes the node's full report or changes (ADR 0015).
ReportExchange = Callable[[str, HeartbeatReport, HeartbeatAnswer], HeartbeatAnswer]


@dataclass(frozen=True)
class Seen:
    last_mono: float
    address: str | None
    scope: Scope
    status: HeartbeatStatus
    report: HeartbeatReport


class _Configured(Protocol):
    """Something that holds this node's config (the submitter still passes its agent)."""

    @property
    def config(self) -> Config: ...


def scope_of(config: ScopeConfig | _Configured, address: str | None) -> Scope:
    """Scope of the path to ``address`` under this node's CIDR config; names and unknown
    addresses count as overlay (the most patient timings)."""
    if not isinstance(config, ScopeConfig):
        config = config.config.scope
    if not address:
        return "overlay"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "overlay"
    try:
        return path_scope(
            address,
            lan_cidrs=config.lan_cidrs,
            overlay_cidrs=config.overlay_cidrs,
            local_cidrs=config.local_cidrs,
        )
    except PopuliError:
        return "overlay"


def url_host(url: str) -> str | None:
    try:
        return parse_host_port(url.removeprefix("https://").removeprefix("http://").split("/")[0])[
            0
        ]
    except ValueError:
        return None


# -- what both ends share -----------------------------------------------------------------


class RegisterOutbox:
    """This node's own register writes (its GPU quarantines, its ``left``), sent with every
    heartbeat until the control plane acknowledged them; a new one wakes the sender."""

    def __init__(self) -> None:
        self.pending: list[RegisterWrite] = []
        self._put = trio.Event()

    def put(self, write: RegisterWrite, *, now: bool = True) -> None:
        """Queue ``write``; with ``now``, the sender beats at once instead of at its next
        interval."""
        self.pending.append(write)
        if now:
            self._put.set()

    def delivered(self, sent: Sequence[RegisterWrite]) -> None:
        """The control plane acknowledged ``sent``; writes queued since stay."""
        self.pending = [write for write in self.pending if write not in sent]

    async def wait_put(self, timeout_s: float) -> None:
        """Until a write is put with ``now``, or ``timeout_s`` passed."""
        with trio.move_on_after(timeout_s):
            await self._put.wait()
        if self._put.is_set():
            self._put = trio.Event()


@dataclass(kw_only=True, eq=False, repr=False)
class Leaving:
    """Whether this node is leaving the cluster, and when the control plane heard it."""

    node_id: str
    clock: Clock
    events: EventLog

    def __post_init__(self) -> None:
        self.started = False
        #: Set once the control plane answered ``left``: the agent then stops.
        self.done = trio.Event()

    def begin(self) -> None:
        self.started = True

    def acknowledged(self, *, late: bool) -> None:
        """The control plane answered ``left``; ``late``: not to the leave request itself
        but to a later heartbeat (the event says so)."""
        if late:
            self.events.append(
                at_ms=wall_ms(self.clock),
                node_id=self.node_id,
                kind="left",
                actor=self.node_id,
                reason="acknowledged late",
                detail={"acknowledged": True},
            )
        self.done.set()


@dataclass(frozen=True, kw_only=True, eq=False)
class HeartbeatReports:
    """This node's heartbeat: what it holds (serials), where it answers, how long it has
    run, whether it takes remote work, and the parts other services add."""

    address: OwnAddress
    revocations: RevocationState
    membership: Membership
    records: ClusterRecords
    uptime_s: Callable[[], float]
    exec_remote: bool
    parts: tuple[ReportPart, ...] = ()

    def build(
        self, status: HeartbeatStatus = "running", registers: Sequence[RegisterWrite] = ()
    ) -> HeartbeatReport:
        report = HeartbeatReport(
            status=status,
            addresses=self.address.addresses(),
            registers=tuple(registers),
            revocation_serial=self.revocations.serial,
            membership_version=self.membership.version,
            settings_serial=self.records.settings_serial,
            version=__version__,
            uptime_s=round(self.uptime_s(), 3),
            gpu=None,
            # Whether this node takes remote work at all (POPULI_EXEC_REMOTE=0: no), so
            # the control plane does not place any here.
            exec_remote=self.exec_remote,
            report=None,
        )
        for part in self.parts:
            report = part(report)
        return report


# -- control plane ------------------------------------------------------------------------


class Liveness:
    """The control plane's book of heartbeats: when each node last beat (on trio's clock,
    in memory only), from where (the path scope), and what it said."""

    def __init__(self, *, clock: Clock, timings: TimingTable) -> None:
        self.clock = clock
        #: The one timing table by scope (core.timings).
        self.table = timings
        self.seen: dict[str, Seen] = {}

    def note(self, node_id: str, seen: Seen) -> None:
        self.seen[node_id] = seen

    def timing(self, scope: Scope) -> ScopeTimings:
        """The timing table's row for a path of ``scope``."""
        return self.table.for_scope(scope)

    def timings(self, scope: Scope) -> tuple[float, float]:
        """(heartbeat interval, stale after) in seconds for a path of ``scope``."""
        timing = self.timing(scope)
        return timing.heartbeat_interval_s, timing.stale_after_s

    def age_ms(self, node_id: str) -> int | None:
        seen = self.seen.get(node_id)
        return heartbeat_age_ms(None if seen is None else seen.last_mono, self.clock.mono())

    def stale_after_s(self, node_id: str) -> float:
        """How long ``node_id``'s heartbeat stays fresh (a node never heard: as on a LAN)."""
        seen = self.seen.get(node_id)
        return self.timings(seen.scope if seen else "lan")[1]

    def stale(self, node_id: str) -> bool:
        return is_stale(self.age_ms(node_id), int(self.stale_after_s(node_id) * 1000))

    def scope(self, node_id: str) -> Scope | None:
        seen = self.seen.get(node_id)
        return None if seen is None else seen.scope

    def status(self, node_id: str) -> HeartbeatStatus | None:
        seen = self.seen.get(node_id)
        return None if seen is None else seen.status

    def accepts_remote_work(self, node_id: str) -> bool | None:
        """What the node's last heartbeat said (``exec_remote``); ``None`` before one."""
        seen = self.seen.get(node_id)
        return None if seen is None else seen.report.exec_remote


@dataclass(frozen=True, kw_only=True, eq=False)
class HeartbeatIntake:
    """Control-plane side: the heartbeat route."""

    clock: Clock
    control_plane: ControlPlaneLink
    address: OwnAddress
    liveness: Liveness
    scope: ScopeConfig
    membership: Membership
    registry: Registry
    records: ClusterRecords
    revocations: RevocationState
    events: EventLog
    report_listeners: tuple[ReportListener, ...] = ()
    answer_parts: tuple[AnswerPart, ...] = ()
    exchanges: tuple[ReportExchange, ...] = ()
    logger: ClassVar[logging.Logger] = get_logger("heartbeat")

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/heartbeat",
                self._heartbeat,
                roles=ANY_MEMBER,
                name="heartbeat",
            )
        ]

    def note_self(self, report: HeartbeatReport) -> None:
        """The control plane's own liveness (it does not call itself)."""
        self.liveness.note(
            self.control_plane.node_id,
            Seen(self.clock.mono(), "127.0.0.1", "local", report.status, report),
        )

    async def _heartbeat(self, request: Request) -> HeartbeatAnswer:
        address = request.client[0] if request.client else None
        answer = self.receive(request.caller.id, request.message(HeartbeatReport), address=address)
        await trio.lowlevel.checkpoint()
        return answer

    def receive(
        self, caller: str, report: HeartbeatReport, *, address: str | None
    ) -> HeartbeatAnswer:
        """``caller``'s heartbeat ``report``, sent from ``address``: checked whole before
        anything is applied, then noted, applied and answered."""
        self.control_plane.require_self()
        member = self.membership.get(caller)
        if member is None or member.kind != "node":
            raise Forbidden("heartbeats come from nodes", code="not_a_node")
        _check_addresses(report.addresses)
        for write in report.registers:
            if write.node_id != caller or write.writer_class != "self":
                raise Forbidden(
                    "a node may only send registers about itself, as itself",
                    code="writer_not_allowed",
                )
        scope = scope_of(self.scope, address)
        self.liveness.note(caller, Seen(self.clock.mono(), address, scope, report.status, report))
        self._update_member(member, report)
        for write in report.registers:
            self._apply(caller, write)
        for listener in self.report_listeners:
            listener(caller, report)
        timing = self.liveness.timing(scope)
        records, revocations = self.records, self.revocations
        settings_record = records.settings_record
        answer = HeartbeatAnswer(
            term=self.control_plane.term,
            control_plane=ControlPlaneRef(
                node_id=self.control_plane.node_id,
                url=self.address.url,
                # Where else to try when that URL does not answer (its preference first).
                addresses=self.address.addresses(),
            ),
            membership_version=self.membership.version,
            lifecycle=self.registry.lifecycle(caller),
            scope=scope,
            heartbeat_interval_s=timing.heartbeat_interval_s,
            heartbeat_timeout_s=timing.heartbeat_timeout_s,
            stale_after_s=timing.stale_after_s,
            revocation_serial=revocations.serial,
            revocations=revocations.text if report.revocation_serial < revocations.serial else None,
            settings_serial=records.settings_serial,
            settings_record=settings_record.text
            if settings_record and report.settings_serial < records.settings_serial
            else None,
            gpu_facts_version=None,
            gpu_registers=(),
            incarnation=None,
            report_answer=None,
        )
        for part in self.answer_parts:
            answer = part(caller, answer)
        for exchange in self.exchanges:
            answer = exchange(caller, report, answer)
        return answer

    def _apply(self, caller: str, write: RegisterWrite) -> None:
        """One of the caller's own register writes: a lifecycle change is recorded as
        one; any other register (a GPU quarantine) is recorded as received."""
        before = self.registry.lifecycle(caller)
        changed = self.registry.apply(write)
        if write.attribute == LIFECYCLE:
            if not changed:
                return
            after = self.registry.lifecycle(caller)
            kind: EventKind = "lifecycle"
            detail: dict[str, object] = {
                "command": "leave" if after and after.state == "left" else "self",
                "from": before.state if before else None,
                "to": after.state if after else None,
            }
        else:
            kind = "register"
            detail = {"attribute": write.attribute, "value": write.value}
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=caller,
            kind=kind,
            actor=write.actor if kind == "register" else caller,
            reason=write.reason,
            detail=detail,
        )

    def _update_member(self, member: Member, report: HeartbeatReport) -> None:
        addresses = report.addresses
        if addresses and addresses != member.addresses:
            self.membership.upsert(
                replace(member, addresses=addresses, updated_ms=wall_ms(self.clock))
            )


def _check_addresses(addresses: tuple[str, ...]) -> None:
    """Each advertised address is ``host:port`` by the config's rule (the message checked
    that there are at most 8 strings of 1-261 characters)."""
    for address in addresses:
        try:
            parse_host_port(address)
        except ValueError as exc:
            raise BadRequest(
                f"heartbeat address {address!r}: {exc}", code="bad_request", field="addresses"
            ) from exc


@dataclass(frozen=True, kw_only=True, eq=False)
class SelfBeat:
    """The control plane's own liveness, noted in process every interval; ``also``: what
    else the control plane does for itself every interval (its own full report to its own
    lease table)."""

    intake: HeartbeatIntake
    reports: HeartbeatReports
    health: Health
    interval_s: float
    also: tuple[Callable[[], None], ...] = ()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        health = self.health
        while True:
            try:
                self.intake.note_self(self.reports.build())
                for step in self.also:
                    step()
            except RETRIED as exc:
                await health.retry_after(health.failed("self_beat", exc))
                continue
            health.ok("self_beat")
            await trio.sleep(self.interval_s)


# -- every other node ---------------------------------------------------------------------


class AddressRanking(Protocol):
    """Which of a node's addresses to try, best first from here, and whether one is at
    least as reachable as another (:class:`~populi_peer.discovery.service.AddressBook`)."""

    def candidates(self, node_id: str, addresses: Sequence[str]) -> list[str]: ...

    def at_least_as_reachable(self, address: str, than: str) -> bool: ...


class HeartbeatSender:
    """Every node but the control plane: the heartbeat loop towards the control plane."""

    def __init__(
        self,
        *,
        clock: Clock,
        control_plane: ControlPlaneLink,
        reports: HeartbeatReports,
        outbox: RegisterOutbox,
        leaving: Leaving,
        scope: ScopeConfig,
        timings: TimingTable,
        address_book: AddressRanking,
        revocations: RevocationState,
        records: ClusterRecords,
        membership: Membership,
        sync_members: Callable[[], Awaitable[None]],
        out_of_cluster: Callable[[PopuliError], bool],
        health: Health,
        answer_listeners: Sequence[AnswerListener] = (),
        rng: random.Random | None = None,
    ) -> None:
        """``sync_members()`` pulls the control plane's membership; ``out_of_cluster(exc)``
        says whether a refusal means this node was retired or forgotten (and takes note
        of it: :meth:`Standing.learn <populi_peer.agent.standing.Standing.learn>`);
        ``timings`` is this node's own table (used until the control plane answers);
        ``address_book`` orders the control plane's addresses as seen from here."""
        self.clock = clock
        self.control_plane = control_plane
        self.reports = reports
        self.outbox = outbox
        self.leaving = leaving
        self.scope = scope
        self.timings = timings
        self.address_book = address_book
        self.revocations = revocations
        self.records = records
        self.membership = membership
        self.sync_members = sync_members
        self.out_of_cluster = out_of_cluster
        self.health = health
        self.answer_listeners = tuple(answer_listeners)
        self.logger = get_logger("heartbeat")
        self.rng = rng or random.Random()
        self.cp_down = False
        self.last_answer: HeartbeatAnswer | None = None
        #: This node's lifecycle as the last answer said.
        self.lifecycle: NodeLifecycle | None = None
        self.beats = 0
        self.expelled = False
        self._sighted = trio.Event()
        self._wake = trio.Event()
        #: The control plane's addresses that did not reach it when last tried (and have
        #: not since): the answer's URL is not adopted while it is one of them.
        self._failed: set[str] = set()

    @property
    def reachable(self) -> bool:
        """A heartbeat was answered, and the last one did not fail."""
        return self.beats > 0 and not self.cp_down

    def on_sighting(self, sighting: Sighting) -> None:
        """Discovery saw a node (LAN or static peer): if it is the control plane while it
        does not answer here, beat now rather than at the end of the backoff (it may have
        moved: the beat tries where it was seen)."""
        if self.cp_down and sighting.node_id == self.control_plane.id:
            self._sighted.set()

    def beat_soon(self) -> None:
        """Beat now rather than at the next interval (a full report is due: a control
        plane that restarted grants on this node once it has it)."""
        self._wake.set()

    def timing(self) -> ScopeTimings:
        """The timings the control plane judges this node by (its last answer says them),
        else this node's own row for the scope of its path to the control plane."""
        scope = scope_of(self.scope, url_host(self.control_plane.url))
        own = self.timings.for_scope(scope)
        answer = self.last_answer
        if answer is None:
            return own
        try:
            return ScopeTimings(
                heartbeat_interval_s=answer.heartbeat_interval_s,
                stale_after_s=answer.stale_after_s,
                heartbeat_timeout_s=own.heartbeat_timeout_s
                if answer.heartbeat_timeout_s is None
                else answer.heartbeat_timeout_s,
            )
        except PopuliError:
            return own

    def interval_s(self) -> float:
        return self.timing().heartbeat_interval_s

    def control_plane_addresses(self) -> list[str]:
        """Where to send a heartbeat: the control plane's URL this node holds, then its
        other addresses best first from here (those its last answer listed, its member
        record's, then where discovery saw it), each tried when nothing reached the one
        before (TLS proves who answers)."""
        cp = self.control_plane
        current = url_address(cp.url)
        member = self.membership.get(cp.id)
        said = self.last_answer.control_plane if self.last_answer is not None else None
        known = [
            current,
            *(said.addresses if said is not None and said.node_id == cp.id else ()),
            *(member.addresses if member is not None else ()),
        ]
        return [current] + [a for a in self.address_book.candidates(cp.id, known) if a != current]

    def payload(self, status: HeartbeatStatus = "running") -> HeartbeatReport:
        return self.reports.build(status, self.outbox.pending)

    async def beat_once(self, status: HeartbeatStatus = "running") -> HeartbeatAnswer:
        """One heartbeat; a malformed answer is ``PeerError(code="bad_peer_answer")``."""
        sent = list(self.outbox.pending)
        payload = self.payload(status)
        # A heartbeat answered later than this is as good as lost (core.timings).
        timeout_s = self.timing().heartbeat_timeout_s
        tried: list[str] = []

        async def beat_at(address: str) -> tuple[str, HeartbeatAnswer]:
            tried.append(address)
            url = f"https://{address}"
            answer = await self.control_plane.call(
                method="POST",
                path="/v1/populi/heartbeat",
                payload=payload,
                answer=HeartbeatAnswer,
                timeout_s=timeout_s,
                at=url,
            )
            return url, answer

        try:
            reached, answer = await call_first(self.control_plane_addresses(), beat_at)
        except PopuliError as exc:
            # call_first moved on from each but the last only when nothing reached it.
            self._failed.update(tried[:-1])
            if exc.code in NOT_SENT_CODES:
                self._failed.update(tried[-1:])
            raise
        self._failed.update(tried[:-1])
        self._failed.discard(tried[-1])
        # Reached at another of its addresses: keep that one (the one held failed).
        self.control_plane.reached_at(reached)
        # Registers are delivered once acknowledged; later writes stay queued.
        self.outbox.delivered(sent)
        await self._absorb(answer)
        self.beats += 1
        return answer

    async def _absorb(self, answer: HeartbeatAnswer) -> None:
        self.last_answer = answer
        before, after = self.lifecycle, answer.lifecycle
        self.lifecycle = after
        if before is not None and after is not None and before.state != after.state:
            log(
                self.logger,
                NOTICE,
                "this node's lifecycle changed",
                state=after.state,
                was=before.state,
                by=after.actor,
                reason=after.reason,
            )
        if answer.revocations:
            self.revocations.offer(answer.revocations, now_ms=wall_ms(self.clock))
        if answer.settings_record:
            try:
                self.records.offer_settings(answer.settings_record)
            except PopuliError as exc:
                log(self.logger, logging.WARNING, "settings record ignored", error=str(exc))
        if answer.membership_version != self.membership.version:
            await self.sync_members()
        # Only a URL at least as reachable from here as the one that works (a control
        # plane that prefers its overlay address must not move a LAN-only node off the
        # LAN address it reaches it by: core.addresses), and not one that failed to reach
        # it (the node would go back to it at every beat).
        said = url_address(answer.control_plane.url)
        if said not in self._failed and self.address_book.at_least_as_reachable(
            said, url_address(self.control_plane.url)
        ):
            self.control_plane.follow(term=answer.term, url=answer.control_plane.url)
        for listener in self.answer_listeners:
            listener(answer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failures = 0
        while True:
            leaving = self.leaving.started
            following = (self.control_plane.id, self.control_plane.term)
            try:
                answer = await self.beat_once(status="leaving" if leaving else "running")
                if leaving and answer.lifecycle is not None and answer.lifecycle.state == "left":
                    self.leaving.acknowledged(late=True)
                    return
            except RETRIED as exc:
                # The control plane answered, but what it said could not be kept here
                # (disk full...): not an unreachable control plane; beat again soon.
                delay = self.health.failed("heartbeat", exc)
            except PopuliError as exc:
                if self._expelled_by(exc):
                    self.expelled = True
                    return
                failures += 1
                if not self.cp_down:
                    self.cp_down = True
                    log(
                        self.logger,
                        logging.WARNING,
                        "control plane unreachable",
                        url=self.control_plane.url,
                        error=str(exc),
                    )
                # One interval for the first losses and through an election, then back off
                # from a control plane that is down (the core's rule: ADR 0019).
                delay = heartbeat_retry_delay_s(
                    self.timing(),
                    failures,
                    self.rng,
                    election_timeout_max_s=float(self.records.settings["election_timeout_max_s"]),
                    voters=len(self.control_plane.voters()),
                )
                # Refused by a voter that does not lead (it named the leader: followed), or
                # no answer twice: ask the voters who leads now (ADR 0016).
                followed = (self.control_plane.id, self.control_plane.term) != following
                if followed or (failures >= 2 and await self.control_plane.find_leader()):
                    log(
                        self.logger,
                        NOTICE,
                        "following the control plane",
                        node_id=self.control_plane.id,
                        term=self.control_plane.term,
                    )
                    delay = 0.0
            else:
                if self.cp_down:
                    self.cp_down = False
                    log(
                        self.logger,
                        NOTICE,
                        "control plane reachable again",
                        url=self.control_plane.url,
                        after_failures=failures,
                    )
                failures = 0
                self.health.ok("heartbeat")
                delay = self.interval_s()
            await self._pause(delay)

    async def _pause(self, delay_s: float) -> None:
        """Until the next beat: ``delay_s``, a register put with ``now``, the control
        plane sighted while it does not answer, or :meth:`beat_soon` while it answers,
        whichever comes first."""
        if self._wake.is_set():
            self._wake = trio.Event()
            if not self.cp_down:
                return
        with trio.move_on_after(delay_s):
            async with trio.open_nursery() as nursery:

                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first, partial(self.outbox.wait_put, delay_s))
                nursery.start_soon(first, self._sighted.wait)
                if not self.cp_down:
                    nursery.start_soon(first, self._wake.wait)
        if self._sighted.is_set():
            self._sighted = trio.Event()
        if self._wake.is_set():
            self._wake = trio.Event()

    def _expelled_by(self, exc: PopuliError) -> bool:
        """Retired (the control plane says so), or unknown to it (deleted, or the
        certificate expired): this node is out; ``populi status`` says so and how to
        re-join. Or the control plane does not accept this node's key. Heartbeats stop."""
        if self.out_of_cluster(exc):
            return True
        if exc.code == "signature_invalid" and exc.details.get("http_status") == 401:
            log(
                self.logger,
                logging.ERROR,
                "the control plane does not accept this node's key; heartbeats stop. "
                "Re-join with a new token: runbooks/enroll-a-node.md",
                error=str(exc),
            )
            return True
        return False


__all__ = [
    "AddressRanking",
    "AnswerListener",
    "AnswerPart",
    "HeartbeatIntake",
    "HeartbeatReports",
    "HeartbeatSender",
    "Leaving",
    "Liveness",
    "RegisterOutbox",
    "ReportExchange",
    "ReportListener",
    "ReportPart",
    "Seen",
    "SelfBeat",
    "scope_of",
    "url_host",
]
