"""What a node says about itself (health, status), cluster settings (show, set, push) and
the control plane's GPU views (``agent/agent.py``, ``agent/settings_sync.py``,
``agent/gpu.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Const,
    Dict,
    Int,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import (
    LIFECYCLE,
    ROLE_LIST,
    ClusterRef,
    NodeGpus,
    NodeHealth,
    Role,
    SettingsValuesCodec,
    SettingsView,
    Standing,
)


@message
class AdvertisePlanView(Message):
    """``AdvertisePlan``: what this node advertises (docs/wan.md, Addresses)."""

    addresses: tuple[str, ...] = wire(Seq(Text()))
    by_scope: Mapping[str, tuple[str, ...]] = wire(Dict(Seq(Text())))
    overlay_cluster: bool = wire(Bool())


@message
class SightingView(Message):
    """``Sighting``: a Populi node seen on the LAN or at a static peer (a hint)."""

    node_id: str = wire(Text())
    cluster_digest: str = wire(Text())
    cluster: Literal["ours", "foreign", "unknown"] = wire(Choice(("ours", "foreign", "unknown")))
    addresses: tuple[str, ...] = wire(Seq(Text()))
    source: Literal["mdns", "static"] = wire(Choice(("mdns", "static")))
    roles: tuple[str, ...] = wire(Seq(Text()), default=())
    protocol_version: int | None = wire(Nullable(Int()), omit_none=True)
    instance: str | None = wire(Nullable(Text()), omit_none=True)
    verified: bool = wire(Bool(), default=False)


@message
class DiscoveryStatusView(Message):
    """``DiscoveryStatus``: LAN discovery and static peers (hints only, never admission)."""

    enabled: bool = wire(Bool())
    mdns: Literal["off", "starting", "on", "failed"] = wire(
        Choice(("off", "starting", "on", "failed"))
    )
    interfaces: tuple[str, ...] = wire(Seq(Text()))
    static_peers: tuple[str, ...] = wire(Seq(Text()))
    sightings: tuple[SightingView, ...] = wire(Seq(Nested(SightingView)))
    reason: str | None = wire(Nullable(Text()), default=None)
    announced: str | None = wire(Nullable(Text()), default=None)
    static_errors: Mapping[str, str] = wire(Dict(Text()), default_factory=dict)
    bad_announcements: int = wire(Int(minimum=0), default=0)


@message
class HealthAnswer(Message):
    """``Health``: liveness (unauthenticated)."""

    status: Literal["ok"] = wire(Const("ok"))
    node_id: str = wire(Text(min_len=1))
    version: str = wire(Text())


@message
class StatusNode(Message):
    id: str = wire(Text(min_len=1))
    name: str = wire(Text())
    roles: tuple[Role, ...] = wire(ROLE_LIST)


@message
class StatusControlPlane(Message):
    node_id: str = wire(Text())
    url: str = wire(Text())
    is_self: bool = wire(Bool())
    #: Always true on the control plane; elsewhere: a heartbeat was answered and the
    #: last one did not fail.
    reachable: bool = wire(Bool())


@message
class StatusLeader(Message):
    """The control-plane leader this node knows: its own election's on a voter, the one
    it follows elsewhere (``name``/``url``: ``None`` where this node does not know them)."""

    id: str = wire(Text(min_len=1))
    name: str | None = wire(Nullable(Text()), default=None)
    url: str | None = wire(Nullable(Text()), default=None)


@message
class StatusVoter(Message):
    """One voter of the voter set this node holds; ``last_contact_ms``: when it last
    exchanged election messages with this node (wall ms; ``None``: not since start)."""

    id: str = wire(Text(min_len=1))
    name: str | None = wire(Nullable(Text()), default=None)
    last_contact_ms: int | None = wire(Nullable(Int()), default=None)


@message
class StatusAnswer(Message):
    """``Status``: what this node says about itself."""

    cluster: ClusterRef = wire(Nested(ClusterRef))
    node: StatusNode = wire(Nested(StatusNode))
    listen: str = wire(Text())
    url: str = wire(Text())
    uptime_s: float = wire(Num(minimum=0))
    version: str = wire(Text())
    protocol_version: int = wire(Int())
    term: int = wire(Int(minimum=1))
    control_plane: StatusControlPlane = wire(Nested(StatusControlPlane))
    #: Elsewhere than on the control plane, as the last heartbeat answer said.
    lifecycle: NodeLifecycle | None = wire(Nullable(LIFECYCLE))
    standing: Standing = wire(Nested(Standing))
    cert_not_after_ms: int = wire(Int())
    #: -1 when no list is held.
    revocation_serial: int = wire(Int(minimum=-1))
    health: NodeHealth = wire(Nested(NodeHealth))
    #: What it advertises and what discovery sees (absent from an older node).
    addresses: AdvertisePlanView | None = wire(Nullable(Nested(AdvertisePlanView)), omit_none=True)
    discovery: DiscoveryStatusView | None = wire(
        Nullable(Nested(DiscoveryStatusView)), omit_none=True
    )
    #: Where this node serves Prometheus metrics (absent: not serving them).
    metrics_url: str | None = wire(Text(), omit_none=True)
    #: The control-plane leader this node knows (``None``: none known, an election).
    leader: StatusLeader | None = wire(Nullable(Nested(StatusLeader)), default=None)
    #: The voter set this node holds (empty on a node that holds none: not a voter).
    voters: tuple[StatusVoter, ...] = wire(Seq(Nested(StatusVoter)), default=())
    #: Whether the voter set held is settled (its last change stored by a majority of
    #: both sets and marked so); absent where none is held.
    voters_settled: bool | None = wire(Bool(), omit_none=True)
    #: This node's election role (stopped, follower, precandidate, candidate, leader).
    election_role: str | None = wire(
        Choice(("stopped", "follower", "precandidate", "candidate", "leader")), omit_none=True
    )


@message
class SettingsAnswer(Message):
    """``SettingsAnswer``: the settings record this node holds."""

    settings: SettingsView = wire(Nested(SettingsView))
    term: int = wire(Int(minimum=1))


@message
class SettingsChangeRequest(Message):
    """``SettingsChangeRequest``: setting -> new value, each checked by the core's
    settings rule (``unknown_setting``, ``bad_setting``)."""

    changes: Mapping[str, Any] = wire(SettingsValuesCodec(complete=False))


@message
class PushMiss(Message):
    """A node that did not confirm a pushed settings record."""

    node_id: str = wire(Text())
    name: str = wire(Text())
    #: An error code, ``no_answer`` or ``not_installed``.
    reason: str = wire(Text())
    detail: str = wire(Text())


@message
class PushReport(Message):
    serial: int = wire(Int(minimum=0))
    #: Node ids.
    confirmed: tuple[str, ...] = wire(Seq(Text()))
    unconfirmed: tuple[PushMiss, ...] = wire(Seq(Nested(PushMiss)))


@message
class SettingsSetAnswer(Message):
    settings: SettingsView = wire(Nested(SettingsView))
    term: int = wire(Int(minimum=1))
    push: PushReport = wire(Nested(PushReport))
    #: False when every value was already as asked: no new record, nothing pushed.
    changed: bool = wire(Bool(), default=True)


@message
class SettingsPushRequest(Message):
    #: The signed settings record text.
    record: str = wire(Text(min_len=1))


@message
class SettingsPushAnswer(Message):
    settings_serial: int = wire(Int(minimum=0))
    #: False when this node already held this serial or a newer one.
    installed: bool = wire(Bool())


@message
class GpusAnswer(Message):
    nodes: tuple[NodeGpus, ...] = wire(Seq(Nested(NodeGpus)))


@message
class GpuResumeAnswer(Message):
    node_id: str = wire(Text(min_len=1))
    uuid: str = wire(Text(min_len=1))
    quarantined: Literal[False] = wire(Const(False))


__all__ = [
    "GpuResumeAnswer",
    "GpusAnswer",
    "HealthAnswer",
    "PushMiss",
    "PushReport",
    "SettingsAnswer",
    "SettingsChangeRequest",
    "SettingsPushAnswer",
    "SettingsPushRequest",
    "SettingsSetAnswer",
    "StatusAnswer",
    "StatusControlPlane",
    "StatusNode",
]
