"""Serving the ASGI app over TLS with hypercorn's trio worker.

A refused handshake ends with its TLS alert. OpenSSL writes the alert (``protocol_version``
for a TLS 1.2 client, ``handshake_failure`` for no shared cipher) into the outgoing memory
BIO and fails the handshake; trio's ``SSLStream`` (0.35) then raises at once and closes
the socket without sending what the BIO holds, so the client saw a bare EOF ("unexpected
eof while reading") instead of a reason (python-trio/trio#3413 is the same bug for
certificate errors). :class:`AlertingSSLObject`, the server context's TLS object, holds
such a failure back once: it reports "wants to read" so that trio first sends the
pending bytes (the alert), and raises the failure on trio's next call.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from populi_peer.config import format_host_port


class AlertingSSLObject(ssl.SSLObject):
    """The server's TLS object: a failed handshake sends its alert before it ends (see
    the module docstring)."""

    _outgoing: ssl.MemoryBIO | None = None
    _failure: ssl.SSLError | None = None

    @classmethod
    def _create(
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any
    ) -> AlertingSSLObject:
        # ``SSLContext.wrap_bio`` builds the object here; keep the outgoing BIO so that a
        # failure can tell whether an alert waits in it.
        made = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        made._outgoing = outgoing
        return made  # type: ignore[no-any-return]

    def do_handshake(self) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            super().do_handshake()
        except ssl.SSLWantReadError:
            raise
        except ssl.SSLError as exc:
            if self._outgoing is None or not self._outgoing.pending:
                raise
            self._failure = exc
            # trio sends what the BIO holds, then calls again and gets the failure.
            raise ssl.SSLWantReadError("the handshake failed; sending its alert first") from exc


class ReloadableConfig(HypercornConfig):
    """Keeps the server's SSL context so that a renewed certificate can be loaded into it:
    new connections get the new certificate, open ones keep theirs."""

    ssl_context: ssl.SSLContext | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        self.ssl_context = super().create_ssl_context()
        if self.ssl_context is not None:
            self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_3  # peers speak 1.3 only
            self.ssl_context.sslobject_class = AlertingSSLObject
        return self.ssl_context

    def reload_certificate(self) -> None:
        if self.ssl_context is not None and self.certfile is not None:
            self.ssl_context.load_cert_chain(certfile=self.certfile, keyfile=self.keyfile)


def hypercorn_config(
    *, host: str, port: int, certfile: Path, keyfile: Path, keep_alive_max_requests: int
) -> ReloadableConfig:
    config = ReloadableConfig()
    config.bind = [format_host_port(host, port)]
    config.certfile = str(certfile)
    config.keyfile = str(keyfile)
    config.ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20"
    # Peers reuse connections for heartbeats and leases: a low cap resets in-flight requests.
    config.keep_alive_max_requests = keep_alive_max_requests
    config.accesslog = None
    # hypercorn takes a logging.Logger here, so its lines come out in our format.
    config.errorlog = logging.getLogger("populi.http")
    config.graceful_timeout = 1.0
    config.use_reloader = False
    config.verify_mode = ssl.CERT_NONE  # identity is the request signature (docs/design.md)
    return config


async def serve_api(
    app: Any,
    config: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns; reports the bound ``https://`` URLs."""
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Answer the ASGI lifespan protocol for an app with nothing to start or stop, so
    that hypercorn does not warn at every start that it has no lifespan."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def with_lifespan(app: Any) -> Any:
    """``app`` (one that knows only HTTP, such as prometheus-client's) answering the
    ASGI lifespan protocol too (:func:`answer_lifespan`)."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        else:
            await app(scope, receive, send)

    return asgi


__all__ = [
    "AlertingSSLObject",
    "ReloadableConfig",
    "answer_lifespan",
    "hypercorn_config",
    "serve_api",
    "with_lifespan",
]
