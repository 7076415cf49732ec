"""The control plane's lease table: events in, leases to persist out (safety rules 1-5).

A :class:`Lease` gives one holder the right to run one attempt of one task on a set of
GPUs until it expires. The control plane owns the table; the holder (a worker, or the
submitter for a local attempt) holds a lease; the submitter owns the task.

States and the one transition table (:data:`TRANSITIONS`)::

    live --renew--> live
    live --revoke--> revoking              (operator / reconcile; keeps GPUs and task key)
    live, revoking --release(stopped)-->   released (from live) / revoked (from revoking)
    live, revoking --release(completed)--> completed
    live, revoking --expire--> expired     (control plane's clock + margin)

``completed``, ``released``, ``revoked`` and ``expired`` are terminal: nothing leaves them.
``released``, ``revoked`` and ``expired`` are **dead** — the task key is free and the
submitter may fall back. ``completed`` is not dead: its GPUs are free but its task key
stays taken forever and it never triggers a fallback. An event a state's row lacks
raises :class:`IllegalLeaseTransition`; a retried request that already took effect (a
second ``release`` with the same outcome, a second ``revoke``) is acknowledged with no
change (:data:`REPLAYS`), so a lost reply is harmless.

Kinds: ``remote`` (holder is a worker), ``local`` (holder is the submitter, on its own
GPUs; renewed like any other) and ``fence`` (a local attempt with no GPUs: it only takes
the task key and records the token; it never expires and is never renewed or revoked —
the submitter releases it when the attempt ends).

Durability (safety rules 4 and 7). The table is immutable: every operation returns a new
table and, in its result, ``records`` — every lease whose persisted fields changed. The
shell writes all of them in one ``synchronous=FULL`` transaction, adopts the new table
only once the write succeeded, and only then answers. A failed write leaves the old table
in force, so nothing is acknowledged that is not on disk. Renewals change only
``expires_mono``, which is never persisted (a restart counts every holding lease as
renewed at restart, safety rule 5), so they return no records.

Resumption (safety rule 5). A restarted control plane (:meth:`LeaseTable.restore`) or a new
leader (:meth:`LeaseTable.set_term`) may not know every lease: one granted after the store it
restored from, or by the previous leader. It learns them from the nodes' full reports
(:mod:`populi_peer.core.reports`, :meth:`LeaseTable.receive`) and resumes grants **per node**:
on a node once that node has reported to this incarnation (and the previous authority has
provably ended); a node that stays silent keeps its GPUs, and the task keys a request
names it as the previous node of, until any lease on it could have expired
(``longest_ttl_s + expiry_margin_s`` from the start). A lease neither persisted nor learned
is unknown: its renewal is refused (``lease_unknown``), so its holder never starts it.

Time. ``now_mono`` (seconds, the control plane's monotonic clock) drives expiry and is
never persisted; ``now_wall_ms`` (UTC ms) is written into records. A lease is renewable
while ``now_mono <= expires_mono`` and is declared dead once
``now_mono > expires_mono + expiry_margin_s``: the margin absorbs message delay and clock
drift between the holder (whose deadline counts from when it *sent* the renewal, on
``CLOCK_BOOTTIME``) and the control plane (whose ``expires_mono`` counts from when it
*received* it, which is later).

Holders. Each reconcile pass (:meth:`LeaseTable.reconcile_holders`) takes what the control
plane knows of every holder (:class:`HolderView`: its lifecycle, whether its heartbeat is
stale) and flags the leases of stale or quarantined holders (revoking them with the
``auto_revoke_stale_leases`` setting), and revokes the live leases of a draining holder
whose drain deadline has passed (reason ``drain_deadline``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from populi_peer.core.fencing import (
    FencingToken,
    _bool,
    _float,
    _int,
    _obj,
    _opt_int,
    _opt_str,
    _str,
    _str_tuple,
    one_of,
)
from populi_peer.core.hints import GpuHint
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.placement import REJECTION_ORDER, check_gpu_model, gpu_misfits
from populi_peer.core.placement import TaskView as PlacementTask
from populi_peer.core.policy import WorkClass, check_work_class
from populi_peer.core.reports import (
    Claim,
    FullReport,
    Incarnation,
    NodeHoldings,
    RefusedLease,
    ReportAnswer,
    ReportChange,
    ReportedLease,
    ReportMark,
    ReportMessage,
    grant_terms,
    grant_terms_of,
    judge,
)
from populi_peer.core.wire import FieldsRecord, check_count, record_json
from populi_peer.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    NotFound,
    PopuliError,
    StoreError,
)

LeaseState = Literal["live", "revoking", "completed", "released", "revoked", "expired"]
LeaseKind = Literal["remote", "local", "fence"]
LeaseEvent = Literal["renew", "revoke", "release_stopped", "release_completed", "expire"]
ReleaseOutcome = Literal["stopped", "completed"]
#: Why a holder stopped a task before its end, when its submitter must hear it from the
#: lease itself (it may look before the result reaches it): ``worker_left`` (the holder
#: left the cluster: a fallback, not a cancel).
ReleaseReason = Literal["worker_left"]
RELEASE_REASONS: Final[tuple[ReleaseReason, ...]] = get_args(ReleaseReason)
#: The holder left the cluster (``populi leave``): its task falls back, not cancelled.
WORKER_LEFT: Final[ReleaseReason] = "worker_left"
HolderStatus = Literal["ok", "stale", "quarantined"]

LEASE_STATES: Final[tuple[LeaseState, ...]] = get_args(LeaseState)
LEASE_KINDS: Final[tuple[LeaseKind, ...]] = get_args(LeaseKind)

#: A holding lease keeps its GPUs and its task key.
HOLDING_STATES: Final[frozenset[LeaseState]] = frozenset({"live", "revoking"})
#: A dead lease frees its GPUs and its task key; only a dead latest lease allows a fallback.
DEAD_STATES: Final[frozenset[LeaseState]] = frozenset({"released", "revoked", "expired"})
TERMINAL_STATES: Final[frozenset[LeaseState]] = DEAD_STATES | {"completed"}
#: States in which a lease keeps its task key taken.
KEY_TAKING_STATES: Final[frozenset[LeaseState]] = HOLDING_STATES | {"completed"}

_NO_MOVES: Final[Mapping[LeaseEvent, LeaseState]] = MappingProxyType({})

# The one transition table. A missing (state, event) is illegal.
TRANSITIONS: Final[Mapping[LeaseState, Mapping[LeaseEvent, LeaseState]]] = MappingProxyType(
    {
        "live": MappingProxyType(
            {
                "renew": "live",
                "revoke": "revoking",
                "release_stopped": "released",
                "release_completed": "completed",
                "expire": "expired",
            }
        ),
        # Revoking: no renewals (the holder is told to stop), and it stays holding until
        # the holder confirms or it expires by the control plane's clock (safety rule 4).
        "revoking": MappingProxyType(
            {
                "release_stopped": "revoked",
                # It finished before it could stop: the task is done, never rerun.
                "release_completed": "completed",
                "expire": "expired",
            }
        ),
        "completed": _NO_MOVES,
        "released": _NO_MOVES,
        "revoked": _NO_MOVES,
        "expired": _NO_MOVES,
    }
)

#: A request that already took effect: acknowledged with no change and nothing to persist.
REPLAYS: Final[Mapping[LeaseState, frozenset[LeaseEvent]]] = MappingProxyType(
    {
        "revoking": frozenset({"revoke"}),
        "released": frozenset({"release_stopped"}),
        "revoked": frozenset({"release_stopped"}),
        "completed": frozenset({"release_completed"}),
    }
)

#: Refusals of remote execution (``core.settings.remote_refusal``) that stop running remote
#: work too, not only its start: the kill switch. A renewal of a remote lease is refused
#: for it, and the control plane revokes every live remote lease with it as the reason
#: (:meth:`LeaseTable.reconcile_holders`), so the lease's death says why. Turning remote
#: execution off (``remote_disabled``) lets running attempts finish.
STOPPING_REFUSALS: Final[frozenset[str]] = frozenset({"kill_switch"})

#: Who revokes a lease when :meth:`LeaseTable.reconcile` does it by itself.
CONTROL_PLANE_ACTOR: Final = "control_plane"

#: Grant and fallback refusals that mean "not yet" (per-node resumption, safety rule 5):
#: the previous authority may still act; the target node has not reported to this
#: incarnation; the node the task last ran on has not. A submitter waits and asks again —
#: never a reason to avoid the node or fail the task. ``details.wait_s`` says how long at
#: most (the node reporting ends it sooner).
RESUMPTION_REASONS: Final[frozenset[str]] = frozenset(
    {"previous_authority_live", "node_not_reported", "previous_node_not_reported"}
)


# -- errors -------------------------------------------------------------------------------


class LeaseRefused(Conflict):
    """The control plane refuses a lease operation; ``reasons`` are stable codes
    (:data:`RESUMPTION_REASONS`, ``ttl_too_short``, ``ttl_too_long``, ``task_key_taken``, ``task_completed``,
    ``node_ineligible`` + the node's own reasons, ``no_free_gpu``, ``lease_not_live``,
    ``not_holder``, ``lease_revoked``, ``lease_live``, ``not_task_owner``,
    ``stale_attempt``, ``lease_not_renewable``, ``lease_not_revocable``...)."""

    code = "lease_refused"

    def __init__(self, message: str, *, reasons: Iterable[str], **details: Any) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        super().__init__(message, reasons=list(self.reasons), **details)


class IllegalLeaseTransition(LeaseRefused):
    """An event the transition table does not allow in the lease's state (e.g. releasing
    an expired lease: a dead lease stays dead). Reason ``lease_<state>``."""

    code = "illegal_lease_transition"

    def __init__(self, lease: Lease, event: LeaseEvent) -> None:
        allowed = sorted(TRANSITIONS[lease.state])
        super().__init__(
            f"lease {lease.lease_id} is {lease.state}: {event} is not allowed; "
            f"allowed: {', '.join(allowed) if allowed else 'none (terminal)'}",
            reasons=(f"lease_{lease.state}",),
            lease_id=lease.lease_id,
            state=lease.state,
            event=event,
        )


class LeaseNotFound(NotFound):
    """No such lease. For a renewal this is the definitive ``lease_unknown``
    (``details.reasons``): a lease this control plane neither persisted nor learned from
    its holder's report is never renewed, so its holder never starts it."""

    code = "lease_not_found"


