"""The agent: one trio process per node.

It owns the store, the identity, the API and the services (heartbeats, certificate
renewal, and — as features land — GPU probe, worker and submitter). ``run()`` nests
lifetimes: the API server outlives the services so that a stopping node can still answer
while its services wind down; shutdown is a deadline (``api.shutdown_grace_s``), not a
hope. Feature services plug in through the ``on_*`` hooks and ``heartbeat_*`` extras.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from enrollment.ca import (
    BACKDATE_S,
    cert_from_pem,
    cert_to_pem,
    certificate_public_key,
    node_certificate_info,
)
from enrollment.keys import write_public_file
from populi_peer import PROTOCOL_VERSION, __version__
from populi_peer.agent.attempts import AttemptPlan, AttemptRunner
from populi_peer.agent.enrollment import Enrollment
from populi_peer.agent.executor import Executor, ProcessExecutor
from populi_peer.agent.gpu import GpuService
from populi_peer.agent.health import RETRIED, Health
from populi_peer.agent.heartbeat import HeartbeatReceiver, HeartbeatSender, SelfBeat
from populi_peer.agent.inbox import Inbox
from populi_peer.agent.leases import LeaseService
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.network import Network, TlsNetwork
from populi_peer.agent.nodes import NodeAdmin, leave_sequence
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.agent.settings_sync import SettingsSync
from populi_peer.agent.standing import Standing
from populi_peer.agent.submitter import Submitter
from populi_peer.agent.worker import Worker
from populi_peer.api.app import ANY_MEMBER, ApiApp, Request, Route
from populi_peer.api.auth import Authenticator, Principal
from populi_peer.api.client import PeerClient
from populi_peer.api.server import ReloadableConfig, hypercorn_config, serve_api
from populi_peer.clock import Clock
from populi_peer.config import Config, format_host_port, parse_host_port, reach_host
from populi_peer.core.registers import RegisterWrite
from populi_peer.core.settings import remote_refusal
from populi_peer.datadir_lock import DataDirLock
from populi_peer.errors import BadRequest, ConfigError, Conflict, PopuliError
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
        executor: Executor | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.clock = clock
        self.serve = serve
        self.logger = get_logger("agent")
        # One agent per data directory, before anything is opened (datadir_lock).
        self.data_dir_lock = DataDirLock.acquire(data_dir)
        self.store = Store.open(data_dir)
        # Writes the storage cannot take make the node degraded until one succeeds.
        self.health = Health(clock)
        self.store.write_listener = self.health.storage_result
        self.identity = load_identity(data_dir, self.store)
        self.node_id = self.identity.node_id
        self.membership = Membership(self.store)
        self.records = ClusterRecords(self.store, self.membership)
        self.revocations = RevocationState(
            self.store,
            cluster_id=self.identity.cluster_id,
            cluster_key=certificate_public_key(self.identity.ca_cert),
        )
        self.registry = Registry(
            self.store, self.identity, clock, max_skew_s=config.security.max_skew_s
        )
        self._check_stop_margin()
        self.network = network or TlsNetwork(
            self.identity.paths.ca_cert, revoked=self.revocations.is_certificate_revoked
        )
        self.started_mono: float | None = None
        self.url = url or self._configured_url()
        self.leaving = False
        self.hypercorn: ReloadableConfig | None = None
        # Components with routes.
        self.enrollment = Enrollment(self)
        self.heartbeats = HeartbeatReceiver(self)
        self.heartbeat_sender = HeartbeatSender(self)
        self.node_admin = NodeAdmin(self)
        self.executor: Executor = executor or ProcessExecutor()
        self.inbox = Inbox(self)
        self.leases = LeaseService(self)
        self.runner = AttemptRunner(self)
        self.worker = Worker(self, self.runner)
        self.submitter = Submitter(self)
        self.gpu = GpuService(self)
        self.standing = Standing(
            node_id=self.node_id,
            node_name=self.identity.node_name,
            clock=clock,
            revocations=self.revocations,
            membership=self.membership,
            registry=self.registry,
        )
        self.settings_sync = SettingsSync(
            node_id=self.node_id,
            records=self.records,
            membership=self.membership,
            registry=self.registry,
            peers=lambda: self.peers,
            control_plane=lambda: (self.control_plane_url, self.control_plane_id),
            timeout_s=config.api.request_timeout_s,
        )
        self.authenticator = Authenticator(
            node_id=self.node_id,
            clock=clock,
            skew_s=config.security.max_skew_s,
            lookup=self.lookup_principal,
            is_revoked=self._refuses_signer,
            replay_max_entries=config.security.replay_cache_max_entries,
            nonces=self.store,
            retired=self.standing.notice_for,
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
            # Every call names the node it means to reach; a revoked one is never called,
            # and no other node's answer is taken (docs/adr/0009).
            is_revoked=self.is_revoked,
        )
        self._stop = trio.Event()
        self._server_stop = trio.Event()
        self.stopped = trio.Event()

    def _check_stop_margin(self) -> None:
        """safety rule 3: refuse a stop margin smaller than the SIGTERM grace plus the kill
        latency plus the clock drift over one TTL (the cluster's longest), and one that
        leaves no room for a renewal. Checked at start against the settings this node
        holds; a later, longer ``max_lease_ttl_s`` makes the worker refuse such leases
        (``ttl_too_short``) instead."""
        if not self.config.exec.remote:
            return
        try:
            self.config.exec.check_stop_margin(float(self.records.settings["max_lease_ttl_s"]))
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (cluster max_lease_ttl_s = {self.records.settings['max_lease_ttl_s']:g} s)",
                key="exec.stop_margin_s",
            ) from None

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

    def self_addresses(self) -> list[str]:
        address = self.url.removeprefix("https://")
        advertised = [a for a in self.config.node.advertise if a != address]
        return [address, *advertised]

    def is_revoked(self, principal_id: str) -> bool:
        return self.revocations.is_revoked(principal_id)

    def _refuses_signer(self, principal_id: str) -> bool:
        # This node's own key is always good at its own agent: the CLI here signs with it,
        # and a retired node's operator must still read its status.
        return principal_id != self.node_id and self.is_revoked(principal_id)

    def lookup_principal(self, principal_id: str) -> Principal | None:
        """The signer of a request, unless unknown, retired or its certificate expired."""
        principal = self.membership.principal(principal_id)
        if principal is None:
            return None
        member = self.membership.get(principal_id)
        if member is not None and member.kind == "node":
            lc = self.registry.lifecycle(principal_id)
            if lc is not None and lc.state == "retired":
                return None
            skew_ms = self.config.security.max_skew_s * 1000
            if (
                member.cert_not_after_ms
                and member.cert_not_after_ms < self.clock.wall() * 1000 - skew_ms
            ):
                return None
        return principal

    def require_control_plane(self) -> None:
        if not self.is_control_plane:
            raise Conflict(
                f"this node is not the control plane (term {self.term}); ask {self.control_plane_url}",
                code="not_control_plane",
                control_plane_url=self.control_plane_url,
            )

    # -- routes ---------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            *self.enrollment.routes(),
            *self.heartbeats.routes(),
            *self.node_admin.routes(),
            *self.inbox.routes(),
            *self.leases.routes(),
            *self.worker.routes(),
            *self.submitter.routes(),
            *self.gpu.routes(),
            *self.settings_sync.routes(),
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
        sender = self.heartbeat_sender
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
                "reachable": True
                if self.is_control_plane
                else (sender.beats > 0 and not sender.cp_down),
            },
            "lifecycle": self.own_lifecycle(),
            "standing": self.standing.json(),
            "cert_not_after_ms": int(self.identity.cert_not_after_s * 1000),
            "revocation_serial": self.revocations.serial,
            "health": self.health.to_json(),
        }

    def own_lifecycle(self) -> dict[str, Any] | None:
        if self.is_control_plane:
            lc = self.registry.lifecycle(self.node_id)
            return None if lc is None else lc.to_json()
        return self.standing.refused_lifecycle or self.heartbeat_sender.lifecycle

    async def _status(self, request: Request) -> dict[str, Any]:
        return self.status_json()

    async def _settings_show(self, request: Request) -> dict[str, Any]:
        return {"settings": self.records.settings_json(), "term": self.term}

    async def _settings_set(self, request: Request) -> dict[str, Any]:
        self.require_control_plane()
        body = request.json()
        changes = body.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise BadRequest(
                "body needs 'changes': an object of setting -> value", code="bad_request"
            )
        previous_ttl = float(self.records.settings["max_lease_ttl_s"])
        record = self.records.change_settings(
            changes,
            identity=self.identity,
            actor=request.caller.id,
            now_ms=int(self.clock.wall() * 1000),
        )
        if float(self.records.settings["max_lease_ttl_s"]) != previous_ttl:
            # Remembered for the per-node resumption window after a restart (ADR 0012).
            seen = float(self.store.get_meta("lease_max_ttl_seen_s", "0") or 0)
            self.store.set_meta("lease_max_ttl_seen_s", str(max(seen, previous_ttl)))
        self.record_event(
            self.node_id,
            "settings_changed",
            actor=request.caller.id,
            detail={"changes": changes, "serial": record.serial},
        )
        # Every node at once, not at its next heartbeat; the answer says who did not confirm.
        push = await self.settings_sync.push()
        return {"settings": self.records.settings_json(), "term": self.term, "push": push}

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
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO events (at_ms, node_id, kind, actor, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    int(self.clock.wall() * 1000),
                    node_id,
                    kind,
                    actor,
                    reason,
                    json.dumps(detail or {}, sort_keys=True, default=str),
                ),
            )

    # -- membership sync (non-control-plane nodes) ------------------------------------------

    async def sync_members(self) -> None:
        answer = await self.peers.call(
            url=self.control_plane_url,
            node_id=self.control_plane_id,
            method="GET",
            path="/v1/populi/members",
        )
        members = [Member.from_json(m) for m in answer.get("members", [])]
        if not any(m.id == self.node_id for m in members):
            log(self.logger, logging.WARNING, "this node is not in the control plane's membership")
        self.membership.replace_all(members, int(answer.get("version", 0)))

    async def peer_member(self, node_id: str) -> Member | None:
        """A node's member record with an address; refreshes membership from the control
        plane once if this node has not heard of it yet (it may have joined a moment ago)."""
        member = self.membership.get(node_id)
        if (member is None or not member.addresses) and not self.is_control_plane:
            try:
                await self.sync_members()
            except PopuliError as exc:
                log(self.logger, logging.INFO, "membership refresh failed", error=str(exc))
            member = self.membership.get(node_id)
        return member if member is not None and member.addresses else None

    async def call_member(
        self,
        member: Member,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        attempts: int = 5,
    ) -> dict[str, Any]:
        """Call another node. A peer that does not know us yet (we joined after its last
        membership refresh: 401 ``unknown_signer``) learns of us within a heartbeat, so
        that refusal is retried a few times before it counts."""
        for attempt in range(attempts):
            try:
                return await self.peers.call(
                    url=f"https://{member.addresses[0]}",
                    node_id=member.id,
                    method=method,
                    path=path,
                    payload=payload,
                )
            except PopuliError as exc:
                if exc.code != "unknown_signer" or attempt == attempts - 1:
                    raise
                await trio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- hooks for features (overridden / extended as they land) ----------------------------

    def heartbeat_report(self) -> dict[str, Any]:
        """Extra fields this node puts in its heartbeat: GPU summary, held leases."""
        uptime = 0.0 if self.started_mono is None else self.clock.mono() - self.started_mono
        return {
            "uptime_s": round(uptime, 3),
            "leases": self.worker.held_leases(),
            # Whether this node takes remote work at all (POPULI_EXEC_REMOTE=0: no), so
            # the control plane does not place any here.
            "exec_remote": bool(self.config.exec.remote),
            **self.gpu.heartbeat_report(),
        }

    def heartbeat_answer_extras(self, node_id: str, report: dict[str, Any]) -> dict[str, Any]:
        return self.gpu.answer_extras(node_id)

    async def on_heartbeat(self, node_id: str, report: dict[str, Any]) -> None:
        self.gpu.on_heartbeat(node_id, report)
        await trio.lowlevel.checkpoint()

    async def on_heartbeat_answer(self, answer: dict[str, Any]) -> None:
        self.gpu.absorb_answer(answer)
        await trio.lowlevel.checkpoint()

    def on_self_register(self, write: RegisterWrite) -> None:
        """A node's own register (e.g. GPU quarantine) reached the control plane."""
        self.record_event(
            write.node_id,
            "register",
            actor=write.actor,
            reason=write.reason,
            detail={"attribute": write.attribute, "value": write.value},
        )

    async def on_lifecycle_changed(self, node_id: str) -> None:
        await trio.lowlevel.checkpoint()

    def on_membership_changed(self) -> None:
        """Called on the control plane after membership or revocations change."""

    def gpu_view(self, node_id: str) -> dict[str, Any] | None:
        return self.gpu.view(node_id)

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        return self.gpu.allocatable_gpus(node_id)

    def verified_gpu_uuids(self) -> list[str]:
        return self.gpu.verified_uuids()

    def own_pids(self) -> set[int]:
        return self.worker.own_pids()

    def remote_enabled(self) -> bool:
        """Remote execution is on in this node's config and cluster settings, the kill
        switch is off, and this node is still a member (not retired)."""
        return bool(
            self.config.exec.remote
            and remote_refusal(self.records.settings) is None
            and not self.standing.out
        )

    def policy_gates(self) -> frozenset[tuple[str, str]]:
        gates = self.records.settings.get("policy_gates") or []
        return frozenset((g.split(":", 1)[0], g.split(":", 1)[1]) for g in gates)

    async def stop_all_work(self, *, reason: str) -> int:
        """Stop every task this node runs and release their leases; returns how many."""
        local = await self.submitter.stop_all(reason)
        remote = await self.worker.stop_all(reason)
        return local + remote

    async def leave(self, *, reason: str, actor: str) -> dict[str, Any]:
        result = await leave_sequence(self, reason=reason, actor=actor)
        if result["acknowledged"]:
            self._leave_done.set()
        # Otherwise the heartbeat loop keeps saying goodbye until the control plane hears
        # it, and then the agent stops (a node that left is told from one that vanished).
        return result

    def leave_acknowledged(self) -> None:
        self.record_event(
            self.node_id,
            "left",
            actor=self.node_id,
            reason="acknowledged late",
            detail={"acknowledged": True},
        )
        self._leave_done.set()

    # -- certificate renewal --------------------------------------------------------------

    async def renew_certificate(self) -> None:
        if self.is_control_plane:
            member = self.membership.get(self.node_id)
            if member is None:
                raise PopuliError("the control plane is missing from its own membership")
            pem = cert_to_pem(self.enrollment.issue_certificate(member)).decode("ascii")
        else:
            answer = await self.peers.call(
                url=self.control_plane_url,
                node_id=self.control_plane_id,
                method="POST",
                path="/v1/populi/certs/renew",
                payload={},
            )
            pem = str(answer["certificate"])
        cert = cert_from_pem(pem)
        if certificate_public_key(cert) != self.identity.node_key.public_key():
            raise PopuliError(
                "renewed certificate is not for this node's key", code="bad_peer_answer"
            )
        write_public_file(self.identity.paths.node_cert, pem.encode("ascii"))
        self.identity = replace(self.identity, node_cert=cert)
        if self.hypercorn is not None:
            self.hypercorn.reload_certificate()
        info = node_certificate_info(cert)
        log(self.logger, logging.INFO, "certificate renewed", not_after_s=int(info.not_after_s))

    def prune(self) -> dict[str, int]:
        """Forget what is older than ``exec.retain_finished_s``: inbox messages, and the
        directories of finished attempts (whose results are stored and, on a worker,
        delivered). Task and attempt rows stay: they are small and they are the record."""
        import shutil

        cutoff_ms = int((self.clock.wall() - self.config.exec.retain_finished_s) * 1000)
        with self.store.transaction():
            messages = self.store.execute(
                "DELETE FROM inbox WHERE received_ms < ?", (cutoff_ms,)
            ).rowcount
        dirs = 0
        rows = self.store.execute(
            "SELECT * FROM attempts WHERE state = 'finished' AND updated_ms < ? AND (role = 'local' OR delivered_ms IS NOT NULL)",
            (cutoff_ms,),
        ).fetchall()
        for row in rows:
            task_dir = self.runner.task_dir(AttemptPlan.from_json(json.loads(row["body"])))
            if task_dir.exists() and not self.executor.leftovers(task_dir):
                shutil.rmtree(task_dir, ignore_errors=True)
                dirs += 1
        if messages or dirs:
            log(
                self.logger,
                logging.INFO,
                "pruned old records",
                inbox_messages=messages,
                task_dirs=dirs,
            )
        return {"inbox_messages": messages, "task_dirs": dirs}

    async def run_janitor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            try:
                self.prune()
            except RETRIED as exc:
                await self.health.retry_after(self.health.failed("janitor", exc))
                continue
            self.health.ok("janitor")
            await trio.sleep(3600.0)

    async def run_cert_renewal(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew at two thirds of the certificate's lifetime; retry every minute on failure."""
        task_status.started()
        while True:
            info = node_certificate_info(self.identity.node_cert)
            # Two thirds of the lifetime as issued (the start is back-dated for skew).
            issued = info.not_before_s + BACKDATE_S
            renew_at = issued + (info.not_after_s - issued) * 2 / 3
            wait = renew_at - self.clock.wall()
            if wait > 0:
                await trio.sleep(min(wait, 3600.0))
                continue
            try:
                await self.renew_certificate()
            except RETRIED as exc:
                # The new certificate could not be kept here (disk full...): the old one
                # stays in force, and the renewal is tried again.
                await self.health.retry_after(self.health.failed("cert_renewal", exc))
                continue
            except PopuliError as exc:
                log(
                    self.logger,
                    logging.WARNING,
                    "certificate renewal failed; retrying",
                    error=str(exc),
                )
                await trio.sleep(60.0)
                continue
            self.health.ok("cert_renewal")
            # Never renew more often than once a minute, whatever the lifetime.
            await trio.sleep(60.0)

    # -- lifetime -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_mono = self.clock.mono()
        self._leave_done = trio.Event()
        self._ensure_lifecycles()
        try:
            async with trio.open_nursery() as server_nursery:
                if self.serve:
                    await self._start_server(server_nursery)
                else:
                    self._publish_self_address()
                async with trio.open_nursery() as services:
                    for service in self.services():
                        await services.start(service)
                    services.start_soon(self._stop_after_leave)
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
            self.data_dir_lock.release()
            self.stopped.set()
            log(self.logger, logging.INFO, "agent stopped")

    async def _stop_after_leave(self) -> None:
        await self._leave_done.wait()
        # Let the leave answer reach the caller before the server goes.
        await trio.sleep(0.2)
        self.request_stop()

    def _ensure_lifecycles(self) -> None:
        """The control plane holds a lifecycle register for every node (the init node's
        is written here, on the first start)."""
        if not self.is_control_plane:
            return
        for member in self.membership.nodes():
            if self.registry.registers.lifecycle(
                member.id
            ) is None and not self.registry.registers.is_deleted(member.id):
                self.registry.set_initial(member.id, actor=self.node_id, term=self.term)

    def services(self) -> list[Callable[..., Any]]:
        """Long-running services, each ``async def run(*, task_status)``."""
        services: list[Callable[..., Any]] = [self.run_cert_renewal, self.run_janitor, self.gpu.run]
        if self.is_control_plane:
            services += [SelfBeat(self, self.heartbeats).run, self.leases.run]
        else:
            services.append(self.heartbeat_sender.run)
        services += [self.worker.run, self.submitter.run]
        return services

    async def shutdown_services(self) -> None:
        """Graceful steps before the services are cancelled (extended as features land)."""
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
        self.hypercorn = hconfig
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
        addresses = tuple(self.self_addresses())
        member = self.membership.get(self.node_id)
        if member is not None and member.addresses != addresses and self.is_control_plane:
            self.membership.upsert(
                replace(member, addresses=addresses, updated_ms=int(self.clock.wall() * 1000))
            )
        if self.is_control_plane and self.control_plane_url != self.url:
            self.store.set_meta("control_plane_url", self.url)


__all__ = ["Agent"]
