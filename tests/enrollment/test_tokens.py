"""Join tokens: minting, the wire form, every way decode_token refuses a token, the joiner's
and the control plane's views of it, and the join proofs."""

from __future__ import annotations

import ast
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enrollment.tokens
from enrollment.canonical import canonical_json
from enrollment.errors import ErrorKind, NodeNameError, TokenError
from enrollment.tokens import (
    MAX_RECIPIENTS,
    MAX_TOKEN_CHARS,
    REDEEM_GRACE_MS,
    JoinClaim,
    JoinProofError,
    JoinProofs,
    JoinToken,
    TokenFieldError,
    _utc_iso_ms,
    ca_pin,
    check_redeem_time,
    check_token_time,
    decode_token,
    open_token,
    prove_join,
    redeem_token,
    token_digest,
    token_envelope,
    validate_node_name,
    verify_join,
)
from support.fuzz import B64URL, json_values, mutations_of
from support.tokens import (
    CP,
    HOUR,
    NOW,
    OTHER,
    ROOT,
    SEED,
    TOKEN_ID,
    b64,
    mint,
    open_envelope,
    raw,
    seal_envelope,
    unb64,
)

TOKEN_KEY = Ed25519PrivateKey.from_private_bytes(SEED)
VOTER = "n-bbbbbbbbbbbbbbbb"
PREFIX = "populi-join-2."
DOMAIN = b"populi/join-token/v2\x00"
DELETE = object()


def pin_of(key: Ed25519PrivateKey) -> str:
    return "sha256:" + hashlib.sha256(raw(key)).hexdigest()


def fields(key: Ed25519PrivateKey = ROOT, /, **overrides: Any) -> dict[str, Any]:
    """A valid payload, made by hand (not by the module), with fields replaced."""
    body: dict[str, Any] = {
        "v": 2,
        "token_id": TOKEN_ID.hex(),
        "cluster_id": "home",
        "ca_pin": pin_of(key),
        "contacts": ["10.0.0.1:7070"],
        "recipients": [CP],
        "not_before_ms": NOW,
        "expires_ms": NOW + HOUR,
        "uses": 1,
        "roles": ["worker"],
        "token_key": b64(raw(TOKEN_KEY)),
    }
    for name, value in overrides.items():
        if value is DELETE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def seal(
    payload: bytes,
    key: Ed25519PrivateKey = ROOT,
    *,
    prefix: str = PREFIX,
    domain: bytes = DOMAIN,
) -> str:
    """The wire form written out from the specification, independent of the module."""
    return seal_envelope(payload, key, prefix=prefix, domain=domain)


def signed(key: Ed25519PrivateKey = ROOT, /, **overrides: Any) -> str:
    """A hand-sealed envelope (no secret part) with fields replaced."""
    body = fields(key, **overrides)
    return seal(json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), key)


def whole(envelope: str, seed: bytes = SEED) -> str:
    """An envelope with its secret part: the text the operator hands out."""
    return envelope + "." + b64(seed)


def body_of(text: str) -> str:
    """The base64url of a token's envelope (between the prefix and the secret)."""
    return text[len(PREFIX) :].split(".", maxsplit=1)[0]


def decode(text: str, **kwargs: Any) -> JoinToken:
    kwargs.setdefault("now_ms", NOW)
    kwargs.setdefault("skew_ms", 0)
    return decode_token(text, **kwargs)


def assert_one_clean_line(error: Exception, text: str) -> None:
    message = str(error)
    assert message
    assert "\n" not in message and "\r" not in message
    secret = text.strip()
    if len(secret) >= 24:
        # What an answer carries: the message, the code and the details.
        shown = (
            {"code": error.code, "details": error.details} if isinstance(error, TokenError) else {}
        )
        rendered = message + json.dumps(shown)
        # No 16-char window of the token (past its public prefix) appears anywhere.
        for start in range(len(PREFIX), len(secret) - 16, 4):
            assert secret[start : start + 16] not in rendered


def refused(text: str, code: str, **kwargs: Any) -> TokenError:
    with pytest.raises(TokenError) as info:
        decode(text, **kwargs)
    assert info.value.code == code, str(info.value)
    assert_one_clean_line(info.value, text)
    return info.value


def mint_refused(field: str, code: str = "token_bad_field", **overrides: Any) -> TokenFieldError:
    with pytest.raises(TokenFieldError) as info:
        mint(**overrides)
    error = info.value
    assert error.code == code
    assert error.field == field
    assert isinstance(error, TokenError) and error.kind is ErrorKind.BAD_INPUT
    assert "\n" not in str(error)
    return error


# --- minting and the wire form ---------------------------------------------------------


def test_mint_then_decode_round_trips() -> None:
    text, token = mint(
        contacts=["10.0.0.1:7070", "[fd00::1]:7070", "gpu-1.lan:7070"],
        roles=["worker", "submit"],
        uses=3,
        name="gpu-1",
    )
    assert decode(text) == token
    assert token.token_id == TOKEN_ID.hex()
    assert token.cluster_id == "home"
    assert token.ca_pin == pin_of(ROOT)
    assert token.contacts == ("10.0.0.1:7070", "[fd00::1]:7070", "gpu-1.lan:7070")
    assert token.roles == ("submit", "worker")
    assert token.uses == 3
    assert token.name == "gpu-1"
    assert token.signer_public_key == raw(ROOT)


