"""The agent: one trio process per node.

It owns the store, the identity, the API and the services, and it is where they are put
together: each service is given exactly what it uses (stores, clock, config section,
identity facts, links to other nodes, other services through small callables), and what
one service adds to another's work — a part of the heartbeat, an answer to absorb — is
wired here. ``run()`` nests lifetimes: the API server outlives the services so that a
stopping node can still answer while its services wind down; shutdown is a deadline
(``api.shutdown_grace_s``), not a hope.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from enrollment.ca import certificate_public_key
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.attempts import AttemptPlan, AttemptRunner
from populi_peer.agent.certificates import CertificateRenewal
from populi_peer.agent.enrollment import Enrollment
from populi_peer.agent.executor import Executor, ProcessExecutor
from populi_peer.agent.gpu import GpuService
from populi_peer.agent.health import RETRIED, Health
from populi_peer.agent.heartbeat import (
    HeartbeatIntake,
    HeartbeatReports,
    HeartbeatSender,
    Leaving,
    Liveness,
    RegisterOutbox,
    SelfBeat,
    scope_of,
)
from populi_peer.agent.holdings import NodeLedger, Reporting
from populi_peer.agent.inbox import Inbox
from populi_peer.agent.janitor import Janitor
from populi_peer.agent.leases import LeaseService
from populi_peer.agent.links import UNKNOWN_SIGNER_ATTEMPTS, ControlPlaneLink, PeerLink
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.network import Network, TlsNetwork
from populi_peer.agent.nodes import Departure, NodeAdmin
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.agent.settings_sync import SettingsSync
from populi_peer.agent.standing import RemoteWork, Standing
from populi_peer.agent.status import NodeStatus, Uptime
from populi_peer.agent.submitter import Submitter
from populi_peer.agent.worker import Worker
from populi_peer.api.app import ApiApp, Route
from populi_peer.api.auth import Authenticator, Principal
from populi_peer.api.client import PeerClient
from populi_peer.api.server import ReloadableConfig, hypercorn_config, serve_api
from populi_peer.clock import Clock, wall_ms
from populi_peer.config import Config, ScopeConfig, format_host_port, parse_host_port, reach_host
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import EventKind, HeartbeatReport
from populi_peer.core.scope import Scope
from populi_peer.datadir_lock import DataDirLock
from populi_peer.discovery.node import NodeNetwork
from populi_peer.discovery.site import Site
from populi_peer.errors import ConfigError, PopuliError
from populi_peer.identity import Identity, RuntimeInfo, clear_runtime, load_identity, write_runtime
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import Store
from populi_peer.store.attempts import Attempts
from populi_peer.store.events import EventLog
from populi_peer.store.inbox import InboxMessages
from populi_peer.store.leases import Leases
from populi_peer.store.tasks import Tasks


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
        site: Site | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.clock = clock
        self.serve = serve
        self.logger = get_logger("agent")
        # One agent per data directory, before anything is opened (datadir_lock).
        self.data_dir_lock = DataDirLock.acquire(data_dir)
        self.store = Store.open(data_dir)
        self.events = EventLog(self.store)
        # Writes the storage cannot take make the node degraded until one succeeds.
        self.health = Health(clock)
        self.store.write_listener = self.health.storage_result
        identity = load_identity(data_dir, self.store)
        self.node_id = identity.node_id
        self.membership = Membership(self.store)
        self.records = ClusterRecords(self.store, self.membership)
        self.revocations = RevocationState(
            self.store,
            cluster_id=identity.cluster_id,
            cluster_key=certificate_public_key(identity.ca_cert),
        )
        self.registry = Registry(self.store, identity, clock, max_skew_s=config.security.max_skew_s)
        self._check_stop_margin()
        self.network = network or TlsNetwork(
            identity.paths.ca_cert, revoked=self.revocations.is_certificate_revoked
        )
        self.peers = PeerClient(
            credential=identity.node_credential,
            clock=clock,
            transport=self.network.transport_for(self.node_id),
            timeout_s=config.api.request_timeout_s,
            # Every call names the node it means to reach; a revoked one is never called,
            # and no other node's answer is taken (docs/adr/0009).
            is_revoked=self.is_revoked,
        )
        self.control_plane = ControlPlaneLink(
            node_id=self.node_id, store=self.store, client=self.peers
        )
        self.peer_link = PeerLink(
            node_id=self.node_id,
            membership=self.membership,
            control_plane=self.control_plane,
            client=self.peers,
        )
        # Timings by scope, advertised addresses, LAN discovery (docs/wan.md).
        self.net = NodeNetwork(
            config=config,
            site=site or Site(),
            node_id=self.node_id,
            cluster_id=identity.cluster_id,
            roles=identity.roles,
            ca_pin=self.store.get_meta("ca_pin"),
            control_plane=lambda: (
                self.store.get_meta("control_plane_id", "") or "",
                self.store.get_meta("control_plane_url", "") or "",
            ),
            member_addresses=lambda node_id: (
                m.addresses if (m := self.membership.get(node_id)) else ()
            ),
        )
        self.peer_link.rank = self.net.address_book.candidates
        self.address = OwnAddress.from_plan(config, self.net, url)
        self.uptime = Uptime(clock)
        self.hypercorn: ReloadableConfig | None = None
        self.standing = Standing(
            node_id=self.node_id,
            node_name=identity.node_name,
            clock=clock,
            revocations=self.revocations,
            membership=self.membership,
            registry=self.registry,
            max_skew_s=config.security.max_skew_s,
        )
        self.remote_work = RemoteWork(
            exec_remote=config.exec.remote, records=self.records, standing=self.standing
        )
        self.enrollment = Enrollment(
            identity=identity,
            clock=clock,
            store=self.store,
            security=config.security,
            control_plane=self.control_plane,
            address=self.address,
            membership=self.membership,
            registry=self.registry,
            revocations=self.revocations,
            records=self.records,
            events=self.events,
        )
        self.certificates = CertificateRenewal(
            identity=identity,
            clock=clock,
            control_plane=self.control_plane,
            issue_own=self.enrollment.issue_own_certificate,
            health=self.health,
            on_renewed=[self._reload_tls],
        )
        self.executor: Executor = executor or ProcessExecutor()
        # -- heartbeats and GPUs -------------------------------------------------------
        #: The control plane's book of heartbeats (liveness, scope, what each node said).
        self.heartbeats = Liveness(clock=clock, timings=self.net.timings)
        self.outbox = RegisterOutbox()
        self.leave_state = Leaving(node_id=self.node_id, clock=clock, events=self.events)
        self.gpu = GpuService(
            node_id=self.node_id,
            config=config.gpu,
            clock=clock,
            control_plane=self.control_plane,
            membership=self.membership,
            registry=self.registry,
            events=self.events,
            health=self.health,
            outbox=self.outbox,
            liveness=self.heartbeats,
            leased_gpus=self._leased_gpus,
            own_pids=lambda: self.worker.own_pids(),  # noqa: PLW0108 (built later)
        )
        # -- what this node holds: its book over the store, its reports (ADR 0015) -----
        self.ledger = NodeLedger(node_id=self.node_id, attempts=Attempts(self.store), clock=clock)
        self.reporting = Reporting(
            node_id=self.node_id,
            store=self.store,
            ledger=self.ledger,
            clock=clock,
            stop_attempt=lambda *a: self.runner.stop_lost(*a),  # noqa: PLW0108 (built later)
        )
        self.heartbeat_reports = HeartbeatReports(
            address=self.address,
            revocations=self.revocations,
            membership=self.membership,
            records=self.records,
            uptime_s=self.uptime.seconds,
            exec_remote=bool(config.exec.remote),
            parts=[self._held_leases_part, self.gpu.report_part, self.reporting.part],
        )
        self.heartbeat_intake = HeartbeatIntake(
            clock=clock,
            control_plane=self.control_plane,
            address=self.address,
            liveness=self.heartbeats,
            scope=config.scope,
            membership=self.membership,
            registry=self.registry,
            records=self.records,
            revocations=self.revocations,
            events=self.events,
            report_listeners=[self.gpu.hold_report],
            answer_parts=[self.gpu.answer_part],
            exchanges=[lambda *a: self.leases.heartbeat_exchange(*a)],  # noqa: PLW0108 (built later)
        )
        self.heartbeat_sender = HeartbeatSender(
            clock=clock,
            control_plane=self.control_plane,
            reports=self.heartbeat_reports,
            outbox=self.outbox,
            leaving=self.leave_state,
            scope=config.scope,
            timings=self.net.timings,
            address_book=self.net.address_book,
            revocations=self.revocations,
            records=self.records,
            membership=self.membership,
            sync_members=self.peer_link.sync_members,
            out_of_cluster=self.standing.learn,
            health=self.health,
            answer_listeners=[self.gpu.absorb_answer, self.reporting.absorb],
        )
        self.reporting.beat_soon = self.heartbeat_sender.beat_soon
        # The control plane seen by discovery while it does not answer: beat at once.
        self.net.sightings.listeners.append(self.heartbeat_sender.on_sighting)
        self.departure = Departure(
            node_id=self.node_id,
            clock=clock,
            control_plane=self.control_plane,
            registry=self.registry,
            events=self.events,
            outbox=self.outbox,
            leaving=self.leave_state,
            beat=self.heartbeat_sender.beat_once,
            stop_all_work=self.stop_all_work,
            timeout_s=config.api.request_timeout_s,
        )
        self.node_admin = NodeAdmin(
            clock=clock,
            control_plane=self.control_plane,
            membership=self.membership,
            registry=self.registry,
            events=self.events,
            liveness=self.heartbeats,
            gpu_view=self.gpu.view,
            departure=self.departure,
        )
        self.settings_sync = SettingsSync(
            identity=identity,
            clock=clock,
            store=self.store,
            records=self.records,
            membership=self.membership,
            registry=self.registry,
            events=self.events,
            control_plane=self.control_plane,
            peers=self.peers,
            timeout_s=config.api.request_timeout_s,
            rank=self.net.address_book.candidates,
        )
        self._build_execution(identity.paths.tasks)
        self.node_status = NodeStatus(
            identity=identity,
            listen=config.node.listen,
            address=self.address,
            uptime=self.uptime,
            control_plane=self.control_plane,
            contact=self.heartbeat_sender,
            registry=self.registry,
            standing=self.standing,
            revocations=self.revocations,
            health=self.health,
            cert_not_after_s=lambda: self.certificates.not_after_s,
            network=self.net.status_json,
        )
        self.janitor = Janitor(
            clock=clock,
            retain_finished_s=config.exec.retain_finished_s,
            inbox=InboxMessages(self.store),
            attempts=Attempts(self.store),
            task_dir=self._task_dir,
            leftovers=self.executor.leftovers,
            health=self.health,
        )
        self.authenticator = Authenticator(
            node_id=self.node_id,
            clock=clock,
            skew_s=config.security.max_skew_s,
            lookup=self.standing.signer,
            is_revoked=self.standing.refuses_signer,
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

    def _build_execution(self, tasks_dir: Path) -> None:
        """The execution plane: the inbox, the lease service (control plane), the attempt
        runner, the worker and the submitter, each given what it uses."""
        clock, config = self.clock, self.config
        self.inbox = Inbox(node_id=self.node_id, messages=InboxMessages(self.store), clock=clock)
        self.leases = LeaseService(
            leases=Leases(self.store),
            clock=clock,
            control_plane=self.control_plane,
            records=self.records,
            nodes=ControlPlaneNodeFacts(
                membership=self.membership,
                registry=self.registry,
                liveness=self.heartbeats,
                gpu=self.gpu,
            ),
            events=self.events,
            health=self.health,
        )
        self.runner = AttemptRunner(
            node_id=self.node_id,
            tasks_dir=tasks_dir,
            attempts=Attempts(self.store),
            clock=clock,
            control_plane=self.control_plane,
            executor=self.executor,
            config=config.exec,
            health=self.health,
            start_check=self.ledger.start,
            claim_convert=self.ledger.convert,
        )
        self.runner.report_needed = self.heartbeat_sender.beat_soon
        node = ExecNode(
            remote_work=self.remote_work,
            standing=self.standing,
            membership=self.membership,
            gpu=self.gpu,
            settings_sync=self.settings_sync,
            scope=config.scope,
            leaving_state=self.leave_state,
        )
        self.worker = Worker(
            node_id=self.node_id,
            runner=self.runner,
            attempts=self.runner.attempts,
            clock=clock,
            config=config.exec,
            control_plane=self.control_plane,
            peers=self.peer_link,
            gates=node,
            health=self.health,
            accept_check=self.ledger.accepts,
        )
        self.submitter = Submitter(
            node_id=self.node_id,
            tasks=Tasks(self.store),
            runner=self.runner,
            clock=clock,
            control_plane=self.control_plane,
            peers=self.peer_link,
            records=self.records,
            node=node,
            health=self.health,
            ledger=self.ledger,
        )
        self.inbox.on("handoff", self.worker.on_handoff)
        self.inbox.on("cancel", self.worker.on_cancel)
        self.inbox.on("result", self.submitter.on_result)

    # -- wiring between the planes --------------------------------------------------------

    def _held_leases_part(self, report: HeartbeatReport) -> HeartbeatReport:
        """The worker's held leases in this node's heartbeat."""
        return replace(report, leases=self.worker.held_leases())

    def _report_to_self(self) -> None:
        """The control plane's own full report and changes, to its own lease table (a
        storage failure is the self-beat's to retry; anything else only logged)."""
        try:
            self.reporting.take(self.leases.incarnation(), None)
            message = self.reporting.outgoing()
            if message is not None:
                answer = self.leases.receive_report(self.node_id, message)
                self.reporting.take(message.incarnation, answer)
        except RETRIED:
            raise
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "own report not taken", error=str(exc))

    def _leased_gpus(self) -> frozenset[str]:
        """The GPUs this node's running attempts hold."""
        return frozenset(g for running in self.runner.running.values() for g in running.plan.gpus)

    def _task_dir(self, body: Mapping[str, Any]) -> Path:
        return self.runner.task_dir(AttemptPlan.from_json(dict(body)))

    def _reload_tls(self) -> None:
        if self.hypercorn is not None:
            self.hypercorn.reload_certificate()

    async def stop_all_work(self, reason: str) -> int:
        """Stop every task this node runs and release their leases; returns how many."""
        local = await self.submitter.stop_all(reason)
        remote = await self.worker.stop_all(reason)
        return local + remote

    # -- identity facts (read by the execution plane) -------------------------------------

    @property
    def identity(self) -> Identity:
        """This node's identity with the certificate in force now."""
        return self.certificates.identity

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def leaving(self) -> bool:
        return self.leave_state.started

    @property
    def term(self) -> int:
        return self.control_plane.term

    @property
    def control_plane_id(self) -> str:
        return self.control_plane.id

    @property
    def control_plane_url(self) -> str:
        return self.control_plane.url

    @property
    def is_control_plane(self) -> bool:
        return self.control_plane.is_self

    def is_revoked(self, principal_id: str) -> bool:
        return self.revocations.is_revoked(principal_id)

    def lookup_principal(self, principal_id: str) -> Principal | None:
        return self.standing.signer(principal_id)

    def require_control_plane(self) -> None:
        self.control_plane.require_self()

    # -- routes ---------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            *self.enrollment.routes(),
            *self.heartbeat_intake.routes(),
            *self.node_admin.routes(),
            *self.inbox.routes(),
            *self.leases.routes(),
            *self.worker.routes(),
            *self.submitter.routes(),
            *self.gpu.routes(),
            *self.settings_sync.routes(),
            *self.node_status.routes(),
        ]

    # -- facts read through the agent (tests and tools; no service asks for them) ---------

    def record_event(
        self,
        node_id: str,
        kind: EventKind,
        *,
        actor: str,
        reason: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=node_id,
            kind=kind,
            actor=actor,
            reason=reason,
            detail=detail,
        )

    async def sync_members(self) -> None:
        await self.peer_link.sync_members()

    async def peer_member(self, node_id: str) -> Member | None:
        return await self.peer_link.member(node_id)

    async def call_member(
        self,
        member: Member,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        attempts: int = UNKNOWN_SIGNER_ATTEMPTS,
    ) -> dict[str, Any]:
        return await self.peer_link.call(member, method, path, payload, attempts=attempts)

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        return self.gpu.allocatable_gpus(node_id)

    def verified_gpu_uuids(self) -> list[str]:
        return self.gpu.verified_uuids()

    def remote_enabled(self) -> bool:
        return self.remote_work.enabled()

    def policy_gates(self) -> frozenset[tuple[str, str]]:
        return self.records.policy_gates()

    # -- lifetime -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        self.uptime.start()
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
                    log(self.logger, NOTICE, "agent stopping")
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
            log(self.logger, NOTICE, "agent stopped")

    async def _stop_after_leave(self) -> None:
        await self.leave_state.done.wait()
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
        services: list[Callable[..., Any]] = [
            self.certificates.run,
            self.janitor.run,
            self.gpu.run,
        ]
        if self.is_control_plane:
            self.reporting.to_self = True
            self_beat = SelfBeat(
                intake=self.heartbeat_intake,
                reports=self.heartbeat_reports,
                health=self.health,
                interval_s=self.net.timings.local.heartbeat_interval_s,
                also=[self._report_to_self],
            )
            services += [self_beat.run, self.leases.run]
        else:
            services.append(self.heartbeat_sender.run)
        services += [self.worker.run, self.submitter.run, self.net.discovery_service()]
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
        if not self.net.replan((host, bound_port)).addresses:
            self.address.url = f"https://{format_host_port(reach_host(bound_host), bound_port)}"
        elif not self.config.node.advertise:
            self.address.url = f"https://{self.net.plan.addresses[0]}"
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
        addresses = self.address.addresses()
        member = self.membership.get(self.node_id)
        if member is not None and member.addresses != addresses and self.is_control_plane:
            self.membership.upsert(
                replace(member, addresses=addresses, updated_ms=wall_ms(self.clock))
            )
        self.control_plane.publish_url(self.url)


