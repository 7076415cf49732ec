"""Join tokens for tests: fixed keys, clock and ids, so that every token is the same
bytes each run."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.tokens import JoinToken, mint_token

#: The cluster root that signs tokens (and revocation lists).
ROOT = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
#: Another cluster's root.
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z, in ms
HOUR = 3_600_000
#: The control plane a token names.
CP = "n-aaaaaaaaaaaaaaaa"
TOKEN_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
SEED = bytes(range(200, 232))


def mint(**overrides: Any) -> tuple[str, JoinToken]:
    """A worker token of cluster ``home`` for :data:`CP`, valid an hour from :data:`NOW`;
    ``overrides`` are :func:`mint_token`'s arguments."""
    args: dict[str, Any] = {
        "signing_key": ROOT,
        "cluster_id": "home",
        "contacts": ["10.0.0.1:7070"],
        "recipients": [CP],
        "roles": ["worker"],
        "now_ms": NOW,
        "ttl_ms": HOUR,
        "token_id": TOKEN_ID,
        "token_seed": SEED,
    }
    args.update(overrides)
    return mint_token(**args)