def test_not_before_is_the_minting_time_and_expiry_is_now_plus_ttl() -> None:
    _, token = mint(ttl_ms=5 * HOUR)
    assert token.not_before_ms == NOW
    assert token.expires_ms == NOW + 5 * HOUR


def test_wire_form_is_prefix_envelope_and_secret() -> None:
    text, token = mint(name="gpu-1")
    assert text.startswith(PREFIX)
    assert text.isascii() and "=" not in text
    envelope, secret = text[len(PREFIX) :].split(".")
    assert unb64(secret) == SEED  # outside the signature: the secret, never sent
    assert token_envelope(text) == PREFIX + envelope
    payload = open_envelope(envelope, ROOT, domain=DOMAIN)
    assert payload == canonical_json(token.to_json())
    body = json.loads(payload)
    assert body["v"] == 2
    assert set(body) == {
        "v",
        "token_id",
        "cluster_id",
        "ca_pin",
        "contacts",
        "recipients",
        "not_before_ms",
        "expires_ms",
        "uses",
        "roles",
        "name",
        "token_key",
    }
    assert body["recipients"] == [CP]
    assert unb64(body["token_key"]) == raw(TOKEN_KEY)
    assert b64(SEED) not in payload.decode()
    assert not {"alg", "algorithm", "typ"} & set(body)


def test_a_hand_sealed_token_decodes_like_a_minted_one() -> None:
    text, token = mint()
    assert decode(signed()) == token
    assert decode(whole(signed())) == token
    assert whole(signed()) == text  # Ed25519 is deterministic: the same bytes exactly


def test_name_is_left_out_of_the_payload_when_not_bound() -> None:
    text, token = mint()
    assert token.name is None
    assert "name" not in token.to_json()
    assert decode(text).name is None
    assert decode(signed(name=None)).name is None


def test_ca_pin_is_sha256_of_the_raw_root_key() -> None:
    assert ca_pin(ROOT.public_key()) == pin_of(ROOT)
    assert ca_pin(ROOT.public_key()).startswith("sha256:")
    assert len(ca_pin(ROOT.public_key())) == len("sha256:") + 64


def test_token_digest_is_sha256_of_the_envelope() -> None:
    text, _ = mint()
    envelope = token_envelope(text)
    assert token_digest(text) == hashlib.sha256(envelope.encode()).hexdigest()
    assert token_digest(envelope) == token_digest(text)
    assert token_digest(f"  {text}\n") == token_digest(text)
    assert hashlib.sha256(text.encode()).hexdigest() != token_digest(text)


def test_summary_and_to_json_hold_no_secret() -> None:
    text, token = mint(name="gpu-1")
    blob = text[len(PREFIX) :]
    secret = text.rsplit(".", 1)[1]
    summary = token.summary()
    assert summary["expires"] == "2023-11-14T23:13:20Z"
    assert summary["not_before"] == "2023-11-14T22:13:20Z"
    assert summary["token_id"] == TOKEN_ID.hex()
    for rendered in (json.dumps(summary), json.dumps(token.to_json()), repr(token)):
        assert blob[:16] not in rendered
        assert secret not in rendered
    assert summary["recipients"] == [CP]
    held = open_token(text, now_ms=NOW, skew_ms=0)
    assert secret not in repr(held) and held.envelope == token_envelope(text)


def test_join_token_is_frozen_and_checks_itself() -> None:
    _, token = mint()
    with pytest.raises(AttributeError):
        token.uses = 5  # type: ignore[misc]
    with pytest.raises(TokenFieldError) as info:
        JoinToken(**{**_token_kwargs(token), "ca_pin": pin_of(OTHER)})
    assert info.value.field == "ca_pin"
    with pytest.raises(TokenFieldError) as info:
        JoinToken(**{**_token_kwargs(token), "roles": ["worker"]})
    assert "tuple" in str(info.value)


def _token_kwargs(token: JoinToken) -> dict[str, Any]:
    return {name: getattr(token, name) for name in JoinToken.__dataclass_fields__}


# --- refusals at mint ------------------------------------------------------------------


def test_ttl_over_24h_is_refused_with_a_plain_message() -> None:
    error = mint_refused("ttl_ms", "token_ttl_too_long", ttl_ms=25 * HOUR)
    assert str(error) == "token TTL 25h exceeds the 24h maximum"
    mint_refused("ttl_ms", "token_ttl_too_long", ttl_ms=24 * HOUR + 1)


def test_ttl_of_exactly_24h_is_allowed() -> None:
    text, token = mint(ttl_ms=24 * HOUR)
    assert token.expires_ms - token.not_before_ms == 24 * HOUR
    assert decode(text) == token


@pytest.mark.parametrize("ttl_ms", [0, -1, True])
def test_ttl_must_be_positive(ttl_ms: int) -> None:
    mint_refused("ttl_ms", ttl_ms=ttl_ms)


