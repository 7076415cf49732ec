"""Serving in tests: an API app of a test's own routes, with an authenticator that knows no one: only
``roles=None`` routes answer (what a fake peer, a test double of a join server or a
route-table test serves)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from populi_peer.api.app import ApiApp, Route
from populi_peer.api.auth import Authenticator
from populi_peer.clock import Clock


def open_routes_app(
    routes: Sequence[Route],
    *,
    clock: Clock,
    node_id: str = "n-x",
    max_body_bytes: int = 1 << 20,
) -> ApiApp:
    """``routes`` served as node ``node_id``; no signer is known and none is revoked."""
    return ApiApp(
        routes=list(routes),
        authenticator=Authenticator(
            node_id=node_id,
            clock=clock,
            skew_s=300,
            lookup=lambda _: None,
            is_revoked=lambda _: False,
        ),
        clock=clock,
        max_body_bytes=max_body_bytes,
    )


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    """The whole request body an ASGI app receives, however many messages it comes in."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
