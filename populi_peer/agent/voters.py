"""Voter-set changes (ADR 0011 Decision 6, ADR 0016): one voter added or removed at a time,
by the leader, as a ``voters`` cluster record written through the election.

- ``POST /v1/populi/admin/voters`` (operator; ``populi voter add|remove NODE``): the
  leader signs the next ``voters`` record with its node key — the new set and the one it
  replaces — and writes it; the answer comes once a majority of both sets stored it (the
  machine's rule). Adding a node that is already a voter, or removing one that is not,
  changes nothing (``changed: false``).
- A node that joined with a ``voter`` token is added after its join (:meth:`VoterAdmin.joined`),
  in the background, once its first heartbeat reaches the leader (:meth:`VoterAdmin.heard`):
  a voter counts toward every majority from the moment it is added, so a node that is
  still only a data directory must not be one. A change refused because another is
  pending, or whose outcome is unknown, or because this node's leader lease lapsed while
  no other leads (it may lead again), is tried again; one that stays undone (another
  leader, or the node never started) is the operator's ``populi voter add``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.records import sign_record
from populi_peer.agent.election import ElectionService
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Membership
from populi_peer.api.app import OPERATOR, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.membership import Member
from populi_peer.core.messages.election import (
    VoterAction,
    VoterChangeAnswer,
    VoterChangeRequest,
)
from populi_peer.core.replication import ClusterRecord, VoterSet, voters_body
from populi_peer.errors import Conflict, PopuliError, ServiceUnavailable
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store.events import EventLog

#: Refusals after which a background voter addition is tried again (another change was
#: still settling; the write's outcome was unknown; the election was between leaders).
RETRIED_CODES = frozenset({"voter_change_pending", "outcome_unknown", "election_unavailable"})
#: How many times, and how far apart, a background addition is tried.
JOIN_ADD_ATTEMPTS = 30
JOIN_ADD_RETRY_S = 2.0
#: How long a node that joined with the voter role has to send its first heartbeat here
#: before the leader gives up adding it (the operator's ``populi voter add`` then).
JOIN_HEAR_TIMEOUT_S = 3600.0


def retried(exc: PopuliError) -> bool:
    """Whether a background addition is tried again after ``exc``: a code of
    :data:`RETRIED_CODES`, or ``not_control_plane`` naming no leader — this node's own
    lease lapsed and an election is under way, which it may win again."""
    if exc.code in RETRIED_CODES:
        return True
    return exc.code == "not_control_plane" and exc.details.get("leader_id") is None


@dataclass(kw_only=True, eq=False, repr=False)
class VoterAdmin:
    """The leader's voter changes (see the module docstring)."""

    node_id: str
    node_key: Ed25519PrivateKey
    clock: Clock
    election: ElectionService
    membership: Membership
    control_plane: ControlPlaneLink
    events: EventLog
    logger: ClassVar[logging.Logger] = get_logger("voters")

    def __post_init__(self) -> None:
        self._joined: deque[str] = deque()
        self._wake = trio.Event()
        #: Nodes whose heartbeat reached this control plane since it started.
        self._heard: set[str] = set()
        self._heard_event = trio.Event()

    # -- changes ----------------------------------------------------------------------

    async def change(self, action: VoterAction, node_id: str, *, actor: str) -> VoterChangeAnswer:
        """Add or remove ``node_id``; the voter set once a majority of both sets holds it."""
        self.control_plane.require_self()
        current = self.election.voters
        if current is None:
            raise Conflict("this node holds no voter set", code="no_voter_set")
        if (action == "add") == (node_id in current.voters):
            return self._answer(current, changed=False)
        if action == "add":
            member = self.membership.get(node_id)
            if member is None or member.kind != "node" or "voter" not in member.roles:
                raise Conflict(
                    f"{node_id} did not join with the voter role; only such a node can vote "
                    "(join it with a token from 'populi token create --roles voter,...')",
                    code="not_a_voter_node",
                    node_id=node_id,
                )
            voters = current.voters | {node_id}
        else:
            if len(current.voters) == 1:
                raise Conflict("the last voter cannot be removed", code="last_voter")
            voters = current.voters - {node_id}
        machine = self.election.machine
        if machine is None:
            raise ServiceUnavailable("the election is not running", code="election_unavailable")
        serial = machine.records.next_serial("voters")
        body = voters_body(voters, current.voters)
        text = sign_record(
            kind="voters",
            serial=serial,
            body=body,
            signer_id=self.node_id,
            signer_key=self.node_key,
            now_ms=wall_ms(self.clock),
            actor=actor,
        )
        record = ClusterRecord("voters", serial, self.election.term, body, text)
        entry = await self.election.write(record)
        after = VoterSet.from_record(record)
        # Applied; the leader then marks it settled on a majority of the new set: until
        # then a loss in the previous set can stop elections (ADR 0011 Decision 6).
        with trio.move_on_after(self.election.settings.write_timeout_s):
            await self.election.wait_for(self.election.voters_settled)
        try:
            self.events.append(
                at_ms=wall_ms(self.clock),
                node_id=node_id,
                kind="voters_changed",
                actor=actor,
                reason=action,
                detail={
                    "action": action,
                    "voters": sorted(after.voters),
                    "previous": sorted(after.previous),
                    "term": entry.write_id.term,
                    "serial": serial,
                },
            )
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "voter change event not recorded", error=str(exc))
        log(
            self.logger,
            NOTICE,
            "voter set changed",
            action=action,
            node_id=node_id,
            voters=sorted(after.voters),
        )
        return self._answer(after, changed=True)

    def _answer(self, voters: VoterSet, *, changed: bool) -> VoterChangeAnswer:
        return VoterChangeAnswer(
            changed=changed,
            term=self.election.term,
            serial=voters.serial,
            voters=tuple(sorted(voters.voters)),
            previous=tuple(sorted(voters.previous)),
            leader=self.election.leader_id,
        )

    # -- after a join -----------------------------------------------------------------

    def joined(self, member: Member) -> None:
        """A node joined; with the voter role it becomes a voter (in the background)."""
        if member.kind == "node" and "voter" in member.roles:
            self._joined.append(member.id)
            self._wake.set()

    def heard(self, node_id: str, report: object) -> None:
        """A heartbeat of ``node_id`` reached this control plane (a report listener)."""
        if node_id not in self._heard:
            self._heard.add(node_id)
            self._heard_event.set()
            self._heard_event = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._joined:
                    nursery.start_soon(self._add_joined, self._joined.popleft())

    async def _add_joined(self, node_id: str) -> None:
        # A voter counts toward every majority from the moment it is added: add it once it
        # runs (its first heartbeat here), not while it may still be only a data directory
        # — a set of two whose new voter never starts can write nothing at all.
        with trio.move_on_after(JOIN_HEAR_TIMEOUT_S):
            while node_id not in self._heard:
                await self._heard_event.wait()
        if node_id not in self._heard:
            log(
                self.logger,
                logging.WARNING,
                "joined voter never heard from; add it with 'populi voter add' once it runs",
                node_id=node_id,
            )
            return
        for _ in range(JOIN_ADD_ATTEMPTS):
            try:
                await self.change("add", node_id, actor=self.node_id)
                return
            except PopuliError as exc:
                if not retried(exc):
                    log(
                        self.logger,
                        logging.WARNING,
                        "joined voter not added; add it with 'populi voter add'",
                        node_id=node_id,
                        error=str(exc),
                    )
                    return
            await trio.sleep(JOIN_ADD_RETRY_S)
        log(
            self.logger,
            logging.WARNING,
            "joined voter not added in time; add it with 'populi voter add'",
            node_id=node_id,
        )

    # -- route ------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/admin/voters",
                self._post,
                roles=OPERATOR,
                name="voter_change",
            )
        ]

    async def _post(self, request: Request) -> VoterChangeAnswer:
        body = request.message(VoterChangeRequest)
        voters = self.election.voters
        if voters is not None and body.node in voters.voters:
            node_id = body.node  # a voter may be removed after its member record went
        else:
            node_id = self.membership.resolve_node(body.node).id
        return await self.change(body.action, node_id, actor=request.caller.id)


__all__ = ["JOIN_ADD_ATTEMPTS", "VoterAdmin"]
