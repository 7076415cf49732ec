"""The submitter's task record and its one transition table (safety rules 1, 4 and 7).

The submitter owns the task: it proposes a placement, asks the control plane for a
lease, hands the task to the worker, and is the only party that may decide to run it
locally instead — and only on the control plane's word that the remote lease is dead.

States::

    queued            submitted, not yet being placed
    placing           choosing a node / waiting for a grant
    running_remote    a worker holds a lease for the current attempt
    fallback_pending  waiting for the control plane's word (it could not be reached, or
                      the handoff failed and the lease may still be live)
    running_local     the current attempt runs here (after a dead lease, or by placement)
    succeeded | failed | cancelled | timed_out      terminal: reached once, never left

Events (:data:`TaskEvent`) are classified into keys (:func:`event_key`), because a few
transitions depend on the record: ``--no-fallback`` turns every way into a local run
(``placed_local``, ``grant_refused``, ``lease_dead_confirmed``) into ``failed``, and a
result counts only for the current attempt's token
(:func:`populi_peer.core.fencing.accept_result`), otherwise it is ``result_stale`` and only recorded. The table
(:data:`TRANSITIONS`) maps ``state -> {key: next state}``; a key a row lacks raises
:class:`IllegalTaskTransition` and the (immutable) record stays as it was. A result that
arrives after the task ended (``result_late``, e.g. a worker retrying delivery) is
acknowledged and changes nothing.

Why there is no way from ``placing`` or ``running_remote`` straight to ``running_local``
past the control plane: a grant request whose answer was lost may have been granted, and
a worker whose handoff failed may have started anyway. Only ``lease_dead_confirmed`` —
which carries the higher token the control plane issued with its confirmation — starts a
local attempt after a remote one; ``control_plane_unreachable`` waits in
``fallback_pending``, never on a local timer.

Every accepted event appends :class:`ReasonEntry` rows (the decision, then one row per
reason code), so a finished task says why it ran where it ran (safety rule 7).

Beside its state, the record keeps the attempt numbers of its lease requests
(:class:`LeaseRequests`, :meth:`Task.request_number`): a request whose answer was lost is
sent again with the same number, so that the control plane answers it as a replay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, get_args

from populi_peer.core.fencing import (
    FencingToken,
    _bool,
    _get,
    _int,
    _obj,
    _opt_float,
    _opt_int,
    _opt_str,
    _str,
    _str_tuple,
    accept_result,
    one_of,
)
from populi_peer.core.leases import WORKER_LEFT
from populi_peer.core.placement import check_gpu_model
from populi_peer.core.policy import WorkClass, check_work_class
from populi_peer.core.wire import check_count, check_cwd, record_json
from populi_peer.errors import BadRequest, Conflict

_S = TypeVar("_S", bound=str)

TaskState = Literal[
    "queued",
    "placing",
    "running_remote",
    "fallback_pending",
    "running_local",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
]
EventKey = Literal[
    "placing_started",
    "placed_remote",
    "placed_local",
    "placed_local_no_fallback",
    "grant_refused",
    "grant_refused_no_fallback",
    "replanned",
    "placement_failed",
    "handoff_failed",
    "control_plane_unreachable",
    "lease_dead_confirmed",
    "lease_dead_confirmed_no_fallback",
    "fallback_refused",
    "lease_lost",
    "result_ok",
    "result_failed",
    "result_stale",
    "result_late",
    "cancel",
    "timeout",
    "populi_failure",
]
Where = Literal["remote", "local"]
#: Per refused node, its rejection codes (``core.placement.Placement.rejected``).
Rejected = tuple[tuple[str, tuple[str, ...]], ...]
AttemptOutcome = Literal[
    "succeeded",
    "failed",
    "lease_dead",
    "lease_lost",
    "cancelled",
    "timed_out",
    "populi_failure",
]

#: What a lease request asks the control plane for: a remote ``grant``, the ``local``
#: token of a first local attempt, or the ``fallback`` word after a remote attempt.
RequestKind = Literal["grant", "local", "fallback"]

#: The reason a worker that leaves the cluster gives for the attempts it stops: their
#: submitters fall back (``lease_lost``), they are not cancelled.

TASK_STATES: Final[tuple[TaskState, ...]] = get_args(TaskState)
REQUEST_KINDS: Final[tuple[RequestKind, ...]] = get_args(RequestKind)
EVENT_KEYS: Final[tuple[EventKey, ...]] = get_args(EventKey)
ATTEMPT_OUTCOMES: Final[tuple[AttemptOutcome, ...]] = get_args(AttemptOutcome)
TERMINAL_STATES: Final[frozenset[TaskState]] = frozenset(
    {"succeeded", "failed", "cancelled", "timed_out"}
)
#: States in which the current attempt may be running somewhere.
RUNNING_STATES: Final[frozenset[TaskState]] = frozenset(
    {"running_remote", "fallback_pending", "running_local"}
)


def _pick(value: str, choices: tuple[_S, ...], name: str) -> _S:
    choice = one_of(value, choices)
    if choice is None:
        raise BadRequest(
            f"{name} {value!r} is not one of {', '.join(choices)}", code="bad_record", field=name
        )
    return choice


def _row(**moves: TaskState) -> Mapping[EventKey, TaskState]:
    row: dict[EventKey, TaskState] = {}
    for key, target in moves.items():
        row[_pick(key, EVENT_KEYS, "event key")] = _pick(target, TASK_STATES, "state")
    return MappingProxyType(row)


def _live_row(state: TaskState, **moves: TaskState) -> Mapping[EventKey, TaskState]:
    """The row of live ``state``: its own ``moves``, and what every live state takes
    alike: a stale result changes nothing, a cancel or a timeout ends the task (nothing is
    stuck forever)."""
    return _row(**moves, result_stale=state, cancel="cancelled", timeout="timed_out")


# The one transition table. A key missing from a state's row is illegal there.
TRANSITIONS: Final[Mapping[TaskState, Mapping[EventKey, TaskState]]] = MappingProxyType(
    {
        "queued": _live_row(
            "queued",
            placing_started="placing",
            placement_failed="failed",
            populi_failure="failed",
        ),
        "placing": _live_row(
            "placing",
            placed_remote="running_remote",
            placed_local="running_local",
            placed_local_no_fallback="failed",
            grant_refused="placing",
            grant_refused_no_fallback="failed",
            # A queued task re-placed because capacity changed (never a running one).
            replanned="placing",
            placement_failed="failed",
            # A grant request went unanswered: it may have been granted. Wait for the
            # control plane's word (a fence for the local run, or the lease to die).
            control_plane_unreachable="fallback_pending",
            populi_failure="failed",
        ),
        "running_remote": _live_row(
            "running_remote",
            result_ok="succeeded",
            result_failed="failed",
            # The worker may have started it anyway: only the lease's death frees it.
            handoff_failed="fallback_pending",
            control_plane_unreachable="fallback_pending",
            lease_dead_confirmed="running_local",
            lease_dead_confirmed_no_fallback="failed",
            fallback_refused="running_remote",
            # The worker says it could not renew and stopped the task.
            lease_lost="fallback_pending",
        ),
        "fallback_pending": _live_row(
            "fallback_pending",
            lease_dead_confirmed="running_local",
            lease_dead_confirmed_no_fallback="failed",
            # lease_live: keep waiting; task_completed: the worker's result is on its way.
            fallback_refused="fallback_pending",
            control_plane_unreachable="fallback_pending",
            handoff_failed="fallback_pending",
            # The remote attempt may still finish and deliver: its token is still current.
            result_ok="succeeded",
            result_failed="failed",
            populi_failure="failed",
        ),
        "running_local": _live_row(
            "running_local",
            result_ok="succeeded",
            result_failed="failed",
            # Our own local lease could not be renewed: the supervisor stopped the task
            # before its deadline, like any holder's (safety rule 3). Wait for the word.
            lease_lost="fallback_pending",
            populi_failure="failed",
        ),
        "succeeded": _row(result_late="succeeded"),
        "failed": _row(result_late="failed"),
        "cancelled": _row(result_late="cancelled"),
        "timed_out": _row(result_late="timed_out"),
    }
)


class IllegalTaskTransition(Conflict):
    """An event the task's state does not allow; the record is unchanged."""

    code = "illegal_task_transition"

    def __init__(self, task_id: str, state: TaskState, key: str, why: str = "") -> None:
        allowed = sorted(TRANSITIONS[state])
        super().__init__(
            f"task {task_id} is {state}: {key} is not allowed"
            + (f" ({why})" if why else "")
            + f"; allowed: {', '.join(allowed)}",
            task_id=task_id,
            state=state,
            event=key,
        )


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacementStarted:
    pass


