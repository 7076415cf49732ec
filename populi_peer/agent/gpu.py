"""GPU truth in the agent: the node's own probe, and the control plane's view of everyone.

On every node: a probe (NVML, or a replayed capture with per-node UUIDs) refreshes every
``gpu.refresh_s``; health verdicts and allocatable devices are computed from verified facts
only (operator labels stay a separate layer, never capacity unless ``trust_advertised``).
Critical XID events quarantine the device with a ``gpu_quarantine/<uuid>`` register written
by the node itself: durable here, sent with the next heartbeat (the :class:`RegisterOutbox`),
and only cleared by an operator (``populi gpu resume NODE UUID``), whose later write
reaches the node back through heartbeat answers. A GPU busy with processes Populi did not
start is not allocatable.

On the wire: the heartbeat carries the compact summary (:meth:`GpuService.report_part`);
its static part only when the control plane has not acknowledged this ``facts_version``
(the answer echoes the version it holds: :meth:`GpuService.answer_part`,
:meth:`GpuService.absorb_answer`). The control plane keeps the latest summaries in memory
(:meth:`GpuService.hold_report`) — they are hints — and re-checks allocatable GPUs itself
at grant time (safety rule 6), including its own view of quarantines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol, get_args

import trio

from populi_peer.agent.health import RETRIED, Health, retrying
from populi_peer.agent.heartbeat import RegisterOutbox
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Membership
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import ClusterWrites
from populi_peer.api.app import ANY_MEMBER, OPERATOR, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.config import GpuConfig
from populi_peer.core.messages import (
    GpuDevice,
    GpuHeartbeatSummary,
    GpuResumeAnswer,
    GpusAnswer,
    GpuSummaryView,
    HeartbeatAnswer,
    HeartbeatReport,
    NodeGpus,
    ReasonRequest,
)
from populi_peer.core.messages.records import GpuHealth
from populi_peer.core.registers import GPU_QUARANTINE_PREFIX
from populi_peer.errors import BadRequest, NotFound
from populi_peer.gpu import (
    GpuInventory,
    XidEvent,
    allocatable,
    gpu_summary,
    health_verdicts,
    leased_by_book,
    open_probe,
)
from populi_peer.log import get_logger, log
from populi_peer.store.events import EventLog

_HEALTHS: tuple[GpuHealth, ...] = get_args(GpuHealth)


class Staleness(Protocol):
    """Whether a node's heartbeat is stale (the control plane's liveness book)."""

    def stale(self, node_id: str) -> bool: ...


@dataclass
class HeldGpus:
    """What the control plane holds of one node's GPU summary."""

    facts_version: str | None = None
    static: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    metrics_version: str | None = None
    at_mono: float = 0.0


