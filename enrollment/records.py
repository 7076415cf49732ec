"""Signed cluster records (docs/design.md: "cluster records ... signed by the operator or the leader").

A record is a sealed envelope (``enrollment._sealed``) with prefix ``populi-record-1.``:
the signature covers a domain-separation prefix and the canonical JSON payload, and is
checked before the payload is parsed. The payload is
``{"v": 1, "kind", "serial", "body", "signer", "actor", "signed_ms"}``; the verifier decides
whether the signer may sign that kind (a voter, the cluster key...).

Pure: time comes in as ``now_ms``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment._sealed import _EnvelopeError, _parse_canonical_object, _seal, _unseal
from enrollment.canonical import canonical_json
from enrollment.errors import EnrollmentError
from enrollment.keys import public_from_raw

RECORD_PREFIX = "populi-record-1."
_DOMAIN = b"populi/record/v1\x00"
MAX_RECORD_CHARS = 256 * 1024


class RecordError(EnrollmentError):
    code = "record_invalid"


@dataclass(frozen=True, slots=True)
class SignedRecord:
    kind: str
    serial: int
    body: dict[str, Any]
    signer: str
    actor: str
    signed_ms: int
    signer_key: Ed25519PublicKey
    text: str


def sign_record(
    *,
    kind: str,
    serial: int,
    body: dict[str, Any],
    signer_id: str,
    signer_key: Ed25519PrivateKey,
    now_ms: int,
    actor: str,
) -> str:
    payload = canonical_json(
        {
            "v": 1,
            "kind": kind,
            "serial": serial,
            "body": _integral(body),
            "signer": signer_id,
            "actor": actor,
            "signed_ms": now_ms,
        }
    )
    return _seal(RECORD_PREFIX, _DOMAIN, signer_key, payload)


def _integral(body: dict[str, Any]) -> Any:
    # Canonical JSON refuses floats; settings carry seconds as numbers, so they are sent as
    # their exact decimal text inside the signed payload and turned back by ``verify_record``.
    return json.loads(json.dumps(body), parse_float=lambda text: {"$float": text})


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$float"} and isinstance(value["$float"], str):
            return float(value["$float"])
        return {key: _restore(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item) for item in value]
    return value


def verify_record(text: str, *, expected_kind: str | None = None) -> SignedRecord:
    """Check the signature with the embedded key, then parse. The caller checks the signer."""
    if not isinstance(text, str) or len(text) > MAX_RECORD_CHARS:
        raise RecordError("record is too long or not text", code="record_malformed")
    if not text.startswith(RECORD_PREFIX):
        raise RecordError(
            "not a Populi record (unknown prefix or version)", code="record_malformed"
        )
    try:
        key_raw, payload = _unseal(text[len(RECORD_PREFIX) :], _DOMAIN)
    except _EnvelopeError as exc:
        code = "record_bad_signature" if exc.kind == "bad_signature" else "record_malformed"
        raise RecordError(f"record {exc.problem}", code=code) from None
    key = public_from_raw(key_raw)
    try:
        data = _parse_canonical_object(payload)
        kind = data["kind"]
        serial = data["serial"]
        body = _restore(data["body"])
        signer = data["signer"]
        actor = data["actor"]
        signed_ms = data["signed_ms"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError("record payload is malformed", code="record_malformed") from exc
    if (
        data.get("v") != 1
        or not isinstance(kind, str)
        or not isinstance(serial, int)
        or not isinstance(body, dict)
    ):
        raise RecordError("record payload is malformed", code="record_malformed")
    if not isinstance(signer, str) or not isinstance(actor, str) or not isinstance(signed_ms, int):
        raise RecordError("record payload is malformed", code="record_malformed")
    if expected_kind is not None and kind != expected_kind:
        raise RecordError(
            f"expected a {expected_kind} record, got {kind}", code="record_wrong_kind"
        )
    return SignedRecord(
        kind=kind,
        serial=serial,
        body=body,
        signer=signer,
        actor=actor,
        signed_ms=signed_ms,
        signer_key=key,
        text=text,
    )


__all__ = ["RECORD_PREFIX", "RecordError", "SignedRecord", "sign_record", "verify_record"]