INVALID_AT_MINT: list[tuple[str, dict[str, Any], str]] = [
    ("roles", {"roles": []}, "at least one"),
    ("roles", {"roles": ["admin"]}, "not a role"),
    ("roles", {"roles": ["worker", "worker"]}, "twice"),
    ("roles", {"roles": "worker"}, "not one string"),
    ("roles", {"roles": [7]}, "strings"),
    ("name", {"name": "Gpu-1"}, "lowercase"),
    ("name", {"name": "-gpu"}, "node name"),
    ("name", {"name": "gpu-"}, "node name"),
    ("name", {"name": "gpu_1"}, "node name"),
    ("name", {"name": ""}, "node name"),
    ("name", {"name": "a" * 64}, "node name"),
    ("contacts", {"contacts": []}, "1 to 8"),
    ("contacts", {"contacts": [f"10.0.0.{i}:1" for i in range(9)]}, "1 to 8"),
    ("contacts", {"contacts": "10.0.0.1:7070"}, "not one string"),
    ("contacts[0]", {"contacts": ["gpu-1"]}, "port"),
    ("contacts[0]", {"contacts": ["gpu-1:0"]}, "port"),
    ("contacts[0]", {"contacts": ["gpu-1:65536"]}, "port"),
    ("contacts[0]", {"contacts": ["gpu-1:080"]}, "port"),
    ("contacts[0]", {"contacts": ["gpu-1:+80"]}, "port"),
    ("contacts[0]", {"contacts": ["::1:7070"]}, "brackets"),
    ("contacts[0]", {"contacts": ["[::1]"]}, "[IPv6]:port"),
    ("contacts[0]", {"contacts": ["[10.0.0.1]:7070"]}, "IPv6"),
    ("contacts[0]", {"contacts": ["[fe80::1%eth0]:7070"]}, "zone"),
    ("contacts[0]", {"contacts": ["999.1.1.1:7070"]}, "hostname"),
    ("contacts[0]", {"contacts": ["10.0.0.01:7070"]}, "hostname"),
    ("contacts[0]", {"contacts": ["gpu 1:7070"]}, "hostname"),
    ("contacts[0]", {"contacts": ["-gpu:7070"]}, "hostname"),
    ("contacts[0]", {"contacts": ["gpu..lan:7070"]}, "hostname"),
    ("contacts[0]", {"contacts": ["bücher.lan:7070"]}, "ASCII"),
    ("contacts[0]", {"contacts": [":7070"]}, "hostname"),
    ("contacts[1]", {"contacts": ["gpu:1", "gpu:1"]}, "twice"),
    ("recipients", {"recipients": []}, "1 to 9"),
    ("recipients", {"recipients": [CP] * 10}, "1 to 9"),
    ("recipients", {"recipients": CP}, "not one string"),
    ("recipients[0]", {"recipients": ["n-short"]}, "not a node id"),
    ("recipients[0]", {"recipients": ["N-AAAAAAAAAAAAAAAA"]}, "not a node id"),
    ("recipients[0]", {"recipients": ["op-aaaaaaaaaaaaaaaa"]}, "not a node id"),
    ("recipients[0]", {"recipients": [7]}, "not a node id"),
    ("recipients[1]", {"recipients": [CP, CP]}, "twice"),
    ("token_seed", {"token_seed": bytes(31)}, "32 random bytes"),
    ("token_seed", {"token_seed": "00" * 32}, "32 random bytes"),
    ("uses", {"uses": 0}, "between 1 and 1000"),
    ("uses", {"uses": 1001}, "between 1 and 1000"),
    ("uses", {"uses": True}, "integer"),
    ("token_id", {"token_id": bytes(15)}, "16 random bytes"),
    ("token_id", {"token_id": "00" * 16}, "16 random bytes"),
    ("cluster_id", {"cluster_id": ""}, "1-128"),
    ("cluster_id", {"cluster_id": "my cluster"}, "1-128"),
    ("cluster_id", {"cluster_id": 7}, "string"),
    ("now_ms", {"now_ms": -1}, "between"),
]


@pytest.mark.parametrize(("field", "overrides", "hint"), INVALID_AT_MINT)
def test_invalid_fields_are_refused_at_mint(
    field: str, overrides: dict[str, Any], hint: str
) -> None:
    error = mint_refused(field, **overrides)
    assert hint in str(error)
    assert str(error).startswith(f"join token field {field}: ")


@pytest.mark.parametrize(
    "contact",
    [
        "10.0.0.1:7070",
        "[fd00::1]:7070",
        "[::ffff:10.0.0.1]:1",
        "gpu-1:65535",
        "gpu-1.lan:443",
        "xn--bcher-kva.example:443",
        "GPU.Example.COM:7070",
        "1x.lan:7070",
    ],
)
def test_valid_contacts_are_accepted(contact: str) -> None:
    text, _ = mint(contacts=[contact])
    assert decode(text).contacts == (contact,)


def test_the_largest_token_fits_the_length_limit() -> None:
    def host(first: str) -> str:
        return ".".join([first + "a" * 62, "b" * 63, "c" * 63, "d" * 61])

    contacts = [f"{host(first)}:65535" for first in "abcdefgh"]
    assert all(len(c.rpartition(":")[0]) == 253 for c in contacts)
    recipients = [f"n-{letter * 16}" for letter in "abcdefghi"]
    assert len(recipients) == MAX_RECIPIENTS
    text, token = mint(
        cluster_id="c" * 128,
        contacts=contacts,
        recipients=recipients,
        roles=["operator", "submit", "worker"],
        uses=1000,
        name="n" * 63,
        ttl_ms=24 * HOUR,
    )
    assert len(text) <= MAX_TOKEN_CHARS
    assert decode(text) == token


# --- refusals at decode: envelope --------------------------------------------------------


@pytest.mark.parametrize("part", ["key", "signature", "payload"])
def test_a_flipped_byte_anywhere_is_a_bad_signature(part: str) -> None:
    text, _ = mint()
    blob = bytearray(unb64(body_of(text)))
    index = {"key": 5, "signature": 40, "payload": 120}[part]
    blob[index] ^= 0x01
    refused(PREFIX + b64(bytes(blob)), "token_bad_signature")
    refused(whole(PREFIX + b64(bytes(blob))), "token_bad_signature")