@dataclass(frozen=True, slots=True)
class PlacedRemote:
    """The control plane granted a lease on ``node``; the handoff comes next."""

    node: str
    lease_id: str
    token: FencingToken
    reasons: tuple[str, ...] = ()
    #: Why each other node was refused (:attr:`Attempt.rejected`).
    rejected: Rejected = ()


@dataclass(frozen=True, slots=True)
class PlacedLocal:
    """Placement chose this node (``remote_disabled``, ``no_remote_candidate``,
    ``policy_blocked``, ``node_ineligible``...); ``lease_id`` / ``token`` when the local
    attempt holds a ``local`` lease on its GPUs."""

    node: str
    reasons: tuple[str, ...]
    lease_id: str | None = None
    token: FencingToken | None = None
    #: Why each remote node was refused (:attr:`Attempt.rejected`).
    rejected: Rejected = ()


@dataclass(frozen=True, slots=True)
class GrantRefused:
    node: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Replanned:
    """A queued task (waiting for a free GPU) is re-placed because the candidates changed:
    ``reason`` is one of :data:`~populi_peer.core.placement.REPLAN_REASONS`; it waited for
    ``waited_for`` and now goes to ``node`` (placed there) or waits for ``waiting_for``."""

    reason: str
    waited_for: str | None = None
    waiting_for: str | None = None
    node: str | None = None

    def detail(self) -> str:
        after = f"node={self.node}" if self.node is not None else f"waiting_for={self.waiting_for}"
        return f"waited_for={self.waited_for} {after}"


