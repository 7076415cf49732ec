"""Sealed envelopes and field checks shared by tokens, revocation lists and records.

An envelope is ``prefix`` + base64url-no-padding(signer key (32) || Ed25519 signature (64)
|| payload), the signature over a per-kind domain-separation prefix + payload; the payload
is canonical JSON and is parsed only after the signature holds. Pure: no clock, no random.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment.canonical import b64url_decode, b64url_encode, canonical_json, json_type

_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_MAX_MS = 2**53 - 1
_IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)


class _FieldProblem(Exception):
    """Internal: one invalid field; always translated before it leaves this module."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _EnvelopeError(Exception):
    """Internal: a sealed envelope did not open; ``kind`` picks the caller's error code."""

    def __init__(self, kind: Literal["malformed", "bad_signature"], problem: str) -> None:
        super().__init__(problem)
        self.kind: Literal["malformed", "bad_signature"] = kind
        self.problem = problem


def _show(value: object) -> str:
    """A short, one-line, ASCII rendering of a value for an error message."""
    text = ascii(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _check_int(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldProblem(field, f"must be an integer, got {json_type(value)}")
    if not low <= value <= high:
        raise _FieldProblem(field, f"must be between {low} and {high}, got {value}")
    return value


def _check_ident(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise _FieldProblem(field, f"must be a string, got {json_type(value)}")
    if not _IDENT_RE.fullmatch(value):
        raise _FieldProblem(
            field,
            f"{_show(value)} must be 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
        )
    return value


def _check_ms(field: str, value: object) -> int:
    return _check_int(field, value, 0, _MAX_MS)


def _required(obj: dict[str, Any], field: str) -> Any:
    if field not in obj:
        raise _FieldProblem(field, "is missing")
    return obj[field]


def _list_field(obj: dict[str, Any], field: str) -> tuple[Any, ...]:
    value = _required(obj, field)
    if not isinstance(value, list):
        raise _FieldProblem(field, f"must be a list, got {json_type(value)}")
    return tuple(value)


def _raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _utc_iso_ms(ms: int) -> str:
    """UTC ISO 8601 time of ``ms`` since the epoch, without a clock or ``datetime``.

    Days to civil date after H. Hinnant, "chrono-Compatible Low-Level Date Algorithms"
    (``civil_from_days``), which holds for the whole proleptic Gregorian calendar.
    """
    days, ms_of_day = divmod(ms, 86_400_000)
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    seconds, millis = divmod(ms_of_day, 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    fraction = f".{millis:03d}" if millis else ""
    return f"{year:04d}-{month:02d}-{day:02d}T{hours:02d}:{minutes:02d}:{secs:02d}{fraction}Z"


def _human_ms(ms: int) -> str:
    """``90_000_000`` -> ``"25h"``; ``5_400_500`` -> ``"1h30m0.500s"``."""
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if millis:
        parts.append(f"{seconds}.{millis:03d}s")
    elif seconds:
        parts.append(f"{seconds}s")
    return "".join(parts) or "0s"


def _seal(prefix: str, domain: bytes, signing_key: Ed25519PrivateKey, payload: bytes) -> str:
    """``prefix`` + b64url(public key || Ed25519 signature over ``domain + payload`` ||
    payload)."""
    signature = signing_key.sign(domain + payload)
    blob = _raw_public_key(signing_key.public_key()) + signature + payload
    return prefix + b64url_encode(blob)


def _unseal(body: str, domain: bytes) -> tuple[bytes, bytes]:
    """Open what :func:`_seal` made: ``(raw signer key, payload)``, signature checked.

    The payload is returned as bytes and not looked at: parsing comes after this.
    """
    try:
        blob = b64url_decode(body)
    except ValueError as exc:
        # The messages of b64url_decode name the defect, never the input.
        raise _EnvelopeError("malformed", f"is not valid base64url ({exc})") from None
    if len(blob) < _KEY_BYTES + _SIGNATURE_BYTES + 2:  # the shortest payload is "{}"
        raise _EnvelopeError("malformed", "is truncated")
    key_raw = blob[:_KEY_BYTES]
    signature = blob[_KEY_BYTES : _KEY_BYTES + _SIGNATURE_BYTES]
    payload = blob[_KEY_BYTES + _SIGNATURE_BYTES :]
    try:
        Ed25519PublicKey.from_public_bytes(key_raw).verify(signature, domain + payload)
    except (ValueError, InvalidSignature):
        raise _EnvelopeError(
            "bad_signature", "has a signature that does not verify (altered or damaged)"
        ) from None
    return key_raw, payload


def _parse_canonical_object(payload: bytes) -> dict[str, Any]:
    """The signed payload as a dict; only canonical JSON objects are accepted.

    Requiring the exact canonical bytes rules out duplicate keys, floats and other
    encodings that two parsers could read differently.
    """
    try:
        value = json.loads(payload.decode("utf-8"))
        canonical = canonical_json(value)
    except (ValueError, RecursionError):
        raise ValueError("payload is not valid JSON without floats") from None
    if canonical != payload:
        raise ValueError("payload is not canonical JSON")
    if not isinstance(value, dict):
        raise ValueError(f"payload must be a JSON object, got {json_type(value)}")
    return value
