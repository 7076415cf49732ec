"""The agent: one trio process per node, and the composition root of its services.

It builds the store, the identity, the links to other nodes and the services, gives each
service exactly what it uses (stores, clock, config section, identity facts, links, other
services through the small Protocols the consumer defines, satisfied by the adapters in
:mod:`populi_peer.agent.wiring`), and wires what one service adds to another's work (a
part of the heartbeat, an answer to absorb). Beyond construction it holds only the route
list, the service list and the lifetime; a fact is read from the service that owns it
(``agent.control_plane.term``, ``agent.gpu.allocatable_gpus(node_id)``,
``agent.remote_work.enabled()``, ``agent.certificates.identity``, ``agent.address.url``).
No service imports this module.

``run()`` nests lifetimes: the API server outlives the services so that a stopping node
can still answer while its services wind down; shutdown is a deadline
(``api.shutdown_grace_s``), not a hope.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from enrollment.ca import certificate_public_key
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.attempts import AttemptRunner
from populi_peer.agent.certificates import CertificateRenewal
from populi_peer.agent.election import ElectionService, PeerElectionTransport, RoleServices
from populi_peer.agent.enrollment import Enrollment
from populi_peer.agent.executor import Executor, ProcessExecutor
from populi_peer.agent.gossip import HintGossip
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
)
from populi_peer.agent.holdings import NodeLedger, Reporting
from populi_peer.agent.inbox import Inbox
from populi_peer.agent.janitor import Janitor
from populi_peer.agent.leases import LeaseService
from populi_peer.agent.links import ControlPlaneLink, PeerLink
from populi_peer.agent.membership import Membership
from populi_peer.agent.metrics import Metrics
from populi_peer.agent.network import Network, TlsNetwork
from populi_peer.agent.nodes import Departure, NodeAdmin
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import ClusterWrites, Replica
from populi_peer.agent.revocations import RevocationState
from populi_peer.agent.settings_sync import SettingsSync
from populi_peer.agent.standing import RemoteWork, Standing
from populi_peer.agent.status import NodeStatus, Uptime
from populi_peer.agent.submitter import Submitter
from populi_peer.agent.voters import VoterAdmin
from populi_peer.agent.wiring import (
    AllWork,
    ControlPlaneNodeFacts,
    ExecNode,
    HintSource,
    check_stop_margin,
    node_figures,
)
from populi_peer.agent.worker import Worker
from populi_peer.api.app import ApiApp, Route
from populi_peer.api.auth import Authenticator
from populi_peer.api.client import PeerClient
from populi_peer.api.server import ReloadableConfig, hypercorn_config, serve_api
from populi_peer.clock import Clock, SystemClock, wall_ms
from populi_peer.cluster import first_voters_entry
from populi_peer.config import Config, format_host_port, parse_host_port, reach_host
from populi_peer.core.election import ElectionSettings
from populi_peer.core.settings import election_settings
from populi_peer.datadir_lock import DataDirLock
from populi_peer.discovery.node import NodeNetwork
from populi_peer.discovery.site import Site, with_site
from populi_peer.errors import PopuliError
from populi_peer.identity import RuntimeInfo, clear_runtime, load_identity, write_runtime
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import Store
from populi_peer.store.attempts import Attempts
from populi_peer.store.election import ElectionState
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
        check_stop_margin(config.exec, self.records.settings)
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
            is_revoked=self.revocations.is_revoked,
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
        # Records a majority of voters stored, into this node's tables (ADR 0017).
        self.replica = Replica(
            self.store,
            membership=self.membership,
            registry=self.registry,
            records=self.records,
            revocations=self.revocations,
            # The key a voter receives later is adopted by enrollment (ADR 0016).
            issuer=lambda: self.enrollment.identity.issuer,
            now_ms=lambda: wall_ms(clock),
        )
        # The control-plane election (ADR 0011, 0016): this node's machine, voter or not.
        self.election = ElectionService(
            node_id=self.node_id,
            clock=clock,
            state=ElectionState(self.store),
            events=self.events,
            settings=self._election_settings(self.records.settings),
            transport=PeerElectionTransport(self.peer_link),
            on_records=self.replica.apply,
        )
        self.cluster_writes = ClusterWrites(
            election=self.election, registry=self.registry, replica=self.replica
        )
        self.election.role_listeners.append(self.cluster_writes.role_changed)
        self.records.settings_listeners.append(
            lambda values: self.election.settings_changed(self._election_settings(values))
        )
        self._ensure_voter_record(identity)
        self.election.role_listeners.append(self.control_plane.role_changed)
        self.control_plane.authority = self.election.can_act
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
        # A voter follows only a voter of the signed voter record it holds; another node
        # (which holds none) a node whose member record has the voter role.
        self.control_plane.is_voter = lambda node_id: (
            node_id in held.voters
            if (held := self.election.voters) is not None
            else (m := self.membership.get(node_id)) is not None and "voter" in m.roles
        )
        self.control_plane.voters = lambda: [
            (m.id, m.addresses) for m in self.membership.nodes() if "voter" in m.roles
        ]
        self.control_plane.url_of = lambda node_id: (
            self.address.url
            if node_id == self.node_id
            else (
                f"https://{m.addresses[0]}"
                if (m := self.membership.get(node_id)) and m.addresses
                else None
            )
        )
        self.election.url_of = self.control_plane.url_of
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
            writes=self.cluster_writes,
        )
        self.voter_admin = VoterAdmin(
            node_id=self.node_id,
            node_key=identity.node_key,
            clock=clock,
            election=self.election,
            membership=self.membership,
            control_plane=self.control_plane,
            events=self.events,
        )
        self.enrollment.joined_listeners.append(self.voter_admin.joined)
        self.certificates = CertificateRenewal(
            identity=identity,
            clock=clock,
            control_plane=self.control_plane,
            issue_own=self.enrollment.issue_own_certificate,
            health=self.health,
            on_renewed=[self._reload_tls],
            revoked=self.revocations.is_certificate_revoked,
        )
        self.executor: Executor = executor or ProcessExecutor()
        # -- heartbeats and GPUs -------------------------------------------------------
        #: The control plane's book of heartbeats (liveness, scope, what each node said).
        self.heartbeats = Liveness(clock=clock, timings=self.net.timings)
        self.outbox = RegisterOutbox()
        self.leave_state = Leaving(node_id=self.node_id, clock=clock, events=self.events)
        # -- what this node holds: its book over the store, its reports (ADR 0015) -----
        self.ledger = NodeLedger(node_id=self.node_id, attempts=Attempts(self.store), clock=clock)
        self.reporting = Reporting(
            node_id=self.node_id,
            store=self.store,
            ledger=self.ledger,
            clock=clock,
            stop_attempt=lambda *a: self.runner.stop_lost(*a),  # noqa: PLW0108 (built later)
        )
        self.runner = AttemptRunner(
            node_id=self.node_id,
            tasks_dir=identity.paths.tasks,
            attempts=Attempts(self.store),
            clock=clock,
            control_plane=self.control_plane,
            executor=self.executor,
            config=config.exec,
            health=self.health,
            start_check=self.ledger.start,
            claim_convert=self.ledger.convert,
        )
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
            leased_gpus=self.runner.held_gpus,
            own_pids=self.runner.own_pids,
            writes=self.cluster_writes,
            book_busy=lambda node_id: self.leases.busy_on(node_id),  # noqa: PLW0108 (built later)
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
            writes=self.cluster_writes,
            rank=self.net.address_book.candidates,
        )
        self._build_execution()
        self.heartbeat_reports = HeartbeatReports(
            address=self.address,
            revocations=self.revocations,
            membership=self.membership,
            records=self.records,
            uptime_s=self.uptime.seconds,
            exec_remote=bool(config.exec.remote),
            parts=(self.worker.report_part, self.gpu.report_part, self.reporting.part),
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
            report_listeners=(self.gpu.hold_report, self.voter_admin.heard),
            answer_parts=(self.gpu.answer_part,),
            exchanges=(lambda *a: self.leases.heartbeat_exchange(*a),),  # noqa: PLW0108 (built later)
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
        self.runner.report_needed = self.heartbeat_sender.beat_soon
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
            stop_all_work=AllWork(submitter=self.submitter, worker=self.worker).stop,
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
            writes=self.cluster_writes,
        )
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
            election=self.election,
            names=lambda node_id: m.name if (m := self.membership.get(node_id)) else None,
            metrics_url=lambda: self.metrics.url,
        )
        # Hint gossip: this node's signed hint, and the cluster's, peer to peer (ADR 0010).
        self.gossip = HintGossip(
            node_id=self.node_id,
            node_key=identity.node_key,
            clock=clock,
            store=self.store,
            config=config.gossip,
            max_skew_s=config.security.max_skew_s,
            membership=self.membership,
            registry=self.registry,
            revocations=self.revocations,
            peers=self.peer_link,
            body=HintSource(
                roles=tuple(sorted(identity.roles)),
                node_status=self.node_status,
                remote_work=self.remote_work,
                runner=self.runner,
                address=self.address,
                gpu=self.gpu,
            ).body,
            timeout_s=config.api.request_timeout_s,
        )
        self.janitor = Janitor(
            clock=clock,
            retain_finished_s=config.exec.retain_finished_s,
            inbox=InboxMessages(self.store),
            attempts=Attempts(self.store),
            task_dir=self.runner.stored_task_dir,
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
        self.metrics = Metrics(
            config=config.metrics,
            figures=node_figures(
                node_id=self.node_id,
                control_plane=self.control_plane,
                membership=self.membership,
                registry=self.registry,
                liveness=self.heartbeats,
                gpu=self.gpu,
                gossip=self.gossip,
                leases=self.leases,
                runner=self.runner,
            ),
            gossip=self.gossip,
            health=self.health,
        )
        self.app.observers.append(self.metrics.observe)
        self.submitter.finished_listeners.append(self.metrics.task_finished)
        self._stop = trio.Event()
        self._server_stop = trio.Event()
        self.stopped = trio.Event()

    def _build_execution(self) -> None:
        """The execution plane: the inbox, the lease service (control plane), the worker
        and the submitter, each given what it uses (the attempt runner they share is
        built before the GPU service, which reads what it runs)."""
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
            # A task queued for a free GPU is re-placed when the hints change.
            capacity_changed=lambda: self.gossip.changed,
        )
        self.inbox.on("handoff", self.worker.on_handoff)
        self.inbox.on("cancel", self.worker.on_cancel)
        self.inbox.on("result", self.submitter.on_result)

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

    def _reload_tls(self) -> None:
        if self.hypercorn is not None:
            self.hypercorn.reload_certificate()

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
            *self.gossip.routes(),
            *self.settings_sync.routes(),
            *self.node_status.routes(),
            *self.election.routes(),
            *self.voter_admin.routes(),
        ]

    # -- lifetime -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        self.uptime.start()
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
                        url=self.address.url,
                        control_plane=self.control_plane.is_self,
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
                clear_runtime(self.certificates.identity.paths, os.getpid())
            self.store.close()
            self.data_dir_lock.release()
            self.stopped.set()
            log(self.logger, NOTICE, "agent stopped")

    async def _stop_after_leave(self) -> None:
        await self.leave_state.done.wait()
        # Let the leave answer reach the caller before the server goes.
        await trio.sleep(0.2)
        self.request_stop()

    def _election_settings(self, values: dict[str, Any]) -> ElectionSettings:
        return election_settings(values, max_skew_ms=int(self.config.security.max_skew_s * 1000))

    def _ensure_voter_record(self, identity: Any) -> None:
        """A data directory made by ``populi init`` before the election existed holds no
        voter set: its control plane becomes the sole voter (it was the only authority)."""
        if self.control_plane.named_self and not self.election.state.has_voters():
            self.election.state.bootstrap(
                first_voters_entry(
                    node_id=self.node_id,
                    node_key=identity.node_key,
                    actor=self.node_id,
                    now_ms=wall_ms(self.clock),
                )
            )

    def _leading_services(self) -> list[Callable[..., Any]]:
        """While this node acts as control plane: its own heartbeat and the lease table."""
        self.reporting.to_self = True
        # A table of an earlier term of this node's must not grant under this one.
        self.leases.forget()
        self_beat = SelfBeat(
            intake=self.heartbeat_intake,
            reports=self.heartbeat_reports,
            health=self.health,
            interval_s=self.net.timings.local.heartbeat_interval_s,
            also=(self._report_to_self,),
        )
        return [self_beat.run, self.leases.run]

    def _following_services(self) -> list[Callable[..., Any]]:
        """While another node does: heartbeats to it."""
        self.reporting.to_self = False
        self.leases.forget()
        return [self.heartbeat_sender.run]

    def services(self) -> list[Callable[..., Any]]:
        """Long-running services, each ``async def run(*, task_status)``."""
        by_role = RoleServices(
            is_leader=lambda: self.control_plane.is_self,
            changed=self.election.wait_changed,
            leading=self._leading_services,
            following=self._following_services,
        )
        services: list[Callable[..., Any]] = [
            # First: a lone voter leads once its machine started.
            self.election.run,
            self.replica.run,
            self.cluster_writes.run,
            self.voter_admin.run,
            self.certificates.run,
            self.janitor.run,
            self.gpu.run,
            by_role.run,
        ]
        services += [self.worker.run, self.submitter.run, self.net.discovery_service()]
        if self.config.gossip.enabled:
            services.append(self.gossip.run)
        if self.serve and self.config.metrics.enabled:
            services.append(self.metrics.run)
        return services

    async def shutdown_services(self) -> None:
        """Graceful steps before the services are cancelled (extended as features land)."""
        await trio.lowlevel.checkpoint()

    async def _start_server(self, nursery: trio.Nursery) -> None:
        host, port = self.config.listen_address()
        hconfig = hypercorn_config(
            host=host,
            port=port,
            certfile=self.certificates.identity.paths.node_cert,
            keyfile=self.certificates.identity.paths.node_key,
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
            self.certificates.identity.paths,
            RuntimeInfo(
                pid=os.getpid(),
                url=self.address.url,
                node_id=self.node_id,
                started_wall_s=self.clock.wall(),
            ),
        )
        log(self.logger, logging.INFO, "api listening", binds=binds, url=self.address.url)

    def _publish_self_address(self) -> None:
        """Keep our own member record (and, on the control plane, its URL) in step with the
        address we actually serve on (a listen port of 0 is only known after binding)."""
        addresses = self.address.addresses()
        member = self.membership.get(self.node_id)
        if member is not None and member.addresses != addresses and self.control_plane.named_self:
            self.membership.upsert(
                replace(member, addresses=addresses, updated_ms=wall_ms(self.clock))
            )
        self.control_plane.publish_url(self.address.url)


def build_agent(*, data_dir: Path, config: Config) -> Agent:
    """The agent as ``populi agent`` runs it: real clock, TLS network, HTTPS server, this
    machine's interfaces (its tunnel networks count as overlay: docs/wan.md)."""
    site = Site.detect()
    return Agent(data_dir=data_dir, config=with_site(config, site), clock=SystemClock(), site=site)


__all__ = ["Agent", "build_agent"]
