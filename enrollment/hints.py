"""Signed hint envelopes: one node's record about itself, spread peer to peer by gossip.

A hint is advisory (docs/design.md, safety rule 6: hints never authorize), but it must
still be the word of the node it describes, or any member could make another node look
idle, full or gone. Its wire form follows the cluster records'::

    populi-hint-1.<base64url-no-padding(signer_key[32] || signature[64] || payload)>

``payload`` is canonical JSON, and the Ed25519 signature covers
``b"populi/hint/v1\\x00" + payload``: the domain prefix keeps a hint from being read as a
record, token or revocation list signed by the same key, and the reverse. The payload::

    {"v": 1, "node": "<node id>", "version": [wall_ms, counter],
     "issued_ms": <UTC ms when signed>, "body": {...}}

``version`` is the node's hybrid logical clock when it signed (the receiver keeps the
highest per node); ``body`` is whatever the gossip layer puts there (canonical JSON:
integers, strings, lists, objects — no floats).

:func:`verify_hint` checks, in this order: size and prefix, the signature by the embedded
key (``hint_bad_signature``), the payload (``hint_malformed``), that the embedded key is
the key the claimed node id names (``hint_forged``: node ids are derived from keys, so a
hint about node A signed by node B's key is refused), and last that ``resolve_key`` knows
that node with that key (``hint_unknown_node``: not a member, revoked or retired).

Pure: no clock, no random; times come in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment._sealed import (
    _check_ident,
    _check_int,
    _check_ms,
    _EnvelopeError,
    _FieldProblem,
    _parse_canonical_object,
    _raw_public_key,
    _required,
    _seal,
    _unseal,
)
from enrollment.canonical import canonical_json, json_type
from enrollment.errors import EnrollmentError
from enrollment.keys import node_id_for, public_from_raw

HINT_VERSION: Final = 1
HINT_PREFIX: Final = "populi-hint-1."
HINT_DOMAIN: Final = b"populi/hint/v1\x00"
#: Refused before decoding. A node with 16 GPUs signs about 8 KiB.
MAX_HINT_CHARS: Final = 32 * 1024
_MAX_COUNTER: Final = 2**31 - 1


class HintError(EnrollmentError):
    """A signed hint is unusable; ``code`` says why (see the module docstring)."""

    code = "hint_invalid"


@dataclass(frozen=True, slots=True)
class SignedHint:
    """A verified hint: who it is about (and signed by), its version, and its body."""

    node_id: str
    version_wall_ms: int
    version_counter: int
    issued_ms: int
    body: dict[str, Any]
    text: str


def sign_hint(
    *,
    key: Ed25519PrivateKey,
    version_wall_ms: int,
    version_counter: int,
    issued_ms: int,
    body: dict[str, Any],
) -> str:
    """Sign a hint about the node that owns ``key`` (its id is derived from the key).

    Raises :class:`HintError` (``hint_unsignable``) for a body canonical JSON cannot carry
    (a float, a non-string key) or a result over :data:`MAX_HINT_CHARS`.
    """
    node_id = node_id_for(key.public_key())
    try:
        _check_ms("version.wall_ms", version_wall_ms)
        _check_int("version.counter", version_counter, 0, _MAX_COUNTER)
        _check_ms("issued_ms", issued_ms)
        if not isinstance(body, dict):
            raise _FieldProblem("body", f"must be an object, got {json_type(body)}")
        payload = canonical_json(
            {
                "v": HINT_VERSION,
                "node": node_id,
                "version": [version_wall_ms, version_counter],
                "issued_ms": issued_ms,
                "body": body,
            }
        )
    except _FieldProblem as exc:
        raise HintError(f"cannot sign hint: {exc}", code="hint_unsignable") from None
    except ValueError as exc:
        raise HintError(f"cannot sign hint: {exc}", code="hint_unsignable") from None
    text = _seal(HINT_PREFIX, HINT_DOMAIN, key, payload)
    if len(text) > MAX_HINT_CHARS:
        raise HintError(
            f"cannot sign hint: it would be {len(text)} chars, over the {MAX_HINT_CHARS} limit",
            code="hint_unsignable",
        )
    return text


def _malformed(problem: str) -> HintError:
    return HintError(f"hint is malformed: {problem}", code="hint_malformed")


def verify_hint(text: str, *, resolve_key: Callable[[str], Ed25519PublicKey | None]) -> SignedHint:
    """Check a signed hint and return it; raise :class:`HintError` (order: module doc).

    ``resolve_key`` maps a node id to the public key this node holds for it, or ``None``
    when the node is unknown, revoked or retired.
    """
    if not isinstance(text, str):
        raise _malformed("it must be text")
    if len(text) > MAX_HINT_CHARS:
        raise _malformed(f"it is {len(text)} chars, over the {MAX_HINT_CHARS} limit")
    if not text.startswith(HINT_PREFIX):
        raise _malformed(f"it does not start with {HINT_PREFIX!r}")
    try:
        key_raw, payload = _unseal(text[len(HINT_PREFIX) :], HINT_DOMAIN)
    except _EnvelopeError as exc:
        if exc.kind == "bad_signature":
            raise HintError(f"hint {exc.problem}", code="hint_bad_signature") from None
        raise _malformed(f"it {exc.problem}") from None
    try:
        obj = _parse_canonical_object(payload)
        version = _required(obj, "v")
        if isinstance(version, bool) or version != HINT_VERSION:
            raise _FieldProblem("v", f"must be {HINT_VERSION}, got {version!r}")
        node_id = _check_ident("node", _required(obj, "node"))
        stamp = _required(obj, "version")
        if not isinstance(stamp, list) or len(stamp) != 2:
            raise _FieldProblem("version", "must be [wall_ms, counter]")
        wall_ms = _check_ms("version[0]", stamp[0])
        counter = _check_int("version[1]", stamp[1], 0, _MAX_COUNTER)
        issued_ms = _check_ms("issued_ms", _required(obj, "issued_ms"))
        body = _required(obj, "body")
        if not isinstance(body, dict):
            raise _FieldProblem("body", f"must be an object, got {json_type(body)}")
    except _FieldProblem as exc:
        raise _malformed(str(exc)) from None
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    signer = public_from_raw(key_raw)
    if node_id_for(signer) != node_id:
        raise HintError(
            f"hint about node {node_id} is signed by another key ({node_id_for(signer)})",
            code="hint_forged",
        )
    known = resolve_key(node_id)
    if known is None or _raw_public_key(known) != key_raw:
        raise HintError(
            f"hint about node {node_id}: not a member of this cluster (unknown, revoked or "
            "retired)",
            code="hint_unknown_node",
        )
    return SignedHint(
        node_id=node_id,
        version_wall_ms=wall_ms,
        version_counter=counter,
        issued_ms=issued_ms,
        body=body,
        text=text,
    )


__all__ = [
    "HINT_DOMAIN",
    "HINT_PREFIX",
    "HINT_VERSION",
    "MAX_HINT_CHARS",
    "HintError",
    "SignedHint",
    "sign_hint",
    "verify_hint",
]
