"""Full reports: what a node tells each control-plane incarnation it holds (safety rule 5).

A control plane that restarts (and, once elections exist, a newly elected one) does not
know everything the nodes hold: a lease granted after the store it restored from, a
release whose answer never came, a node-local claim made while nobody could be reached.
Instead of waiting everything out, it learns it from the nodes.

- Every control-plane answer carries its :class:`Incarnation`: the term and an id drawn at
  each start. A node that sees an incarnation it has not reported to sends a
  :class:`FullReport` — every lease it accepted, runs, or ended without the release being
  acknowledged (:class:`ReportedLease`), and its node-local claims (:class:`Claim`) —
  numbered ``seq`` in the node's ``epoch`` (an integer the node persists and raises at
  every agent start, so a report from before a node restart can never pass for a newer one).
- After it, every heartbeat carries :class:`ReportChanges`: the changes since, each
  numbered, all those not yet acknowledged (so a lost heartbeat loses nothing), on top of
  the full report they build on (``base_seq``) — an empty list still names it.
- The control plane keeps, per node, a :class:`ReportMark` (epoch, the full report's seq,
  the last change applied). :func:`judge` decides what a message is: a full report or
  changes to apply, a duplicate (already applied: acknowledge again), stale (older than what
  it holds: ignore), a **gap** (changes on top of a full report it never got — the full
  report was lost, or the node restarted: it asks for a new full report), or addressed to
  another incarnation (refused: the node reports to the one that answered).
- :class:`ReportAnswer` acknowledges the highest seq applied and names the leases the
  control plane refused to adopt (the node must not start them and stops them if running).

:class:`NodeReporter` is the node's side: which incarnation it reports to, the numbering,
the changes not yet acknowledged. It computes changes by comparing the holdings the shell
gives it with what it already sent, so the shell never has to remember to report a change.
Nothing of it is persisted except ``epoch``: after a node restart it reports in full.

What the control plane does with a report is :meth:`populi_peer.core.leases.LeaseTable.receive`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict, TypeVar, get_args

from populi_peer import PROTOCOL_VERSION
from populi_peer.core.fencing import (
    FencingToken,
    _bad,
    _float,
    _get,
    _int,
    _obj,
    _opt_int,
    _opt_str,
    _str,
    _str_tuple,
    one_of,
)
from populi_peer.core.policy import WorkClass, check_work_class
from populi_peer.core.wire import ID_RE, FieldsRecord, record_json
from populi_peer.errors import BadRequest

if TYPE_CHECKING:
    from populi_peer.core.leases import Lease

#: How far a node got with a lease it holds: ``accepted`` (handed over, not started),
#: ``started`` (running, or left over: it may still run), or ended with its release not
#: acknowledged yet: ``completed`` (the command ran to its end) or ``stopped`` (it did not,
#: or never started).
ReportedPhase = Literal["accepted", "started", "completed", "stopped"]
#: The lease kinds of :mod:`populi_peer.core.leases` (a test pins that they are the same).
ReportedKind = Literal["remote", "local", "fence"]
REPORTED_PHASES: Final[tuple[ReportedPhase, ...]] = get_args(ReportedPhase)
REPORTED_KINDS: Final[tuple[ReportedKind, ...]] = get_args(ReportedKind)
#: Phases in which the node holds the lease (its GPUs and task key).
HELD_PHASES: Final[frozenset[ReportedPhase]] = frozenset({"accepted", "started"})
#: Phases of an attempt that ended while its release is not acknowledged.
ENDED_PHASES: Final[frozenset[ReportedPhase]] = frozenset({"completed", "stopped"})

#: What the control plane answers a report with.
AnswerStatus = Literal["applied", "duplicate", "full_report_needed", "wrong_incarnation"]
ANSWER_STATUSES: Final[tuple[AnswerStatus, ...]] = get_args(AnswerStatus)
#: What :func:`judge` makes of a report.
Verdict = Literal["apply_full", "apply_changes", "duplicate", "stale", "gap", "wrong_incarnation"]

_S = TypeVar("_S", bound=str)
_T = TypeVar("_T")

_WHAT_ANSWER: Final[Mapping[Verdict, AnswerStatus]] = {
    "apply_full": "applied",
    "apply_changes": "applied",
    "duplicate": "duplicate",
    "stale": "duplicate",
    "gap": "full_report_needed",
    "wrong_incarnation": "wrong_incarnation",
}


def _name(value: object, what: str, name: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise BadRequest(
            f"{what}: {name} must be an id (1-128 of A-Z a-z 0-9 . _ : -), got {value!r}",
            code="bad_report",
            field=name,
        )
    return value


def _count(value: object, what: str, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        raise BadRequest(
            f"{what}: {name} must be an integer >= {low}, got {value!r}",
            code="bad_report",
            field=name,
        )
    return value


def _gpus(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, tuple) or not all(isinstance(g, str) and g for g in value):
        raise BadRequest(f"{what}: gpus must be GPU UUIDs, got {value!r}", code="bad_report")
    if len(set(value)) != len(value):
        raise BadRequest(f"{what}: gpus {value!r} name a GPU twice", code="bad_report")
    return value


def _pick(value: str, choices: tuple[_S, ...], what: str, name: str) -> _S:
    choice = one_of(value, choices)
    if choice is None:
        raise BadRequest(
            f"{what}: {name} {value!r} is not one of {', '.join(choices)}",
            code="bad_report",
            field=name,
        )
    return choice


# -- the incarnation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Incarnation:
    """One run of one control plane: its term and an id drawn at its start. A restart keeps
    the term (until elections) and draws a new id; every answer of the control plane
    carries it, so a node knows when it faces one it has not reported to."""

    term: int
    incarnation_id: str

    def __post_init__(self) -> None:
        _count(self.term, "incarnation", "term", 0)
        _name(self.incarnation_id, "incarnation", "incarnation_id")

    def __str__(self) -> str:
        return f"{self.term}/{self.incarnation_id}"

    def to_json(self) -> dict[str, Any]:
        return {"term": self.term, "id": self.incarnation_id}

    @classmethod
    def from_json(cls, data: object) -> Incarnation:
        obj = _obj(data, "incarnation")
        return cls(_int(obj, "term", "incarnation"), _str(obj, "id", "incarnation"))


# -- what a node holds ----------------------------------------------------------------------


class GrantTerms(TypedDict):
    """What a lease was granted with, which a lease record and a node's account of it
    both carry (:class:`~populi_peer.core.leases.Lease`, :class:`ReportedLease`)."""

    lease_id: str
    task_id: str
    attempt: int
    work_class: WorkClass
    submitter: str
    gpus: tuple[str, ...]
    token: FencingToken
    ttl_s: float


def grant_terms(obj: Mapping[str, Any], what: str) -> GrantTerms:
    """The :class:`GrantTerms` of the JSON object ``obj`` of a ``what`` record."""
    return GrantTerms(
        lease_id=_str(obj, "lease_id", what),
        task_id=_str(obj, "task_id", what),
        attempt=_int(obj, "attempt", what),
        work_class=check_work_class(_str(obj, "work_class", what)),
        submitter=_str(obj, "submitter", what),
        gpus=_str_tuple(obj, "gpus", what),
        token=FencingToken.parse(_get(obj, "token", what)),
        ttl_s=_float(obj, "ttl_s", what),
    )


def grant_terms_of(record: Lease | ReportedLease) -> GrantTerms:
    """The :class:`GrantTerms` of a lease record or of a node's account of one: what the
    control plane learns a reported lease with, and what a lease is reported with."""
    return GrantTerms(
        lease_id=record.lease_id,
        task_id=record.task_id,
        attempt=record.attempt,
        work_class=record.work_class,
        submitter=record.submitter,
        gpus=record.gpus,
        token=record.token,
        ttl_s=record.ttl_s,
    )


@dataclass(frozen=True, slots=True)
class ReportedLease(FieldsRecord):
    """The node's account of one lease it holds as holder (a worker's remote lease, or a
    submitter's own ``local`` lease or ``fence``), and how far it got with it."""

    lease_id: str
    task_id: str
    attempt: int
    work_class: WorkClass
    submitter: str
    gpus: tuple[str, ...]
    token: FencingToken
    ttl_s: float
    kind: ReportedKind
    phase: ReportedPhase
    #: When the control plane granted it (UTC ms), if the node knows.
    granted_wall_ms: int | None = None

    def __post_init__(self) -> None:
        what = "reported lease"
        _check_held(self, what, ("lease_id", "task_id", "submitter"))
        check_work_class(self.work_class)
        _gpus(self.gpus, what)
        _pick(self.kind, REPORTED_KINDS, what, "kind")
        _pick(self.phase, REPORTED_PHASES, what, "phase")
        ttl = self.ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
            raise BadRequest(f"{what}: ttl_s must be a finite number", code="bad_report")
        if self.kind == "fence" and (self.gpus or ttl != 0):
            raise BadRequest(f"{what}: a fence has no GPUs and no TTL", code="bad_report")
        if self.kind != "fence" and ttl <= 0:
            raise BadRequest(f"{what}: ttl_s must be > 0", code="bad_report")
        if self.granted_wall_ms is not None:
            _count(self.granted_wall_ms, what, "granted_wall_ms", 0)

    @property
    def held(self) -> bool:
        return self.phase in HELD_PHASES

    @property
    def ended(self) -> bool:
        return self.phase in ENDED_PHASES

    @classmethod
    def from_json(cls, data: object) -> ReportedLease:
        what = "reported lease"
        obj = _obj(data, what)
        return cls(
            **grant_terms(obj, what),
            kind=_pick(_str(obj, "kind", what), REPORTED_KINDS, what, "kind"),
            phase=_pick(_str(obj, "phase", what), REPORTED_PHASES, what, "phase"),
            granted_wall_ms=_opt_int(obj, "granted_wall_ms", what),
        )


