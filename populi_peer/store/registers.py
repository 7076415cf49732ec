"""Per-(node, attribute) registers (table ``registers``): each row the signed record of the
write that set it."""

from __future__ import annotations

from populi_peer.store.db import Store


class Registers:
    def __init__(self, store: Store) -> None:
        self.store = store

    def all(self) -> list[str]:
        """The signed record of every register held."""
        return [str(row["body"]) for row in self.store.execute("SELECT body FROM registers")]

    def put(self, node_id: str, attribute: str, text: str) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO registers (node_id, attribute, body) VALUES (?, ?, ?) "
                "ON CONFLICT (node_id, attribute) DO UPDATE SET body = excluded.body",
                (node_id, attribute, text),
            )

    def drop_node(self, node_id: str) -> None:
        """Forget every register of ``node_id`` (its tombstone is written after)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM registers WHERE node_id = ?", (node_id,))


__all__ = ["Registers"]
