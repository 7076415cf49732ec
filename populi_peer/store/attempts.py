"""Attempts of tasks run on this node (table ``attempts``), the worker's fences (table
``fences``) and the node-local claims on this node's GPUs (table ``claims``, ADR 0015).

An attempt row is written at every step of a run (accepted, running, finished), by the
worker for remote attempts (``role="worker"``) and by the submitter for local ones
(``"local"``): a restarted agent re-adopts or cleans up what they record. A worker's fence
is the highest fencing token it accepted per task (safety rule 2); it is read and written
only here, and written in the same transaction as the attempt it admits
(``save(..., fence=True)``). The check itself is the core's
(:class:`populi_peer.core.fencing.FenceBook`, rebuilt from :meth:`Attempts.fences`).

A finished attempt's ``released_ms`` is set once a control plane acknowledged its end (the
release answer, or a report answer): until then the node's reports carry it. A claim row
holds a :class:`~populi_peer.core.reports.Claim`; it is written with the attempt it starts
and deleted with that attempt's end, in one transaction each (``save(claim=...,
drop_claim=...)``). The decisions are the core's (:class:`populi_peer.core.claims.NodeBook`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from populi_peer.core.fencing import FencingToken
from populi_peer.core.reports import Claim
from populi_peer.store.db import Store, from_row


@dataclass(frozen=True, slots=True)
class AttemptIdentity:
    """What names an attempt and the lease it runs under: an attempt row
    (:class:`AttemptRecord`) and the agent's plan (``agent.attempts.AttemptPlan``) begin
    with it, and a row is saved from it."""

    task_id: str
    attempt: int
    role: str  # "worker" | "local"
    submitter: str
    token: FencingToken
    lease_id: str | None


@dataclass(frozen=True, slots=True)
class AttemptRecord(AttemptIdentity):
    state: str  # "accepted" | "running" | "finished"
    #: The attempt's plan (``agent.attempts.AttemptPlan.to_json``) and what the run added
    #: (``started_wall_ms``...).
    body: dict[str, Any]
    result: dict[str, Any] | None
    delivered_ms: int | None
    updated_ms: int
    #: When a control plane acknowledged the attempt's end (``None``: not yet, or running).
    released_ms: int | None = None


def _record(row: sqlite3.Row) -> AttemptRecord:
    return from_row(
        AttemptRecord,
        row,
        token=FencingToken.parse,
        body=json.loads,
        result=lambda text: None if text is None else json.loads(text),
    )


class Attempts:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- attempts -------------------------------------------------------------------------

    def save(
        self,
        identity: AttemptIdentity,
        *,
        state: str,
        body: dict[str, Any],
        result: dict[str, Any] | None,
        now_ms: int,
        fence: bool = False,
        claim: Claim | None = None,
        drop_claim: str | None = None,
    ) -> None:
        """Record the new state of the attempt ``identity`` names; a result once recorded
        is kept when ``result`` is ``None``. ``fence``: a worker admits this attempt — its
        task's fence becomes its token in the same transaction (both or neither).
        ``claim``: the node-local claim this attempt starts under, recorded with it;
        ``drop_claim``: the claim its end gives back."""
        with self.store.transaction():
            if fence:
                self.set_fence(identity.task_id, identity.token, now_ms=now_ms)
            if claim is not None:
                self.store.execute(
                    "INSERT INTO claims (claim_id, task_id, attempt, body, made_ms) VALUES (?,?,?,?,?)",
                    (
                        claim.claim_id,
                        claim.task_id,
                        claim.attempt,
                        json.dumps(claim.to_json(), sort_keys=True),
                        now_ms,
                    ),
                )
            if drop_claim is not None:
                self.store.execute("DELETE FROM claims WHERE claim_id = ?", (drop_claim,))
            self.store.execute(
                "INSERT INTO attempts (task_id, attempt, role, submitter, token, lease_id, state, body, result, updated_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (task_id, attempt, role) DO UPDATE SET "
                "state=excluded.state, body=excluded.body, result=COALESCE(excluded.result, attempts.result), updated_ms=excluded.updated_ms",
                (
                    identity.task_id,
                    identity.attempt,
                    identity.role,
                    identity.submitter,
                    str(identity.token),
                    identity.lease_id,
                    state,
                    json.dumps(body, sort_keys=True),
                    None if result is None else json.dumps(result, sort_keys=True),
                    now_ms,
                ),
            )

    def get(self, task_id: str, attempt: int, role: str) -> AttemptRecord | None:
        row = self.store.execute(
            "SELECT * FROM attempts WHERE task_id = ? AND attempt = ? AND role = ?",
            (task_id, attempt, role),
        ).fetchone()
        return None if row is None else _record(row)

    def unfinished(self, role: str) -> list[AttemptRecord]:
        """The attempts of ``role`` accepted or running (what a restart takes up again)."""
        return self._records(
            "SELECT * FROM attempts WHERE role = ? AND state IN ('accepted', 'running')", (role,)
        )

    def undelivered(self) -> list[AttemptRecord]:
        """A worker's finished attempts whose result the submitter has not acknowledged."""
        return self._records(
            "SELECT * FROM attempts WHERE role = 'worker' AND state = 'finished' AND delivered_ms IS NULL",
            (),
        )

    def mark_delivered(self, task_id: str, attempt: int, *, now_ms: int) -> None:
        with self.store.transaction():
            self.store.execute(
                "UPDATE attempts SET delivered_ms = ? WHERE task_id = ? AND attempt = ? AND role = 'worker'",
                (now_ms, task_id, attempt),
            )

    def held(self) -> list[AttemptRecord]:
        """Every attempt a control plane may still count: accepted, running, or finished
        with its end not acknowledged yet (what the node's reports are built from)."""
        return self._records(
            "SELECT * FROM attempts WHERE state != 'finished' OR released_ms IS NULL", ()
        )

    def mark_released(self, task_id: str, attempt: int, role: str, *, now_ms: int) -> None:
        """A control plane acknowledged the end of this (finished) attempt."""
        with self.store.transaction():
            self.store.execute(
                "UPDATE attempts SET released_ms = ? WHERE task_id = ? AND attempt = ? "
                "AND role = ? AND state = 'finished' AND released_ms IS NULL",
                (now_ms, task_id, attempt, role),
            )

    def claims(self) -> list[Claim]:
        """The node-local claims this node holds."""
        rows = self.store.execute("SELECT body FROM claims ORDER BY claim_id").fetchall()
        return [Claim.from_json(json.loads(row["body"])) for row in rows]

    def finished_before(self, cutoff_ms: int) -> list[AttemptRecord]:
        """Finished attempts last written before ``cutoff_ms`` that nobody waits on any
        more: local ones, and a worker's once their result was delivered — and only once
        their end was acknowledged (or they had no lease): until then the node's reports
        carry it, so that a restarted control plane records the task completed."""
        return self._records(
            "SELECT * FROM attempts WHERE state = 'finished' AND updated_ms < ? AND (role = 'local' OR delivered_ms IS NOT NULL) "
            "AND (released_ms IS NOT NULL OR lease_id IS NULL)",
            (cutoff_ms,),
        )

    def of_task(self, task_id: str, role: str) -> list[AttemptRecord]:
        """Every attempt of ``task_id`` this node ran as ``role``, oldest first."""
        return self._records(
            "SELECT * FROM attempts WHERE task_id = ? AND role = ? ORDER BY attempt",
            (task_id, role),
        )

    def _records(self, sql: str, params: tuple[Any, ...]) -> list[AttemptRecord]:
        return [_record(row) for row in self.store.execute(sql, params).fetchall()]

    # -- the worker's fences --------------------------------------------------------------

    def fences(self) -> list[tuple[str, FencingToken]]:
        """Every task's fence, the highest token this worker accepted for it (what
        :meth:`populi_peer.core.fencing.FenceBook.from_entries` rebuilds the book from)."""
        rows = self.store.execute("SELECT task_id, token FROM fences").fetchall()
        return [(str(row["task_id"]), FencingToken.parse(row["token"])) for row in rows]

    def set_fence(self, task_id: str, token: FencingToken, *, now_ms: int) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO fences (task_id, token, updated_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (task_id) DO UPDATE SET token = excluded.token, updated_ms = excluded.updated_ms",
                (task_id, str(token), now_ms),
            )


__all__ = ["AttemptIdentity", "AttemptRecord", "Attempts"]