@dataclass(frozen=True, slots=True)
class Claim(FieldsRecord):
    """A node-local claim: GPUs of ``node`` that a local attempt uses without a lease,
    because no control plane could be reached (safety rule 1). The node refuses remote
    work on them; a control plane that hears of it counts them as busy. ``lease_id``: the
    local lease the attempt held before its renewals went unanswered, if any."""

    claim_id: str
    node: str
    task_id: str
    attempt: int
    token: FencingToken
    gpus: tuple[str, ...]
    made_wall_ms: int
    lease_id: str | None = None

    def __post_init__(self) -> None:
        what = "claim"
        _check_held(self, what, ("claim_id", "node", "task_id"))
        if not _gpus(self.gpus, what):
            raise BadRequest(f"{what}: a claim takes at least one GPU", code="bad_report")
        _count(self.made_wall_ms, what, "made_wall_ms", 0)
        if self.lease_id is not None:
            _name(self.lease_id, what, "lease_id")

    @classmethod
    def from_json(cls, data: object) -> Claim:
        what = "claim"
        obj = _obj(data, what)
        return cls(
            claim_id=_str(obj, "claim_id", what),
            node=_str(obj, "node", what),
            task_id=_str(obj, "task_id", what),
            attempt=_int(obj, "attempt", what),
            token=FencingToken.parse(_get(obj, "token", what)),
            gpus=_str_tuple(obj, "gpus", what),
            made_wall_ms=_int(obj, "made_wall_ms", what),
            lease_id=_opt_str(obj, "lease_id", what),
        )


