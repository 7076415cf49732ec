"""The signing peer client.

Requests are signed by an ``httpx.Auth`` (:class:`SignedAuth`), so the same code signs for
the async agent client and the sync CLI client. Transports are a seam: the agent uses
httpx's HTTP transport with the cluster TLS context; tests and the virtual cluster pass
``httpx.ASGITransport`` or a fault-injecting transport.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Generator
from typing import Any

import httpx

from enrollment.signing import sign_request
from populi_peer import PROTOCOL_VERSION
from populi_peer.clock import Clock
from populi_peer.errors import (
    AgentUnavailable,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PeerError,
    PopuliError,
    RateLimited,
    RefusedError,
    Unauthenticated,
)
from populi_peer.identity import Credential
from populi_peer.log import correlation_id

_STATUS_ERRORS: dict[int, type[PopuliError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
}


class SignedAuth(httpx.Auth):
    """Signs one request for ``recipient`` with ``credential``."""

    requires_request_body = True

    def __init__(self, credential: Credential, recipient: str, clock: Clock) -> None:
        self.credential = credential
        self.recipient = recipient
        self.clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        headers = sign_request(
            key=self.credential.key,
            keyid=self.credential.principal_id,
            recipient=self.recipient,
            method=request.method,
            path=request.url.path,
            query=request.url.query.decode("ascii"),
            body=request.content,
            created_s=int(self.clock.wall()),
            nonce=secrets.token_bytes(16),
        )
        request.headers.update(headers)
        cid = correlation_id.get()
        if cid:
            request.headers["populi-correlation-id"] = cid
        yield request


def encode_body(payload: dict[str, Any] | None) -> bytes:
    if payload is None:
        return b""
    return json.dumps({"v": PROTOCOL_VERSION, **payload}, separators=(",", ":")).encode("utf-8")


def decode_response(response: httpx.Response, *, peer: str) -> dict[str, Any]:
    """The JSON body of a 2xx answer, or the matching :class:`PopuliError`."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise PeerError(
            f"{peer} answered HTTP {response.status_code} without a JSON body",
            code="bad_peer_answer",
        )
    if response.is_success:
        return body
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    message = str(error.get("message") or f"HTTP {response.status_code}")
    code = str(error.get("code") or "peer_error")
    raw_details = error.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = RefusedError if 400 <= response.status_code < 500 else PeerError
    exc = cls(message, code=code, **details)
    exc.details.setdefault("http_status", response.status_code)
    raise exc


def transport_error(exc: Exception, *, peer: str, url: str) -> PopuliError:
    if isinstance(exc, httpx.ConnectError):
        return AgentUnavailable(
            f"cannot connect to {peer} at {url}: {exc or 'connection refused'}",
            code="peer_unreachable",
        )
    if isinstance(exc, httpx.TimeoutException):
        return PeerError(f"{peer} at {url} did not answer in time", code="peer_timeout")
    return PeerError(
        f"request to {peer} at {url} failed: {type(exc).__name__}: {exc}", code="peer_unreachable"
    )


class PeerClient:
    """Async, signing client for node-to-node calls."""

    def __init__(
        self,
        *,
        credential: Credential,
        clock: Clock,
        transport: httpx.AsyncBaseTransport,
        timeout_s: float,
    ) -> None:
        self.credential = credential
        self.clock = clock
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(
        self,
        *,
        url: str,
        node_id: str,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        body = encode_body(payload)
        headers = {"content-type": "application/json"} if payload is not None else {}
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            response = await self._client.request(
                method,
                url.rstrip("/") + path,
                content=body,
                params=params,
                headers=headers,
                auth=SignedAuth(self.credential, node_id, self.clock),
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, peer=node_id, url=url) from exc
        return decode_response(response, peer=node_id)


class SyncPeerClient:
    """Blocking variant for the CLI."""

    def __init__(
        self,
        *,
        credential: Credential,
        clock: Clock,
        verify: Any,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.credential = credential
        self.clock = clock
        if transport is not None:
            self._client = httpx.Client(transport=transport, timeout=timeout_s)
        else:
            self._client = httpx.Client(verify=verify, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def call(
        self,
        *,
        url: str,
        node_id: str,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        body = encode_body(payload)
        headers = {"content-type": "application/json"} if payload is not None else {}
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            response = self._client.request(
                method,
                url.rstrip("/") + path,
                content=body,
                params=params,
                headers=headers,
                auth=SignedAuth(self.credential, node_id, self.clock),
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, peer=node_id, url=url) from exc
        return decode_response(response, peer=node_id)


__all__ = [
    "PeerClient",
    "SignedAuth",
    "SyncPeerClient",
    "decode_response",
    "encode_body",
    "transport_error",
]
