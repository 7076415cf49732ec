"""Hint records signed and verified: the seam between the pure gossip core and the keys.

The core (:mod:`populi_peer.core.gossip`) takes a ``verify`` callable and never touches a
key; ``enrollment.hints`` signs and checks envelopes and knows nothing of hint bodies.
This module joins the two for the agent:

- :func:`sign_hint_record` — this node's own record, signed with its node key;
- :func:`hint_verifier` — the ``verify`` that :meth:`GossipState.merge` takes, bound to
  the membership's key lookup (``None`` for an unknown, revoked or retired node).
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment.hints import sign_hint, verify_hint
from populi_peer.core.gossip import Verify
from populi_peer.core.hints import HintBody, HintRecord
from populi_peer.core.hlc import Hlc
from populi_peer.errors import enrollment_boundary


def sign_hint_record(
    key: Ed25519PrivateKey, *, version: Hlc, issued_ms: int, body: HintBody
) -> HintRecord:
    """Sign ``body`` as this node's hint at ``version`` (persist ``version`` first)."""
    with enrollment_boundary():
        text = sign_hint(
            key=key,
            version_wall_ms=version.wall_ms,
            version_counter=version.counter,
            issued_ms=issued_ms,
            body=body.to_json(),
        )
    return hint_verifier(lambda _node: key.public_key())(text)


def hint_verifier(resolve_key: Callable[[str], Ed25519PublicKey | None]) -> Verify:
    """A ``verify`` for :meth:`GossipState.merge`: signature, signer and body, or an
    error with a ``hint_*`` code."""

    def verify(text: str) -> HintRecord:
        with enrollment_boundary():
            signed = verify_hint(text, resolve_key=resolve_key)
        return HintRecord.from_signed(
            node_id=signed.node_id,
            version_wall_ms=signed.version_wall_ms,
            version_counter=signed.version_counter,
            issued_ms=signed.issued_ms,
            body=signed.body,
            text=signed.text,
        )

    return verify


__all__ = ["hint_verifier", "sign_hint_record"]
