"""What one voter keeps of the control-plane election (ADR 0011 Decision 7): its term and
vote (table ``election_vote``, one row, with the replica's digest) and the winning record
entries by key (table ``election_entries``).

Every write commits by itself with ``synchronous=FULL`` (the store's setting for every
commit) before the caller carries out anything that depends on it; a failure raises
(:class:`~populi_peer.errors.StoreError` or ``StorageUnavailable``) with nothing written,
and the caller restarts its machine from what :meth:`ElectionState.load` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from populi_peer.core.election import PersistedVote
from populi_peer.core.replication import EMPTY_DIGEST, Digest, Entry, RecordSet, WriteId
from populi_peer.errors import StoreError
from populi_peer.store.db import Store


class ElectionState:
    def __init__(self, store: Store) -> None:
        self.store = store

    def load(self) -> tuple[PersistedVote, RecordSet]:
        """The vote and the replica as last persisted (a fresh node: term 0, nothing)."""
        row = self.store.execute(
            "SELECT term, voted_for, digest FROM election_vote WHERE id = 1"
        ).fetchone()
        vote = PersistedVote() if row is None else PersistedVote(int(row[0]), row[1])
        digest = EMPTY_DIGEST if row is None else Digest.from_json(json.loads(row[2]))
        rows = self.store.execute(
            "SELECT write_term, write_seq, body FROM election_entries"
        ).fetchall()
        try:
            entries = [
                Entry.from_json({"id": [int(r[0]), int(r[1])], **json.loads(r[2])}) for r in rows
            ]
            return vote, RecordSet.restore(
                entries, digest.union(Digest(e.write_id for e in entries))
            )
        except (ValueError, KeyError) as exc:
            raise StoreError(f"election records unreadable: {exc}", code="bad_record") from exc

    def has_voters(self) -> bool:
        row = self.store.execute(
            "SELECT 1 FROM election_entries WHERE key_kind = 'cluster' AND key_a = 'voters'"
        ).fetchone()
        return row is not None

    def bootstrap(self, entry: Entry) -> None:
        """Store the cluster's first voter-set record (``populi init``; an init node whose
        data directory predates the election), unless a voter set is held already."""
        with self.store.transaction():
            if not self.has_voters():
                self.save_records([entry], Digest([entry.write_id]))

    def save_vote(self, term: int, voted_for: str | None, digest: Digest | None = None) -> None:
        """Persist ``(term, voted_for)`` (and keep the stored digest, or set ``digest``)."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO election_vote (id, term, voted_for, digest) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET term = excluded.term, "
                "voted_for = excluded.voted_for",
                (term, voted_for, json.dumps((digest or EMPTY_DIGEST).to_json())),
            )
            if digest is not None:
                self._set_digest(digest)

    def save_records(self, entries: Iterable[Entry], digest: Digest) -> None:
        """Upsert the winning ``entries`` by key and store ``digest``, in one transaction."""
        with self.store.transaction():
            for entry in entries:
                data = entry.to_json()
                write_id: WriteId = entry.write_id
                del data["id"]
                kind, a, b = entry.key
                self.store.execute(
                    "INSERT INTO election_entries "
                    "(key_kind, key_a, key_b, write_term, write_seq, body) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_kind, key_a, key_b) DO UPDATE "
                    "SET write_term = excluded.write_term, write_seq = excluded.write_seq, "
                    "body = excluded.body",
                    (kind, a, b, write_id.term, write_id.seq, json.dumps(data, sort_keys=True)),
                )
            self.store.execute(
                "INSERT INTO election_vote (id, term, voted_for, digest) VALUES (1, 0, NULL, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (json.dumps(digest.to_json()),),
            )
            self._set_digest(digest)

    def _set_digest(self, digest: Digest) -> None:
        self.store.execute(
            "UPDATE election_vote SET digest = ? WHERE id = 1", (json.dumps(digest.to_json()),)
        )


__all__ = ["ElectionState"]
