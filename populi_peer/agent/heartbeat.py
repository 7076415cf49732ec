"""Heartbeats over HTTP: every node tells the control plane it is alive, every interval.

Sender (every node but the control plane, which notes its own liveness in process): POST
``/v1/populi/heartbeat`` with status, addresses, GPU summary, held leases, and the serials
it holds (revocations, membership, settings). The answer carries the term, the node's
lifecycle as the control plane sees it, and whatever the node lacks: a newer revocation
list or settings record inline, a newer membership version to pull. Failures back off
exponentially with jitter; a control plane that goes away is logged once, and once again
when it comes back.

Receiver (control plane): arrival times live in memory on the monotonic clock, so
staleness is derived when read (``heartbeat_age_ms``), never stored; after a restart every
node reads ``heartbeat_never`` until its next heartbeat. The path scope of a node is derived
from the address its heartbeat came from.

Both ends speak typed messages (:mod:`populi_peer.core.messages.heartbeat`): the sender
builds a :class:`HeartbeatReport` and parses the answer as a :class:`HeartbeatAnswer` (a
malformed answer is a ``bad_peer_answer`` error for that beat, like an unreachable control
plane); the route parses the report before the handler runs and writes the typed answer.
The agent's hooks (``heartbeat_report``, ``on_heartbeat``, ``heartbeat_answer_extras``,
``on_heartbeat_answer``) still take and give the wire form, until they are converted too.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from populi_peer import __version__
from populi_peer.agent.health import RETRIED
from populi_peer.agent.membership import Member
from populi_peer.api.app import Request, Route
from populi_peer.config import parse_host_port
from populi_peer.core.eligibility import heartbeat_age_ms, is_stale
from populi_peer.core.messages import (
    ControlPlaneRef,
    GpuHeartbeatSummary,
    HeartbeatAnswer,
    HeartbeatReport,
    HeldLease,
)
from populi_peer.core.messages.heartbeat import HeartbeatStatus
from populi_peer.core.registers import LIFECYCLE, RegisterWrite
from populi_peer.core.scope import Scope, path_scope
from populi_peer.errors import BadRequest, Forbidden, PopuliError
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

NODE_ROLES = frozenset({"worker", "submit", "voter", "operator"})
MAX_BACKOFF_S = 30.0


@dataclass
class Seen:
    last_mono: float
    address: str | None
    scope: Scope
    status: str
    report: HeartbeatReport


def scope_of(agent: Agent, address: str | None) -> Scope:
    """Scope of the path to ``address`` under this node's CIDR config; names and unknown
    addresses count as overlay (the most patient timings)."""
    if not address:
        return "overlay"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "overlay"
    scope_cfg = agent.config.scope
    try:
        return path_scope(
            address,
            lan_cidrs=scope_cfg.lan_cidrs,
            overlay_cidrs=scope_cfg.overlay_cidrs,
            local_cidrs=scope_cfg.local_cidrs,
        )
    except PopuliError:
        return "overlay"


def url_host(url: str) -> str | None:
    try:
        return parse_host_port(url.removeprefix("https://").removeprefix("http://").split("/")[0])[
            0
        ]
    except ValueError:
        return None


class HeartbeatReceiver:
    """Control-plane side."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.seen: dict[str, Seen] = {}
        self.logger = get_logger("heartbeat")

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/heartbeat",
                self._heartbeat,
                roles=NODE_ROLES,
                name="heartbeat",
                request=HeartbeatReport,
                answer=HeartbeatAnswer,
            )
        ]

    def timings(self, scope: Scope) -> tuple[float, float]:
        timing = getattr(self.agent.config.timings, scope)
        return timing.heartbeat_interval_s, timing.stale_after_s

    def note_self(self) -> None:
        self.seen[self.agent.node_id] = Seen(
            self.agent.clock.mono(), "127.0.0.1", "local", "running", build_report(self.agent)
        )

    def age_ms(self, node_id: str) -> int | None:
        seen = self.seen.get(node_id)
        return heartbeat_age_ms(None if seen is None else seen.last_mono, self.agent.clock.mono())

    def stale(self, node_id: str) -> bool:
        seen = self.seen.get(node_id)
        scope = seen.scope if seen else "lan"
        _, stale_after = self.timings(scope)
        return is_stale(self.age_ms(node_id), int(stale_after * 1000))

    async def _heartbeat(self, request: Request) -> HeartbeatAnswer:
        agent = self.agent
        agent.require_control_plane()
        caller = request.caller
        member = agent.membership.get(caller.id)
        if member is None or member.kind != "node":
            raise Forbidden("heartbeats come from nodes", code="not_a_node")
        report = request.message(HeartbeatReport)
        _check_addresses(report.addresses)
        address = request.client[0] if request.client else None
        scope = scope_of(agent, address)
        for write in report.registers:  # everything is checked before anything is applied
            if write.node_id != caller.id or write.writer_class != "self":
                raise Forbidden(
                    "a node may only send registers about itself, as itself",
                    code="writer_not_allowed",
                )
        self.seen[caller.id] = Seen(agent.clock.mono(), address, scope, report.status, report)
        self._update_member(member, report)
        for write in report.registers:
            before = agent.registry.lifecycle(caller.id)
            if agent.registry.apply(write) and write.attribute == LIFECYCLE:
                after = agent.registry.lifecycle(caller.id)
                agent.record_event(
                    caller.id,
                    "lifecycle",
                    actor=caller.id,
                    reason=write.reason,
                    detail={
                        "command": "leave" if after and after.state == "left" else "self",
                        "from": before.state if before else None,
                        "to": after.state if after else None,
                    },
                )
            elif write.attribute != LIFECYCLE:
                agent.on_self_register(write)
        wire_report = report.to_json()  # the agent's hooks still take the wire form
        await agent.on_heartbeat(caller.id, wire_report)
        interval, stale_after = self.timings(scope)
        extras = agent.heartbeat_answer_extras(caller.id, wire_report)
        settings_record = agent.records.settings_record
        return HeartbeatAnswer(
            term=agent.term,
            control_plane=ControlPlaneRef(node_id=agent.node_id, url=agent.url),
            membership_version=agent.membership.version,
            lifecycle=agent.registry.lifecycle(caller.id),
            scope=scope,
            heartbeat_interval_s=interval,
            stale_after_s=stale_after,
            revocation_serial=agent.revocations.serial,
            revocations=agent.revocations.text
            if report.revocation_serial < agent.revocations.serial
            else None,
            settings_serial=agent.records.settings_serial,
            settings_record=settings_record.text
            if settings_record and report.settings_serial < agent.records.settings_serial
            else None,
            gpu_facts_version=extras.get("gpu_facts_version"),
            gpu_registers=tuple(
                RegisterWrite.from_json(r) for r in extras.get("gpu_registers", [])
            ),
        )

    def _update_member(self, member: Member, report: HeartbeatReport) -> None:
        addresses = report.addresses
        if addresses and addresses != member.addresses:
            self.agent.membership.upsert(
                replace(member, addresses=addresses, updated_ms=int(self.agent.clock.wall() * 1000))
            )