def _check_held(record: ReportedLease | Claim, what: str, ids: tuple[str, ...]) -> None:
    """What a reported lease and a claim both are: ids (the fields ``ids``), an attempt
    from 1 and a fencing token."""
    for name in ids:
        _name(getattr(record, name), what, name)
    _count(record.attempt, what, "attempt", 1)
    if not isinstance(record.token, FencingToken):
        raise BadRequest(f"{what}: token must be a FencingToken", code="bad_report")


def _unique_sorted(items: Iterable[_T], key_of: Any, what: str) -> tuple[_T, ...]:
    out = tuple(sorted(items, key=key_of))
    keys = [key_of(item) for item in out]
    if len(set(keys)) != len(keys):
        raise BadRequest(f"{what}: an id is listed twice", code="bad_report")
    return out


def _lease_key(lease: ReportedLease) -> str:
    return lease.lease_id


def _claim_key(claim: Claim) -> str:
    return claim.claim_id


@dataclass(frozen=True, slots=True)
class NodeHoldings(FieldsRecord):
    """Everything a node holds, as it reports it: its leases (by id) and its claims."""

    leases: tuple[ReportedLease, ...] = ()
    claims: tuple[Claim, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "leases", _unique_sorted(self.leases, _lease_key, "holdings leases")
        )
        object.__setattr__(
            self, "claims", _unique_sorted(self.claims, _claim_key, "holdings claims")
        )

    def lease(self, lease_id: str) -> ReportedLease | None:
        return next((x for x in self.leases if x.lease_id == lease_id), None)

    @classmethod
    def from_json(cls, data: object) -> NodeHoldings:
        obj = _obj(data, "holdings")
        return cls(
            leases=tuple(ReportedLease.from_json(x) for x in _list(obj, "leases", "holdings")),
            claims=tuple(Claim.from_json(x) for x in _list(obj, "claims", "holdings")),
        )