class ReportNeeded(PopuliError):
    """Not a refusal: the holder asks about a lease this control plane does not know, and
    has not reported to this incarnation yet — the lease may be in its report. The holder
    sends its full report and asks again; until then its deadline stands (``report_needed``,
    not definitive: the shell answers it as "try again", never as a lost lease)."""

    code = "report_needed"
    http_status = 503


# -- settings and timing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Cluster-wide lease timings (part of the signed cluster settings record).

    - ``max_lease_ttl_s``: longest TTL a grant may carry.
    - ``expiry_margin_s``: how long past ``expires_mono`` the control plane waits before it
      declares a lease dead (message delay + drift between holder and control plane).
    - ``leader_lease_s``: the leader-lease (check-quorum) interval of the election.

    Serialised in integer milliseconds (signed records carry no floats), so values are kept
    to millisecond resolution.
    """

    max_lease_ttl_s: float = 30.0
    expiry_margin_s: float = 5.0
    leader_lease_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_lease_ttl_s", "expiry_margin_s", "leader_lease_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"{name} must be a number of seconds, got {type(value).__name__}", key=name
                )
            if not math.isfinite(value) or value < 0.001:
                raise ConfigError(f"{name} must be at least 0.001 s, got {value}", key=name)
            object.__setattr__(self, name, float(value))
        if self.max_lease_ttl_s < MIN_LEASE_TTL_S:
            raise ConfigError(
                f"max_lease_ttl_s must be at least {MIN_LEASE_TTL_S:g} s (the shortest lease "
                f"a holder can renew), got {self.max_lease_ttl_s:g}",
                key="max_lease_ttl_s",
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "max_lease_ttl_ms": round(self.max_lease_ttl_s * 1000),
            "expiry_margin_ms": round(self.expiry_margin_s * 1000),
            "leader_lease_ms": round(self.leader_lease_s * 1000),
        }

    @classmethod
    def from_json(cls, data: object) -> LeaseSettings:
        obj = _obj(data, "lease settings")
        values: dict[str, float] = {}
        for name in ("max_lease_ttl", "expiry_margin", "leader_lease"):
            if f"{name}_ms" in obj:
                values[f"{name}_s"] = _int(obj, f"{name}_ms", "lease settings") / 1000
        return cls(**values)


#: The shortest time a holder waits for the answer to one renewal: below it a renewal
#: across a busy overlay is given up while it may still be on its way.
RENEW_TIMEOUT_FLOOR_S: Final = 2.0

#: The shortest TTL the control plane grants (reason ``ttl_too_short``). A holder renews
#: every TTL/3 and waits up to :func:`renew_timeout_s` for each answer; the renewal sent
#: one interval after the last one must be able to use its whole timeout and still land
#: before the deadline that last one set: ``TTL/3 + RENEW_TIMEOUT_FLOOR_S <= TTL``, so
#: ``TTL >= 1.5 * RENEW_TIMEOUT_FLOOR_S`` = 3 s. Anything shorter is a lease its holder
#: cannot keep (a TTL of 1e-300 s is born dead). A worker may ask for more: its stop
#: margin must stay below two thirds of the TTL (:func:`validate_stop_margin`), so with
#: the default 7 s margin it takes leases above 10.5 s only. The cluster setting
#: ``max_lease_ttl_s`` has this as its minimum.
MIN_LEASE_TTL_S: Final = 1.5 * RENEW_TIMEOUT_FLOOR_S


def renew_interval_s(ttl_s: float) -> float:
    """How often a holder renews: a third of the TTL, so two renewals can fail in a row
    before the lease is in danger."""
    _check_ttl(ttl_s)
    return ttl_s / 3


def renew_timeout_s(ttl_s: float) -> float:
    """How long a holder waits for the answer to one renewal: a renewal answered later
    than TTL/3 is as good as lost, but never less than :data:`RENEW_TIMEOUT_FLOOR_S`."""
    return max(RENEW_TIMEOUT_FLOOR_S, renew_interval_s(ttl_s))


def ttl_reasons(ttl_s: float, *, max_lease_ttl_s: float) -> list[str]:
    """Why a lease of ``ttl_s`` may not be granted, by its length alone: ``ttl_too_short``
    (below :data:`MIN_LEASE_TTL_S`) or ``ttl_too_long`` (above the cluster's
    ``max_lease_ttl_s``). The one rule for every grant path."""
    _check_ttl(ttl_s)
    if ttl_s < MIN_LEASE_TTL_S:
        return ["ttl_too_short"]
    if ttl_s > max_lease_ttl_s:
        return ["ttl_too_long"]
    return []


def worker_deadline_boot(renew_sent_boot: float, ttl_s: float) -> float:
    """The holder's local deadline on ``CLOCK_BOOTTIME``: from when the renewal that the
    control plane accepted was *sent* (safety rule 3). The control plane counts from when
    it received it, which is later, so the holder's deadline is never the later one."""
    _check_ttl(ttl_s)
    return renew_sent_boot + ttl_s


def worker_stop_at_boot(renew_sent_boot: float, ttl_s: float, stop_margin_s: float) -> float:
    """When the supervisor starts stopping the task: ``deadline - stop_margin_s``."""
    return worker_deadline_boot(renew_sent_boot, ttl_s) - stop_margin_s


def stop_margin_floor_s(
    *, kill_grace_s: float, kill_latency_s: float, drift_ppm: float, ttl_s: float
) -> float:
    """The smallest stop margin that still has a task gone before its lease ends (safety
    rule 3): the stop begins at ``deadline - margin``, takes up to ``kill_grace_s``
    (SIGTERM to SIGKILL) and ``kill_latency_s`` (until the last process is gone), and the
    holder's clock may run slow against the control plane's by ``drift_ppm`` over the
    ``ttl_s`` one renewal covers (0: no TTL known yet)."""
    return kill_grace_s + kill_latency_s + ttl_s * drift_ppm / 1_000_000


def validate_stop_margin(
    stop_margin_s: float,
    *,
    kill_grace_s: float,
    kill_latency_s: float,
    drift_ppm: float,
    ttl_s: float | None,
    key: str = "exec.stop_margin_s",
) -> None:
    """Refuse a stop margin that cannot keep a task gone by its deadline (safety rule 3):
    it must cover the SIGTERM grace, the kill latency and the clock drift over one TTL
    (:func:`stop_margin_floor_s`; pass the longest TTL in use, ``max_lease_ttl_s``), and it
    must leave room for a renewal (below ``ttl_s - renew_interval_s(ttl_s)``), or the task
    would be stopped before its first renewal could land. With ``ttl_s=None`` (a node's
    config, read before it knows the cluster's TTL) only the grace and the kill latency
    are checked. The one rule: the config and the worker call it. Raises
    :class:`ConfigError` naming ``key``."""
    if ttl_s is not None:
        _check_ttl(ttl_s)
    for name, value in (
        (key, stop_margin_s),
        ("kill_grace_s", kill_grace_s),
        ("kill_latency_s", kill_latency_s),
        ("drift_ppm", drift_ppm),
    ):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}", key=name)
    floor_s = stop_margin_floor_s(
        kill_grace_s=kill_grace_s,
        kill_latency_s=kill_latency_s,
        drift_ppm=drift_ppm,
        ttl_s=ttl_s or 0.0,
    )
    if ttl_s is None:
        if stop_margin_s < floor_s:
            raise ConfigError(
                f"{key} = {stop_margin_s} s is below kill_grace_s + kill_latency_s "
                f"({kill_grace_s} + {kill_latency_s} = {floor_s} s); raise {key}",
                key=key,
            )
        return
    if stop_margin_s < floor_s:
        drift_s = floor_s - kill_grace_s - kill_latency_s
        raise ConfigError(
            f"{key} = {stop_margin_s} s is below kill_grace_s + kill_latency_s + drift over "
            f"one {ttl_s} s TTL ({kill_grace_s} + {kill_latency_s} + {drift_s:.6f} = "
            f"{floor_s:.6f} s); raise {key}",
            key=key,
        )
    ceiling_s = ttl_s - renew_interval_s(ttl_s)
    if stop_margin_s >= ceiling_s:
        raise ConfigError(
            f"{key} = {stop_margin_s} s leaves no room to renew a {ttl_s} s lease "
            f"(must be below {ceiling_s:.3f} s); lower {key} or raise the TTL",
            key=key,
        )


def _check_ttl(ttl_s: float) -> None:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)):
        raise BadRequest(f"ttl_s must be a number, got {type(ttl_s).__name__}", code="bad_ttl")
    if not math.isfinite(ttl_s) or ttl_s <= 0:
        raise BadRequest(f"ttl_s must be a finite number > 0, got {ttl_s}", code="bad_ttl")


# -- records ------------------------------------------------------------------------------


