"""The signing peer client.

Requests are signed by an ``httpx.Auth`` (:class:`SignedAuth`), so the same code signs for
the async agent client and the sync CLI client. Transports are a seam: the agent uses
:class:`PeerTransport` with the cluster TLS context; tests and the virtual cluster pass
``httpx.ASGITransport`` or a fault-injecting transport.

Every call names the node it means to reach (``node_id``), and that name does two jobs:
the request's signature is bound to it (the recipient), and the answer must come from it.
The client refuses to call a node its own revocation list revokes, and sends the expected
id with the request (``populi_peer.api.tls.EXPECTED_PEER``), so that the TLS handshake
refuses any other node (docs/adr/0009-peer-identity-of-answers.md). An identity refusal
is a :class:`~populi_peer.errors.PeerIdentityError`.

Typed calls: ``payload`` may be a message (:mod:`populi_peer.core.messages`), and with
``answer=T`` the answer is parsed once into ``T``. Whatever a peer answers, a call ends in
its answer or in a :class:`~populi_peer.errors.PopuliError`: an answer that is not JSON,
misses a field or has one of the wrong type is ``PeerError(code="bad_peer_answer")``
naming the peer, the route and the field — never a ``KeyError`` or ``TypeError`` in the
caller.
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NotRequired, TypedDict, TypeVar, Unpack, overload

import httpx

from enrollment.signing import sign_request
from populi_peer import PROTOCOL_VERSION
from populi_peer.api.tls import EXPECTED_PEER, HOSTNAME_MISMATCH, PeerRefused
from populi_peer.clock import Clock
from populi_peer.core.messages import Message
from populi_peer.errors import (
    AgentUnavailable,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PeerError,
    PeerIdentityError,
    PopuliError,
    RateLimited,
    RefusedError,
    Unauthenticated,
    enrollment_boundary,
)
from populi_peer.identity import Credential
from populi_peer.log import correlation_id

#: The error a peer's refusal becomes, by its HTTP status (each class names its own).
_STATUS_ERRORS: dict[int, type[PopuliError]] = {
    cls.http_status: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RateLimited,
    )
}


class SignedAuth(httpx.Auth):
    """Signs one request for ``recipient`` with ``credential``."""

    requires_request_body = True

    def __init__(self, credential: Credential, recipient: str, clock: Clock) -> None:
        self.credential = credential
        self.recipient = recipient
        self.clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with enrollment_boundary():
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


M = TypeVar("M", bound=Message)

#: A request body: a typed message, a plain JSON object (an untyped route), or none.
RequestBody = Message | Mapping[str, Any] | None


def encode_body(payload: RequestBody) -> bytes:
    if payload is None:
        return b""
    body = payload.to_json() if isinstance(payload, Message) else dict(payload)
    return json.dumps({"v": PROTOCOL_VERSION, **body}, separators=(",", ":")).encode("utf-8")


def parse_answer(body: dict[str, Any], answer: type[M], *, peer: str, what: str) -> M:
    """``body`` (a 2xx answer of ``peer`` to ``what``, e.g. ``POST /v1/populi/heartbeat``)
    as ``answer``, or ``PeerError(code="bad_peer_answer")`` naming the field."""
    try:
        return answer.from_json(body)
    except PopuliError as exc:
        field = exc.details.get("field")
        raise PeerError(
            f"{peer} sent a malformed answer to {what}: {exc}",
            code="bad_peer_answer",
            peer=peer,
            **({"field": field} if field else {}),
        ) from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        # A record parser that trusted a shape it should have checked: still the peer's
        # bad answer, never an exception that escapes the caller's error handling.
        raise PeerError(
            f"{peer} sent a malformed answer to {what}: {answer.WHAT}: "
            f"{type(exc).__name__}: {str(exc)[:200]}",
            code="bad_peer_answer",
            peer=peer,
        ) from exc


def decode_response(response: httpx.Response, *, peer: str) -> dict[str, Any]:
    """The JSON body of a 2xx answer, or the matching :class:`PopuliError`."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or absurdly deep
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


