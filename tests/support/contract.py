"""Validate every API response a test receives against the OpenAPI document.

``openapi-core`` checks status, content type and body schema for the operation the request
matched; an undocumented route or status fails the test. Every 200 answer is also parsed
with the typed message the catalogue (``populi_peer.core.messages.OPERATIONS``) names for
its operation, so a type stricter than what the agent really answers fails too.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

from populi_peer.core.messages import OPERATIONS

CONTRACT = (
    Path(__file__).resolve().parents[2] / "contracts" / "populi" / "control-plane.openapi.yaml"
)


@functools.lru_cache(maxsize=1)
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(CONTRACT))


class _Request:
    def __init__(self, request: httpx.Request) -> None:
        self._request = request
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(request.url.params.multi_items())),
            header=Headers(dict(request.headers)),
            cookie=ImmutableMultiDict(),
        )

    @property
    def host_url(self) -> str:
        return "https://127.0.0.1:7431"

    @property
    def path(self) -> str:
        return self._request.url.path

    @property
    def method(self) -> str:
        return self._request.method.lower()

    @property
    def body(self) -> bytes | None:
        return self._request.content or None

    @property
    def content_type(self) -> str:
        return self._request.headers.get("content-type", "application/json").lower()


class _Response:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def content_type(self) -> str:
        return self._response.headers.get("content-type", "").lower()

    @property
    def headers(self) -> Any:
        return Headers(dict(self._response.headers))

    @property
    def data(self) -> bytes:
        return self._response.content


@functools.lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The contract, parsed once (read it, never change it)."""
    with CONTRACT.open(encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    assert isinstance(loaded, dict)
    return loaded


@functools.lru_cache(maxsize=1)
def _operation_paths() -> list[tuple[str, re.Pattern[str], str]]:
    """(METHOD, path regex, operationId), in the document's order (which is the route
    table's: a specific path before the template that would also match it)."""
    found = []
    for path, item in document()["paths"].items():
        regex = re.compile("^" + re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(path)) + "$")
        for method, operation in item.items():
            if isinstance(operation, dict) and "operationId" in operation:
                found.append((method.upper(), regex, operation["operationId"]))
    return found


def operation_of(request: httpx.Request) -> str | None:
    for method, regex, operation in _operation_paths():
        if method == request.method and regex.match(request.url.path):
            return operation
    return None


def parse_answer(request: httpx.Request, response: httpx.Response) -> None:
    """Parse a 200 answer with its operation's typed message (raises if it does not)."""
    operation = operation_of(request)
    if response.status_code != 200 or operation is None:
        return
    OPERATIONS[operation].answer.from_json(response.json())


def validate(request: httpx.Request, response: httpx.Response) -> None:
    """Raise if ``response`` does not match the contract for ``request``, or its typed
    message does not take it."""
    openapi().validate_response(_Request(request), _Response(response))
    parse_answer(request, response)


def validate_request(request: httpx.Request) -> None:
    openapi().validate_request(_Request(request))


async def async_hook(response: httpx.Response) -> None:
    await response.aread()
    validate(response.request, response)


def sync_hook(response: httpx.Response) -> None:
    response.read()
    validate(response.request, response)
