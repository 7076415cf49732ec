"""Node lifecycle operated from the CLI, the membership listing, events and leave.

Control plane routes (:class:`NodeAdmin`):

- ``POST /v1/populi/admin/nodes/{node}/{cordon|drain|maintenance|quarantine|resume}``
  (operator): one lifecycle command through the one transition table; illegal -> 409
  listing the allowed commands; every change is an event with who, why and when.
- ``GET /v1/populi/nodes``: every node with lifecycle, heartbeat age / staleness, path
  scope as seen from here, GPU summary, certificate expiry and routing eligibility.
- ``GET /v1/populi/events?node=&kind=&since_ms=&after=&limit=&wait_s=``: the newest page,
  oldest first; with ``after`` (the answer's ``next_after``) what came since, waiting up to
  ``wait_s`` for it (woken by the event log's append, never by polling). Unknown ``node``
  or ``kind`` filters are refused, not answered with an empty page.

Local route: ``POST /v1/populi/leave`` (the node itself or an operator) — stop taking work,
stop running tasks, release their leases, report ``left`` and stop heartbeating
(:class:`Departure`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import trio

from populi_peer.agent.heartbeat import Leaving, RegisterOutbox
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Membership
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import ClusterWrites
from populi_peer.api.app import ANY_MEMBER, OPERATOR, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.eligibility import routing_eligibility
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    EVENT_KINDS,
    EventsAnswer,
    EventView,
    GpuSummaryView,
    HeartbeatAnswer,
    LeaveAnswer,
    LifecycleCommandAnswer,
    LifecycleCommandRequest,
    NodesAnswer,
    NodeView,
    ReasonRequest,
)
from populi_peer.core.messages.heartbeat import HeartbeatStatus
from populi_peer.core.messages.records import ROLES, NodeRoleWord
from populi_peer.core.registers import LIFECYCLE
from populi_peer.core.scope import Scope
from populi_peer.errors import BadRequest, Conflict, Forbidden, NotFound, PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store.events import Event, EventLog

LIFECYCLE_ACTIONS = ("cordon", "drain", "maintenance", "quarantine", "resume")
#: The longest an events request waits for the next event (``wait_s``).
MAX_EVENTS_WAIT_S = 60

#: A listener told the id of a node whose lifecycle an operator changed.
LifecycleListener = Callable[[str], None]


class NodeLiveness(Protocol):
    """What the listing shows of a node's heartbeats (the control plane's liveness book)."""

    def age_ms(self, node_id: str) -> int | None: ...

    def stale(self, node_id: str) -> bool: ...

    def stale_after_s(self, node_id: str) -> float: ...

    def scope(self, node_id: str) -> Scope | None: ...

    def status(self, node_id: str) -> HeartbeatStatus | None: ...

    def accepts_remote_work(self, node_id: str) -> bool | None: ...


@dataclass(kw_only=True, eq=False, repr=False)
class NodeAdmin:
    """``writes`` proposes every lifecycle command through the election (ADR 0017)."""

    clock: Clock
    control_plane: ControlPlaneLink
    membership: Membership
    registry: Registry
    events: EventLog
    liveness: NodeLiveness
    gpu_view: Callable[[str], GpuSummaryView | None]
    departure: Departure
    writes: ClusterWrites
    lifecycle_listeners: Sequence[LifecycleListener] = ()
    logger: ClassVar[logging.Logger] = get_logger("nodes")

    def __post_init__(self) -> None:
        self.lifecycle_listeners = tuple(self.lifecycle_listeners)
        # Set (and replaced) by every append: what an events request waits on.
        self._appended = trio.Event()
        self.events.listeners.append(self._event_appended)

    def _event_appended(self) -> None:
        self._appended.set()
        self._appended = trio.Event()

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/admin/nodes/{node}/{action}",
                self._lifecycle,
                roles=OPERATOR,
                name="node_lifecycle",
            ),
            Route(
                "GET",
                "/v1/populi/nodes",
                self._nodes,
                roles=ANY_MEMBER,
                name="nodes",
            ),
            Route(
                "GET",
                "/v1/populi/events",
                self._events,
                roles=ANY_MEMBER,
                name="events",
            ),
            Route(
                "POST",
                "/v1/populi/leave",
                self._leave,
                roles=ANY_MEMBER,
                name="leave",
            ),
        ]

    # -- lifecycle commands ---------------------------------------------------------------

    async def _lifecycle(self, request: Request) -> LifecycleCommandAnswer:
        action = request.path_params["action"]
        if action not in LIFECYCLE_ACTIONS:
            raise NotFound(
                f"no node action {action!r}; use one of {', '.join(LIFECYCLE_ACTIONS)}, retire, delete",
                code="no_route",
            )
        self.control_plane.require_self()
        member = self.membership.resolve_node(request.path_params["node"])
        body = request.message(LifecycleCommandRequest)
        reason = body.reason or ""
        now_ms = wall_ms(self.clock)
        deadline = body.deadline_ms(now_ms)
        until = body.until_ms(now_ms)
        if deadline is not None and action != "drain":
            raise BadRequest("a deadline belongs to drain", code="bad_request")
        if until is not None and action != "maintenance":
            raise BadRequest("'until' belongs to maintenance", code="bad_request")
        if member.id == self.control_plane.node_id and action != "resume":
            log(
                self.logger,
                logging.INFO,
                "lifecycle command on the control plane node itself",
                action=action,
            )
        before, after = await self.writes.lifecycle_command(
            member.id,
            action,  # type: ignore[arg-type]
            actor=request.caller.id,
            reason=reason,
            deadline_wall_ms=deadline,
            until_wall_ms=until,
        )
        assert after is not None
        changed = before is None or before != after
        if changed:
            self.events.append(
                at_ms=wall_ms(self.clock),
                node_id=member.id,
                kind="lifecycle",
                actor=request.caller.id,
                reason=reason,
                detail={
                    "command": action,
                    "from": before.state if before else None,
                    "to": after.state,
                    "deadline_wall_ms": deadline,
                    "until_wall_ms": until,
                },
            )
            for listener in self.lifecycle_listeners:
                listener(member.id)
        await trio.lowlevel.checkpoint()
        return LifecycleCommandAnswer(node=self.node_view(member.id), changed=changed)

    # -- listing --------------------------------------------------------------------------

    def node_view(self, node_id: str) -> NodeView:
        member = self.membership.get(node_id)
        if member is None:
            raise NotFound(f"no node {node_id}", code="unknown_node")
        now_ms = wall_ms(self.clock)
        lc = self.registry.lifecycle(node_id)
        liveness = self.liveness
        age = liveness.age_ms(node_id)
        stale_after_ms = int(liveness.stale_after_s(node_id) * 1000)
        eligibility = routing_eligibility(
            lifecycle=lc,
            heartbeat_age_ms=age,
            stale_after_ms=stale_after_ms,
            now_wall_ms=now_ms,
        )
        is_cp = node_id == self.control_plane.id
        return NodeView(
            id=member.id,
            name=member.name,
            address=member.addresses[0] if member.addresses else None,
            addresses=member.addresses,
            role=_role_word(member.roles, control_plane=is_cp),
            roles=tuple(r for r in member.roles if r in ROLES),
            control_plane=is_cp,
            lifecycle=lc,
            state="unknown" if lc is None else lc.state,
            heartbeat_age_ms=age,
            heartbeat_stale=liveness.stale(node_id),
            stale_after_ms=stale_after_ms,
            scope=liveness.scope(node_id),
            status=liveness.status(node_id),
            accepts_remote_work=liveness.accepts_remote_work(node_id),
            gpu_summary=self.gpu_view(node_id),
            cert_not_after_ms=member.cert_not_after_ms or None,
            joined_ms=member.joined_ms,
            eligible=eligibility.eligible,
            ineligible_reasons=tuple(eligibility.reasons),
        )

    async def _nodes(self, request: Request) -> NodesAnswer:
        self.control_plane.require_self()
        nodes = tuple(self.node_view(m.id) for m in self.membership.nodes())
        await trio.lowlevel.checkpoint()
        return NodesAnswer(
            term=self.control_plane.term,
            membership_version=self.membership.version,
            nodes=nodes,
        )

    async def _events(self, request: Request) -> EventsAnswer:
        given_after = request.query_int("after", -1, minimum=0)
        # Without a cursor: the newest page; with one, what came after it.
        newest_page = given_after < 0
        cursor = max(given_after, 0)
        limit = request.query_int("limit", 200, minimum=1, maximum=1000)
        since = request.query_int("since_ms", -1, minimum=0)
        since_ms = since if since >= 0 else None
        wait_s = request.query_int("wait_s", 0, minimum=0, maximum=MAX_EVENTS_WAIT_S)
        node_id = self._event_node(request.query_one("node"))
        kind = self._event_kind(request.query_one("kind"))
        rows: list[Event] = []
        earlier = False
        with trio.move_on_after(wait_s):
            while True:
                # Taken before reading: an append after the read sets this very event.
                appended = self._appended
                if newest_page:
                    newest_page = False
                    newest = self.events.page(
                        node_id=node_id,
                        kind=kind,
                        since_ms=since_ms,
                        limit=limit + 1,
                        newest_first=True,
                    )
                    earlier = len(newest) > limit
                    rows = newest[:limit][::-1]
                    # A follower goes on from here (nothing may come between the reads).
                    cursor = rows[-1].seq if rows else self.events.last_seq()
                    if rows:
                        break
                else:
                    rows = self.events.page(
                        node_id=node_id, kind=kind, since_ms=since_ms, after=cursor, limit=limit
                    )
                    if rows:
                        cursor = rows[-1].seq
                        break
                if not wait_s:
                    break
                await appended.wait()
        names = {member.id: member.name for member in self.membership.all()}
        events = tuple(
            EventView(
                seq=event.seq,
                at_ms=event.at_ms,
                node_id=event.node_id,
                kind=event.kind,
                actor=event.actor,
                reason=event.reason,
                detail=event.detail,
                node_name=names.get(event.node_id),
                actor_name=names.get(event.actor),
            )
            for event in rows
        )
        await trio.lowlevel.checkpoint()
        return EventsAnswer(events=events, next_after=cursor, earlier=earlier)

    def _event_node(self, ref: str | None) -> str | None:
        """The node id a ``node`` filter names: a member (id or name), or a node the log
        mentions (a deleted node's events stay listed by its id); else 404."""
        if not ref:
            return None
        try:
            return self.membership.resolve_node(ref).id
        except NotFound:
            if self.events.mentions_node(ref):
                return ref
            raise

    def _event_kind(self, kind: str | None) -> str | None:
        if not kind:
            return None
        if kind not in EVENT_KINDS and not self.events.has_kind(kind):
            raise BadRequest(
                f"no event kind {kind!r}; use one of {', '.join(EVENT_KINDS)}",
                code="unknown_event_kind",
            )
        return kind

    # -- leave ----------------------------------------------------------------------------

    async def _leave(self, request: Request) -> LeaveAnswer:
        caller = request.caller
        if caller.id != self.control_plane.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "only this node itself or an operator may make it leave", code="role_required"
            )
        if self.control_plane.is_self:
            raise Conflict(
                "the control plane cannot leave: until election lands it is the cluster's single point of failure",
                code="control_plane_cannot_leave",
            )
        reason = request.message(ReasonRequest).reason_or("left voluntarily")
        return await self.departure.leave(reason=reason, actor=caller.id)


