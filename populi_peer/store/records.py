"""Signed cluster records held by this node, one per kind (table ``cluster_records``;
today the ``settings`` record)."""

from __future__ import annotations

from populi_peer.store.db import Store


class SignedRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    def text(self, kind: str) -> str | None:
        """The signed text of the ``kind`` record held, if any."""
        row = self.store.execute(
            "SELECT text FROM cluster_records WHERE kind = ?", (kind,)
        ).fetchone()
        return None if row is None else str(row["text"])

    def put(self, kind: str, *, serial: int, text: str, stored_ms: int) -> None:
        """Hold ``text`` (already verified) as the ``kind`` record, replacing the one held."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO cluster_records (kind, serial, text, stored_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind) DO UPDATE SET serial=excluded.serial, text=excluded.text, stored_ms=excluded.stored_ms",
                (kind, serial, text, stored_ms),
            )


__all__ = ["SignedRecords"]
