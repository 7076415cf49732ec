"""GPU truth in the agent: the node's own probe, and the control plane's view of everyone.

On every node: a probe (NVML, or a replayed capture with per-node UUIDs) refreshes every
``gpu.refresh_s``; health verdicts and allocatable devices are computed from verified facts
only (operator labels stay a separate layer, never capacity unless ``trust_advertised``).
Critical XID events quarantine the device with a ``gpu_quarantine/<uuid>`` register written
by the node itself: durable here, sent with the next heartbeat, and only cleared by an
operator (``populi gpu resume NODE UUID``), whose later write reaches the node back through
heartbeat answers. A GPU busy with processes Populi did not start is not allocatable.

On the wire: the heartbeat carries the compact summary; its static part only when the
control plane has not acknowledged this ``facts_version`` (the answer echoes the version it
holds). The control plane keeps the latest summaries in memory — they are hints — and
re-checks allocatable GPUs itself at grant time (safety rule 6), including its own view of
quarantines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from populi_peer.agent.health import RETRIED, retrying
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.core.registers import GPU_QUARANTINE_PREFIX, RegisterWrite
from populi_peer.errors import BadRequest, NotFound, PopuliError
from populi_peer.gpu import (
    GpuInventory,
    XidEvent,
    allocatable,
    gpu_summary,
    health_verdicts,
    open_probe,
)
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

OPERATOR = frozenset({"operator"})


@dataclass
class NodeGpus:
    """What the control plane holds of one node's GPU summary."""

    facts_version: str | None = None
    static: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    metrics_version: str | None = None
    at_mono: float = 0.0


