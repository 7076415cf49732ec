"""A small ASGI application: one route table, signed-request auth, JSON in and out.

A route may declare its body types (:mod:`populi_peer.core.messages`): with
``request=T`` the app parses the body into ``T`` before the handler runs (a malformed body
is a 400 naming the field; an empty body reads as ``{}`` when every field of ``T`` has a
default) and the handler takes it with ``request.message(T)``; with ``answer=A`` the
handler returns an ``A`` (or a :class:`Response`) and the app writes ``A.to_json()``.
Routes without types take ``request.json()`` and return a dict, as before.

Every response is JSON with ``"v"`` (protocol version) and ``"server_time_ms"``, and carries
the headers ``Populi-Server-Time-Ms`` (so a caller sees skew), ``Populi-Protocol`` and
``Populi-Correlation-Id`` (echoed from the request or made here). Errors are
``{"v": 1, "server_time_ms": ..., "error": {"code": ..., "message": ...}}``. Bodies are read up
to ``max_body_bytes`` (413 beyond); a POST body is a JSON object or nothing, on every route
(400 ``bad_json`` otherwise, also where the handler does not read it).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs

from enrollment.errors import EnrollmentError
from enrollment.tokens import TOKEN_ROLES
from populi_peer import PROTOCOL_VERSION
from populi_peer.api.auth import Authenticator, Principal
from populi_peer.api.server import answer_lifespan
from populi_peer.clock import Clock
from populi_peer.core.messages import OPERATIONS, Message
from populi_peer.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PopuliError,
    translate_enrollment,
)
from populi_peer.log import correlation_id, get_logger, log
from populi_peer.store import RequestNonce, bind_request_nonce

#: The role sets routes admit, one definition each: every member role (the roles a join
#: token may grant), and the one-role sets.
ANY_MEMBER = TOKEN_ROLES
OPERATOR = frozenset({"operator"})
SUBMIT = frozenset({"submit"})
#: Who may read and cancel tasks and read their output: the submitter, an operator.
TASK_READERS = SUBMIT | OPERATOR
MAX_REASON_CHARS = 200
_CID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PARAM_RE = re.compile(r"\{([a-z_]+)\}")

M = TypeVar("M", bound=Message)

#: A handler answers a typed message (its route declares ``answer``: the app checks the
#: type), a dict (an untyped route), or a :class:`Response` (another status, headers).
Handler = Callable[["Request"], Awaitable["Response | Message | dict[str, Any]"]]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    path_params: dict[str, str]
    principal: Principal | None
    client: tuple[str, int] | None
    cid: str
    _json: Any = field(default=None, repr=False)
    _message: Message | None = field(default=None, repr=False)

    def message(self, cls: type[M]) -> M:
        """The body as parsed into ``cls`` before the handler ran (the route declares
        ``request=cls``)."""
        if not isinstance(self._message, cls):
            # The route table and its handler disagree: a programming error (500).
            raise TypeError(
                f"{self.method} {self.path}: the route parses {type(self._message).__name__}, "
                f"the handler asks for {cls.__name__}"
            )
        return self._message

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 when it is not one)."""
        if self._json is None:
            if not self.body:
                raise BadRequest("request body must be a JSON object", code="bad_json")
            try:
                value = json.loads(self.body, parse_constant=_refuse_constant)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadRequest(f"malformed JSON body: {exc}", code="bad_json") from exc
            except (ValueError, RecursionError) as exc:
                # NaN/Infinity (not JSON), absurdly long numbers, too deep nesting.
                raise BadRequest(
                    f"malformed JSON body: {str(exc)[:100]}", code="bad_json"
                ) from None
            if not isinstance(value, dict):
                raise BadRequest("request body must be a JSON object", code="bad_json")
            self._json = value
        return dict(self._json)

    def reason(self, default: str) -> str:
        """The optional ``reason`` of an operator action: one line, at most 200 characters."""
        body = self.json() if self.body else {}
        value = body.get("reason")
        if value is None or value == "":
            return default
        if (
            not isinstance(value, str)
            or len(value) > MAX_REASON_CHARS
            or "\n" in value
            or "\r" in value
        ):
            raise BadRequest(
                f"'reason' must be one line of at most {MAX_REASON_CHARS} characters",
                code="bad_request",
            )
        return value

    def query_one(self, name: str, default: str | None = None) -> str | None:
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        if not values:
            return default
        if len(values) > 1:
            raise BadRequest(f"query parameter {name!r} given more than once")
        return values[0]

    def query_int(
        self, name: str, default: int, *, minimum: int = 0, maximum: int = 1 << 62
    ) -> int:
        raw = self.query_one(name)
        if raw is None or raw == "":
            return default
        if not re.fullmatch(r"-?\d{1,19}", raw):
            raise BadRequest(f"query parameter {name!r} must be an integer, got {raw[:32]!r}")
        value = int(raw)
        if not minimum <= value <= maximum:
            raise BadRequest(f"query parameter {name!r} must be between {minimum} and {maximum}")
        return value

    @property
    def caller(self) -> Principal:
        if self.principal is None:  # pragma: no cover - only on authenticated routes
            raise Forbidden("this route needs a signed request")
        return self.principal


