"""Builders for hint records in tests: GPU summaries from real probe records, and records
with placeholder texts checked by a lookup (for the pure gossip core)."""

from __future__ import annotations

from typing import Any

from populi_peer.core.hints import HintBody, HintRecord
from populi_peer.core.hlc import Hlc
from populi_peer.errors import BadRequest
from populi_peer.gpu import (
    ComputeProcess,
    DeviceAllocation,
    GpuDevice,
    GpuInventory,
    allocatable,
    gpu_summary,
)

GB = 10**9
GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"
RTX4090 = "NVIDIA GeForce RTX 4090"
T4 = "Tesla T4"


def device(
    index: int = 0,
    *,
    name: str | None = H100,
    total: int | None = 80 * GIB,
    free: int | None = None,
    util: int | None = 0,
    uuid: str | None = None,
    foreign: bool = False,
    throttle_mask: int = 0,
    ecc_errors: int = 0,
) -> GpuDevice:
    """A GPU as the probe reports it; healthy and idle unless told otherwise."""
    free = total if free is None else free
    used = None if total is None or free is None else total - free
    return GpuDevice(
        index=index,
        uuid=uuid if uuid is not None else f"GPU-{index:08d}-0000-0000-0000-000000000000",
        name=name,
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=free,
        utilization_gpu_pct=util,
        ecc_uncorrected_volatile=ecc_errors,
        row_remap_pending=False,
        row_remap_failure=False,
        throttle_reasons_mask=throttle_mask,
        compute_processes=(ComputeProcess(pid=4242),) if foreign else (),
        mig_mode_current=False,
    )


def allocations(
    inventory: GpuInventory,
    *,
    own_pids: frozenset[int] = frozenset(),
    quarantined: frozenset[str] = frozenset(),
    leased: frozenset[str] = frozenset(),
    advertised: dict[str, str] | None = None,
    trust_advertised: bool = False,
) -> list[DeviceAllocation]:
    """:func:`allocatable` with nothing quarantined, leased, ours or advertised unless given."""
    return allocatable(
        inventory,
        quarantined=quarantined,
        leased=leased,
        own_pids=own_pids,
        advertised=advertised or {},
        trust_advertised=trust_advertised,
    )


def summary(
    *devices: GpuDevice,
    leased: frozenset[str] = frozenset(),
    quarantined: frozenset[str] = frozenset(),
    advertised: dict[str, str] | None = None,
    trust_advertised: bool = False,
) -> dict[str, Any]:
    """The node's GPU summary (static part included), through the real pure functions."""
    inventory = GpuInventory(devices=tuple(devices), backend="replay")
    if not devices:
        inventory = GpuInventory(backend="nvml", cpu_only_reason="no_gpus")
    allocs = allocations(
        inventory,
        quarantined=quarantined,
        leased=leased,
        advertised=advertised,
        trust_advertised=trust_advertised,
    )
    return gpu_summary(inventory, allocs, advertised=advertised)


def body(
    *devices: GpuDevice,
    lifecycle: str = "active",
    roles: tuple[str, ...] = ("submit", "worker"),
    accepts_remote_work: bool = True,
    running_tasks: int = 0,
    addresses: tuple[str, ...] = ("10.0.0.7:7443",),
    **summary_kw: Any,
) -> HintBody:
    return HintBody(
        lifecycle=lifecycle,  # type: ignore[arg-type]
        roles=roles,
        accepts_remote_work=accepts_remote_work,
        running_tasks=running_tasks,
        addresses=addresses,
        gpu=summary(*devices, **summary_kw),
    )


class FakeSigner:
    """Records with placeholder texts, and a ``verify`` that knows exactly those texts
    (an unknown text is refused as a bad signature would be)."""

    def __init__(self) -> None:
        self.known: dict[str, HintRecord] = {}

    def record(
        self,
        node: str,
        wall_ms: int,
        counter: int = 0,
        *,
        issued_ms: int | None = None,
        hint: HintBody | None = None,
        tag: str = "",
    ) -> HintRecord:
        text = f"fake:{node}:{wall_ms}:{counter}:{tag}"
        record = HintRecord(
            node_id=node,
            version=Hlc(wall_ms, counter),
            issued_ms=wall_ms if issued_ms is None else issued_ms,
            body=hint or HintBody(lifecycle="active"),
            text=text,
        )
        self.known[text] = record
        return record

    def verify(self, text: str) -> HintRecord:
        try:
            return self.known[text]
        except KeyError:
            raise BadRequest("unknown placeholder", code="hint_bad_signature") from None
