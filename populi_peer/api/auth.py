"""Who sent a request: signature check, membership lookup, revocation.

The signature's signer id (``keyid``) is looked up in this node's membership view; an
unknown, retired or revoked signer is refused (401), and so is any request whose signer
lacks the route's role (403). The check runs on every request, so a signer revoked while a
keep-alive connection is open is refused on that connection's next request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enrollment.errors import SignatureError
from enrollment.signing import ReplayCache, verify_request
from populi_peer.clock import Clock


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    id: str
    kind: str  # "node" | "operator"
    name: str
    roles: frozenset[str]
    public_key: Ed25519PublicKey

    def has_any(self, roles: frozenset[str]) -> bool:
        return bool(self.roles & roles)


class Authenticator:
    def __init__(
        self,
        *,
        node_id: str,
        clock: Clock,
        skew_s: float,
        lookup: Callable[[str], Principal | None],
        is_revoked: Callable[[str], bool],
        replay_max_entries: int = 1_000_000,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.skew_s = skew_s
        self.lookup = lookup
        self.is_revoked = is_revoked
        self.replay_cache = ReplayCache(max_entries=replay_max_entries)

    def _resolve(self, keyid: str) -> Ed25519PublicKey | None:
        if self.is_revoked(keyid):
            return None
        principal = self.lookup(keyid)
        return None if principal is None else principal.public_key

    def authenticate(
        self, *, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Principal:
        params = verify_request(
            headers=headers,
            method=method,
            path=path,
            query=query,
            body=body,
            my_node_id=self.node_id,
            resolve_key=self._resolve,
            now_s=self.clock.wall(),
            skew_s=self.skew_s,
            replay_cache=self.replay_cache,
        )
        principal = self.lookup(params.keyid)
        if principal is None or self.is_revoked(params.keyid):  # pragma: no cover - raced
            raise SignatureError(f"signer {params.keyid} is not a member", code="unknown_signer")
        return principal


__all__ = ["Authenticator", "Principal"]
