"""Voters' issuer (intermediate) certificates: node certificates, join tokens and
revocation lists signed by an issuer verify against the root through the chain, each hop
checked (ADR 0018)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import (
    ISSUER_DAYS,
    Issuer,
    ca_pin,
    chain_from_pem,
    issue_intermediate,
    issuer_node_id,
    make_ca_certificate,
    make_issuer_certificate,
    make_issuer_request,
    make_node_certificate,
    verify_chain,
)
from enrollment.errors import CertificateError, TokenError
from enrollment.keys import node_id_for
from enrollment.revocation import (
    ISSUED_REVOCATIONS_PREFIX,
    RevocationList,
    RevokedNode,
    accept_newer,
    revoke_node,
    sign_revocations,
    verify_revocations,
)
from enrollment.tokens import (
    ISSUED_TOKEN_PREFIX,
    decode_token,
    mint_token,
    open_token,
    redeem_token,
)

NOW = 1_800_000_000.0
NOW_MS = int(NOW * 1000)
CLUSTER = "c-issuers"
ROOT = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ROOT_CERT = make_ca_certificate(
    root_key=ROOT, cluster_id=CLUSTER, cluster_name="t", now_wall_s=NOW - 86400, serial=1
)
VOTER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
VOTER = node_id_for(VOTER_KEY.public_key())
ISSUER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))


def voter_issuer(
    root_key: Ed25519PrivateKey, root_cert: x509.Certificate, now_wall_s: float = NOW - 3600
) -> x509.Certificate:
    """The voter's issuer certificate for :data:`ISSUER_KEY`, signed by ``root_key``."""
    return make_issuer_certificate(
        root_key=root_key,
        root_cert=root_cert,
        subject_key=ISSUER_KEY.public_key(),
        node_id=VOTER,
        cluster_id=CLUSTER,
        now_wall_s=now_wall_s,
        serial=2,
    )


ISSUER_CERT = voter_issuer(ROOT, ROOT_CERT)
NODE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(3, 35)))
NODE = node_id_for(NODE_KEY.public_key())


def leaf(signer: Ed25519PrivateKey = ISSUER_KEY, signer_cert: x509.Certificate = ISSUER_CERT):
    return make_node_certificate(
        ca_key=signer,
        ca_cert=signer_cert,
        subject_key=NODE_KEY.public_key(),
        principal_id=NODE,
        cluster_id=CLUSTER,
        addresses=["127.0.0.1"],
        now_wall_s=NOW,
        serial=3,
    )