def _check_name(value: object, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise BadRequest(
            f"lease {name} must be a non-empty string, got {value!r}", code="bad_record", field=name
        )


def _check_ms(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(
            f"lease {name} must be an integer >= 0 (UTC ms), got {value!r}",
            code="bad_record",
            field=name,
        )


def _check_gpus(gpus: object) -> tuple[str, ...]:
    if not isinstance(gpus, tuple) or not all(isinstance(g, str) and g for g in gpus):
        raise BadRequest(
            f"gpus must be a tuple of GPU UUIDs, got {gpus!r}", code="bad_record", field="gpus"
        )
    if len(set(gpus)) != len(gpus):
        raise BadRequest(f"gpus {gpus!r} names a GPU twice", code="bad_record", field="gpus")
    return gpus


def task_key(task_id: str) -> str:
    """The key a task's holding and completed leases keep taken."""
    return f"task:{task_id}"


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease. ``expires_mono`` is the control plane's timer: never persisted, so
    :meth:`to_json` omits it and :meth:`from_json` leaves it at ``+inf`` (a lease read
    back never expires until :meth:`LeaseTable.restore` counts it as renewed at restart:
    a read-back lease can only err on the side of being held)."""

    lease_id: str
    task_id: str
    attempt: int
    work_class: WorkClass
    holder: str
    submitter: str
    gpus: tuple[str, ...]
    token: FencingToken
    ttl_s: float
    state: LeaseState
    kind: LeaseKind
    granted_wall_ms: int
    state_changed_wall_ms: int
    #: Why it ended or is ending ('' while live): an operator's revoke reason,
    #: ``holder_stale``, ``released``, ``completed``, ``expired``.
    reason: str = ""
    revoked_by: str | None = None
    expires_mono: float = math.inf

    def __post_init__(self) -> None:
        for name in ("lease_id", "task_id", "holder", "submitter"):
            _check_name(getattr(self, name), name)
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise BadRequest(
                f"lease attempt must be an integer >= 1, got {self.attempt!r}",
                code="bad_record",
                field="attempt",
            )
        check_work_class(self.work_class)
        _check_gpus(self.gpus)
        if not isinstance(self.token, FencingToken):
            raise BadRequest("lease token must be a FencingToken", code="bad_record", field="token")
        if self.state not in LEASE_STATES:
            raise BadRequest(
                f"unknown lease state {self.state!r}", code="bad_record", field="state"
            )
        if self.kind not in LEASE_KINDS:
            raise BadRequest(f"unknown lease kind {self.kind!r}", code="bad_record", field="kind")
        _check_ms(self.granted_wall_ms, "granted_wall_ms")
        _check_ms(self.state_changed_wall_ms, "state_changed_wall_ms")
        if self.kind == "fence":
            if self.gpus or self.ttl_s != 0:
                raise BadRequest("a fence lease has no GPUs and no TTL", code="bad_record")
        else:
            _check_ttl(self.ttl_s)
        if (self.kind == "remote") == (self.holder == self.submitter):
            raise BadRequest(
                f"a {self.kind} lease is held by "
                f"{'a worker, not the submitter' if self.kind == 'remote' else 'its submitter'}",
                code="bad_record",
            )
        if not isinstance(self.reason, str) or (
            self.revoked_by is not None and not isinstance(self.revoked_by, str)
        ):
            raise BadRequest("lease reason / revoked_by must be strings", code="bad_record")

    @property
    def task_key(self) -> str:
        return task_key(self.task_id)

    @property
    def holding(self) -> bool:
        return self.state in HOLDING_STATES

    @property
    def dead(self) -> bool:
        return self.state in DEAD_STATES

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def fallback_reason(self) -> str:
        """Why a task falls back from this (dead) lease, as its submitter says it: the
        holder's own release reason when it gave one (``worker_left``), else
        ``lease_<state>``."""
        return self.reason if self.reason in RELEASE_REASONS else f"lease_{self.state}"

    def to_json(self) -> dict[str, Any]:
        """Its fields but ``expires_mono`` (never persisted), with ``task_key`` second."""
        first = {"lease_id": self.lease_id, "task_key": self.task_key}
        return first | record_json(self, omit=("lease_id", "expires_mono"))

    @classmethod
    def from_json(cls, data: object) -> Lease:
        what = "lease"
        obj = _obj(data, what)
        state = _str(obj, "state", what)
        kind = _str(obj, "kind", what)
        if state not in LEASE_STATES:
            raise BadRequest(f"lease: unknown state {state!r}", code="bad_record", field="state")
        if kind not in LEASE_KINDS:
            raise BadRequest(f"lease: unknown kind {kind!r}", code="bad_record", field="kind")
        return cls(
            **grant_terms(obj, what),
            holder=_str(obj, "holder", what),
            state=_as_state(state),
            kind=_as_kind(kind),
            granted_wall_ms=_int(obj, "granted_wall_ms", what),
            state_changed_wall_ms=_int(obj, "state_changed_wall_ms", what),
            reason=_opt_str(obj, "reason", what) or "",
            revoked_by=_opt_str(obj, "revoked_by", what),
        )


def _as_state(value: str) -> LeaseState:
    state = one_of(value, LEASE_STATES)
    if state is None:
        raise BadRequest(f"unknown lease state {value!r}", code="bad_record")
    return state


def _as_kind(value: str) -> LeaseKind:
    kind = one_of(value, LEASE_KINDS)
    if kind is None:
        raise BadRequest(f"unknown lease kind {value!r}", code="bad_record")
    return kind


@dataclass(frozen=True, slots=True)
class GrantRequest(FieldsRecord):
    """A submitter's request for a lease on ``target`` (the submitter itself for a local
    attempt that uses GPUs). ``previous_node``: where the task's last attempt was placed,
    if anywhere — its task key stays held until that node has reported (safety rule 5)."""

    task_id: str
    attempt: int
    work_class: WorkClass
    target: str
    gpus_wanted: int
    ttl_s: float
    submitter: str
    previous_node: str | None = None
    #: What each GPU must offer (placement v2: ``--gpu-mem`` bytes free, ``--gpu-model``).
    gpu_mem_bytes: int | None = None
    gpu_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("task_id", "target", "submitter"):
            _check_name(getattr(self, name), name)
        if self.gpu_mem_bytes is not None and (
            isinstance(self.gpu_mem_bytes, bool)
            or not isinstance(self.gpu_mem_bytes, int)
            or self.gpu_mem_bytes < 1
        ):
            raise BadRequest("gpu_mem_bytes must be an integer >= 1", field="gpu_mem_bytes")
        if self.gpu_model is not None:
            check_gpu_model(self.gpu_model)
        if self.previous_node is not None:
            _check_name(self.previous_node, "previous_node")
        check_count(self.attempt, "attempt", 1)
        check_count(self.gpus_wanted, "gpus_wanted")
        check_work_class(self.work_class)
        _check_ttl(self.ttl_s)

    @classmethod
    def from_json(cls, data: object) -> GrantRequest:
        what = "grant request"
        obj = _obj(data, what)
        return cls(
            task_id=_str(obj, "task_id", what),
            attempt=_int(obj, "attempt", what),
            work_class=check_work_class(_str(obj, "work_class", what)),
            target=_str(obj, "target", what),
            gpus_wanted=_int(obj, "gpus_wanted", what),
            ttl_s=_float(obj, "ttl_s", what),
            submitter=_str(obj, "submitter", what),
            previous_node=_opt_str(obj, "previous_node", what),
            gpu_mem_bytes=_opt_int(obj, "gpu_mem_bytes", what),
            gpu_model=_opt_str(obj, "gpu_model", what),
        )

    @property
    def constrains_gpus(self) -> bool:
        return self.gpus_wanted > 0 and (
            self.gpu_mem_bytes is not None or self.gpu_model is not None
        )

    def misfits(self, gpu: GpuHint) -> tuple[str, ...]:
        """Why ``gpu`` cannot serve this request on memory or model (empty: it can):
        placement's own rule, :func:`~populi_peer.core.placement.gpu_misfits`."""
        if not self.constrains_gpus:
            return ()
        need = PlacementTask(
            work_class=self.work_class,
            gpus_wanted=self.gpus_wanted,
            gpu_mem_bytes=self.gpu_mem_bytes,
            gpu_model=self.gpu_model,
        )
        return gpu_misfits(need, gpu)


#: A grant's refusal: the target's GPUs lack the memory or model the request asks for.
GPU_MISFIT: Final = "gpu_misfit"


def _misfit_codes(codes: Iterable[tuple[str, ...]]) -> list[str]:
    seen = {c for row in codes for c in row}
    return [c for c in REJECTION_ORDER if c in seen]


@dataclass(frozen=True, slots=True)
class TargetView:
    """What the control plane itself knows about the target at grant time (safety rule
    6: hints never authorize): the eligibility verdict another module computed from
    lifecycle, staleness, health and policy, and the GPUs its verified facts say are
    allocatable (healthy, not busy with foreign processes), in preference order."""

    node_id: str
    eligible: bool
    reasons: tuple[str, ...] = ()
    allocatable_gpus: tuple[str, ...] = ()
    #: Of the allocatable GPUs, those the request's ``--gpu-mem`` / ``--gpu-model`` rule
    #: out, with :meth:`GrantRequest.misfits`'s codes (the control plane's own facts).
    misfit_gpus: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.node_id, "node_id")
        _check_gpus(self.allocatable_gpus)

    def to_json(self) -> dict[str, Any]:
        body = record_json(self)
        body["misfit_gpus"] = {uuid: list(codes) for uuid, codes in self.misfit_gpus}
        return body

    @classmethod
    def from_json(cls, data: object) -> TargetView:
        what = "target view"
        obj = _obj(data, what)
        return cls(
            node_id=_str(obj, "node_id", what),
            eligible=_bool(obj, "eligible", what, False),
            reasons=_str_tuple(obj, "reasons", what) if "reasons" in obj else (),
            allocatable_gpus=(
                _str_tuple(obj, "allocatable_gpus", what) if "allocatable_gpus" in obj else ()
            ),
            misfit_gpus=tuple(
                (uuid, _str_tuple(_obj(obj.get("misfit_gpus", {}), what), uuid, what))
                for uuid in _obj(obj.get("misfit_gpus", {}), what)
            ),
        )


