"""This node's view of the cluster's principals (nodes and operator credentials).

On the control plane it is the authoritative table; on other nodes a cache refreshed from
the control plane whenever a heartbeat answer shows a newer ``membership_version``.
Authentication looks signers up here.
"""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.keys import public_from_text
from populi_peer.api.auth import Principal
from populi_peer.core.membership import Member
from populi_peer.errors import BadRequest, NotFound, enrollment_boundary
from populi_peer.store import Store
from populi_peer.store.members import Members


@dataclass(eq=False, repr=False)
class Membership:
    store: Store

    def __post_init__(self) -> None:
        self.rows = Members(self.store)
        self._members: dict[str, Member] = {}
        self._principals: dict[str, Principal] = {}
        self.reload()

    @property
    def version(self) -> int:
        return int(self.store.get_meta("membership_version", "1") or "1")

    def reload(self) -> None:
        members = self.rows.all()
        self._members = {}
        self._principals = {}
        for member in members:
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

    @staticmethod
    def check_member(member: Member) -> None:
        """Refuse a record this view could not hold (its public key does not parse)."""
        public_from_text(member.public_key)

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
            self.rows.upsert(member)
            if bump:
                self.rows.bump_version()

    def delete_member(self, principal_id: str) -> None:
        """Delete a principal (and bump the version) in the caller's transaction; memory is
        unchanged until :meth:`forget`."""
        with self.store.transaction():
            self.rows.delete(principal_id)
            self.rows.bump_version()

    def adopt(self, member: Member) -> None:
        """Show a committed member to this node (after :meth:`store_member` committed)."""
        self._cache(member)

    def forget(self, principal_id: str) -> None:
        """Drop a committed deletion from memory (after :meth:`delete_member` committed)."""
        self._members.pop(principal_id, None)
        self._principals.pop(principal_id, None)

    def replace_all(self, members: list[Member], version: int) -> None:
        """Install the control plane's table (on a non-control-plane node)."""
        self.rows.replace_all(members, version=version)
        self.reload()


__all__ = ["Member", "Membership"]
