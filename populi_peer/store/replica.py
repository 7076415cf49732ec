"""The replicated entries this node has put into its tables (table ``replica_applied``,
ADR 0017): one row per item key, the winning entry's JSON."""

from __future__ import annotations

import json
from typing import Any

from populi_peer.store.db import Store


class AppliedEntries:
    def __init__(self, store: Store) -> None:
        self.store = store

    def all(self) -> list[Any]:
        """Every applied entry, as the JSON :meth:`put` stored."""
        return [
            json.loads(row["entry"])
            for row in self.store.execute("SELECT entry FROM replica_applied")
        ]

    def put(self, key: tuple[str, str, str], entry: Any) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO replica_applied (kind, name, key, entry) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, name, key) DO UPDATE SET entry = excluded.entry",
                (*key, json.dumps(entry, sort_keys=True, separators=(",", ":"))),
            )

    def drop_node(self, node_id: str) -> None:
        """Forget the register entries of a deleted node (its tombstone is put after)."""
        with self.store.transaction():
            self.store.execute(
                "DELETE FROM replica_applied WHERE kind = 'register' AND name = ?", (node_id,)
            )


__all__ = ["AppliedEntries"]
