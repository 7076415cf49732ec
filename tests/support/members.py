"""Member records as a join writes them, for tests that put members in a store by hand."""

from __future__ import annotations

from enrollment.keys import generate_key, node_id_for, public_to_text
from populi_peer.core.membership import Member

DAY_MS = 86_400_000


def node_member(
    name: str,
    *,
    now_ms: int,
    roles: tuple[str, ...] = ("submit", "worker"),
    addresses: tuple[str, ...] = (),
    cert_serial: str = "1",
    token_id: str = "",
    node_id: str | None = None,
) -> Member:
    """Node ``name`` with a fresh key, joined at ``now_ms`` with a certificate valid a day
    (its id is its key's unless ``node_id`` names another)."""
    public = generate_key().public_key()
    return Member(
        id=node_id or node_id_for(public),
        kind="node",
        name=name,
        public_key=public_to_text(public),
        roles=roles,
        addresses=addresses,
        cert_serial=cert_serial,
        cert_not_after_ms=now_ms + DAY_MS,
        joined_ms=now_ms,
        token_id=token_id,
        updated_ms=now_ms,
    )


__all__ = ["DAY_MS", "node_member"]