# -- what the execution plane reads of the rest of the node (the composition root's) --------


@dataclass(frozen=True)
class ControlPlaneNodeFacts:
    """:class:`~populi_peer.agent.leases.NodeFacts` from membership, the lifecycle
    registers, the control plane's book of heartbeats and the GPU service."""

    membership: Membership
    registry: Registry
    liveness: Liveness
    gpu: GpuService

    def is_node(self, node_id: str) -> bool:
        member = self.membership.get(node_id)
        return member is not None and member.kind == "node"

    def resolve_node(self, ref: str) -> str:
        if self.membership.get(ref) is not None:
            return ref
        return self.membership.resolve_node(ref).id

    def lifecycle(self, node_id: str) -> NodeLifecycle | None:
        return self.registry.lifecycle(node_id)

    def heartbeat_age_ms(self, node_id: str) -> int | None:
        return self.liveness.age_ms(node_id)

    def stale_after_ms(self, node_id: str) -> int:
        return int(self.liveness.stale_after_s(node_id) * 1000)

    def stale(self, node_id: str) -> bool:
        return self.liveness.stale(node_id)

    def scope(self, node_id: str) -> Scope | None:
        return self.liveness.scope(node_id)

    def accepts_remote_work(self, node_id: str) -> bool | None:
        return self.liveness.accepts_remote_work(node_id)

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        return self.gpu.allocatable_gpus(node_id)


@dataclass(frozen=True)
class ExecNode:
    """:class:`~populi_peer.agent.worker.WorkerGates` and
    :class:`~populi_peer.agent.submitter.SubmitterNode`: what the rest of this node tells
    its worker and its submitter."""

    remote_work: RemoteWork
    standing: Standing
    membership: Membership
    gpu: GpuService
    settings_sync: SettingsSync
    scope: ScopeConfig
    leaving_state: Leaving

    def retired(self) -> bool:
        return self.standing.out

    def leaving(self) -> bool:
        return self.leaving_state.started

    def remote_enabled(self) -> bool:
        return self.remote_work.enabled()

    def verified_gpu_uuids(self) -> list[str]:
        return self.gpu.verified_uuids()

    async def catch_up_settings(self, serial: int | None) -> None:
        await self.settings_sync.catch_up(serial)

    def resolve_node(self, ref: str) -> str:
        return self.membership.resolve_node(ref).id

    def scope_of(self, host: str | None) -> Scope:
        return scope_of(self.scope, host)


__all__ = ["Agent", "ControlPlaneNodeFacts", "ExecNode"]