def odd_issuer(*, ca: bool, path_length: int | None) -> x509.Certificate:
    """:data:`ISSUER_CERT` with other basic constraints, signed by the root."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(ISSUER_CERT.subject)
        .issuer_name(ISSUER_CERT.issuer)
        .public_key(ISSUER_KEY.public_key())
        .serial_number(9)
        .not_valid_before(ISSUER_CERT.not_valid_before_utc)
        .not_valid_after(ISSUER_CERT.not_valid_after_utc)
    )
    for extension in ISSUER_CERT.extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints):
            value = x509.BasicConstraints(ca=ca, path_length=path_length)
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(ROOT, algorithm=None)


def voter_revoked() -> RevocationList:
    """A revocation list naming the voter (and so its issuer)."""
    return revoke_node(
        RevocationList.empty(CLUSTER, now_ms=NOW_MS),
        RevokedNode(node_id=VOTER, name="voter", reason="stolen", revoked_ms=NOW_MS),
        now_ms=NOW_MS,
    )


def chain_refused(cert: x509.Certificate, chain: list[x509.Certificate], code: str, **kw: Any):
    with pytest.raises(CertificateError) as info:
        verify_chain(cert, chain, ROOT_CERT, now_wall_s=kw.pop("now", NOW), skew_s=300, **kw)
    assert info.value.code == code, str(info.value)
    return info.value


# --- certificate chains ---------------------------------------------------------------


def test_a_node_certificate_signed_by_an_issuer_verifies_through_it() -> None:
    info = verify_chain(leaf(), [ISSUER_CERT], ROOT_CERT, now_wall_s=NOW, skew_s=300)
    assert info.principal_id == NODE
    assert issuer_node_id(leaf()) == VOTER


def test_a_root_signed_node_certificate_still_verifies_without_a_chain() -> None:
    old = leaf(ROOT, ROOT_CERT)
    assert verify_chain(old, [], ROOT_CERT, now_wall_s=NOW, skew_s=300).principal_id == NODE
    assert issuer_node_id(old) is None


def test_an_issuer_signed_certificate_without_its_issuer_is_foreign() -> None:
    chain_refused(leaf(), [], "certificate_foreign")


@pytest.mark.parametrize(
    ("ca", "path_length", "code"),
    [
        (False, None, "issuer_not_ca"),
        (True, 1, "issuer_path_length"),
        (True, None, "issuer_path_length"),
    ],
)
def test_a_non_ca_or_wrong_path_length_issuer_is_refused(
    ca: bool, path_length: int | None, code: str
) -> None:
    bad = odd_issuer(ca=ca, path_length=path_length)
    chain_refused(leaf(ISSUER_KEY, bad), [bad], code)


def test_an_issuer_of_another_root_is_refused() -> None:
    other_root = Ed25519PrivateKey.generate()
    other_ca = make_ca_certificate(
        root_key=other_root, cluster_id=CLUSTER, cluster_name="t", now_wall_s=NOW, serial=1
    )
    foreign = voter_issuer(other_root, other_ca, now_wall_s=NOW)
    chain_refused(leaf(ISSUER_KEY, foreign), [foreign], "issuer_foreign")


def test_a_revoked_issuer_makes_every_certificate_it_signed_refused() -> None:
    lst = voter_revoked()
    chain_refused(leaf(), [ISSUER_CERT], "issuer_revoked", revoked=lst.revokes_certificate)


def test_an_expired_issuer_is_refused() -> None:
    chain_refused(leaf(), [ISSUER_CERT], "issuer_expired", now=NOW + (ISSUER_DAYS + 1) * 86400)


def test_a_chain_longer_than_one_issuer_is_refused() -> None:
    chain_refused(leaf(), [ISSUER_CERT, ISSUER_CERT], "certificate_chain_too_long")


def test_the_chain_pem_is_the_leaf_first_then_its_issuer() -> None:
    pem = Issuer(ISSUER_KEY, ISSUER_CERT, ROOT_CERT).chain_pem(leaf())
    assert chain_from_pem(pem) == [leaf(), ISSUER_CERT]
    assert Issuer(ROOT, None, ROOT_CERT).chain_pem(leaf(ROOT, ROOT_CERT)).count("BEGIN") == 1


# --- issuer requests: the key never leaves the voter -----------------------------------


def root_signs_request(cluster: str, expected: str | None) -> x509.Certificate:
    """The root signs the voter's issuer request for ``cluster``, expecting ``expected``."""
    request = make_issuer_request(issuer_key=ISSUER_KEY, node_id=VOTER, cluster_id=cluster)
    return issue_intermediate(
        root_key=ROOT,
        root_cert=ROOT_CERT,
        request=request,
        now_wall_s=NOW,
        serial=5,
        expected_node_id=expected,
    )


def test_the_root_signs_a_voters_request_for_its_own_key() -> None:
    cert = root_signs_request(CLUSTER, VOTER)
    assert cert.public_key() == ISSUER_KEY.public_key()
    assert (
        verify_chain(
            leaf(ISSUER_KEY, cert), [cert], ROOT_CERT, now_wall_s=NOW, skew_s=0
        ).principal_id
        == NODE
    )


@pytest.mark.parametrize(
    ("cluster", "expected", "code"),
    [
        ("c-other", None, "issuer_request_wrong_cluster"),
        (CLUSTER, NODE, "issuer_request_wrong_node"),
    ],
)
def test_a_request_for_another_cluster_or_node_is_refused(
    cluster: str, expected: str | None, code: str
) -> None:
    with pytest.raises(CertificateError) as info:
        root_signs_request(cluster, expected)
    assert info.value.code == code


# --- join tokens, version 3 ------------------------------------------------------------


def mint_issued(**kw: Any) -> str:
    args: dict[str, Any] = {
        "signing_key": ISSUER_KEY,
        "cluster_id": CLUSTER,
        "contacts": ["127.0.0.1:7431"],
        "recipients": [VOTER],
        "roles": ["worker"],
        "now_ms": NOW_MS,
        "ttl_ms": 3_600_000,
        "token_id": bytes(16),
        "token_seed": bytes(range(32)),
        "issuer": ISSUER_CERT,
        "root_key": ROOT.public_key(),
    }
    args.update(kw)
    return mint_token(**args)[0]