def test_a_token_signed_under_another_domain_is_a_bad_signature() -> None:
    payload = canonical_json(fields())
    refused(seal(payload, domain=b"populi/revocations/v1\x00"), "token_bad_signature")
    refused(seal(payload, domain=b""), "token_bad_signature")


def test_truncation_below_key_and_signature_is_malformed() -> None:
    text, _ = mint()
    error = refused(text[: len(PREFIX) + 100], "token_malformed")
    assert "truncated" in str(error)


def test_every_truncation_is_refused() -> None:
    text, token = mint()
    envelope = token_envelope(text)
    for end in range(len(text)):
        if end == len(envelope):
            # The envelope alone is a token without its secret: decodable, not usable.
            assert decode(text[:end]) == token
            with pytest.raises(TokenError) as info:
                open_token(text[:end], now_ms=NOW, skew_ms=0)
            assert info.value.code == "token_incomplete"
            continue
        with pytest.raises(TokenError) as info:
            decode(text[:end])
        assert info.value.code in {"token_malformed", "token_bad_signature"}, end


@pytest.mark.parametrize(
    "body",
    ["not base64!", "AAAA=", "A", "AB CD", "é" * 8],
)
def test_bad_base64url_is_malformed(body: str) -> None:
    refused(PREFIX + body, "token_malformed")


def test_non_canonical_base64url_is_malformed() -> None:
    # Find a token whose base64url ends in a partial group, then set an unused low bit of
    # its last character: the bytes decode the same, but the text is not canonical.
    for pad in range(3):
        text = signed(padding="x" * pad)
        if len(text[len(PREFIX) :]) % 4:
            break
    assert decode(text)
    twin = B64URL[B64URL.index(text[-1]) | 1]
    assert twin != text[-1]
    error = refused(text[:-1] + twin, "token_malformed")
    assert "non-canonical" in str(error)


def test_over_long_token_is_refused_before_decoding() -> None:
    error = refused(PREFIX + "A" * 5000, "token_too_long")
    assert "4096" in str(error)
    refused(PREFIX + "!" * (MAX_TOKEN_CHARS - len(PREFIX) + 1), "token_too_long")
    refused(PREFIX + "!" * (MAX_TOKEN_CHARS - len(PREFIX)), "token_malformed")


def test_surrounding_whitespace_is_ignored_and_does_not_count() -> None:
    text, token = mint()
    assert decode(f"\n  {text}\t \n") == token
    assert decode(" " * MAX_TOKEN_CHARS + text + "\n" * MAX_TOKEN_CHARS) == token


@pytest.mark.parametrize("version", ["4", "0", "10", "01"])
def test_unknown_version_prefix_is_unsupported(version: str) -> None:
    text, _ = mint()
    error = refused(f"populi-join-{version}." + text[len(PREFIX) :], "token_unsupported_version")
    assert f"version {version} " in str(error)


def test_a_version_1_token_is_refused_with_the_reason() -> None:
    # A real version-1 token (its whole text was the secret, sent to whoever answered).
    v1 = seal(
        canonical_json(fields(v=1)), prefix="populi-join-1.", domain=b"populi/join-token/v1\x00"
    )
    error = refused(v1, "token_unsupported_version")
    assert "version 1 is no longer accepted" in str(error)
    assert "new token" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "populi-join-1",
        "populi-join-2",
        "populi-join-2..",
        "populi-join-2.AAAA.AAAA.AAAA",
        "populi-join.AAAA",
        "populi-join-v1.AAAA",
        "POPULI-JOIN-1.AAAA",
        "populi-revocations-1.AAAA",
        "hello world",
    ],
)
def test_unknown_prefix_is_malformed(text: str) -> None:
    refused(text, "token_malformed")


def test_a_non_string_is_malformed() -> None:
    with pytest.raises(TokenError) as info:
        decode_token(b"populi-join-1.AAAA", now_ms=NOW, skew_ms=0)  # type: ignore[arg-type]
    assert info.value.code == "token_malformed"


def test_negative_skew_is_a_programming_error() -> None:
    text, _ = mint()
    with pytest.raises(ValueError):
        decode(text, skew_ms=-1)


# --- refusals at decode: signer and pin ------------------------------------------------


def test_foreign_signer_is_refused_with_a_trusted_root() -> None:
    text, _ = mint(signing_key=OTHER)
    error = refused(text, "token_foreign_signer", trusted_root=ROOT.public_key())
    assert pin_of(OTHER)[:23] in str(error)


def test_without_a_trusted_root_a_token_vouches_for_its_own_pin() -> None:
    text, token = mint(signing_key=OTHER)
    assert decode(text) == token
    assert token.ca_pin == pin_of(OTHER)


def test_the_trusted_root_itself_is_accepted() -> None:
    text, token = mint()
    assert decode(text, trusted_root=ROOT.public_key()) == token


def test_pin_of_another_key_is_a_pin_mismatch() -> None:
    # Signed by ROOT, but pinning OTHER: whoever made it wants the joiner to trust OTHER.
    refused(signed(ca_pin=pin_of(OTHER)), "token_pin_mismatch")
    refused(signed(ca_pin="sha256:" + "0" * 64), "token_pin_mismatch")


def test_foreign_signer_is_checked_before_the_payload_is_parsed() -> None:
    text = seal(b"{not json", OTHER)
    refused(text, "token_foreign_signer", trusted_root=ROOT.public_key())
    refused(text, "token_malformed")


