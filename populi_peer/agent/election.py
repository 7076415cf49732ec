"""The control-plane election in the agent: one :class:`~populi_peer.core.election.ElectionMachine`
driven by trio (ADR 0011, ADR 0016).

:class:`ElectionService` owns this node's machine (voter or not). Everything the machine
decides is pure; the service only:

- feeds it events — its start from storage, timers (``next_deadline``, on the clock that
  counts through suspend: ``clock.boot()``), election messages from peers (the
  ``POST /v1/populi/election`` route), and writes (:meth:`ElectionService.write`);
- carries out its actions **in order**: ``PersistVote`` / ``PersistRecords`` commit with
  ``synchronous=FULL`` before anything later (a failed persist stops the rest and restarts
  the machine from storage); after records are stored, ``on_records`` gets the entries
  (the materializer) before anything later; ``RoleChanged`` goes to the event log and the
  role listeners (the control-plane link); ``Send`` goes to the peer (an answer to the
  caller rides the HTTP answer); write results wake :meth:`write`'s caller.

The transport (:class:`PeerElectionTransport`) is the signed peer client: every call names
the voter it means, the TLS handshake refuses any other node's certificate, and an answer
whose messages name another sender is dropped.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import trio

from populi_peer.agent.links import PeerLink
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.election import (
    ClientWrite,
    ElectionMachine,
    ElectionSettings,
    Event,
    Message,
    PersistRecords,
    PersistVote,
    RoleChanged,
    Send,
    SettingsChanged,
    Started,
    TimerFired,
    WriteApplied,
    WriteOutcomeUnknown,
    WriteRefused,
)
from populi_peer.core.messages.election import ElectionExchange, ElectionPost
from populi_peer.core.replication import ClusterRecord, Entry, Item, VoterSet
from populi_peer.errors import Conflict, Forbidden, PopuliError, ServiceUnavailable
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store.election import ElectionState
from populi_peer.store.events import EventLog

#: Who may call the election route: any member node (a voter set changes; the machine
#: ignores a sender outside it). Operators are refused by the handler.
ELECTION_CALLERS = ANY_MEMBER

#: How many unsent messages one peer's queue keeps (the oldest go first: the election
#: tolerates lost messages, and a newer heartbeat carries what an older one did).
OUTBOX_LIMIT = 32

#: How long the service waits before reading storage again after it could not.
RESTART_RETRY_S = 1.0


class ElectionTransport(Protocol):
    """How election messages reach another voter."""

    async def exchange(self, to: str, messages: Sequence[Message]) -> Sequence[Message]:
        """Deliver ``messages`` to voter ``to``; its immediate answers."""
        ...


@dataclass
class _Waiter:
    item: Item
    done: trio.Event = field(default_factory=trio.Event)
    entry: Entry | None = None
    error: PopuliError | None = None


@dataclass(kw_only=True, eq=False, repr=False)
class ElectionService:
    """Drives this node's election machine (see the module docstring)."""

    node_id: str
    clock: Clock
    state: ElectionState
    events: EventLog
    settings: ElectionSettings = field(default_factory=ElectionSettings)
    transport: ElectionTransport | None = None
    #: The materializer: called with the entries of every records persist, right after
    #: it committed, before anything later; and with every stored entry at each start.
    on_records: Callable[[Sequence[Entry]], None] | None = None
    rng: random.Random = field(default_factory=random.Random)
    logger: ClassVar[logging.Logger] = get_logger("election")

    def __post_init__(self) -> None:
        #: ``url_of(node_id)``: where a leader is reached, for refusals that name it.
        self.url_of: Callable[[str], str | None] = lambda node_id: None
        #: Called with every :class:`RoleChanged` (after it is in the event log).
        self.role_listeners: list[Callable[[RoleChanged], None]] = []
        self.machine: ElectionMachine | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._next_request = 0
        #: After a step whose first persist failed, timers wait until then (boot clock).
        self._hold_until = -math.inf
        self._wake = trio.Event()
        self._outboxes: dict[str, deque[Message]] = {}
        self._outbox_ready: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        #: When each voter was last heard from (``clock.wall()`` seconds), for status.
        self.last_contact: dict[str, float] = {}
        self._changed = trio.Event()
        self._stepped = trio.Event()

    # -- reading ----------------------------------------------------------------------

    @property
    def term(self) -> int:
        return self.machine.term if self.machine is not None else 0

    @property
    def leader_id(self) -> str | None:
        return self.machine.leader if self.machine is not None else None

    @property
    def role(self) -> str:
        return self.machine.role if self.machine is not None else "stopped"

    @property
    def voters(self) -> VoterSet | None:
        return self.machine.voter_set if self.machine is not None else None

    def can_act(self) -> bool:
        """Leader, merged from a majority, and its lease held now."""
        return self.machine is not None and self.machine.can_act(self.clock.boot())

    def voters_settled(self) -> bool:
        """Whether the voter set is settled and no voter-set write is pending here (on the
        leader: the last change and its settled mark are on a majority)."""
        machine = self.machine
        if machine is None or machine.voter_set is None or not machine.voter_set.settled:
            return False
        return not any(
            isinstance(p.entry.item, ClusterRecord) and p.entry.item.kind == "voters"
            for p in machine.pending_writes
        )

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked after every event the machine takes."""
        while not predicate():
            await self._stepped.wait()

    async def wait_changed(self) -> None:
        """Until the role, term or leader changes next (or the machine restarts)."""
        await self._changed.wait()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        """Build the machine from storage (also what a failed persist leads to)."""
        self.machine = None
        vote, records = self.state.load()
        machine = ElectionMachine(self.node_id, self.settings)
        if self.on_records is not None and len(records):
            self.on_records(records.entries())
        self.machine = machine
        self._handle(Started(vote, records))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._try_start()
            task_status.started()
            while True:
                await self._wait()
                if self.machine is None:
                    self._try_start()
                    continue
                deadline = self.machine.next_deadline()
                now = self.clock.boot()
                if deadline is not None and now >= deadline and now >= self._hold_until:
                    try:
                        self._handle(TimerFired())
                    except PopuliError as exc:  # pragma: no cover - the machine takes timers
                        log(self.logger, logging.ERROR, "election timer refused", error=str(exc))

    def _try_start(self) -> None:
        try:
            self.start()
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "election state unreadable; retrying", error=str(exc))
            self.machine = None

    async def _wait(self) -> None:
        """Until the machine's next deadline or something new (a message, a write)."""
        if self.machine is None:
            delay = RESTART_RETRY_S
        else:
            deadline = self.machine.next_deadline()
            if deadline is not None:
                deadline = max(deadline, self._hold_until)
            delay = math.inf if deadline is None else max(0.0, deadline - self.clock.boot())
        with trio.move_on_after(delay):
            await self._wake.wait()
        self._wake = trio.Event()

    def settings_changed(self, settings: ElectionSettings) -> None:
        """New election timings (verified by the caller)."""
        if settings == self.settings:
            return
        self.settings = settings
        if self.machine is not None:
            self._handle(SettingsChanged(settings))

    # -- writes -----------------------------------------------------------------------

    async def write(self, item: Item) -> Entry:
        """Propose ``item`` as the leader; the entry once a majority stored it.

        Raises :class:`~populi_peer.errors.Conflict` when refused (``not_leader`` is
        ``not_control_plane`` with ``leader_id``/``term``; otherwise the machine's code:
        ``token_already_consumed``, ``no_quorum``, ``voter_change_pending``...), and
        :class:`~populi_peer.errors.ServiceUnavailable` ``outcome_unknown`` when the
        leader stepped down or ``write_timeout_s`` passed first (it may or may not take
        effect)."""
        if self.machine is None:
            raise ServiceUnavailable(
                "the election is not running on this node", code="election_unavailable"
            )
        self._next_request += 1
        request_id = f"w{self._next_request}"
        waiter = _Waiter(item)
        self._waiters[request_id] = waiter
        try:
            self._handle(ClientWrite(request_id, item, wall_ms(self.clock)))
            await waiter.done.wait()
        finally:
            self._waiters.pop(request_id, None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.entry is not None
        return waiter.entry

    # -- messages ---------------------------------------------------------------------

    def receive(self, sender: str, messages: Sequence[Message]) -> list[Message]:
        """Election messages from ``sender`` (the authenticated caller); the messages to
        answer it with at once. A message naming another sender is refused."""
        for message in messages:
            if message.sender != sender:
                raise Forbidden(
                    f"an election message from {sender} names {message.sender} as its sender",
                    code="election_sender_mismatch",
                )
        if self.machine is None:
            raise ServiceUnavailable(
                "the election is not running on this node", code="election_unavailable"
            )
        self.last_contact[sender] = self.clock.wall()
        answers: list[Message] = []
        for message in messages:
            answers += self._handle(message, reply_to=sender)
        return answers

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/election",
                self._post,
                roles=ELECTION_CALLERS,
                name="election",
            )
        ]

    async def _post(self, request: Request) -> ElectionExchange:
        caller = request.caller
        if caller.kind != "node":
            raise Forbidden("only nodes take part in elections", code="forbidden")
        answers = self.receive(caller.id, request.message(ElectionPost).messages)
        await trio.lowlevel.checkpoint()
        return ElectionExchange(messages=tuple(answers))

    # -- carrying out actions ---------------------------------------------------------

    def _handle(self, event: Event, *, reply_to: str | None = None) -> list[Message]:
        """Feed one event; carry out its actions; the sends addressed to ``reply_to``."""
        machine = self.machine
        if machine is None:
            return []
        next_machine, actions = machine.handle(event, self.clock.boot(), self.rng)
        replies: list[Message] = []
        committed = False
        for index, action in enumerate(actions):
            if isinstance(action, (PersistVote, PersistRecords)):
                try:
                    self._persist(action)
                except PopuliError as exc:
                    if committed:
                        self._persist_failed(exc, actions[index + 1 :])
                    else:
                        self._step_dropped(exc, event)
                    return []
                committed = True
                try:
                    self._materialize(action)
                except PopuliError as exc:
                    self._persist_failed(exc, actions[index + 1 :])
                    return []
                continue
            if self.machine is machine:
                # Every persist of this step committed: the machine may be adopted.
                self.machine = next_machine
            if isinstance(action, RoleChanged):
                self._role_changed(action)
            elif isinstance(action, Send):
                if action.to == reply_to:
                    replies.append(action.message)
                else:
                    self._queue(action.to, action.message)
            elif isinstance(action, WriteApplied):
                self._settle(action.request_id, entry_id=action)
            elif isinstance(action, WriteRefused):
                self._settle(action.request_id, refused=action)
            elif isinstance(action, WriteOutcomeUnknown):
                self._settle(
                    action.request_id,
                    error=ServiceUnavailable(
                        f"the write's outcome is unknown ({action.reason}); it may or may "
                        "not take effect",
                        code="outcome_unknown",
                        reason=action.reason,
                    ),
                )
        if self.machine is machine:
            self.machine = next_machine
        self._wake.set()
        self._stepped.set()
        self._stepped = trio.Event()
        return replies

    def _persist(self, action: PersistVote | PersistRecords) -> None:
        if isinstance(action, PersistVote):
            self.state.save_vote(action.term, action.voted_for)
            return
        self.state.save_records(action.entries, action.digest)

    def _materialize(self, action: PersistVote | PersistRecords) -> None:
        """After a records commit: the materializer (ADR 0017) sees the entries."""
        if isinstance(action, PersistRecords) and self.on_records is not None and action.entries:
            self.on_records(action.entries)

    def _step_dropped(self, exc: PopuliError, event: Event) -> None:
        """The step's first persist failed: nothing of it reached storage, so the machine
        before it still matches storage and stays (the event is as good as lost, which the
        election tolerates, as it tolerates a lost message). A write it carried stored
        nothing and is refused; the timers wait ``RESTART_RETRY_S`` before they fire again.
        Unlike a restart, this keeps the term, the role and the leader's services running
        while the disk is full (ADR 0016)."""
        log(
            self.logger,
            logging.WARNING,
            "election step not persisted; nothing stored, the event is dropped",
            election_event=type(event).__name__,
            error=str(exc),
        )
        if isinstance(event, ClientWrite):
            self._settle(
                event.request_id,
                error=ServiceUnavailable(
                    "this node could not store the write; nothing was stored",
                    code="storage_unavailable",
                    reason="persist_failed",
                    condition=exc.details.get("condition", "unknown"),
                ),
            )
        self._hold_until = self.clock.boot() + RESTART_RETRY_S

    def _persist_failed(self, exc: PopuliError, skipped: Sequence[object]) -> None:
        """ADR 0011 Decision 7: carry out nothing more; restart from storage."""
        log(
            self.logger,
            logging.WARNING,
            "election state not persisted; restarting the election from storage",
            error=str(exc),
            skipped=len(skipped),
        )
        for request_id in list(self._waiters):
            self._settle(
                request_id,
                error=ServiceUnavailable(
                    "the election restarted; the write's outcome is unknown",
                    code="outcome_unknown",
                    reason="persist_failed",
                ),
            )
        # Not from here: a storage that keeps failing would fail every restart too. The
        # run loop reads storage again after RESTART_RETRY_S.
        self.machine = None
        self._wake.set()
        self._notify_changed()

    def _settle(
        self,
        request_id: str,
        *,
        entry_id: WriteApplied | None = None,
        refused: WriteRefused | None = None,
        error: PopuliError | None = None,
    ) -> None:
        waiter = self._waiters.get(request_id)
        if waiter is None or waiter.done.is_set():
            return
        if entry_id is not None:
            waiter.entry = Entry(entry_id.write_id, waiter.item)
        elif refused is not None:
            if refused.code == "not_leader":
                url = self.url_of(refused.leader) if refused.leader else None
                waiter.error = Conflict(
                    f"this node is not the control plane (term {refused.term}); "
                    f"the leader is {refused.leader or 'unknown'}",
                    code="not_control_plane",
                    leader_id=refused.leader,
                    leader_url=url,
                    control_plane_url=url,
                    term=refused.term,
                )
            else:
                waiter.error = Conflict(
                    refused.message, code=refused.code, leader_id=refused.leader, term=refused.term
                )
        else:
            waiter.error = error
        waiter.done.set()

    def _role_changed(self, change: RoleChanged) -> None:
        # A lone voter leads at every start: worth a line only where a leader can change
        # hands (more than one voter); the event log records every election either way.
        voters = self.machine.voter_set if self.machine is not None else None
        shared = voters is not None and len(voters.members) > 1
        level = NOTICE if shared and "leader" in (change.role, change.previous) else logging.INFO
        log(
            self.logger,
            level,
            "election role changed",
            role=change.role,
            previous=change.previous,
            term=change.term,
            leader=change.leader,
            cause=change.cause,
        )
        try:
            self.events.append(
                at_ms=wall_ms(self.clock),
                node_id=self.node_id,
                kind="election",
                actor=self.node_id,
                reason=change.cause,
                detail={
                    "role": change.role,
                    "previous": change.previous,
                    "term": change.term,
                    "leader": change.leader,
                    "cause": change.cause,
                },
            )
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "election event not recorded", error=str(exc))
        for listener in self.role_listeners:
            try:
                listener(change)
            except PopuliError as exc:
                # The control-plane link could not note the leader (its storage failed):
                # it still names another node, which is the safe side; the next change
                # or refusal tells it again.
                log(self.logger, logging.WARNING, "election change not noted", error=str(exc))
        self._notify_changed()

    # -- sending ----------------------------------------------------------------------

    def _queue(self, to: str, message: Message) -> None:
        if self.transport is None or self._nursery is None:
            return
        box = self._outboxes.get(to)
        if box is None:
            box = self._outboxes[to] = deque(maxlen=OUTBOX_LIMIT)
            self._outbox_ready[to] = trio.Event()
            self._nursery.start_soon(self._sender, to)
        box.append(message)
        self._outbox_ready[to].set()

    async def _sender(self, to: str) -> None:
        """One peer's queue, sent in order, one call at a time; a failed call's messages
        are dropped (the machine retries what matters: heartbeats, votes)."""
        assert self.transport is not None
        box = self._outboxes[to]
        while True:
            await self._outbox_ready[to].wait()
            self._outbox_ready[to] = trio.Event()
            while box:
                batch = list(box)
                box.clear()
                try:
                    with trio.fail_after(self._call_timeout_s()):
                        answers = await self.transport.exchange(to, batch)
                except (PopuliError, trio.TooSlowError) as exc:
                    log(self.logger, logging.DEBUG, "election call failed", to=to, error=str(exc))
                    continue
                self.last_contact[to] = self.clock.wall()
                for answer in answers:
                    if answer.sender != to:
                        log(
                            self.logger,
                            logging.WARNING,
                            "election answer names another sender",
                            to=to,
                        )
                        break
                    try:
                        self._handle(answer)
                    except PopuliError as exc:
                        log(
                            self.logger,
                            logging.WARNING,
                            "election answer refused",
                            to=to,
                            error=str(exc),
                        )

    def _call_timeout_s(self) -> float:
        return max(self.settings.heartbeat_interval_s * 2, 1.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class RoleServices:
    """Services that run while this node acts as control plane (``leading``) and those
    that run while it does not (``following``): one set at a time, switched when the
    election changes this node's role (a leader whose lease lapsed stops at once)."""

    is_leader: Callable[[], bool]
    changed: Callable[[], Awaitable[None]]
    leading: Callable[[], list[Callable[..., Any]]]
    following: Callable[[], list[Callable[..., Any]]]
    logger: ClassVar[logging.Logger] = get_logger("election")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            leading = self.is_leader()
            services = self.leading() if leading else self.following()
            log(self.logger, logging.INFO, "control-plane services", leading=leading)
            async with trio.open_nursery() as nursery:
                for service in services:
                    await nursery.start(service)
                while self.is_leader() == leading:
                    await self.changed()
                nursery.cancel_scope.cancel()


@dataclass(eq=False, repr=False)
class PeerElectionTransport:
    """Election messages over the signed peer client, to a member by its node id."""

    peers: PeerLink

    async def exchange(self, to: str, messages: Sequence[Message]) -> Sequence[Message]:
        member = await self.peers.member(to)
        if member is None:
            raise ServiceUnavailable(f"no address known for voter {to}", code="no_address")
        answer = await self.peers.call(
            member,
            method="POST",
            path="/v1/populi/election",
            payload=ElectionPost(messages=tuple(messages)),
            attempts=1,
            answer=ElectionExchange,
        )
        return answer.messages


__all__ = [
    "ELECTION_CALLERS",
    "ElectionService",
    "ElectionTransport",
    "PeerElectionTransport",
    "RoleServices",
]
