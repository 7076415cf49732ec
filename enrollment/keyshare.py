"""The cluster key, sealed to one voter (ADR 0016; issue 14 replaces this with intermediate
issuing keys, so that no voter holds the root).

A voter that lacks the cluster key asks the leader for it with a fresh X25519 public key
in a signed request over TLS; the leader answers with the key sealed to that public key:
X25519 with its own fresh key, HKDF-SHA256 bound to the cluster, the two node ids and both
public keys, then ChaCha20-Poly1305. TLS already hides the answer on the wire; the seal
keeps the key out of anything that sees the answer's body (a log, a proxy that terminates
TLS) and binds it to the one request that asked. The receiver checks that what it opened
is the private half of the cluster CA's public key before it keeps it.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enrollment.errors import CertificateError

#: The HKDF info prefix: what the derived key is for, and its version.
KEYSHARE_DOMAIN = b"populi/cluster-key-share/v1\x00"
_NONCE_BYTES = 12


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, field: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"key share: {field} is not base64url", code="key_share_bad"
        ) from exc


@dataclass(frozen=True, slots=True)
class SealedKey:
    """The leader's answer: its fresh X25519 public key, the nonce, the ciphertext."""

    sender_public: str
    nonce: str
    sealed: str


def new_request_key() -> tuple[X25519PrivateKey, str]:
    """A fresh X25519 key for one request, and its public half as base64url."""
    key = X25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, _b64(raw)


def _aead_key(
    shared: bytes, *, cluster_id: str, sender: str, receiver: str, pubs: tuple[bytes, bytes]
) -> bytes:
    info = b"\x00".join(
        [KEYSHARE_DOMAIN, cluster_id.encode(), sender.encode(), receiver.encode(), *pubs]
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal_cluster_key(
    cluster_key: Ed25519PrivateKey,
    *,
    receiver_public: str,
    cluster_id: str,
    sender: str,
    receiver: str,
) -> SealedKey:
    """Seal ``cluster_key`` to the receiver's request key (``receiver_public``)."""
    raw_receiver = _unb64(receiver_public, "public key")
    if len(raw_receiver) != 32:
        raise CertificateError("key share: the public key must be 32 bytes", code="key_share_bad")
    peer = X25519PublicKey.from_public_bytes(raw_receiver)
    own = X25519PrivateKey.generate()
    raw_own = own.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _aead_key(
        own.exchange(peer),
        cluster_id=cluster_id,
        sender=sender,
        receiver=receiver,
        pubs=(raw_own, raw_receiver),
    )
    nonce = os.urandom(_NONCE_BYTES)
    secret = cluster_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    sealed = ChaCha20Poly1305(key).encrypt(nonce, secret, None)
    return SealedKey(_b64(raw_own), _b64(nonce), _b64(sealed))


def open_cluster_key(
    share: SealedKey,
    *,
    request_key: X25519PrivateKey,
    expected_public: Ed25519PublicKey,
    cluster_id: str,
    sender: str,
    receiver: str,
) -> Ed25519PrivateKey:
    """Open a share sealed to ``request_key``; the key must be the private half of
    ``expected_public`` (the cluster CA's key), else ``key_share_bad``."""
    raw_sender = _unb64(share.sender_public, "sender_public")
    nonce = _unb64(share.nonce, "nonce")
    if len(raw_sender) != 32 or len(nonce) != _NONCE_BYTES:
        raise CertificateError("key share: malformed sender key or nonce", code="key_share_bad")
    raw_own = request_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _aead_key(
        request_key.exchange(X25519PublicKey.from_public_bytes(raw_sender)),
        cluster_id=cluster_id,
        sender=sender,
        receiver=receiver,
        pubs=(raw_sender, raw_own),
    )
    try:
        secret = ChaCha20Poly1305(key).decrypt(nonce, _unb64(share.sealed, "sealed"), None)
    except InvalidTag as exc:
        raise CertificateError(
            "key share: does not open with this request's key", code="key_share_bad"
        ) from exc
    if len(secret) != 32:
        raise CertificateError("key share: not an Ed25519 key", code="key_share_bad")
    opened = Ed25519PrivateKey.from_private_bytes(secret)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if opened.public_key().public_bytes(*raw) != expected_public.public_bytes(*raw):
        raise CertificateError("key share: not the cluster's key", code="key_share_bad")
    return opened


__all__ = [
    "KEYSHARE_DOMAIN",
    "SealedKey",
    "new_request_key",
    "open_cluster_key",
    "seal_cluster_key",
]