@dataclass(frozen=True, slots=True)
class PlacementFailed:
    """No placement is possible (e.g. ``--no-fallback`` and no remote candidate)."""

    reasons: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HandoffFailed:
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ControlPlaneUnreachable:
    detail: str = ""


@dataclass(frozen=True, slots=True)
class LeaseDeadConfirmed:
    """The control plane declared the lease dead and issued the local attempt ``token``
    (higher than every earlier token), with a ``local`` or ``fence`` lease ``lease_id``."""

    node: str
    token: FencingToken
    lease_id: str | None = None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FallbackRefused:
    """The control plane refused to confirm: ``lease_live`` or ``task_completed``."""

    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The current attempt's holder could not renew its lease and stopped the task."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    """An attempt ended. Counted only for the current attempt and token."""

    attempt: int
    token: FencingToken | None
    exit_code: int | None
    signal: int | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    actor: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Timeout:
    which: Literal["queue", "run"]


@dataclass(frozen=True, slots=True)
class PopuliFailure:
    """Populi itself failed the task (e.g. ``spawn_failed``, ``store_error``)."""

    code: str
    detail: str = ""


TaskEvent = (
    PlacementStarted
    | PlacedRemote
    | PlacedLocal
    | GrantRefused
    | Replanned
    | PlacementFailed
    | HandoffFailed
    | ControlPlaneUnreachable
    | LeaseDeadConfirmed
    | FallbackRefused
    | LeaseLost
    | Result
    | Cancel
    | Timeout
    | PopuliFailure
)


# -- records ------------------------------------------------------------------------------


def _check_ms(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(
            f"{name} must be an integer >= 0 (UTC ms), got {value!r}", code="bad_record", field=name
        )


def _check_reason_codes(reasons: object, name: str) -> None:
    if not isinstance(reasons, tuple) or not all(isinstance(r, str) and r for r in reasons):
        raise BadRequest(
            f"{name} must be a tuple of reason codes, got {reasons!r}",
            code="bad_record",
            field=name,
        )


@dataclass(frozen=True, slots=True)
class ReasonEntry:
    """One row of a task's decision log."""

    at_wall_ms: int
    code: str
    detail: str = ""

    def to_json(self) -> list[Any]:
        return [self.at_wall_ms, self.code, self.detail]

    @classmethod
    def from_json(cls, data: object) -> ReasonEntry:
        if (
            not isinstance(data, list)
            or len(data) < 2
            or isinstance(data[0], bool)
            or not isinstance(data[0], int)
            or not isinstance(data[1], str)
            or (len(data) > 2 and not isinstance(data[2], str))
        ):
            raise BadRequest(
                f"reason entry must be [at_wall_ms, code, detail], got {data!r}", code="bad_record"
            )
        return cls(data[0], data[1], data[2] if len(data) > 2 else "")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    no_fallback: bool = False
    queue_timeout_s: float | None = None
    timeout_s: float | None = None
    #: ``--node``: the only node the task may be placed on.
    node: str | None = None
    #: ``--node-fallback``: when ``node`` cannot take it, the task may run on its submitter.
    node_fallback: bool = False
    #: ``--cwd``: the directory the task runs in on whichever node runs it (absolute); by
    #: default a fresh one under that node's data directory.
    cwd: str | None = None
    #: ``--gpu-mem``: free memory each GPU must have, in bytes (placement v2).
    gpu_mem_bytes: int | None = None
    #: ``--gpu-model``: a pattern on the verified GPU name (placement v2).
    gpu_model: str | None = None

    def __post_init__(self) -> None:
        if self.gpu_mem_bytes is not None:
            check_count(self.gpu_mem_bytes, "gpu_mem_bytes", 1)
        if self.gpu_model is not None:
            check_gpu_model(self.gpu_model)
        for name in ("queue_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise BadRequest(
                    f"{name} must be a number > 0, got {value!r}", code="bad_request", field=name
                )
        if self.node is not None and (not isinstance(self.node, str) or not self.node):
            raise BadRequest(
                f"node must be a node id, got {self.node!r}", code="bad_request", field="node"
            )
        check_cwd(self.cwd)

    def allows_local(self, local_node: str) -> bool:
        """May the task run on ``local_node``, its submitter? Not with ``--no-fallback``,
        nor with ``--node`` naming another node unless ``--node-fallback`` says so."""
        if self.no_fallback:
            return False
        return self.node is None or self.node == local_node or self.node_fallback

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)

    @classmethod
    def from_json(cls, data: object) -> TaskOptions:
        what = "task options"
        obj = _obj(data, what)
        return cls(
            no_fallback=_bool(obj, "no_fallback", what, False),
            queue_timeout_s=_opt_float(obj, "queue_timeout_s", what),
            timeout_s=_opt_float(obj, "timeout_s", what),
            node=_opt_str(obj, "node", what),
            node_fallback=_bool(obj, "node_fallback", what, False),
            cwd=_opt_str(obj, "cwd", what),
            gpu_mem_bytes=_opt_int(obj, "gpu_mem_bytes", what),
            gpu_model=_opt_str(obj, "gpu_model", what),
        )


