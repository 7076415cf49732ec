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
from populi_peer.core.registers import LIFECYCLE, RegisterWrite
from populi_peer.core.scope import Scope, path_scope
from populi_peer.core.timings import ScopeTimings, heartbeat_retry_delay_s
from populi_peer.discovery import Sighting
from populi_peer.discovery.service import call_first
from populi_peer.discovery.site import url_address
from populi_peer.errors import BadRequest, Forbidden, PopuliError
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

NODE_ROLES = frozenset({"worker", "submit", "voter", "operator"})


@dataclass
class Seen:
    last_mono: float
    address: str | None
    scope: Scope
    status: str
    report: dict[str, Any]


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
                "POST", "/v1/populi/heartbeat", self._heartbeat, roles=NODE_ROLES, name="heartbeat"
            )
        ]

    def timings(self, scope: Scope) -> tuple[float, float]:
        """Heartbeat interval and stale bound on a path of ``scope`` (core.timings)."""
        timing = self.agent.net.timings.for_scope(scope)
        return timing.heartbeat_interval_s, timing.stale_after_s

    def note_self(self) -> None:
        self.seen[self.agent.node_id] = Seen(
            self.agent.clock.mono(), "127.0.0.1", "local", "running", self.agent.heartbeat_report()
        )

    def age_ms(self, node_id: str) -> int | None:
        seen = self.seen.get(node_id)
        return heartbeat_age_ms(None if seen is None else seen.last_mono, self.agent.clock.mono())

    def stale(self, node_id: str) -> bool:
        seen = self.seen.get(node_id)
        scope = seen.scope if seen else "lan"
        _, stale_after = self.timings(scope)
        return is_stale(self.age_ms(node_id), int(stale_after * 1000))

    async def _heartbeat(self, request: Request) -> dict[str, Any]:
        agent = self.agent
        agent.require_control_plane()
        caller = request.caller
        member = agent.membership.get(caller.id)
        if member is None or member.kind != "node":
            raise Forbidden("heartbeats come from nodes", code="not_a_node")
        body = request.json()
        report = self._validate(body)
        address = request.client[0] if request.client else None
        scope = scope_of(agent, address)
        writes = [RegisterWrite.from_json(raw) for raw in report["registers"]]
        for write in writes:  # everything is checked before anything is applied
            if write.node_id != caller.id or write.writer_class != "self":
                raise Forbidden(
                    "a node may only send registers about itself, as itself",
                    code="writer_not_allowed",
                )
        if "gpu" in report:
            agent.gpu.check_summary(report["gpu"])
        self.seen[caller.id] = Seen(agent.clock.mono(), address, scope, report["status"], report)
        self._update_member(member, report)
        for write in writes:
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
        await agent.on_heartbeat(caller.id, report)
        interval, stale_after = self.timings(scope)
        answer: dict[str, Any] = {
            "term": agent.term,
            "control_plane": {
                "node_id": agent.node_id,
                "url": agent.url,
                "addresses": agent.self_addresses(),
            },
            "membership_version": agent.membership.version,
            "lifecycle": _lc_json(agent.registry.lifecycle(caller.id)),
            "scope": scope,
            "heartbeat_interval_s": interval,
            "heartbeat_timeout_s": agent.net.timings.for_scope(scope).heartbeat_timeout_s,
            "stale_after_s": stale_after,
            "revocation_serial": agent.revocations.serial,
            "revocations": agent.revocations.text
            if report["revocation_serial"] < agent.revocations.serial
            else None,
            "settings_serial": agent.records.settings_serial,
            "settings_record": (
                agent.records.settings_record.text
                if agent.records.settings_record
                and report["settings_serial"] < agent.records.settings_serial
                else None
            ),
        }
        answer.update(agent.heartbeat_answer_extras(caller.id, report))
        return answer

    def _validate(self, body: dict[str, Any]) -> dict[str, Any]:
        status = body.get("status", "running")
        if status not in ("running", "leaving"):
            raise BadRequest("heartbeat 'status' must be running or leaving", code="bad_request")
        addresses = body.get("addresses", [])
        if (
            not isinstance(addresses, list)
            or len(addresses) > 8
            or not all(isinstance(a, str) and 0 < len(a) < 262 for a in addresses)
        ):
            raise BadRequest(
                "heartbeat 'addresses' must be up to 8 host:port strings", code="bad_request"
            )
        for address in addresses:
            try:
                parse_host_port(address)
            except ValueError as exc:
                raise BadRequest(
                    f"heartbeat address {address!r}: {exc}", code="bad_request"
                ) from exc
        registers = body.get("registers", [])
        if not isinstance(registers, list) or len(registers) > 256:
            raise BadRequest("heartbeat 'registers' must be a list", code="bad_request")
        out: dict[str, Any] = {"status": status, "addresses": addresses, "registers": registers}
        for name in ("revocation_serial", "membership_version", "settings_serial"):
            value = body.get(name, -1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"heartbeat {name!r} must be an integer", code="bad_request")
            out[name] = value
        version = body.get("version")
        if isinstance(version, str) and len(version) <= 64:
            out["version"] = version
        uptime = body.get("uptime_s")
        if isinstance(uptime, (int, float)) and not isinstance(uptime, bool):
            out["uptime_s"] = float(uptime)
        if "gpu" in body:
            out["gpu"] = body["gpu"]
        leases = body.get("leases", [])
        if not isinstance(leases, list) or len(leases) > 10_000:
            raise BadRequest("heartbeat 'leases' must be a list", code="bad_request")
        out["leases"] = leases
        exec_remote = body.get("exec_remote", True)
        if not isinstance(exec_remote, bool):
            raise BadRequest("heartbeat 'exec_remote' must be true or false", code="bad_request")
        out["exec_remote"] = exec_remote
        return out

    def _update_member(self, member: Member, report: dict[str, Any]) -> None:
        addresses = tuple(report["addresses"])
        if addresses and addresses != member.addresses:
            self.agent.membership.upsert(
                replace(member, addresses=addresses, updated_ms=int(self.agent.clock.wall() * 1000))
            )


