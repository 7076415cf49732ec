"""The agent: one trio process per node.

It owns the store, the identity, the API and the services (heartbeats, control plane,
GPU, worker, submitter). ``run()`` nests lifetimes: the API server outlives the services so
that a stopping node can still answer while its services wind down; shutdown is a
deadline (``api.shutdown_grace_s``), not a hope.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from populi_peer import PROTOCOL_VERSION, __version__
from populi_peer.agent.membership import Membership
from populi_peer.agent.network import Network, TlsNetwork
from populi_peer.agent.records import ClusterRecords
from populi_peer.api.app import ANY_MEMBER, ApiApp, Request, Route
from populi_peer.api.auth import Authenticator
from populi_peer.api.client import PeerClient
from populi_peer.api.server import hypercorn_config, serve_api
from populi_peer.clock import Clock
from populi_peer.config import Config, format_host_port, parse_host_port, reach_host
from populi_peer.errors import BadRequest
from populi_peer.identity import RuntimeInfo, clear_runtime, load_identity, write_runtime
from populi_peer.log import get_logger, log
from populi_peer.store import Store

OPERATOR = frozenset({"operator"})


class Agent:
    def __init__(
        self,
        *,
        data_dir: Path,
        config: Config,
        clock: Clock,
        network: Network | None = None,
        serve: bool = True,
        url: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.clock = clock
        self.serve = serve
        self.logger = get_logger("agent")
        self.store = Store.open(data_dir)
        self.identity = load_identity(data_dir, self.store)
        self.node_id = self.identity.node_id
        self.membership = Membership(self.store)
        self.records = ClusterRecords(self.store, self.membership)
        self.network = network or TlsNetwork(self.identity.paths.ca_cert)
        self.started_mono: float | None = None
        self.url = url or self._configured_url()
        self.authenticator = Authenticator(
            node_id=self.node_id,
            clock=clock,
            skew_s=config.security.max_skew_s,
            lookup=self.membership.principal,
            is_revoked=self.is_revoked,
            replay_max_entries=config.security.replay_cache_max_entries,
        )
        self.app = ApiApp(
            routes=self._routes(),
            authenticator=self.authenticator,
            clock=clock,
            max_body_bytes=config.api.max_body_bytes,
        )
        self.peers = PeerClient(
            credential=self.identity.node_credential,
            clock=clock,
            transport=self.network.transport_for(self.node_id),
            timeout_s=config.api.request_timeout_s,
        )
        self._stop = trio.Event()
        self._server_stop = trio.Event()
        self.stopped = trio.Event()

    # -- identity facts -------------------------------------------------------------------

    def _configured_url(self) -> str:
        addresses = self.config.advertise_addresses()
        if addresses:
            return f"https://{addresses[0]}"
        host, port = self.config.listen_address()
        return f"https://{format_host_port(reach_host(host), port)}"

    @property
    def term(self) -> int:
        return int(self.store.get_meta("term", "1") or "1")

    @property
    def control_plane_id(self) -> str:
        return self.store.require_meta("control_plane_id")

    @property
    def control_plane_url(self) -> str:
        return self.store.require_meta("control_plane_url")

    @property
    def is_control_plane(self) -> bool:
        return self.control_plane_id == self.node_id

    def is_revoked(self, principal_id: str) -> bool:
        return False

    # -- routes ---------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/populi/health", self._health, roles=None, name="health"),
            Route("GET", "/v1/populi/status", self._status, roles=ANY_MEMBER, name="status"),
            Route(
                "GET",
                "/v1/populi/settings",
                self._settings_show,
                roles=ANY_MEMBER,
                name="settings_show",
            ),
            Route(
                "POST",
                "/v1/populi/admin/settings",
                self._settings_set,
                roles=OPERATOR,
                name="settings_set",
            ),
        ]

    async def _health(self, request: Request) -> dict[str, Any]:
        return {"status": "ok", "node_id": self.node_id, "version": __version__}

    def status_json(self) -> dict[str, Any]:
        uptime = 0.0 if self.started_mono is None else self.clock.mono() - self.started_mono
        return {
            "cluster": {"id": self.identity.cluster_id, "name": self.identity.cluster_name},
            "node": {
                "id": self.node_id,
                "name": self.identity.node_name,
                "roles": list(self.identity.roles),
            },
            "listen": self.config.node.listen,
            "url": self.url,
            "uptime_s": round(uptime, 3),
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "term": self.term,
            "control_plane": {
                "node_id": self.control_plane_id,
                "url": self.control_plane_url,
                "is_self": self.is_control_plane,
            },
            "cert_not_after_ms": int(self.identity.cert_not_after_s * 1000),
        }

    async def _status(self, request: Request) -> dict[str, Any]:
        return self.status_json()

    async def _settings_show(self, request: Request) -> dict[str, Any]:
        return {"settings": self.records.settings_json(), "term": self.term}

    async def _settings_set(self, request: Request) -> dict[str, Any]:
        from populi_peer.errors import Conflict

        if not self.is_control_plane:
            raise Conflict(
                f"this node is not the control plane; send settings to {self.control_plane_url}",
                code="not_control_plane",
            )
        body = request.json()
        changes = body.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise BadRequest(
                "body needs 'changes': an object of setting -> value", code="bad_request"
            )
        record = self.records.change_settings(
            changes,
            identity=self.identity,
            actor=request.caller.id,
            now_ms=int(self.clock.wall() * 1000),
        )
        self.record_event(
            self.node_id,
            "settings_changed",
            actor=request.caller.id,
            detail={"changes": changes, "serial": record.serial},
        )
        return {"settings": self.records.settings_json(), "term": self.term}

    # -- events ---------------------------------------------------------------------------

    def record_event(
        self,
        node_id: str,
        kind: str,
        *,
        actor: str,
        reason: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        import json

        with self.store.transaction():
            self.store.execute(
                "INSERT INTO events (at_ms, node_id, kind, actor, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    int(self.clock.wall() * 1000),
                    node_id,
                    kind,
                    actor,
                    reason,
                    json.dumps(detail or {}, sort_keys=True),
                ),
            )

    # -- lifetime -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_mono = self.clock.mono()
        try:
            async with trio.open_nursery() as server_nursery:
                if self.serve:
                    await self._start_server(server_nursery)
                async with trio.open_nursery() as services:
                    for service in self.services():
                        await services.start(service)
                    log(
                        self.logger,
                        logging.INFO,
                        "agent started",
                        node_id=self.node_id,
                        url=self.url,
                        control_plane=self.is_control_plane,
                    )
                    task_status.started(self)
                    await self._stop.wait()
                    log(self.logger, logging.INFO, "agent stopping")
                    services.cancel_scope.deadline = (
                        trio.current_time() + self.config.api.shutdown_grace_s
                    )
                    await self.shutdown_services()
                    services.cancel_scope.cancel()
                self._server_stop.set()
                server_nursery.cancel_scope.deadline = (
                    trio.current_time() + self.config.api.shutdown_grace_s
                )
        finally:
            with trio.CancelScope(shield=True):
                await self.peers.aclose()
            if self.serve:
                clear_runtime(self.identity.paths, os.getpid())
            self.store.close()
            self.stopped.set()
            log(self.logger, logging.INFO, "agent stopped")

    def services(self) -> list[Callable[..., Any]]:
        """Long-running services, each ``async def run(*, task_status)``."""
        return []

    async def shutdown_services(self) -> None:
        """Graceful steps before the services are cancelled (overridden as features land)."""
        await trio.lowlevel.checkpoint()

    async def _start_server(self, nursery: trio.Nursery) -> None:
        host, port = self.config.listen_address()
        hconfig = hypercorn_config(
            host=host,
            port=port,
            certfile=self.identity.paths.node_cert,
            keyfile=self.identity.paths.node_key,
            keep_alive_max_requests=self.config.api.keep_alive_max_requests,
        )
        binds: list[str] = await nursery.start(serve_api, self.app, hconfig, self._server_stop.wait)
        bound_host, bound_port = parse_host_port(binds[0].removeprefix("https://"))
        if not self.config.node.advertise:
            self.url = f"https://{format_host_port(reach_host(bound_host), bound_port)}"
        self._publish_self_address()
        write_runtime(
            self.identity.paths,
            RuntimeInfo(
                pid=os.getpid(),
                url=self.url,
                node_id=self.node_id,
                started_wall_s=self.clock.wall(),
            ),
        )
        log(self.logger, logging.INFO, "api listening", binds=binds, url=self.url)

    def _publish_self_address(self) -> None:
        """Keep our own member record (and, on the control plane, its URL) in step with the
        address we actually serve on (a listen port of 0 is only known after binding)."""
        address = self.url.removeprefix("https://")
        member = self.membership.get(self.node_id)
        if member is not None and member.addresses[:1] != (address,):
            from dataclasses import replace

            self.membership.upsert(
                replace(
                    member,
                    addresses=(address, *[a for a in member.addresses if a != address]),
                    updated_ms=int(self.clock.wall() * 1000),
                )
            )
        if self.is_control_plane and self.control_plane_url != self.url:
            self.store.set_meta("control_plane_url", self.url)