def _list(obj: Mapping[str, Any], key: str, what: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise _bad(what, key, "a list", value)
    return value


EMPTY_HOLDINGS: Final = NodeHoldings()


@dataclass(frozen=True, slots=True)
class ReportChange(FieldsRecord):
    """One numbered change of a node's holdings: leases new or changed, leases it no
    longer holds (their release was acknowledged, or they never started), claims made,
    claims ended."""

    seq: int
    leases: tuple[ReportedLease, ...] = ()
    dropped_leases: tuple[str, ...] = ()
    claims: tuple[Claim, ...] = ()
    dropped_claims: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _count(self.seq, "report change", "seq", 1)
        object.__setattr__(self, "leases", _unique_sorted(self.leases, _lease_key, "change"))
        object.__setattr__(self, "claims", _unique_sorted(self.claims, _claim_key, "change"))
        for name in ("dropped_leases", "dropped_claims"):
            ids = tuple(sorted(getattr(self, name)))
            for value in ids:
                _name(value, "report change", name)
            if len(set(ids)) != len(ids):
                raise BadRequest(f"report change: {name} lists an id twice", code="bad_report")
            object.__setattr__(self, name, ids)
        if {x.lease_id for x in self.leases} & set(self.dropped_leases) or {
            x.claim_id for x in self.claims
        } & set(self.dropped_claims):
            raise BadRequest("report change: an id is both changed and dropped", code="bad_report")

    @property
    def empty(self) -> bool:
        return not (self.leases or self.dropped_leases or self.claims or self.dropped_claims)

    def apply_to(self, holdings: NodeHoldings) -> NodeHoldings:
        """``holdings`` with this change made."""
        leases = {x.lease_id: x for x in holdings.leases}
        for lease_id in self.dropped_leases:
            leases.pop(lease_id, None)
        leases.update((x.lease_id, x) for x in self.leases)
        claims = {x.claim_id: x for x in holdings.claims}
        for claim_id in self.dropped_claims:
            claims.pop(claim_id, None)
        claims.update((x.claim_id, x) for x in self.claims)
        return NodeHoldings(tuple(leases.values()), tuple(claims.values()))

    @classmethod
    def from_json(cls, data: object) -> ReportChange:
        what = "report change"
        obj = _obj(data, what)
        return cls(
            seq=_int(obj, "seq", what),
            leases=tuple(ReportedLease.from_json(x) for x in _list(obj, "leases", what)),
            dropped_leases=(
                _str_tuple(obj, "dropped_leases", what) if "dropped_leases" in obj else ()
            ),
            claims=tuple(Claim.from_json(x) for x in _list(obj, "claims", what)),
            dropped_claims=(
                _str_tuple(obj, "dropped_claims", what) if "dropped_claims" in obj else ()
            ),
        )


def diff_holdings(before: NodeHoldings, after: NodeHoldings, *, seq: int) -> ReportChange:
    """The change that turns ``before`` into ``after``, numbered ``seq`` (maybe empty)."""
    old_leases = {x.lease_id: x for x in before.leases}
    new_leases = {x.lease_id: x for x in after.leases}
    old_claims = {x.claim_id: x for x in before.claims}
    new_claims = {x.claim_id: x for x in after.claims}
    return ReportChange(
        seq=seq,
        leases=tuple(x for k, x in new_leases.items() if old_leases.get(k) != x),
        dropped_leases=tuple(k for k in old_leases if k not in new_leases),
        claims=tuple(x for k, x in new_claims.items() if old_claims.get(k) != x),
        dropped_claims=tuple(k for k in old_claims if k not in new_claims),
    )


# -- messages -------------------------------------------------------------------------------


def _check_owned(node: str, holdings: Iterable[Claim]) -> None:
    for claim in holdings:
        if claim.node != node:
            raise BadRequest(
                f"report of {node}: claim {claim.claim_id} is {claim.node}'s", code="bad_report"
            )


@dataclass(frozen=True, slots=True)
class FullReport:
    """Everything ``node`` holds, for ``incarnation``, numbered ``seq`` in the node's
    ``epoch``."""

    node: str
    incarnation: Incarnation
    epoch: int
    seq: int
    holdings: NodeHoldings

    def __post_init__(self) -> None:
        _name(self.node, "full report", "node")
        _count(self.epoch, "full report", "epoch", 0)
        _count(self.seq, "full report", "seq", 1)
        _check_owned(self.node, self.holdings.claims)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "type": "full",
            **record_json(self, omit=("holdings",)),
            **self.holdings.to_json(),
        }


