"""Routes that declare their body types: the app parses the request before the handler
runs (a malformed body is a 400 naming the field, and the handler never sees it) and
writes the typed answer; routes without types keep working as before."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from populi_peer import PROTOCOL_VERSION
from populi_peer.api.app import ApiApp, Request, Response, Route
from populi_peer.core.messages import (
    OPERATIONS,
    HeartbeatReport,
    RenewRequest,
    SettingsPushAnswer,
    SettingsPushRequest,
)
from populi_peer.testing import VirtualClock
from support.apps import open_routes_app

Seen = list[Any]


def _app(seen: Seen) -> ApiApp:
    async def push(request: Request) -> SettingsPushAnswer:
        body = request.message(SettingsPushRequest)
        seen.append(body)
        return SettingsPushAnswer(settings_serial=len(body.record), installed=True)

    async def renew(request: Request) -> SettingsPushAnswer:
        seen.append(request.message(RenewRequest))
        return SettingsPushAnswer(settings_serial=0, installed=False)

    async def report(request: Request) -> dict[str, Any]:
        seen.append(request.message(HeartbeatReport))
        return {"ok": True}

    async def untyped(request: Request) -> dict[str, Any]:
        seen.append(request.json())
        return {"echo": request.json()}

    async def wrong_answer(request: Request) -> dict[str, Any]:
        return {"settings_serial": 1, "installed": True}  # a dict where the route says a type

    async def wrong_request(request: Request) -> Response:
        request.message(SettingsPushRequest)  # the route parses a RenewRequest
        return Response(204, {})

    def route(method: str, path: str, handler: Any, **types: Any) -> Route:
        return Route(method, path, handler, roles=None, name=path.strip("/"), **types)

    clock = VirtualClock()
    return open_routes_app(
        [
            route("POST", "/push", push, request=SettingsPushRequest, answer=SettingsPushAnswer),
            route("POST", "/renew", renew, request=RenewRequest, answer=SettingsPushAnswer),
            route("POST", "/report", report, request=HeartbeatReport),
            route("POST", "/untyped", untyped),
            route("POST", "/wrong-answer", wrong_answer, answer=SettingsPushAnswer),
            route("POST", "/wrong-request", wrong_request, request=RenewRequest),
        ],
        clock=clock,
        max_body_bytes=1 << 16,
    )


async def _post(app: ApiApp, path: str, content: bytes) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://n-x.test"
    ) as client:
        return await client.post(path, content=content)


async def test_a_typed_route_takes_the_parsed_message_and_answers_its_type(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: Seen = []
    answer = await _post(_app(seen), "/push", b'{"v": 1, "record": "abc", "later": 1}')
    assert answer.status_code == 200
    assert seen == [SettingsPushRequest(record="abc")]
    body = answer.json()
    assert body["v"] == PROTOCOL_VERSION and "server_time_ms" in body
    assert SettingsPushAnswer.from_json(body) == SettingsPushAnswer(
        settings_serial=3, installed=True
    )


@pytest.mark.parametrize(
    ("content", "status", "code", "field"),
    [
        (b'{"record": 5}', 400, "bad_request", "record"),
        (b'{"record": ""}', 400, "bad_request", "record"),
        (b"{}", 400, "bad_request", "record"),
        (b"", 400, "bad_json", None),
        (b"[1]", 400, "bad_json", None),
        (b'{"record": NaN}', 400, "bad_json", None),
    ],
)
async def test_a_malformed_body_is_refused_before_the_handler_runs(
    autojump_clock: trio.testing.MockClock,
    content: bytes,
    status: int,
    code: str,
    field: str | None,
) -> None:
    seen: Seen = []
    answer = await _post(_app(seen), "/push", content)
    error = answer.json()["error"]
    assert (answer.status_code, error["code"]) == (status, code), error
    if field is not None:
        assert error["details"]["field"] == field and f"'{field}'" in error["message"]
    assert seen == []


async def test_an_empty_body_is_the_defaults_where_no_field_is_required(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: Seen = []
    answer = await _post(_app(seen), "/renew", b"")
    assert answer.status_code == 200 and seen == [RenewRequest(before_start=False)]


async def test_a_core_records_refusal_keeps_its_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A register write parsed by RegisterWrite itself: a self write stamped by another
    node is 403 writer_not_allowed, as the core says, not a generic 400."""
    write = (
        b'{"node_id": "n1", "attribute": "gpu_quarantine/GPU-1", "value": {"quarantined": true},'
        b' "stamp": {"term": 1, "hlc": {"wall_ms": 1, "counter": 0}, "writer": "n2"},'
        b' "writer_class": "self", "actor": "n1", "reason": "", "at_wall_ms": 1}'
    )
    seen: Seen = []
    answer = await _post(_app(seen), "/report", b'{"registers": [' + write + b"]}")
    error = answer.json()["error"]
    assert (answer.status_code, error["code"]) == (403, "writer_not_allowed")
    assert error["details"]["field"] == "registers[0]" and seen == []


async def test_untyped_routes_work_as_before(autojump_clock: trio.testing.MockClock) -> None:
    seen: Seen = []
    answer = await _post(_app(seen), "/untyped", b'{"a": [1]}')
    assert answer.status_code == 200 and answer.json()["echo"] == {"a": [1]}


@pytest.mark.parametrize("path", ["/wrong-answer", "/wrong-request"])
async def test_a_handler_that_breaks_its_routes_types_is_an_internal_error(
    autojump_clock: trio.testing.MockClock, path: str
) -> None:
    answer = await _post(_app([]), path, b"{}")
    assert (answer.status_code, answer.json()["error"]["code"]) == (500, "internal_error")


def test_a_catalogued_route_takes_its_body_types_from_the_catalogue() -> None:
    async def handler(request: Request) -> Response:
        return Response(204, {})

    grant = Route("POST", "/grant", handler, frozenset({"submit"}), "lease_grant")
    listing = Route("GET", "/list", handler, None, "lease_list")
    assert (grant.request, grant.answer) == (
        OPERATIONS["lease_grant"].request,
        OPERATIONS["lease_grant"].answer,
    )
    assert (grant.roles, grant.name) == (frozenset({"submit"}), "lease_grant")
    assert (listing.request, listing.answer) == (None, OPERATIONS["lease_list"].answer)
    # Given again, a type must be the catalogue's (a programming error otherwise).
    same = Route("POST", "/grant", handler, None, "lease_grant", answer=grant.answer)
    assert same.answer is grant.answer
    with pytest.raises(ValueError, match="lease_grant"):
        Route("POST", "/grant", handler, None, "lease_grant", answer=listing.answer)
    # An operation the catalogue does not list keeps what it is given.
    other = Route("GET", "/x", handler, None, "not_an_operation")
    assert (other.request, other.answer) == (None, None)
