from __future__ import annotations

import json

import httpx
import pytest
from trio.testing import MockClock

from enrollment.signing import HEADER_INPUT
from populi_peer.agent.agent import Agent
from support.clients import signed_client, unsigned_client
from support.contract import validate


async def test_health_needs_no_signature(autojump_clock: MockClock, virtual_agent: Agent) -> None:
    async with unsigned_client(virtual_agent) as client:
        response = await client.get("/v1/populi/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["v"] == 1
    assert int(response.headers["populi-server-time-ms"]) == body["server_time_ms"]


async def test_status_without_signature_is_401(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with unsigned_client(virtual_agent) as client:
        response = await client.get("/v1/populi/status")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "signature_missing"
    # RFC 9110 §11.6.1: a 401 names the scheme that would authenticate, here for this node.
    assert response.headers["www-authenticate"] == (
        f'Populi-Signature realm="populi", node="{virtual_agent.node_id}"'
    )


async def test_signed_status_answers_with_cluster_and_term(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent) as client:
        response = await client.get("/v1/populi/status")
    assert response.status_code == 200
    body = response.json()
    assert body["cluster"]["name"] == "lab"
    assert body["term"] == 1
    assert body["control_plane"]["is_self"] is True
    assert body["node"]["id"] == virtual_agent.node_id


async def test_replayed_signed_request_is_refused(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent) as client:
        first = await client.get("/v1/populi/status")
        assert first.status_code == 200
        replay = first.request
        # Send the very same signed request again, bypassing the signer.
        again = await client.send(
            httpx.Request(replay.method, replay.url, headers=replay.headers), auth=None
        )
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "signature_replayed"


async def test_correlation_id_is_echoed(autojump_clock: MockClock, virtual_agent: Agent) -> None:
    async with unsigned_client(virtual_agent) as client:
        response = await client.get(
            "/v1/populi/health", headers={"populi-correlation-id": "abc-123"}
        )
    assert response.headers["populi-correlation-id"] == "abc-123"


async def test_node_credential_on_operator_route_is_403(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(
        virtual_agent, credential=virtual_agent.certificates.identity.node_credential
    ) as client:
        response = await client.post(
            "/v1/populi/admin/settings", json={"changes": {"kill_switch": True}}
        )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "role_required"


async def test_settings_change_is_signed_validated_and_versioned(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent) as client:
        before = (await client.get("/v1/populi/settings")).json()["settings"]
        response = await client.post(
            "/v1/populi/admin/settings", json={"changes": {"max_lease_ttl_s": 60}}
        )
        assert response.status_code == 200
        after = response.json()["settings"]
        bad = await client.post(
            "/v1/populi/admin/settings", json={"changes": {"max_lease_ttl_s": 1e9}}
        )
        unknown = await client.post("/v1/populi/admin/settings", json={"changes": {"nope": 1}})
    assert after["serial"] == before["serial"] + 1
    assert after["values"]["max_lease_ttl_s"] == 60.0
    assert after["signer"] == virtual_agent.node_id
    assert after["actor"] == virtual_agent.certificates.identity.operator.principal_id
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_setting"
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_setting"
    assert virtual_agent.records.settings["max_lease_ttl_s"] == 60.0


async def test_malformed_json_is_400_with_json_error(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent) as client:
        response = await client.post(
            "/v1/populi/admin/settings",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        array = await client.post(
            "/v1/populi/admin/settings",
            content=b"[1]",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_json"
    assert array.status_code == 400


async def test_body_over_the_limit_is_413(autojump_clock: MockClock, virtual_agent: Agent) -> None:
    limit = virtual_agent.config.api.max_body_bytes
    payload = json.dumps({"changes": {"x": "a" * (limit + 10)}}).encode()
    async with signed_client(virtual_agent) as client:
        response = await client.post(
            "/v1/populi/admin/settings",
            content=payload,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_unknown_route_and_wrong_method(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent, validate=False) as client:
        missing = await client.get("/v1/populi/nothing")
        wrong = await client.delete("/v1/populi/status")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_route"
    assert wrong.status_code == 405
    # RFC 9110 §15.5.6: a 405 says which methods the path takes.
    assert wrong.headers["allow"] == "GET"
    assert "allow" not in missing.headers


async def test_tampered_signature_header_is_401(
    autojump_clock: MockClock, virtual_agent: Agent
) -> None:
    async with signed_client(virtual_agent) as client:
        request = client.build_request("GET", "/v1/populi/status")
        signed = next(client.auth.auth_flow(request))
        signed.headers[HEADER_INPUT] = signed.headers[HEADER_INPUT].replace("v=1", "v=9")
        response = await client.send(signed, auth=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "signature_unsupported_version"
    assert response.headers["www-authenticate"].startswith("Populi-Signature ")


def test_contract_rejects_an_undocumented_answer() -> None:
    request = httpx.Request("GET", "https://x/v1/populi/health")
    response = httpx.Response(
        200,
        json={"v": 1, "server_time_ms": 1},
        headers={"content-type": "application/json"},
        request=request,
    )
    with pytest.raises(Exception):  # noqa: B017 - any validation error will do
        validate(request, response)
