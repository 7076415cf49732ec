"""Validate every API response a test receives against the OpenAPI document.

``openapi-core`` checks status, content type and body schema for the operation the request
matched; an undocumented route or status fails the test.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

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


def validate(request: httpx.Request, response: httpx.Response) -> None:
    """Raise if ``response`` does not match the contract for ``request``."""
    openapi().validate_response(_Request(request), _Response(response))


def validate_request(request: httpx.Request) -> None:
    openapi().validate_request(_Request(request))


async def async_hook(response: httpx.Response) -> None:
    await response.aread()
    validate(response.request, response)


def sync_hook(response: httpx.Response) -> None:
    response.read()
    validate(response.request, response)
