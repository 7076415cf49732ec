"""The GPU part of a heartbeat: static facts once per change, fast metrics every time.

``gpu_summary(inventory, allocations, include_static=...)`` returns::

    {"v": 1,
     "facts_version": "<16 hex>",      # sha256 of the canonical JSON of "static"
     "static": {...},                   # only when include_static
     "metrics": {...}}

``static`` (sent when ``facts_version`` differs from what the receiver last acknowledged,
or when it asks)::

    {"backend": "nvml" | "replay",
     "driver_version": "580.159.04", "cuda_driver_version": 13000,
     "cpu_only_reason": "...",          # only on a CPU-only node
     "devices": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
                  "memory_total_bytes": 85520809984, "compute_capability": "9.0",
                  "mig_mode": false, "ecc_mode": true}],
     "advertised": {"model": "RTX 4090"}}   # operator labels, a separate layer; if any

``metrics`` (every heartbeat)::

    {"wedged": true,                    # only when NVML did not answer in time
     "devices": [{"index": 0, "memory_used_bytes": ..., "memory_free_bytes": ...,
                  "utilization_gpu_pct": 99, "temperature_c": 61, "power_draw_mw": 698494,
                  "health": "healthy", "health_reasons": [...],
                  "allocatable": false, "allocation_reasons": ["gpu_in_use_foreign"]}],
     "advertised_devices": [{"uuid": "advertised-0", "allocatable": true,
                             "reasons": ["advertised_trusted"]}]}   # only if any

A key whose value is unknown is left out (absent means unknown), as are empty reason
lists, so a heartbeat stays small. Metric entries name their device by ``index``; the
index means the device with that index in the static facts of the same
``facts_version`` — a receiver holding other static facts must ignore the metrics and
wait for (or ask for) the static part. Hints never authorize (safety rule 6): the control
plane re-checks at grant time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from populi_peer import PROTOCOL_VERSION
from populi_peer.gpu._alloc import DeviceAllocation
from populi_peer.gpu._health import HealthVerdict, health_verdict
from populi_peer.gpu._records import GpuInventory


def _compact(entries: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in entries if v is not None and v != []}


def _cc(value: tuple[int, int] | None) -> str | None:
    return None if value is None else f"{value[0]}.{value[1]}"


def summary_static(
    inventory: GpuInventory, *, advertised: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The facts that change only when hardware, driver or labels change."""
    devices = [
        _compact(
            [
                ("index", d.index),
                ("uuid", d.uuid),
                ("name", d.name),
                ("memory_total_bytes", d.memory_total_bytes),
                ("compute_capability", _cc(d.compute_capability)),
                ("mig_mode", d.mig_mode_current),
                ("ecc_mode", d.ecc_mode_current),
            ]
        )
        for d in inventory.devices
    ]
    out = _compact(
        [
            ("backend", inventory.backend),
            ("driver_version", inventory.driver_version),
            ("cuda_driver_version", inventory.cuda_driver_version),
            ("cpu_only_reason", inventory.cpu_only_reason),
        ]
    )
    out["devices"] = devices
    if advertised:
        out["advertised"] = dict(sorted(advertised.items()))
    return out


def facts_version(inventory: GpuInventory, *, advertised: Mapping[str, str] | None = None) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of :func:`summary_static`."""
    static = summary_static(inventory, advertised=advertised)
    canonical = json.dumps(static, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def summary_metrics(
    inventory: GpuInventory,
    allocations: Sequence[DeviceAllocation],
    *,
    verdicts: Sequence[HealthVerdict] | None = None,
) -> dict[str, Any]:
    """The facts that change every refresh: load, health and allocatability."""
    by_index = {v.index: v for v in verdicts} if verdicts is not None else {}
    alloc_by_index = {a.index: a for a in allocations if a.verified and a.index is not None}
    devices = []
    for d in inventory.devices:
        verdict = by_index.get(d.index) or health_verdict(d)
        alloc = alloc_by_index.get(d.index)
        devices.append(
            _compact(
                [
                    ("index", d.index),
                    ("memory_used_bytes", d.memory_used_bytes),
                    ("memory_free_bytes", d.memory_free_bytes),
                    ("utilization_gpu_pct", d.utilization_gpu_pct),
                    ("temperature_c", d.temperature_c),
                    ("power_draw_mw", d.power_draw_mw),
                    ("health", verdict.health.value),
                    ("health_reasons", list(verdict.reasons)),
                    ("allocatable", alloc.allocatable if alloc else None),
                    ("allocation_reasons", list(alloc.reasons) if alloc else None),
                ]
            )
        )
    out: dict[str, Any] = {}
    if inventory.wedged:
        out["wedged"] = True
    out["devices"] = devices
    pseudo = [
        {"uuid": a.uuid, "allocatable": a.allocatable, "reasons": list(a.reasons)}
        for a in allocations
        if not a.verified
    ]
    if pseudo:
        out["advertised_devices"] = pseudo
    return out


def gpu_summary(
    inventory: GpuInventory,
    allocations: Sequence[DeviceAllocation],
    *,
    include_static: bool = True,
    advertised: Mapping[str, str] | None = None,
    verdicts: Sequence[HealthVerdict] | None = None,
) -> dict[str, Any]:
    """The heartbeat's ``gpu`` object (see the module docstring)."""
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "facts_version": facts_version(inventory, advertised=advertised),
    }
    if include_static:
        out["static"] = summary_static(inventory, advertised=advertised)
    out["metrics"] = summary_metrics(inventory, allocations, verdicts=verdicts)
    return out


__all__ = ["facts_version", "gpu_summary", "summary_metrics", "summary_static"]