def _check_addresses(addresses: tuple[str, ...]) -> None:
    """Each advertised address is ``host:port`` by the config's rule (the message checked
    that there are at most 8 strings of 1-261 characters)."""
    for address in addresses:
        try:
            parse_host_port(address)
        except ValueError as exc:
            raise BadRequest(
                f"heartbeat address {address!r}: {exc}", code="bad_request", field="addresses"
            ) from exc


def build_report(
    agent: Agent,
    status: HeartbeatStatus = "running",
    registers: tuple[RegisterWrite, ...] = (),
) -> HeartbeatReport:
    """This node's heartbeat: what it holds and runs (the agent's ``heartbeat_report``
    hook gives uptime, held leases, ``exec_remote`` and the GPU summary in wire form)."""
    extras = agent.heartbeat_report()
    gpu = extras.get("gpu")
    return HeartbeatReport(
        status=status,
        addresses=tuple(agent.self_addresses()),
        registers=registers,
        revocation_serial=agent.revocations.serial,
        membership_version=agent.membership.version,
        settings_serial=agent.records.settings_serial,
        version=__version__,
        uptime_s=extras.get("uptime_s"),
        gpu=None if gpu is None else GpuHeartbeatSummary.from_json(gpu),
        leases=tuple(HeldLease.from_json(row) for row in extras.get("leases", [])),
        exec_remote=bool(extras.get("exec_remote", True)),
    )


