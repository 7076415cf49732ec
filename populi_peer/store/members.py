"""The cluster's principals (table ``principals``) and their version (meta
``membership_version``).

Writes run inside the caller's transaction (a join commits its member with the token use,
lifecycle and event); the caller adopts them into memory only once that committed.
"""

from __future__ import annotations

import json
import sqlite3

from populi_peer.core.membership import Member
from populi_peer.store.db import Store, from_row, json_tuple

_INSERT = (
    "INSERT INTO principals (id, kind, name, public_key, roles, addresses, cert_serial, "
    "cert_not_after_ms, joined_ms, token_id, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)


def _params(member: Member) -> tuple[object, ...]:
    return (
        member.id,
        member.kind,
        member.name,
        member.public_key,
        json.dumps(list(member.roles)),
        json.dumps(list(member.addresses)),
        member.cert_serial,
        member.cert_not_after_ms,
        member.joined_ms,
        member.token_id,
        member.updated_ms,
    )


def _member(row: sqlite3.Row) -> Member:
    return from_row(Member, row, roles=json_tuple, addresses=json_tuple)


class Members:
    def __init__(self, store: Store) -> None:
        self.store = store

    def all(self) -> list[Member]:
        return [_member(row) for row in self.store.execute("SELECT * FROM principals").fetchall()]

    def insert(self, member: Member) -> None:
        """Add a principal that is not there yet (a duplicate id is a StoreError)."""
        with self.store.transaction():
            self.store.execute(_INSERT, _params(member))

    def upsert(self, member: Member) -> None:
        """Add or update a principal; its ``joined_ms`` stays the first one recorded."""
        with self.store.transaction():
            self.store.execute(
                _INSERT + " ON CONFLICT (id) DO UPDATE SET kind=excluded.kind, "
                "name=excluded.name, public_key=excluded.public_key, roles=excluded.roles, "
                "addresses=excluded.addresses, cert_serial=excluded.cert_serial, "
                "cert_not_after_ms=excluded.cert_not_after_ms, token_id=excluded.token_id, "
                "updated_ms=excluded.updated_ms",
                _params(member),
            )

    def delete(self, principal_id: str) -> None:
        with self.store.transaction():
            self.store.execute("DELETE FROM principals WHERE id = ?", (principal_id,))

    def replace_all(self, members: list[Member], *, version: int) -> None:
        """Install another node's whole table (the control plane's) at its version."""
        with self.store.transaction():
            self.store.execute("DELETE FROM principals")
            for member in members:
                self.insert(member)
            self.store.set_meta("membership_version", str(version))

    def bump_version(self) -> None:
        """One more than the stored version (2 when none is stored: the default is 1)."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO meta (key, value) VALUES ('membership_version', '2') "
                "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )


__all__ = ["Members"]