@dataclass(frozen=True, slots=True)
class HolderView:
    """What the control plane knows of a lease holder at a reconcile pass: its lifecycle
    (``None``: none recorded) and whether its heartbeat is stale (never for the control
    plane itself, which notes its own liveness)."""

    lifecycle: NodeLifecycle | None = None
    stale: bool = False

    @property
    def status(self) -> HolderStatus:
        """``quarantined`` before ``stale``: an operator's word outranks a silence."""
        if self.lifecycle is not None and self.lifecycle.state == "quarantined":
            return "quarantined"
        return "stale" if self.stale else "ok"

    def drain_overdue(self, now_wall_ms: int) -> bool:
        """Draining, with a deadline that has passed: its running work should be gone."""
        lc = self.lifecycle
        return (
            lc is not None
            and lc.state == "draining"
            and lc.deadline_wall_ms is not None
            and lc.deadline_wall_ms <= now_wall_ms
        )


#: Why the control plane revokes the leases of a holder whose drain deadline has passed.
DRAIN_DEADLINE_REASON: Final = "drain_deadline"


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """The result of one operation: the lease it concerns and every lease to persist
    (``records``; empty for a renewal or a replay). ``prior`` is the dead lease a
    fallback lease follows, if any."""

    lease: Lease
    records: tuple[Lease, ...]
    replay: bool = False
    prior: Lease | None = None


@dataclass(frozen=True, slots=True)
class FlaggedLease:
    lease_id: str
    holder: str
    status: HolderStatus
    revoked: bool


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    flagged: tuple[FlaggedLease, ...]
    records: tuple[Lease, ...]


@dataclass(frozen=True, slots=True)
class ResumeWindow:
    """Per-node resumption after a restart or a new term (safety rule 5), on this control
    plane's monotonic clock: nothing is granted before ``authority_from_mono`` (the
    previous authority has provably ended by then); a node that has not reported keeps its
    GPUs, and the task keys requests name it for, until ``silent_until_mono`` (every lease
    it could hold unknown to this table has expired on its holder's own deadline by then)."""

    started_mono: float
    authority_from_mono: float
    silent_until_mono: float


@dataclass(frozen=True, slots=True)
class GrantWait:
    """Why grants on a node wait, and until when at the latest (``until_mono``, this
    control plane's clock): ``previous_authority_live`` or ``node_not_reported``."""

    reason: str
    until_mono: float


