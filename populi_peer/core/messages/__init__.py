"""Typed wire bodies: one small frozen type per request and answer body of every route
the agent serves and calls, parsed once at the edge (STYLE 13).

``Message.from_json(data)`` checks a body once (types, ranges, ids; the core's own
records through their own parsers), ignores unknown fields (version N talks to N-1) and
raises :class:`~populi_peer.errors.BadRequest` with one line naming the field;
``to_json()`` writes it back. The API app parses a route's declared request body into its
type before the handler runs, and the peer client parses a declared answer type, turning
a malformed answer into ``PeerError(code="bad_peer_answer")`` (``populi_peer.api``).

:data:`OPERATIONS` is the catalogue: for each operation of
``contracts/populi/control-plane.openapi.yaml`` (by ``operationId``, the route's name), the
type of its request body (``None``: it takes none, or ignores it) and of its answer. Tests
check that the catalogue covers the contract's operations, that what each type writes
validates against the contract's schema, and that a route declaring types declares these.

Domains: :mod:`.records` (shared records), :mod:`.heartbeat`, :mod:`.membership` (join,
tokens, certificates, retirement, membership views, node lifecycle, events, leave),
:mod:`.inbox`, :mod:`.leases`, :mod:`.tasks`, :mod:`.status` (health, status, settings,
GPU views), :mod:`.gossip` (hint gossip, held hints); :mod:`._codec` is how fields are
declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from populi_peer.core.messages._codec import Message
from populi_peer.core.messages.election import (
    ClusterKeyAnswer,
    ClusterKeyRequest,
    ElectionExchange,
    ElectionPost,
    VoterChangeAnswer,
    VoterChangeRequest,
)
from populi_peer.core.messages.gossip import (
    GossipDigest,
    GossipPush,
    GossipPushAnswer,
    GossipRefusal,
    GossipReply,
    HintsAnswer,
    NodeHint,
)
from populi_peer.core.messages.heartbeat import (
    GpuHeartbeatSummary,
    HeartbeatAnswer,
    HeartbeatReport,
    HeldLease,
)
from populi_peer.core.messages.inbox import (
    AckMessage,
    CancelAnswer,
    CancelMessage,
    HandoffAnswer,
    HandoffMessage,
    InboxDeliverAnswer,
    InboxMessage,
    InboxReadAnswer,
    InboxRecord,
    Payload,
    ResultAnswer,
    ResultMessage,
)
from populi_peer.core.messages.leases import (
    LeaseAnswer,
    LeaseFallbackAnswer,
    LeaseFallbackRequest,
    LeaseGrantRequest,
    LeaseListAnswer,
    LeaseReleaseRequest,
    LeaseReplayAnswer,
    LeaseRevokeRequest,
    RenewRequest,
)
from populi_peer.core.messages.membership import (
    CertRenewAnswer,
    EventsAnswer,
    JoinCaAnswer,
    JoinChallengeAnswer,
    JoinEnrollAnswer,
    JoinEnrollRequest,
    LeaveAnswer,
    LifecycleCommandAnswer,
    LifecycleCommandRequest,
    MembersAnswer,
    NameUnretireAnswer,
    NodeDeleteAnswer,
    NodeRetireAnswer,
    NodesAnswer,
    ReasonRequest,
    RevocationsAnswer,
    TokenCreateAnswer,
    TokenCreateRequest,
    TokenListAnswer,
    TokenRevokeAnswer,
)
from populi_peer.core.messages.records import (
    EVENT_KINDS,
    AttemptResult,
    ClusterRef,
    ControlPlaneRef,
    EventKind,
    EventView,
    GpuDevice,
    GpuSummaryView,
    HealthProblem,
    LeaseView,
    MemberView,
    NodeGpus,
    NodeHealth,
    NodeView,
    OutputChunk,
    SettingsView,
    Standing,
    TaskLeaseGrant,
    TaskView,
    TaskWaiting,
    TokenSummary,
)
from populi_peer.core.messages.status import (
    AdvertisePlanView,
    DiscoveryStatusView,
    GpuResumeAnswer,
    GpusAnswer,
    HealthAnswer,
    PushMiss,
    PushReport,
    SettingsAnswer,
    SettingsChangeRequest,
    SettingsPushAnswer,
    SettingsPushRequest,
    SettingsSetAnswer,
    SightingView,
    StatusAnswer,
    StatusControlPlane,
    StatusLeader,
    StatusNode,
    StatusVoter,
)
from populi_peer.core.messages.tasks import (
    OutputChunkAnswer,
    TaskAnswer,
    TaskCancelAnswer,
    TaskListAnswer,
    TaskOutputAnswer,
    TaskSubmitRequest,
)


@dataclass(frozen=True, slots=True)
class Exchange:
    """The body types of one operation: ``request`` is ``None`` where the route reads no
    body (GET, or a POST whose body the contract calls "Ignored")."""

    request: type[Message] | None
    answer: type[Message]


_E = Exchange

#: operationId (the route's name) -> its body types. Ordered as the contract.
OPERATIONS: Final[Mapping[str, Exchange]] = {
    "join_ca": _E(None, JoinCaAnswer),
    "join_challenge": _E(None, JoinChallengeAnswer),
    "join_enroll": _E(JoinEnrollRequest, JoinEnrollAnswer),
    "token_create": _E(TokenCreateRequest, TokenCreateAnswer),
    "token_list": _E(None, TokenListAnswer),
    "token_revoke": _E(None, TokenRevokeAnswer),
    "cert_renew": _E(None, CertRenewAnswer),
    "node_retire": _E(ReasonRequest, NodeRetireAnswer),
    "node_delete": _E(ReasonRequest, NodeDeleteAnswer),
    "name_unretire": _E(None, NameUnretireAnswer),
    "revocations": _E(None, RevocationsAnswer),
    "members": _E(None, MembersAnswer),
    "heartbeat": _E(HeartbeatReport, HeartbeatAnswer),
    "node_lifecycle": _E(LifecycleCommandRequest, LifecycleCommandAnswer),
    "nodes": _E(None, NodesAnswer),
    "events": _E(None, EventsAnswer),
    "leave": _E(ReasonRequest, LeaveAnswer),
    "inbox_deliver": _E(InboxMessage, InboxDeliverAnswer),
    "inbox_read": _E(None, InboxReadAnswer),
    "lease_grant": _E(LeaseGrantRequest, LeaseReplayAnswer),
    "lease_list": _E(None, LeaseListAnswer),
    "lease_get": _E(None, LeaseAnswer),
    "lease_renew": _E(RenewRequest, LeaseAnswer),
    "lease_release": _E(LeaseReleaseRequest, LeaseReplayAnswer),
    "lease_fallback": _E(LeaseFallbackRequest, LeaseFallbackAnswer),
    "lease_revoke": _E(LeaseRevokeRequest, LeaseReplayAnswer),
    "attempt_output": _E(None, OutputChunkAnswer),
    "task_submit": _E(TaskSubmitRequest, TaskAnswer),
    "task_list": _E(None, TaskListAnswer),
    "task_show": _E(None, TaskAnswer),
    "task_cancel": _E(None, TaskCancelAnswer),
    "task_output": _E(None, TaskOutputAnswer),
    "gpus": _E(None, GpusAnswer),
    "gpu_resume": _E(ReasonRequest, GpuResumeAnswer),
    "health": _E(None, HealthAnswer),
    "status": _E(None, StatusAnswer),
    "settings_show": _E(None, SettingsAnswer),
    "settings_set": _E(SettingsChangeRequest, SettingsSetAnswer),
    "settings_push": _E(SettingsPushRequest, SettingsPushAnswer),
    "gossip_digest": _E(GossipDigest, GossipReply),
    "gossip_push": _E(GossipPush, GossipPushAnswer),
    "hints": _E(None, HintsAnswer),
    "election": _E(ElectionPost, ElectionExchange),
    "voter_change": _E(VoterChangeRequest, VoterChangeAnswer),
    "cluster_key": _E(ClusterKeyRequest, ClusterKeyAnswer),
}

__all__ = [
    "EVENT_KINDS",
    "OPERATIONS",
    "AckMessage",
    "AdvertisePlanView",
    "AttemptResult",
    "CancelAnswer",
    "CancelMessage",
    "CertRenewAnswer",
    "ClusterKeyAnswer",
    "ClusterKeyRequest",
    "ClusterRef",
    "ControlPlaneRef",
    "DiscoveryStatusView",
    "ElectionExchange",
    "ElectionPost",
    "EventKind",
    "EventView",
    "EventsAnswer",
    "Exchange",
    "GossipDigest",
    "GossipPush",
    "GossipPushAnswer",
    "GossipRefusal",
    "GossipReply",
    "GpuDevice",
    "GpuHeartbeatSummary",
    "GpuResumeAnswer",
    "GpuSummaryView",
    "GpusAnswer",
    "HandoffAnswer",
    "HandoffMessage",
    "HealthAnswer",
    "HealthProblem",
    "HeartbeatAnswer",
    "HeartbeatReport",
    "HeldLease",
    "HintsAnswer",
    "InboxDeliverAnswer",
    "InboxMessage",
    "InboxReadAnswer",
    "InboxRecord",
    "JoinCaAnswer",
    "JoinChallengeAnswer",
    "JoinEnrollAnswer",
    "JoinEnrollRequest",
    "LeaseAnswer",
    "LeaseFallbackAnswer",
    "LeaseFallbackRequest",
    "LeaseGrantRequest",
    "LeaseListAnswer",
    "LeaseReleaseRequest",
    "LeaseReplayAnswer",
    "LeaseRevokeRequest",
    "LeaseView",
    "LeaveAnswer",
    "LifecycleCommandAnswer",
    "LifecycleCommandRequest",
    "MemberView",
    "MembersAnswer",
    "Message",
    "NameUnretireAnswer",
    "NodeDeleteAnswer",
    "NodeGpus",
    "NodeHealth",
    "NodeHint",
    "NodeRetireAnswer",
    "NodeView",
    "NodesAnswer",
    "OutputChunk",
    "OutputChunkAnswer",
    "Payload",
    "PushMiss",
    "PushReport",
    "ReasonRequest",
    "RenewRequest",
    "ResultAnswer",
    "ResultMessage",
    "RevocationsAnswer",
    "SettingsAnswer",
    "SettingsChangeRequest",
    "SettingsPushAnswer",
    "SettingsPushRequest",
    "SettingsSetAnswer",
    "SettingsView",
    "SightingView",
    "Standing",
    "StatusAnswer",
    "StatusControlPlane",
    "StatusLeader",
    "StatusNode",
    "StatusVoter",
    "TaskAnswer",
    "TaskCancelAnswer",
    "TaskLeaseGrant",
    "TaskListAnswer",
    "TaskOutputAnswer",
    "TaskSubmitRequest",
    "TaskView",
    "TaskWaiting",
    "TokenCreateAnswer",
    "TokenCreateRequest",
    "TokenListAnswer",
    "TokenRevokeAnswer",
    "TokenSummary",
    "VoterChangeAnswer",
    "VoterChangeRequest",
]