@dataclass(frozen=True, slots=True)
class ReportChanges:
    """The changes of ``node`` not yet acknowledged, numbered consecutively above the full
    report ``base_seq`` they build on (none: the heartbeat still names the base)."""

    node: str
    incarnation: Incarnation
    epoch: int
    base_seq: int
    changes: tuple[ReportChange, ...] = ()

    def __post_init__(self) -> None:
        _name(self.node, "report changes", "node")
        _count(self.epoch, "report changes", "epoch", 0)
        _count(self.base_seq, "report changes", "base_seq", 1)
        seqs = [change.seq for change in self.changes]
        if seqs and (seqs[0] <= self.base_seq or seqs != list(range(seqs[0], seqs[-1] + 1))):
            raise BadRequest(
                f"report changes: seqs {seqs} are not consecutive above {self.base_seq}",
                code="bad_report",
            )
        for change in self.changes:
            _check_owned(self.node, change.claims)

    @property
    def last_seq(self) -> int:
        return self.changes[-1].seq if self.changes else self.base_seq

    def to_json(self) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "type": "changes", **record_json(self)}


ReportMessage = FullReport | ReportChanges


def report_from_json(data: object) -> ReportMessage:
    """Parse a report a node sent (``type`` ``full`` or ``changes``); anything malformed
    raises :class:`BadRequest` (``bad_report``/``bad_record``) naming the field."""
    what = "report"
    obj = _obj(data, what)
    kind = _str(obj, "type", what)
    node = _str(obj, "node", what)
    incarnation = Incarnation.from_json(_get(obj, "incarnation", what))
    epoch = _int(obj, "epoch", what)
    if kind == "full":
        return FullReport(
            node=node,
            incarnation=incarnation,
            epoch=epoch,
            seq=_int(obj, "seq", what),
            holdings=NodeHoldings.from_json(obj),
        )
    if kind == "changes":
        return ReportChanges(
            node=node,
            incarnation=incarnation,
            epoch=epoch,
            base_seq=_int(obj, "base_seq", what),
            changes=tuple(ReportChange.from_json(x) for x in _list(obj, "changes", what)),
        )
    raise BadRequest(f"report: type {kind!r} is not 'full' or 'changes'", code="bad_report")


@dataclass(frozen=True, slots=True)
class RefusedLease(FieldsRecord):
    """A reported lease the control plane will not adopt or renew: the node must not start
    it, and stops it if it runs. ``reason``: ``lease_mismatch``, ``lease_<state>`` (it
    ended here: ``lease_expired``, ``lease_completed``...), ``task_key_taken``,
    ``gpu_taken``, ``superseded``, ``token_from_later_term``."""

    lease_id: str
    reason: str

    @classmethod
    def from_json(cls, data: object) -> RefusedLease:
        obj = _obj(data, "refused lease")
        return cls(_str(obj, "lease_id", "refused lease"), _str(obj, "reason", "refused lease"))


@dataclass(frozen=True, slots=True)
class ReportAnswer(FieldsRecord):
    """The control plane's answer to a report: its incarnation, what it made of it, and
    the highest seq of ``epoch`` it has applied for the node (``acked_seq``, 0: none)."""

    incarnation: Incarnation
    status: AnswerStatus
    epoch: int = 0
    acked_seq: int = 0
    refused: tuple[RefusedLease, ...] = ()

    def __post_init__(self) -> None:
        _pick(self.status, ANSWER_STATUSES, "report answer", "status")
        _count(self.epoch, "report answer", "epoch", 0)
        _count(self.acked_seq, "report answer", "acked_seq", 0)

    @classmethod
    def from_json(cls, data: object) -> ReportAnswer:
        what = "report answer"
        obj = _obj(data, what)
        return cls(
            incarnation=Incarnation.from_json(_get(obj, "incarnation", what)),
            status=_pick(_str(obj, "status", what), ANSWER_STATUSES, what, "status"),
            epoch=_int(obj, "epoch", what),
            acked_seq=_int(obj, "acked_seq", what),
            refused=tuple(RefusedLease.from_json(x) for x in _list(obj, "refused", what)),
        )