@dataclass(frozen=True, slots=True)
class LearnResult:
    """What :meth:`LeaseTable.learn` did with a node's word: ``records`` to persist (leases
    adopted, releases recorded), the leases ``adopted`` (known now from the report alone),
    the ends ``recorded`` (completed / released — never expired), and the leases
    ``refused`` (the node must not start them, and stops them if they run)."""

    records: tuple[Lease, ...] = ()
    adopted: tuple[str, ...] = ()
    recorded: tuple[str, ...] = ()
    refused: tuple[RefusedLease, ...] = ()


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What :meth:`LeaseTable.receive` did: the answer for the node, and the leases to
    persist before it is sent (safety rules 4 and 7)."""

    answer: ReportAnswer
    learned: LearnResult = field(default_factory=LearnResult)

    @property
    def records(self) -> tuple[Lease, ...]:
        return self.learned.records


# -- the table ----------------------------------------------------------------------------


def _transition(
    lease: Lease,
    event: LeaseEvent,
    *,
    now_wall_ms: int,
    reason: str | None = None,
    revoked_by: str | None = None,
) -> Lease | None:
    """The lease after ``event``, or ``None`` for a replay. Raises on an illegal event."""
    _check_ms(now_wall_ms, "now_wall_ms")
    target = TRANSITIONS[lease.state].get(event)
    if target is None:
        if event in REPLAYS.get(lease.state, frozenset()):
            return None
        raise IllegalLeaseTransition(lease, event)
    if target == lease.state:
        return lease
    return replace(
        lease,
        state=target,
        state_changed_wall_ms=now_wall_ms,
        reason=lease.reason if reason is None else reason,
        revoked_by=lease.revoked_by if revoked_by is None else revoked_by,
    )


def _check_now(now_mono: float) -> None:
    if (
        isinstance(now_mono, bool)
        or not isinstance(now_mono, (int, float))
        or not math.isfinite(now_mono)
    ):
        raise BadRequest(f"now_mono must be a finite number, got {now_mono!r}", code="bad_request")


def _latest_records(leases: Iterable[Lease]) -> tuple[Lease, ...]:
    """Each lease once, in its last version (several changes may touch one lease)."""
    latest: dict[str, Lease] = {}
    for lease in leases:
        latest.pop(lease.lease_id, None)
        latest[lease.lease_id] = lease
    return tuple(latest.values())


def _expiry_due(lease: Lease, now_mono: float, margin_s: float) -> bool:
    return lease.holding and now_mono > lease.expires_mono + margin_s


@dataclass(frozen=True, slots=True)
class LeaseTable:
    """The control plane's leases. Immutable: operations return ``(table, result)``.

    ``term`` is the control plane's term; ``next_seq`` the sequence number of the next
    token (every issued token is ``(term, next_seq)`` and ``next_seq`` only grows within a
    term). ``incarnation_id`` is drawn at each start (with ``term``, the
    :attr:`incarnation` every answer carries). ``window`` is the per-node resumption of
    safety rule 5 (``None``: nothing to wait for); ``marks`` what each node reported to
    this incarnation; ``claims`` the node-local claims nodes reported, keyed by
    ``(node, claim_id)`` — their GPUs are busy. Neither marks nor claims are persisted:
    a new incarnation hears them again.
    """

    term: int
    next_seq: int
    leases: Mapping[str, Lease]
    settings: LeaseSettings = field(default_factory=LeaseSettings)
    incarnation_id: str = "initial"
    window: ResumeWindow | None = None
    marks: Mapping[str, ReportMark] = field(default_factory=lambda: MappingProxyType({}))
    claims: Mapping[tuple[str, str], Claim] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, low in (("term", 0), ("next_seq", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadRequest(
                    f"lease table {name} must be an integer >= {low}", code="bad_record"
                )
        Incarnation(self.term, self.incarnation_id)  # validates the id
        for name in ("leases", "marks", "claims"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    @property
    def incarnation(self) -> Incarnation:
        return Incarnation(self.term, self.incarnation_id)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        settings: LeaseSettings | None = None,
        *,
        term: int = 1,
        incarnation_id: str = "initial",
    ) -> LeaseTable:
        """An empty table for a brand-new cluster (``populi init``): nothing was ever
        granted, so there is nothing to wait for."""
        return cls(
            term=term,
            next_seq=1,
            leases={},
            settings=settings or LeaseSettings(),
            incarnation_id=incarnation_id,
        )

    def _window(
        self, now_mono: float, authority_from_mono: float | None, longest_ttl_s: float | None
    ) -> ResumeWindow:
        _check_now(now_mono)
        authority = now_mono if authority_from_mono is None else authority_from_mono
        _check_now(authority)
        longest = self.settings.max_lease_ttl_s if longest_ttl_s is None else longest_ttl_s
        if isinstance(longest, bool) or not isinstance(longest, (int, float)) or longest < 0:
            raise BadRequest(f"longest_ttl_s must be >= 0, got {longest!r}", code="bad_request")
        longest = max(longest, self.settings.max_lease_ttl_s)
        # A lease unknown here was last renewed before the previous authority ended: its
        # holder's own deadline (from when it sent that renewal) passed by then + its TTL;
        # the margin covers the drift between the holder's clock and this one.
        silent_until = max(now_mono, authority) + longest + self.settings.expiry_margin_s
        return ResumeWindow(now_mono, authority, silent_until)

    @classmethod
    def restore(
        cls,
        leases: Iterable[Lease],
        *,
        term: int,
        next_seq: int,
        settings: LeaseSettings,
        now_mono: float,
        incarnation_id: str,
        longest_ttl_s: float | None = None,
        resume: bool = True,
    ) -> LeaseTable:
        """Rebuild after a control-plane restart from the persisted leases (safety rule
        5): every holding lease counts as renewed at restart (``expires_mono = now_mono +
        ttl_s``), because the holder may have renewed it just before the crash and
        renewals are not persisted. ``next_seq`` is raised above every persisted token of
        ``term``, so a lost counter can never reissue a token. Raises :class:`StoreError`
        if the persisted leases break the table's invariants.

        Grants then resume per node (:class:`ResumeWindow`): the previous process has
        ended (one agent per data directory), and a node that does not report keeps its
        GPUs until ``now_mono + longest_ttl_s + expiry_margin_s``. ``longest_ttl_s``: the
        longest TTL any lease may still carry (default and floor ``max_lease_ttl_s``; pass
        the largest value the setting ever had, in case it was lowered). ``resume=False``
        only when no lease this table does not hold can exist (a cluster that never
        granted one)."""
        _check_now(now_mono)
        by_id: dict[str, Lease] = {}
        for lease in leases:
            if lease.lease_id in by_id:
                raise StoreError(f"lease {lease.lease_id} is stored twice", code="lease_store")
            if lease.token.term > term:
                raise StoreError(
                    f"lease {lease.lease_id} carries token {lease.token} from a term above the "
                    f"current term {term}; refusing to issue lower tokens",
                    code="lease_store",
                )
            renewed = lease.holding and lease.kind != "fence"
            by_id[lease.lease_id] = replace(
                lease, expires_mono=now_mono + lease.ttl_s if renewed else math.inf
            )
        seqs = [lease.token.seq for lease in by_id.values() if lease.token.term == term]
        table = cls(
            term=term,
            next_seq=max([next_seq, *(seq + 1 for seq in seqs)]),
            leases=by_id,
            settings=settings,
            incarnation_id=incarnation_id,
        )
        if resume:
            table = replace(table, window=table._window(now_mono, None, longest_ttl_s))
        problem = table.invariant_violation()
        if problem is not None:
            raise StoreError(f"persisted leases are inconsistent: {problem}", code="lease_store")
        return table

    def set_term(
        self,
        term: int,
        *,
        now_mono: float,
        incarnation_id: str,
        authority_from_mono: float | None = None,
        longest_ttl_s: float | None = None,
    ) -> LeaseTable:
        """Adopt a new term after winning an election: tokens restart at ``(term, 1)``,
        which outranks every token of earlier terms. Grants resume per node: from
        ``authority_from_mono`` (when the previous leader's authority has provably ended;
        default now — ADR 0011: it has ended when the election is won), on each node once
        it reported to this incarnation, on a silent one once any lease it holds unknown
        here could have expired. Reports of the previous incarnation are forgotten.
        Renewals go on."""
        _check_now(now_mono)
        if isinstance(term, bool) or not isinstance(term, int) or term <= self.term:
            raise Conflict(
                f"term {term} is not above the current term {self.term}", code="stale_term"
            )
        return replace(
            self,
            term=term,
            next_seq=1,
            incarnation_id=incarnation_id,
            window=self._window(now_mono, authority_from_mono, longest_ttl_s),
            marks=MappingProxyType({}),
            claims=MappingProxyType({}),
        )

    # -- queries --------------------------------------------------------------------------

    def find(self, lease_id: str) -> Lease | None:
        return self.leases.get(lease_id)

    def get(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r}", lease_id=lease_id)
        return lease

    def by_task(self, task_id: str) -> tuple[Lease, ...]:
        """Every lease of ``task_id``, oldest token first."""
        return tuple(
            sorted((x for x in self.leases.values() if x.task_id == task_id), key=lambda x: x.token)
        )

    def by_node(self, node: str) -> tuple[Lease, ...]:
        """Every lease held by ``node``, oldest token first."""
        return tuple(
            sorted((x for x in self.leases.values() if x.holder == node), key=lambda x: x.token)
        )

    def in_state(self, *states: LeaseState) -> tuple[Lease, ...]:
        return tuple(
            sorted((x for x in self.leases.values() if x.state in states), key=lambda x: x.token)
        )

    def holding(self) -> tuple[Lease, ...]:
        return self.in_state(*HOLDING_STATES)

    def latest(self, task_id: str) -> Lease | None:
        leases = self.by_task(task_id)
        return leases[-1] if leases else None

    def live_gpus(self) -> frozenset[tuple[str, str]]:
        """``(node, GPU UUID)`` of every GPU in a holding lease."""
        return frozenset(
            (lease.holder, gpu)
            for lease in self.leases.values()
            if lease.holding
            for gpu in lease.gpus
        )

    def claimed_gpus(self) -> frozenset[tuple[str, str]]:
        """``(node, GPU UUID)`` of every GPU in a node-local claim its node reported."""
        return frozenset((claim.node, gpu) for claim in self.claims.values() for gpu in claim.gpus)

    def busy_gpus(self) -> frozenset[tuple[str, str]]:
        """GPUs no grant may take: in a holding lease or in a reported claim."""
        return self.live_gpus() | self.claimed_gpus()

    def busy_on(self, node: str) -> frozenset[str] | None:
        """The GPUs of ``node`` this table holds busy (a holding lease, a reported claim);
        ``None`` while it cannot say: in a resumption window, before the node reported
        in full (ADR 0015), its own report says."""
        if self.window is not None and not self.reported(node):
            return None
        leased = (g for x in self.leases.values() if x.holding and x.holder == node for g in x.gpus)
        claimed = (
            g for (owner, _), claim in self.claims.items() if owner == node for g in claim.gpus
        )
        return frozenset((*leased, *claimed))

    def claims_of(self, node: str) -> tuple[Claim, ...]:
        return tuple(claim for (owner, _), claim in sorted(self.claims.items()) if owner == node)

    # -- per-node resumption (safety rule 5) ----------------------------------------------

    def reported(self, node: str) -> bool:
        """Whether ``node`` has reported in full to this incarnation."""
        return node in self.marks

    def report_mark(self, node: str) -> ReportMark | None:
        return self.marks.get(node)

    def grant_wait(self, node: str, now_mono: float) -> GrantWait | None:
        """Why grants on ``node`` must wait now, and until when at the latest; ``None``:
        they are open. First the previous authority, then the node's report."""
        _check_now(now_mono)
        window = self.window
        if window is None:
            return None
        if now_mono < window.authority_from_mono:
            return GrantWait("previous_authority_live", window.authority_from_mono)
        if not self.reported(node) and now_mono < window.silent_until_mono:
            return GrantWait("node_not_reported", window.silent_until_mono)
        return None

    def grants_open_for(self, node: str, now_mono: float) -> bool:
        """Whether this table grants on ``node`` now (a grant still checks everything else)."""
        return self.grant_wait(node, now_mono) is None

    def _wait_reasons(
        self, node: str | None, previous_node: str | None, now_mono: float
    ) -> tuple[list[str], float]:
        """The resumption refusals of an operation on ``node`` (None: it takes no GPU) for
        a task last placed on ``previous_node``, and the longest wait among them."""
        reasons: list[str] = []
        until = -math.inf
        window = self.window
        if window is None:
            return reasons, 0.0
        if now_mono < window.authority_from_mono:
            reasons.append("previous_authority_live")
            until = window.authority_from_mono
        if now_mono < window.silent_until_mono:
            if node is not None and not self.reported(node):
                reasons.append("node_not_reported")
                until = max(until, window.silent_until_mono)
            if previous_node is not None and not self.reported(previous_node):
                reasons.append("previous_node_not_reported")
                until = max(until, window.silent_until_mono)
        return reasons, max(0.0, until - now_mono)

    def next_deadline(self) -> float | None:
        """The earliest ``now_mono`` at which :meth:`expire_due` has work, or ``None``.
        (The first float strictly after ``expires_mono + margin``, so a timer that fires
        exactly then finds the lease due.)"""
        margin = self.settings.expiry_margin_s
        due = [
            math.nextafter(lease.expires_mono + margin, math.inf)
            for lease in self.leases.values()
            if lease.holding and math.isfinite(lease.expires_mono)
        ]
        return min(due) if due else None

    def invariant_violation(self) -> str | None:
        """A description of the first broken invariant, or ``None``: no GPU in two
        holding leases (persisted or learned from a report: they are one table), at most
        one holding lease per task key, no holding lease beside a completed one, every
        token below ``(term, next_seq)``, no GPU in two claims, every claim on its node."""
        gpus: dict[tuple[str, str], str] = {}
        keys: dict[str, str] = {}
        ceiling = FencingToken(self.term, self.next_seq)
        for lease in self.leases.values():
            if lease.token >= ceiling:
                return f"lease {lease.lease_id} token {lease.token} is not below {ceiling}"
            if lease.state in KEY_TAKING_STATES:
                other = keys.get(lease.task_key)
                if other is not None:
                    return f"task key {lease.task_key} taken by {other} and {lease.lease_id}"
                keys[lease.task_key] = lease.lease_id
            if lease.holding:
                for gpu in lease.gpus:
                    other = gpus.get((lease.holder, gpu))
                    if other is not None:
                        return f"GPU {lease.holder}/{gpu} in {other} and {lease.lease_id}"
                    gpus[(lease.holder, gpu)] = lease.lease_id
        claimed: dict[tuple[str, str], str] = {}
        for (node, claim_id), claim in self.claims.items():
            if claim.node != node or claim.claim_id != claim_id:
                return f"claim {claim.claim_id} of {claim.node} is filed under {node}/{claim_id}"
            for gpu in claim.gpus:
                other = claimed.get((node, gpu))
                if other is not None:
                    return f"GPU {node}/{gpu} in claims {other} and {claim_id}"
                claimed[(node, gpu)] = claim_id
        return None

    # -- operations -----------------------------------------------------------------------

    def _with(self, *changed: Lease, issued: bool = False) -> LeaseTable:
        leases = dict(self.leases)
        for lease in changed:
            leases[lease.lease_id] = lease
        return replace(
            self,
            leases=MappingProxyType(leases),
            next_seq=self.next_seq + 1 if issued else self.next_seq,
        )

    def _issue(
        self,
        *,
        lease_id: str,
        task_id: str,
        attempt: int,
        work_class: WorkClass,
        holder: str,
        submitter: str,
        gpus: tuple[str, ...],
        ttl_s: float,
        kind: LeaseKind,
        now_mono: float,
        now_wall_ms: int,
    ) -> Lease:
        if lease_id in self.leases:
            raise Conflict(f"lease id {lease_id!r} is already taken", code="lease_id_taken")
        return Lease(
            lease_id=lease_id,
            task_id=task_id,
            attempt=attempt,
            work_class=work_class,
            holder=holder,
            submitter=submitter,
            gpus=gpus,
            token=FencingToken(self.term, self.next_seq),
            ttl_s=ttl_s,
            state="live",
            kind=kind,
            granted_wall_ms=now_wall_ms,
            state_changed_wall_ms=now_wall_ms,
            expires_mono=math.inf if kind == "fence" else now_mono + ttl_s,
        )

    def _task_reasons(self, task_id: str, submitter: str, attempt: int) -> list[str]:
        """The refusals a grant gets from the task's own leases (owner, key, attempt)."""
        history = self.by_task(task_id)
        reasons: list[str] = []
        if any(lease.submitter != submitter for lease in history):
            reasons.append("not_task_owner")
        if any(lease.state in KEY_TAKING_STATES for lease in history):
            reasons.append("task_key_taken")
        if any(lease.state == "completed" for lease in history):
            reasons.append("task_completed")
        if history and attempt <= max(lease.attempt for lease in history):
            reasons.append("stale_attempt")
        return reasons

    def grant(
        self,
        request: GrantRequest,
        *,
        now_mono: float,
        now_wall_ms: int,
        lease_id: str,
        target: TargetView,
    ) -> tuple[LeaseTable, LeaseChange]:
        """Grant ``request`` or raise :class:`LeaseRefused` with every reason that
        applies. The token is ``(term, next_seq)``. A request with ``target ==
        submitter`` gives a ``local`` lease on the submitter's own GPUs. A retried
        request (same task, attempt, target, GPU count and TTL; its lease still holding)
        gets the same lease back as a replay, so a lost reply costs nothing.

        After a restart or a new term (safety rule 5) it also waits
        (:data:`RESUMPTION_REASONS`, with ``details.wait_s``) until the target — and the
        request's ``previous_node`` — reported to this incarnation, or could no longer hold
        a lease unknown here. GPUs in a reported claim are busy."""
        _check_now(now_mono)
        _check_ms(now_wall_ms, "now_wall_ms")
        _check_name(lease_id, "lease_id")
        if target.node_id != request.target:
            raise BadRequest(
                f"target view is for {target.node_id!r}, the request targets {request.target!r}",
                code="bad_request",
            )
        for lease in self.by_task(request.task_id):
            if (
                lease.holding
                and lease.attempt == request.attempt
                and lease.submitter == request.submitter
                and lease.holder == request.target
                and lease.kind != "fence"
                and len(lease.gpus) == request.gpus_wanted
                and lease.ttl_s == request.ttl_s
            ):
                return self, LeaseChange(lease, records=(), replay=True)
        waits, wait_s = self._wait_reasons(request.target, request.previous_node, now_mono)
        reasons = self._task_reasons(request.task_id, request.submitter, request.attempt)
        reasons += waits
        reasons += ttl_reasons(request.ttl_s, max_lease_ttl_s=self.settings.max_lease_ttl_s)
        if not target.eligible:
            reasons.append("node_ineligible")
            for reason in target.reasons:
                if reason not in reasons:
                    reasons.append(reason)
        busy = self.busy_gpus()
        misfit = dict(target.misfit_gpus)
        fitting = [g for g in target.allocatable_gpus if g not in misfit]
        free = [g for g in fitting if (target.node_id, g) not in busy]
        if len(fitting) < request.gpus_wanted <= len(target.allocatable_gpus):
            # Hints never authorize (rule 6): the GPUs are there, but by this control
            # plane's facts they lack the memory or model asked for. Waiting won't help.
            reasons.append(GPU_MISFIT)
            reasons.extend(_misfit_codes(misfit.values()))
        elif len(free) < request.gpus_wanted:
            reasons.append("no_free_gpu")
        if reasons:
            raise LeaseRefused(
                f"lease for task {request.task_id} on {request.target} refused: "
                f"{', '.join(reasons)}",
                reasons=reasons,
                task_id=request.task_id,
                **({"wait_s": round(wait_s, 3)} if waits else {}),
            )
        lease = self._issue(
            lease_id=lease_id,
            task_id=request.task_id,
            attempt=request.attempt,
            work_class=request.work_class,
            holder=request.target,
            submitter=request.submitter,
            gpus=tuple(free[: request.gpus_wanted]),
            ttl_s=request.ttl_s,
            kind="local" if request.target == request.submitter else "remote",
            now_mono=now_mono,
            now_wall_ms=now_wall_ms,
        )
        return self._with(lease, issued=True), LeaseChange(lease, records=(lease,))

    def local_grant(
        self,
        task_id: str,
        *,
        submitter: str,
        attempt: int,
        work_class: WorkClass,
        gpus_wanted: int,
        ttl_s: float,
        target: TargetView,
        lease_id: str,
        now_mono: float,
        now_wall_ms: int,
        previous_node: str | None = None,
    ) -> tuple[LeaseTable, LeaseChange]:
        """A first local attempt that uses GPUs: a ``local`` lease on the submitter's own
        GPUs, so they are never leased out at the same time. The same rules as
        :meth:`grant` (resumption, TTL, task key, eligibility, free GPUs)."""
        request = GrantRequest(
            task_id=task_id,
            attempt=attempt,
            work_class=work_class,
            target=submitter,
            gpus_wanted=gpus_wanted,
            ttl_s=ttl_s,
            submitter=submitter,
            previous_node=previous_node,
        )
        return self.grant(
            request, now_mono=now_mono, now_wall_ms=now_wall_ms, lease_id=lease_id, target=target
        )

    def renew(
        self,
        lease_id: str,
        holder: str,
        *,
        now_mono: float,
        now_wall_ms: int,
        before_start: bool = False,
        remote_refusal: str | None = None,
    ) -> tuple[LeaseTable, LeaseChange]:
        """Extend a live lease to ``now_mono + ttl_s``. Only a lease live on the control
        plane's own clock renews: past ``expires_mono`` it is refused (``lease_not_live``)
        even before :meth:`expire_due` declares it dead (safety rule 4). A revoking lease
        answers ``lease_revoked``: the holder must stop. Nothing to persist.

        A lease this table neither persisted nor learned is unknown: refused
        :class:`LeaseNotFound` (``details.reasons`` ``lease_unknown``, definitive: its holder
        never starts it) once the holder has reported to this incarnation — or could hold
        nothing unknown here any more; before that :class:`ReportNeeded` (not definitive:
        it may be in the holder's report).

        ``before_start``: the holder's renewal before it starts the task (safety rule 3).
        A remote lease is then refused for ``remote_refusal`` (the cluster settings now
        forbid remote execution: ``remote_disabled``, ``kill_switch``), so no remote
        attempt starts after the settings turned it off; a running one keeps renewing —
        unless the refusal is one of :data:`STOPPING_REFUSALS` (the kill switch): then every
        renewal of a remote lease is refused for it, so its holder stops the task (by the
        lease's deadline at the latest, safety rule 3)."""
        _check_now(now_mono)
        _check_ms(now_wall_ms, "now_wall_ms")
        lease = self.find(lease_id)
        if lease is None:
            window = self.window
            if (
                window is not None
                and not self.reported(holder)
                and now_mono < window.silent_until_mono
            ):
                raise ReportNeeded(
                    f"lease {lease_id} is not known to this control plane yet: "
                    f"report to incarnation {self.incarnation} first",
                    lease_id=lease_id,
                    incarnation=self.incarnation.to_json(),
                )
            raise LeaseNotFound(
                f"no lease {lease_id!r} (neither persisted nor reported): do not start it",
                lease_id=lease_id,
                reasons=["lease_unknown"],
            )
        reasons: list[str] = []
        if lease.holder != holder:
            reasons.append("not_holder")
        elif lease.kind == "fence":
            reasons.append("lease_not_renewable")
        elif lease.kind == "remote" and remote_refusal in STOPPING_REFUSALS:
            reasons.append(remote_refusal)
        elif lease.state == "revoking":
            reasons.append("lease_revoked")
        elif "renew" not in TRANSITIONS[lease.state] or now_mono > lease.expires_mono:
            reasons.append("lease_not_live")
        elif before_start and lease.kind == "remote" and remote_refusal is not None:
            reasons.append(remote_refusal)
        if reasons:
            raise LeaseRefused(
                f"renewal of lease {lease_id} ({lease.state}) refused: {', '.join(reasons)}",
                reasons=reasons,
                lease_id=lease_id,
            )
        renewed = replace(lease, expires_mono=max(lease.expires_mono, now_mono + lease.ttl_s))
        return self._with(renewed), LeaseChange(renewed, records=())

    def release(
        self,
        lease_id: str,
        holder: str,
        *,
        outcome: ReleaseOutcome,
        now_mono: float,
        now_wall_ms: int,
        why: ReleaseReason | None = None,
    ) -> tuple[LeaseTable, LeaseChange]:
        """The holder ends its lease: ``stopped`` (the task is gone, not finished) makes
        it ``released`` (``revoked`` if it was revoking), its reason ``why`` when given,
        else ``released``; ``completed`` (the task finished) makes it ``completed``.
        Releasing a dead lease raises: dead stays dead. ``now_mono`` is unused (a release
        is always safe) but kept for a uniform shell."""
        _check_now(now_mono)
        lease = self.get(lease_id)
        if lease.holder != holder:
            raise LeaseRefused(
                f"{holder} does not hold lease {lease_id}",
                reasons=("not_holder",),
                lease_id=lease_id,
            )
        if outcome == "stopped":
            event: LeaseEvent = "release_stopped"
        elif outcome == "completed":
            event = "release_completed"
        else:
            raise BadRequest(
                f"release outcome {outcome!r} is not 'stopped' or 'completed'",
                code="bad_request",
                field="outcome",
            )
        reason = (
            "completed"
            if outcome == "completed"
            else (lease.reason if lease.state == "revoking" else why or "released")
        )
        after = _transition(lease, event, now_wall_ms=now_wall_ms, reason=reason)
        if after is None:
            return self, LeaseChange(lease, records=(), replay=True)
        return self._with(after), LeaseChange(after, records=(after,))

    def revoke(
        self, lease_id: str, *, actor: str, reason: str, now_mono: float, now_wall_ms: int
    ) -> tuple[LeaseTable, LeaseChange]:
        """Ask the holder to stop (``revoking``). The lease keeps its GPUs and task key
        until the holder releases it or it expires by the control plane's clock: a
        revoke alone never frees anything (safety rule 4)."""
        _check_now(now_mono)
        _check_name(actor, "actor")
        _check_name(reason, "reason")
        lease = self.get(lease_id)
        if lease.kind == "fence":
            raise LeaseRefused(
                f"lease {lease_id} fences a local attempt; the submitter ends it",
                reasons=("lease_not_revocable",),
                lease_id=lease_id,
            )
        after = _transition(
            lease, "revoke", now_wall_ms=now_wall_ms, reason=reason, revoked_by=actor
        )
        if after is None:
            return self, LeaseChange(lease, records=(), replay=True)
        return self._with(after), LeaseChange(after, records=(after,))

    def expire_due(
        self, *, now_mono: float, now_wall_ms: int
    ) -> tuple[LeaseTable, tuple[Lease, ...]]:
        """Declare dead every holding lease past ``expires_mono + expiry_margin_s``. The
        returned leases must be written durably before anyone is told (safety rule 4)."""
        _check_now(now_mono)
        margin = self.settings.expiry_margin_s
        expired: list[Lease] = []
        for lease in self.holding():
            if _expiry_due(lease, now_mono, margin):
                after = _transition(lease, "expire", now_wall_ms=now_wall_ms, reason="expired")
                assert after is not None
                expired.append(after)
        if not expired:
            return self, ()
        return self._with(*expired), tuple(expired)

    def confirm_dead_for_fallback(
        self,
        task_id: str,
        *,
        submitter: str,
        attempt: int,
        gpus: tuple[str, ...],
        local_node: str,
        ttl_s: float,
        lease_id: str,
        now_mono: float,
        now_wall_ms: int,
        work_class: WorkClass | None = None,
        previous_node: str | None = None,
    ) -> tuple[LeaseTable, LeaseChange]:
        """The control plane's word for a submitter's fallback (safety rules 1 and 4).

        If no lease of the task holds its key (the latest is dead, or there never was
        one), atomically issue the local attempt a higher token: with ``gpus`` a
        ``local`` lease (renewable, GPUs exclusive, ``ttl_s``); without, a ``fence``
        lease (no expiry; it keeps the task key and records the token). A holding lease
        due for expiry is declared dead in the same step (both go in ``records``).
        Refused: ``lease_live`` (holding: the submitter waits), ``task_completed``,
        ``not_task_owner``, ``stale_attempt``; a ``local`` lease also ``ttl_too_short``,
        ``ttl_too_long``, ``no_free_gpu`` (a reported claim counts). After a restart or a
        new term (safety rule 5) also :data:`RESUMPTION_REASONS`: the task's
        ``previous_node`` (where its last attempt was placed) has not reported, so a lease
        of the task unknown here may still run there; a ``local`` lease also waits for this
        node's own report. A retry whose lease already exists is a replay.
        ``work_class`` defaults to the latest lease's; it is required when there is none.
        """
        _check_now(now_mono)
        _check_ms(now_wall_ms, "now_wall_ms")
        _check_name(task_id, "task_id")
        _check_name(lease_id, "lease_id")
        _check_gpus(gpus)
        if local_node != submitter:
            raise BadRequest(
                f"a fallback runs on the submitter's own node {submitter!r}, not {local_node!r}",
                code="bad_request",
            )
        kind: LeaseKind = "local" if gpus else "fence"
        history = self.by_task(task_id)
        for lease in history:
            if (
                lease.holding
                and lease.attempt == attempt
                and lease.holder == local_node
                and lease.kind == kind
                and lease.gpus == gpus
            ):
                return self, LeaseChange(lease, records=(), replay=True)
        table = self
        records: list[Lease] = []
        margin = self.settings.expiry_margin_s
        for lease in history:
            if _expiry_due(lease, now_mono, margin):
                after = _transition(lease, "expire", now_wall_ms=now_wall_ms, reason="expired")
                assert after is not None
                records.append(after)
        if records:
            table = self._with(*records)
        history = table.by_task(task_id)
        reasons: list[str] = []
        if any(lease.submitter != submitter for lease in history):
            reasons.append("not_task_owner")
        if any(lease.state == "completed" for lease in history):
            reasons.append("task_completed")
        if any(lease.holding for lease in history):
            reasons.append("lease_live")
        if history and attempt <= max(lease.attempt for lease in history):
            reasons.append("stale_attempt")
        prior = history[-1] if history else None
        if work_class is None:
            if prior is None:
                raise BadRequest(
                    f"task {task_id} has no lease yet: the fallback must name its work class",
                    code="bad_request",
                    field="work_class",
                )
            work_class = prior.work_class
        waits, wait_s = table._wait_reasons(
            local_node if kind == "local" else None, previous_node, now_mono
        )
        reasons += waits
        if kind == "local":
            _check_ttl(ttl_s)
            reasons += ttl_reasons(ttl_s, max_lease_ttl_s=self.settings.max_lease_ttl_s)
            busy = table.busy_gpus()
            if any((local_node, gpu) in busy for gpu in gpus):
                reasons.append("no_free_gpu")
        if reasons:
            raise LeaseRefused(
                f"fallback for task {task_id} refused: {', '.join(reasons)}",
                reasons=reasons,
                task_id=task_id,
                **({"wait_s": round(wait_s, 3)} if waits else {}),
            )
        lease = table._issue(
            lease_id=lease_id,
            task_id=task_id,
            attempt=attempt,
            work_class=check_work_class(work_class),
            holder=local_node,
            submitter=submitter,
            gpus=gpus,
            ttl_s=ttl_s if kind == "local" else 0.0,
            kind=kind,
            now_mono=now_mono,
            now_wall_ms=now_wall_ms,
        )
        records.append(lease)
        return table._with(lease, issued=True), LeaseChange(
            lease, records=tuple(records), prior=prior
        )

    # -- what the nodes report (safety rule 5) ----------------------------------------------

    def learn(
        self,
        node: str,
        report: NodeHoldings | ReportChange,
        *,
        now_mono: float,
        now_wall_ms: int,
    ) -> tuple[LeaseTable, LearnResult]:
        """Adopt what ``node`` says it holds: everything (:class:`NodeHoldings`, a full
        report: its claims replace the ones this table had of it) or one numbered change
        (:class:`ReportChange`). :meth:`receive` calls it; the result's ``records`` must be
        written durably before the node is answered.

        For each lease it names (``node`` is its holder):

        - known here, held by the node: nothing changes (a persisted lease already counts
          as renewed at restart);
        - known here and ended on the node (``completed`` / ``stopped``) while still holding
          here: recorded ``completed`` / ``released`` (``revoked`` if it was revoking) —
          a release whose answer was lost; never ``expired``, so a finished task is never
          run again. One that already ended here stays as it is (a dead lease stays dead);
        - known here but held on the node while it ended here, or with other terms (task,
          token, GPUs, holder): refused (``lease_<state>``, ``lease_mismatch``);
        - unknown here (granted after the store this table restored from, or by a previous
          leader): adopted — held ones ``live`` until ``now_mono + ttl_s`` (the holder
          renewed it, at the latest, before the previous authority ended, which was before
          now), ended ones as ``completed`` (its task key stays taken) or ``released`` —
          unless it conflicts with what this table holds: a holding or completed lease of
          the task (``task_key_taken``), a newer lease of the task (``superseded``), one of
          its GPUs in a holding lease (``gpu_taken``), a token from a later term than
          this table's (``token_from_later_term``), another submitter's task
          (``not_task_owner``). A refused lease is never renewed here: its holder must not
          start it, and stops it if it runs. A conflicting ended lease is only
          acknowledged.

        Leases of ``node`` that the report does not name are left as they are: only their
        holder's release or their expiry frees them (safety rule 4)."""
        _check_now(now_mono)
        _check_ms(now_wall_ms, "now_wall_ms")
        _check_name(node, "node")
        full = isinstance(report, NodeHoldings)
        claims = dict(self.claims)
        if full:
            claims = {key: claim for key, claim in claims.items() if key[0] != node}
        else:
            assert isinstance(report, ReportChange)
            for claim_id in report.dropped_claims:
                claims.pop((node, claim_id), None)
        for claim in report.claims:
            if claim.node != node:
                raise BadRequest(
                    f"{node} reports claim {claim.claim_id} of {claim.node}", code="bad_report"
                )
            claims[(node, claim.claim_id)] = claim
        table = replace(self, claims=MappingProxyType(claims))
        problem = table.invariant_violation()
        if problem is not None:
            raise BadRequest(f"report of {node} refused: {problem}", code="bad_report")
        records: list[Lease] = []
        adopted: list[str] = []
        recorded: list[str] = []
        refused: list[RefusedLease] = []
        for reported in report.leases:
            table, lease, outcome = table._learn_lease(node, reported, now_mono, now_wall_ms)
            if lease is not None:
                records.append(lease)
            if outcome in {"adopted", "recorded"}:
                (adopted if outcome == "adopted" else recorded).append(reported.lease_id)
            elif outcome:
                refused.append(RefusedLease(reported.lease_id, outcome))
        problem = table.invariant_violation()
        assert problem is None, problem
        return table, LearnResult(tuple(records), tuple(adopted), tuple(recorded), tuple(refused))

    def _learn_lease(
        self, node: str, reported: ReportedLease, now_mono: float, now_wall_ms: int
    ) -> tuple[LeaseTable, Lease | None, str]:
        """One reported lease: ``(table, lease to persist or None, outcome)``, the outcome
        being ``adopted``, ``recorded``, a refusal reason, or ``""`` (nothing to do)."""
        lease = self.leases.get(reported.lease_id)
        if lease is not None:
            if (
                lease.holder != node
                or lease.task_id != reported.task_id
                or lease.attempt != reported.attempt
                or lease.token != reported.token
                or lease.gpus != reported.gpus
                or lease.kind != reported.kind
                or lease.submitter != reported.submitter
            ):
                return self, None, "lease_mismatch"
            if reported.held:
                return self, None, "" if lease.holding else f"lease_{lease.state}"
            if not lease.holding:
                return self, None, ""  # already ended here: a replay, or dead stays dead
            completed = reported.phase == "completed"
            after = _transition(
                lease,
                "release_completed" if completed else "release_stopped",
                now_wall_ms=now_wall_ms,
                reason="completed"
                if completed
                else (lease.reason if lease.state == "revoking" else "released"),
            )
            assert after is not None
            return self._with(after), after, "recorded"
        if (reported.kind == "remote") == (reported.submitter == node):
            return self, None, "lease_mismatch"
        if reported.token.term > self.term:
            return self, None, "token_from_later_term"
        history = self.by_task(reported.task_id)
        if any(x.token == reported.token for x in self.leases.values()):
            conflict = "lease_mismatch"  # a token is issued once: this one is another lease's
        elif any(x.submitter != reported.submitter for x in history):
            conflict = "not_task_owner"
        elif any(x.token > reported.token for x in history):
            conflict = "superseded"
        elif any(x.state in KEY_TAKING_STATES for x in history) and reported.phase != "stopped":
            conflict = "task_key_taken"
        elif reported.held and any((node, g) in self.live_gpus() for g in reported.gpus):
            conflict = "gpu_taken"
        else:
            conflict = ""
        if conflict:
            return self, None, conflict if reported.held else ""
        state: LeaseState = (
            "live"
            if reported.held
            else ("completed" if reported.phase == "completed" else "released")
        )
        learned = Lease(
            **grant_terms_of(reported),
            holder=node,
            state=state,
            kind=_as_kind(reported.kind),
            granted_wall_ms=(
                now_wall_ms if reported.granted_wall_ms is None else reported.granted_wall_ms
            ),
            state_changed_wall_ms=now_wall_ms,
            reason="" if state == "live" else ("completed" if state == "completed" else "released"),
            expires_mono=(
                now_mono + reported.ttl_s
                if state == "live" and reported.kind != "fence"
                else math.inf
            ),
        )
        table = self._with(learned)
        if reported.token.term == self.term and reported.token.seq >= self.next_seq:
            table = replace(table, next_seq=reported.token.seq + 1)
        return table, learned, "adopted" if reported.held else "recorded"

    def receive(
        self, message: ReportMessage, *, now_mono: float, now_wall_ms: int
    ) -> tuple[LeaseTable, ReportResult]:
        """A node's report (:mod:`populi_peer.core.reports`): judged against what this
        incarnation applied of the node (:func:`~populi_peer.core.reports.judge`), then
        learned (:meth:`learn`). A full report marks the node as reported: grants on it
        resume. A report for another incarnation is refused (``wrong_incarnation``); changes
        on top of a full report this table never got ask for a new one
        (``full_report_needed``); a duplicate is acknowledged again. Persist the result's
        ``records`` before the answer is sent."""
        mark = self.marks.get(message.node)
        judgement = judge(mark, message, self.incarnation)
        table = self
        learned = LearnResult()
        if judgement.verdict == "apply_full":
            assert isinstance(message, FullReport)
            table, learned = self.learn(
                message.node, message.holdings, now_mono=now_mono, now_wall_ms=now_wall_ms
            )
        elif judgement.verdict == "apply_changes":
            parts: list[LearnResult] = []
            for change in judgement.changes:
                table, part = table.learn(
                    message.node, change, now_mono=now_mono, now_wall_ms=now_wall_ms
                )
                parts.append(part)
            learned = LearnResult(
                records=_latest_records(lease for part in parts for lease in part.records),
                adopted=tuple(x for part in parts for x in part.adopted),
                recorded=tuple(x for part in parts for x in part.recorded),
                refused=tuple(x for part in parts for x in part.refused),
            )
        if judgement.verdict in ("apply_full", "apply_changes") and judgement.mark is not None:
            table = replace(
                table, marks=MappingProxyType({**table.marks, message.node: judgement.mark})
            )
        now_mark = judgement.mark
        answer = ReportAnswer(
            incarnation=self.incarnation,
            status=judgement.status,
            epoch=now_mark.epoch if now_mark is not None else 0,
            acked_seq=now_mark.last_seq if now_mark is not None else 0,
            refused=learned.refused,
        )
        return table, ReportResult(answer, learned)

    def reconcile(
        self,
        holder_status: Mapping[str, HolderStatus],
        *,
        auto_revoke: bool,
        now_mono: float,
        now_wall_ms: int,
        actor: str = CONTROL_PLANE_ACTOR,
    ) -> tuple[LeaseTable, ReconcileResult]:
        """Flag every holding (non-fence) lease whose holder is ``stale`` or
        ``quarantined``; with ``auto_revoke`` (a cluster setting, off by default) revoke
        the live ones (reason ``holder_stale`` / ``holder_quarantined``). A revoke only
        asks: the GPUs stay taken until release or expiry."""
        _check_now(now_mono)
        flagged: list[FlaggedLease] = []
        changed: list[Lease] = []
        for lease in self.holding():
            status = holder_status.get(lease.holder, "ok")
            if lease.kind == "fence" or status == "ok":
                continue
            if status not in ("stale", "quarantined"):
                raise BadRequest(f"unknown holder status {status!r}", code="bad_request")
            revoke_now = auto_revoke and lease.state == "live"
            if revoke_now:
                after = _transition(
                    lease,
                    "revoke",
                    now_wall_ms=now_wall_ms,
                    reason=f"holder_{status}",
                    revoked_by=actor,
                )
                assert after is not None
                changed.append(after)
            flagged.append(FlaggedLease(lease.lease_id, lease.holder, status, revoke_now))
        table = self._with(*changed) if changed else self
        return table, ReconcileResult(tuple(flagged), tuple(changed))

    def holders(self) -> tuple[str, ...]:
        """The nodes holding a (non-fence) lease: whom a reconcile pass looks at."""
        return tuple(sorted({lease.holder for lease in self.holding() if lease.kind != "fence"}))

    def reconcile_holders(
        self,
        holders: Mapping[str, HolderView],
        *,
        auto_revoke: bool,
        now_mono: float,
        now_wall_ms: int,
        drain_actor: str,
        actor: str = CONTROL_PLANE_ACTOR,
        remote_refusal: str | None = None,
    ) -> tuple[LeaseTable, ReconcileResult]:
        """One reconcile pass over what the control plane knows of each holder
        (:meth:`holders`): :meth:`reconcile` with each holder's :attr:`HolderView.status`,
        then every live (non-fence) lease of a holder whose drain deadline has passed is
        revoked by ``drain_actor`` (reason ``drain_deadline``), and, when
        ``remote_refusal`` (the settings' :func:`~populi_peer.core.settings.remote_refusal`)
        is one of :data:`STOPPING_REFUSALS`, every live remote lease is revoked by
        ``actor`` with it as the reason (``kill_switch``). A holder missing from
        ``holders`` counts as ``ok`` and not draining. Like every revoke, it only asks:
        the GPUs stay taken until release or expiry (safety rule 4)."""
        _check_ms(now_wall_ms, "now_wall_ms")
        _check_name(drain_actor, "drain_actor")
        statuses = {holder: view.status for holder, view in holders.items()}
        table, result = self.reconcile(
            statuses,
            auto_revoke=auto_revoke,
            now_mono=now_mono,
            now_wall_ms=now_wall_ms,
            actor=actor,
        )
        changed = {lease.lease_id: lease for lease in result.records}
        overdue = {holder for holder, view in holders.items() if view.drain_overdue(now_wall_ms)}
        stopping = remote_refusal if remote_refusal in STOPPING_REFUSALS else None
        for lease in table.holding():
            if lease.kind == "fence" or lease.state != "live":
                continue
            if stopping is not None and lease.kind == "remote":
                reason, by = stopping, actor
            elif lease.holder in overdue:
                reason, by = DRAIN_DEADLINE_REASON, drain_actor
            else:
                continue
            after = _transition(
                lease, "revoke", now_wall_ms=now_wall_ms, reason=reason, revoked_by=by
            )
            assert after is not None
            changed[after.lease_id] = after
        if len(changed) == len(result.records):
            return table, result
        table = self._with(*changed.values())
        return table, ReconcileResult(result.flagged, tuple(changed.values()))


