"""The storage layer: the only SQL in Populi.

- :mod:`~populi_peer.store.db` — the database itself (:class:`Store`): connection,
  migrations, transactions, meta, durable request nonces, storage-fault translation.
- One repository per table family, each built on a :class:`Store`:
  :mod:`~populi_peer.store.members` (principals), :mod:`~populi_peer.store.registers`,
  :mod:`~populi_peer.store.events` (the event log), :mod:`~populi_peer.store.tokens`
  (join tokens and their uses), :mod:`~populi_peer.store.revocations`,
  :mod:`~populi_peer.store.records` (signed cluster records),
  :mod:`~populi_peer.store.leases`, :mod:`~populi_peer.store.tasks`,
  :mod:`~populi_peer.store.attempts` (attempts and the worker's fences),
  :mod:`~populi_peer.store.inbox`.

Repositories hold no state of their own. Their writes join the caller's transaction: a
caller groups a state change and the records it must persist in one
``with store.transaction():`` and adopts the change in memory only after it committed
(STYLE principle 15). A write called outside any transaction commits by itself.
Repositories return dataclasses or the core's own types (``core.leases.Lease``,
``core.membership.Member``), never database rows.
"""

from populi_peer.store.db import (
    DB_FILE_NAME,
    MIGRATIONS,
    NONCE_PRUNE_INTERVAL_S,
    SCHEMA_VERSION,
    RequestNonce,
    Store,
    bind_request_nonce,
    file_error,
    store_error,
)

__all__ = [
    "DB_FILE_NAME",
    "MIGRATIONS",
    "NONCE_PRUNE_INTERVAL_S",
    "SCHEMA_VERSION",
    "RequestNonce",
    "Store",
    "bind_request_nonce",
    "file_error",
    "store_error",
]