# -- the control plane's side: is this report new, a duplicate, or after a gap? ---------------


@dataclass(frozen=True, slots=True, order=True)
class ReportMark:
    """What the control plane applied of one node, in this incarnation: the node's epoch,
    the seq of the full report it holds, and the last seq applied (changes on top of it)."""

    epoch: int
    base_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Judgement:
    """:func:`judge`'s answer: the verdict, the changes to apply in order (for
    ``apply_changes``), and the node's mark once they are applied."""

    verdict: Verdict
    mark: ReportMark | None
    changes: tuple[ReportChange, ...] = ()

    @property
    def status(self) -> AnswerStatus:
        return _WHAT_ANSWER[self.verdict]


def judge(mark: ReportMark | None, message: ReportMessage, incarnation: Incarnation) -> Judgement:
    """What a report is to the control plane ``incarnation`` that holds ``mark`` for its
    node (``None``: nothing applied yet). Pure and total: every message gets a verdict."""
    if message.incarnation != incarnation:
        return Judgement("wrong_incarnation", mark)
    if isinstance(message, FullReport):
        if mark is None or message.epoch > mark.epoch:
            return Judgement("apply_full", ReportMark(message.epoch, message.seq, message.seq))
        if message.epoch < mark.epoch or message.seq < mark.base_seq:
            return Judgement("stale", mark)
        if message.seq <= mark.last_seq:
            return Judgement("duplicate", mark)
        return Judgement("apply_full", ReportMark(message.epoch, message.seq, message.seq))
    if mark is None or message.epoch > mark.epoch:
        return Judgement("gap", mark)
    if message.epoch < mark.epoch or message.base_seq < mark.base_seq:
        return Judgement("stale", mark)
    if message.base_seq > mark.base_seq:
        return Judgement("gap", mark)
    fresh = tuple(change for change in message.changes if change.seq > mark.last_seq)
    if not fresh:
        return Judgement("duplicate", mark)
    if fresh[0].seq != mark.last_seq + 1:
        return Judgement("gap", mark)
    return Judgement("apply_changes", replace(mark, last_seq=fresh[-1].seq), fresh)


# -- the node's side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerEffect:
    """What a node does with a control-plane answer to its report:

    - ``ended_acknowledged``: leases whose end the control plane has recorded (their
      release is done: the node may forget them);
    - ``claims_acknowledged``: claims the control plane now counts as busy;
    - ``refused``: leases the control plane will not adopt (never start them; stop them);
    - ``full_report_next``: the next message is a full report."""

    ended_acknowledged: tuple[str, ...] = ()
    claims_acknowledged: tuple[str, ...] = ()
    refused: tuple[RefusedLease, ...] = ()
    full_report_next: bool = False