def _role_word(roles: Sequence[str], *, control_plane: bool) -> NodeRoleWord:
    """The one word ``populi nodes`` shows for a node's role."""
    if control_plane:
        return "control-plane"
    if "worker" in roles:
        return "worker"
    known = [role for role in roles if role in ROLES]
    return known[0] if known else "-"


@dataclass(frozen=True, kw_only=True, eq=False)
class Departure:
    """This node leaves: stop taking work, stop its tasks and release their leases, say
    ``left`` to the control plane (a register write of its own, sent with a heartbeat),
    and stop heartbeating once the control plane heard it.

    ``beat(status)`` is one heartbeat now; ``stop_all_work(reason)`` stops every task this
    node runs and releases their leases (returns how many); ``timeout_s`` bounds the
    goodbye (later heartbeats keep saying it)."""

    node_id: str
    clock: Clock
    control_plane: ControlPlaneLink
    registry: Registry
    events: EventLog
    outbox: RegisterOutbox
    leaving: Leaving
    beat: Callable[[HeartbeatStatus], Awaitable[HeartbeatAnswer]]
    stop_all_work: Callable[[str], Awaitable[int]]
    timeout_s: float
    logger: ClassVar[logging.Logger] = get_logger("nodes")

    async def leave(self, *, reason: str, actor: str) -> LeaveAnswer:
        self.leaving.begin()
        stopped = await self.stop_all_work("node_leaving")
        left = NodeLifecycle("left", wall_ms(self.clock), actor, reason)
        write = self.registry.make_write(
            self.node_id,
            LIFECYCLE,
            left.to_json(),
            writer_class="self",
            actor=actor,
            reason=reason,
            term=self.control_plane.term,
        )
        self.outbox.put(write, now=False)
        answer = None
        with trio.move_on_after(self.timeout_s):
            try:
                answer = await self.beat("leaving")
            except PopuliError as exc:
                log(
                    self.logger,
                    logging.WARNING,
                    "could not tell the control plane that this node leaves; retrying with every heartbeat",
                    error=str(exc),
                )
        acknowledged = (
            answer is not None and answer.lifecycle is not None and answer.lifecycle.state == "left"
        )
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=self.node_id,
            kind="left",
            actor=actor,
            reason=reason,
            detail={"acknowledged": acknowledged, "tasks_stopped": stopped},
        )
        if acknowledged:
            self.leaving.acknowledged(late=False)
        # Otherwise the heartbeat loop keeps saying goodbye until the control plane hears
        # it, and then the agent stops (a node that left is told from one that vanished).
        return LeaveAnswer(
            node_id=self.node_id, left=True, acknowledged=acknowledged, tasks_stopped=stopped
        )


__all__ = ["LIFECYCLE_ACTIONS", "Departure", "LifecycleListener", "NodeAdmin", "NodeLiveness"]
