"""The event log (table ``events``): what happened to which node, who did it and why.

One append-only log, numbered by ``seq``. Readers page through it by ``seq``: oldest
first after a cursor, or newest first before one (``GET /v1/populi/events`` shows the
newest page, oldest first, then follows with the cursor). ``listeners`` are told of every
append, so that a reader waiting for the next event wakes on it instead of polling.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from populi_peer.core.messages.records import EventKind
from populi_peer.core.wire import FieldsRecord
from populi_peer.store.db import Store, from_row


@dataclass(frozen=True, slots=True)
class Event(FieldsRecord):
    seq: int
    at_ms: int
    node_id: str
    kind: str
    actor: str
    reason: str
    detail: dict[str, Any]


def _event(row: sqlite3.Row) -> Event:
    return from_row(Event, row, detail=json.loads)


class EventLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        #: Called after every append (on the caller's thread, in the agent the trio
        #: thread). Inside an outer transaction the row may still roll back: a listener
        #: only wakes readers, who read the log again.
        self.listeners: list[Callable[[], None]] = []

    def append(
        self,
        *,
        at_ms: int,
        node_id: str,
        kind: EventKind,
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
        for listener in self.listeners:
            listener()

    def page(
        self,
        *,
        node_id: str | None = None,
        kind: str | None = None,
        after: int | None = None,
        before: int | None = None,
        since_ms: int | None = None,
        limit: int = 200,
        newest_first: bool = False,
    ) -> list[Event]:
        """At most ``limit`` events with ``after < seq < before`` and ``at_ms >= since_ms``,
        of ``node_id`` and of ``kind`` when given; in ``seq`` order, or newest first."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("node_id = ?", node_id),
            ("kind = ?", kind),
            ("seq > ?", after),
            ("seq < ?", before),
            ("at_ms >= ?", since_ms),
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

    def last_seq(self) -> int:
        """The newest event's seq (0 for an empty log)."""
        row = self.store.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def mentions_node(self, node_id: str) -> bool:
        """Whether any event is about ``node_id`` (a deleted node's events stay listed)."""
        row = self.store.execute("SELECT 1 FROM events WHERE node_id = ? LIMIT 1", (node_id,))
        return row.fetchone() is not None

    def has_kind(self, kind: str) -> bool:
        row = self.store.execute("SELECT 1 FROM events WHERE kind = ? LIMIT 1", (kind,))
        return row.fetchone() is not None


__all__ = ["Event", "EventLog"]
