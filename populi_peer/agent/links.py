"""How a node reaches the others: the control plane it believes holds the role, and any
member by its id.

Two small collaborators every service that talks to another node is given (it never
reaches for the agent that composes it):

- :class:`ControlPlaneLink` — which node holds the control-plane role as this node knows it
  (term, node id, URL: kept in the store's meta, updated by whoever learns better), whether
  that is this node, and a call to it. Every call names the node it means to reach, so the
  TLS handshake refuses any other node's certificate (docs/adr/0009).
- :class:`PeerLink` — a member's record with an address (refreshing membership from the
  control plane once for a node that joined a moment ago), and a call to it that retries a
  peer's ``unknown_signer`` refusal a few times (that peer learns of us within a heartbeat).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar, Unpack

import trio

from populi_peer.agent.membership import Membership
from populi_peer.api.client import CallRequest, PeerClient
from populi_peer.core.election import RoleChanged
from populi_peer.core.membership import Member
from populi_peer.core.messages import MembersAnswer, Message, StatusAnswer
from populi_peer.discovery.service import call_first
from populi_peer.errors import Conflict, PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store import Store

#: How often a call retries a peer that does not know this node yet (``unknown_signer``).
UNKNOWN_SIGNER_ATTEMPTS = 5

M = TypeVar("M", bound=Message)


@dataclass(kw_only=True, eq=False, repr=False)
class ControlPlaneLink:
    """The control plane as this node knows it, and calls to it."""

    node_id: str
    store: Store
    client: PeerClient

    def __post_init__(self) -> None:
        #: ``url_of(node_id)``: where a leader the election names is reached (this node's
        #: own URL for itself); ``None`` when no address is known.
        self.url_of: Callable[[str], str | None] = lambda node_id: None
        #: Whether this node may act as control plane now (the election's ``can_act``:
        #: leader, merged, lease held). ``None``: no election runs (tests of one service).
        self.authority: Callable[[], bool] | None = None
        #: Whether a node is a voter (its member record says so): the only nodes whose
        #: claim to lead this node follows.
        self.is_voter: Callable[[str], bool] = lambda node_id: False
        #: The voters this node knows, each with its addresses (where to ask who leads).
        self.voters: Callable[[], Sequence[tuple[str, Sequence[str]]]] = lambda: ()

    @property
    def term(self) -> int:
        return int(self.store.get_meta("term", "1") or "1")

    @property
    def id(self) -> str:
        return self.store.require_meta("control_plane_id")

    @property
    def url(self) -> str:
        return self.store.require_meta("control_plane_url")

    @property
    def named_self(self) -> bool:
        """Whether this node is the one it last knew to hold the role (itself): true on a
        leader whose lease lapsed too; :attr:`is_self` is what may act."""
        return self.id == self.node_id

    @property
    def is_self(self) -> bool:
        """Whether this node may act as control plane now: it leads, and (where the
        election runs) it is merged and its lease is held (ADR 0011 Decision 3)."""
        return self.named_self and (self.authority is None or self.authority())

    def require_self(self) -> None:
        """Refuse (409 ``not_control_plane``, with the leader's id, URL and term as this
        node knows them) unless this node may act as control plane now."""
        if self.is_self:
            return
        if self.named_self:
            raise Conflict(
                f"this node is not the control plane now (term {self.term}): an election "
                "is under way; retry shortly",
                code="not_control_plane",
                leader_id=None,
                control_plane_url=None,
                term=self.term,
            )
        raise Conflict(
            f"this node is not the control plane (term {self.term}); ask {self.url}",
            code="not_control_plane",
            leader_id=self.id,
            control_plane_url=self.url,
            term=self.term,
        )

    def publish_url(self, url: str) -> None:
        """This node holds the role and serves at ``url`` (known once the API is bound)."""
        if self.named_self and self.url != url:
            self.store.set_meta("control_plane_url", url)

    def follow_refusal(self, exc: PopuliError) -> bool:
        """A ``not_control_plane`` refusal naming a leader: follow it when it is a voter
        and its term is at least the highest this node knows. Whether it was followed."""
        if exc.code != "not_control_plane":
            return False
        leader = exc.details.get("leader_id")
        term = exc.details.get("term")
        url = exc.details.get("control_plane_url")
        if (
            not isinstance(leader, str)
            or not isinstance(term, int)
            or isinstance(term, bool)
            or (leader, term) == (self.id, self.term)
            or not self.is_voter(leader)
        ):
            return False
        before = (self.id, self.term)
        self.leader_elected(term=term, leader_id=leader, url=url if isinstance(url, str) else None)
        return (self.id, self.term) != before

    def reached_at(self, url: str) -> None:
        """The control plane answered at ``url`` (another of its addresses, after the one
        held failed): reach it there next."""
        if url != self.url:
            self.store.set_meta("control_plane_url", url)

    def follow(self, *, term: int, url: str) -> None:
        """The control plane answered from ``url`` in ``term``: where to reach it next,
        unless that term is older than the one this node knows."""
        if term >= self.term and url != self.url:
            self.store.set_meta("control_plane_url", url)

    def role_changed(self, change: RoleChanged) -> None:
        """This node's election moved (:class:`RoleChanged`): follow the leader it names."""
        if change.leader is not None:
            self.leader_elected(term=change.term, leader_id=change.leader)

    def leader_elected(self, *, term: int, leader_id: str, url: str | None = None) -> None:
        """The election names ``leader_id`` the leader of ``term`` (this node's own
        election service, or a voter's refusal): follow it unless this node knows a later
        term."""
        if term < self.term:
            return
        values = {"term": str(term), "control_plane_id": leader_id}
        url = self.url_of(leader_id) or url
        if url:
            values["control_plane_url"] = url
        if all(self.store.get_meta(key) == value for key, value in values.items()):
            return
        with self.store.transaction():
            for key, value in values.items():
                self.store.set_meta(key, value)

    async def call(
        self, *, answer: type[M], at: str | None = None, **call: Unpack[CallRequest]
    ) -> M:
        """Call the control plane; its answer parsed as ``answer`` (a malformed one is
        ``bad_peer_answer``); with ``at``, at that URL (another of its
        addresses) rather than the one held (the call still names its node id). A
        ``not_control_plane`` refusal naming a voter at a term at least as high is
        followed (:meth:`follow_refusal`), and the call made once more there (not with
        ``at``: that caller picks its addresses itself)."""
        for attempt in range(2):
            try:
                return await self.client.call(
                    url=at or self.url, node_id=self.id, answer=answer, **call
                )
            except PopuliError as exc:
                if not self.follow_refusal(exc) or at is not None or attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def find_leader(self) -> bool:
        """Ask each voter (:attr:`voters`) other than the one held whom it follows, and follow the answer of the highest term that names a voter. Whether
        this node now follows another node (the current one did not answer)."""
        best: tuple[int, str, str] | None = None
        for node_id, addresses in self.voters():
            if node_id in (self.id, self.node_id):
                continue
            for address in addresses:
                try:
                    status = await self.client.call(
                        url=f"https://{address}",
                        node_id=node_id,
                        method="GET",
                        path="/v1/populi/status",
                        answer=StatusAnswer,
                    )
                except PopuliError:
                    continue
                cp = status.control_plane
                if self.is_voter(cp.node_id) and (best is None or status.term > best[0]):
                    best = (status.term, cp.node_id, cp.url)
                break
        if best is None or best[1] == self.id:
            return False
        before = self.id
        self.leader_elected(term=best[0], leader_id=best[1], url=best[2])
        return self.id != before


