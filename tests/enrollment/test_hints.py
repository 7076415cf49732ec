from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from enrollment._sealed import _seal
from enrollment.canonical import b64url_decode, b64url_encode, canonical_json
from enrollment.hints import (
    HINT_DOMAIN,
    HINT_PREFIX,
    MAX_HINT_CHARS,
    HintError,
    sign_hint,
    verify_hint,
)
from enrollment.keys import generate_key, node_id_for
from enrollment.records import RECORD_PREFIX, RecordError, sign_record, verify_record

KEY_A = generate_key()
KEY_B = generate_key()
A = node_id_for(KEY_A.public_key())
B = node_id_for(KEY_B.public_key())
MEMBERS = {A: KEY_A.public_key(), B: KEY_B.public_key()}


def members(node_id: str) -> Ed25519PublicKey | None:
    return MEMBERS.get(node_id)


def _hint(key=KEY_A, **body: object) -> str:  # type: ignore[no-untyped-def]
    return sign_hint(
        key=key,
        version_wall_ms=1_700_000_000_000,
        version_counter=2,
        issued_ms=1_700_000_000_001,
        body=dict(body) or {"lifecycle": "active"},
    )


def _code(text: str, resolve: Callable[[str], Ed25519PublicKey | None] = members) -> str:
    with pytest.raises(HintError) as info:
        verify_hint(text, resolve_key=resolve)
    return info.value.code


def test_round_trip() -> None:
    signed = verify_hint(_hint(), resolve_key=members)
    assert signed.node_id == A
    assert (signed.version_wall_ms, signed.version_counter, signed.issued_ms) == (
        1_700_000_000_000,
        2,
        1_700_000_000_001,
    )
    assert signed.body == {"lifecycle": "active"}


def test_a_hint_signed_by_another_node_is_forged() -> None:
    """Node B signs a hint that claims to be about node A: refused, whatever it says."""
    payload = canonical_json(
        {"v": 1, "node": A, "version": [9, 0], "issued_ms": 9, "body": {"lifecycle": "left"}}
    )
    forged = _seal(HINT_PREFIX, HINT_DOMAIN, KEY_B, payload)
    assert _code(forged) == "hint_forged"


def test_a_non_member_or_a_retired_member_is_refused() -> None:
    outsider = generate_key()
    assert _code(_hint(outsider)) == "hint_unknown_node"
    # A retired node's key no longer resolves: its hints are refused by identity.
    assert _code(_hint(KEY_A), resolve=lambda n: None) == "hint_unknown_node"
    # A member whose id the membership binds to another key (never expected): refused.
    assert _code(_hint(KEY_A), resolve=lambda n: KEY_B.public_key()) == "hint_unknown_node"


def test_tampering_breaks_the_signature() -> None:
    text = _hint()
    raw = bytearray(b64url_decode(text[len(HINT_PREFIX) :]))
    raw[-3] ^= 1
    assert _code(HINT_PREFIX + b64url_encode(bytes(raw))) == "hint_bad_signature"


def test_domain_separation_from_records() -> None:
    """The same key signs records and hints; neither reads as the other."""
    record = sign_record(
        kind="settings", serial=1, body={}, signer_id=A, signer_key=KEY_A, now_ms=1, actor=A
    )
    assert _code(record) == "hint_malformed"  # wrong prefix
    assert _code(HINT_PREFIX + record[len(RECORD_PREFIX) :]) == "hint_bad_signature"
    hint = _hint()
    with pytest.raises(RecordError) as info:
        verify_record(RECORD_PREFIX + hint[len(HINT_PREFIX) :])
    assert info.value.code == "record_bad_signature"


def test_unsignable_bodies_are_refused_with_a_code() -> None:
    with pytest.raises(HintError) as info:
        _hint(load=0.5)
    assert info.value.code == "hint_unsignable"
    with pytest.raises(HintError) as info:
        _hint(blob="x" * MAX_HINT_CHARS)
    assert info.value.code == "hint_unsignable"


def test_oversized_text_is_refused_before_decoding() -> None:
    assert _code(HINT_PREFIX + "A" * MAX_HINT_CHARS) == "hint_malformed"


def test_payload_fields_are_checked() -> None:
    for payload in (
        {"v": 2, "node": A, "version": [1, 0], "issued_ms": 1, "body": {}},
        {"v": 1, "node": A, "version": [1], "issued_ms": 1, "body": {}},
        {"v": 1, "node": A, "version": [1, -1], "issued_ms": 1, "body": {}},
        {"v": 1, "node": A, "version": [1, 0], "body": {}},
        {"v": 1, "node": A, "version": [1, 0], "issued_ms": 1, "body": []},
    ):
        text = _seal(HINT_PREFIX, HINT_DOMAIN, KEY_A, canonical_json(payload))
        assert _code(text) == "hint_malformed", payload


@given(st.text(max_size=300))
def test_garbage_is_one_documented_error(text: str) -> None:
    with pytest.raises(HintError):
        verify_hint(text, resolve_key=members)


@given(st.binary(max_size=200))
def test_garbage_after_the_prefix_is_one_documented_error(blob: bytes) -> None:
    with pytest.raises(HintError):
        verify_hint(HINT_PREFIX + b64url_encode(blob), resolve_key=members)