@dataclass(kw_only=True, eq=False, repr=False)
class GpuService:
    """``leased_gpus()`` are the GPUs this node's running attempts hold; ``own_pids()``
    the processes Populi started here (a GPU busy with others is not allocatable);
    ``writes`` proposes an operator's decision through the election (ADR 0017);
    ``book_busy(node)`` (control plane) the GPUs of ``node`` its lease book holds busy,
    ``None`` where it cannot say (the node's report then does)."""

    node_id: str
    config: GpuConfig
    clock: Clock
    control_plane: ControlPlaneLink
    membership: Membership
    registry: Registry
    events: EventLog
    health: Health
    outbox: RegisterOutbox
    liveness: Staleness
    leased_gpus: Callable[[], Iterable[str]]
    own_pids: Callable[[], Iterable[int]]
    writes: ClusterWrites
    book_busy: Callable[[str], frozenset[str] | None]
    logger: ClassVar[logging.Logger] = get_logger("gpu")

    def __post_init__(self) -> None:
        self.inventory: GpuInventory | None = None
        self.summary: dict[str, Any] | None = None
        self.allocations: list[Any] = []
        self.verdicts: tuple[Any, ...] = ()
        self.acked_facts_version: str | None = None
        self.nodes: dict[str, HeldGpus] = {}
        self.refreshes = 0
        self._probe: Any = None

    # -- local truth ----------------------------------------------------------------------

    def quarantined(self, node_id: str | None = None) -> dict[str, str]:
        """GPU UUID -> reason, for GPUs quarantined in this node's registers."""
        node_id = node_id or self.node_id
        out: dict[str, str] = {}
        for attribute, write in self.registry.registers.node(node_id).items():
            if (
                attribute.startswith(GPU_QUARANTINE_PREFIX)
                and write.value
                and write.value.get("quarantined")
            ):
                out[attribute[len(GPU_QUARANTINE_PREFIX) :]] = str(
                    write.value.get("reason") or write.reason or "quarantined"
                )
        return out

    def verified_uuids(self) -> list[str]:
        """The GPUs this node may be handed: its verified devices, plus the advertised
        pseudo-devices when it trusts its own labels."""
        if self.inventory is None:
            return []
        uuids = [d.uuid for d in self.inventory.devices if d.uuid]
        uuids += [a.uuid for a in self.allocations if not a.verified and a.uuid]
        return uuids

    async def refresh(self) -> None:
        if self._probe is None:
            return
        inventory = await self._probe.probe()
        self._install(inventory)

    def _install(self, inventory: GpuInventory) -> None:
        cfg = self.config
        self.inventory = inventory
        self.verdicts = health_verdicts(inventory)
        self.allocations = allocatable(
            inventory,
            quarantined=frozenset(self.quarantined()),
            leased=frozenset(self.leased_gpus()),
            own_pids=frozenset(self.own_pids()),
            advertised=cfg.labels,
            trust_advertised=cfg.trust_advertised,
        )
        summary = gpu_summary(
            inventory,
            self.allocations,
            include_static=True,
            advertised=cfg.labels or None,
            verdicts=self.verdicts,
        )
        if self.summary is None and inventory.cpu_only:
            log(
                self.logger,
                logging.INFO,
                "no GPU: this is a CPU-only node",
                reason=inventory.cpu_only_reason,
            )
        self.summary = summary
        self.refreshes += 1
        if self.control_plane.is_self:
            self._hold(self.node_id, GpuHeartbeatSummary.from_json(summary))

    async def on_xid(self, event: XidEvent) -> None:
        log(
            self.logger,
            logging.WARNING if event.critical else logging.INFO,
            "XID event",
            uuid=event.uuid,
            index=event.index,
            code=event.code,
            critical=event.critical,
        )
        if event.critical and event.uuid:
            uuid = event.uuid

            async def quarantine() -> None:
                self.quarantine_self(uuid, reason=f"xid_{event.code}")
                await trio.lowlevel.checkpoint()

            # A bad GPU must stay out of service: its quarantine is kept until it is durable.
            await retrying(self.health, "gpu_quarantine", quarantine)
            await self.refresh()

    def quarantine_self(self, uuid: str, *, reason: str) -> None:
        if uuid in self.quarantined():
            return
        write = self.registry.make_write(
            self.node_id,
            GPU_QUARANTINE_PREFIX + uuid,
            {"quarantined": True, "reason": reason},
            writer_class="self",
            actor=self.node_id,
            reason=reason,
            term=self.control_plane.term,
        )
        self.registry.apply(write)
        # Queued for the control plane before the event is written: a retry after a
        # failed event write finds the GPU quarantined already and returns early.
        if not self.control_plane.is_self:
            self.outbox.put(write)
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=self.node_id,
            kind="gpu_quarantined",
            actor=self.node_id,
            reason=reason,
            detail={"uuid": uuid},
        )

    # -- heartbeats -----------------------------------------------------------------------

    def report_part(self, report: HeartbeatReport) -> HeartbeatReport:
        """This node's GPU summary in its heartbeat; the static part only while the
        control plane has not acknowledged this ``facts_version``."""
        if self.summary is None:
            return report
        summary = dict(self.summary)
        if self.acked_facts_version == summary.get("facts_version"):
            summary.pop("static", None)
        return replace(report, gpu=GpuHeartbeatSummary.from_json(summary))

    def absorb_answer(self, answer: HeartbeatAnswer) -> None:
        """Node side: what the control plane holds, and operator decisions about our GPUs."""
        self.acked_facts_version = answer.gpu_facts_version
        changed = False
        for write in answer.gpu_registers:
            if write.node_id == self.node_id and write.attribute.startswith(GPU_QUARANTINE_PREFIX):
                changed = self.registry.apply(write) or changed
        if changed and self.inventory is not None:
            self._install(self.inventory)

    def _hold(self, node_id: str, summary: GpuHeartbeatSummary) -> None:
        entry = self.nodes.setdefault(node_id, HeldGpus())
        if summary.static is not None:
            entry.facts_version = summary.facts_version
            entry.static = summary.static
        entry.metrics = summary.metrics
        entry.metrics_version = summary.facts_version
        entry.at_mono = self.clock.mono()

    def hold_report(self, node_id: str, report: HeartbeatReport) -> None:
        """Control plane: the GPU summary of ``node_id``'s accepted heartbeat."""
        if report.gpu is not None:
            self._hold(node_id, report.gpu)

    def answer_part(self, node_id: str, answer: HeartbeatAnswer) -> HeartbeatAnswer:
        """Control plane: the facts version held of ``node_id``, and its GPU registers."""
        entry = self.nodes.get(node_id)
        registers = tuple(
            write
            for attribute, write in self.registry.registers.node(node_id).items()
            if attribute.startswith(GPU_QUARANTINE_PREFIX)
        )
        return replace(
            answer,
            gpu_facts_version=entry.facts_version if entry else None,
            gpu_registers=registers,
        )

    # -- the control plane's view ---------------------------------------------------------

    def devices(self, node_id: str) -> list[GpuDevice]:
        """One row per verified device of ``node_id``, static facts joined with metrics of
        the same ``facts_version`` (older metrics are ignored, the design (docs/design.md): hints only)."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.static is None:
            return []
        current = entry.metrics is not None and entry.metrics_version == entry.facts_version
        metrics: dict[int, Mapping[str, Any]] = {}
        if current and entry.metrics is not None:
            # The heartbeat's GPU section checked that every device has an integer index.
            metrics = {int(m["index"]): m for m in entry.metrics.get("devices", [])}
        quarantined = self.quarantined(node_id)
        busy = self.book_busy(node_id)
        rows = []
        for device in entry.static.get("devices", []):
            m = metrics.get(int(device["index"]), {})
            uuid = device.get("uuid")
            reasons = tuple(m.get("allocation_reasons", ()))
            allocatable_now = bool(m.get("allocatable", False))
            if busy is not None:
                allocatable_now, reasons = leased_by_book(
                    allocatable_now, reasons, leased=uuid in busy
                )
            if uuid in quarantined:
                allocatable_now = False
                if "gpu_quarantined" not in reasons:
                    reasons += ("gpu_quarantined",)
            rows.append(
                GpuDevice(
                    index=device.get("index"),
                    uuid=uuid,
                    name=_text(device.get("name")),
                    memory_total_bytes=_int(device.get("memory_total_bytes")),
                    memory_free_bytes=_int(m.get("memory_free_bytes")),
                    utilization_gpu_pct=_num(m.get("utilization_gpu_pct")),
                    health=_health(m.get("health")),
                    health_reasons=tuple(m.get("health_reasons", ())),
                    allocatable=allocatable_now,
                    allocation_reasons=reasons,
                    quarantined=uuid in quarantined,
                    quarantine_reason=quarantined.get(uuid) if uuid else None,
                    verified=True,
                )
            )
        # Operator labels become capacity only where the node trusts them
        # (``gpu.trust_advertised``): it then reports pseudo-devices, never verified ones.
        advertised = (entry.metrics or {}).get("advertised_devices", []) if current else []
        labels = entry.static.get("advertised") or {}
        for index, pseudo in enumerate(advertised):
            if not isinstance(pseudo.get("uuid"), str):
                continue
            uuid = pseudo["uuid"]
            allocatable_now = bool(pseudo.get("allocatable", False))
            reasons = tuple(r for r in pseudo.get("reasons", ()) if isinstance(r, str))
            if busy is not None:
                allocatable_now, reasons = leased_by_book(
                    allocatable_now, reasons, leased=uuid in busy
                )
            allocatable_now = allocatable_now and uuid not in quarantined
            rows.append(
                GpuDevice(
                    index=index,
                    uuid=uuid,
                    name=_text(labels.get("model")),
                    memory_total_bytes=None,
                    memory_free_bytes=None,
                    utilization_gpu_pct=None,
                    health="unknown",
                    health_reasons=(),
                    allocatable=allocatable_now,
                    allocation_reasons=reasons,
                    quarantined=uuid in quarantined,
                    quarantine_reason=quarantined.get(uuid),
                    verified=False,
                )
            )
        return rows

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        """(UUIDs free to lease, how many are unhealthy or quarantined) of ``node_id``,
        as the control plane holds them."""
        rows = self.devices(node_id)
        free = tuple(r.uuid for r in rows if r.allocatable and r.uuid)
        unhealthy = sum(1 for r in rows if r.health == "unhealthy" or r.quarantined)
        return free, unhealthy

    def view(self, node_id: str) -> GpuSummaryView | None:
        entry = self.nodes.get(node_id)
        if entry is None or entry.static is None:
            return None
        rows = self.devices(node_id)

        def count(health: GpuHealth) -> int:
            return sum(1 for r in rows if r.health == health)

        return GpuSummaryView(
            facts_version=entry.facts_version,
            backend=_text(entry.static.get("backend")),
            count=len(rows),
            allocatable=sum(1 for r in rows if r.allocatable),
            quarantined=sum(1 for r in rows if r.quarantined),
            healthy=count("healthy"),
            degraded=count("degraded"),
            unhealthy=count("unhealthy"),
            unknown=count("unknown"),
        )

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/gpus",
                self._gpus,
                roles=ANY_MEMBER,
                name="gpus",
            ),
            Route(
                "POST",
                "/v1/populi/admin/gpus/{node}/{uuid}/resume",
                self._resume,
                roles=OPERATOR,
                name="gpu_resume",
            ),
        ]

    async def _gpus(self, request: Request) -> GpusAnswer:
        self.control_plane.require_self()
        ref = request.query_one("node")
        members = [self.membership.resolve_node(ref)] if ref else self.membership.nodes()
        nodes = []
        for member in members:
            entry = self.nodes.get(member.id)
            static = (entry.static if entry else None) or {}
            nodes.append(
                NodeGpus(
                    node_id=member.id,
                    name=member.name,
                    facts_version=entry.facts_version if entry else None,
                    backend=_text(static.get("backend")),
                    cpu_only_reason=_text(static.get("cpu_only_reason")),
                    heartbeat_stale=self.liveness.stale(member.id),
                    devices=tuple(self.devices(member.id)),
                )
            )
        await trio.lowlevel.checkpoint()
        return GpusAnswer(nodes=tuple(nodes))

    async def _resume(self, request: Request) -> GpuResumeAnswer:
        self.control_plane.require_self()
        member = self.membership.resolve_node(request.path_params["node"])
        uuid = check_uuid(request.path_params["uuid"])
        if uuid not in self.quarantined(member.id):
            raise NotFound(
                f"GPU {uuid} of {member.name} is not quarantined", code="gpu_not_quarantined"
            )
        reason = request.message(ReasonRequest).reason_or("resumed by operator")
        write = self.registry.make_write(
            member.id,
            GPU_QUARANTINE_PREFIX + uuid,
            {"quarantined": False, "reason": reason},
            writer_class="operator",
            actor=request.caller.id,
            reason=reason,
            term=self.writes.term,
        )
        await self.writes.propose(write)
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=member.id,
            kind="gpu_resumed",
            actor=request.caller.id,
            reason=reason,
            detail={"uuid": uuid},
        )
        if member.id == self.node_id and self.inventory is not None:
            self._install(self.inventory)
        await trio.lowlevel.checkpoint()
        return GpuResumeAnswer(node_id=member.id, uuid=uuid, quarantined=False)

    # -- service --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        fixture = cfg.fixture or None
        async with open_probe(
            fixture=fixture,
            node_id=self.node_id,
            keep_fixture_uuids=cfg.keep_fixture_uuids,
            clock=self.clock,
            call_timeout_s=cfg.call_timeout_s,
        ) as probe:
            self._probe = probe
            await self.refresh()
            async with trio.open_nursery() as nursery:
                await nursery.start(probe.run_xid_watch, self.on_xid)
                task_status.started()
                health = self.health
                while True:
                    await trio.sleep(cfg.refresh_s)
                    try:
                        await self.refresh()
                    except RETRIED as exc:
                        health.failed("gpu", exc)
                        continue
                    health.ok("gpu")


def check_uuid(uuid: str) -> str:
    if not uuid or len(uuid) > 128 or "/" in uuid:
        raise BadRequest(f"{uuid!r} is not a GPU UUID", code="bad_request")
    return uuid


# A node's GPU summary passes the probe's fields through (the heartbeat checked the ones a
# control plane relies on); these read the others for a view, as unknown when odd.


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _health(value: object) -> GpuHealth:
    for health in _HEALTHS:
        if value == health:
            return health
    return "unknown"


__all__ = ["GpuService", "HeldGpus", "Staleness", "check_uuid"]
