"""Per-request signatures between peers (docs/design.md: "Identity ... and peer authentication").

The ASGI server does not show the app the client certificate, so a request proves who sent
it with an Ed25519 signature over what matters in it, in the spirit of RFC 9421 (HTTP
Message Signatures) with a fixed, small grammar:

    Populi-Signature-Input: v=1; keyid=<principal id>; recipient=<node id>;
                            created=<unix seconds>; nonce=<base64url>
    Populi-Signature: <base64url Ed25519 signature>
    Content-Digest: sha-256=:<base64 sha-256 of the body>:      (RFC 9530)

The signature base is domain-separated and covers method, path, raw query, body digest,
recipient node id (not the HTTP authority: NAT and overlays change it), signer id, created
time and nonce. The recipient checks, in this order: grammar, version, recipient, created
within the skew budget, digest, signer known, signature, then the nonce against a replay
cache (only after the signature, so that nobody can fill the cache with forged nonces).

This module is pure: time and nonces come in as arguments.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment.canonical import b64url_decode, b64url_encode
from enrollment.errors import SignatureError

SIGNATURE_VERSION = 1
HEADER_INPUT = "populi-signature-input"
HEADER_SIGNATURE = "populi-signature"
HEADER_DIGEST = "content-digest"
_DOMAIN = b"populi/request/v1\x00"
_MAX_HEADER_CHARS = 512
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,128}$")
_FIELDS = ("v", "keyid", "recipient", "created", "nonce")


@dataclass(frozen=True, slots=True)
class SignatureParams:
    """What a request's signature input says."""

    keyid: str
    recipient: str
    created_s: int
    nonce: str