#: The authentication scheme a 401 names: the per-request Ed25519 signature
#: (``populi-signature`` / ``populi-signature-input`` headers, enrollment/signing.py).
AUTH_SCHEME = "Populi-Signature"


@dataclass
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


#: ``observe(operation, status, answer, error_code)`` after each answer.
Observer = Callable[[str, int, "Message | None", "str | None"], None]


def _error_code(response: Response) -> str | None:
    error = response.body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


@dataclass(frozen=True)
class Route:
    """One operation: ``name`` is its ``operationId`` in the contract; ``request`` and
    ``answer`` its body types. Those of an operation the catalogue (``OPERATIONS`` in
    :mod:`populi_peer.core.messages`) lists are the catalogue's, filled in here (a type
    given that differs from it is a programming error); a test holds the catalogue and
    the contract together."""

    method: str
    pattern: str
    handler: Handler
    #: Roles allowed to call; ``None`` means unauthenticated (health, join only).
    roles: frozenset[str] | None
    name: str = ""
    request: type[Message] | None = None
    answer: type[Message] | None = None

    def __post_init__(self) -> None:
        types = OPERATIONS.get(self.name)
        if types is None:
            return
        for attribute, catalogued in (("request", types.request), ("answer", types.answer)):
            given = getattr(self, attribute)
            if given is not None and given is not catalogued:
                raise ValueError(f"route {self.name}: {attribute} {given} is not the catalogue's")
            object.__setattr__(self, attribute, catalogued)

    def compile(self) -> re.Pattern[str]:
        regex = _PARAM_RE.sub(
            lambda m: f"(?P<{m.group(1)}>[^/]+)",
            re.escape(self.pattern).replace(r"\{", "{").replace(r"\}", "}"),
        )
        return re.compile(f"^{regex}$")


