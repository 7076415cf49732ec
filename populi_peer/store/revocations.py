"""The cluster's signed revocation list (table ``revocation_lists``): only the newest is
kept."""

from __future__ import annotations

from populi_peer.store.db import Store


class RevocationLists:
    def __init__(self, store: Store) -> None:
        self.store = store

    def latest(self) -> str | None:
        """The signed text of the list with the highest serial, if any."""
        row = self.store.execute(
            "SELECT text FROM revocation_lists ORDER BY serial DESC LIMIT 1"
        ).fetchone()
        return None if row is None else str(row["text"])

    def install(self, serial: int, text: str, *, stored_ms: int) -> None:
        """Keep ``text`` (already verified, serial ``serial``) and drop older lists."""
        with self.store.transaction():
            self.store.execute(
                "INSERT OR REPLACE INTO revocation_lists (serial, text, stored_ms) VALUES (?, ?, ?)",
                (serial, text, stored_ms),
            )
            self.store.execute("DELETE FROM revocation_lists WHERE serial < ?", (serial,))


__all__ = ["RevocationLists"]