#: ``rank(node_id, addresses)`` -> the addresses to try, best first.
Rank = Callable[[str, Sequence[str]], Sequence[str]]


@dataclass(kw_only=True, eq=False, repr=False)
class PeerLink:
    """Members by id: their record with an address, and calls to them."""

    node_id: str
    membership: Membership
    control_plane: ControlPlaneLink
    client: PeerClient
    logger: ClassVar[logging.Logger] = get_logger("peers")

    def __post_init__(self) -> None:
        #: ``rank(node_id, addresses)``: its addresses best first from here (and where
        #: discovery saw it); ``None`` tries the member record's order.
        self.rank: Rank | None = None

    async def sync_members(self) -> None:
        """Replace this node's membership view with the control plane's."""
        answer = await self.control_plane.call(
            method="GET", path="/v1/populi/members", answer=MembersAnswer
        )
        members = [view.member() for view in answer.members]
        if not any(m.id == self.node_id for m in members):
            log(self.logger, logging.WARNING, "this node is not in the control plane's membership")
        self.membership.replace_all(members, answer.version)

    async def member(self, node_id: str) -> Member | None:
        """A node's member record with an address; refreshes membership from the control
        plane once if this node has not heard of it yet (it may have joined a moment ago)."""
        member = self.membership.get(node_id)
        if (member is None or not member.addresses) and not self.control_plane.is_self:
            try:
                await self.sync_members()
            except PopuliError as exc:
                log(self.logger, logging.INFO, "membership refresh failed", error=str(exc))
            member = self.membership.get(node_id)
        return member if member is not None and member.addresses else None

    async def call(
        self,
        member: Member,
        *,
        attempts: int = UNKNOWN_SIGNER_ATTEMPTS,
        answer: type[M],
        **call: Unpack[CallRequest],
    ) -> M:
        """Call another node; its answer parsed as ``answer``. A peer
        that does not know us yet (we joined after its last membership refresh: 401
        ``unknown_signer``) learns of us within a heartbeat, so that refusal is retried a
        few times before it counts."""
        # Its addresses best first from here, then where it was seen (discovery); the
        # next one only when nothing reached the one before (TLS proves who answers).
        candidates = (
            self.rank(member.id, member.addresses) if self.rank else tuple(member.addresses)
        )
        for attempt in range(attempts):
            try:
                return await call_first(
                    candidates,
                    lambda address: self.client.call(
                        url=f"https://{address}", node_id=member.id, answer=answer, **call
                    ),
                )
            except PopuliError as exc:
                if exc.code != "unknown_signer" or attempt == attempts - 1:
                    raise
                await trio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["UNKNOWN_SIGNER_ATTEMPTS", "ControlPlaneLink", "PeerLink", "Rank"]
