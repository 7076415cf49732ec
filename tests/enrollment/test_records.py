from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.canonical import b64url_decode, b64url_encode
from enrollment.keys import generate_key
from enrollment.records import RECORD_PREFIX, RecordError, sign_record, verify_record

KEY = generate_key()


def _record(**body: object) -> str:
    return sign_record(
        kind="settings",
        serial=3,
        body=dict(body) or {"max_lease_ttl_s": 30.5, "gates": ["a"]},
        signer_id="n-a",
        signer_key=KEY,
        now_ms=5,
        actor="op-b",
    )


def test_round_trip_keeps_floats_exact() -> None:
    record = verify_record(_record(), expected_kind="settings")
    assert record.body == {"max_lease_ttl_s": 30.5, "gates": ["a"]}
    assert (record.serial, record.signer, record.actor, record.signed_ms) == (3, "n-a", "op-b", 5)
    assert record.signer_key == KEY.public_key()


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(RecordError) as info:
        verify_record(_record(), expected_kind="voters")
    assert info.value.code == "record_wrong_kind"


def test_tampered_payload_is_refused() -> None:
    text = _record()
    raw = bytearray(b64url_decode(text[len(RECORD_PREFIX) :]))
    raw[-3] ^= 1
    with pytest.raises(RecordError) as info:
        verify_record(RECORD_PREFIX + b64url_encode(bytes(raw)))
    assert info.value.code == "record_bad_signature"


@given(st.text(max_size=300))
def test_garbage_is_one_documented_error(text: str) -> None:
    with pytest.raises(RecordError):
        verify_record(text)