def _lc_json(lc: Any) -> dict[str, Any] | None:
    return None if lc is None else lc.to_json()


class HeartbeatSender:
    """Every node: the heartbeat loop towards the control plane."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("heartbeat")
        self.rng = random.Random()
        self.cp_down = False
        self.last_answer: dict[str, Any] | None = None
        self.lifecycle: dict[str, Any] | None = None
        self.outbox_registers: list[dict[str, Any]] = []
        self.beats = 0
        self.expelled = False
        self.kick = trio.Event()
        agent.net.sightings.listeners.append(self._on_sighting)

    def _on_sighting(self, sighting: Sighting) -> None:
        """The control plane seen (LAN or static peer) while it does not answer here:
        beat now rather than at the end of the backoff (it may have moved)."""
        if self.cp_down and sighting.node_id == self.agent.control_plane_id:
            self.kick.set()

    def timing(self) -> ScopeTimings:
        """The timings the control plane judges this node by (its last answer says them),
        else this node's own table for the scope of its path to the control plane."""
        scope = scope_of(self.agent, url_host(self.agent.control_plane_url))
        own = self.agent.net.timings.for_scope(scope)
        answer = self.last_answer or {}
        values = [
            answer.get(name, getattr(own, name))
            for name in ("heartbeat_interval_s", "stale_after_s", "heartbeat_timeout_s")
        ]
        try:
            return ScopeTimings(*values)
        except PopuliError:
            return own

    def interval_s(self) -> float:
        return self.timing().heartbeat_interval_s

    def control_plane_addresses(self) -> list[str]:
        """Where to send a heartbeat: the control plane's URL this node holds, then its
        other addresses best first from here (its member record, then where discovery
        saw it), each tried when nothing reached the one before (TLS proves who answers)."""
        agent = self.agent
        current = url_address(agent.control_plane_url)
        member = agent.membership.get(agent.control_plane_id)
        known = [current, *(member.addresses if member else ())]
        return [current] + [
            a
            for a in agent.net.address_book.candidates(agent.control_plane_id, known)
            if a != current
        ]

    def payload(self, status: str = "running") -> dict[str, Any]:
        agent = self.agent
        return {
            "status": status,
            "addresses": agent.self_addresses(),
            "revocation_serial": agent.revocations.serial,
            "membership_version": agent.membership.version,
            "settings_serial": agent.records.settings_serial,
            "registers": list(self.outbox_registers),
            "version": __version__,
            **agent.heartbeat_report(),
        }

    async def beat_once(self, status: str = "running") -> dict[str, Any]:
        agent = self.agent
        sent = list(self.outbox_registers)
        payload = self.payload(status)
        reached: list[str] = []

        async def beat_at(address: str) -> dict[str, Any]:
            reached[:] = [f"https://{address}"]
            return await agent.peers.call(
                url=reached[0],
                node_id=agent.control_plane_id,
                method="POST",
                path="/v1/populi/heartbeat",
                payload=payload,
                # A heartbeat answered later than this is as good as lost (core.timings).
                timeout_s=self.timing().heartbeat_timeout_s,
            )

        answer = await call_first(self.control_plane_addresses(), beat_at)
        if reached[0] != agent.control_plane_url:
            # Reached at another of its addresses: keep that one (the old one failed).
            agent.store.set_meta("control_plane_url", reached[0])
        # Registers are delivered once acknowledged; later writes stay queued.
        self.outbox_registers = [r for r in self.outbox_registers if r not in sent]
        await self._absorb(answer)
        self.beats += 1
        return answer

    async def _absorb(self, answer: dict[str, Any]) -> None:
        agent = self.agent
        self.last_answer = answer
        self.lifecycle = answer.get("lifecycle")
        now_ms = int(agent.clock.wall() * 1000)
        if answer.get("revocations"):
            agent.revocations.offer(str(answer["revocations"]), now_ms=now_ms)
        if answer.get("settings_record"):
            try:
                agent.records.offer_settings(str(answer["settings_record"]))
            except PopuliError as exc:
                log(self.logger, logging.WARNING, "settings record ignored", error=str(exc))
        version = answer.get("membership_version")
        if isinstance(version, int) and version != agent.membership.version:
            await agent.sync_members()
        term = answer.get("term")
        cp = answer.get("control_plane") or {}
        if (
            isinstance(term, int)
            and term >= agent.term
            and isinstance(cp.get("url"), str)
            and cp["url"] != agent.control_plane_url
            # Only a URL at least as reachable from here as the one that works: a control
            # plane that prefers its overlay address must not move a LAN-only node off
            # the LAN address it reaches it by (core.addresses.rank_addresses).
            and agent.net.address_book.rank(
                [url_address(cp["url"]), url_address(agent.control_plane_url)]
            )[0]
            == url_address(cp["url"])
        ):
            agent.store.set_meta("control_plane_url", str(cp["url"]))
        await agent.on_heartbeat_answer(answer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failures = 0
        while True:
            leaving = self.agent.leaving
            try:
                answer = await self.beat_once(status="leaving" if leaving else "running")
                if leaving and (answer.get("lifecycle") or {}).get("state") == "left":
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
                # One interval for the first losses (a lossy overlay path), then back off
                # from a control plane that is down (core.timings).
                delay = heartbeat_retry_delay_s(self.timing(), failures, self.rng)
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


__all__ = ["HeartbeatReceiver", "HeartbeatSender", "SelfBeat", "scope_of", "url_host"]