def test_a_bad_signature_is_reported_before_a_bad_payload() -> None:
    text = seal(b"{not json")
    blob = bytearray(unb64(text[len(PREFIX) :]))
    blob[-1] ^= 0x20
    refused(PREFIX + b64(bytes(blob)), "token_bad_signature")


# --- refusals at decode: payload ---------------------------------------------------------


@pytest.mark.parametrize("version", [1, 3, 0, "2", True, None, 2.0])
def test_payload_version_must_match_the_prefix(version: Any) -> None:
    if isinstance(version, float):
        # Canonical JSON cannot carry floats; seal it by hand.
        payload = canonical_json(fields(v=DELETE))[:-1] + b',"v":2.0}'
        error = refused(seal(payload), "token_malformed")
        assert "JSON" in str(error)
        return
    error = refused(signed(v=version), "token_malformed")
    assert "field v " in str(error)


def test_missing_version_is_malformed() -> None:
    error = refused(signed(v=DELETE), "token_malformed")
    assert "field v: is missing" in str(error)


INVALID_AT_DECODE: list[tuple[str, dict[str, Any]]] = [
    ("roles", {"roles": []}),
    ("roles", {"roles": ["root"]}),
    ("roles", {"roles": "worker"}),
    ("roles", {"roles": [["worker"]]}),
    ("roles", {"roles": DELETE}),
    ("name", {"name": "Gpu-1"}),
    ("name", {"name": 5}),
    ("name", {"name": "x" * 64}),
    ("contacts[0]", {"contacts": ["gpu-1"]}),
    ("contacts[0]", {"contacts": [7070]}),
    ("contacts", {"contacts": []}),
    ("contacts", {"contacts": {"host": "gpu"}}),
    ("uses", {"uses": 0}),
    ("uses", {"uses": 1001}),
    ("uses", {"uses": "1"}),
    ("uses", {"uses": DELETE}),
    ("token_id", {"token_id": "abc"}),
    ("token_id", {"token_id": "00112233445566778899AABBCCDDEEFF"}),
    ("token_id", {"token_id": DELETE}),
    ("cluster_id", {"cluster_id": ""}),
    ("cluster_id", {"cluster_id": None}),
    ("not_before_ms", {"not_before_ms": -1}),
    ("not_before_ms", {"not_before_ms": "now"}),
    ("expires_ms", {"expires_ms": NOW}),
    ("expires_ms", {"expires_ms": NOW + 24 * HOUR + 1}),
    ("expires_ms", {"expires_ms": 2**53}),
    ("ca_pin", {"ca_pin": DELETE}),
    ("ca_pin", {"ca_pin": 5}),
    ("recipients", {"recipients": DELETE}),
    ("recipients", {"recipients": []}),
    ("recipients", {"recipients": CP}),
    ("recipients[0]", {"recipients": ["n-0000000000000000"]}),
    ("recipients[1]", {"recipients": [CP, CP]}),
    ("token_key", {"token_key": DELETE}),
    ("token_key", {"token_key": 5}),
    ("token_key", {"token_key": "A" * 42}),
    ("token_key", {"token_key": b64(bytes(31))}),
    ("token_key", {"token_key": "not base64!"}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID_AT_DECODE)
def test_invalid_fields_in_a_validly_signed_token_are_malformed(
    field: str, overrides: dict[str, Any]
) -> None:
    error = refused(signed(**overrides), "token_malformed")
    assert str(error).startswith(f"token is malformed: field {field}")
    assert error.details["field"] == field


def test_a_token_may_grant_the_voter_role() -> None:
    """Issue 13: a join with a voter token makes a candidate voter (ADR 0016)."""
    text, token = mint(roles=["worker", "voter"])
    assert set(token.roles) == set(decode(text).roles) == {"worker", "voter"}


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v": 1}',  # spaces
        b"[1,2,3]",
        b"null",
        b"\xff\xfe",
        b'{"v":1,"v":1}',
        b'{"a":NaN}',
    ],
)
def test_non_canonical_or_non_object_payload_is_malformed(payload: bytes) -> None:
    refused(seal(payload), "token_malformed")


def test_keys_out_of_order_are_not_canonical() -> None:
    body = fields()
    payload = json.dumps(dict(reversed(list(body.items()))), separators=(",", ":")).encode()
    error = refused(seal(payload), "token_malformed")
    assert "canonical" in str(error)


def test_unknown_fields_are_ignored() -> None:
    _, token = mint()
    assert decode(signed(future_field={"x": [1, 2]})) == token


def test_wrong_cluster_is_refused() -> None:
    text, token = mint()
    assert decode(text, expected_cluster_id="home") == token
    error = refused(text, "token_wrong_cluster", expected_cluster_id="office")
    assert "'home'" in str(error) and "'office'" in str(error)


# --- time --------------------------------------------------------------------------------

SKEW = 300_000


def test_not_yet_valid_edges_with_skew() -> None:
    text, token = mint()
    assert decode(text, now_ms=NOW - SKEW, skew_ms=SKEW) == token
    error = refused(text, "token_not_yet_valid", now_ms=NOW - SKEW - 1, skew_ms=SKEW)
    assert "2023-11-14T22:13:20Z" in str(error)
    refused(text, "token_not_yet_valid", now_ms=NOW - 1, skew_ms=0)


