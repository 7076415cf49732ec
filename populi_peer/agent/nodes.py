"""Node lifecycle operated from the CLI, the membership listing, events and leave.

Control plane routes:

- ``POST /v1/populi/admin/nodes/{node}/{cordon|drain|maintenance|quarantine|resume}``
  (operator): one lifecycle command through the one transition table; illegal -> 409
  listing the allowed commands; every change is an event with who, why and when.
- ``GET /v1/populi/nodes``: every node with lifecycle, heartbeat age / staleness, path
  scope as seen from here, GPU summary, certificate expiry and routing eligibility.
- ``GET /v1/populi/events?node=&after=&limit=``.

Local route: ``POST /v1/populi/leave`` (the node itself or an operator) — stop taking work,
stop running tasks, release their leases, report ``left`` and stop heartbeating.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.core.eligibility import routing_eligibility
from populi_peer.core.lifecycle import NodeLifecycle, effective
from populi_peer.core.registers import LIFECYCLE
from populi_peer.errors import BadRequest, Conflict, Forbidden, NotFound, PopuliError
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

OPERATOR = frozenset({"operator"})
LIFECYCLE_ACTIONS = ("cordon", "drain", "maintenance", "quarantine", "resume")
MAX_REASON = 200


class NodeAdmin:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("nodes")

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/admin/nodes/{node}/{action}",
                self._lifecycle,
                roles=OPERATOR,
                name="node_lifecycle",
            ),
            Route("GET", "/v1/populi/nodes", self._nodes, roles=ANY_MEMBER, name="nodes"),
            Route("GET", "/v1/populi/events", self._events, roles=ANY_MEMBER, name="events"),
            Route("POST", "/v1/populi/leave", self._leave, roles=ANY_MEMBER, name="leave"),
        ]

    # -- lifecycle commands ---------------------------------------------------------------

    async def _lifecycle(self, request: Request) -> dict[str, Any]:
        agent = self.agent
        action = request.path_params["action"]
        if action not in LIFECYCLE_ACTIONS:
            raise NotFound(
                f"no node action {action!r}; use one of {', '.join(LIFECYCLE_ACTIONS)}, retire, delete",
                code="no_route",
            )
        agent.require_control_plane()
        member = agent.membership.resolve_node(request.path_params["node"])
        body = request.json() if request.body else {}
        reason = request.reason("")
        now_ms = int(agent.clock.wall() * 1000)
        deadline = _relative_or_absolute(body, "deadline", now_ms)
        until = _relative_or_absolute(body, "until", now_ms)
        if deadline is not None and action != "drain":
            raise BadRequest("a deadline belongs to drain", code="bad_request")
        if until is not None and action != "maintenance":
            raise BadRequest("'until' belongs to maintenance", code="bad_request")
        if member.id == agent.node_id and action in (
            "maintenance",
            "quarantine",
            "drain",
            "cordon",
        ):
            log(
                self.logger,
                logging.INFO,
                "lifecycle command on the control plane node itself",
                action=action,
            )
        before, after = agent.registry.command(
            member.id,
            action,  # type: ignore[arg-type]
            writer_class="operator",
            actor=request.caller.id,
            reason=reason,
            term=agent.term,
            deadline_wall_ms=deadline,
            until_wall_ms=until,
        )
        assert after is not None
        changed = before is None or before.to_json() != after.to_json()
        if changed:
            agent.record_event(
                member.id,
                "lifecycle",
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
            await agent.on_lifecycle_changed(member.id)
        return {"node": self.node_json(member.id), "changed": changed}

    # -- listing --------------------------------------------------------------------------

    def node_json(self, node_id: str) -> dict[str, Any]:
        agent = self.agent
        member = agent.membership.get(node_id)
        if member is None:
            raise NotFound(f"no node {node_id}", code="unknown_node")
        now_ms = int(agent.clock.wall() * 1000)
        stored = agent.registry.registers.lifecycle(node_id)
        lc = effective(stored, now_ms) if stored else None
        receiver = agent.heartbeats
        age = receiver.age_ms(node_id)
        seen = receiver.seen.get(node_id)
        scope = seen.scope if seen else None
        _, stale_after = receiver.timings(scope or "lan")
        gpu = agent.gpu_view(node_id)
        eligibility = routing_eligibility(
            lifecycle=lc,
            heartbeat_age_ms=age,
            stale_after_ms=int(stale_after * 1000),
            now_wall_ms=now_ms,
        )
        roles = list(member.roles)
        role = (
            "control-plane"
            if node_id == agent.control_plane_id
            else ("worker" if "worker" in roles else (roles[0] if roles else "-"))
        )
        return {
            "id": member.id,
            "name": member.name,
            "address": member.addresses[0] if member.addresses else None,
            "addresses": list(member.addresses),
            "role": role,
            "roles": roles,
            "control_plane": node_id == agent.control_plane_id,
            "lifecycle": None if lc is None else lc.to_json(),
            "state": "unknown" if lc is None else lc.state,
            "heartbeat_age_ms": age,
            "heartbeat_stale": receiver.stale(node_id),
            "stale_after_ms": int(stale_after * 1000),
            "scope": scope,
            "status": seen.status if seen else None,
            "accepts_remote_work": seen.report.exec_remote if seen else None,
            "gpu_summary": gpu,
            "cert_not_after_ms": member.cert_not_after_ms or None,
            "joined_ms": member.joined_ms,
            "eligible": eligibility.eligible,
            "ineligible_reasons": list(eligibility.reasons),
        }

    async def _nodes(self, request: Request) -> dict[str, Any]:
        self.agent.require_control_plane()
        nodes = [self.node_json(m.id) for m in self.agent.membership.nodes()]
        return {
            "term": self.agent.term,
            "membership_version": self.agent.membership.version,
            "nodes": nodes,
        }

    async def _events(self, request: Request) -> dict[str, Any]:
        after = request.query_int("after", 0, minimum=0)
        limit = request.query_int("limit", 200, minimum=1, maximum=1000)
        node_ref = request.query_one("node")
        if node_ref:
            try:
                node_id = self.agent.membership.resolve_node(node_ref).id
            except NotFound:
                node_id = node_ref  # a deleted node's events stay listed by its id
            rows = self.agent.events.page(node_id=node_id, after=after, limit=limit)
        else:
            rows = self.agent.events.page(after=after, limit=limit)
        events = [event.to_json() for event in rows]
        return {"events": events, "next_after": events[-1]["seq"] if events else after}

    # -- leave ----------------------------------------------------------------------------

    async def _leave(self, request: Request) -> dict[str, Any]:
        agent = self.agent
        caller = request.caller
        if caller.id != agent.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "only this node itself or an operator may make it leave", code="role_required"
            )
        if agent.is_control_plane:
            raise Conflict(
                "the control plane cannot leave: until election lands it is the cluster's single point of failure",
                code="control_plane_cannot_leave",
            )
        reason = request.reason("left voluntarily")
        result = await agent.leave(reason=reason, actor=caller.id)
        return result


def _relative_or_absolute(body: dict[str, Any], name: str, now_ms: int) -> int | None:
    """``<name>_in_s`` (seconds from now on the control plane's clock) or
    ``<name>_wall_ms`` (absolute UTC ms)."""
    rel = body.get(f"{name}_in_s")
    absolute = body.get(f"{name}_wall_ms")
    if rel is not None and absolute is not None:
        raise BadRequest(f"give {name}_in_s or {name}_wall_ms, not both", code="bad_request")
    if rel is not None:
        if (
            isinstance(rel, bool)
            or not isinstance(rel, (int, float))
            or not 0 < rel <= 10 * 365 * 86400
        ):
            raise BadRequest(
                f"{name}_in_s must be a positive number of seconds", code="bad_request"
            )
        return now_ms + int(rel * 1000)
    if absolute is not None:
        if isinstance(absolute, bool) or not isinstance(absolute, int) or absolute <= 0:
            raise BadRequest(f"{name}_wall_ms must be UTC milliseconds", code="bad_request")
        return absolute
    return None


async def leave_sequence(agent: Agent, *, reason: str, actor: str) -> dict[str, Any]:
    """Stop taking work, stop tasks and release leases, say ``left``, stop heartbeating."""
    agent.leaving = True
    stopped = await agent.stop_all_work(reason="node_leaving")
    left = NodeLifecycle("left", int(agent.clock.wall() * 1000), actor, reason)
    write = agent.registry.make_write(
        agent.node_id,
        LIFECYCLE,
        left.to_json(),
        writer_class="self",
        actor=actor,
        reason=reason,
        term=agent.term,
    )
    agent.heartbeat_sender.outbox_registers.append(write.to_json())
    answer = None
    with trio.move_on_after(agent.config.api.request_timeout_s):
        try:
            answer = await agent.heartbeat_sender.beat_once(status="leaving")
        except PopuliError as exc:
            log(
                get_logger("nodes"),
                logging.WARNING,
                "could not tell the control plane that this node leaves; retrying with every heartbeat",
                error=str(exc),
            )
    acknowledged = (
        answer is not None and answer.lifecycle is not None and answer.lifecycle.state == "left"
    )
    agent.record_event(
        agent.node_id,
        "left",
        actor=actor,
        reason=reason,
        detail={"acknowledged": acknowledged, "tasks_stopped": stopped},
    )
    return {
        "node_id": agent.node_id,
        "left": True,
        "acknowledged": acknowledged,
        "tasks_stopped": stopped,
    }


__all__ = ["LIFECYCLE_ACTIONS", "NodeAdmin", "leave_sequence"]
