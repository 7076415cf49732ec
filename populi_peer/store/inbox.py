"""Messages this node received from others (table ``inbox``), with the answer each got.

A message is keyed by ``<sender>/<message id>``: a repeated delivery finds the first
answer here and is answered with it, its handler not run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from populi_peer.store.db import Store


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    key: str  # "<sender>/<message id>"
    sender: str
    type: str
    #: ``{"message": <what was received, secrets redacted>, "answer": <what it got>}``.
    body: dict[str, Any]
    received_ms: int


class InboxMessages:
    def __init__(self, store: Store) -> None:
        self.store = store

    def body(self, key: str) -> dict[str, Any] | None:
        """What was stored of the message ``key``, if it was received before."""
        row = self.store.execute("SELECT body FROM inbox WHERE message_id = ?", (key,)).fetchone()
        return None if row is None else dict(json.loads(row["body"]))

    def add(
        self, key: str, *, sender: str, type: str, body: dict[str, Any], received_ms: int
    ) -> None:
        """Record a message and its answer; one already recorded under ``key`` is kept."""
        with self.store.transaction():
            self.store.execute(
                "INSERT OR IGNORE INTO inbox (message_id, sender, type, body, received_ms) VALUES (?, ?, ?, ?, ?)",
                (key, sender, type, json.dumps(body, sort_keys=True), received_ms),
            )

    def page(self, *, after: int, limit: int) -> list[StoredMessage]:
        """At most ``limit`` messages with ``seq > after``, oldest first."""
        rows = self.store.execute(
            "SELECT * FROM inbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [
            StoredMessage(
                seq=row["seq"],
                key=row["message_id"],
                sender=row["sender"],
                type=row["type"],
                body=json.loads(row["body"]),
                received_ms=row["received_ms"],
            )
            for row in rows
        ]

    def prune(self, *, before_ms: int) -> int:
        """Forget the messages received before ``before_ms``; returns how many."""
        with self.store.transaction():
            return int(
                self.store.execute("DELETE FROM inbox WHERE received_ms < ?", (before_ms,)).rowcount
            )


__all__ = ["InboxMessages", "StoredMessage"]
