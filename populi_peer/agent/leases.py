"""Execution leases on the control plane: the trio shell around ``core.leases.LeaseTable``.

Every operation of the pure table returns the leases to persist; they are written in one
``synchronous=FULL`` transaction (with the token counter) before the new table is adopted
and before anyone is answered (safety rules 4 and 7). Renewals change only the in-memory
expiry, which is never persisted: after a restart every holding lease counts as renewed at
restart (rule 5), and grants resume per node (ADR 0015): on a node once it has reported to
this incarnation, on a silent one once any lease it could hold unknown here has expired (the
longest TTL ever allowed + margin; nothing to wait for in a cluster that never granted a
lease).

Reports (ADR 0015): every heartbeat answer carries this incarnation (term + an id drawn at
each start, :meth:`LeaseService.heartbeat_exchange`); a node that has not reported to it
sends a full report of what it holds, then numbered changes. The table judges and learns
them (:meth:`~populi_peer.core.leases.LeaseTable.receive`); the leases it adopts or ends are
written before the answer. A write that fails answers no ``report_answer`` (nothing is
adopted): the node sends it again.

Routes:
- ``POST /v1/populi/exec/leases`` (submit): grant; the control plane re-checks the target's
  lifecycle, staleness, GPU health and free GPUs from its own view (rule 6).
- ``POST /v1/populi/exec/leases/{lease_id}/renew`` and ``/release`` (the holder).
- ``GET /v1/populi/exec/leases`` (filters ``node``, ``task``, ``state``) and ``/{lease_id}``.
- ``POST /v1/populi/exec/fallback`` (submit): the control plane's word that a task's lease
  is dead, with a higher token for the local attempt (a ``local`` lease on the submitter's
  GPUs, or a ``fence`` when it needs none).
- ``POST /v1/populi/admin/exec-lease-revoke`` (operator).

A timer declares leases dead at ``expires + margin`` (persisted first); a reconcile pass
gives the table what this control plane knows of each holder
(:meth:`~populi_peer.core.leases.LeaseTable.reconcile_holders`: it flags leases whose
holder is stale or quarantined, revokes them with the ``auto_revoke_stale_leases``
setting, and revokes those of a node whose drain deadline has passed).

The service is given what it uses: the lease repository, the clock, the control-plane link
(term, whether this node holds the role), the cluster settings, and :class:`NodeFacts` —
the control plane's own view of each node (membership, lifecycle, heartbeats, verified
GPUs), which the composition root builds from the cluster services. Routes take and
answer typed messages (:mod:`populi_peer.core.messages.leases`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import trio

from populi_peer.agent.health import RETRIED, Health
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.api.app import ANY_MEMBER, OPERATOR, SUBMIT, Request, Route
from populi_peer.clock import Clock
from populi_peer.core.eligibility import routing_eligibility
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import (
    STOPPING_REFUSALS,
    GrantRequest,
    HolderStatus,
    HolderView,
    Lease,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    TargetView,
)
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    LeaseAnswer,
    LeaseFallbackAnswer,
    LeaseFallbackRequest,
    LeaseGrantRequest,
    LeaseListAnswer,
    LeaseReleaseRequest,
    LeaseReplayAnswer,
    LeaseRevokeRequest,
    LeaseView,
    RenewRequest,
)
from populi_peer.core.messages.heartbeat import HeartbeatAnswer, HeartbeatReport
from populi_peer.core.policy import decide
from populi_peer.core.reports import Incarnation, ReportAnswer, ReportMessage
from populi_peer.core.scope import Scope
from populi_peer.core.settings import gates_enabled, remote_refusal
from populi_peer.core.transition_log import LEASE_TRANSITION, lease_transition_fields
from populi_peer.errors import Forbidden, PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store.events import EventLog
from populi_peer.store.leases import Leases

HOLDERS = frozenset({"worker", "submit"})
RECONCILE_INTERVAL_S = 1.0
#: Ended leases stay in memory this long (listings, late releases), then only on disk:
#: the table stays the size of the live work, not of history. A lookup by task or lease id
#: reads the store for what memory no longer holds (a completed task keeps its key).
RETAIN_ENDED_S = 3600.0
COMPACT_INTERVAL_S = 60.0
_SCOPE_RANK = {"local": 0, "lan": 1, "overlay": 2}


def new_lease_id() -> str:
    return "l-" + secrets.token_hex(8)


class SettingsSource(Protocol):
    """The cluster settings this node holds (``agent.records.ClusterRecords``)."""

    @property
    def settings(self) -> Mapping[str, Any]: ...


class NodeFacts(Protocol):
    """The control plane's own view of the nodes, as the lease service reads it (safety
    rule 6: hints never authorize). Built by the composition root from membership, the
    lifecycle registers, the heartbeat receiver and the GPU service."""

    def is_node(self, node_id: str) -> bool:
        """A member of kind ``node``."""
        ...

    def resolve_node(self, ref: str) -> str:
        """The member id ``ref`` is, or the id of the node it names (a unique name);
        404 ``unknown_node``."""
        ...

    def lifecycle(self, node_id: str) -> NodeLifecycle | None: ...

    def heartbeat_age_ms(self, node_id: str) -> int | None:
        """Since its last heartbeat here (``None``: none since this process started)."""
        ...

    def stale_after_ms(self, node_id: str) -> int:
        """When its heartbeat counts as stale, by the scope of its path."""
        ...

    def stale(self, node_id: str) -> bool: ...

    def scope(self, node_id: str) -> Scope | None:
        """The scope of the path to it, from its last heartbeat (``None``: none yet)."""
        ...

    def accepts_remote_work(self, node_id: str) -> bool | None:
        """What its last heartbeat said (``exec_remote``); ``None`` before one."""
        ...

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        """Its allocatable GPU UUIDs (verified facts), and how many are unhealthy."""
        ...

    def gpu_hints(self, node_id: str) -> Sequence[GpuHint]:
        """Its GPUs as the control plane holds them, read for placement's rules."""
        ...