def _verification_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that made a connection fail, if one did (httpx wraps
    httpcore's error, which wraps trio's or the socket's, which wraps the SSL error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def identity_error(exc: BaseException, *, peer: str, url: str) -> PeerIdentityError | None:
    """The :class:`PeerIdentityError` behind a failed connection, or None."""
    failure = _verification_failure(exc)
    if failure is None:
        return None
    if isinstance(failure, PeerRefused):
        code, presented = failure.code, failure.presented
    elif getattr(failure, "verify_code", None) == HOSTNAME_MISMATCH:
        code, presented = "peer_identity_mismatch", ""
    else:
        code, presented = "peer_certificate_untrusted", ""
    detail = getattr(failure, "verify_message", "") or str(failure)
    return PeerIdentityError(
        f"{url} did not prove to be {peer}: {detail}; nothing was sent "
        "(a node in the middle, a stale address, or a retired node)",
        code=code,
        peer=peer,
        presented=presented,
    )


def transport_error(exc: Exception, *, peer: str, url: str) -> PopuliError:
    refused = identity_error(exc, peer=peer, url=url)
    if refused is not None:
        return refused
    if isinstance(exc, httpx.ConnectError):
        return AgentUnavailable(
            f"cannot connect to {peer} at {url}: {exc or 'connection refused'}",
            code="peer_unreachable",
        )
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        # No connection: nothing was sent, so another address of the peer may be tried.
        return AgentUnavailable(
            f"cannot connect to {peer} at {url}: no connection in time", code="peer_unreachable"
        )
    if isinstance(exc, httpx.TimeoutException):
        return PeerError(f"{peer} at {url} did not answer in time", code="peer_timeout")
    return PeerError(
        f"request to {peer} at {url} failed: {type(exc).__name__}: {exc}", code="peer_unreachable"
    )


#: ``is_revoked(node_id)``: whether the caller's own revocation list revokes a node.
RevokedNode = Callable[[str], bool]

#: Per expected peer: a personal mesh has few nodes, and calls to one are short.
PEER_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0)


def expected_peer(request: httpx.Request) -> str:
    """The node id ``request`` expects to reach; a request that names none is refused
    like a peer that proves to be nobody."""
    expected = request.extensions.get(EXPECTED_PEER)
    if not isinstance(expected, str) or not expected:
        raise httpx.ConnectError(
            "the request names no expected peer", request=request
        ) from PeerRefused(
            "the request names no expected peer node id",
            code="peer_identity_mismatch",
            expected="",
            presented="",
        )
    return expected


P = TypeVar("P", httpx.AsyncHTTPTransport, httpx.HTTPTransport)


class _PoolPerPeer(Generic[P]):
    """One connection pool per expected node id, made by ``make`` on first use."""

    def __init__(self, make: Callable[[], P]) -> None:
        self._make: Callable[[], P] = make
        self._pools: dict[str, P] = {}

    def pool(self, request: httpx.Request) -> P:
        expected = expected_peer(request)
        pool = self._pools.get(expected)
        if pool is None:
            pool = self._pools[expected] = self._make()
        return pool

    def take_all(self) -> list[P]:
        """Every pool, forgotten here (to be closed by the caller)."""
        pools, self._pools = list(self._pools.values()), {}
        return pools