def test_an_issued_token_pins_the_root_and_verifies_for_joiner_and_control_plane() -> None:
    text = mint_issued()
    assert text.startswith(ISSUED_TOKEN_PREFIX)
    held = open_token(text, now_ms=NOW_MS, skew_ms=0)
    assert held.token.ca_pin == decode_token(text, now_ms=NOW_MS, skew_ms=0).ca_pin
    assert held.token.ca_pin == ca_pin(ROOT.public_key())  # the pin stays the root's
    token = redeem_token(
        held.envelope, trusted_root=ROOT.public_key(), expected_cluster_id=CLUSTER, recipient=VOTER
    )
    assert token.issuer is not None and token.version == 3


def test_an_issued_token_under_another_root_is_foreign() -> None:
    with pytest.raises(TokenError) as info:
        decode_token(
            mint_issued(),
            now_ms=NOW_MS,
            skew_ms=0,
            trusted_root=Ed25519PrivateKey.generate().public_key(),
        )
    assert info.value.code == "token_foreign_signer"


def test_a_token_from_a_revoked_issuer_is_refused() -> None:
    lst = voter_revoked()
    envelope = mint_issued().rsplit(".", 1)[0]
    with pytest.raises(TokenError) as info:
        redeem_token(
            envelope,
            trusted_root=ROOT.public_key(),
            expected_cluster_id=CLUSTER,
            recipient=VOTER,
            revoked=lst.revokes_certificate,
        )
    assert info.value.code == "token_bad_issuer"
    assert info.value.details["issuer_code"] == "issuer_revoked"


def test_a_token_signed_by_a_key_other_than_its_issuers_is_refused_when_minted() -> None:
    with pytest.raises(TokenError) as info:
        mint_issued(signing_key=Ed25519PrivateKey.generate())
    assert info.value.code == "issuer_key_mismatch"


def test_a_non_ca_issuer_cannot_carry_a_token() -> None:
    bad = odd_issuer(ca=False, path_length=None)
    with pytest.raises(TokenError) as info:
        mint_issued(issuer=bad)
    assert info.value.code == "issuer_not_ca"


# --- revocation lists, version 2 -------------------------------------------------------


def listing(serial_nodes: list[str]) -> RevocationList:
    lst = RevocationList.empty(CLUSTER, now_ms=NOW_MS)
    for node in serial_nodes:
        lst = revoke_node(
            lst,
            RevokedNode(node_id=node, name=f"x{len(lst.revoked)}", reason="r", revoked_ms=NOW_MS),
            now_ms=NOW_MS,
        )
    return lst


def test_an_issued_revocation_list_verifies_against_the_root() -> None:
    lst = listing([NODE])
    text = sign_revocations(lst, ISSUER_KEY, issuer=ISSUER_CERT)
    assert text.startswith(ISSUED_REVOCATIONS_PREFIX)
    assert verify_revocations(text, cluster_key=ROOT.public_key(), cluster_id=CLUSTER) == lst
    kept, outcome = accept_newer(None, text, cluster_key=ROOT.public_key(), cluster_id=CLUSTER)
    assert outcome == "accepted" and kept == lst


def test_a_list_from_an_issuer_the_current_list_revokes_is_ignored() -> None:
    current = listing([VOTER])
    newer = dataclasses.replace(listing([VOTER, NODE]), serial=current.serial + 1)
    text = sign_revocations(newer, ISSUER_KEY, issuer=ISSUER_CERT)
    kept, outcome = accept_newer(current, text, cluster_key=ROOT.public_key(), cluster_id=CLUSTER)
    assert outcome == "ignored_revoked_issuer" and kept is current


def test_a_list_signed_by_another_key_than_its_issuers_is_ignored() -> None:
    text = sign_revocations(listing([NODE]), Ed25519PrivateKey.generate(), issuer=ISSUER_CERT)
    _, outcome = accept_newer(None, text, cluster_key=ROOT.public_key(), cluster_id=CLUSTER)
    assert outcome == "ignored_bad_issuer"


def test_a_list_issued_after_its_issuer_expired_is_ignored() -> None:
    late = dataclasses.replace(listing([NODE]), issued_ms=NOW_MS + (ISSUER_DAYS + 1) * 86_400_000)
    text = sign_revocations(late, ISSUER_KEY, issuer=ISSUER_CERT)
    _, outcome = accept_newer(None, text, cluster_key=ROOT.public_key(), cluster_id=CLUSTER)
    assert outcome == "ignored_bad_issuer"
