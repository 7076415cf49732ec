"""The ASGI lifespan answer shared by the API app and the metrics endpoint."""

from __future__ import annotations

from typing import Any

import trio

from populi_peer.api.server import with_lifespan


async def test_an_http_only_app_answers_the_lifespan_and_still_serves_http(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served: list[str] = []

    async def http_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        served.append(scope["path"])

    app = with_lifespan(http_only)
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    await app({"type": "http", "path": "/metrics"}, receive, send)
    assert served == ["/metrics"]
