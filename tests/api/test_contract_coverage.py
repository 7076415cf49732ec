"""The OpenAPI contract covers exactly the routes the agent serves.

The contract validator (``support.contract``) checks every answer a test receives, but only
for routes some test calls; these tests compare the document with a real agent's route
table, so that a route added without documentation (or documentation left behind by a
removed route) fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

from populi_peer.agent.agent import Agent
from populi_peer.agent.nodes import LIFECYCLE_ACTIONS
from populi_peer.api.app import Route
from populi_peer.cluster import InitResult
from populi_peer.config import Config
from populi_peer.core.messages import OPERATIONS, HeartbeatAnswer, HeartbeatReport
from populi_peer.testing import VirtualClock
from populi_peer.testing.cluster import open_virtual_agent
from support import contract
from support.clients import signed_client
from support.contract import CONTRACT
from support.messages import resolve

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return contract.document()


@pytest.fixture
async def routes(cluster_dir: tuple[Path, InitResult]) -> AsyncIterator[list[Route]]:
    """The route table of a real agent (built, not run: no clock is read)."""
    agent = Agent(
        data_dir=cluster_dir[0],
        config=Config(),
        clock=VirtualClock(),
        serve=False,
        url="https://cp.virtual",
    )
    try:
        yield agent.app.route_table()
    finally:
        await agent.peers.aclose()
        agent.store.close()


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation object, for every operation in the document."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                found[(method.upper(), path)] = item[method]
    return found


def served(routes: list[Route]) -> dict[tuple[str, str], Route]:
    table: dict[tuple[str, str], Route] = {}
    for route in routes:
        key = (route.method, route.pattern)
        assert key not in table, f"the app serves {route.method} {route.pattern} twice"
        table[key] = route
    return table


def test_document_is_valid_openapi_3_1() -> None:
    spec, _ = read_from_filename(str(CONTRACT))
    assert str(spec["openapi"]).startswith("3.1.")
    validate(spec)  # raises on an invalid document


async def test_every_served_route_is_documented(
    document: dict[str, Any], routes: list[Route]
) -> None:
    missing = sorted(set(served(routes)) - set(operations(document)))
    assert not missing, f"served but not in {CONTRACT.name}: {missing}"


async def test_every_documented_operation_is_served(
    document: dict[str, Any], routes: list[Route]
) -> None:
    stale = sorted(set(operations(document)) - set(served(routes)))
    assert not stale, f"in {CONTRACT.name} but not served: {stale}"


async def test_unauthenticated_operations_are_exactly_the_open_routes(
    document: dict[str, Any], routes: list[Route]
) -> None:
    default_security = document.get("security", [])
    open_in_document = {
        key
        for key, operation in operations(document).items()
        if operation.get("security", default_security) == []
    }
    open_in_app = {key for key, route in served(routes).items() if route.roles is None}
    assert open_in_document == open_in_app


async def test_operation_ids_are_route_names(document: dict[str, Any], routes: list[Route]) -> None:
    documented = operations(document)
    mismatched = {
        key: (documented[key].get("operationId"), route.name)
        for key, route in served(routes).items()
        if key in documented and documented[key].get("operationId") != route.name
    }
    assert not mismatched, f"operationId differs from the route name: {mismatched}"


async def test_declared_body_types_are_the_catalogues(routes: list[Route]) -> None:
    """Every route served names an operation of the catalogue (whose schemas
    tests/core/test_messages_contract.py holds to the contract) and parses and answers
    exactly its body types; the heartbeat, converted first, has both."""
    declared = {route.name: route for route in routes}
    for name, route in declared.items():
        exchange = OPERATIONS[name]
        assert route.request is exchange.request, f"{name} parses {route.request}"
        assert route.answer is exchange.answer, f"{name} answers {route.answer}"
    heartbeat = declared["heartbeat"]
    assert (heartbeat.request, heartbeat.answer) == (HeartbeatReport, HeartbeatAnswer)


def test_every_operation_documents_success_and_errors(document: dict[str, Any]) -> None:
    for (method, path), operation in operations(document).items():
        responses = operation.get("responses", {})
        assert "200" in responses, f"{method} {path} documents no 200 answer"
        assert "default" in responses, f"{method} {path} documents no default (error) answer"
        summary = operation.get("summary", "")
        assert "Roles:" in summary, (
            f"{method} {path}: the summary should say which roles may call it"
        )


async def test_documented_path_values_reach_their_route(
    document: dict[str, Any], routes: list[Route]
) -> None:
    """Each value a path parameter's enum documents is routed by the app to that operation
    (not to an earlier, more specific route), and the lifecycle actions are the handler's."""
    compiled = [(route.compile(), route) for route in routes]
    checked = 0
    for (method, path), operation in operations(document).items():
        for entry in operation.get("parameters", []):
            parameter = resolve(entry)
            schema = resolve(parameter.get("schema", {}))
            if parameter.get("in") != "path" or "enum" not in schema:
                continue
            if path == "/v1/populi/admin/nodes/{node}/{action}":
                assert set(schema["enum"]) == set(LIFECYCLE_ACTIONS)
            for value in schema["enum"]:
                concrete = path.replace("{" + parameter["name"] + "}", value)
                concrete = concrete.replace("{", "").replace("}", "")
                first = next(
                    route
                    for regex, route in compiled
                    if route.method == method and regex.match(concrete)
                )
                assert first.pattern == path, (
                    f"{method} {concrete} reaches {first.pattern}, not {path}"
                )
                checked += 1
    assert checked >= len(LIFECYCLE_ACTIONS)


async def test_answers_that_changed_are_documented(
    cluster_dir: tuple[Path, InitResult], autojump_clock: trio.testing.MockClock
) -> None:
    """Answers whose shape changed since the contract was first written, each checked
    against the document by the signed client: token revoke answers ``summary``; task
    answers carry environment names, never values; task output carries
    ``latest_attempt``; an unknown lease is 404 ``lease_not_found``."""
    # A URL with a port, so that join tokens can carry it as their contact.
    async with (
        open_virtual_agent(cluster_dir[0], url="https://cp.virtual:443") as agent,
        signed_client(agent) as client,
    ):
        created = (await client.post("/v1/populi/admin/tokens", json={})).json()
        token_id = created["summary"]["token_id"]
        revoked = await client.post(f"/v1/populi/admin/tokens/{token_id}/revoke")
        again = await client.post(f"/v1/populi/admin/tokens/{token_id}/revoke")
        # Times out before it is placed: no process starts.
        submitted = await client.post(
            "/v1/populi/tasks",
            json={"command": ["true"], "env": {"API_KEY": "hunter2"}, "timeout_s": 1e-300},
        )
        task_id = submitted.json()["task"]["task_id"]
        shown = await client.get(f"/v1/populi/tasks/{task_id}", params={"wait_s": 5})
        output = await client.get(f"/v1/populi/tasks/{task_id}/output")
        lease = await client.get("/v1/populi/exec/leases/l-0000")
    assert revoked.status_code == 200 and revoked.json()["summary"]["state"] == "revoked"
    assert again.json()["summary"]["revoked_ms"] == revoked.json()["summary"]["revoked_ms"]
    assert submitted.json()["task"]["env"] == [["API_KEY", "…"]]
    assert "hunter2" not in submitted.text + shown.text
    assert shown.json()["task"]["state"] == "timed_out"
    assert output.json()["latest_attempt"] == 0 and output.json()["attempt"] == 0
    assert (lease.status_code, lease.json()["error"]["code"]) == (404, "lease_not_found")