class PeerTransport(httpx.AsyncBaseTransport):
    """HTTPS to peers, one connection pool per expected node id.

    httpcore pools connections by origin (scheme, host, port) and checks the peer only at
    the handshake: a kept-alive connection proven to be node A would carry a later
    request meant for node B at the same address. One pool per expected id means a
    connection only ever carries requests for the node its handshake proved."""

    def __init__(self, context: ssl.SSLContext, *, limits: httpx.Limits = PEER_LIMITS) -> None:
        self._pools = _PoolPerPeer(
            lambda: httpx.AsyncHTTPTransport(verify=context, retries=0, limits=limits)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pools.pool(request).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools.take_all():
            await pool.aclose()


class SyncPeerTransport(httpx.BaseTransport):
    """The blocking :class:`PeerTransport`, for the CLI."""

    def __init__(self, context: ssl.SSLContext, *, limits: httpx.Limits = PEER_LIMITS) -> None:
        self._pools = _PoolPerPeer(
            lambda: httpx.HTTPTransport(verify=context, retries=0, limits=limits)
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._pools.pool(request).handle_request(request)

    def close(self) -> None:
        for pool in self._pools.take_all():
            pool.close()


class CallRequest(TypedDict):
    """What a call sends, whoever it is sent to: the route (``method``, ``path``), and
    optionally the ``payload``, query ``params`` and a ``timeout_s`` other than the
    client's. The agent's links (``populi_peer.agent.links``) take it as it is and add
    the node they reach."""

    method: str
    path: str
    payload: NotRequired[RequestBody]
    params: NotRequired[dict[str, Any] | None]
    timeout_s: NotRequired[float | None]


class PeerCall(CallRequest):
    """What a client's ``call`` sends, and to whom (all but the ``answer`` type): the
    node ``node_id`` at ``url``, and the :class:`CallRequest`."""

    url: str
    node_id: str


@dataclass(frozen=True)
class _SignedCall:
    """One call of either client: what is sent (:meth:`request`) and what its answer
    becomes (:meth:`result`, :meth:`failure`); the clients only do the I/O."""

    url: str
    node_id: str
    method: str
    path: str
    answer: type[Message] | None
    payload: RequestBody = None
    params: dict[str, Any] | None = None
    timeout_s: float | None = None

    def request(
        self, credential: Credential, clock: Clock, is_revoked: RevokedNode | None
    ) -> dict[str, Any]:
        """The ``httpx`` request's arguments; a node revoked on ``is_revoked`` is refused
        before anything is sent."""
        if is_revoked is not None and is_revoked(self.node_id):
            raise PeerIdentityError(
                f"{self.node_id} is revoked on this node's list; not calling it",
                code="peer_revoked",
                peer=self.node_id,
            )
        return {
            "method": self.method,
            "url": self.url.rstrip("/") + self.path,
            "content": encode_body(self.payload),
            "params": self.params,
            "headers": {"content-type": "application/json"} if self.payload is not None else {},
            "auth": SignedAuth(credential, self.node_id, clock),
            "extensions": {EXPECTED_PEER: self.node_id},
            **({"timeout": self.timeout_s} if self.timeout_s is not None else {}),
        }

    def failure(self, exc: httpx.HTTPError) -> PopuliError:
        return transport_error(exc, peer=self.node_id, url=self.url)

    def result(self, response: httpx.Response) -> dict[str, Any] | Message:
        decoded = decode_response(response, peer=self.node_id)
        if self.answer is None:
            return decoded
        return parse_answer(
            decoded, self.answer, peer=self.node_id, what=f"{self.method} {self.path}"
        )


class _SigningClient:
    """What both clients share: who signs (``credential``, ``clock``) and which nodes
    are never called (``is_revoked``, the caller's own revocation list)."""

    def __init__(
        self, *, credential: Credential, clock: Clock, is_revoked: RevokedNode | None
    ) -> None:
        self.credential = credential
        self.clock = clock
        self.is_revoked = is_revoked

    def _prepare(
        self, answer: type[Message] | None, call: PeerCall
    ) -> tuple[_SignedCall, dict[str, Any]]:
        """The call, and its ``httpx`` request's arguments."""
        signed = _SignedCall(answer=answer, **call)
        return signed, signed.request(self.credential, self.clock, self.is_revoked)


class PeerClient(_SigningClient):
    """Async, signing client for node-to-node calls. ``is_revoked``: the caller's own
    revocation list; a revoked node is never called."""

    def __init__(
        self,
        *,
        credential: Credential,
        clock: Clock,
        transport: httpx.AsyncBaseTransport,
        timeout_s: float,
        is_revoked: RevokedNode | None = None,
    ) -> None:
        super().__init__(credential=credential, clock=clock, is_revoked=is_revoked)
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    @overload
    async def call(self, *, answer: None = None, **call: Unpack[PeerCall]) -> dict[str, Any]: ...

    @overload
    async def call(self, *, answer: type[M], **call: Unpack[PeerCall]) -> M: ...

    async def call(
        self, *, answer: type[Message] | None = None, **call: Unpack[PeerCall]
    ) -> dict[str, Any] | Message:
        """Call ``node_id`` at ``url``. With ``answer``, the answer parsed as that type."""
        signed, request = self._prepare(answer, call)
        try:
            response = await self._client.request(**request)
        except httpx.HTTPError as exc:
            raise signed.failure(exc) from exc
        return signed.result(response)


class SyncPeerClient(_SigningClient):
    """Blocking variant for the CLI: ``verify`` is the TLS context
    (``populi_peer.api.tls.peer_context``) of a :class:`SyncPeerTransport`, unless a
    ``transport`` is given."""

    def __init__(
        self,
        *,
        credential: Credential,
        clock: Clock,
        verify: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        is_revoked: RevokedNode | None = None,
    ) -> None:
        super().__init__(credential=credential, clock=clock, is_revoked=is_revoked)
        if transport is None:
            if verify is None:
                raise ValueError("SyncPeerClient needs a TLS context or a transport")
            transport = SyncPeerTransport(verify)
        self._client = httpx.Client(transport=transport, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    @overload
    def call(self, *, answer: None = None, **call: Unpack[PeerCall]) -> dict[str, Any]: ...

    @overload
    def call(self, *, answer: type[M], **call: Unpack[PeerCall]) -> M: ...

    def call(
        self, *, answer: type[Message] | None = None, **call: Unpack[PeerCall]
    ) -> dict[str, Any] | Message:
        """Call ``node_id`` at ``url``. With ``answer``, the answer parsed as that type."""
        signed, request = self._prepare(answer, call)
        try:
            response = self._client.request(**request)
        except httpx.HTTPError as exc:
            raise signed.failure(exc) from exc
        return signed.result(response)


__all__ = [
    "PEER_LIMITS",
    "CallRequest",
    "PeerCall",
    "PeerClient",
    "PeerTransport",
    "RequestBody",
    "RevokedNode",
    "SignedAuth",
    "SyncPeerClient",
    "SyncPeerTransport",
    "decode_response",
    "encode_body",
    "expected_peer",
    "identity_error",
    "parse_answer",
    "transport_error",
]
