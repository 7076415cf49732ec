"""The control plane's join tokens and their uses (tables ``join_tokens``, ``token_uses``).

The rows hold a token's digest (of its envelope, never its secret), what it grants, how
many uses are left, and, per use, the node it enrolled and the certificate that join
issued: a retried join (same token, same key) is answered from that row, never by a
second use. Every write here is meant to run inside the caller's transaction, together
with the member record it belongs to.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from enrollment.canonical import canonical_json
from enrollment.tokens import JoinToken
from populi_peer.store.db import Store, from_row, json_tuple


@dataclass(frozen=True, slots=True)
class JoinTokenRecord:
    """What the control plane keeps of a token it minted (never its secret)."""

    token_id: str
    digest: str
    roles: tuple[str, ...]
    name: str | None
    uses_total: int
    uses_left: int
    not_before_ms: int
    expires_ms: int
    created_ms: int
    created_by: str
    revoked_ms: int | None


def _token(row: sqlite3.Row) -> JoinTokenRecord:
    return from_row(JoinTokenRecord, row, roles=json_tuple)


@dataclass(frozen=True, slots=True)
class RecordedJoin:
    """One use of a token: who joined with it and the certificate it was issued."""

    node_id: str
    at_ms: int
    certificate: str | None


class JoinTokens:
    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, token: JoinToken, *, digest: str, created_ms: int, created_by: str) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO join_tokens (token_id, digest, roles, name, uses_total, uses_left, "
                "not_before_ms, expires_ms, created_ms, created_by) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    token.token_id,
                    digest,
                    canonical_json(sorted(token.roles)).decode(),
                    token.name,
                    token.uses,
                    token.uses,
                    token.not_before_ms,
                    token.expires_ms,
                    created_ms,
                    created_by,
                ),
            )

    def get(self, token_id: str) -> JoinTokenRecord | None:
        row = self.store.execute(
            "SELECT * FROM join_tokens WHERE token_id = ?", (token_id,)
        ).fetchone()
        return None if row is None else _token(row)

    def all(self) -> list[JoinTokenRecord]:
        return [
            _token(row)
            for row in self.store.execute("SELECT * FROM join_tokens ORDER BY created_ms")
        ]

    def revoke(self, token_id: str, *, now_ms: int) -> None:
        with self.store.transaction():
            self.store.execute(
                "UPDATE join_tokens SET revoked_ms = ? WHERE token_id = ? AND revoked_ms IS NULL",
                (now_ms, token_id),
            )

    def used_by(self, token_id: str) -> list[str]:
        return [
            str(row["node_id"])
            for row in self.store.execute(
                "SELECT node_id FROM token_uses WHERE token_id = ? ORDER BY at_ms", (token_id,)
            )
        ]

    def recorded(self, token_id: str, node_id: str) -> RecordedJoin | None:
        row = self.store.execute(
            "SELECT node_id, at_ms, certificate FROM token_uses WHERE token_id = ? AND node_id = ?",
            (token_id, node_id),
        ).fetchone()
        if row is None:
            return None
        return RecordedJoin(
            node_id=str(row["node_id"]), at_ms=int(row["at_ms"]), certificate=row["certificate"]
        )

    def consume(self, token_id: str, *, node_id: str, at_ms: int, certificate: str) -> None:
        """Take one use and record who took it (the caller checked that one is left)."""
        with self.store.transaction():
            self.store.execute(
                "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE token_id = ?", (token_id,)
            )
            self.store.execute(
                "INSERT INTO token_uses (token_id, node_id, at_ms, certificate) VALUES (?, ?, ?, ?)",
                (token_id, node_id, at_ms, certificate),
            )

    # -- replicated (ADR 0017): the rows follow the replicated sets, idempotently ---------

    def put_issued(
        self,
        *,
        token_id: str,
        digest: str,
        roles: list[str],
        name: str | None,
        uses: int,
        not_before_ms: int,
        expires_ms: int,
        created_ms: int,
        created_by: str,
    ) -> None:
        """Hold a minted token (a second copy changes nothing); its uses left follow the
        recorded uses."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO join_tokens (token_id, digest, roles, name, uses_total, uses_left, "
                "not_before_ms, expires_ms, created_ms, created_by) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (token_id) DO NOTHING",
                (
                    token_id,
                    digest,
                    canonical_json(sorted(roles)).decode(),
                    name,
                    uses,
                    uses,
                    not_before_ms,
                    expires_ms,
                    created_ms,
                    created_by,
                ),
            )
            self._recount(token_id)

    def record_use(self, token_id: str, *, node_id: str, at_ms: int) -> None:
        """One use taken by ``node_id`` (again: nothing changes)."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO token_uses (token_id, node_id, at_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (token_id, node_id) DO NOTHING",
                (token_id, node_id, at_ms),
            )
            self._recount(token_id)

    def drop_use(self, token_id: str, *, node_id: str) -> None:
        """A use beaten by another consumer's (one an older leader left on a minority)."""
        with self.store.transaction():
            self.store.execute(
                "DELETE FROM token_uses WHERE token_id = ? AND node_id = ?", (token_id, node_id)
            )
            self._recount(token_id)

    def set_certificate(self, token_id: str, *, node_id: str, certificate: str) -> None:
        """The certificate the join of ``node_id`` with this token issued (a retried join
        is answered with it)."""
        with self.store.transaction():
            self.store.execute(
                "UPDATE token_uses SET certificate = ? WHERE token_id = ? AND node_id = ?",
                (certificate, token_id, node_id),
            )

    def _recount(self, token_id: str) -> None:
        self.store.execute(
            "UPDATE join_tokens SET uses_left = MAX(0, uses_total - "
            "(SELECT COUNT(*) FROM token_uses WHERE token_uses.token_id = join_tokens.token_id)) "
            "WHERE token_id = ?",
            (token_id,),
        )


__all__ = ["JoinTokenRecord", "JoinTokens", "RecordedJoin"]