class GpuService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("gpu")
        self.inventory: GpuInventory | None = None
        self.summary: dict[str, Any] | None = None
        self.allocations: list[Any] = []
        self.verdicts: tuple[Any, ...] = ()
        self.acked_facts_version: str | None = None
        self.nodes: dict[str, NodeGpus] = {}
        self.refreshes = 0
        self._probe: Any = None

    # -- local truth ----------------------------------------------------------------------

    def quarantined(self, node_id: str | None = None) -> dict[str, str]:
        """GPU UUID -> reason, for GPUs quarantined in this node's registers."""
        node_id = node_id or self.agent.node_id
        out: dict[str, str] = {}
        for attribute, write in self.agent.registry.registers.node(node_id).items():
            if (
                attribute.startswith(GPU_QUARANTINE_PREFIX)
                and write.value
                and write.value.get("quarantined")
            ):
                out[attribute[len(GPU_QUARANTINE_PREFIX) :]] = str(
                    write.value.get("reason") or write.reason or "quarantined"
                )
        return out

    def leased(self) -> frozenset[str]:
        return frozenset(
            g for running in self.agent.runner.running.values() for g in running.plan.gpus
        )

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
        cfg = self.agent.config.gpu
        self.inventory = inventory
        self.verdicts = health_verdicts(inventory)
        self.allocations = allocatable(
            inventory,
            quarantined=frozenset(self.quarantined()),
            leased=self.leased(),
            own_pids=frozenset(self.agent.own_pids()),
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
        if self.agent.is_control_plane:
            self._hold(self.agent.node_id, summary)

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
            await retrying(self.agent.health, "gpu_quarantine", quarantine)
            await self.refresh()

    def quarantine_self(self, uuid: str, *, reason: str) -> None:
        agent = self.agent
        if uuid in self.quarantined():
            return
        write = agent.registry.make_write(
            agent.node_id,
            GPU_QUARANTINE_PREFIX + uuid,
            {"quarantined": True, "reason": reason},
            writer_class="self",
            actor=agent.node_id,
            reason=reason,
            term=agent.term,
        )
        agent.registry.apply(write)
        # Queued for the control plane before the event is written: a retry after a
        # failed event write finds the GPU quarantined already and returns early.
        if not agent.is_control_plane:
            agent.heartbeat_sender.outbox_registers.append(write.to_json())
            agent.heartbeat_sender.kick.set()
        agent.record_event(
            agent.node_id,
            "gpu_quarantined",
            actor=agent.node_id,
            reason=reason,
            detail={"uuid": uuid},
        )

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat_report(self) -> dict[str, Any]:
        if self.summary is None:
            return {}
        summary = dict(self.summary)
        if self.acked_facts_version == summary.get("facts_version"):
            summary.pop("static", None)
        return {"gpu": summary}

    def absorb_answer(self, answer: dict[str, Any]) -> None:
        """Node side: what the control plane holds, and operator decisions about our GPUs."""
        held = answer.get("gpu_facts_version")
        self.acked_facts_version = held if isinstance(held, str) else None
        changed = False
        for raw in answer.get("gpu_registers") or []:
            try:
                write = RegisterWrite.from_json(raw)
            except PopuliError:
                continue
            if write.node_id == self.agent.node_id and write.attribute.startswith(
                GPU_QUARANTINE_PREFIX
            ):
                changed = self.agent.registry.apply(write) or changed
        if changed and self.inventory is not None:
            self._install(self.inventory)

    def _hold(self, node_id: str, summary: dict[str, Any]) -> None:
        entry = self.nodes.setdefault(node_id, NodeGpus())
        version = summary.get("facts_version")
        if isinstance(summary.get("static"), dict):
            entry.facts_version = version
            entry.static = summary["static"]
        if isinstance(summary.get("metrics"), dict):
            entry.metrics = summary["metrics"]
            entry.metrics_version = version
        entry.at_mono = self.agent.clock.mono()

    def on_heartbeat(self, node_id: str, report: dict[str, Any]) -> None:
        gpu = report.get("gpu")
        if isinstance(gpu, dict):
            self._hold(node_id, gpu)

    def answer_extras(self, node_id: str) -> dict[str, Any]:
        entry = self.nodes.get(node_id)
        registers = [
            write.to_json()
            for attribute, write in self.agent.registry.registers.node(node_id).items()
            if attribute.startswith(GPU_QUARANTINE_PREFIX)
        ]
        return {
            "gpu_facts_version": entry.facts_version if entry else None,
            "gpu_registers": registers,
        }

    # -- the control plane's view ---------------------------------------------------------

    def devices(self, node_id: str) -> list[dict[str, Any]]:
        """One row per verified device of ``node_id``, static facts joined with metrics of
        the same ``facts_version`` (older metrics are ignored, the design (docs/design.md): hints only)."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.static is None:
            return []
        metrics: dict[int, dict[str, Any]] = {}
        if entry.metrics is not None and entry.metrics_version == entry.facts_version:
            metrics = {
                int(m["index"]): m
                for m in entry.metrics.get("devices", [])
                if isinstance(m, dict) and "index" in m
            }
        quarantined = self.quarantined(node_id)
        rows = []
        for device in entry.static.get("devices", []):
            m = metrics.get(int(device.get("index", -1)), {})
            uuid = device.get("uuid")
            reasons = list(m.get("allocation_reasons", []))
            allocatable_now = bool(m.get("allocatable", False))
            if uuid in quarantined:
                allocatable_now = False
                if "gpu_quarantined" not in reasons:
                    reasons.append("gpu_quarantined")
            rows.append(
                {
                    "index": device.get("index"),
                    "uuid": uuid,
                    "name": device.get("name"),
                    "memory_total_bytes": device.get("memory_total_bytes"),
                    "memory_free_bytes": m.get("memory_free_bytes"),
                    "utilization_gpu_pct": m.get("utilization_gpu_pct"),
                    "health": m.get("health", "unknown"),
                    "health_reasons": list(m.get("health_reasons", [])),
                    "allocatable": allocatable_now,
                    "allocation_reasons": reasons,
                    "quarantined": uuid in quarantined,
                    "quarantine_reason": quarantined.get(uuid) if uuid else None,
                    "verified": True,
                }
            )
        # Operator labels become capacity only where the node trusts them
        # (``gpu.trust_advertised``): it then reports pseudo-devices, never verified ones.
        advertised = (
            (entry.metrics or {}).get("advertised_devices", [])
            if entry.metrics_version == entry.facts_version
            else []
        )
        labels = entry.static.get("advertised") or {}
        for index, pseudo in enumerate(advertised):
            if not isinstance(pseudo, dict) or not isinstance(pseudo.get("uuid"), str):
                continue
            uuid = pseudo["uuid"]
            allocatable_now = bool(pseudo.get("allocatable", False)) and uuid not in quarantined
            rows.append(
                {
                    "index": index,
                    "uuid": uuid,
                    "name": labels.get("model") if isinstance(labels, dict) else None,
                    "memory_total_bytes": None,
                    "memory_free_bytes": None,
                    "utilization_gpu_pct": None,
                    "health": "unknown",
                    "health_reasons": [],
                    "allocatable": allocatable_now,
                    "allocation_reasons": list(pseudo.get("reasons", [])),
                    "quarantined": uuid in quarantined,
                    "quarantine_reason": quarantined.get(uuid),
                    "verified": False,
                }
            )
        return rows

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        rows = self.devices(node_id)
        free = tuple(r["uuid"] for r in rows if r["allocatable"] and r["uuid"])
        unhealthy = sum(1 for r in rows if r["health"] == "unhealthy" or r["quarantined"])
        return free, unhealthy

    def view(self, node_id: str) -> dict[str, Any] | None:
        entry = self.nodes.get(node_id)
        if entry is None or entry.static is None:
            return None
        rows = self.devices(node_id)
        counts = {
            h: sum(1 for r in rows if r["health"] == h)
            for h in ("healthy", "degraded", "unhealthy", "unknown")
        }
        return {
            "facts_version": entry.facts_version,
            "backend": entry.static.get("backend"),
            "count": len(rows),
            "allocatable": sum(1 for r in rows if r["allocatable"]),
            "quarantined": sum(1 for r in rows if r["quarantined"]),
            **counts,
        }

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/populi/gpus", self._gpus, roles=ANY_MEMBER, name="gpus"),
            Route(
                "POST",
                "/v1/populi/admin/gpus/{node}/{uuid}/resume",
                self._resume,
                roles=OPERATOR,
                name="gpu_resume",
            ),
        ]

    async def _gpus(self, request: Request) -> dict[str, Any]:
        agent = self.agent
        agent.require_control_plane()
        ref = request.query_one("node")
        members = [agent.membership.resolve_node(ref)] if ref else agent.membership.nodes()
        nodes = []
        for member in members:
            entry = self.nodes.get(member.id)
            nodes.append(
                {
                    "node_id": member.id,
                    "name": member.name,
                    "facts_version": entry.facts_version if entry else None,
                    "backend": (entry.static or {}).get("backend") if entry else None,
                    "cpu_only_reason": (entry.static or {}).get("cpu_only_reason")
                    if entry
                    else None,
                    "heartbeat_stale": agent.heartbeats.stale(member.id),
                    "devices": self.devices(member.id),
                }
            )
        return {"nodes": nodes}

    async def _resume(self, request: Request) -> dict[str, Any]:
        agent = self.agent
        agent.require_control_plane()
        member = agent.membership.resolve_node(request.path_params["node"])
        uuid = check_uuid(request.path_params["uuid"])
        if uuid not in self.quarantined(member.id):
            raise NotFound(
                f"GPU {uuid} of {member.name} is not quarantined", code="gpu_not_quarantined"
            )
        reason = request.reason("resumed by operator")
        write = agent.registry.make_write(
            member.id,
            GPU_QUARANTINE_PREFIX + uuid,
            {"quarantined": False, "reason": reason},
            writer_class="operator",
            actor=request.caller.id,
            reason=reason,
            term=agent.term,
        )
        agent.registry.apply(write)
        agent.record_event(
            member.id, "gpu_resumed", actor=request.caller.id, reason=reason, detail={"uuid": uuid}
        )
        if member.id == agent.node_id and self.inventory is not None:
            self._install(self.inventory)
        return {"node_id": member.id, "uuid": uuid, "quarantined": False}

    # -- service --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.agent.config.gpu
        fixture = cfg.fixture or None
        async with open_probe(
            fixture=fixture,
            node_id=self.agent.node_id,
            keep_fixture_uuids=cfg.keep_fixture_uuids,
            clock=self.agent.clock,
            call_timeout_s=cfg.call_timeout_s,
        ) as probe:
            self._probe = probe
            await self.refresh()
            async with trio.open_nursery() as nursery:
                await nursery.start(probe.run_xid_watch, self.on_xid)
                task_status.started()
                health = self.agent.health
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


__all__ = ["GpuService", "NodeGpus"]
