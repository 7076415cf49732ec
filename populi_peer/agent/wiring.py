"""What one part of the node reads of another, for the composition root.

A service that needs another's facts defines the small Protocol it needs next to itself
(:class:`~populi_peer.agent.leases.NodeFacts`, :class:`~populi_peer.agent.worker.WorkerGates`,
:class:`~populi_peer.agent.submitter.SubmitterNode`); the objects here satisfy them from the
services that own each fact, and :mod:`populi_peer.agent.agent` hands them over. This
module may import services; no service imports it (nor the agent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from populi_peer.agent.address import OwnAddress
from populi_peer.agent.attempts import AttemptRunner
from populi_peer.agent.gossip import HintGossip
from populi_peer.agent.gpu import GpuService
from populi_peer.agent.heartbeat import Leaving, Liveness, scope_of
from populi_peer.agent.leases import LeaseService
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Membership
from populi_peer.agent.metrics import NodeFigures
from populi_peer.agent.registry import Registry
from populi_peer.agent.settings_sync import SettingsSync
from populi_peer.agent.standing import RemoteWork, Standing
from populi_peer.agent.status import NodeStatus
from populi_peer.agent.submitter import Submitter
from populi_peer.agent.worker import Worker
from populi_peer.config import ExecConfig, ScopeConfig
from populi_peer.core.hints import GpuHint, HintBody
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.scope import Scope
from populi_peer.errors import ConfigError


def check_stop_margin(config: ExecConfig, settings: dict[str, Any]) -> None:
    """safety rule 3: refuse a stop margin smaller than the SIGTERM grace plus the kill
    latency plus the clock drift over one TTL (the cluster's longest), and one that
    leaves no room for a renewal. Checked at start against the settings this node holds
    (``settings``); a later, longer ``max_lease_ttl_s`` makes the worker refuse such
    leases (``ttl_too_short``) instead."""
    if not config.remote:
        return
    try:
        config.check_stop_margin(float(settings["max_lease_ttl_s"]))
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} (cluster max_lease_ttl_s = {settings['max_lease_ttl_s']:g} s)",
            key="exec.stop_margin_s",
        ) from None


@dataclass(frozen=True)
class ControlPlaneNodeFacts:
    """:class:`~populi_peer.agent.leases.NodeFacts` from membership, the lifecycle
    registers, the control plane's book of heartbeats and the GPU service."""

    membership: Membership
    registry: Registry
    liveness: Liveness
    gpu: GpuService

    def is_node(self, node_id: str) -> bool:
        member = self.membership.get(node_id)
        return member is not None and member.kind == "node"

    def resolve_node(self, ref: str) -> str:
        if self.membership.get(ref) is not None:
            return ref
        return self.membership.resolve_node(ref).id

    def lifecycle(self, node_id: str) -> NodeLifecycle | None:
        return self.registry.lifecycle(node_id)

    def heartbeat_age_ms(self, node_id: str) -> int | None:
        return self.liveness.age_ms(node_id)

    def stale_after_ms(self, node_id: str) -> int:
        return int(self.liveness.stale_after_s(node_id) * 1000)

    def stale(self, node_id: str) -> bool:
        return self.liveness.stale(node_id)

    def scope(self, node_id: str) -> Scope | None:
        return self.liveness.scope(node_id)

    def accepts_remote_work(self, node_id: str) -> bool | None:
        return self.liveness.accepts_remote_work(node_id)

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        return self.gpu.allocatable_gpus(node_id)

    def gpu_hints(self, node_id: str) -> list[GpuHint]:
        return [device.hint() for device in self.gpu.devices(node_id)]


@dataclass(frozen=True)
class ExecNode:
    """:class:`~populi_peer.agent.worker.WorkerGates` and
    :class:`~populi_peer.agent.submitter.SubmitterNode`: what the rest of this node tells
    its worker and its submitter."""

    remote_work: RemoteWork
    standing: Standing
    membership: Membership
    gpu: GpuService
    settings_sync: SettingsSync
    scope: ScopeConfig
    leaving_state: Leaving

    def retired(self) -> bool:
        return self.standing.out

    def leaving(self) -> bool:
        return self.leaving_state.started

    def remote_enabled(self) -> bool:
        return self.remote_work.enabled()

    def verified_gpu_uuids(self) -> list[str]:
        return self.gpu.verified_uuids()

    async def catch_up_settings(self, serial: int | None) -> None:
        await self.settings_sync.catch_up(serial)

    def resolve_node(self, ref: str) -> str:
        return self.membership.resolve_node(ref).id

    def scope_of(self, host: str | None) -> Scope:
        return scope_of(self.scope, host)


@dataclass(frozen=True)
class AllWork:
    """Every task this node runs, as its submitter (local attempts) and as a worker: what
    a leaving node stops (:class:`~populi_peer.agent.nodes.Departure`)."""

    submitter: Submitter
    worker: Worker

    async def stop(self, reason: str) -> int:
        """Stop every task and release its lease; returns how many were stopped."""
        local = await self.submitter.stop_all(reason)
        remote = await self.worker.stop_all(reason)
        return local + remote


__all__ = ["AllWork", "ControlPlaneNodeFacts", "ExecNode", "check_stop_margin"]


@dataclass(frozen=True)
class HintSource:
    """What this node says about itself in its signed hint (ADR 0010), read from the
    services that own each fact."""

    roles: tuple[str, ...]
    node_status: NodeStatus
    remote_work: RemoteWork
    runner: AttemptRunner
    address: OwnAddress
    gpu: GpuService

    def body(self) -> HintBody:
        lifecycle = self.node_status.own_lifecycle()
        return HintBody(
            lifecycle=lifecycle.state if lifecycle is not None else "active",
            roles=self.roles,
            accepts_remote_work=self.remote_work.enabled(),
            running_tasks=len(self.runner.running),
            addresses=tuple(self.address.addresses()),
            gpu=self.gpu.summary,
        )


def node_figures(
    *,
    node_id: str,
    control_plane: ControlPlaneLink,
    membership: Membership,
    registry: Registry,
    liveness: Liveness,
    gpu: GpuService,
    gossip: HintGossip,
    leases: LeaseService,
    runner: AttemptRunner,
) -> NodeFigures:
    """What ``/metrics`` reads of this node when scraped: the control plane's own view
    where it is one, this node's hints elsewhere."""

    def nodes() -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        for member in membership.nodes():
            lifecycle = registry.lifecycle(member.id)
            state = lifecycle.state if lifecycle is not None else "unknown"
            out.append((member.id, state, control_plane.is_self and liveness.stale(member.id)))
        return out

    def gpus() -> list[tuple[str, str, bool]]:
        if control_plane.is_self:
            return [
                (m.id, d.health, d.allocatable)
                for m in membership.nodes()
                for d in gpu.devices(m.id)
            ]
        return [
            (node, g.health, g.allocatable)
            for node, record in gossip.state.records.items()
            for g in record.body.gpus
        ]

    def heartbeat_ages_s() -> list[tuple[str, float]]:
        if not control_plane.is_self:
            return []
        ages = ((m.id, liveness.age_ms(m.id)) for m in membership.nodes())
        return [(node, age / 1000) for node, age in ages if age is not None]

    def lease_states() -> list[str]:
        if not control_plane.is_self or leases.table is None:
            return []
        return [lease.state for lease in leases.table.leases.values()]

    return NodeFigures(
        node_id=node_id,
        is_control_plane=lambda: control_plane.is_self,
        term=lambda: control_plane.term,
        nodes=nodes,
        gpus=gpus,
        lease_states=lease_states,
        heartbeat_ages_s=heartbeat_ages_s,
        running_attempts=lambda: len(runner.running),
    )