def content_digest(body: bytes) -> str:
    """RFC 9530 ``Content-Digest`` value for ``body``."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return f"sha-256=:{digest}:"


def signature_base(
    *, method: str, path: str, query: str, digest: str, params: SignatureParams
) -> bytes:
    """The exact bytes that are signed. Every component is free of newlines."""
    parts = (
        method.upper(),
        path,
        query,
        digest,
        params.recipient,
        params.keyid,
        str(params.created_s),
        params.nonce,
    )
    for part in parts:
        if "\n" in part or "\r" in part:
            raise SignatureError(
                "request component contains a line break", code="signature_malformed"
            )
    return _DOMAIN + "\n".join(parts).encode("utf-8")


def format_input(params: SignatureParams) -> str:
    return (
        f"v={SIGNATURE_VERSION}; keyid={params.keyid}; recipient={params.recipient}; "
        f"created={params.created_s}; nonce={params.nonce}"
    )


def sign_request(
    *,
    key: Ed25519PrivateKey,
    keyid: str,
    recipient: str,
    method: str,
    path: str,
    query: str,
    body: bytes,
    created_s: int,
    nonce: bytes,
) -> dict[str, str]:
    """Headers that sign this request. ``nonce`` is 16 random bytes drawn by the caller."""
    params = SignatureParams(
        keyid=keyid, recipient=recipient, created_s=created_s, nonce=b64url_encode(nonce)
    )
    for name, value in (("keyid", keyid), ("recipient", recipient)):
        if not _TOKEN_RE.match(value):
            raise SignatureError(f"cannot sign: {name} {value!r} is not a valid identifier")
    digest = content_digest(body)
    base = signature_base(method=method, path=path, query=query, digest=digest, params=params)
    return {
        HEADER_INPUT: format_input(params),
        HEADER_SIGNATURE: b64url_encode(key.sign(base)),
        HEADER_DIGEST: digest,
    }


def parse_signature_input(value: str) -> SignatureParams:
    """Parse ``Populi-Signature-Input`` strictly; raise :class:`SignatureError` otherwise."""
    if len(value) > _MAX_HEADER_CHARS:
        raise SignatureError("signature input header is too long", code="signature_malformed")
    fields: dict[str, str] = {}
    for raw in value.split(";"):
        item = raw.strip()
        name, sep, val = item.partition("=")
        if not sep:
            raise SignatureError(
                "signature input is not of the form key=value; ...", code="signature_malformed"
            )
        name = name.strip()
        val = val.strip()
        if name not in _FIELDS:
            raise SignatureError(
                f"signature input has an unknown field {name[:32]!r}", code="signature_malformed"
            )
        if name in fields:
            raise SignatureError(
                f"signature input repeats field {name!r}", code="signature_malformed"
            )
        if not _TOKEN_RE.match(val):
            raise SignatureError(
                f"signature input field {name!r} has an invalid value", code="signature_malformed"
            )
        fields[name] = val
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise SignatureError(
            f"signature input lacks {', '.join(missing)}", code="signature_malformed"
        )
    if fields["v"] != str(SIGNATURE_VERSION):
        raise SignatureError(
            f"signature version {fields['v']!r} is not supported "
            f"(this node speaks {SIGNATURE_VERSION})",
            code="signature_unsupported_version",
        )
    if not fields["created"].isdigit() or len(fields["created"]) > 12:
        raise SignatureError(
            "signature 'created' is not a unix time in seconds", code="signature_malformed"
        )
    try:
        nonce = b64url_decode(fields["nonce"])
    except ValueError as exc:
        raise SignatureError(
            "signature nonce is not base64url", code="signature_malformed"
        ) from exc
    if not 12 <= len(nonce) <= 64:
        raise SignatureError("signature nonce must be 12 to 64 bytes", code="signature_malformed")
    return SignatureParams(
        keyid=fields["keyid"],
        recipient=fields["recipient"],
        created_s=int(fields["created"]),
        nonce=fields["nonce"],
    )


def _decode_signature(value: str) -> bytes:
    try:
        sig = b64url_decode(value.strip())
    except ValueError as exc:
        raise SignatureError("signature is not base64url", code="signature_malformed") from exc
    if len(sig) != 64:
        raise SignatureError("signature must be 64 bytes", code="signature_malformed")
    return sig


def describe_skew(delta_s: float) -> str:
    direction = "ahead of" if delta_s > 0 else "behind"
    return f"{abs(delta_s):.0f} s {direction}"


class ReplayCache:
    """Nonces seen within the skew window, bounded, pure (``now_s`` is an argument).

    A nonce must be remembered until its request could no longer pass the ``created``
    check, i.e. until ``created + skew``. When the cache is full of unexpired nonces it
    fails closed: the request is refused, never accepted unchecked.
    """

    def __init__(self, *, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def _purge(self, now_s: float) -> None:
        while self._expiry and self._expiry[0][0] < now_s:
            expires, keyid, nonce = heapq.heappop(self._expiry)
            if self._seen.get((keyid, nonce)) == expires:
                del self._seen[(keyid, nonce)]

    def check_and_add(self, keyid: str, nonce: str, *, expires_s: float, now_s: float) -> None:
        self._purge(now_s)
        key = (keyid, nonce)
        if key in self._seen:
            raise SignatureError(
                "request replayed: this nonce was already used", code="signature_replayed"
            )
        if len(self._seen) >= self.max_entries:
            raise SignatureError("replay cache is full; retry shortly", code="replay_cache_full")
        self._seen[key] = expires_s
        heapq.heappush(self._expiry, (expires_s, keyid, nonce))


def verify_request(
    *,
    headers: Mapping[str, str],
    method: str,
    path: str,
    query: str,
    body: bytes,
    my_node_id: str,
    resolve_key: Callable[[str], Ed25519PublicKey | None],
    now_s: float,
    skew_s: float,
    replay_cache: ReplayCache,
) -> SignatureParams:
    """Check a request's signature; return its parameters (``keyid`` is the identity).

    ``headers`` must have lower-case names. ``resolve_key`` maps a signer id to its public
    key, or ``None`` when the signer is unknown, revoked or retired.
    """
    raw_input = headers.get(HEADER_INPUT)
    raw_sig = headers.get(HEADER_SIGNATURE)
    if raw_input is None or raw_sig is None:
        raise SignatureError("request is not signed", code="signature_missing")
    params = parse_signature_input(raw_input)
    signature = _decode_signature(raw_sig)
    if params.recipient != my_node_id:
        raise SignatureError(
            f"request was signed for node {params.recipient}, not this node ({my_node_id})",
            code="signature_wrong_recipient",
        )
    delta = params.created_s - now_s
    if abs(delta) > skew_s:
        raise SignatureError(
            f"clock skew: request time is {describe_skew(delta)} this node's clock "
            f"(budget ±{skew_s:.0f} s); fix the clock of the sending machine",
            code="clock_skew",
        )
    digest = headers.get(HEADER_DIGEST)
    if digest is None:
        raise SignatureError("request lacks Content-Digest", code="signature_malformed")
    if digest != content_digest(body):
        raise SignatureError(
            "body does not match its Content-Digest", code="signature_digest_mismatch"
        )
    public_key = resolve_key(params.keyid)
    if public_key is None:
        raise SignatureError(
            f"signer {params.keyid} is not a member of this cluster", code="unknown_signer"
        )
    base = signature_base(method=method, path=path, query=query, digest=digest, params=params)
    try:
        public_key.verify(signature, base)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature does not verify for signer {params.keyid}", code="signature_invalid"
        ) from exc
    replay_cache.check_and_add(
        params.keyid, params.nonce, expires_s=params.created_s + skew_s, now_s=now_s
    )
    return params


__all__ = [
    "HEADER_DIGEST",
    "HEADER_INPUT",
    "HEADER_SIGNATURE",
    "SIGNATURE_VERSION",
    "ReplayCache",
    "SignatureParams",
    "content_digest",
    "describe_skew",
    "format_input",
    "parse_signature_input",
    "sign_request",
    "signature_base",
    "verify_request",
]
