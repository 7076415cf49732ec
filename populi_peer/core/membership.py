"""A principal of the cluster as every node records it: a node or an operator credential.

The control plane's table is authoritative; other nodes hold a copy. The record's JSON
form is what the control plane hands out (join answers, the members listing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from populi_peer.core.wire import record_json
from populi_peer.errors import BadRequest


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
        """Its fields but ``token_id`` (the ``member`` register adds it)."""
        return record_json(self, omit=("token_id",))

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


__all__ = ["Member"]