class ApiApp:
    """The ASGI callable."""

    def __init__(
        self,
        *,
        routes: list[Route],
        authenticator: Authenticator,
        clock: Clock,
        max_body_bytes: int,
        logger: logging.Logger | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.node_id = authenticator.node_id
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.logger = logger or get_logger("api")
        #: Called after every answer with (operation id or "", HTTP status, the typed
        #: answer or ``None``, the error code or ``None``): the metrics count by these.
        #: An observer must not raise.
        self.observers: list[Observer] = []
        self._routes: list[tuple[re.Pattern[str], Route]] = []
        self.add_routes(routes)

    def add_routes(self, routes: list[Route]) -> None:
        for route in routes:
            self._routes.append((route.compile(), route))

    def route_table(self) -> list[Route]:
        return [route for _, route in self._routes]

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for regex, route in self._routes:
            found = regex.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, found.groupdict()
            allowed.append(route.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise PopuliError(
                f"method {method} not allowed here; use {methods}",
                code="method_not_allowed",
                allow=methods,
            )
        raise NotFound(f"no route {path}", code="no_route")

    async def _read_body(
        self, receive: Callable[[], Awaitable[dict[str, Any]]], headers: Mapping[str, str]
    ) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"request body exceeds the limit of {self.max_body_bytes} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets are not part of the API
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        raw_cid = headers.get("populi-correlation-id", "")
        cid = raw_cid if _CID_RE.match(raw_cid) else secrets.token_hex(8)
        token = correlation_id.set(cid)
        method = scope["method"].upper()
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        started = self.clock.mono()
        route_name = ""
        answer: Message | None = None
        principal: Principal | None = None
        nonce: RequestNonce | None = None
        try:
            try:
                route, params = self._match(method, path)
                route_name = route.name
                body = await self._read_body(receive, headers)
                if route.roles is not None:
                    principal, nonce = self.authenticator.verify(
                        method=method, path=path, query=query, headers=headers, body=body
                    )
                    if not principal.has_any(route.roles):
                        raise Forbidden(
                            f"{principal.kind} {principal.id} lacks the role for {method} {route.pattern} "
                            f"(needs one of: {', '.join(sorted(route.roles))})",
                            code="role_required",
                        )
                client = scope.get("client")
                request = Request(
                    method=method,
                    path=path,
                    query=query,
                    headers=headers,
                    body=body,
                    path_params=params,
                    principal=principal,
                    client=(str(client[0]), int(client[1])) if client else None,
                    cid=cid,
                )
                if route.request is not None:
                    request._message = _parse_body(route.request, request)
                elif body and method == "POST":
                    # A body no handler reads is still JSON (or absent): the same 400
                    # bad_json on every route, whether its handler reads the body or not.
                    request.json()
                # The request's first commit records its nonce (never accepted twice).
                with bind_request_nonce(nonce):
                    result = await route.handler(request)
                response = _respond(route, result)
                answer = result if isinstance(result, Message) else None
            except (PopuliError, EnrollmentError) as caught:
                exc = translate_enrollment(caught)
                status = 405 if exc.code == "method_not_allowed" else exc.http_status
                response = Response(
                    status, {"error": exc.to_json()}, self._error_headers(exc, status)
                )
                if status >= 500:
                    log(self.logger, logging.ERROR, "request failed", code=exc.code, error=str(exc))
            except Exception:
                self.logger.exception("unhandled error in %s %s", method, path)
                response = Response(
                    500,
                    {
                        "error": {
                            "code": "internal_error",
                            "message": "internal error; see the agent log",
                        }
                    },
                )
            await self._send(send, response, cid)
            for observe in self.observers:
                observe(route_name, response.status, answer, _error_code(response))
            # The access log: debug (heartbeats alone are one a second per node).
            log(
                self.logger,
                logging.DEBUG,
                "request",
                method=method,
                path=path,
                status=response.status,
                ms=round((self.clock.mono() - started) * 1000, 2),
                caller=principal.id if principal else None,
            )
        finally:
            correlation_id.reset(token)

    def _error_headers(self, exc: PopuliError, status: int) -> dict[str, str]:
        """What HTTP itself asks of these answers: a 405 names the methods the path takes
        (RFC 9110 §15.5.6), a 401 the scheme that would authenticate (§11.6.1) — Populi's
        request signature, for this node."""
        if status == 405 and isinstance(exc.details.get("allow"), str):
            return {"allow": exc.details["allow"]}
        if status == 401:
            return {"www-authenticate": f'{AUTH_SCHEME} realm="populi", node="{self.node_id}"'}
        return {}

    async def _send(self, send: Any, response: Response, cid: str) -> None:
        now_ms = int(self.clock.wall() * 1000)
        body = {"v": PROTOCOL_VERSION, "server_time_ms": now_ms, **response.body}
        payload = json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"populi-server-time-ms", str(now_ms).encode()),
            (b"populi-protocol", str(PROTOCOL_VERSION).encode()),
            (b"populi-correlation-id", cid.encode()),
        ]
        headers.extend((k.lower().encode(), v.encode()) for k, v in response.headers.items())
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _parse_body(cls: type[Message], request: Request) -> Message:
    """The body as ``cls``: an absent body is ``{}`` where ``cls`` needs no field."""
    data = request.json() if request.body or cls.requires_body() else {}
    return cls.from_json(data)


def _respond(route: Route, result: object) -> Response:
    if isinstance(result, Response):
        return result
    if route.answer is not None and not isinstance(result, route.answer):
        # The handler and its route disagree about the answer: a programming error.
        raise TypeError(
            f"{route.method} {route.pattern} answers {route.answer.__name__}, "
            f"the handler returned {type(result).__name__}"
        )
    if isinstance(result, Message):
        return Response(200, result.to_json())
    if isinstance(result, dict):
        return Response(200, result)
    raise TypeError(f"{route.method} {route.pattern}: a handler returned {type(result).__name__}")


__all__ = ["ANY_MEMBER", "ApiApp", "Handler", "Observer", "Request", "Response", "Route"]