__all__ = [
    "CONTROL_PLANE_ACTOR",
    "DEAD_STATES",
    "DRAIN_DEADLINE_REASON",
    "GPU_MISFIT",
    "HOLDING_STATES",
    "KEY_TAKING_STATES",
    "LEASE_KINDS",
    "LEASE_STATES",
    "MIN_LEASE_TTL_S",
    "RELEASE_REASONS",
    "RENEW_TIMEOUT_FLOOR_S",
    "REPLAYS",
    "RESUMPTION_REASONS",
    "STOPPING_REFUSALS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "WORKER_LEFT",
    "FlaggedLease",
    "GrantRequest",
    "GrantWait",
    "HolderStatus",
    "HolderView",
    "IllegalLeaseTransition",
    "LearnResult",
    "Lease",
    "LeaseChange",
    "LeaseEvent",
    "LeaseKind",
    "LeaseNotFound",
    "LeaseRefused",
    "LeaseSettings",
    "LeaseState",
    "LeaseTable",
    "ReconcileResult",
    "ReleaseOutcome",
    "ReleaseReason",
    "ReportNeeded",
    "ReportResult",
    "ResumeWindow",
    "TargetView",
    "renew_interval_s",
    "renew_timeout_s",
    "stop_margin_floor_s",
    "task_key",
    "ttl_reasons",
    "validate_stop_margin",
    "worker_deadline_boot",
    "worker_stop_at_boot",
]
