"""Join tokens for tests: fixed keys, clock and ids, so that every token is the same
bytes each run."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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


# -- the sealed wire form, written out from the specification (not by the module) ---------


def raw(key: Ed25519PrivateKey) -> bytes:
    """``key``'s public key, the 32 raw bytes."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_envelope(payload: bytes, key: Ed25519PrivateKey, *, prefix: str, domain: bytes) -> str:
    """``prefix`` + base64url(signer key || signature over ``domain`` + payload || payload)."""
    return prefix + b64(raw(key) + key.sign(domain + payload) + payload)


def open_envelope(envelope: str, key: Ed25519PrivateKey, *, domain: bytes) -> bytes:
    """The payload of the base64url part of a sealed envelope, read by hand: its signer
    key must be ``key``'s, and its signature must hold over ``domain`` + payload."""
    blob = unb64(envelope)
    signer, signature, payload = blob[:32], blob[32:96], blob[96:]
    assert signer == raw(key)
    key.public_key().verify(signature, domain + payload)
    return payload
