"""Execution leases on the control plane: the trio shell around ``core.leases.LeaseTable``.

Every operation of the pure table returns the leases to persist; they are written in one
``synchronous=FULL`` transaction (with the token counter) before the new table is adopted
and before anyone is answered (safety rules 4 and 7). Renewals change only the in-memory
expiry, which is never persisted: after a restart every holding lease counts as renewed at
restart (rule 5), and grants resume per node (ADR 0012): on a node once it has reported to
this incarnation, on a silent one once any lease it could hold unknown here has expired (the
longest TTL ever allowed + margin; nothing to wait for in a cluster that never granted a
lease). Nodes do not send reports yet, so for now every node waits out that window.

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
flags leases whose holder is stale or quarantined (and revokes them with the
``auto_revoke_stale_leases`` setting), and revokes those of a node whose drain deadline
has passed.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from populi_peer.agent.health import RETRIED
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.core.eligibility import routing_eligibility
from populi_peer.core.leases import (
    GrantRequest,
    HolderStatus,
    Lease,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    TargetView,
)
from populi_peer.core.policy import decide
from populi_peer.core.settings import remote_refusal
from populi_peer.core.wire import check_id
from populi_peer.errors import BadRequest
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

SUBMIT = frozenset({"submit"})
HOLDERS = frozenset({"worker", "submit"})
OPERATOR = frozenset({"operator"})
RECONCILE_INTERVAL_S = 1.0
#: Ended leases stay in memory this long (listings, late releases), then only on disk:
#: the table stays the size of the live work, not of history. A lookup by task or lease id
#: reads the store for what memory no longer holds (a completed task keeps its key).
RETAIN_ENDED_S = 3600.0
COMPACT_INTERVAL_S = 60.0
_SCOPE_RANK = {"local": 0, "lan": 1, "overlay": 2}


def new_lease_id() -> str:
    return "l-" + secrets.token_hex(8)


class LeaseService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("leases")
        self.table: LeaseTable | None = None
        self.flags: dict[str, HolderStatus] = {}
        self._kick = trio.Event()

    # -- state ----------------------------------------------------------------------------

    def settings(self) -> LeaseSettings:
        values = self.agent.records.settings
        return LeaseSettings(
            max_lease_ttl_s=float(values["max_lease_ttl_s"]),
            expiry_margin_s=float(values["lease_expiry_margin_s"]),
            leader_lease_s=float(values["leader_lease_s"]),
        )

    def load(self) -> None:
        """Rebuild the table from the store (control plane start)."""
        rows = self.agent.store.execute("SELECT body FROM leases").fetchall()
        leases = [Lease.from_json(json.loads(row["body"])) for row in rows]
        next_seq = int(self.agent.store.get_meta("lease_next_seq", "1") or "1")
        settings = self.settings()
        # safety rule 5 / ADR 0012: grants resume per node — a lease this table does not
        # know of (a store restored from an older copy) is in its holder's report, or has
        # expired on its holder's own deadline once the window ends. A cluster that never
        # granted a lease has nothing to wait for. The window uses the largest TTL ever
        # allowed, in case max_lease_ttl_s was lowered since.
        longest_ttl = max(
            settings.max_lease_ttl_s,
            float(self.agent.store.get_meta("lease_max_ttl_seen_s", "0") or 0),
        )
        now_mono = self.agent.clock.mono()
        self.table = LeaseTable.restore(
            leases,
            term=self.agent.term,
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
            rows = self.agent.store.execute(
                "SELECT body FROM leases WHERE task_id = ?", (task_id,)
            ).fetchall()
        elif lease_id is not None:
            rows = self.agent.store.execute(
                "SELECT body FROM leases WHERE lease_id = ?", (lease_id,)
            ).fetchall()
        else:
            return
        missing = [Lease.from_json(json.loads(row["body"])) for row in rows]
        missing = [lease for lease in missing if lease.lease_id not in table.leases]
        if missing:
            # Only ended leases are ever dropped, so what comes back is terminal.
            self.table = replace(
                table, leases={**table.leases, **{lease.lease_id: lease for lease in missing}}
            )

    def compact(self) -> int:
        """Drop from memory the leases that ended more than ``RETAIN_ENDED_S`` ago."""
        if self.table is None:
            return 0
        cutoff = int(self.agent.clock.wall() * 1000 - RETAIN_ENDED_S * 1000)
        keep = {
            lid: lease
            for lid, lease in self.table.leases.items()
            if not lease.terminal or lease.state_changed_wall_ms >= cutoff
        }
        dropped = len(self.table.leases) - len(keep)
        if dropped:
            self.table = replace(self.table, leases=keep)
        return dropped

    def _table(self) -> LeaseTable:
        self.agent.require_control_plane()
        if self.table is None:
            self.load()
        assert self.table is not None
        if self.table.settings != self.settings():
            self.table = replace(self.table, settings=self.settings())
        return self.table

    def _commit(self, table: LeaseTable, records: tuple[Lease, ...] | list[Lease]) -> None:
        """Persist ``records`` (and the token counter) durably, then adopt ``table``."""
        if records:
            now_ms = int(self.agent.clock.wall() * 1000)
            with self.agent.store.transaction():
                for lease in records:
                    self.agent.store.execute(
                        "INSERT INTO leases (lease_id, task_id, holder, state, body, updated_ms) VALUES (?,?,?,?,?,?) "
                        "ON CONFLICT (lease_id) DO UPDATE SET state=excluded.state, body=excluded.body, updated_ms=excluded.updated_ms",
                        (
                            lease.lease_id,
                            lease.task_id,
                            lease.holder,
                            lease.state,
                            json.dumps(lease.to_json(), sort_keys=True),
                            now_ms,
                        ),
                    )
                self.agent.store.execute(
                    "INSERT INTO meta (key, value) VALUES ('lease_next_seq', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(table.next_seq),),
                )
        self.table = table
        if records:
            self._kick.set()

    def lease_json(self, lease: Lease) -> dict[str, Any]:
        data = lease.to_json()
        data["expires_in_s"] = None
        if lease.holding and lease.kind != "fence":
            data["expires_in_s"] = round(lease.expires_mono - self.agent.clock.mono(), 3)
        data["flag"] = self.flags.get(lease.lease_id)
        return data

    # -- the control plane's own view of a target (safety rule 6) --------------------------

    def target_view(
        self, node_id: str, *, gpus_wanted: int, work_class: str, submitter: str
    ) -> TargetView:
        agent = self.agent
        member = agent.membership.get(node_id)
        if member is None or member.kind != "node":
            return TargetView(node_id=node_id, eligible=False, reasons=("unknown_node",))
        now_ms = int(agent.clock.wall() * 1000)
        receiver = agent.heartbeats
        seen = receiver.seen.get(node_id)
        _, stale_after = receiver.timings(seen.scope if seen else "lan")
        allocatable, unhealthy = agent.allocatable_gpus(node_id)
        eligibility = routing_eligibility(
            lifecycle=agent.registry.lifecycle(node_id),
            heartbeat_age_ms=receiver.age_ms(node_id),
            stale_after_ms=int(stale_after * 1000),
            now_wall_ms=now_ms,
            gpus_wanted=gpus_wanted,
            allocatable_gpus=len(allocatable),
            unhealthy_gpus=unhealthy,
        )
        reasons = [r for r in eligibility.reasons if r != "no_free_gpu"]
        if node_id != submitter:
            seen = receiver.seen.get(node_id)
            if seen is not None and seen.report.get("exec_remote") is False:
                reasons.append("remote_off_on_node")
            refusal = remote_refusal(agent.records.settings)
            if refusal is not None:
                reasons.append(refusal)
            scope = self.path_scope(submitter, node_id)
            decision = decide(work_class, scope, gates_enabled=agent.policy_gates())
            if not decision.allowed:
                reasons.append(decision.reason or "policy_blocked")
        return TargetView(
            node_id=node_id,
            eligible=not reasons,
            reasons=tuple(reasons),
            allocatable_gpus=tuple(allocatable),
        )

    def path_scope(self, a: str, b: str) -> str:
        """The most patient of the scopes of ``a`` and ``b`` as the control plane sees
        them: the path between two nodes is at best as close as each one is to us."""
        seen = self.agent.heartbeats.seen
        scopes = [seen[n].scope if n in seen else "overlay" for n in (a, b)]
        return max(scopes, key=lambda s: _SCOPE_RANK[s])

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/populi/exec/leases", self._grant, roles=SUBMIT, name="lease_grant"),
            Route("GET", "/v1/populi/exec/leases", self._list, roles=ANY_MEMBER, name="lease_list"),
            Route(
                "GET",
                "/v1/populi/exec/leases/{lease_id}",
                self._get,
                roles=ANY_MEMBER,
                name="lease_get",
            ),
            Route(
                "POST",
                "/v1/populi/exec/leases/{lease_id}/renew",
                self._renew,
                roles=HOLDERS,
                name="lease_renew",
            ),
            Route(
                "POST",
                "/v1/populi/exec/leases/{lease_id}/release",
                self._release,
                roles=HOLDERS,
                name="lease_release",
            ),
            Route(
                "POST",
                "/v1/populi/exec/fallback",
                self._fallback,
                roles=SUBMIT,
                name="lease_fallback",
            ),
            Route(
                "POST",
                "/v1/populi/admin/exec-lease-revoke",
                self._revoke,
                roles=OPERATOR,
                name="lease_revoke",
            ),
        ]

    def _now(self) -> tuple[float, int]:
        return self.agent.clock.mono(), int(self.agent.clock.wall() * 1000)

    async def _grant(self, request: Request) -> dict[str, Any]:
        table = self._table()
        body = request.json()
        submitter = request.caller.id
        try:
            grant = GrantRequest(
                task_id=_text(body, "task_id"),
                attempt=_int(body, "attempt"),
                work_class=_text(body, "work_class"),  # type: ignore[arg-type]
                target=_text(body, "target"),
                gpus_wanted=_int(body, "gpus_wanted"),
                ttl_s=_number(body, "ttl_s"),
                submitter=submitter,
            )
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"grant request: {exc}", code="bad_request") from exc
        self.hydrate(task_id=grant.task_id)
        table = self._table()
        target = self.target_view(
            grant.target,
            gpus_wanted=grant.gpus_wanted,
            work_class=grant.work_class,
            submitter=submitter,
        )
        now_mono, now_ms = self._now()
        new, change = table.grant(
            grant, now_mono=now_mono, now_wall_ms=now_ms, lease_id=new_lease_id(), target=target
        )
        self._commit(new, change.records)
        if not change.replay:
            log(
                self.logger,
                logging.INFO,
                "lease granted",
                lease_id=change.lease.lease_id,
                task_id=grant.task_id,
                holder=grant.target,
                token=str(change.lease.token),
                gpus=list(change.lease.gpus),
            )
        return {"lease": self.lease_json(change.lease), "replay": change.replay}

    async def _renew(self, request: Request) -> dict[str, Any]:
        body = request.json() if request.body else {}
        before_start = body.get("before_start", False)
        if not isinstance(before_start, bool):
            raise BadRequest("'before_start' must be true or false", code="bad_request")
        self.hydrate(lease_id=request.path_params["lease_id"])
        table = self._table()
        now_mono, now_ms = self._now()
        new, change = table.renew(
            request.path_params["lease_id"],
            request.caller.id,
            now_mono=now_mono,
            now_wall_ms=now_ms,
            # Rule 3's renewal before start: the settings are checked again here, so no
            # remote attempt starts after `settings set` turned remote execution off.
            before_start=before_start,
            remote_refusal=remote_refusal(self.agent.records.settings),
        )
        self._commit(new, change.records)
        return {"lease": self.lease_json(change.lease)}

    async def _release(self, request: Request) -> dict[str, Any]:
        self.hydrate(lease_id=request.path_params["lease_id"])
        table = self._table()
        body = request.json()
        outcome = body.get("outcome")
        if outcome not in ("stopped", "completed"):
            raise BadRequest("release needs 'outcome': stopped or completed", code="bad_request")
        now_mono, now_ms = self._now()
        new, change = table.release(
            request.path_params["lease_id"],
            request.caller.id,
            outcome=outcome,
            now_mono=now_mono,
            now_wall_ms=now_ms,
        )
        self._commit(new, change.records)
        if change.records:
            log(
                self.logger,
                logging.INFO,
                "lease released",
                lease_id=change.lease.lease_id,
                state=change.lease.state,
            )
        return {"lease": self.lease_json(change.lease), "replay": change.replay}

    async def _fallback(self, request: Request) -> dict[str, Any]:
        table = self._table()
        body = request.json()
        submitter = request.caller.id
        task_id = _text(body, "task_id")
        gpus_wanted = _int(body, "gpus_wanted")
        attempt = _int(body, "attempt")
        work_class = body.get("work_class")
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
        elif gpus_wanted:
            # The submitter's own GPUs, by the control plane's verified view of them.
            view = self.target_view(
                submitter,
                gpus_wanted=gpus_wanted,
                work_class=str(work_class or "agent"),
                submitter=submitter,
            )
            busy = table.busy_gpus()
            gpus = tuple(g for g in view.allocatable_gpus if (submitter, g) not in busy)[
                :gpus_wanted
            ]
            if len(gpus) < gpus_wanted:
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
            ttl_s=_number(body, "ttl_s"),
            lease_id=new_lease_id(),
            now_mono=now_mono,
            now_wall_ms=now_ms,
            work_class=work_class,
        )
        self._commit(new, change.records)
        log(
            self.logger,
            logging.INFO,
            "fallback confirmed",
            task_id=task_id,
            token=str(change.lease.token),
            kind=change.lease.kind,
            prior=change.prior.lease_id if change.prior else None,
        )
        prior = change.prior
        if prior is None and change.replay:
            # A retried request whose first answer was lost: say again which dead lease
            # this attempt follows, so the submitter records why it fell back.
            earlier = [x for x in new.by_task(task_id) if x.dead and x.token < change.lease.token]
            prior = max(earlier, key=lambda x: x.token) if earlier else None
        return {
            "lease": self.lease_json(change.lease),
            "prior": None if prior is None else self.lease_json(prior),
            "replay": change.replay,
        }

    async def _revoke(self, request: Request) -> dict[str, Any]:
        table = self._table()
        body = request.json()
        lease_id = _text(body, "lease_id")
        reason = request.reason("revoked by operator")
        self.hydrate(lease_id=lease_id)
        table = self._table()
        now_mono, now_ms = self._now()
        new, change = table.revoke(
            lease_id, actor=request.caller.id, reason=reason, now_mono=now_mono, now_wall_ms=now_ms
        )
        self._commit(new, change.records)
        if change.records:  # a repeated revoke changes nothing and is not an event
            self.agent.record_event(
                change.lease.holder,
                "lease_revoked",
                actor=request.caller.id,
                reason=reason,
                detail={"lease_id": lease_id, "task_id": change.lease.task_id},
            )
        return {"lease": self.lease_json(change.lease), "replay": change.replay}

    async def _list(self, request: Request) -> dict[str, Any]:
        table = self._table()
        node = request.query_one("node")
        task = request.query_one("task")
        state = request.query_one("state")
        leases = list(table.leases.values())
        if node:
            node_id = (
                self.agent.membership.resolve_node(node).id
                if self.agent.membership.get(node) is None
                else node
            )
            leases = [lease for lease in leases if node_id in (lease.holder, lease.submitter)]
        if task:
            leases = [lease for lease in leases if lease.task_id == task]
        if state:
            if state == "holding":
                leases = [lease for lease in leases if lease.holding]
            else:
                leases = [lease for lease in leases if lease.state == state]
        leases.sort(key=lambda lease: (lease.token.term, lease.token.seq))
        return {"term": self.agent.term, "leases": [self.lease_json(lease) for lease in leases]}

    async def _get(self, request: Request) -> dict[str, Any]:
        self.hydrate(lease_id=request.path_params["lease_id"])
        return {"lease": self.lease_json(self._table().get(request.path_params["lease_id"]))}

    # -- timers ---------------------------------------------------------------------------

    def expire_now(self) -> list[Lease]:
        if self.table is None:
            return []
        now_mono, now_ms = self._now()
        new, dead = self.table.expire_due(now_mono=now_mono, now_wall_ms=now_ms)
        if dead:
            self._commit(new, dead)
            for lease in dead:
                log(
                    self.logger,
                    logging.WARNING,
                    "lease expired",
                    lease_id=lease.lease_id,
                    task_id=lease.task_id,
                    holder=lease.holder,
                )
        return list(dead)

    def reconcile_now(self) -> None:
        if self.table is None:
            return
        agent = self.agent
        statuses: dict[str, HolderStatus] = {}
        drain_overdue: list[Lease] = []
        now_mono, now_ms = self._now()
        for lease in self.table.holding():
            if lease.kind == "fence" or lease.holder in statuses:
                continue
            lc = agent.registry.lifecycle(lease.holder)
            if lc is not None and lc.state == "quarantined":
                statuses[lease.holder] = "quarantined"
            elif lease.holder != agent.node_id and agent.heartbeats.stale(lease.holder):
                statuses[lease.holder] = "stale"
            else:
                statuses[lease.holder] = "ok"
            if (
                lc is not None
                and lc.state == "draining"
                and lc.deadline_wall_ms is not None
                and lc.deadline_wall_ms <= now_ms
            ):
                drain_overdue.extend(
                    x
                    for x in self.table.holding()
                    if x.holder == lease.holder and x.state == "live" and x.kind != "fence"
                )
        auto = bool(agent.records.settings["auto_revoke_stale_leases"])
        new, result = self.table.reconcile(
            statuses, auto_revoke=auto, now_mono=now_mono, now_wall_ms=now_ms
        )
        self.flags = {f.lease_id: f.status for f in result.flagged}
        records = list(result.records)
        for lease in drain_overdue:
            current = new.get(lease.lease_id)
            if current.state != "live":
                continue
            new, change = new.revoke(
                lease.lease_id,
                actor=agent.node_id,
                reason="drain_deadline",
                now_mono=now_mono,
                now_wall_ms=now_ms,
            )
            records.extend(change.records)
        if records:
            self._commit(new, records)
            for lease in records:
                log(
                    self.logger,
                    logging.WARNING,
                    "lease revoked by the control plane",
                    lease_id=lease.lease_id,
                    holder=lease.holder,
                    reason=lease.reason,
                )
        else:
            self.table = new

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.load()
        task_status.started()
        health = self.agent.health
        next_compaction = self.agent.clock.mono() + COMPACT_INTERVAL_S
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
            if self.agent.clock.mono() >= next_compaction:
                self.compact()
                next_compaction = self.agent.clock.mono() + COMPACT_INTERVAL_S
            deadline = self.table.next_deadline() if self.table else None
            wake = self.agent.clock.mono() + RECONCILE_INTERVAL_S
            if deadline is not None:
                wake = min(wake, deadline + 0.001)
            with trio.move_on_at(wake):
                await self._kick.wait()
            if self._kick.is_set():
                self._kick = trio.Event()


def _text(body: dict[str, Any], name: str) -> str:
    return check_id(body.get(name), name)


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise BadRequest(f"{name!r} must be a non-negative integer", code="bad_request")
    return value


def _number(body: dict[str, Any], name: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise BadRequest(f"{name!r} must be a positive number of seconds", code="bad_request")
    return float(value)


__all__ = ["LeaseService", "new_lease_id"]