@dataclass(frozen=True, slots=True)
class NodeReporter:
    """A node's reporting state towards the control plane (immutable).

    The shell calls :meth:`observe` with the incarnation of every control-plane answer
    (and ignores the answer if it returns ``False``: a term below one this node already
    reported to), :meth:`outgoing` with the node's current holdings for every heartbeat,
    and :meth:`answer` with the report's answer. Only ``epoch`` is persisted (raised at
    every agent start, before the first report)."""

    node: str
    epoch: int
    to: Incarnation | None = None
    highest_term: int = 0
    next_seq: int = 1
    #: The seq of the last full report sent to ``to`` (0: none yet).
    base_seq: int = 0
    acked_seq: int = 0
    need_full: bool = True
    #: What the control plane will hold once every message sent is applied.
    sent: NodeHoldings = EMPTY_HOLDINGS
    #: What it acknowledged holding (``None``: not even the full report yet).
    acked: NodeHoldings | None = None
    #: The holdings of the last full report (the base of ``acked``).
    full: NodeHoldings = EMPTY_HOLDINGS
    unacked: tuple[ReportChange, ...] = field(default=())

    def __post_init__(self) -> None:
        _name(self.node, "reporter", "node")
        _count(self.epoch, "reporter", "epoch", 0)

    @property
    def reported(self) -> bool:
        """Whether the control plane ``to`` acknowledged a full report of this node."""
        return self.acked is not None

    def observe(self, incarnation: Incarnation) -> tuple[NodeReporter, bool]:
        """A control plane answered with ``incarnation``. ``False``: its term is below one
        this node already reported to — ignore the answer (a deposed control plane).
        A new incarnation makes the next message a full report."""
        if incarnation.term < self.highest_term:
            return self, False
        if incarnation == self.to:
            return self, True
        return (
            replace(
                self,
                to=incarnation,
                highest_term=incarnation.term,
                base_seq=0,
                acked_seq=0,
                need_full=True,
                sent=EMPTY_HOLDINGS,
                acked=None,
                full=EMPTY_HOLDINGS,
                unacked=(),
            ),
            True,
        )

    def outgoing(self, holdings: NodeHoldings) -> tuple[NodeReporter, ReportMessage | None]:
        """The report to send with the next heartbeat (``None`` before any control plane
        answered): a full report when one is due, else every change not yet acknowledged
        (a new one if ``holdings`` differ from what was sent)."""
        if self.to is None:
            return self, None
        if self.need_full:
            report = FullReport(self.node, self.to, self.epoch, self.next_seq, holdings)
            return (
                replace(
                    self,
                    next_seq=self.next_seq + 1,
                    base_seq=report.seq,
                    acked_seq=0,
                    need_full=False,
                    sent=holdings,
                    acked=None,
                    full=holdings,
                    unacked=(),
                ),
                report,
            )
        change = diff_holdings(self.sent, holdings, seq=self.next_seq)
        reporter = self
        if not change.empty:
            reporter = replace(
                self,
                next_seq=self.next_seq + 1,
                sent=holdings,
                unacked=(*self.unacked, change),
            )
        return reporter, ReportChanges(
            self.node, self.to, self.epoch, reporter.base_seq, reporter.unacked
        )

    def answer(self, answer: ReportAnswer) -> tuple[NodeReporter, AnswerEffect]:
        """Take the control plane's answer (after :meth:`observe` accepted its incarnation)."""
        if answer.incarnation != self.to:
            return self, AnswerEffect(full_report_next=self.need_full)
        if answer.status == "full_report_needed":
            return replace(self, need_full=True), AnswerEffect(
                refused=answer.refused, full_report_next=True
            )
        if answer.status == "wrong_incarnation":
            # The message named an older incarnation (sent before this one answered).
            return self, AnswerEffect(refused=answer.refused, full_report_next=self.need_full)
        reporter = self
        if (
            answer.epoch == self.epoch
            and self.base_seq <= answer.acked_seq < self.next_seq
            and (self.acked is None or answer.acked_seq > self.acked_seq)
        ):
            acked = self.full if self.acked is None else self.acked
            for change in self.unacked:
                if change.seq <= answer.acked_seq and change.seq > self.acked_seq:
                    acked = change.apply_to(acked)
            reporter = replace(
                self,
                acked=acked,
                acked_seq=answer.acked_seq,
                unacked=tuple(c for c in self.unacked if c.seq > answer.acked_seq),
            )
        acked_now = reporter.acked or EMPTY_HOLDINGS
        return reporter, AnswerEffect(
            ended_acknowledged=tuple(x.lease_id for x in acked_now.leases if x.ended),
            claims_acknowledged=tuple(x.claim_id for x in acked_now.claims),
            refused=answer.refused,
            full_report_next=reporter.need_full,
        )


__all__ = [
    "ANSWER_STATUSES",
    "EMPTY_HOLDINGS",
    "ENDED_PHASES",
    "HELD_PHASES",
    "REPORTED_KINDS",
    "REPORTED_PHASES",
    "AnswerEffect",
    "AnswerStatus",
    "Claim",
    "FullReport",
    "Incarnation",
    "Judgement",
    "NodeHoldings",
    "NodeReporter",
    "RefusedLease",
    "ReportAnswer",
    "ReportChange",
    "ReportChanges",
    "ReportMark",
    "ReportMessage",
    "ReportedKind",
    "ReportedLease",
    "ReportedPhase",
    "Verdict",
    "diff_holdings",
    "judge",
    "report_from_json",
]
