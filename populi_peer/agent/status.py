"""What a node says about itself: ``GET /v1/populi/health`` (liveness, unauthenticated)
and ``GET /v1/populi/status`` (cluster, node, address, uptime, term, control plane,
lifecycle, standing, certificate, revocations, health) — what ``populi status`` shows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from populi_peer import PROTOCOL_VERSION, __version__
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.health import Health
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.agent.standing import Standing
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.clock import Clock
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    AdvertisePlanView,
    ClusterRef,
    DiscoveryStatusView,
    HealthAnswer,
    StatusAnswer,
    StatusControlPlane,
    StatusLeader,
    StatusNode,
    StatusVoter,
)
from populi_peer.core.messages.records import ROLES
from populi_peer.core.replication import VoterSet
from populi_peer.identity import Identity


@dataclass(eq=False, repr=False)
class Uptime:
    """Since when this agent runs (trio's clock; never persisted)."""

    clock: Clock

    def __post_init__(self) -> None:
        self.started_mono: float | None = None

    def start(self) -> None:
        self.started_mono = self.clock.mono()

    def seconds(self) -> float:
        return 0.0 if self.started_mono is None else self.clock.mono() - self.started_mono


class ControlPlaneContact(Protocol):
    """How this node's heartbeats to the control plane fare (the heartbeat sender)."""

    @property
    def reachable(self) -> bool: ...

    @property
    def lifecycle(self) -> NodeLifecycle | None: ...


class ElectionFacts(Protocol):
    """What the status says of the election (the election service)."""

    @property
    def role(self) -> str: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def voters(self) -> VoterSet | None: ...

    @property
    def last_contact(self) -> Mapping[str, float]: ...


@dataclass(frozen=True, kw_only=True, eq=False)
class NodeStatus:
    """``identity`` gives the cluster's and this node's names and roles;
    ``cert_not_after_s()`` is the expiry of the certificate in force now; ``network()``
    what it advertises and what discovery sees (``addresses``, ``discovery``);
    ``metrics_url()`` where /metrics is served, once bound."""

    identity: Identity
    listen: str
    address: OwnAddress
    uptime: Uptime
    control_plane: ControlPlaneLink
    contact: ControlPlaneContact
    registry: Registry
    standing: Standing
    revocations: RevocationState
    health: Health
    cert_not_after_s: Callable[[], float]
    network: Callable[[], Mapping[str, Any]] | None = None
    election: ElectionFacts | None = None
    names: Callable[[str], str | None] = lambda node_id: None
    metrics_url: Callable[[], str | None] = lambda: None

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/health",
                self._health,
                roles=None,
                name="health",
            ),
            Route(
                "GET",
                "/v1/populi/status",
                self._status,
                roles=ANY_MEMBER,
                name="status",
            ),
        ]

    async def _health(self, request: Request) -> HealthAnswer:
        await trio.lowlevel.checkpoint()
        return HealthAnswer(status="ok", node_id=self.identity.node_id, version=__version__)

    async def _status(self, request: Request) -> StatusAnswer:
        await trio.lowlevel.checkpoint()
        return self.answer()

    def own_lifecycle(self) -> NodeLifecycle | None:
        """On the control plane, its own register; elsewhere what a peer said when it
        refused this retired node, else what the last heartbeat answer said."""
        if self.control_plane.is_self:
            return self.registry.lifecycle(self.identity.node_id)
        return self.standing.refused_lifecycle or self.contact.lifecycle

    def answer(self) -> StatusAnswer:
        identity = self.identity
        control_plane = self.control_plane
        network = self.network() if self.network is not None else {}
        return StatusAnswer(
            cluster=ClusterRef(id=identity.cluster_id, name=identity.cluster_name),
            node=StatusNode(
                id=identity.node_id,
                name=identity.node_name,
                roles=tuple(r for r in identity.roles if r in ROLES),
            ),
            listen=self.listen,
            url=self.address.url,
            uptime_s=round(self.uptime.seconds(), 3),
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            term=control_plane.term,
            control_plane=StatusControlPlane(
                node_id=control_plane.id,
                url=control_plane.url,
                is_self=control_plane.is_self,
                reachable=control_plane.is_self or self.contact.reachable,
            ),
            lifecycle=self.own_lifecycle(),
            standing=self.standing.view(),
            cert_not_after_ms=int(self.cert_not_after_s() * 1000),
            revocation_serial=self.revocations.serial,
            health=self.health.view(),
            addresses=(
                AdvertisePlanView.from_json(network["addresses"])
                if "addresses" in network
                else None
            ),
            discovery=(
                DiscoveryStatusView.from_json(network["discovery"])
                if "discovery" in network
                else None
            ),
            metrics_url=self.metrics_url(),
            **self._election_view(),
        )

    def _election_view(self) -> dict[str, Any]:
        """``leader``, ``voters`` and ``election_role``: a voter's own election; elsewhere the
        control plane this node follows."""
        control_plane = self.control_plane
        election = self.election
        if election is None or election.voters is None:
            leader_id: str | None = control_plane.id
        else:
            leader_id = election.leader_id
        leader = None
        if leader_id is not None:
            url = control_plane.url if leader_id == control_plane.id else None
            leader = StatusLeader(id=leader_id, name=self.names(leader_id), url=url)
        voters: tuple[StatusVoter, ...] = ()
        if election is not None and election.voters is not None:
            now_ms = int(self.uptime.clock.wall() * 1000)
            voters = tuple(
                StatusVoter(
                    id=voter,
                    name=self.names(voter),
                    last_contact_ms=now_ms
                    if voter == self.identity.node_id
                    else (
                        int(election.last_contact[voter] * 1000)
                        if voter in election.last_contact
                        else None
                    ),
                )
                for voter in sorted(election.voters.voters)
            )
        held = election.voters if election is not None else None
        return {
            "leader": leader,
            "voters": voters,
            "voters_settled": held.settled if held is not None else None,
            "election_role": election.role if election is not None else None,
        }


__all__ = ["ControlPlaneContact", "NodeStatus", "Uptime"]
