"""The one translation of enrollment errors into Populi's tree (``populi_peer.errors``).

``enrollment`` is standalone: its errors carry a code, details and a kind, no HTTP status
or exit code. Populi translates them in one place; each row here is an error made by a
real enrollment call, with the status, exit code and branch it answered with before
enrollment had its own tree (when its errors were Populi errors themselves).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from enrollment.ca import cert_from_pem
from enrollment.errors import EnrollmentError, ErrorKind, TokenError
from enrollment.hints import verify_hint
from enrollment.keys import public_from_text, public_to_text
from enrollment.records import verify_record
from enrollment.revocation import (
    RevocationList,
    RevokedNode,
    revoke_node,
    unblock_name,
    verify_revocations,
)
from enrollment.signing import ReplayCache, verify_request
from enrollment.tokens import decode_token, redeem_token, token_envelope
from enrollment.tokens import validate_node_name as check_name
from populi_peer.agent.enrollment import TokenUsed
from populi_peer.agent.membership import Membership
from populi_peer.api.app import ApiApp, Route
from populi_peer.api.auth import Authenticator
from populi_peer.cli.main import main
from populi_peer.errors import (
    ENROLLMENT_KINDS,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PopuliError,
    RefusedError,
    Unauthenticated,
    enrollment_boundary,
    translate_enrollment,
)
from populi_peer.store import Store
from populi_peer.testing import VirtualClock
from support.members import node_member
from support.tokens import CP, HOUR, NOW, ROOT, mint


def _token(**overrides: Any) -> str:
    return mint(**{"token_id": bytes(16), "token_seed": bytes(range(32)), **overrides})[0]


def _revoked(name: str = "gpu-1", **overrides: Any) -> RevokedNode:
    args: dict[str, Any] = {
        "node_id": "n-1",
        "name": name,
        "reason": "stolen",
        "revoked_ms": NOW,
        "cert_serials": ("0a",),
    }
    args.update(overrides)
    return RevokedNode(**args)


_ONE = revoke_node(RevocationList.empty("home", now_ms=NOW), _revoked(), now_ms=NOW + 1)


def _unsigned_request() -> Any:
    return verify_request(
        headers={},
        method="GET",
        path="/v1/populi/status",
        query="",
        body=b"",
        my_node_id=CP,
        resolve_key=lambda _k: None,
        now_s=NOW / 1000,
        skew_s=300,
        replay_cache=ReplayCache(),
    )


#: label: (the enrollment call, its code, the branch, HTTP status) — every one exit 4.
CASES: dict[str, tuple[Callable[[], object], str, type[RefusedError], int]] = {
    "token-expired": (
        lambda: decode_token(_token(), now_ms=NOW + 2 * HOUR, skew_ms=0),
        "token_expired",
        RefusedError,
        400,
    ),
    "token-field": (lambda: _token(ttl_ms=0), "token_bad_field", BadRequest, 400),
    "token-wrong-recipient": (
        lambda: redeem_token(
            token_envelope(_token()),
            trusted_root=ROOT.public_key(),
            expected_cluster_id="home",
            recipient="n-cccccccccccccccc",
        ),
        "token_wrong_recipient",
        Forbidden,
        403,
    ),
    "node-name": (lambda: check_name("Not A Name"), "bad_node_name", BadRequest, 400),
    "signature-missing": (_unsigned_request, "signature_missing", Unauthenticated, 401),
    "certificate": (lambda: cert_from_pem(b"junk"), "certificate_malformed", RefusedError, 400),
    "public-key": (lambda: public_from_text("xyz"), "bad_public_key", RefusedError, 400),
    "revocation-conflict": (
        lambda: revoke_node(_ONE, _revoked(), now_ms=NOW + 2),
        "node_already_revoked",
        Conflict,
        409,
    ),
    "revocation-not-found": (
        lambda: unblock_name(_ONE, "gpu-7", now_ms=NOW + 2),
        "name_not_blocked",
        NotFound,
        404,
    ),
    "revocation-field": (
        lambda: _revoked(reason="a\tb"),
        "revocation_bad_field",
        BadRequest,
        400,
    ),
    "revocation-list": (
        lambda: verify_revocations("junk", cluster_key=ROOT.public_key(), cluster_id="home"),
        "revocation_malformed",
        RefusedError,
        400,
    ),
    "record": (lambda: verify_record("junk"), "record_malformed", RefusedError, 400),
    "hint": (
        lambda: verify_hint("junk", resolve_key=lambda _n: None),
        "hint_malformed",
        RefusedError,
        400,
    ),
}


def _raised(call: Callable[[], object]) -> EnrollmentError:
    with pytest.raises(EnrollmentError) as info:
        call()
    return info.value


@pytest.mark.parametrize("label", sorted(CASES))
def test_translation_keeps_code_status_exit_code_and_message(label: str) -> None:
    call, code, branch, status = CASES[label]
    original = _raised(call)
    assert not isinstance(original, PopuliError)  # standalone
    error = translate_enrollment(original)
    assert isinstance(error, branch) and isinstance(error, type(original))
    assert type(error).__name__ == type(original).__name__
    assert (error.code, error.http_status, error.exit_code) == (code, status, 4)
    assert str(error) == str(original) and error.details == original.details
    assert error.to_json() == {
        "code": code,
        "message": str(original),
        **({"details": original.details} if original.details else {}),
    }


def test_every_kind_has_a_branch() -> None:
    assert set(ENROLLMENT_KINDS) == set(ErrorKind)
    assert {kind: cls.http_status for kind, cls in ENROLLMENT_KINDS.items()} == {
        ErrorKind.REFUSED: 400,
        ErrorKind.BAD_INPUT: 400,
        ErrorKind.UNAUTHENTICATED: 401,
        ErrorKind.FORBIDDEN: 403,
        ErrorKind.NOT_FOUND: 404,
        ErrorKind.CONFLICT: 409,
    }


def test_fields_of_the_enrollment_error_survive() -> None:
    error = translate_enrollment(_raised(lambda: _token(ttl_ms=0)))
    assert isinstance(error, BadRequest) and isinstance(error, TokenError)
    assert error.field == "ttl_ms"  # type: ignore[attr-defined]
    assert error.details == {"field": "ttl_ms"}


def test_the_boundary_translates_enrollment_errors_only() -> None:
    with pytest.raises(Conflict) as info, enrollment_boundary():
        revoke_node(_ONE, _revoked(), now_ms=NOW + 2)
    assert isinstance(info.value.__cause__, EnrollmentError)
    assert not isinstance(info.value.__cause__, PopuliError)
    with pytest.raises(ValueError), enrollment_boundary():
        raise ValueError("not ours")
    refusal = NotFound("no such node")
    with pytest.raises(NotFound) as passed, enrollment_boundary():
        raise refusal
    assert passed.value is refusal


def test_a_class_that_is_both_is_left_as_it_is() -> None:
    used = TokenUsed("token already used", code="token_already_used")
    assert translate_enrollment(used) is used
    assert isinstance(used, TokenError) and isinstance(used, Conflict)
    assert (used.http_status, used.exit_code, used.kind) == (409, 4, ErrorKind.CONFLICT)


# -- where Populi meets enrollment ------------------------------------------------------


async def test_the_api_answers_an_untranslated_enrollment_error_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def refuse(_request: Any) -> dict[str, Any]:
        revoke_node(_ONE, _revoked(), now_ms=NOW + 2)
        return {}

    clock = VirtualClock()
    app = ApiApp(
        routes=[Route("GET", "/refuse", refuse, roles=None)],
        authenticator=Authenticator(
            node_id="n-cp",
            clock=clock,
            skew_s=30.0,
            lookup=lambda _keyid: None,  # no route here is signed
            is_revoked=lambda _keyid: False,
        ),
        clock=clock,
        max_body_bytes=1024,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        answer = await client.get("/refuse")
    assert answer.status_code == 409
    assert answer.json()["error"] == {
        "code": "node_already_revoked",
        "message": "node 'n-1' is already revoked (list serial 1)",
    }


def test_populi_join_with_a_bad_token_exits_4_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["join", "populi-join-2.junk", "--data-dir", str(tmp_path / "node")])
    err = capsys.readouterr().err
    assert code == 4
    assert err.startswith("populi: error: ") and err.count("\n") == 1


def test_a_bad_key_from_a_peer_is_a_populi_error(tmp_path: Path) -> None:
    """Membership caches a member's key: a key that does not parse is a refusal that the
    heartbeat's ``except PopuliError`` handles, not an error that ends the service."""
    store = Store.open(tmp_path, create=True)
    try:
        membership = Membership(store)
        member = replace(node_member("gpu-1", now_ms=0, node_id="n-1"), public_key="not-a-key")
        with pytest.raises(RefusedError) as info:
            membership.adopt(member)
        assert info.value.code == "bad_public_key"
        membership.adopt(replace(member, public_key=public_to_text(ROOT.public_key())))
        assert membership.principal("n-1") is not None
    finally:
        store.close()


def test_a_malformed_settings_record_from_a_peer_is_a_populi_error(tmp_path: Path) -> None:
    from populi_peer.agent.records import ClusterRecords

    store = Store.open(tmp_path, create=True)
    try:
        records = ClusterRecords(store, Membership(store))
        with pytest.raises(RefusedError) as info:
            records.offer_settings("populi-record-1.junk")
        assert info.value.code == "record_malformed"
    finally:
        store.close()


def test_json_of_details_is_unchanged() -> None:
    error = translate_enrollment(_raised(lambda: _token(ttl_ms=0)))
    assert json.loads(json.dumps(error.to_json()))["details"] == {"field": "ttl_ms"}
