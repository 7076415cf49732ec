"""The event log (table ``events``): what happened to which node, who did it and why.

One append-only log, numbered by ``seq``. Readers page through it by ``seq``: oldest
first after a cursor (``GET /v1/populi/events``), or newest first before one.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from populi_peer.store.db import Store


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at_ms: int
    node_id: str
    kind: str
    actor: str
    reason: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at_ms": self.at_ms,
            "node_id": self.node_id,
            "kind": self.kind,
            "actor": self.actor,
            "reason": self.reason,
            "detail": self.detail,
        }


def _event(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["seq"],
        at_ms=row["at_ms"],
        node_id=row["node_id"],
        kind=row["kind"],
        actor=row["actor"],
        reason=row["reason"],
        detail=json.loads(row["detail"]),
    )


class EventLog:
    def __init__(self, store: Store) -> None:
        self.store = store

    def append(
        self,
        *,
        at_ms: int,
        node_id: str,
        kind: str,
        actor: str,
        reason: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record one event (in the caller's transaction, if there is one)."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO events (at_ms, node_id, kind, actor, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    at_ms,
                    node_id,
                    kind,
                    actor,
                    reason,
                    json.dumps(detail or {}, sort_keys=True, default=str),
                ),
            )

    def page(
        self,
        *,
        node_id: str | None = None,
        kind: str | None = None,
        after: int | None = None,
        before: int | None = None,
        limit: int = 200,
        newest_first: bool = False,
    ) -> list[Event]:
        """At most ``limit`` events with ``after < seq < before``, of ``node_id`` and of
        ``kind`` when given; in ``seq`` order, or newest first."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("node_id = ?", node_id),
            ("kind = ?", kind),
            ("seq > ?", after),
            ("seq < ?", before),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = "SELECT * FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        params.append(limit)
        return [_event(row) for row in self.store.execute(sql, params).fetchall()]


__all__ = ["Event", "EventLog"]
