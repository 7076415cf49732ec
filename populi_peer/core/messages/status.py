"""What a node says about itself (health, status), cluster settings (show, set, push) and
the control plane's GPU views (``agent/agent.py``, ``agent/settings_sync.py``,
``agent/gpu.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages._codec import (
    Bool,
    Const,
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
