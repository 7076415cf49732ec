"""Ed25519 keys on disk and identifiers derived from them.

Private keys are written 0600 with ``O_EXCL`` (never over an existing file unless
``replace=True``, and then through a temporary file and rename), PEM PKCS#8 unencrypted:
the data directory is the secret, like an SSH host key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment.errors import CertificateError


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise CertificateError("an Ed25519 public key is 32 bytes", code="bad_public_key")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_to_text(key: Ed25519PublicKey) -> str:
    """Public key as unpadded base64url of its 32 raw bytes (for JSON)."""
    return base64.urlsafe_b64encode(raw_public(key)).rstrip(b"=").decode("ascii")


def public_from_text(text: str) -> Ed25519PublicKey:
    from enrollment.canonical import b64url_decode

    try:
        raw = b64url_decode(text)
    except ValueError as exc:
        raise CertificateError("public key is not base64url", code="bad_public_key") from exc
    return public_from_raw(raw)


def principal_id(prefix: str, key: Ed25519PublicKey) -> str:
    """Identifier bound to a public key: ``<prefix>-`` + 16 base32 characters of its sha256.

    Deriving the id from the key makes "a signature whose key does not match the claimed
    node" impossible to express: the id names the key.
    """
    digest = hashlib.sha256(raw_public(key)).digest()
    return f"{prefix}-" + base64.b32encode(digest).decode("ascii").lower()[:16]


def node_id_for(key: Ed25519PublicKey) -> str:
    return principal_id("n", key)


def operator_id_for(key: Ed25519PublicKey) -> str:
    return principal_id("op", key)


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        target = tmp
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        target = path
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)
    os.chmod(path, 0o600)


def write_private_key(path: Path, key: Ed25519PrivateKey, *, replace: bool = False) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, data, replace=replace)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(
            f"cannot read key file {path}: {exc.strerror}", code="key_unreadable"
        ) from exc
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertificateError(
            f"key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}",
            code="key_permissions",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise CertificateError(
            f"key file {path} is not a PEM private key", code="key_unreadable"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CertificateError(f"key file {path} is not an Ed25519 key", code="key_unreadable")
    return key


def write_public_file(path: Path, data: bytes) -> None:
    """Write a non-secret file (certificate) atomically, mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


__all__ = [
    "generate_key",
    "load_private_key",
    "node_id_for",
    "operator_id_for",
    "principal_id",
    "public_from_raw",
    "public_from_text",
    "public_to_text",
    "raw_public",
    "write_private_key",
    "write_public_file",
]
