"""The control plane's execution leases (table ``leases``), the token counter (meta
``lease_next_seq``) and the longest TTL ever allowed (meta ``lease_max_ttl_seen_s``).

A lease's row holds its persisted fields (:meth:`core.leases.Lease.to_json`); its
in-memory expiry is never written (safety rule 5). The pure table returns the leases to
persist with every change; :meth:`Leases.save` writes them with the counter, in the
caller's transaction, before the shell adopts the new table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from populi_peer.core.leases import Lease
from populi_peer.store.db import Store


class Leases:
    def __init__(self, store: Store) -> None:
        self.store = store

    def all(self) -> list[Lease]:
        return self._leases("SELECT body FROM leases", ())

    def of_task(self, task_id: str) -> list[Lease]:
        return self._leases("SELECT body FROM leases WHERE task_id = ?", (task_id,))

    def get(self, lease_id: str) -> Lease | None:
        found = self._leases("SELECT body FROM leases WHERE lease_id = ?", (lease_id,))
        return found[0] if found else None

    def _leases(self, sql: str, params: tuple[str, ...]) -> list[Lease]:
        rows = self.store.execute(sql, params).fetchall()
        return [Lease.from_json(json.loads(row["body"])) for row in rows]

    def next_seq(self) -> int:
        """The token counter: the sequence number the next grant takes."""
        return int(self.store.get_meta("lease_next_seq", "1") or "1")

    def longest_ttl_seen_s(self) -> float:
        """The longest ``max_lease_ttl_s`` the cluster allowed before its current one (meta
        ``lease_max_ttl_seen_s``, kept when the setting changes; 0 if it never did)."""
        return float(self.store.get_meta("lease_max_ttl_seen_s", "0") or 0)

    def save(self, leases: Iterable[Lease], *, next_seq: int, now_ms: int) -> None:
        """Write ``leases`` (new or changed) and the token counter."""
        with self.store.transaction():
            for lease in leases:
                self.store.execute(
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
            self.store.set_meta("lease_next_seq", str(next_seq))


__all__ = ["Leases"]