class HeartbeatSender:
    """Every node: the heartbeat loop towards the control plane."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("heartbeat")
        self.rng = random.Random()
        self.cp_down = False
        self.last_answer: HeartbeatAnswer | None = None
        #: This node's lifecycle as the last answer said, in wire form (``status`` and
        #: ``standing`` show it as such).
        self.lifecycle: dict[str, Any] | None = None
        #: This node's own register writes (wire form), sent until acknowledged.
        self.outbox_registers: list[dict[str, Any]] = []
        self.beats = 0
        self.expelled = False
        self.kick = trio.Event()

    def interval_s(self) -> float:
        if self.last_answer is not None:
            return self.last_answer.heartbeat_interval_s
        scope = scope_of(self.agent, url_host(self.agent.control_plane_url))
        return float(getattr(self.agent.config.timings, scope).heartbeat_interval_s)

    def payload(self, status: HeartbeatStatus = "running") -> HeartbeatReport:
        registers = tuple(RegisterWrite.from_json(raw) for raw in self.outbox_registers)
        return build_report(self.agent, status, registers)

    async def beat_once(self, status: HeartbeatStatus = "running") -> HeartbeatAnswer:
        """One heartbeat; a malformed answer is ``PeerError(code="bad_peer_answer")``."""
        agent = self.agent
        sent = list(self.outbox_registers)
        answer = await agent.peers.call(
            url=agent.control_plane_url,
            node_id=agent.control_plane_id,
            method="POST",
            path="/v1/populi/heartbeat",
            payload=self.payload(status),
            answer=HeartbeatAnswer,
            # A heartbeat that takes longer than two periods is as good as lost.
            timeout_s=max(2.0, 2 * self.interval_s()),
        )
        # Registers are delivered once acknowledged; later writes stay queued.
        self.outbox_registers = [r for r in self.outbox_registers if r not in sent]
        await self._absorb(answer)
        self.beats += 1
        return answer

    async def _absorb(self, answer: HeartbeatAnswer) -> None:
        agent = self.agent
        self.last_answer = answer
        self.lifecycle = None if answer.lifecycle is None else answer.lifecycle.to_json()
        now_ms = int(agent.clock.wall() * 1000)
        if answer.revocations:
            agent.revocations.offer(answer.revocations, now_ms=now_ms)
        if answer.settings_record:
            try:
                agent.records.offer_settings(answer.settings_record)
            except PopuliError as exc:
                log(self.logger, logging.WARNING, "settings record ignored", error=str(exc))
        if answer.membership_version != agent.membership.version:
            await agent.sync_members()
        url = answer.control_plane.url
        if answer.term >= agent.term and url != agent.control_plane_url:
            agent.store.set_meta("control_plane_url", url)
        await agent.on_heartbeat_answer(answer.to_json())  # the hook takes the wire form

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failures = 0
        while True:
            leaving = self.agent.leaving
            try:
                answer = await self.beat_once(status="leaving" if leaving else "running")
                if leaving and answer.lifecycle is not None and answer.lifecycle.state == "left":
                    self.agent.leave_acknowledged()
                    return
            except RETRIED as exc:
                # The control plane answered, but what it said could not be kept here
                # (disk full...): not an unreachable control plane; beat again soon.
                delay = self.agent.health.failed("heartbeat", exc)
            except PopuliError as exc:
                # Retired (the control plane says so), or unknown to it (deleted, or the
                # certificate expired): this node is out; `populi status` says so and how
                # to re-join. Heartbeats stop.
                if self.agent.standing.learn(exc):
                    self.expelled = True
                    return
                if exc.code == "signature_invalid" and exc.details.get("http_status") == 401:
                    log(
                        self.logger,
                        logging.ERROR,
                        "the control plane does not accept this node's key; heartbeats stop. "
                        "Re-join with a new token: runbooks/enroll-a-node.md",
                        error=str(exc),
                    )
                    self.expelled = True
                    return
                failures += 1
                if not self.cp_down:
                    self.cp_down = True
                    log(
                        self.logger,
                        logging.WARNING,
                        "control plane unreachable",
                        url=self.agent.control_plane_url,
                        error=str(exc),
                    )
                delay = min(
                    self.interval_s() * (2 ** min(failures, 6)), MAX_BACKOFF_S
                ) * self.rng.uniform(0.5, 1.0)
                delay = max(delay, self.interval_s() * 0.5)
            else:
                if self.cp_down:
                    self.cp_down = False
                    log(
                        self.logger,
                        logging.INFO,
                        "control plane reachable again",
                        url=self.agent.control_plane_url,
                        after_failures=failures,
                    )
                failures = 0
                self.agent.health.ok("heartbeat")
                delay = self.interval_s()
            with trio.move_on_after(delay):
                await self.kick.wait()
            if self.kick.is_set():
                self.kick = trio.Event()


class SelfBeat:
    """The control plane's own liveness, noted in process every interval."""

    def __init__(self, agent: Agent, receiver: HeartbeatReceiver) -> None:
        self.agent = agent
        self.receiver = receiver

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        health = self.agent.health
        while True:
            try:
                self.receiver.note_self()
            except RETRIED as exc:
                await health.retry_after(health.failed("self_beat", exc))
                continue
            health.ok("self_beat")
            await trio.sleep(self.agent.config.timings.local.heartbeat_interval_s)


__all__ = [
    "HeartbeatReceiver",
    "HeartbeatSender",
    "SelfBeat",
    "build_report",
    "scope_of",
    "url_host",
]