def test_expired_edges_with_skew() -> None:
    text, token = mint()
    expires = NOW + HOUR
    assert decode(text, now_ms=expires + SKEW - 1, skew_ms=SKEW) == token
    error = refused(text, "token_expired", now_ms=expires + SKEW, skew_ms=SKEW)
    assert decode(text, now_ms=expires - 1, skew_ms=0) == token
    refused(text, "token_expired", now_ms=expires, skew_ms=0)
    iso = datetime.fromtimestamp(expires / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"expired at {iso}" in str(error)


def test_expired_message_keeps_milliseconds() -> None:
    text, _ = mint(ttl_ms=HOUR + 7)
    error = refused(text, "token_expired", now_ms=NOW + 2 * HOUR, skew_ms=0)
    assert "expired at 2023-11-14T23:13:20.007Z" in str(error)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_utc_iso_matches_datetime(ms: int) -> None:
    m = datetime.fromtimestamp(ms // 1000, tz=UTC)
    fraction = f".{ms % 1000:03d}" if ms % 1000 else ""
    expected = (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f"{fraction}Z"
    )
    assert _utc_iso_ms(ms) == expected


# --- errors ------------------------------------------------------------------------------


def test_token_errors_are_refusals() -> None:
    text, _ = mint()
    error = refused(text, "token_expired", now_ms=NOW + 2 * HOUR, skew_ms=0)
    assert isinstance(error, TokenError)
    assert error.kind is ErrorKind.REFUSED
    assert error.code == "token_expired"
    # Standalone: no HTTP status or exit code here (populi_peer.errors translates).
    assert not hasattr(error, "http_status") and not hasattr(error, "exit_code")


def test_no_refusal_echoes_the_token() -> None:
    text, _ = mint()
    blob = bytearray(unb64(body_of(text)))
    blob[100] ^= 0x01
    other_secret = token_envelope(text) + "." + b64(bytes(32))
    cases: list[tuple[str, dict[str, Any]]] = [
        (other_secret, {}),
        (whole(PREFIX + b64(bytes(blob))), {}),
        (text, {"now_ms": NOW + 2 * HOUR}),
        (text, {"now_ms": NOW - HOUR}),
        (text, {"expected_cluster_id": "office"}),
        (text, {"trusted_root": OTHER.public_key()}),
        (text + "A", {}),
        (text + "!", {}),
        (text.replace(PREFIX, "populi-join-7."), {}),
        (text.replace(PREFIX, "populi-joins-1."), {}),
        (PREFIX + b64(bytes(blob)), {}),
        (text[len(PREFIX) :], {}),
        (text * 8, {}),
        (signed(uses=0), {}),
        (signed(ca_pin=pin_of(OTHER)), {}),
    ]
    for case, kwargs in cases:
        with pytest.raises(TokenError) as info:
            decode(case, **kwargs)
        assert_one_clean_line(info.value, case)
        assert text[len(PREFIX) :][:16] not in str(info.value)


# --- the secret, the joiner's and the control plane's views ------------------------------


def test_the_secret_of_another_token_is_a_key_mismatch() -> None:
    text, _ = mint()
    other, _ = mint(token_seed=bytes(32))
    error = refused(token_envelope(text) + "." + other.rsplit(".", 1)[1], "token_key_mismatch")
    assert "whole token" in str(error)


@pytest.mark.parametrize("secret", ["", "A" * 42, "A" * 44, "not base64!", b64(bytes(31))])
def test_a_malformed_secret_is_refused_before_the_signature_is_checked(secret: str) -> None:
    text, _ = mint()
    refused(token_envelope(text) + "." + secret, "token_malformed")
    # Even on an envelope whose signature is broken: the secret is checked first (step 3).
    blob = bytearray(unb64(body_of(text)))
    blob[40] ^= 1
    refused(PREFIX + b64(bytes(blob)) + "." + secret, "token_malformed")


def test_open_token_gives_the_joiner_its_envelope_and_token_key() -> None:
    text, token = mint()
    held = open_token(f" {text}\n", now_ms=NOW, skew_ms=0)
    assert held.token == token
    assert held.envelope == token_envelope(text) == signed()
    assert raw(held.token_key) == raw(TOKEN_KEY) == token.token_key
    for envelope_only in (token_envelope(text), signed()):
        with pytest.raises(TokenError) as info:
            open_token(envelope_only, now_ms=NOW, skew_ms=0)
        assert info.value.code == "token_incomplete"
    with pytest.raises(TokenError) as info:
        open_token(text, now_ms=NOW + HOUR, skew_ms=0)
    assert info.value.code == "token_expired"


@pytest.mark.parametrize("skew_ms", [-1, True, 1.5, None])
def test_a_bad_skew_budget_is_a_programming_error_before_any_decoding(skew_ms: Any) -> None:
    text, token = mint()
    for call in (
        lambda: decode_token("not a token", now_ms=NOW, skew_ms=skew_ms),
        lambda: open_token("not a token", now_ms=NOW, skew_ms=skew_ms),
        lambda: check_token_time(token, now_ms=NOW, skew_ms=skew_ms),
    ):
        with pytest.raises(ValueError, match="skew_ms must be a non-negative integer"):
            call()
    assert open_token(text, now_ms=NOW, skew_ms=0).token == token


def _redeem(envelope: str, **overrides: Any) -> JoinToken:
    args: dict[str, Any] = {
        "trusted_root": ROOT.public_key(),
        "expected_cluster_id": "home",
        "recipient": CP,
    }
    args.update(overrides)
    return redeem_token(envelope, **args)


def test_redeem_takes_the_envelope_for_a_named_recipient_only() -> None:
    text, token = mint(recipients=[CP, VOTER])
    assert _redeem(token_envelope(text)) == token
    assert _redeem(token_envelope(text), recipient=VOTER) == token
    with pytest.raises(JoinProofError) as info:
        _redeem(token_envelope(text), recipient="n-cccccccccccccccc")
    assert info.value.code == "token_wrong_recipient"
    assert info.value.kind is ErrorKind.FORBIDDEN
    assert CP in str(info.value) and "n-cccccccccccccccc" in str(info.value)
    with pytest.raises(TokenError) as info:
        _redeem(text)
    assert info.value.code == "token_secret_sent"
    assert text.rsplit(".", 1)[1] not in str(info.value)
    for overrides, code in (
        ({"trusted_root": OTHER.public_key()}, "token_foreign_signer"),
        ({"expected_cluster_id": "office"}, "token_wrong_cluster"),
    ):
        with pytest.raises(TokenError) as info:
            _redeem(token_envelope(text), **overrides)
        assert info.value.code == code


def test_redeem_does_not_look_at_time() -> None:
    # Time is the caller's next step (a retry of a recorded join needs none).
    text, token = mint()
    assert _redeem(token_envelope(text)) == token
    with pytest.raises(TokenError):
        check_redeem_time(token, now_ms=NOW + 2 * HOUR)


def test_the_redeeming_node_grants_seconds_not_the_skew_budget() -> None:
    _, token = mint(ttl_ms=1000)
    expires = NOW + 1000
    assert REDEEM_GRACE_MS <= 5_000
    check_redeem_time(token, now_ms=expires + REDEEM_GRACE_MS - 1)
    with pytest.raises(TokenError) as info:
        check_redeem_time(token, now_ms=expires + REDEEM_GRACE_MS)
    assert info.value.code == "token_expired"
    assert "allowing 2s of skew" in str(info.value)
    check_redeem_time(token, now_ms=NOW - REDEEM_GRACE_MS)
    with pytest.raises(TokenError) as info:
        check_redeem_time(token, now_ms=NOW - REDEEM_GRACE_MS - 1)
    assert info.value.code == "token_not_yet_valid"
    # The joiner's own pre-check may still allow the whole budget: it is not the judge.
    assert decode(mint(ttl_ms=1000)[0], now_ms=expires + SKEW - 1, skew_ms=SKEW) == token


# --- join proofs ---------------------------------------------------------------------------

NODE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))


