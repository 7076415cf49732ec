"""Records that several answers carry: members, node views, tokens, events, lease views,
task views, GPU views, settings, health and standing (the contract's shared components).

Each mirrors one schema of ``contracts/populi/control-plane.openapi.yaml`` (named in its
docstring); ``tests/core/test_messages_contract.py`` checks that what :meth:`to_json`
writes validates against it, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from populi_peer.core.eligibility import REASON_ORDER
from populi_peer.core.fencing import FencingToken
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import LEASE_KINDS, Lease, LeaseKind
from populi_peer.core.lifecycle import STATES, NodeLifecycle
from populi_peer.core.membership import Member
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Codec,
    Core,
    Dict,
    Int,
    JsonObject,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    at_field,
    bad_field,
    message,
    wire,
)
from populi_peer.core.policy import WORK_CLASSES, WorkClass, check_work_class
from populi_peer.core.registers import RegisterWrite
from populi_peer.core.scope import SCOPES, Scope
from populi_peer.core.settings import ELECTION_KEYS, ELECTION_OMITTED, SETTINGS, validate_value
from populi_peer.core.tasks import TASK_STATES, Attempt, ReasonEntry, Task, TaskOptions, TaskState
from populi_peer.errors import PopuliError

Role = Literal["operator", "submit", "worker", "voter"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)

# -- codecs of core records (one parser each: the record's own) --------------------------

TOKEN: Final[Codec[FencingToken]] = Core(FencingToken.parse, str)
LIFECYCLE: Final[Codec[NodeLifecycle]] = Core(NodeLifecycle.from_json, NodeLifecycle.to_json)
REGISTER_WRITE: Final[Codec[RegisterWrite]] = Core(RegisterWrite.from_json, RegisterWrite.to_json)
LEASE: Final[Codec[Lease]] = Core(Lease.from_json, Lease.to_json)
ATTEMPT: Final[Codec[Attempt]] = Core(Attempt.from_json, Attempt.to_json)
REASON_ENTRY: Final[Codec[ReasonEntry]] = Core(ReasonEntry.from_json, ReasonEntry.to_json)
TASK_OPTIONS: Final[Codec[TaskOptions]] = Core(TaskOptions.from_json, TaskOptions.to_json)
SCOPE: Final[Codec[Scope]] = Choice(SCOPES)
ROLE_LIST: Final[Codec[tuple[Role, ...]]] = Seq(Choice(ROLES))
#: ``host:port`` as a node advertises it (the syntax itself is the shell's config rule).
ADDRESSES: Final[Codec[tuple[str, ...]]] = Seq(Text(min_len=1, max_len=261), max_items=8)
#: An operator's reason: one line of at most 200 characters (``OperatorReason``).
MAX_REASON_CHARS: Final = 200
REASON: Final[Codec[str | None]] = Nullable(Text(max_len=MAX_REASON_CHARS, one_line=True))


class WorkClassCodec(Codec[WorkClass]):
    """A work class: a string (``bad_request`` otherwise) that the policy knows
    (:func:`populi_peer.core.policy.check_work_class`: ``unknown_work_class``)."""

    def parse(self, value: object, path: str) -> WorkClass:
        if not isinstance(value, str):
            raise bad_field(path, "a work class (" + ", ".join(WORK_CLASSES) + ")", value)
        try:
            return check_work_class(value)
        except PopuliError as exc:
            raise at_field(exc, path) from None


WORK_CLASS: Final[Codec[WorkClass]] = WorkClassCodec()


class SettingsValuesCodec(Codec[Mapping[str, Any]]):
    """Cluster settings, each checked by the core's own rule
    (:func:`populi_peer.core.settings.validate_value`: ``bad_setting``).

    ``complete`` (an answer's ``values``): every setting this node knows must be there;
    settings it does not know are ignored (a newer control plane may have more). Otherwise
    (a change): at least one setting, each one known (``unknown_setting``)."""

    def __init__(self, *, complete: bool) -> None:
        self.complete = complete

    def parse(self, value: object, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping) or (not self.complete and not value):
            raise bad_field(path, "an object of setting -> value", value)
        known = {spec.key for spec in SETTINGS}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if self.complete and key not in known:
                continue
            try:
                out[key] = validate_value(key, item)
            except PopuliError as exc:
                raise at_field(exc, f"{path}.{key}") from None
        missing = [key for key in known if key not in out and key not in ELECTION_KEYS]
        if self.complete and missing:
            raise bad_field(f"{path}.{sorted(missing)[0]}", "a setting's value", None)
        if self.complete:
            # An older node's answer lacks the election timings: what a record that
            # leaves them out means (ADR 0016's values, not today's defaults: ADR 0019).
            out = {**ELECTION_OMITTED, **out}
        return MappingProxyType(out)

    def dump(self, value: Mapping[str, Any]) -> Any:
        return {key: list(item) if isinstance(item, tuple) else item for key, item in value.items()}


# -- small references ---------------------------------------------------------------------


@message
class ClusterRef(Message):
    """``ClusterRef``."""

    id: str = wire(Text())
    name: str = wire(Text())


@message
class ControlPlaneRef(Message):
    """``ControlPlaneRef``: the node that holds the role, where it answers, and (in a
    heartbeat answer) every address it advertises, to try when that URL does not answer."""

    node_id: str = wire(Text(min_len=1))
    url: str = wire(Text(min_len=1))
    #: Its advertised ``host:port`` addresses, its preference first; empty: not said.
    addresses: tuple[str, ...] = wire(ADDRESSES, default=())


# -- membership ---------------------------------------------------------------------------


@message
class MemberView(Message):
    """``Member``: one principal of the membership table."""

    id: str = wire(Text(min_len=1))
    kind: Literal["node", "operator"] = wire(Choice(("node", "operator")))
    name: str = wire(Text())
    public_key: str = wire(Text())
    roles: tuple[Role, ...] = wire(ROLE_LIST)
    addresses: tuple[str, ...] = wire(Seq(Text()))
    cert_serial: str = wire(Text())
    cert_not_after_ms: int = wire(Int(minimum=0))
    joined_ms: int = wire(Int())
    updated_ms: int = wire(Int())

    @classmethod
    def of(cls, member: Member) -> MemberView:
        """The view of a membership record (its join token id stays home)."""
        kind: Literal["node", "operator"] = "node" if member.kind == "node" else "operator"
        return cls(
            id=member.id,
            kind=kind,
            name=member.name,
            public_key=member.public_key,
            roles=tuple(r for r in member.roles if r in ROLES),
            addresses=member.addresses,
            cert_serial=member.cert_serial,
            cert_not_after_ms=member.cert_not_after_ms,
            joined_ms=member.joined_ms,
            updated_ms=member.updated_ms,
        )

    def member(self) -> Member:
        """The membership record this view shows (no join token id: only the control
        plane keeps it)."""
        return Member(
            id=self.id,
            kind=self.kind,
            name=self.name,
            public_key=self.public_key,
            roles=self.roles,
            addresses=self.addresses,
            cert_serial=self.cert_serial,
            cert_not_after_ms=self.cert_not_after_ms,
            joined_ms=self.joined_ms,
            token_id="",
            updated_ms=self.updated_ms,
        )


@message
class TokenSummary(Message):
    """``TokenSummary``: a join token as stored (never its secret)."""

    token_id: str = wire(Text(min_len=1))
    state: Literal["active", "used", "expired", "revoked"] = wire(
        Choice(("active", "used", "expired", "revoked"))
    )
    roles: tuple[Role, ...] = wire(ROLE_LIST)
    name: str | None = wire(Nullable(Text()))
    uses_total: int = wire(Int(minimum=1))
    uses_left: int = wire(Int(minimum=0))
    used_by: tuple[str, ...] = wire(Seq(Text()))
    not_before_ms: int = wire(Int())
    expires_ms: int = wire(Int())
    created_ms: int = wire(Int())
    created_by: str = wire(Text())
    revoked_ms: int | None = wire(Nullable(Int()))


#: What the event log records (``populi events --kind``). The wire keeps ``kind`` a plain
#: string, so that a newer node's kinds still read; a filter must name one of these.
EventKind = Literal[
    "cluster_created",
    "node_joined",
    "token_created",
    "token_revoked",
    "certificate_renewed",
    "lifecycle",
    "register",
    "left",
    "node_deleted",
    "name_unretired",
    "settings_changed",
    "gpu_quarantined",
    "gpu_resumed",
    "lease_revoked",
    "election",
    "voters_changed",
]
EVENT_KINDS: Final[tuple[EventKind, ...]] = get_args(EventKind)


@message
class EventView(Message):
    """``Event``: one entry of a node's event log, with the names of the node it is about
    and of who caused it where this node knows them (``None`` otherwise: a deleted node,
    a join token)."""

    seq: int = wire(Int(minimum=1))
    at_ms: int = wire(Int())
    node_id: str = wire(Text())
    kind: str = wire(Text(min_len=1))
    actor: str = wire(Text())
    reason: str = wire(Text())
    detail: Mapping[str, Any] = wire(JsonObject())
    node_name: str | None = wire(Nullable(Text()), default=None)
    actor_name: str | None = wire(Nullable(Text()), default=None)


# -- nodes --------------------------------------------------------------------------------


@message
class GpuSummaryView(Message):
    """``GpuSummaryView``: one node's GPUs in a line."""

    facts_version: str | None = wire(Nullable(Text()))
    backend: str | None = wire(Nullable(Text()))
    count: int = wire(Int(minimum=0))
    allocatable: int = wire(Int(minimum=0))
    quarantined: int = wire(Int(minimum=0))
    healthy: int = wire(Int(minimum=0))
    degraded: int = wire(Int(minimum=0))
    unhealthy: int = wire(Int(minimum=0))
    unknown: int = wire(Int(minimum=0))


NodeStatus = Literal["running", "leaving"]
ResultRole = Literal["worker", "local"]
NodeRoleWord = Literal["control-plane", "worker", "operator", "submit", "voter", "-"]
NodeState = Literal[
    "active", "cordoned", "draining", "maintenance", "quarantined", "retired", "left", "unknown"
]
NODE_STATES: Final[tuple[NodeState, ...]] = (*STATES, "unknown")


@message
class NodeView(Message):
    """``NodeView``: a node as the control plane lists it."""

    id: str = wire(Text(min_len=1))
    name: str = wire(Text())
    address: str | None = wire(Nullable(Text()))
    addresses: tuple[str, ...] = wire(Seq(Text()))
    role: NodeRoleWord = wire(Choice(get_args(NodeRoleWord)))
    roles: tuple[Role, ...] = wire(ROLE_LIST)
    control_plane: bool = wire(Bool())
    lifecycle: NodeLifecycle | None = wire(Nullable(LIFECYCLE))
    state: NodeState = wire(Choice(NODE_STATES))
    heartbeat_age_ms: int | None = wire(Nullable(Int(minimum=0)))
    heartbeat_stale: bool = wire(Bool())
    stale_after_ms: int = wire(Int(minimum=0))
    scope: Scope | None = wire(Nullable(SCOPE))
    status: NodeStatus | None = wire(Nullable(Choice(get_args(NodeStatus))))
    #: What the node's last heartbeat said (``exec_remote``); null before one.
    accepts_remote_work: bool | None = wire(Nullable(Bool()), default=None)
    gpu_summary: GpuSummaryView | None = wire(Nullable(Nested(GpuSummaryView)))
    cert_not_after_ms: int | None = wire(Nullable(Int()))
    joined_ms: int = wire(Int())
    eligible: bool = wire(Bool())
    ineligible_reasons: tuple[str, ...] = wire(Seq(Choice(REASON_ORDER)))


# -- leases -------------------------------------------------------------------------------

LeaseFlag = Literal["ok", "stale", "quarantined"]


@message
class LeaseView(Message):
    """``Lease``: a :class:`~populi_peer.core.leases.Lease` (the core's record, its fields
    beside these) with what only the control plane's clock says."""

    lease: Lease = wire(LEASE, flatten=True)
    #: Seconds left on the control plane's clock while holding (negative once past due);
    #: null otherwise and for fences.
    expires_in_s: float | None = wire(Nullable(Num()))
    #: What the last reconcile pass found about the holder.
    flag: LeaseFlag | None = wire(Nullable(Choice(get_args(LeaseFlag))))


# -- tasks and attempts -------------------------------------------------------------------


@message
class OutputChunk(Message):
    """``OutputChunk``: a piece of an attempt's stdout or stderr."""

    data_b64: str = wire(Text(pattern=r"[A-Za-z0-9+/]*={0,2}", what="base64 text"))
    next_offset: int = wire(Int(minimum=0))
    total: int = wire(Int(minimum=0))
    done: bool = wire(Bool())


@message
class AttemptResult(Message):
    """``AttemptResult``: what a finished attempt reports. ``token`` is parsed once here:
    compare it as a :class:`~populi_peer.core.fencing.FencingToken`, never as text."""

    task_id: str = wire(Text(min_len=1))
    attempt: int = wire(Int(minimum=1))
    node: str = wire(Text(min_len=1))
    token: FencingToken | None = wire(TOKEN, omit_none=True)
    lease_id: str | None = wire(Nullable(Text()), default=None)
    role: ResultRole | None = wire(Choice(get_args(ResultRole)), omit_none=True)
    outcome: str | None = wire(Text(), omit_none=True)
    exit_code: int | None = wire(Nullable(Int()), default=None)
    signal: int | None = wire(Nullable(Int()), default=None)
    stop_reason: str | None = wire(Nullable(Text()), default=None)
    detail: str | None = wire(Text(), omit_none=True)
    gpus: tuple[str, ...] = wire(Seq(Text()), default=())
    started_wall_ms: int | None = wire(Int(), omit_none=True)
    stopped_wall_ms: int | None = wire(Int(), omit_none=True)
    stdout_total: int | None = wire(Int(minimum=0), omit_none=True)
    stderr_total: int | None = wire(Int(minimum=0), omit_none=True)


@message
class TaskLeaseGrant(Message):
    """What a task was granted under one lease (``TaskView.leases`` values)."""

    gpus: tuple[str, ...] = wire(Seq(Text()), default=())
    ttl_s: float | None = wire(Num(minimum=0), omit_none=True)
    kind: LeaseKind | None = wire(Choice(LEASE_KINDS), omit_none=True)
    #: The lease's attempt number (the request's number, which a local attempt's own
    #: number may differ from): what the node reports the lease with (ADR 0015).
    attempt: int | None = wire(Int(minimum=1), omit_none=True)


#: What answers show in place of an environment value (a task's secrets stay home).
REDACTED: Final = "…"


class EnvNames(Codec[tuple[str, ...]]):
    """``TaskView.env``: the names, sorted, each paired with ``…`` on the wire."""

    def parse(self, value: object, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise bad_field(path, f'a list of [name, "{REDACTED}"] pairs', value)
        names = []
        for index, pair in enumerate(value):
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not pair[0]
                or pair[1] != REDACTED
            ):
                raise bad_field(f"{path}[{index}]", f'a [name, "{REDACTED}"] pair', pair)
            names.append(pair[0])
        return tuple(names)

    def dump(self, value: tuple[str, ...]) -> Any:
        return [[name, REDACTED] for name in value]


@message
class TaskWaiting(Message):
    """``TaskWaiting``: what a task waits for now (memory of its driver, not persisted):
    ``reason`` a stable code — ``control_plane_unreachable``, ``node_not_reported``,
    ``previous_node_not_reported``, ``previous_authority_live``, ``no_free_gpu``, or the
    control plane's own refusal reason — and ``until_wall_ms`` when the wait has a known
    end (the control plane's ``details.wait_s``; null otherwise)."""

    reason: str = wire(Text(min_len=1, max_len=128))
    until_wall_ms: int | None = wire(Nullable(Int(minimum=0)))
    since_wall_ms: int = wire(Int(minimum=0))


@message
class TaskView(Message):
    """``TaskView``: a task as its submitter holds it; environment names only."""

    task_id: str = wire(Text(min_len=1))
    command: tuple[str, ...] = wire(Seq(Text(), min_items=1))
    env: tuple[str, ...] = wire(EnvNames())
    gpus_wanted: int = wire(Int(minimum=0))
    work_class: WorkClass = wire(WORK_CLASS)
    state: TaskState = wire(Choice(TASK_STATES))
    attempts: tuple[Attempt, ...] = wire(Seq(ATTEMPT))
    reasons: tuple[ReasonEntry, ...] = wire(Seq(REASON_ENTRY))
    created_wall_ms: int = wire(Int())
    finished_wall_ms: int | None = wire(Nullable(Int()))
    exit_code: int | None = wire(Nullable(Int()))
    signal: int | None = wire(Nullable(Int()))
    terminal_reason: str | None = wire(Nullable(Text()))
    options: TaskOptions = wire(TASK_OPTIONS)
    #: attempt number (as text) -> its result, without the output tails.
    results: Mapping[str, AttemptResult] = wire(Dict(Nested(AttemptResult)))
    #: What ``populi run`` exits with; null until the task is finished.
    exit_status: int | None = wire(Nullable(Int()))
    #: lease id -> what the task was granted.
    leases: Mapping[str, TaskLeaseGrant] = wire(Dict(Nested(TaskLeaseGrant)))
    #: A driver is working on the task in this process.
    active: bool = wire(Bool())
    #: What the task waits for now, if it waits (``populi run`` says it on a terminal).
    waiting: TaskWaiting | None = wire(Nullable(Nested(TaskWaiting)), default=None)

    @classmethod
    def of(
        cls,
        task: Task,
        *,
        results: Mapping[str, AttemptResult],
        leases: Mapping[str, TaskLeaseGrant],
        exit_status: int | None,
        active: bool,
        waiting: TaskWaiting | None = None,
    ) -> TaskView:
        """The view of the core's :class:`~populi_peer.core.tasks.Task` record."""
        return cls(
            task_id=task.task_id,
            command=task.command,
            env=tuple(name for name, _ in task.env),
            gpus_wanted=task.gpus_wanted,
            work_class=task.work_class,
            state=task.state,
            attempts=task.attempts,
            reasons=task.reasons,
            created_wall_ms=task.created_wall_ms,
            finished_wall_ms=task.finished_wall_ms,
            exit_code=task.exit_code,
            signal=task.signal,
            terminal_reason=task.terminal_reason,
            options=task.options,
            results=results,
            exit_status=exit_status,
            leases=leases,
            active=active,
            waiting=waiting,
        )


# -- GPUs ---------------------------------------------------------------------------------

GpuHealth = Literal["healthy", "degraded", "unknown", "unhealthy"]


@message
class GpuDevice(Message):
    """``GpuDevice``: one GPU as the control plane holds it."""

    index: int | None = wire(Nullable(Int()))
    uuid: str | None = wire(Nullable(Text()))
    name: str | None = wire(Nullable(Text()))
    memory_total_bytes: int | None = wire(Nullable(Int()))
    memory_free_bytes: int | None = wire(Nullable(Int()))
    utilization_gpu_pct: float | None = wire(Nullable(Num()))
    health: GpuHealth = wire(Choice(get_args(GpuHealth)))
    health_reasons: tuple[str, ...] = wire(Seq(Text()))
    allocatable: bool = wire(Bool())
    allocation_reasons: tuple[str, ...] = wire(Seq(Text()))
    quarantined: bool = wire(Bool())
    quarantine_reason: str | None = wire(Nullable(Text()))
    verified: bool = wire(Bool())

    @classmethod
    def of(cls, gpu: GpuHint) -> GpuDevice:
        """The view of a GPU a node's hint carries (:meth:`hint` reads it back). A hint
        says only that a GPU is quarantined (an allocation reason), never why."""
        return cls(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            memory_total_bytes=gpu.memory_total_bytes,
            memory_free_bytes=gpu.memory_free_bytes,
            utilization_gpu_pct=gpu.utilization_gpu_pct,
            health=gpu.health,
            health_reasons=gpu.health_reasons,
            allocatable=gpu.allocatable,
            allocation_reasons=gpu.allocation_reasons,
            quarantined="gpu_quarantined" in gpu.allocation_reasons,
            quarantine_reason=None,
            verified=gpu.verified,
        )

    def hint(self) -> GpuHint:
        """This GPU as placement reads it (:func:`populi_peer.core.placement.gpu_misfits`).
        A pseudo-device (``verified`` false) keeps no name: an advertised model is a
        label, never a fact placement matches (ADR 0004)."""
        util = self.utilization_gpu_pct
        return GpuHint(
            index=self.index or 0,
            uuid=self.uuid,
            name=self.name if self.verified else None,
            memory_total_bytes=self.memory_total_bytes,
            memory_free_bytes=self.memory_free_bytes,
            utilization_gpu_pct=None if util is None else round(util),
            health=self.health,
            health_reasons=self.health_reasons,
            allocatable=self.allocatable,
            allocation_reasons=self.allocation_reasons,
            verified=self.verified,
        )


@message
class NodeGpus(Message):
    """One node's GPUs in ``GpusAnswer``."""

    node_id: str = wire(Text())
    name: str = wire(Text())
    facts_version: str | None = wire(Nullable(Text()))
    backend: str | None = wire(Nullable(Text()))
    cpu_only_reason: str | None = wire(Nullable(Text()))
    heartbeat_stale: bool = wire(Bool())
    devices: tuple[GpuDevice, ...] = wire(Seq(Nested(GpuDevice)))


# -- settings, health, standing -----------------------------------------------------------


@message
class SettingsView(Message):
    """``Settings``: the cluster settings record a node holds (serial 0: none)."""

    serial: int = wire(Int(minimum=0))
    signer: str | None = wire(Nullable(Text()))
    actor: str | None = wire(Nullable(Text()))
    signed_ms: int | None = wire(Nullable(Int()))
    record: str | None = wire(Nullable(Text()))
    values: Mapping[str, Any] = wire(SettingsValuesCodec(complete=True))


@message
class HealthProblem(Message):
    """One part of the agent that keeps the node from being healthy (``NodeHealth``)."""

    component: str = wire(Text(min_len=1))
    code: str = wire(Text())
    message: str = wire(Text())
    since_ms: int = wire(Int())
    last_ms: int = wire(Int())
    failures: int = wire(Int(minimum=1))


@message
class NodeHealth(Message):
    """``NodeHealth``: ok, or degraded with the problems."""

    state: Literal["ok", "degraded"] = wire(Choice(("ok", "degraded")))
    problems: tuple[HealthProblem, ...] = wire(Seq(Nested(HealthProblem)))


StandingState = Literal["member", "retired", "unknown_to_control_plane"]
StandingSource = Literal["revocation_list", "control_plane"]


@message
class Standing(Message):
    """``Standing``: whether this node is still a member, as far as it knows."""

    state: StandingState = wire(Choice(get_args(StandingState)))
    since_ms: int | None = wire(Nullable(Int()))
    by: str | None = wire(Nullable(Text()))
    reason: str | None = wire(Nullable(Text()))
    source: StandingSource | None = wire(Nullable(Choice(get_args(StandingSource))))
    rejoin: tuple[str, ...] | None = wire(Nullable(Seq(Text())))


__all__ = [
    "ADDRESSES",
    "EVENT_KINDS",
    "LEASE",
    "LIFECYCLE",
    "MAX_REASON_CHARS",
    "REASON",
    "REDACTED",
    "REGISTER_WRITE",
    "ROLES",
    "SCOPE",
    "TOKEN",
    "WORK_CLASS",
    "AttemptResult",
    "ClusterRef",
    "ControlPlaneRef",
    "EventKind",
    "EventView",
    "GpuDevice",
    "GpuSummaryView",
    "HealthProblem",
    "LeaseView",
    "MemberView",
    "NodeGpus",
    "NodeHealth",
    "NodeView",
    "OutputChunk",
    "Role",
    "SettingsValuesCodec",
    "SettingsView",
    "Standing",
    "TaskLeaseGrant",
    "TaskView",
    "TaskWaiting",
    "TokenSummary",
    "WorkClassCodec",
]