@dataclass(kw_only=True, eq=False, repr=False)
class LeaseService:
    leases: Leases
    clock: Clock
    control_plane: ControlPlaneLink
    records: SettingsSource
    nodes: NodeFacts
    events: EventLog
    health: Health
    logger: ClassVar[logging.Logger] = get_logger("leases")

    def __post_init__(self) -> None:
        self.table: LeaseTable | None = None
        self.flags: dict[str, HolderStatus] = {}
        self._kick = trio.Event()

    # -- state ----------------------------------------------------------------------------

    def settings(self) -> LeaseSettings:
        values = self.records.settings
        return LeaseSettings(
            max_lease_ttl_s=float(values["max_lease_ttl_s"]),
            expiry_margin_s=float(values["lease_expiry_margin_s"]),
            leader_lease_s=float(values["leader_lease_s"]),
        )

    def forget(self) -> None:
        """This node stopped (or starts again) acting as control plane: the table of an
        earlier term is dropped, and rebuilt from the store at the next start, under the
        term then in force and with its resumption window (ADR 0015, ADR 0016)."""
        self.table = None
        self.flags = {}

    def load(self) -> None:
        """Rebuild the table from the store (control plane start)."""
        leases = self.leases.all()
        next_seq = self.leases.next_seq()
        settings = self.settings()
        # safety rule 5 / ADR 0015: grants resume per node — a lease this table does not
        # know of (a store restored from an older copy) is in its holder's report, or has
        # expired on its holder's own deadline once the window ends. A cluster that never
        # granted a lease has nothing to wait for. The window uses the largest TTL ever
        # allowed, in case max_lease_ttl_s was lowered since.
        longest_ttl = max(
            settings.max_lease_ttl_s,
            self.leases.longest_ttl_seen_s(),
        )
        now_mono = self.clock.mono()
        self.table = LeaseTable.restore(
            leases,
            term=self.control_plane.term,
            next_seq=next_seq,
            settings=settings,
            now_mono=now_mono,
            incarnation_id=secrets.token_hex(8),
            longest_ttl_s=longest_ttl,
            resume=next_seq > 1,
        )
        if self.table.window is not None:
            log(
                self.logger,
                logging.INFO,
                "grants resume per node: each once it reports, a silent one after the window",
                window_s=round(self.table.window.silent_until_mono - now_mono, 1),
            )
        if leases:
            log(
                self.logger,
                logging.INFO,
                "lease table restored",
                leases=len(leases),
                holding=len(self.table.holding()),
            )

    def hydrate(self, *, task_id: str | None = None, lease_id: str | None = None) -> None:
        """Bring back from the store the leases of ``task_id`` (or lease ``lease_id``)
        that compaction dropped from memory, before anything is decided about them."""
        table = self._table()
        if task_id is not None:
            stored = self.leases.of_task(task_id)
        elif lease_id is not None:
            found = self.leases.get(lease_id)
            stored = [] if found is None else [found]
        else:
            return
        missing = [lease for lease in stored if lease.lease_id not in table.leases]
        if missing:
            # Only ended leases are ever dropped, so what comes back is terminal.
            self.table = replace(
                table, leases={**table.leases, **{lease.lease_id: lease for lease in missing}}
            )

    def compact(self) -> int:
        """Drop from memory the leases that ended more than ``RETAIN_ENDED_S`` ago."""
        if self.table is None:
            return 0
        cutoff = int(self.clock.wall() * 1000 - RETAIN_ENDED_S * 1000)
        keep = {
            lid: lease
            for lid, lease in self.table.leases.items()
            if not lease.terminal or lease.state_changed_wall_ms >= cutoff
        }
        dropped = len(self.table.leases) - len(keep)
        if dropped:
            self.table = replace(self.table, leases=keep)
        return dropped

    def busy_on(self, node_id: str) -> frozenset[str] | None:
        """The GPUs of ``node_id`` this control plane's book holds busy
        (:meth:`~populi_peer.core.leases.LeaseTable.busy_on`); ``None`` while it keeps no
        book of this term."""
        table = self.table
        if table is None or table.term != self.control_plane.term:
            return None
        return table.busy_on(node_id)

    def _table(self) -> LeaseTable:
        self.control_plane.require_self()
        if self.table is None or self.table.term != self.control_plane.term:
            # Elected again at a later term: never grant under an earlier one's table.
            self.load()
        assert self.table is not None
        if self.table.settings != self.settings():
            self.table = replace(self.table, settings=self.settings())
        return self.table

    def _commit(self, table: LeaseTable, records: tuple[Lease, ...] | list[Lease]) -> None:
        """Persist ``records`` (and the token counter) durably, then adopt ``table``."""
        if records:
            # One transaction (the repository's), with the token counter.
            self.leases.save(records, next_seq=table.next_seq, now_ms=self._now()[1])
        before = self.table.leases if self.table is not None else {}
        self.table = table
        if records:
            self._kick.set()
        # One line per lease transition, once it is durable (issue 15).
        for lease in records:
            fields = lease_transition_fields(before.get(lease.lease_id), lease)
            if fields is not None:
                level = logging.WARNING if lease.state in ("expired", "revoking") else logging.INFO
                log(self.logger, level, LEASE_TRANSITION, **fields)

    def view(self, lease: Lease) -> LeaseView:
        """``lease`` with what only this control plane's clock says."""
        expires_in_s = None
        if lease.holding and lease.kind != "fence":
            expires_in_s = round(lease.expires_mono - self.clock.mono(), 3)
        return LeaseView(
            lease=lease, expires_in_s=expires_in_s, flag=self.flags.get(lease.lease_id)
        )

    # -- reports (ADR 0015) -----------------------------------------------------------------

    def incarnation(self) -> Incarnation:
        """This control plane's term and the id drawn at its start."""
        return self._table().incarnation

    def receive_report(self, node: str, message: ReportMessage) -> ReportAnswer:
        """``node``'s full report or changes: judged and learned by the table, what it
        adopts or ends written durably, then the table adopted and the answer given."""
        if message.node != node:
            raise Forbidden(
                f"{node} sent a report of {message.node}: a node reports what it holds itself",
                code="not_report_owner",
            )
        table = self._table()
        was_reported = table.reported(node)
        now_mono, now_ms = self._now()
        new, result = table.receive(message, now_mono=now_mono, now_wall_ms=now_ms)
        self._commit(new, result.records)
        learned = result.learned
        if learned.adopted or learned.recorded or learned.refused:
            log(
                self.logger,
                logging.INFO,
                "report learned",
                node=node,
                adopted=list(learned.adopted),
                recorded=list(learned.recorded),
                refused=[f"{x.lease_id}:{x.reason}" for x in learned.refused],
            )
        if not was_reported and new.reported(node):
            window = new.window
            log(
                self.logger,
                logging.INFO,
                "node reported: grants on it resume",
                node=node,
                after_s=None if window is None else round(now_mono - window.started_mono, 3),
                claims=len(new.claims_of(node)),
            )
        return result.answer

    def heartbeat_exchange(
        self, node: str, report: HeartbeatReport, answer: HeartbeatAnswer
    ) -> HeartbeatAnswer:
        """The heartbeat answer with this incarnation, and the answer to the report it
        carried. A report that cannot be recorded (storage) or is refused (malformed) is
        left unanswered — the heartbeat itself still counts; the node sends it again."""
        answer = replace(answer, incarnation=self.incarnation())
        if report.report is None:
            return answer
        try:
            report_answer = self.receive_report(node, report.report)
        except RETRIED as exc:
            self.health.failed("leases", exc)
            return answer
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "report refused", node=node, error=str(exc))
            return answer
        return replace(answer, report_answer=report_answer)

    # -- the control plane's own view of a target (safety rule 6) --------------------------

    def target_view(
        self,
        node_id: str,
        *,
        gpus_wanted: int,
        work_class: str,
        submitter: str,
        grant: GrantRequest | None = None,
    ) -> TargetView:
        nodes = self.nodes
        if not nodes.is_node(node_id):
            return TargetView(node_id=node_id, eligible=False, reasons=("unknown_node",))
        allocatable, unhealthy = nodes.allocatable_gpus(node_id)
        eligibility = routing_eligibility(
            lifecycle=nodes.lifecycle(node_id),
            heartbeat_age_ms=nodes.heartbeat_age_ms(node_id),
            stale_after_ms=nodes.stale_after_ms(node_id),
            now_wall_ms=self._now()[1],
            gpus_wanted=gpus_wanted,
            allocatable_gpus=len(allocatable),
            unhealthy_gpus=unhealthy,
        )
        reasons = [r for r in eligibility.reasons if r != "no_free_gpu"]
        if node_id != submitter:
            if nodes.accepts_remote_work(node_id) is False:
                reasons.append("remote_off_on_node")
            settings = self.records.settings
            refusal = remote_refusal(settings)
            if refusal is not None:
                reasons.append(refusal)
            scope = self.path_scope(submitter, node_id)
            decision = decide(work_class, scope, gates_enabled=gates_enabled(settings))
            if not decision.allowed:
                reasons.append(decision.reason or "policy_blocked")
        misfits: list[tuple[str, tuple[str, ...]]] = []
        if grant is not None and grant.constrains_gpus:
            # Placement v2's memory and model, re-checked on our own facts (rule 6).
            for gpu in nodes.gpu_hints(node_id):
                codes = grant.misfits(gpu)
                if gpu.uuid in allocatable and codes:
                    misfits.append((gpu.uuid, codes))
        return TargetView(
            node_id=node_id,
            eligible=not reasons,
            reasons=tuple(reasons),
            allocatable_gpus=tuple(allocatable),
            misfit_gpus=tuple(misfits),
        )

    def path_scope(self, a: str, b: str) -> Scope:
        """The most patient of the scopes of ``a`` and ``b`` as the control plane sees
        them: the path between two nodes is at best as close as each one is to us."""
        scopes = [self.nodes.scope(n) or "overlay" for n in (a, b)]
        return max(scopes, key=lambda s: _SCOPE_RANK[s])

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        route = Route
        return [
            route("POST", "/v1/populi/exec/leases", self._grant, SUBMIT, "lease_grant"),
            route("GET", "/v1/populi/exec/leases", self._list, ANY_MEMBER, "lease_list"),
            route("GET", "/v1/populi/exec/leases/{lease_id}", self._get, ANY_MEMBER, "lease_get"),
            route(
                "POST",
                "/v1/populi/exec/leases/{lease_id}/renew",
                self._renew,
                HOLDERS,
                "lease_renew",
            ),
            route(
                "POST",
                "/v1/populi/exec/leases/{lease_id}/release",
                self._release,
                HOLDERS,
                "lease_release",
            ),
            route("POST", "/v1/populi/exec/fallback", self._fallback, SUBMIT, "lease_fallback"),
            route(
                "POST",
                "/v1/populi/admin/exec-lease-revoke",
                self._revoke,
                OPERATOR,
                "lease_revoke",
            ),
        ]

    def _now(self) -> tuple[float, int]:
        return self.clock.mono(), int(self.clock.wall() * 1000)

    async def _grant(self, request: Request) -> LeaseReplayAnswer:
        self._table()
        grant = request.message(LeaseGrantRequest).grant(request.caller.id)
        self.hydrate(task_id=grant.task_id)
        table = self._table()
        target = self.target_view(
            grant.target,
            gpus_wanted=grant.gpus_wanted,
            work_class=grant.work_class,
            submitter=grant.submitter,
            grant=grant,
        )
        now_mono, now_ms = self._now()
        new, change = table.grant(
            grant, now_mono=now_mono, now_wall_ms=now_ms, lease_id=new_lease_id(), target=target
        )
        self._commit(new, change.records)
        return LeaseReplayAnswer(lease=self.view(change.lease), replay=change.replay)

    async def _renew(self, request: Request) -> LeaseAnswer:
        body = request.message(RenewRequest)
        lease_id = request.path_params["lease_id"]
        self.hydrate(lease_id=lease_id)
        self._table()
        refusal = remote_refusal(self.records.settings)
        if refusal in STOPPING_REFUSALS:
            # The kill switch: the lease is revoked for it (durably) before its holder
            # hears the refusal, so however the lease ends, it says why.
            self.reconcile_now()
        table = self._table()
        now_mono, now_ms = self._now()
        new, change = table.renew(
            lease_id,
            request.caller.id,
            now_mono=now_mono,
            now_wall_ms=now_ms,
            # Rule 3's renewal before start: the settings are checked again here, so no
            # remote attempt starts after `settings set` turned remote execution off; and
            # with the kill switch no remote lease renews at all.
            before_start=body.before_start,
            remote_refusal=refusal,
        )
        self._commit(new, change.records)
        return LeaseAnswer(lease=self.view(change.lease))

    async def _release(self, request: Request) -> LeaseReplayAnswer:
        body = request.message(LeaseReleaseRequest)
        lease_id = request.path_params["lease_id"]
        self.hydrate(lease_id=lease_id)
        table = self._table()
        now_mono, now_ms = self._now()
        new, change = table.release(
            lease_id,
            request.caller.id,
            outcome=body.outcome,
            now_mono=now_mono,
            now_wall_ms=now_ms,
            why=body.reason,
        )
        self._commit(new, change.records)
        return LeaseReplayAnswer(lease=self.view(change.lease), replay=change.replay)

    async def _fallback(self, request: Request) -> LeaseFallbackAnswer:
        self._table()
        body = request.message(LeaseFallbackRequest)
        submitter = request.caller.id
        task_id, attempt = body.task_id, body.attempt
        self.hydrate(task_id=task_id)
        table = self._table()
        gpus: tuple[str, ...] = ()
        retried = next(
            (
                lease
                for lease in table.by_task(task_id)
                if lease.holding and lease.attempt == attempt and lease.holder == submitter
            ),
            None,
        )
        if retried is not None:
            # A retry whose first answer was lost: the table answers it as a replay.
            gpus = retried.gpus
        elif body.gpus_wanted:
            # The submitter's own GPUs, by the control plane's verified view of them.
            view = self.target_view(
                submitter,
                gpus_wanted=body.gpus_wanted,
                work_class=body.work_class or "agent",
                submitter=submitter,
            )
            busy = table.busy_gpus()
            gpus = tuple(g for g in view.allocatable_gpus if (submitter, g) not in busy)[
                : body.gpus_wanted
            ]
            if len(gpus) < body.gpus_wanted:
                raise LeaseRefused(
                    f"no free local GPU for task {task_id}'s fallback",
                    reasons=["no_free_gpu"],
                    task_id=task_id,
                )
        now_mono, now_ms = self._now()
        new, change = table.confirm_dead_for_fallback(
            task_id,
            submitter=submitter,
            attempt=attempt,
            gpus=gpus,
            local_node=submitter,
            ttl_s=body.ttl_s,
            lease_id=new_lease_id(),
            now_mono=now_mono,
            now_wall_ms=now_ms,
            work_class=body.work_class,
            previous_node=body.previous_node,
        )
        self._commit(new, change.records)
        prior = change.prior
        if prior is None and change.replay:
            # A retried request whose first answer was lost: say again which dead lease
            # this attempt follows, so the submitter records why it fell back.
            earlier = [x for x in new.by_task(task_id) if x.dead and x.token < change.lease.token]
            prior = max(earlier, key=lambda x: x.token) if earlier else None
        return LeaseFallbackAnswer(
            lease=self.view(change.lease),
            prior=None if prior is None else self.view(prior),
            replay=change.replay,
        )

    async def _revoke(self, request: Request) -> LeaseReplayAnswer:
        self._table()
        body = request.message(LeaseRevokeRequest)
        reason = body.reason or "revoked by operator"
        self.hydrate(lease_id=body.lease_id)
        table = self._table()
        now_mono, now_ms = self._now()
        new, change = table.revoke(
            body.lease_id,
            actor=request.caller.id,
            reason=reason,
            now_mono=now_mono,
            now_wall_ms=now_ms,
        )
        self._commit(new, change.records)
        if change.records:  # a repeated revoke changes nothing and is not an event
            self.events.append(
                at_ms=now_ms,
                node_id=change.lease.holder,
                kind="lease_revoked",
                actor=request.caller.id,
                reason=reason,
                detail={"lease_id": body.lease_id, "task_id": change.lease.task_id},
            )
        return LeaseReplayAnswer(lease=self.view(change.lease), replay=change.replay)

    async def _list(self, request: Request) -> LeaseListAnswer:
        table = self._table()
        node = request.query_one("node")
        task = request.query_one("task")
        state = request.query_one("state")
        leases = list(table.leases.values())
        if node:
            node_id = self.nodes.resolve_node(node)
            leases = [lease for lease in leases if node_id in (lease.holder, lease.submitter)]
        if task:
            leases = [lease for lease in leases if lease.task_id == task]
        if state:
            if state == "holding":
                leases = [lease for lease in leases if lease.holding]
            else:
                leases = [lease for lease in leases if lease.state == state]
        leases.sort(key=lambda lease: lease.token)
        return LeaseListAnswer(
            term=self.control_plane.term, leases=tuple(self.view(lease) for lease in leases)
        )

    async def _get(self, request: Request) -> LeaseAnswer:
        lease_id = request.path_params["lease_id"]
        self.hydrate(lease_id=lease_id)
        return LeaseAnswer(lease=self.view(self._table().get(lease_id)))

    # -- timers ---------------------------------------------------------------------------

    def expire_now(self) -> list[Lease]:
        if self.table is None:
            return []
        now_mono, now_ms = self._now()
        new, dead = self.table.expire_due(now_mono=now_mono, now_wall_ms=now_ms)
        if dead:
            self._commit(new, dead)
        return list(dead)

    def reconcile_now(self) -> None:
        """Give the table what this control plane knows of each holder: its lifecycle and
        whether its heartbeat is stale (the table flags, revokes and applies the drain
        deadline: :meth:`~populi_peer.core.leases.LeaseTable.reconcile_holders`)."""
        if self.table is None:
            return
        now_mono, now_ms = self._now()
        me = self.control_plane.node_id
        holders = {
            holder: HolderView(
                lifecycle=self.nodes.lifecycle(holder),
                stale=holder != me and self.nodes.stale(holder),
            )
            for holder in self.table.holders()
        }
        new, result = self.table.reconcile_holders(
            holders,
            auto_revoke=bool(self.records.settings["auto_revoke_stale_leases"]),
            now_mono=now_mono,
            now_wall_ms=now_ms,
            drain_actor=me,
            remote_refusal=remote_refusal(self.records.settings),
        )
        self.flags = {f.lease_id: f.status for f in result.flagged}
        if result.records:
            self._commit(new, result.records)
        else:
            self.table = new

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.table is None:
            # (A heartbeat may have loaded it first: one incarnation per start.)
            self.load()
        task_status.started()
        health = self.health
        next_compaction = self.clock.mono() + COMPACT_INTERVAL_S
        while True:
            try:
                self.expire_now()
                self.reconcile_now()
            except RETRIED as exc:
                # The dead state could not be written: the table keeps the lease holding
                # (nobody is told it is dead) and the same expiry is tried again.
                await health.retry_after(health.failed("leases", exc))
                continue
            health.ok("leases")
            if self.clock.mono() >= next_compaction:
                self.compact()
                next_compaction = self.clock.mono() + COMPACT_INTERVAL_S
            deadline = self.table.next_deadline() if self.table else None
            wake = self.clock.mono() + RECONCILE_INTERVAL_S
            if deadline is not None:
                wake = min(wake, deadline + 0.001)
            with trio.move_on_at(wake):
                await self._kick.wait()
            if self._kick.is_set():
                self._kick = trio.Event()


__all__ = ["LeaseService", "NodeFacts", "SettingsSource", "new_lease_id"]