def claim(**overrides: Any) -> JoinClaim:
    args: dict[str, Any] = {
        "recipient": CP,
        "challenge": "c" * 43,
        "public_key": b64(raw(NODE_KEY)),
        "cluster_id": "home",
        "name": "gpu-1",
        "token_id": TOKEN_ID.hex(),
        "addresses": ("10.0.0.9:7431",),
    }
    args.update(overrides)
    return JoinClaim(**args)


def test_join_claim_payload_is_canonical_and_names_everything_it_binds() -> None:
    body = json.loads(claim().payload())
    assert claim().payload() == canonical_json(body)
    assert body == {
        "v": 2,
        "recipient": CP,
        "challenge": "c" * 43,
        "public_key": b64(raw(NODE_KEY)),
        "cluster_id": "home",
        "name": "gpu-1",
        "token_id": TOKEN_ID.hex(),
        "addresses": ["10.0.0.9:7431"],
    }


def test_join_proofs_verify_for_exactly_the_claim_they_were_made_for() -> None:
    _, token = mint()
    proofs = prove_join(claim(), node_key=NODE_KEY, token_key=TOKEN_KEY)
    verify_join(claim(), proofs, token=token)
    # A field bound by the node's proof, then one bound by the token's.
    changed = [
        ("recipient", VOTER, "proof_invalid"),
        ("challenge", "d" * 43, "proof_invalid"),
        ("public_key", b64(raw(OTHER)), "proof_invalid"),
        ("name", "gpu-2", "proof_invalid"),
        ("addresses", (), "proof_invalid"),
        ("token_id", "ff" * 16, "token_proof_invalid"),
        ("cluster_id", "office", "token_proof_invalid"),
    ]
    for field, value, code in changed:
        with pytest.raises(JoinProofError) as info:
            verify_join(claim(**{field: value}), proofs, token=token)
        assert info.value.code == code, field


def test_a_proof_without_the_token_secret_does_not_verify() -> None:
    _, token = mint()
    forged = prove_join(claim(), node_key=NODE_KEY, token_key=OTHER)
    with pytest.raises(JoinProofError) as info:
        verify_join(claim(), forged, token=token)
    assert info.value.code == "token_proof_invalid"
    assert info.value.kind is ErrorKind.FORBIDDEN


def test_the_two_proofs_cannot_stand_in_for_each_other() -> None:
    _, token = mint()
    # The joiner's key is the token key here, so only the domains tell the two apart.
    same = claim(public_key=b64(raw(TOKEN_KEY)))
    good = prove_join(same, node_key=TOKEN_KEY, token_key=TOKEN_KEY)
    verify_join(same, good, token=token)
    assert good.proof != good.token_proof
    swapped = JoinProofs(proof=good.token_proof, token_proof=good.proof)
    with pytest.raises(JoinProofError):
        verify_join(same, swapped, token=token)


