from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.errors import SignatureError
from enrollment.keys import generate_key
from enrollment.signing import (
    HEADER_DIGEST,
    HEADER_INPUT,
    HEADER_SIGNATURE,
    ReplayCache,
    parse_signature_input,
    sign_request,
    verify_request,
)

KEY = generate_key()
OTHER = generate_key()
NOW = 1_800_000_000


def _sign(**over):
    args = dict(
        key=KEY,
        keyid="op-a",
        recipient="n-node",
        method="POST",
        path="/v1/populi/admin/settings",
        query="x=1",
        body=b'{"v":1}',
        created_s=NOW,
        nonce=b"0123456789abcdef",
    )
    args.update(over)
    return sign_request(**args)


def _verify(
    headers,
    *,
    cache=None,
    now=NOW,
    body=b'{"v":1}',
    path="/v1/populi/admin/settings",
    query="x=1",
    method="POST",
    me="n-node",
    keys=None,
):
    keys = keys if keys is not None else {"op-a": KEY.public_key()}
    return verify_request(
        headers=headers,
        method=method,
        path=path,
        query=query,
        body=body,
        my_node_id=me,
        resolve_key=keys.get,
        now_s=now,
        skew_s=300,
        replay_cache=cache if cache is not None else ReplayCache(),
    )


def test_round_trip_names_the_signer() -> None:
    params = _verify(_sign())
    assert params.keyid == "op-a"
    assert params.recipient == "n-node"


def test_replayed_nonce_is_refused() -> None:
    cache = ReplayCache()
    headers = _sign()
    _verify(headers, cache=cache)
    with pytest.raises(SignatureError) as info:
        _verify(headers, cache=cache)
    assert info.value.code == "signature_replayed"


def test_nonce_forgotten_only_after_it_could_no_longer_pass() -> None:
    cache = ReplayCache()
    headers = _sign()
    _verify(headers, cache=cache, now=NOW)
    # Still inside the window: refused as replay.
    with pytest.raises(SignatureError):
        _verify(headers, cache=cache, now=NOW + 299)
    # Past created + skew the request fails the skew check anyway, never passes.
    with pytest.raises(SignatureError) as info:
        _verify(headers, cache=cache, now=NOW + 301)
    assert info.value.code == "clock_skew"


@pytest.mark.parametrize("skew", [-240, 240])
def test_skew_of_four_minutes_is_accepted(skew: int) -> None:
    _verify(_sign(created_s=NOW + skew))


@pytest.mark.parametrize("skew", [-600, 600])
def test_skew_of_ten_minutes_is_refused_naming_the_skew(skew: int) -> None:
    with pytest.raises(SignatureError) as info:
        _verify(_sign(created_s=NOW + skew))
    assert info.value.code == "clock_skew"
    assert "600 s" in str(info.value)
    assert ("ahead" if skew > 0 else "behind") in str(info.value)


def test_signed_for_another_recipient_is_refused() -> None:
    with pytest.raises(SignatureError) as info:
        _verify(_sign(recipient="n-other"))
    assert info.value.code == "signature_wrong_recipient"


def test_body_changed_after_signing_is_refused() -> None:
    headers = _sign()
    with pytest.raises(SignatureError) as info:
        _verify(headers, body=b'{"v":2}')
    assert info.value.code == "signature_digest_mismatch"


def test_body_and_digest_both_replaced_fails_the_signature() -> None:
    headers = dict(_sign())
    forged = _sign(body=b'{"v":2}')
    headers[HEADER_DIGEST] = forged[HEADER_DIGEST]
    with pytest.raises(SignatureError) as info:
        _verify(headers, body=b'{"v":2}')
    assert info.value.code == "signature_invalid"


@pytest.mark.parametrize(
    "field,value", [("path", "/v1/populi/status"), ("query", "x=2"), ("method", "PUT")]
)
def test_any_covered_component_changed_fails(field: str, value: str) -> None:
    with pytest.raises(SignatureError) as info:
        _verify(_sign(), **{field: value})
    assert info.value.code == "signature_invalid"


def test_key_that_does_not_match_claimed_signer_is_refused() -> None:
    headers = _sign(key=OTHER)
    with pytest.raises(SignatureError) as info:
        _verify(headers)
    assert info.value.code == "signature_invalid"


def test_unknown_signer_is_refused() -> None:
    with pytest.raises(SignatureError) as info:
        _verify(_sign(), keys={})
    assert info.value.code == "unknown_signer"


def test_missing_headers_are_refused() -> None:
    with pytest.raises(SignatureError) as info:
        _verify({})
    assert info.value.code == "signature_missing"


def test_forged_nonce_does_not_enter_the_cache() -> None:
    cache = ReplayCache()
    with pytest.raises(SignatureError):
        _verify(_sign(key=OTHER), cache=cache)
    assert len(cache) == 0
    _verify(_sign(), cache=cache)


def test_full_cache_fails_closed() -> None:
    cache = ReplayCache(max_entries=1)
    _verify(_sign(nonce=b"a" * 16), cache=cache)
    with pytest.raises(SignatureError) as info:
        _verify(_sign(nonce=b"b" * 16), cache=cache)
    assert info.value.code == "replay_cache_full"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "v=1",
        "v=2; keyid=a; recipient=b; created=1; nonce=MDEyMzQ1Njc4OWFiY2RlZg",
        "v=1; keyid=a; recipient=b; created=-1; nonce=MDEyMzQ1Njc4OWFiY2RlZg",
        "v=1; keyid=a; keyid=b; recipient=b; created=1; nonce=MDEyMzQ1Njc4OWFiY2RlZg",
        "v=1; keyid=a b; recipient=b; created=1; nonce=MDEyMzQ1Njc4OWFiY2RlZg",
        "v=1; keyid=a; recipient=b; created=1; nonce=short",
        "v=1; keyid=a; recipient=b; created=1; nonce=MDEyMzQ1Njc4OWFiY2RlZg; extra=1",
        "x" * 600,
    ],
)
def test_malformed_signature_input_is_one_documented_error(value: str) -> None:
    with pytest.raises(SignatureError):
        parse_signature_input(value)


@given(st.text(max_size=700))
def test_signature_input_parser_never_crashes(value: str) -> None:
    try:
        parse_signature_input(value)
    except SignatureError:
        pass


@given(
    st.dictionaries(
        st.sampled_from([HEADER_INPUT, HEADER_SIGNATURE, HEADER_DIGEST, "x"]), st.text(max_size=200)
    )
)
def test_verify_never_crashes_on_arbitrary_headers(headers: dict[str, str]) -> None:
    try:
        _verify(headers)
    except SignatureError:
        pass


@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=1))
def test_any_single_byte_flip_of_the_signature_input_is_refused(position: int, byte: bytes) -> None:
    headers = dict(_sign())
    text = headers[HEADER_INPUT]
    index = position % len(text)
    replacement = chr(byte[0] % 128)
    # Whitespace around separators is not significant (the signature covers the parsed
    # values); every other change must be refused.
    if replacement == text[index] or text[index].isspace() or replacement.isspace():
        return
    headers[HEADER_INPUT] = text[:index] + replacement + text[index + 1 :]
    with pytest.raises(SignatureError):
        _verify(headers)
