"""What this node holds, for its reports and its start and claim transactions (ADR 0015).

The node's book (:class:`~populi_peer.core.claims.NodeBook`) is rebuilt from the store
whenever it is needed — the attempt rows still counted by a control plane (accepted,
running, or finished with their end not acknowledged) and the claims table — so it can
never drift from what is durable. :class:`NodeLedger` runs the core's two transactions
inside one store transaction each: an attempt **starts** only if no claim (other than its
own) holds one of its GPUs and no other started attempt uses one, and a **claim** takes only
GPUs no started attempt uses; each records what it decided in the same step.

:class:`Reporting` is the node's side of the reports: a :class:`NodeReporter` (memory only;
the ``epoch`` it numbers reports in is raised and persisted at every agent start), the
heartbeat part that adds the full report or the changes not yet acknowledged, and the
answer listener that takes the control plane's incarnation and its answer — ends it
acknowledged are marked released (the rows may then be cleaned up), refused leases are
stopped, and a new incarnation or a lost full report makes the heartbeat go at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, replace
from typing import Any, ClassVar

from populi_peer.agent.attempts import AttemptPlan
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.claims import AttemptKey, Decision, LeaseTerms, NodeAttempt, NodeBook
from populi_peer.core.messages.heartbeat import HeartbeatAnswer, HeartbeatReport
from populi_peer.core.policy import check_work_class
from populi_peer.core.reports import (
    Claim,
    Incarnation,
    NodeHoldings,
    NodeReporter,
    ReportAnswer,
    ReportedPhase,
    ReportMessage,
)
from populi_peer.errors import PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store.attempts import AttemptIdentity, AttemptRecord, Attempts
from populi_peer.store.db import Store

#: Meta key of the report epoch (raised at every agent start).
EPOCH_KEY = "report_epoch"
#: Result outcomes whose command ran to its end: the lease is released ``completed``.
COMPLETED_OUTCOMES = frozenset({"exited", "spawn_failed"})

#: Stops an attempt this node runs: (task, attempt, role, reason) -> whether it ran here.
StopAttempt = Callable[[str, int, str, str], bool]


def phase_of(row: AttemptRecord) -> ReportedPhase:
    """How far an attempt row got, as a report says it."""
    if row.state == "accepted":
        return "accepted"
    if row.state != "finished":
        return "started"
    outcome = (row.result or {}).get("outcome")
    return "completed" if outcome in COMPLETED_OUTCOMES else "stopped"


def node_attempt(row: AttemptRecord) -> NodeAttempt | None:
    """The book's view of an attempt row (``None``: a row that cannot be one — it is left
    out of the book and the reports rather than stopping them)."""
    return attempt_of(row, row.body, phase_of(row))


def attempt_of(
    identity: AttemptIdentity, body: Mapping[str, Any], phase: ReportedPhase
) -> NodeAttempt | None:
    """An attempt as the book holds it, from what names it (an attempt row or a plan)
    and its plan (``AttemptPlan.to_json``)."""
    try:
        gpus = tuple(str(g) for g in body.get("gpus", ()))
        lease: LeaseTerms | None = None
        if identity.lease_id is not None:
            work_class = check_work_class(str(body.get("work_class", "agent")))
            ttl = float(body.get("ttl_s") or 0.0)
            if identity.role == "worker":
                lease = LeaseTerms(identity.lease_id, "remote", identity.submitter, ttl, work_class)
            elif body.get("renewable") and ttl:
                lease = LeaseTerms(identity.lease_id, "local", identity.submitter, ttl, work_class)
            else:
                lease = LeaseTerms(identity.lease_id, "fence", identity.submitter, 0.0, work_class)
        return NodeAttempt(
            role="worker" if identity.role == "worker" else "local",
            task_id=identity.task_id,
            # The lease's own number where it has one (what the control plane knows).
            attempt=int(body.get("lease_attempt") or identity.attempt),
            token=identity.token,
            gpus=gpus,
            phase=phase,
            lease=lease,
            claim_id=body.get("claim_id"),
        )
    except (PopuliError, TypeError, ValueError):
        return None


def _claim_id(task_id: str, attempt: int) -> str:
    """The id of the node-local claim an attempt runs under (one claim per attempt)."""
    return f"c-{task_id}-{attempt}"


@dataclass(kw_only=True, eq=False, repr=False)
class NodeLedger:
    """This node's book, over the store: holdings for the reports, and the start and claim
    transactions (each one store transaction that checks and records)."""

    node_id: str
    attempts: Attempts
    clock: Clock

    def book(self) -> NodeBook:
        rows = [x for row in self.attempts.held() if (x := node_attempt(row)) is not None]
        # Ended attempts without a lease owe nothing: the book forgets them.
        rows = [x for x in rows if not (x.ended and x.lease is None)]
        return NodeBook(
            self.node_id,
            {x.key: x for x in rows},
            {c.claim_id: c for c in self.attempts.claims()},
        )

    def holdings(self) -> NodeHoldings:
        return self.book().holdings()

    def claimed_gpus(self) -> frozenset[str]:
        return frozenset(self.book().claimed_gpus())

    def accepts(self, plan: AttemptPlan) -> Decision:
        """Whether a handoff may be accepted: refused (``gpu_claimed``) when a claim
        already holds one of its GPUs (a lease granted by a control plane that could not
        hear this node). Records nothing: the worker writes the accepted row itself."""
        attempt = attempt_of(plan, plan.to_json(), "accepted")
        if attempt is None:
            return Decision(True)
        _, decision = self.book().accept(attempt)
        return decision if decision.reasons != ("duplicate",) else Decision(True)

    def start(self, role: str, task_id: str, attempt: int, record: Callable[[], None]) -> Decision:
        """The start transaction: the book decides, ``record`` writes the started row in
        the same store transaction. A refused start writes nothing here (the caller
        records the attempt's end: it never ran)."""
        key: AttemptKey = ("worker" if role == "worker" else "local", task_id, attempt)
        with self.attempts.store.transaction():
            book = self.book()
            if book.get(key) is None:
                # A row the book cannot read (or none yet): nothing to check it against
                # but the GPUs in use, which a claim-free start must not take.
                return Decision(True)
            _, decision = book.start(key)
            if decision.ok:
                record()
            return decision

    def claim(
        self,
        *,
        task_id: str,
        attempt: int,
        gpus_wanted: int,
        verified: frozenset[str],
        now_ms: int,
        record: Callable[[Claim], None],
    ) -> Claim | None:
        """The claim transaction: the book takes ``gpus_wanted`` of this node's ``verified``
        GPUs (:meth:`NodeBook.claim_free_gpus`), ``record`` writes the claim with its
        started attempt in the same store transaction. ``None``: not enough free GPUs."""
        with self.attempts.store.transaction():
            _, decision = self.book().claim_free_gpus(
                task_id=task_id,
                attempt=attempt,
                gpus_wanted=gpus_wanted,
                verified=verified,
                claim_id=_claim_id(task_id, attempt),
                made_wall_ms=now_ms,
            )
            claim = decision.claim
            if not decision.ok or claim is None:
                return None
            record(claim)
            return claim

    def convert(
        self,
        plan: AttemptPlan,
        before_start: bool,
        record: Callable[[AttemptPlan, Claim], None],
    ) -> Claim | None:
        """A local attempt whose lease renewals go unanswered becomes a claim (the holder's
        machine decides when): before its start, the accepted attempt starts under a claim
        on its GPUs (:meth:`NodeBook.claim_before_start`); once started, it keeps its GPUs
        under one (:meth:`NodeBook.convert_to_claim`). ``record`` writes the claimed plan
        and the claim in the same store transaction. ``None``: not claimable (its GPUs are
        taken)."""
        key: AttemptKey = ("local", plan.task_id, plan.book_attempt)
        claim_id = _claim_id(plan.task_id, plan.attempt)
        now_ms = wall_ms(self.clock)
        with self.attempts.store.transaction():
            book = self.book()
            if before_start:
                _, decision = book.claim_before_start(key, claim_id=claim_id, made_wall_ms=now_ms)
            else:
                _, decision = book.convert_to_claim(key, claim_id=claim_id, made_wall_ms=now_ms)
            claim = decision.claim
            if not decision.ok or claim is None or decision.reasons == ("duplicate",):
                return None
            record(replace(plan, claim_id=claim_id), claim)
            return claim


@dataclass(kw_only=True, eq=False, repr=False)
class Reporting:
    """The node's reports to the control plane (ADR 0015)."""

    node_id: str
    store: InitVar[Store]
    ledger: NodeLedger
    clock: Clock
    stop_attempt: StopAttempt
    logger: ClassVar[logging.Logger] = get_logger("reports")

    def __post_init__(self, store: Store) -> None:
        # A report from before this start never passes for a newer one.
        epoch = int(store.get_meta(EPOCH_KEY, "0") or "0") + 1
        store.set_meta(EPOCH_KEY, str(epoch))
        self.reporter = NodeReporter(self.node_id, epoch)
        #: Asked to beat at once (set by the composition root: the heartbeat sender's).
        self.beat_soon: Callable[[], None] = lambda: None
        #: This node is the control plane: it reports to its own table in process (each
        #: report must reach the table, so the heartbeat part adds none).
        self.to_self = False

    @property
    def reported(self) -> bool:
        """Whether the control plane this node follows acknowledged its full report."""
        return self.reporter.reported

    def outgoing(self) -> ReportMessage | None:
        self.reporter, message = self.reporter.outgoing(self.ledger.holdings())
        return message

    def part(self, report: HeartbeatReport) -> HeartbeatReport:
        """The heartbeat's ``report``: a full report to an incarnation this node has not
        reported to, else the changes not yet acknowledged."""
        if self.to_self:
            return report
        message = self.outgoing()
        return report if message is None else _with_report(report, message)

    def absorb(self, answer: HeartbeatAnswer) -> None:
        """A heartbeat answer: its incarnation, and its answer to the report."""
        if answer.incarnation is not None:
            self.take(answer.incarnation, answer.report_answer)

    def take(self, incarnation: Incarnation, answer: ReportAnswer | None) -> None:
        before = self.reporter.to
        reporter, current = self.reporter.observe(incarnation)
        if not current:
            return  # a term below one this node reported to: a deposed control plane
        self.reporter = reporter
        due = reporter.to != before
        if due and before is not None:
            log(
                self.logger,
                logging.INFO,
                "new control plane incarnation",
                incarnation=str(incarnation),
            )
        if answer is not None:
            self.reporter, effect = self.reporter.answer(answer)
            due = due or (effect.full_report_next and answer.status == "full_report_needed")
            self._apply(effect.ended_acknowledged, effect.refused)
        if due:
            self.beat_soon()

    def _apply(self, ended: tuple[str, ...], refused: tuple[object, ...]) -> None:
        if not ended and not refused:
            return
        rows = {row.lease_id: row for row in self.ledger.attempts.held() if row.lease_id}
        now_ms = wall_ms(self.clock)
        for lease_id in ended:
            row = rows.get(lease_id)
            if row is not None and row.state == "finished":
                self.ledger.attempts.mark_released(
                    row.task_id, row.attempt, row.role, now_ms=now_ms
                )
        for item in refused:
            lease_id, reason = getattr(item, "lease_id", ""), getattr(item, "reason", "")
            row = rows.get(lease_id)
            if row is None or row.state != "running":
                # Not started: its proof before start decides (a lease the control plane
                # does not hold live is never renewed, so never started).
                continue
            log(
                self.logger,
                logging.WARNING,
                "the control plane refused a lease this node holds; stopping its attempt",
                lease_id=lease_id,
                reason=reason,
                task_id=row.task_id,
            )
            self.stop_attempt(row.task_id, row.attempt, row.role, f"lease_refused:{reason}")


def _with_report(report: HeartbeatReport, message: ReportMessage) -> HeartbeatReport:
    return replace(report, report=message)


__all__ = [
    "COMPLETED_OUTCOMES",
    "EPOCH_KEY",
    "NodeLedger",
    "Reporting",
    "attempt_of",
    "node_attempt",
    "phase_of",
]
