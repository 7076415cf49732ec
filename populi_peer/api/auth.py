"""Who sent a request: signature check, membership lookup, revocation.

The signature's signer id (``keyid``) is looked up in this node's membership view; an
unknown, retired or revoked signer is refused (401), and so is any request whose signer
lacks the route's role (403). The check runs on every request, so a signer revoked while a
keep-alive connection is open is refused on that connection's next request.

Replays: the in-memory cache refuses a nonce seen since this process started; the store's
``request_nonces`` table refuses one that an earlier process committed with its effect
(:mod:`populi_peer.store`). :meth:`Authenticator.verify` hands back the binding that makes
the request's first commit record its nonce.

A retired node (revoked, or retired on this node's view) whose signature still verifies
with its old key is told so (401 ``node_retired``, with what this node knows: the signed
revocation list and its lifecycle record), so that it can say so to its operator; anyone
else gets ``unknown_signer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enrollment.signing import ReplayCache, verify_request
from populi_peer.clock import Clock
from populi_peer.errors import Unauthenticated, enrollment_boundary
from populi_peer.store import RequestNonce, Store

#: What a node knows of a retired signer: its old key (to check that it is really the
#: retired node asking) and the details it is told.
RetiredLookup = Callable[[str], "tuple[Ed25519PublicKey, dict[str, Any]] | None"]


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


@dataclass(kw_only=True, eq=False, repr=False)
class Authenticator:
    node_id: str
    clock: Clock
    skew_s: float
    lookup: Callable[[str], Principal | None]
    is_revoked: Callable[[str], bool]
    replay_max_entries: int = 1_000_000
    nonces: Store | None = None
    retired: RetiredLookup | None = None

    def __post_init__(self) -> None:
        self.replay_cache = ReplayCache(max_entries=self.replay_max_entries)

    def _resolve(self, keyid: str) -> Ed25519PublicKey | None:
        if self.is_revoked(keyid):
            return None
        principal = self.lookup(keyid)
        return None if principal is None else principal.public_key

    def authenticate(
        self, *, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Principal:
        principal, _ = self.verify(
            method=method, path=path, query=query, headers=headers, body=body
        )
        return principal

    def verify(
        self, *, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Principal, RequestNonce | None]:
        """The caller, and the binding that records the request's nonce with its first
        commit (``None`` without a store)."""
        retired: list[dict[str, Any]] = []

        def resolve(keyid: str) -> Ed25519PublicKey | None:
            key = self._resolve(keyid)
            if key is None and self.retired is not None:
                found = self.retired(keyid)
                if found is not None:
                    key, notice = found
                    retired.append(notice)
            return key

        now_s = self.clock.wall()
        with enrollment_boundary():
            params = verify_request(
                headers=headers,
                method=method,
                path=path,
                query=query,
                body=body,
                my_node_id=self.node_id,
                resolve_key=resolve,
                now_s=now_s,
                skew_s=self.skew_s,
                replay_cache=self.replay_cache,
            )
        if retired:
            raise Unauthenticated(
                f"node {params.keyid} was retired from this cluster; it takes no part any more "
                "(to re-join: see details.rejoin)",
                code="node_retired",
                **retired[0],
            )
        if self.nonces is not None and self.nonces.nonce_used(params.keyid, params.nonce):
            raise Unauthenticated(
                "request replayed: this nonce was already used", code="signature_replayed"
            )
        principal = self.lookup(params.keyid)
        if principal is None or self.is_revoked(params.keyid):  # pragma: no cover - raced
            raise Unauthenticated(f"signer {params.keyid} is not a member", code="unknown_signer")
        binding = (
            None
            if self.nonces is None
            else self.nonces.request_nonce(
                params.keyid, params.nonce, expires_s=params.created_s + self.skew_s, now_s=now_s
            )
        )
        return principal, binding


__all__ = ["Authenticator", "Principal", "RetiredLookup"]
