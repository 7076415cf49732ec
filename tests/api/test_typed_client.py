"""The peer client's typed calls: ``answer=T`` parses the answer once; anything malformed
(a missing field, a wrong type, not JSON, not an object) is ``PeerError`` with
``bad_peer_answer`` naming the peer and the field, never a KeyError or TypeError. The peer
is an ``httpx.MockTransport`` playing another host."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from populi_peer.api.client import PeerClient, SyncPeerClient
from populi_peer.core.fencing import FencingToken
from populi_peer.core.messages import LeaseAnswer, LeaseGrantRequest, LeaseView
from populi_peer.errors import Conflict, PeerError
from populi_peer.identity import Credential
from populi_peer.testing import VirtualClock

LEASE: dict[str, Any] = {
    "lease_id": "l-1",
    "task_key": "task:t-1",
    "task_id": "t-1",
    "attempt": 1,
    "work_class": "agent",
    "holder": "w1",
    "submitter": "s1",
    "gpus": [],
    "token": "3.7",
    "ttl_s": 30.0,
    "state": "live",
    "kind": "remote",
    "granted_wall_ms": 1,
    "state_changed_wall_ms": 1,
    "reason": "",
    "expires_in_s": 12.5,
    "flag": None,
}


def _transport(
    body: bytes, status: int = 200, seen: list[httpx.Request] | None = None
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    return httpx.MockTransport(handle)


def _credential() -> Credential:
    return Credential(principal_id="n-caller", key=Ed25519PrivateKey.generate())


#: The call both clients make: a lease, read as a typed answer.
LEASE_CALL: dict[str, Any] = {
    "url": "https://cp.test",
    "node_id": "n-cp",
    "method": "GET",
    "path": "/v1/populi/exec/leases/l-1",
    "answer": LeaseAnswer,
}


async def _call(
    body: bytes, *, status: int = 200, seen: list[httpx.Request] | None = None
) -> LeaseAnswer:
    client = PeerClient(
        credential=_credential(),
        clock=VirtualClock(),
        transport=_transport(body, status, seen),
        timeout_s=5.0,
    )
    try:
        return await client.call(**LEASE_CALL)
    finally:
        await client.aclose()


def _envelope(**body: Any) -> bytes:
    return json.dumps({"v": 1, "server_time_ms": 5, **body}).encode()


async def test_a_typed_answer_is_parsed_once(autojump_clock: trio.testing.MockClock) -> None:
    answer = await _call(_envelope(lease=LEASE))
    assert isinstance(answer.lease, LeaseView)
    assert answer.lease.lease.token == FencingToken(3, 7)
    assert answer.lease.expires_in_s == 12.5


def _spoiled(path: list[Any], value: Any = None, *, drop: bool = False) -> bytes:
    lease: Any = json.loads(json.dumps(LEASE))
    target = lease
    for key in path[:-1]:
        target = target[key]
    if drop:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return _envelope(lease=lease)


MALFORMED: list[tuple[str, bytes, str | None]] = [
    ("no-lease", _envelope(), "lease"),
    ("lease-list", _envelope(lease=[LEASE]), "lease"),
    ("token-missing", _spoiled(["token"], drop=True), "lease"),
    ("token-number", _spoiled(["token"], 3.7), "lease"),
    ("token-text", _spoiled(["token"], "3.07"), "lease"),
    ("state-unknown", _spoiled(["state"], "zombie"), "lease"),
    ("gpus-string", _spoiled(["gpus"], "GPU-1"), "lease"),
    ("expires-text", _spoiled(["expires_in_s"], "soon"), "lease.expires_in_s"),
    ("flag-unknown", _spoiled(["flag"], "purple"), "lease.flag"),
    ("not-json", b"<html>502</html>", None),
    ("json-list", b"[1, 2]", None),
    ("truncated", _envelope(lease=LEASE)[:40], None),
    ("deep", b"[" * 100_000 + b"]" * 100_000, None),
]


@pytest.mark.parametrize(("label", "body", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_a_malformed_answer_is_a_peer_error_naming_the_field(
    autojump_clock: trio.testing.MockClock, label: str, body: bytes, field: str | None
) -> None:
    with pytest.raises(PeerError) as raised:
        await _call(body)
    error = raised.value
    assert error.code == "bad_peer_answer" and "n-cp" in str(error)
    assert "\n" not in str(error)
    if field is not None:
        assert error.details["field"].startswith(field), error.details
        assert "GET /v1/populi/exec/leases/l-1" in str(error)


async def test_a_refusal_is_still_the_peers_error(autojump_clock: trio.testing.MockClock) -> None:
    refusal = _envelope(
        error={"code": "lease_refused", "message": "no", "details": {"reasons": ["x"]}}
    )
    with pytest.raises(Conflict) as raised:
        await _call(refusal, status=409)
    assert raised.value.code == "lease_refused"


async def test_a_message_payload_is_sent_as_its_json(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[httpx.Request] = []
    grant = LeaseGrantRequest(
        task_id="t-1", attempt=1, work_class="agent", target="w1", gpus_wanted=0, ttl_s=30.0
    )
    client = PeerClient(
        credential=_credential(),
        clock=VirtualClock(),
        transport=_transport(_envelope(lease=LEASE), seen=seen),
        timeout_s=5.0,
    )
    try:
        await client.call(
            url="https://cp.test",
            node_id="n-cp",
            method="POST",
            path="/v1/populi/exec/leases",
            payload=grant,
            answer=LeaseAnswer,
        )
    finally:
        await client.aclose()
    sent = json.loads(seen[0].content)
    assert sent == {"v": 1, **grant.to_json()}
    assert LeaseGrantRequest.from_json(sent) == grant


SyncCall = Callable[[bytes], LeaseAnswer]


def _sync_call(body: bytes) -> LeaseAnswer:
    client = SyncPeerClient(
        credential=_credential(), clock=_WallClock(), transport=_transport(body), timeout_s=5.0
    )
    try:
        return client.call(**LEASE_CALL)
    finally:
        client.close()


class _WallClock:
    def wall(self) -> float:
        return 1_700_000_000.0

    def mono(self) -> float:
        return 0.0


def test_the_sync_client_parses_the_same_way() -> None:
    assert _sync_call(_envelope(lease=LEASE)).lease.lease.task_id == "t-1"
    with pytest.raises(PeerError) as raised:
        _sync_call(_spoiled(["attempt"], "one"))
    assert raised.value.code == "bad_peer_answer"
    assert raised.value.details["field"] == "lease.attempt"
