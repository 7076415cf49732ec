"""A node's own book of the attempts it holds and its node-local claims (safety rule 1).

Local work never waits for an unreachable control plane: a task that runs on its own node
— remote execution off, ``--node`` this node, or a fallback that has its dead
confirmation (:data:`CLAIM_BASES`) — *claims* this node's GPUs locally when no control
plane answers, instead of waiting for a lease. What keeps that safe is one rule on the
node, decided here in two transactions that each check and record at once:

- **an attempt starts** (:meth:`NodeBook.start`) only if none of its GPUs is claimed (by
  a claim other than its own) or used by another started attempt — and the start is
  recorded in the same step;
- **a claim** (:meth:`NodeBook.claim`) takes only GPUs that no started attempt uses — and
  is recorded in the same step.

So a remote attempt accepted on claimed GPUs but not yet started is refused at its start
(its lease, granted by a control plane that could not hear this node, is then released
as ``stopped`` through the report, or simply expires), and a running or left-over attempt
keeps its GPUs: a claim cannot take them. Whichever of the two transactions comes first
wins; the node never runs two attempts on one GPU, whatever the control planes believed.

A local attempt that holds a ``local`` lease and whose renewals go unanswered becomes a
claim before its deadline (:meth:`NodeBook.convert_to_claim`), instead of being stopped;
one whose renewal the control plane *refuses* stops (:mod:`populi_peer.core.holder`).

The book is immutable: every operation returns ``(book, decision)``. The shell writes the
new attempt rows and claims in one transaction, then adopts the book (STYLE 15). Its
:meth:`NodeBook.holdings` is what :class:`~populi_peer.core.reports.NodeReporter` reports:
heartbeats carry each claim until a control plane acknowledges it, and a control plane
that hears of it counts its GPUs as busy.

Phases of an attempt (:data:`~populi_peer.core.reports.ReportedPhase`)::

    accepted --start--> started --end(completed|stopped)--> completed | stopped
    accepted --start refused / control plane refused--> stopped (never ran)
    completed | stopped --release acknowledged--> (forgotten)

An attempt with no lease (a local run that uses a claim, or one with no GPU and no token
from a control plane) is forgotten as soon as it ends: there is no release to owe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, Literal, get_args

from populi_peer.core.fencing import FencingToken
from populi_peer.core.policy import WorkClass, check_work_class
from populi_peer.core.reports import (
    ENDED_PHASES,
    Claim,
    NodeHoldings,
    ReportedKind,
    ReportedLease,
    ReportedPhase,
)
from populi_peer.errors import BadRequest, Conflict

AttemptRole = Literal["worker", "local"]
ATTEMPT_ROLES: Final[tuple[AttemptRole, ...]] = get_args(AttemptRole)
EndOutcome = Literal["completed", "stopped"]
#: Why a local attempt may claim this node's GPUs without a control plane: remote
#: execution is off, the task is pinned to this node, or it is a fallback whose remote
#: lease the control plane already confirmed dead. Any other local attempt waits.
ClaimBasis = Literal["remote_off", "pinned_here", "fallback_confirmed"]
CLAIM_BASES: Final[tuple[ClaimBasis, ...]] = get_args(ClaimBasis)

AttemptKey = tuple[AttemptRole, str, int]
#: The token of a claim made for a local run that never held a lease.
NO_LEASE_TOKEN: Final = FencingToken(0, 0)


def claim_basis(
    *,
    remote_enabled: bool,
    pinned_to: str | None,
    local_node: str,
    fallback_confirmed: bool = False,
) -> ClaimBasis | None:
    """Why a local attempt may claim this node's GPUs when no control plane answers
    (:data:`CLAIM_BASES`), or ``None``: it must wait for a control plane's word (a task
    that may have been granted elsewhere)."""
    if not remote_enabled:
        return "remote_off"
    if pinned_to == local_node:
        return "pinned_here"
    if fallback_confirmed:
        return "fallback_confirmed"
    return None


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """The lease an attempt holds, as the node learned it (handoff or grant answer)."""

    lease_id: str
    kind: ReportedKind
    submitter: str
    ttl_s: float
    work_class: WorkClass
    granted_wall_ms: int | None = None

    def __post_init__(self) -> None:
        check_work_class(self.work_class)


@dataclass(frozen=True, slots=True)
class NodeAttempt:
    """One attempt this node holds: a remote one it runs as a worker, or a local one it
    runs as submitter. ``lease`` is ``None`` for a local attempt without a lease (one that
    runs under a claim from the start, or uses no GPU and got no token)."""

    role: AttemptRole
    task_id: str
    attempt: int
    token: FencingToken
    gpus: tuple[str, ...]
    phase: ReportedPhase
    lease: LeaseTerms | None = None
    claim_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ATTEMPT_ROLES:
            raise BadRequest(f"attempt role {self.role!r} is unknown", code="bad_record")
        if len(set(self.gpus)) != len(self.gpus):
            raise BadRequest(f"attempt gpus {self.gpus!r} name a GPU twice", code="bad_record")
        if self.role == "worker" and (self.lease is None or self.lease.kind != "remote"):
            raise BadRequest("a worker's attempt holds a remote lease", code="bad_record")
        if self.role == "local" and self.lease is not None and self.lease.kind == "remote":
            raise BadRequest("a local attempt holds a local lease or a fence", code="bad_record")

    @property
    def key(self) -> AttemptKey:
        return (self.role, self.task_id, self.attempt)

    @property
    def started(self) -> bool:
        return self.phase == "started"

    @property
    def ended(self) -> bool:
        return self.phase in ENDED_PHASES

    def reported(self) -> ReportedLease | None:
        """This attempt's lease as the node reports it (``None`` without a lease)."""
        if self.lease is None:
            return None
        return ReportedLease(
            lease_id=self.lease.lease_id,
            task_id=self.task_id,
            attempt=self.attempt,
            work_class=self.lease.work_class,
            submitter=self.lease.submitter,
            gpus=self.gpus,
            token=self.token,
            ttl_s=self.lease.ttl_s,
            kind=self.lease.kind,
            phase=self.phase,
            granted_wall_ms=self.lease.granted_wall_ms,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """What a book operation decided: ``ok``, or refused for ``reasons`` (``gpu_claimed``:
    a claim holds one of the GPUs; ``gpu_busy``: a started attempt uses one;
    ``not_startable``: the attempt is not waiting to start; ``not_claimable``: the attempt
    cannot become a claim; ``no_free_gpu``: fewer GPUs are free than a claim wants;
    ``duplicate``: already done)."""

    ok: bool
    reasons: tuple[str, ...] = ()
    #: The claim made (by :meth:`NodeBook.convert_to_claim`), if any.
    claim: Claim | None = None


_OK: Final = Decision(True)


def _claimable(attempt: NodeAttempt) -> bool:
    """Whether ``attempt`` could run under a claim: a local attempt of this node under a
    ``local`` lease, with GPUs to keep."""
    return (
        attempt.role == "local"
        and attempt.lease is not None
        and attempt.lease.kind == "local"
        and bool(attempt.gpus)
    )


def _refused(*reasons: str) -> Decision:
    return Decision(False, reasons)


@dataclass(frozen=True, slots=True)
class NodeBook:
    """The attempts and claims of one node. Immutable."""

    node: str
    attempts: Mapping[AttemptKey, NodeAttempt] = field(default_factory=lambda: MappingProxyType({}))
    claims: Mapping[str, Claim] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, MappingProxyType):
            object.__setattr__(self, "attempts", MappingProxyType(dict(self.attempts)))
        if not isinstance(self.claims, MappingProxyType):
            object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))

    @classmethod
    def restore(
        cls, node: str, attempts: Iterable[NodeAttempt], claims: Iterable[Claim]
    ) -> NodeBook:
        """Rebuild from the node's stored rows; refuses a store that breaks the rule."""
        book = cls(
            node,
            {attempt.key: attempt for attempt in attempts},
            {claim.claim_id: claim for claim in claims},
        )
        problem = book.invariant_violation()
        if problem is not None:
            raise Conflict(f"node book is inconsistent: {problem}", code="node_book")
        return book

    # -- queries --------------------------------------------------------------------------

    def get(self, key: AttemptKey) -> NodeAttempt | None:
        return self.attempts.get(key)

    def by_lease(self, lease_id: str) -> NodeAttempt | None:
        return next(
            (x for x in self.attempts.values() if x.lease and x.lease.lease_id == lease_id), None
        )

    def started_gpus(self, *, besides: AttemptKey | None = None) -> dict[str, AttemptKey]:
        """GPU -> the started attempt using it."""
        return {
            gpu: attempt.key
            for attempt in self.attempts.values()
            if attempt.started and attempt.key != besides
            for gpu in attempt.gpus
        }

    def claimed_gpus(self, *, besides: str | None = None) -> dict[str, str]:
        """GPU -> the claim holding it."""
        return {
            gpu: claim.claim_id
            for claim in self.claims.values()
            if claim.claim_id != besides
            for gpu in claim.gpus
        }

    def gpus_in_use(self) -> frozenset[str]:
        """GPUs no remote attempt may start on: started attempts' and claims'."""
        return frozenset(self.started_gpus()) | frozenset(self.claimed_gpus())

    def free_gpus(self, verified: Iterable[str]) -> tuple[str, ...]:
        """The GPUs of ``verified`` a new claim may take (no started attempt uses them, no
        claim holds them), in the order it takes them: those no accepted attempt waits for
        first (a claim would refuse that attempt its start), then by name."""
        busy = self.gpus_in_use()
        waiting = {gpu for x in self.attempts.values() if x.phase == "accepted" for gpu in x.gpus}
        free = (gpu for gpu in verified if gpu not in busy)
        return tuple(sorted(free, key=lambda gpu: (gpu in waiting, gpu)))

    def holdings(self) -> NodeHoldings:
        """What this node reports: the lease of every attempt that has one (held, or ended
        with its release not acknowledged) and every claim."""
        leases = [lease for x in self.attempts.values() if (lease := x.reported()) is not None]
        return NodeHoldings(tuple(leases), tuple(self.claims.values()))

    def invariant_violation(self) -> str | None:
        """The first broken rule, or ``None``: no GPU in two started attempts, in two
        claims, or in a claim and a started attempt that is not the claim's own."""
        started: dict[str, AttemptKey] = {}
        for attempt in self.attempts.values():
            if not attempt.started:
                continue
            for gpu in attempt.gpus:
                if gpu in started:
                    return f"GPU {gpu} in started attempts {started[gpu]} and {attempt.key}"
                started[gpu] = attempt.key
        claimed: dict[str, str] = {}
        for claim in self.claims.values():
            if claim.node != self.node:
                return f"claim {claim.claim_id} is {claim.node}'s, not {self.node}'s"
            for gpu in claim.gpus:
                if gpu in claimed:
                    return f"GPU {gpu} in claims {claimed[gpu]} and {claim.claim_id}"
                claimed[gpu] = claim.claim_id
                user = started.get(gpu)
                if user is not None and self.attempts[user].claim_id != claim.claim_id:
                    return f"GPU {gpu} in claim {claim.claim_id} and started attempt {user}"
        return None

    # -- operations -----------------------------------------------------------------------

    def _with(
        self,
        *attempts: NodeAttempt,
        drop: Iterable[AttemptKey] = (),
        claims: Iterable[Claim] = (),
        drop_claims: Iterable[str] = (),
    ) -> NodeBook:
        table = dict(self.attempts)
        for key in drop:
            table.pop(key, None)
        table.update((x.key, x) for x in attempts)
        held = dict(self.claims)
        for claim_id in drop_claims:
            held.pop(claim_id, None)
        held.update((x.claim_id, x) for x in claims)
        return replace(self, attempts=MappingProxyType(table), claims=MappingProxyType(held))

    def _gpu_reasons(
        self, gpus: Iterable[str], *, own_attempt: AttemptKey | None, own_claim: str | None
    ) -> tuple[str, ...]:
        gpus = tuple(gpus)
        reasons: list[str] = []
        if any(gpu in self.claimed_gpus(besides=own_claim) for gpu in gpus):
            reasons.append("gpu_claimed")
        if any(gpu in self.started_gpus(besides=own_attempt) for gpu in gpus):
            reasons.append("gpu_busy")
        return tuple(reasons)

    def accept(self, attempt: NodeAttempt) -> tuple[NodeBook, Decision]:
        """A handoff (worker) or a local placement was accepted: record it, not started.
        Refused at once (``gpu_claimed``) when a claim already holds one of its GPUs — a
        lease granted by a control plane that could not hear this node. A second accept of
        the same attempt is a ``duplicate`` and changes nothing."""
        if attempt.phase != "accepted" or attempt.claim_id is not None:
            raise BadRequest("an accepted attempt is in phase 'accepted'", code="bad_record")
        if attempt.key in self.attempts:
            return self, _refused("duplicate")
        if any(gpu in self.claimed_gpus() for gpu in attempt.gpus):
            return self, _refused("gpu_claimed")
        return self._with(attempt), _OK

    def start(self, key: AttemptKey) -> tuple[NodeBook, Decision]:
        """The one transaction that starts an attempt: refused if a claim (other than its
        own) holds one of its GPUs or another started attempt uses one; otherwise recorded
        as started. A refused attempt is recorded ``stopped`` (it never ran; its release,
        if it has a lease, is owed through the report). Call it after the renewal that
        proves the lease (safety rule 3), right before the supervisor is launched."""
        attempt = self.attempts.get(key)
        if attempt is None or attempt.phase != "accepted":
            return self, _refused("not_startable")
        reasons = self._gpu_reasons(attempt.gpus, own_attempt=key, own_claim=attempt.claim_id)
        if reasons:
            return self._end(attempt, "stopped"), _refused(*reasons)
        return self._with(replace(attempt, phase="started")), _OK

    def claim(self, claim: Claim, attempt: NodeAttempt) -> tuple[NodeBook, Decision]:
        """The one transaction that claims GPUs for a local ``attempt`` and starts it:
        refused if a started attempt uses one of the GPUs (``gpu_busy``) or another claim
        holds one (``gpu_claimed``). Accepted-but-not-started attempts do not block it:
        they will be refused at their start. ``attempt`` is new (a local run that never
        had a lease) or the accepted attempt itself (its lease could not be proved: it
        starts under the claim instead)."""
        if claim.node != self.node:
            raise BadRequest(f"a claim of {claim.node} is not {self.node}'s", code="bad_record")
        if (
            attempt.role != "local"
            or attempt.phase != "started"
            or attempt.claim_id != claim.claim_id
            or attempt.gpus != claim.gpus
            or attempt.token != claim.token
            or (attempt.task_id, attempt.attempt) != (claim.task_id, claim.attempt)
        ):
            raise BadRequest(
                "a claim is made with the started local attempt that uses it", code="bad_record"
            )
        before = self.attempts.get(attempt.key)
        if claim.claim_id in self.claims or (before is not None and before.phase != "accepted"):
            return self, _refused("duplicate")
        if before is not None and before.lease != attempt.lease:
            raise BadRequest("a claimed attempt keeps the lease it had", code="bad_record")
        reasons = self._gpu_reasons(claim.gpus, own_attempt=None, own_claim=None)
        if reasons:
            return self, _refused(*reasons)
        return self._with(attempt, claims=(claim,)), Decision(True, claim=claim)

    def claim_free_gpus(
        self,
        *,
        task_id: str,
        attempt: int,
        gpus_wanted: int,
        verified: Iterable[str],
        claim_id: str,
        made_wall_ms: int,
    ) -> tuple[NodeBook, Decision]:
        """A local run with no lease claims ``gpus_wanted`` of this node's ``verified``
        GPUs (the first of :meth:`free_gpus`) and starts under the claim (:meth:`claim`).
        Refused ``no_free_gpu`` when fewer are free (or none is wanted)."""
        free = self.free_gpus(verified)
        if gpus_wanted <= 0 or len(free) < gpus_wanted:
            return self, _refused("no_free_gpu")
        claim = Claim(
            claim_id=claim_id,
            node=self.node,
            task_id=task_id,
            attempt=attempt,
            token=NO_LEASE_TOKEN,
            gpus=free[:gpus_wanted],
            made_wall_ms=made_wall_ms,
        )
        started = NodeAttempt(
            role="local",
            task_id=task_id,
            attempt=attempt,
            token=claim.token,
            gpus=claim.gpus,
            phase="started",
            claim_id=claim_id,
        )
        return self.claim(claim, started)

    def claim_before_start(
        self, key: AttemptKey, *, claim_id: str, made_wall_ms: int
    ) -> tuple[NodeBook, Decision]:
        """An accepted local attempt whose proof before start goes unanswered starts under
        a claim on its GPUs instead of waiting (:meth:`claim`, with the claim made from the
        attempt: its token, GPUs and lease). Refused ``not_claimable`` for an attempt this
        book does not hold as a local one with a lease and GPUs."""
        attempt = self.attempts.get(key)
        if attempt is None or not _claimable(attempt):
            return self, _refused("not_claimable")
        claim = self._claim_of(attempt, claim_id=claim_id, made_wall_ms=made_wall_ms)
        return self.claim(claim, replace(attempt, phase="started", claim_id=claim_id))

    def _claim_of(self, attempt: NodeAttempt, *, claim_id: str, made_wall_ms: int) -> Claim:
        """The claim that keeps ``attempt``'s GPUs on this node, under its token and lease."""
        return Claim(
            claim_id=claim_id,
            node=self.node,
            task_id=attempt.task_id,
            attempt=attempt.attempt,
            token=attempt.token,
            gpus=attempt.gpus,
            made_wall_ms=made_wall_ms,
            lease_id=attempt.lease.lease_id if attempt.lease is not None else None,
        )

    def convert_to_claim(
        self, key: AttemptKey, *, claim_id: str, made_wall_ms: int
    ) -> tuple[NodeBook, Decision]:
        """A started local attempt whose lease renewals go unanswered keeps running under a
        claim on the GPUs it already uses (before its deadline: the holder decides when).
        Its lease is still reported — ended when the attempt ends — and expires on the
        control plane if it was never renewed."""
        attempt = self.attempts.get(key)
        if attempt is None or not attempt.started or not _claimable(attempt):
            return self, _refused("not_claimable")
        if attempt.claim_id is not None:
            return self, Decision(True, ("duplicate",), claim=self.claims[attempt.claim_id])
        claim = self._claim_of(attempt, claim_id=claim_id, made_wall_ms=made_wall_ms)
        reasons = self._gpu_reasons(claim.gpus, own_attempt=key, own_claim=None)
        if reasons or claim_id in self.claims:
            return self, _refused(*(reasons or ("duplicate",)))
        return self._with(replace(attempt, claim_id=claim_id), claims=(claim,)), Decision(
            True, claim=claim
        )

    def _end(self, attempt: NodeAttempt, outcome: EndOutcome) -> NodeBook:
        drop_claims = (attempt.claim_id,) if attempt.claim_id is not None else ()
        if attempt.lease is None:
            return self._with(drop=(attempt.key,), drop_claims=drop_claims)
        return self._with(replace(attempt, phase=outcome, claim_id=None), drop_claims=drop_claims)

    def end(self, key: AttemptKey, outcome: EndOutcome) -> NodeBook:
        """The attempt is gone (its supervisor confirmed it, or it never started):
        ``completed`` if the command ran to its end, ``stopped`` otherwise. Its claim ends
        with it; its lease's release is owed until :meth:`release_acknowledged`."""
        attempt = self.attempts.get(key)
        if attempt is None or attempt.ended:
            return self
        return self._end(attempt, outcome)

    def release_acknowledged(self, lease_id: str) -> NodeBook:
        """The control plane recorded the end of this lease (a release answer, or a
        report it acknowledged): forget the attempt."""
        attempt = self.by_lease(lease_id)
        if attempt is None or not attempt.ended:
            return self
        return self._with(drop=(attempt.key,))

    def refused_by_control_plane(self, lease_id: str) -> tuple[NodeBook, bool]:
        """The control plane will not renew this lease (a definitive refusal, or its report
        answer refused it). An attempt not started yet is recorded ``stopped`` (it never
        runs); returns ``True`` when the attempt is running and must be stopped."""
        attempt = self.by_lease(lease_id)
        if attempt is None or attempt.ended:
            return self, False
        if attempt.phase == "accepted":
            return self._end(attempt, "stopped"), False
        return self, attempt.claim_id is None


__all__ = [
    "ATTEMPT_ROLES",
    "CLAIM_BASES",
    "NO_LEASE_TOKEN",
    "AttemptKey",
    "AttemptRole",
    "ClaimBasis",
    "Decision",
    "EndOutcome",
    "LeaseTerms",
    "NodeAttempt",
    "NodeBook",
    "claim_basis",
]