def _check_rejected(value: object) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(row, tuple)
        and len(row) == 2
        and isinstance(row[0], str)
        and row[0]
        and isinstance(row[1], tuple)
        and row[1]
        and all(isinstance(c, str) and c for c in row[1])
        for row in value
    ):
        raise BadRequest(
            "rejected must be (node id, non-empty reason codes) pairs", code="bad_record"
        )


def _rejected_from_json(obj: Mapping[str, Any], what: str) -> Rejected:
    raw = obj.get("rejected", {})
    if not isinstance(raw, Mapping) or not all(
        isinstance(codes, list) and all(isinstance(c, str) for c in codes) for codes in raw.values()
    ):
        raise BadRequest(f"{what}: 'rejected' must map node ids to codes", code="bad_record")
    return tuple((str(node), tuple(codes)) for node, codes in raw.items())


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of the task, remote or local. ``outcome`` is ``None`` while it may run."""

    n: int
    where: Where
    node: str
    lease_id: str | None
    token: FencingToken | None
    placement_reasons: tuple[str, ...]
    started_wall_ms: int
    finished_wall_ms: int | None = None
    outcome: AttemptOutcome | None = None
    #: Why each node placement considered was refused (placement v2).
    rejected: Rejected = ()

    def __post_init__(self) -> None:
        _check_rejected(self.rejected)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise BadRequest(f"attempt number must be >= 1, got {self.n!r}", code="bad_record")
        if self.where not in ("remote", "local"):
            raise BadRequest(f"attempt where {self.where!r} is not remote/local", code="bad_record")
        if not isinstance(self.node, str) or not self.node:
            raise BadRequest("attempt node must be a node id", code="bad_record")
        if self.where == "remote" and (self.token is None or not self.lease_id):
            raise BadRequest("a remote attempt has a lease and a token", code="bad_record")
        if self.token is not None and not isinstance(self.token, FencingToken):
            raise BadRequest("attempt token must be a FencingToken", code="bad_record")
        _check_reason_codes(self.placement_reasons, "placement_reasons")
        _check_ms(self.started_wall_ms, "started_wall_ms")
        _check_ms(self.finished_wall_ms, "finished_wall_ms", optional=True)
        if (self.outcome is None) != (self.finished_wall_ms is None):
            raise BadRequest(
                "an attempt has an outcome exactly when it has finished", code="bad_record"
            )
        if self.outcome is not None and self.outcome not in ATTEMPT_OUTCOMES:
            raise BadRequest(f"unknown attempt outcome {self.outcome!r}", code="bad_record")

    def to_json(self) -> dict[str, Any]:
        body = record_json(self, nulls=True)
        body["rejected"] = {node: list(codes) for node, codes in self.rejected}
        return body

    @classmethod
    def from_json(cls, data: object) -> Attempt:
        what = "attempt"
        obj = _obj(data, what)
        where = _str(obj, "where", what)
        outcome = _opt_str(obj, "outcome", what)
        token = obj.get("token")
        return cls(
            n=_int(obj, "n", what),
            where=_pick(where, ("remote", "local"), "where"),
            node=_str(obj, "node", what),
            lease_id=_opt_str(obj, "lease_id", what),
            token=None if token is None else FencingToken.parse(token),
            placement_reasons=_str_tuple(obj, "placement_reasons", what),
            started_wall_ms=_int(obj, "started_wall_ms", what),
            finished_wall_ms=_opt_int(obj, "finished_wall_ms", what),
            outcome=None if outcome is None else _pick(outcome, ATTEMPT_OUTCOMES, "outcome"),
            rejected=_rejected_from_json(obj, what),
        )


@dataclass(frozen=True, slots=True)
class LeaseRequests:
    """The attempt numbers of a task's lease requests (request-number replay).

    Every request the submitter sends the control plane for a task (a remote ``grant``, a
    ``local`` token, a ``fallback``) carries an attempt number. ``pending`` is the request
    sent and not yet settled: sent again (its answer was lost), it keeps its number, so the
    control plane answers it as a replay and the lease it may have created comes back. Any
    other request takes a number above every one used so far (``highest``), so that after
    a lost grant the control plane's next word is for a later attempt. Kept in the task
    record, so a number is durable before its request leaves.
    """

    pending: RequestKind | None = None
    pending_attempt: int | None = None
    highest: int = 0

    def __post_init__(self) -> None:
        if self.pending is not None and self.pending not in REQUEST_KINDS:
            raise BadRequest(f"unknown lease request kind {self.pending!r}", code="bad_record")
        if (self.pending is None) != (self.pending_attempt is None):
            raise BadRequest(
                "a pending lease request has a kind and an attempt number", code="bad_record"
            )
        for name in ("pending_attempt", "highest"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise BadRequest(f"{name} must be an integer >= 0", code="bad_record")
        if self.pending_attempt is not None and self.pending_attempt > self.highest:
            raise BadRequest("a pending request's number is one already used", code="bad_record")

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)

    @classmethod
    def from_json(cls, data: object) -> LeaseRequests:
        what = "lease requests"
        obj = _obj(data, what)
        pending = _opt_str(obj, "pending", what)
        return cls(
            pending=None if pending is None else _pick(pending, REQUEST_KINDS, "pending"),
            pending_attempt=_opt_int(obj, "pending_attempt", what),
            highest=_int(obj, "highest", what) if "highest" in obj else 0,
        )


@dataclass(frozen=True, slots=True)
class Task:
    """The submitter's durable task record. Build with :meth:`new`; change with
    :meth:`apply`, which returns a new record (persist it before acting on it)."""

    task_id: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    gpus_wanted: int
    work_class: WorkClass
    state: TaskState
    attempts: tuple[Attempt, ...]
    reasons: tuple[ReasonEntry, ...]
    created_wall_ms: int
    finished_wall_ms: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    terminal_reason: str | None = None
    options: TaskOptions = field(default_factory=TaskOptions)
    requests: LeaseRequests = field(default_factory=LeaseRequests)
    #: The key of the event that ended the task (None while it runs, and in records
    #: written before it was kept): what :func:`exit_status` tells apart.
    ended_by: EventKey | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id:
            raise BadRequest("task id must be a non-empty string", code="bad_record")
        if (
            not isinstance(self.command, tuple)
            or not self.command
            or not all(isinstance(arg, str) for arg in self.command)
        ):
            raise BadRequest(
                "command must be a non-empty tuple of strings (argv)",
                code="bad_request",
                field="command",
            )
        keys = [pair[0] for pair in self.env]
        if not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in self.env
        ) or keys != sorted(set(keys)):
            raise BadRequest(
                "env must be sorted, unique (name, value) string pairs",
                code="bad_request",
                field="env",
            )
        check_count(self.gpus_wanted, "gpus_wanted")
        check_work_class(self.work_class)
        if self.state not in TASK_STATES:
            raise BadRequest(f"unknown task state {self.state!r}", code="bad_record")
        if [a.n for a in self.attempts] != list(range(1, len(self.attempts) + 1)):
            raise BadRequest("attempts must be numbered 1, 2, ...", code="bad_record")
        _check_ms(self.created_wall_ms, "created_wall_ms")
        _check_ms(self.finished_wall_ms, "finished_wall_ms", optional=True)
        if (self.state in TERMINAL_STATES) != (self.finished_wall_ms is not None):
            raise BadRequest(
                "a task has finished_wall_ms exactly when it is terminal", code="bad_record"
            )

    @classmethod
    def new(
        cls,
        task_id: str,
        *,
        command: tuple[str, ...],
        env: Mapping[str, str],
        gpus_wanted: int,
        work_class: WorkClass,
        created_wall_ms: int,
        options: TaskOptions | None = None,
    ) -> Task:
        """A freshly submitted task, ``queued``."""
        return cls(
            task_id=task_id,
            command=tuple(command),
            env=tuple(sorted(env.items())),
            gpus_wanted=gpus_wanted,
            work_class=work_class,
            state="queued",
            attempts=(),
            reasons=(ReasonEntry(created_wall_ms, "submitted"),),
            created_wall_ms=created_wall_ms,
            options=options or TaskOptions(),
        )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def current_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def current_token(self) -> FencingToken | None:
        attempt = self.current_attempt
        return None if attempt is None else attempt.token

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def lost_reason(self) -> str | None:
        """Why the current attempt's holder stopped it (the reason of the last
        ``lease_lost`` decision), while the task waits for the word to fall back."""
        if self.state != "fallback_pending":
            return None
        rows = self.reasons
        for index in range(len(rows) - 1, -1, -1):
            if rows[index].code == "lease_lost":
                return rows[index + 1].code if index + 1 < len(rows) else None
            if rows[index].code in ("placed_remote", "lease_dead_confirmed"):
                return None
        return None

    def request_number(self, kind: RequestKind) -> tuple[Task, int]:
        """The attempt number for a lease request of ``kind``, and the record that keeps
        it (persist it before the request leaves). The pending request of the same kind
        keeps its number (a retry, answered as a replay); any other takes a new one, above
        every number used and every attempt recorded."""
        requests = self.requests
        if kind not in REQUEST_KINDS:
            raise BadRequest(f"unknown lease request kind {kind!r}", code="bad_request")
        if requests.pending == kind and requests.pending_attempt is not None:
            return self, requests.pending_attempt
        number = max(len(self.attempts), requests.highest) + 1
        return replace(self, requests=LeaseRequests(kind, number, number)), number

    def request_settled(self) -> Task:
        """A lease was obtained, or the number was refused (``stale_attempt``) or the
        request refused for good: the next request takes a new number."""
        if self.requests.pending is None:
            return self
        return replace(self, requests=LeaseRequests(highest=self.requests.highest))

    def apply(self, event: TaskEvent, *, now_wall_ms: int) -> Task:
        """The record after ``event``. Raises :class:`IllegalTaskTransition` (record
        unchanged) if the state's row lacks the event's key."""
        _check_ms(now_wall_ms, "now_wall_ms")
        key = event_key(self, event)
        target = TRANSITIONS[self.state].get(key)
        if target is None:
            raise IllegalTaskTransition(self.task_id, self.state, key)
        if key == "result_late":
            return self
        pinned = self.options.node
        if isinstance(event, PlacedRemote) and pinned is not None and event.node != pinned:
            raise IllegalTaskTransition(self.task_id, self.state, key, f"pinned to {pinned}")
        if isinstance(event, LeaseDeadConfirmed) and key == "lease_dead_confirmed":
            earlier = [a.token for a in self.attempts if a.token is not None]
            if earlier and event.token <= max(earlier):
                raise IllegalTaskTransition(
                    self.task_id,
                    self.state,
                    key,
                    f"token {event.token} is not above {max(earlier)}",
                )
        attempts = list(self.attempts)
        entries = _entries(self, event, key, now_wall_ms)
        changes: dict[str, Any] = {}
        ending = _attempt_ending(event, key)
        current = self.current_attempt
        if ending is not None and current is not None and current.outcome is None:
            attempts[-1] = replace(current, outcome=ending, finished_wall_ms=now_wall_ms)
        new_attempt = _new_attempt(event, key, len(attempts) + 1, now_wall_ms)
        if new_attempt is not None:
            attempts.append(new_attempt)
        if isinstance(event, Result) and key in ("result_ok", "result_failed"):
            changes["exit_code"] = event.exit_code
            changes["signal"] = event.signal
        if target in TERMINAL_STATES:
            changes["finished_wall_ms"] = now_wall_ms
            changes["terminal_reason"] = _terminal_reason(event, key)
            changes["ended_by"] = key
        return replace(
            self,
            state=target,
            attempts=tuple(attempts),
            reasons=self.reasons + entries,
            **changes,
        )

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True) | {"env": dict(self.env)}

    @classmethod
    def from_json(cls, data: object) -> Task:
        what = "task"
        obj = _obj(data, what)
        env = _get(obj, "env", what)
        if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise BadRequest("task: field 'env' must be an object of strings", code="bad_record")
        attempts = _get(obj, "attempts", what)
        reasons = _get(obj, "reasons", what)
        if not isinstance(attempts, list) or not isinstance(reasons, list):
            raise BadRequest("task: 'attempts' and 'reasons' must be lists", code="bad_record")
        ended_by = _opt_str(obj, "ended_by", what)
        return cls(
            task_id=_str(obj, "task_id", what),
            command=_str_tuple(obj, "command", what),
            env=tuple(sorted(env.items())),
            gpus_wanted=_int(obj, "gpus_wanted", what),
            work_class=check_work_class(_str(obj, "work_class", what)),
            state=_pick(_str(obj, "state", what), TASK_STATES, "state"),
            attempts=tuple(Attempt.from_json(a) for a in attempts),
            reasons=tuple(ReasonEntry.from_json(r) for r in reasons),
            created_wall_ms=_int(obj, "created_wall_ms", what),
            finished_wall_ms=_opt_int(obj, "finished_wall_ms", what),
            exit_code=_opt_int(obj, "exit_code", what),
            signal=_opt_int(obj, "signal", what),
            terminal_reason=_opt_str(obj, "terminal_reason", what),
            options=TaskOptions.from_json(obj.get("options", {})),
            requests=LeaseRequests.from_json(obj.get("requests", {})),
            ended_by=None if ended_by is None else _pick(ended_by, EVENT_KEYS, "ended_by"),
        )


# -- the rules behind the table -----------------------------------------------------------


def _is_current_result(task: Task, result: Result) -> bool:
    attempt = task.current_attempt
    if attempt is None or attempt.outcome is not None or result.attempt != attempt.n:
        return False
    if attempt.token is None:
        # A local attempt that holds no lease: its result comes from this node's own
        # executor, matched by attempt number alone.
        return result.token is None
    return accept_result(attempt.token, result.token)


# Events whose key does not depend on the record.
_PLAIN_KEYS: Final[Mapping[type, EventKey]] = MappingProxyType(
    {
        PlacementStarted: "placing_started",
        PlacedRemote: "placed_remote",
        Replanned: "replanned",
        PlacementFailed: "placement_failed",
        HandoffFailed: "handoff_failed",
        ControlPlaneUnreachable: "control_plane_unreachable",
        FallbackRefused: "fallback_refused",
        LeaseLost: "lease_lost",
        Cancel: "cancel",
        Timeout: "timeout",
        PopuliFailure: "populi_failure",
    }
)


def event_key(task: Task, event: TaskEvent) -> EventKey:
    """Classify ``event`` against ``task`` (the only conditional part of the machine)."""
    no_fallback = task.options.no_fallback
    options = task.options
    if isinstance(event, Result):
        if task.terminal:
            return "result_late"
        if not _is_current_result(task, event):
            return "result_stale"
        return "result_ok" if event.exit_code == 0 and event.signal is None else "result_failed"
    if isinstance(event, PlacedLocal):
        return "placed_local" if options.allows_local(event.node) else "placed_local_no_fallback"
    if isinstance(event, GrantRefused):
        return "grant_refused_no_fallback" if no_fallback else "grant_refused"
    if isinstance(event, LeaseDeadConfirmed):
        if options.allows_local(event.node):
            return "lease_dead_confirmed"
        return "lease_dead_confirmed_no_fallback"
    key = _PLAIN_KEYS.get(type(event))
    if key is None:
        raise BadRequest(f"not a task event: {event!r}", code="bad_request")
    return key


def _attempt_ending(event: TaskEvent, key: EventKey) -> AttemptOutcome | None:
    """How the current (open) attempt ends on this event, if it does."""
    if key == "result_ok":
        return "succeeded"
    if key == "result_failed":
        return "failed"
    if key in ("lease_dead_confirmed", "lease_dead_confirmed_no_fallback"):
        return "lease_dead"
    if key == "lease_lost":
        return "lease_lost"
    if key == "cancel":
        return "cancelled"
    if key == "timeout":
        return "timed_out"
    if key == "populi_failure":
        return "populi_failure"
    return None


#: The keys of a placement that starts an attempt, and where that attempt runs.
_PLACED_WHERE: Final[Mapping[EventKey, Where]] = MappingProxyType(
    {"placed_remote": "remote", "placed_local": "local"}
)


def _new_attempt(event: TaskEvent, key: EventKey, n: int, now_wall_ms: int) -> Attempt | None:
    if isinstance(event, (PlacedRemote, PlacedLocal)) and key in _PLACED_WHERE:
        return Attempt(
            n,
            _PLACED_WHERE[key],
            event.node,
            event.lease_id,
            event.token,
            event.reasons,
            now_wall_ms,
            rejected=event.rejected,
        )
    if isinstance(event, LeaseDeadConfirmed) and key == "lease_dead_confirmed":
        return Attempt(
            n,
            "local",
            event.node,
            event.lease_id,
            event.token,
            ("lease_dead_confirmed", *event.reasons),
            now_wall_ms,
        )
    return None


def _terminal_reason(event: TaskEvent, key: EventKey) -> str:
    if isinstance(event, Result):
        if key == "result_ok":
            return "exit_zero"
        return "exit_nonzero" if event.signal is None else "signalled"
    if isinstance(event, PlacementFailed):
        return event.reasons[0] if event.reasons else "placement_failed"
    if isinstance(event, PlacedLocal):
        # --no-fallback: why it could not run remotely.
        return event.reasons[0] if event.reasons else "no_remote_candidate"
    if isinstance(event, GrantRefused):
        return "grant_refused"
    if isinstance(event, LeaseDeadConfirmed):
        return "lease_dead"
    if isinstance(event, Timeout):
        return f"{event.which}_timeout"
    if isinstance(event, PopuliFailure):
        return event.code
    return "cancelled"


# -- exit codes ---------------------------------------------------------------------------

#: What ``populi run`` and ``populi task wait`` exit with besides the task's own code (the
#: README's exit-code table): the ones a task cannot be told apart from are documented.
EXIT_REFUSED: Final = 4
EXIT_TIMED_OUT: Final = 124
EXIT_POPULI_FAILED: Final = 125
EXIT_CANCELLED: Final = 130
#: How a task ends refused: it could not be placed anywhere it was allowed to run
#: (``no_free_gpu``, ``--node`` unavailable, ``--no-fallback`` and no remote node).
REFUSED_ENDINGS: Final[frozenset[EventKey]] = frozenset(
    {"placement_failed", "placed_local_no_fallback", "grant_refused_no_fallback"}
)
#: Placement failures that are Populi's, not a refusal of the task.
_NOT_REFUSALS: Final = frozenset({"control_plane_unreachable"})


def exit_status(task: Task) -> int | None:
    """What ``populi run`` exits with (None until the task ended): the task's own code,
    128+N for signal N, 124 on ``--timeout``, 130 when cancelled, 4 when it could not be
    placed where it was allowed to run (nothing ran), 125 when Populi failed it."""
    if not task.terminal:
        return None
    if task.state == "timed_out":
        return EXIT_TIMED_OUT
    if task.state == "cancelled":
        return EXIT_CANCELLED
    if task.state == "succeeded":
        return 0
    if task.signal is not None:
        return 128 + int(task.signal)
    if task.exit_code is not None:
        return int(task.exit_code)
    if task.ended_by in REFUSED_ENDINGS and task.terminal_reason not in _NOT_REFUSALS:
        return EXIT_REFUSED
    return EXIT_POPULI_FAILED


def _entries(task: Task, event: TaskEvent, key: EventKey, at: int) -> tuple[ReasonEntry, ...]:
    """The decision-log rows for an accepted event: the decision, then its reason codes."""

    def rows(decision: str, detail: str, codes: tuple[str, ...] = ()) -> list[ReasonEntry]:
        return [ReasonEntry(at, decision, detail)] + [ReasonEntry(at, c, detail) for c in codes]

    out: list[ReasonEntry]
    if isinstance(event, PlacementStarted):
        out = rows("placing", "")
    elif isinstance(event, PlacedRemote):
        out = rows(
            "placed_remote",
            f"node={event.node} lease={event.lease_id} token={event.token}",
            event.reasons,
        )
    elif isinstance(event, PlacedLocal):
        out = rows("placed_local", f"node={event.node}", event.reasons)
    elif isinstance(event, GrantRefused):
        out = rows("grant_refused", f"node={event.node}", event.reasons)
    elif isinstance(event, Replanned):
        out = rows("replanned", event.detail(), (event.reason,))
    elif isinstance(event, PlacementFailed):
        out = rows("placement_failed", event.detail, event.reasons)
    elif isinstance(event, HandoffFailed):
        out = rows("handoff_failed", event.detail, (event.reason,))
    elif isinstance(event, ControlPlaneUnreachable):
        out = rows("control_plane_unreachable", event.detail)
    elif isinstance(event, LeaseDeadConfirmed):
        out = rows("lease_dead_confirmed", f"token={event.token}", event.reasons)
    elif isinstance(event, FallbackRefused):
        out = rows("fallback_refused", "", event.reasons)
    elif isinstance(event, LeaseLost):
        out = rows("lease_lost", event.detail, (event.reason,))
    elif isinstance(event, Result):
        detail = (
            f"attempt={event.attempt} token={event.token} exit={event.exit_code} "
            f"signal={event.signal}"
        )
        out = rows("stale_result" if key == "result_stale" else "result", detail)
    elif isinstance(event, Cancel):
        out = rows("cancelled", f"by={event.actor} {event.detail}".rstrip())
    elif isinstance(event, Timeout):
        out = rows(f"{event.which}_timeout", "")
    else:
        out = rows(event.code, event.detail)
    if key.endswith("_no_fallback"):
        if task.options.no_fallback:
            out.append(ReasonEntry(at, "no_fallback", "--no-fallback: the task never runs locally"))
        else:
            out.append(
                ReasonEntry(
                    at,
                    "no_node_fallback",
                    f"--node {task.options.node}: the task runs only there "
                    "(--node-fallback lets it run here)",
                )
            )
    return tuple(out)


__all__ = [
    "ATTEMPT_OUTCOMES",
    "EVENT_KEYS",
    "EXIT_CANCELLED",
    "EXIT_POPULI_FAILED",
    "EXIT_REFUSED",
    "EXIT_TIMED_OUT",
    "REFUSED_ENDINGS",
    "REQUEST_KINDS",
    "RUNNING_STATES",
    "TASK_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "WORKER_LEFT",
    "Attempt",
    "AttemptOutcome",
    "Cancel",
    "ControlPlaneUnreachable",
    "EventKey",
    "FallbackRefused",
    "GrantRefused",
    "HandoffFailed",
    "IllegalTaskTransition",
    "LeaseDeadConfirmed",
    "LeaseLost",
    "LeaseRequests",
    "PlacedLocal",
    "PlacedRemote",
    "PlacementFailed",
    "PlacementStarted",
    "PopuliFailure",
    "ReasonEntry",
    "Rejected",
    "Replanned",
    "RequestKind",
    "Result",
    "Task",
    "TaskEvent",
    "TaskOptions",
    "TaskState",
    "Timeout",
    "Where",
    "event_key",
    "exit_status",
]