@pytest.mark.parametrize("bad", ["", "!!", "A" * 86, b64(bytes(63))])
def test_malformed_proofs_are_refused(bad: str) -> None:
    _, token = mint()
    proofs = prove_join(claim(), node_key=NODE_KEY, token_key=TOKEN_KEY)
    for broken in (
        JoinProofs(proof=bad, token_proof=proofs.token_proof),
        JoinProofs(proof=proofs.proof, token_proof=bad),
    ):
        with pytest.raises(JoinProofError):
            verify_join(claim(), broken, token=token)
    with pytest.raises(JoinProofError) as info:
        verify_join(claim(public_key="not a key"), proofs, token=token)
    assert info.value.code == "proof_invalid"


# --- node names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "gpu-1", "0", "a" * 63, "node-01-x", "9lives"])
def test_valid_node_names(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "gpu_1", "-a", "a-", "a" * 64, "gpu.1", "gpu 1", "gpü", "a\n", None, 5]
)
def test_invalid_node_names_are_bad_requests(name: Any) -> None:
    with pytest.raises(NodeNameError) as info:
        validate_node_name(name)
    assert info.value.code == "bad_node_name" and info.value.kind is ErrorKind.BAD_INPUT
    assert "\n" not in str(info.value)


# --- fuzzing: decode_token raises TokenError and nothing else ------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_TEXT, VALID_TOKEN = mint(contacts=["10.0.0.1:7070", "[fd00::1]:1"], name="gpu-1", uses=2)


def decode_or_token_error(text: str, **kwargs: Any) -> JoinToken | None:
    try:
        return decode(text, **kwargs)
    except TokenError as error:
        assert_one_clean_line(error, text)
        return None


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text: str) -> None:
    assert decode_or_token_error(text) is None


@FUZZ
@given(st.text(alphabet=B64URL, max_size=400))
def test_fuzz_arbitrary_base64url_after_the_prefix(body: str) -> None:
    assert decode_or_token_error(PREFIX + body) is None


@FUZZ
@given(mutations_of(VALID_TEXT))
def test_fuzz_character_mutations_of_a_valid_token(mutated: str) -> None:
    result = decode_or_token_error(mutated)
    if mutated.strip() != VALID_TEXT:
        assert result is None


@FUZZ
@given(st.integers(0, 95 + len(unb64(body_of(VALID_TEXT)))), st.integers(1, 255))
def test_fuzz_any_byte_flip_in_the_blob_is_a_bad_signature(index: int, mask: int) -> None:
    blob = bytearray(unb64(body_of(VALID_TEXT)))
    index %= len(blob)
    blob[index] ^= mask
    refused(whole(PREFIX + b64(bytes(blob))), "token_bad_signature")


@FUZZ
@given(st.integers(0, 31), st.integers(1, 255))
def test_fuzz_any_byte_flip_in_the_secret_is_refused(index: int, mask: int) -> None:
    seed = bytearray(SEED)
    seed[index] ^= mask
    text = whole(token_envelope(VALID_TEXT), bytes(seed))
    refused(text, "token_key_mismatch")
    with pytest.raises(TokenError) as info:
        open_token(text, now_ms=NOW, skew_ms=0)
    assert info.value.code == "token_key_mismatch"


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_validly_signed_arbitrary_payload_bytes(payload: bytes) -> None:
    assert decode_or_token_error(seal(payload)) is None


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=12))
def test_fuzz_validly_signed_arbitrary_objects(body: dict[str, Any]) -> None:
    decode_or_token_error(seal(canonical_json(body)))


@FUZZ
@given(
    st.sampled_from(sorted(fields())) | st.text(max_size=8),
    json_values,
    st.integers(-(2**60), 2**60),
    st.integers(0, 2**40),
)
def test_fuzz_one_field_replaced_in_a_signed_token(
    name: str, value: Any, now_ms: int, skew_ms: int
) -> None:
    text = seal(canonical_json(fields(**{name: value})))
    token = decode_or_token_error(text, now_ms=now_ms, skew_ms=skew_ms)
    if token is not None:
        assert token.not_before_ms - skew_ms <= now_ms < token.expires_ms + skew_ms


@FUZZ
@given(
    st.integers(0, 2**52),
    st.integers(1, 24 * HOUR),
    st.lists(st.sampled_from(["worker", "submit", "operator"]), min_size=1, unique=True),
    st.binary(min_size=16, max_size=16),
)
def test_fuzz_minted_tokens_round_trip(
    now_ms: int, ttl_ms: int, roles: list[str], token_id: bytes
) -> None:
    text, token = mint(now_ms=now_ms, ttl_ms=ttl_ms, roles=roles, token_id=token_id)
    assert decode(text, now_ms=now_ms) == token
    assert decode(text, now_ms=now_ms + ttl_ms - 1) == token
    refused(text, "token_expired", now_ms=now_ms + ttl_ms)
    check_redeem_time(token, now_ms=now_ms + ttl_ms + REDEEM_GRACE_MS - 1)
    with pytest.raises(TokenError):
        check_redeem_time(token, now_ms=now_ms + ttl_ms + REDEEM_GRACE_MS)


# --- purity --------------------------------------------------------------------------------

FORBIDDEN_MODULES = {"trio", "socket", "time", "random", "secrets", "datetime", "os", "asyncio"}


@pytest.mark.parametrize("module", ["tokens", "revocation"])
def test_module_is_pure(module: str) -> None:
    path = Path(enrollment.tokens.__file__).with_name(f"{module}.py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            if isinstance(node, ast.Attribute):
                assert node.attr not in {"now", "utcnow", "urandom", "time_ns"}, node.attr
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{module} imports {name}"
