"""The revocation list: operations, the signed wire form, and accept_newer's merge rule."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrollment.canonical import canonical_json
from enrollment.errors import ErrorKind, NodeNameError, RevocationError
from enrollment.revocation import (
    MAX_REVOCATIONS_CHARS,
    AcceptOutcome,
    RevocationConflict,
    RevocationFieldError,
    RevocationList,
    RevocationNotFound,
    RevokedNode,
    accept_newer,
    block_name,
    is_certificate_revoked,
    is_name_blocked,
    is_revoked,
    revoke_node,
    sign_revocations,
    unblock_name,
    verify_revocations,
)
from support.fuzz import B64URL, json_values, mutations_of
from support.tokens import NOW, OTHER, ROOT, b64, open_envelope, raw, seal_envelope, unb64

CLUSTER = ROOT
CLUSTER_ID = "home"
PREFIX = "populi-revocations-1."
DOMAIN = b"populi/revocations/v1\x00"


def seal(payload: bytes, key: Ed25519PrivateKey = CLUSTER, *, prefix: str = PREFIX) -> str:
    """The wire form written out from the specification, independent of the module."""
    return seal_envelope(payload, key, prefix=prefix, domain=DOMAIN)


def node(node_id: str = "n-1", name: str = "gpu-1", **overrides: Any) -> RevokedNode:
    args: dict[str, Any] = {
        "node_id": node_id,
        "name": name,
        "reason": "laptop stolen",
        "revoked_ms": NOW,
        "cert_serials": ("0a", "01"),
    }
    args.update(overrides)
    return RevokedNode(**args)


def verify(text: str, **kwargs: Any) -> RevocationList:
    kwargs.setdefault("cluster_key", CLUSTER.public_key())
    kwargs.setdefault("cluster_id", CLUSTER_ID)
    return verify_revocations(text, **kwargs)


def accept(current: RevocationList | None, text: str) -> tuple[RevocationList | None, str]:
    return accept_newer(current, text, cluster_key=CLUSTER.public_key(), cluster_id=CLUSTER_ID)


def refused(text: str, code: str, **kwargs: Any) -> RevocationError:
    with pytest.raises(RevocationError) as info:
        verify(text, **kwargs)
    assert info.value.code == code, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


EMPTY = RevocationList.empty(CLUSTER_ID, now_ms=NOW)
ONE = revoke_node(EMPTY, node(), now_ms=NOW + 1)
TWO = revoke_node(ONE, node("n-2", "gpu-2"), now_ms=NOW + 2)


# --- the list and its operations ---------------------------------------------------------


def test_empty_list_starts_at_serial_zero() -> None:
    assert EMPTY.serial == 0
    assert EMPTY.issued_ms == NOW
    assert EMPTY.revoked == () and EMPTY.blocked_names == ()
    assert not is_revoked(EMPTY, "n-1")


def test_revoke_node_bumps_the_serial_and_blocks_the_name() -> None:
    assert ONE.serial == 1
    assert ONE.issued_ms == NOW + 1
    assert is_revoked(ONE, "n-1")
    assert not is_revoked(ONE, "n-2")
    assert is_name_blocked(ONE, "gpu-1")
    assert not is_name_blocked(ONE, "gpu-2")
    assert ONE.node_ids == frozenset({"n-1"})
    assert TWO.serial == 2
    assert TWO.node_ids == frozenset({"n-1", "n-2"})
    assert EMPTY.serial == 0  # the old list is untouched


def test_a_certificate_is_revoked_by_its_node_or_by_its_serial() -> None:
    """What a caller checks of the certificate a peer presents (ADR 0009): its node id,
    and its serial against every serial a revoked node held."""
    assert is_certificate_revoked(ONE, "n-1", "ff")
    assert is_certificate_revoked(ONE, "n-9", "0a")
    assert is_certificate_revoked(ONE, "n-9", "0A")
    assert not is_certificate_revoked(ONE, "n-9", "0b")
    assert not is_certificate_revoked(EMPTY, "n-1", "0a")


def test_revoking_a_revoked_node_is_a_conflict() -> None:
    with pytest.raises(RevocationConflict) as info:
        revoke_node(TWO, node("n-1", "gpu-9"), now_ms=NOW + 3)
    assert info.value.code == "node_already_revoked"
    assert info.value.kind is ErrorKind.CONFLICT and isinstance(info.value, RevocationError)


def test_unblocking_a_name_frees_the_name_but_not_the_node() -> None:
    freed = unblock_name(TWO, "gpu-1", now_ms=NOW + 3)
    assert freed.serial == 3
    assert not is_name_blocked(freed, "gpu-1")
    assert is_name_blocked(freed, "gpu-2")
    assert is_revoked(freed, "n-1")
    assert freed.node_ids == TWO.node_ids


def test_unblocking_a_name_that_is_not_blocked_is_not_found() -> None:
    with pytest.raises(RevocationNotFound) as info:
        unblock_name(TWO, "gpu-7", now_ms=NOW + 3)
    assert info.value.code == "name_not_blocked"
    assert info.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(NodeNameError) as bad:
        unblock_name(TWO, "Not A Name", now_ms=NOW + 3)
    assert bad.value.code == "bad_node_name" and bad.value.kind is ErrorKind.BAD_INPUT


def test_block_name_and_a_later_revocation_under_that_name() -> None:
    blocked = block_name(EMPTY, "gpu-1", now_ms=NOW)
    assert blocked.serial == 1 and is_name_blocked(blocked, "gpu-1")
    with pytest.raises(RevocationConflict) as info:
        block_name(blocked, "gpu-1", now_ms=NOW)
    assert info.value.code == "name_already_blocked"
    revoked = revoke_node(blocked, node(), now_ms=NOW)
    assert revoked.blocked_names == ("gpu-1",)


def test_a_name_can_be_reused_then_blocked_again() -> None:
    freed = unblock_name(ONE, "gpu-1", now_ms=NOW + 2)
    again = revoke_node(freed, node("n-1b", "gpu-1"), now_ms=NOW + 3)
    assert is_name_blocked(again, "gpu-1")
    assert again.node_ids == {"n-1", "n-1b"}


def test_lists_are_normalised_so_equal_content_signs_the_same() -> None:
    a = RevocationList(
        CLUSTER_ID, 5, NOW, (node("n-2", "b"), node("n-1", "a")), blocked_names=("b", "a")
    )
    b = RevocationList(
        CLUSTER_ID, 5, NOW, (node("n-1", "a"), node("n-2", "b")), blocked_names=("a", "b")
    )
    assert a == b
    assert sign_revocations(a, CLUSTER) == sign_revocations(b, CLUSTER)
    assert [n.node_id for n in a.revoked] == ["n-1", "n-2"]
    assert node().cert_serials == ("01", "0a")


INVALID_NODES: list[tuple[str, dict[str, Any]]] = [
    ("node_id", {"node_id": ""}),
    ("node_id", {"node_id": "has space"}),
    ("name", {"name": "Gpu"}),
    ("reason", {"reason": "two\nlines"}),
    ("reason", {"reason": "x" * 201}),
    ("reason", {"reason": None}),
    ("revoked_ms", {"revoked_ms": -1}),
    ("revoked_ms", {"revoked_ms": True}),
    ("cert_serials", {"cert_serials": ["01"]}),
    ("cert_serials", {"cert_serials": ("01", "01")}),
    ("cert_serials[0]", {"cert_serials": ("",)}),
    ("cert_serials[0]", {"cert_serials": (1,)}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID_NODES)
def test_invalid_revoked_nodes_are_refused(field: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(RevocationFieldError) as info:
        node(**overrides)
    assert info.value.field == field
    assert info.value.code == "revocation_bad_field"
    assert info.value.kind is ErrorKind.BAD_INPUT
    assert str(info.value).startswith(f"revocation list field {field}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("cluster_id", {"cluster_id": ""}),
        ("serial", {"serial": -1}),
        ("serial", {"serial": 2**53}),
        ("issued_ms", {"issued_ms": "now"}),
        ("revoked", {"revoked": [node()]}),
        ("revoked", {"revoked": (node(), node(name="gpu-x"))}),
        ("revoked[0]", {"revoked": ("n-1",)}),
        ("blocked_names", {"blocked_names": ("a", "a")}),
        ("blocked_names[0]", {"blocked_names": ("A",)}),
    ],
)
def test_invalid_lists_are_refused(field: str, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"cluster_id": CLUSTER_ID, "serial": 1, "issued_ms": NOW}
    args.update(kwargs)
    with pytest.raises(RevocationFieldError) as info:
        RevocationList(**args)
    assert info.value.field == field


# --- wire ----------------------------------------------------------------------------------


def test_sign_then_verify_round_trips() -> None:
    for lst in (EMPTY, ONE, TWO, unblock_name(TWO, "gpu-2", now_ms=NOW + 9)):
        assert verify(sign_revocations(lst, CLUSTER)) == lst


def test_wire_form_is_prefix_key_signature_canonical_payload() -> None:
    text = sign_revocations(TWO, CLUSTER)
    assert text.startswith(PREFIX)
    payload = open_envelope(text[len(PREFIX) :], CLUSTER, domain=DOMAIN)
    assert payload == canonical_json(TWO.to_json())
    body = json.loads(payload)
    assert body["v"] == 1
    assert body["serial"] == 2
    assert body["cluster_id"] == CLUSTER_ID
    assert [n["node_id"] for n in body["revoked"]] == ["n-1", "n-2"]
    assert body["blocked_names"] == ["gpu-1", "gpu-2"]
    assert set(body["revoked"][0]) == {"node_id", "name", "reason", "revoked_ms", "cert_serials"}
    assert seal(payload) == text


@pytest.mark.parametrize("index", [3, 50, 120, -1])
def test_a_flipped_byte_is_a_bad_signature(index: int) -> None:
    blob = bytearray(unb64(sign_revocations(ONE, CLUSTER)[len(PREFIX) :]))
    blob[index] ^= 0x40
    refused(PREFIX + b64(bytes(blob)), "revocation_bad_signature")


def test_a_list_signed_by_another_key_is_a_foreign_signer() -> None:
    refused(sign_revocations(ONE, OTHER), "revocation_foreign_signer")
    assert verify(sign_revocations(ONE, OTHER), cluster_key=OTHER.public_key()) == ONE


def test_a_token_signature_does_not_verify_as_a_list() -> None:
    payload = canonical_json(ONE.to_json())
    token_signed = PREFIX + b64(
        raw(CLUSTER) + CLUSTER.sign(b"populi/join-token/v1\x00" + payload) + payload
    )
    refused(token_signed, "revocation_bad_signature")


def test_wrong_cluster_is_refused() -> None:
    error = refused(sign_revocations(ONE, CLUSTER), "revocation_wrong_cluster", cluster_id="work")
    assert "'home'" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "populi-revocations-1",
        "populi-revocations-1.",
        "populi-revocations-1.A",
        "populi-revocations-1.AAAA=",
        "populi-revocations-2.AAAA",
        "populi-join-1.AAAA",
        PREFIX + "A" * 100,
    ],
)
def test_garbage_is_malformed(text: str) -> None:
    refused(text, "revocation_malformed")


def test_unknown_version_says_so() -> None:
    text = sign_revocations(ONE, CLUSTER).replace(PREFIX, "populi-revocations-3.")
    assert "version 3 is not supported" in str(refused(text, "revocation_malformed"))


def test_over_long_text_is_malformed_before_decoding() -> None:
    error = refused(PREFIX + "A" * MAX_REVOCATIONS_CHARS, "revocation_malformed")
    assert str(MAX_REVOCATIONS_CHARS) in str(error)


def _payload(**overrides: Any) -> bytes:
    body = ONE.to_json()
    body.update(overrides)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("v", {"v": 2}),
        ("v", {"v": True}),
        ("serial", {"serial": -1}),
        ("serial", {"serial": "1"}),
        ("cluster_id", {"cluster_id": None}),
        ("revoked", {"revoked": {"n-1": {}}}),
        ("revoked", {"revoked": [node().to_json(), node().to_json()]}),
        ("revoked[0]", {"revoked": ["n-1"]}),
        ("revoked[0].name", {"revoked": [{**node().to_json(), "name": "BAD"}]}),
        ("revoked[0].reason", {"revoked": [{**node().to_json(), "reason": "a\tb"}]}),
        ("revoked[0].cert_serials", {"revoked": [{**node().to_json(), "cert_serials": "01"}]}),
        ("revoked[0].revoked_ms", {"revoked": [{**node().to_json(), "revoked_ms": None}]}),
        ("blocked_names", {"blocked_names": None}),
        ("blocked_names[0]", {"blocked_names": ["-x"]}),
    ],
)
def test_invalid_fields_in_a_validly_signed_list_are_malformed(
    field: str, overrides: dict[str, Any]
) -> None:
    error = refused(seal(_payload(**overrides)), "revocation_malformed")
    assert f"field {field}" in str(error)
    assert error.details["field"] == field


def test_missing_fields_are_malformed() -> None:
    for name in ("v", "cluster_id", "serial", "issued_ms", "revoked", "blocked_names"):
        body = ONE.to_json()
        del body[name]
        error = refused(seal(canonical_json(body)), "revocation_malformed")
        assert f"field {name}: is missing" in str(error)


def test_non_canonical_payload_is_malformed() -> None:
    pretty = json.dumps(ONE.to_json(), sort_keys=True, indent=1).encode()
    assert "canonical" in str(refused(seal(pretty), "revocation_malformed"))


def test_unknown_fields_are_ignored() -> None:
    body = ONE.to_json()
    body["future"] = [1]
    body["revoked"][0]["future"] = {"a": None}
    assert verify(seal(canonical_json(body))) == ONE


# --- accept_newer ------------------------------------------------------------------------------


def test_first_valid_list_is_accepted() -> None:
    assert accept(None, sign_revocations(ONE, CLUSTER)) == (ONE, "accepted")


def test_a_higher_serial_is_accepted() -> None:
    assert accept(ONE, sign_revocations(TWO, CLUSTER)) == (TWO, "accepted")


def test_a_lower_serial_is_ignored() -> None:
    assert accept(TWO, sign_revocations(ONE, CLUSTER)) == (TWO, "ignored_not_newer")


def test_an_equal_serial_is_ignored_even_with_other_content() -> None:
    assert accept(TWO, sign_revocations(TWO, CLUSTER)) == (TWO, "ignored_not_newer")
    fork = revoke_node(ONE, node("n-9", "gpu-9"), now_ms=NOW + 5)
    assert fork.serial == TWO.serial
    assert accept(TWO, sign_revocations(fork, CLUSTER)) == (TWO, "ignored_not_newer")


def test_a_higher_serial_that_drops_a_revoked_node_is_ignored() -> None:
    dropped = RevocationList(CLUSTER_ID, 10, NOW, (node("n-2", "gpu-2"),), ("gpu-1", "gpu-2"))
    assert accept(TWO, sign_revocations(dropped, CLUSTER)) == (TWO, "ignored_not_superset")


def test_a_higher_serial_that_unblocks_a_name_is_accepted() -> None:
    freed = unblock_name(TWO, "gpu-1", now_ms=NOW + 3)
    assert accept(TWO, sign_revocations(freed, CLUSTER)) == (freed, "accepted")


@pytest.mark.parametrize("current", [None, ONE])
def test_refusals_are_outcomes_not_errors(current: RevocationList | None) -> None:
    blob = bytearray(unb64(sign_revocations(TWO, CLUSTER)[len(PREFIX) :]))
    blob[-2] ^= 0x01
    work = RevocationList("work", 7, NOW)
    cases = [
        (sign_revocations(TWO, OTHER), "ignored_foreign_signer"),
        (PREFIX + b64(bytes(blob)), "ignored_bad_signature"),
        ("not a list", "ignored_malformed"),
        (seal(_payload(serial=-5)), "ignored_malformed"),
        (sign_revocations(work, CLUSTER), "ignored_wrong_cluster"),
    ]
    for text, outcome in cases:
        assert accept(current, text) == (current, outcome)


def test_accept_newer_never_raises_on_a_non_string() -> None:
    assert accept(ONE, None) == (ONE, "ignored_malformed")  # type: ignore[arg-type]


# --- properties --------------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIGNED_TWO = sign_revocations(TWO, CLUSTER)
#: Every outcome ``accept_revocations`` declares it can give.
OUTCOMES = frozenset(get_args(AcceptOutcome))


def check_fuzzed(text: str, current: RevocationList | None) -> None:
    try:
        verify(text)
    except RevocationError as error:
        assert "\n" not in str(error)
    kept, outcome = accept(current, text)
    assert outcome in OUTCOMES
    if outcome != "accepted":
        assert kept is current


@FUZZ
@given(st.text(max_size=300), st.sampled_from([None, ONE, TWO]))
def test_fuzz_arbitrary_text(text: str, current: RevocationList | None) -> None:
    check_fuzzed(text, current)


@FUZZ
@given(st.text(alphabet=B64URL, max_size=400))
def test_fuzz_arbitrary_base64url_after_the_prefix(body: str) -> None:
    check_fuzzed(PREFIX + body, ONE)


@FUZZ
@given(mutations_of(SIGNED_TWO))
def test_fuzz_character_mutations_of_a_valid_list(mutated: str) -> None:
    check_fuzzed(mutated, ONE)
    if mutated.strip() != SIGNED_TWO:
        assert accept(None, mutated)[0] is None


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_validly_signed_arbitrary_payload_bytes(payload: bytes) -> None:
    check_fuzzed(seal(payload), ONE)


@FUZZ
@given(
    st.sampled_from(sorted(ONE.to_json())) | st.text(max_size=8),
    json_values,
    st.sampled_from([None, EMPTY, ONE, TWO]),
)
def test_fuzz_one_field_replaced_in_a_signed_list(
    name: str, value: Any, current: RevocationList | None
) -> None:
    body = ONE.to_json()
    body[name] = value
    check_fuzzed(seal(canonical_json(body)), current)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["revoke", "block", "unblock"]), st.integers(0, 5)),
        max_size=12,
    )
)
def test_every_operation_yields_a_list_that_replaces_its_predecessor(
    steps: list[tuple[str, int]],
) -> None:
    current = EMPTY
    revoked: set[str] = set()
    for number, (action, pick) in enumerate(steps):
        now_ms = NOW + number
        name = f"gpu-{pick}"
        try:
            if action == "revoke":
                following = revoke_node(current, node(f"n-{number}", name), now_ms=now_ms)
                revoked.add(f"n-{number}")
            elif action == "block":
                following = block_name(current, name, now_ms=now_ms)
            else:
                following = unblock_name(current, name, now_ms=now_ms)
        except (RevocationConflict, RevocationNotFound):
            continue
        assert following.serial == current.serial + 1
        assert following.node_ids >= current.node_ids
        text = sign_revocations(following, CLUSTER)
        assert accept(current, text) == (following, "accepted")
        assert accept(following, sign_revocations(current, CLUSTER)) == (
            following,
            "ignored_not_newer",
        )
        current = following
    assert current.node_ids == revoked
    assert all(is_revoked(current, node_id) for node_id in revoked)
