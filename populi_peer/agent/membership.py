"""This node's view of the cluster's principals (nodes and operator credentials).

On the control plane it is the authoritative table; on other nodes a cache refreshed from
the control plane whenever a heartbeat answer shows a newer ``membership_version``.
Authentication looks signers up here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from enrollment.keys import public_from_text
from populi_peer.api.auth import Principal
from populi_peer.errors import BadRequest, NotFound, enrollment_boundary
from populi_peer.store import Store


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    kind: str
    name: str
    public_key: str
    roles: tuple[str, ...]
    addresses: tuple[str, ...]
    cert_serial: str
    cert_not_after_ms: int
    joined_ms: int
    token_id: str
    updated_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "public_key": self.public_key,
            "roles": list(self.roles),
            "addresses": list(self.addresses),
            "cert_serial": self.cert_serial,
            "cert_not_after_ms": self.cert_not_after_ms,
            "joined_ms": self.joined_ms,
            "updated_ms": self.updated_ms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        try:
            return cls(
                id=str(data["id"]),
                kind=str(data["kind"]),
                name=str(data["name"]),
                public_key=str(data["public_key"]),
                roles=tuple(str(role) for role in data["roles"]),
                addresses=tuple(str(a) for a in data.get("addresses", [])),
                cert_serial=str(data.get("cert_serial", "")),
                cert_not_after_ms=int(data.get("cert_not_after_ms", 0)),
                joined_ms=int(data.get("joined_ms", 0)),
                token_id=str(data.get("token_id", "")),
                updated_ms=int(data.get("updated_ms", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed member record: {exc}") from exc


class Membership:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._members: dict[str, Member] = {}
        self._principals: dict[str, Principal] = {}
        self.reload()

    @property
    def version(self) -> int:
        return int(self.store.get_meta("membership_version", "1") or "1")

    def reload(self) -> None:
        rows = self.store.execute("SELECT * FROM principals").fetchall()
        self._members = {}
        self._principals = {}
        for row in rows:
            member = Member(
                id=row["id"],
                kind=row["kind"],
                name=row["name"],
                public_key=row["public_key"],
                roles=tuple(json.loads(row["roles"])),
                addresses=tuple(json.loads(row["addresses"])),
                cert_serial=row["cert_serial"],
                cert_not_after_ms=row["cert_not_after_ms"],
                joined_ms=row["joined_ms"],
                token_id=row["token_id"],
                updated_ms=row["updated_ms"],
            )
            self._cache(member)

    def _cache(self, member: Member) -> None:
        self._members[member.id] = member
        with enrollment_boundary():
            public_key = public_from_text(member.public_key)
        self._principals[member.id] = Principal(
            id=member.id,
            kind=member.kind,
            name=member.name,
            roles=frozenset(member.roles),
            public_key=public_key,
        )

    def principal(self, principal_id: str) -> Principal | None:
        return self._principals.get(principal_id)

    def get(self, principal_id: str) -> Member | None:
        return self._members.get(principal_id)

    def all(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: (m.kind != "node", m.name, m.id))

    def nodes(self) -> list[Member]:
        return [m for m in self.all() if m.kind == "node"]

    def resolve_node(self, ref: str) -> Member:
        """A node by id or unique name; unknown or ambiguous names list the candidates."""
        member = self._members.get(ref)
        if member is not None and member.kind == "node":
            return member
        matches = [m for m in self._members.values() if m.kind == "node" and m.name == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(sorted(m.id for m in matches))
            raise BadRequest(
                f"node name {ref!r} is ambiguous: {ids}; use a node id",
                code="ambiguous_node",
                candidates=sorted(m.id for m in matches),
            )
        known = sorted(f"{m.name} ({m.id})" for m in self._members.values() if m.kind == "node")
        raise NotFound(
            f"no node {ref!r}; known nodes: {', '.join(known) or 'none'}",
            code="unknown_node",
            candidates=known,
        )

    def upsert(self, member: Member, *, bump: bool = True) -> None:
        with self.store.transaction():
            self.store_member(member, bump=bump)
        self.adopt(member)

    def remove(self, principal_id: str) -> None:
        with self.store.transaction():
            self.delete_member(principal_id)
        self.forget(principal_id)

    # A change that must commit with other records (a join) is written with these inside
    # the caller's transaction, and adopted into memory only once that commit succeeded.

    def store_member(self, member: Member, *, bump: bool = True) -> None:
        """Write ``member`` (and bump the version) in the caller's transaction; memory is
        unchanged until :meth:`adopt`."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO principals (id, kind, name, public_key, roles, addresses, cert_serial, "
                "cert_not_after_ms, joined_ms, token_id, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET kind=excluded.kind, name=excluded.name, "
                "public_key=excluded.public_key, roles=excluded.roles, addresses=excluded.addresses, "
                "cert_serial=excluded.cert_serial, cert_not_after_ms=excluded.cert_not_after_ms, "
                "token_id=excluded.token_id, updated_ms=excluded.updated_ms",
                (
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
                ),
            )
            if bump:
                self._bump()

    def delete_member(self, principal_id: str) -> None:
        """Delete a principal (and bump the version) in the caller's transaction; memory is
        unchanged until :meth:`forget`."""
        with self.store.transaction():
            self.store.execute("DELETE FROM principals WHERE id = ?", (principal_id,))
            self._bump()

    def adopt(self, member: Member) -> None:
        """Show a committed member to this node (after :meth:`store_member` committed)."""
        self._cache(member)

    def forget(self, principal_id: str) -> None:
        """Drop a committed deletion from memory (after :meth:`delete_member` committed)."""
        self._members.pop(principal_id, None)
        self._principals.pop(principal_id, None)

    def replace_all(self, members: list[Member], version: int) -> None:
        """Install the control plane's table (on a non-control-plane node)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM principals")
            for member in members:
                self.store.execute(
                    "INSERT INTO principals (id, kind, name, public_key, roles, addresses, cert_serial, "
                    "cert_not_after_ms, joined_ms, token_id, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
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
                    ),
                )
            self.store.execute(
                "INSERT INTO meta (key, value) VALUES ('membership_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(version),),
            )
        self.reload()

    def _bump(self) -> None:
        self.store.execute(
            "INSERT INTO meta (key, value) VALUES ('membership_version', '2') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )


__all__ = ["Member", "Membership"]
