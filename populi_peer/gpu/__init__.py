"""Verified GPU facts: the NVML probe, its replay backend, health verdicts and capacity.

- :func:`open_probe` gives a :class:`Probe`: ``await probe.probe()`` returns a
  :class:`GpuInventory` (NVML in a worker thread, or a replay of a real capture; a node
  without a driver is CPU-only, never an error); ``probe.run_xid_watch`` reports
  :class:`XidEvent` values.
- :func:`health_verdict` (pure) judges a device by the one table :data:`HEALTH_RULES`;
  :func:`is_critical_xid` decides whether an XID quarantines its GPU.
- :func:`allocatable` (pure) says which GPUs may be leased, from verified facts only;
  advertised labels count only when trusted and nothing was verified.
- :func:`gpu_summary` is the heartbeat form; :func:`format_probe` / :func:`probe_json`
  are what ``populi probe`` prints.

See ``docs/adr/0004-gpu-truth-layering.md`` and ``docs/gpu-health.md``.
"""

from __future__ import annotations

from populi_peer.gpu._alloc import (
    ADVERTISED_UUID_PREFIX,
    ALLOCATION_REASONS,
    DeviceAllocation,
    advertised_count,
    allocatable,
    leased_by_book,
)
from populi_peer.gpu._format import format_probe, probe_json
from populi_peer.gpu._health import (
    CRITICAL_XIDS,
    HEALTH_RULES,
    Health,
    HealthRule,
    HealthVerdict,
    XidEvent,
    health_verdict,
    health_verdicts,
    is_critical_xid,
)
from populi_peer.gpu._probe import Probe, open_probe
from populi_peer.gpu._records import (
    ComputeProcess,
    GpuDevice,
    GpuInventory,
    NvLink,
    throttle_reason_names,
)
from populi_peer.gpu._replay import derive_replay_uuid, package_capture_names
from populi_peer.gpu._summary import facts_version, gpu_summary, summary_metrics, summary_static
from populi_peer.gpu.errors import (
    AdvertisedLabelError,
    FixtureError,
    InventoryFormatError,
    ProbeError,
)

__all__ = [
    "ADVERTISED_UUID_PREFIX",
    "ALLOCATION_REASONS",
    "CRITICAL_XIDS",
    "HEALTH_RULES",
    "AdvertisedLabelError",
    "ComputeProcess",
    "DeviceAllocation",
    "FixtureError",
    "GpuDevice",
    "GpuInventory",
    "Health",
    "HealthRule",
    "HealthVerdict",
    "InventoryFormatError",
    "NvLink",
    "Probe",
    "ProbeError",
    "XidEvent",
    "advertised_count",
    "allocatable",
    "derive_replay_uuid",
    "facts_version",
    "format_probe",
    "gpu_summary",
    "health_verdict",
    "health_verdicts",
    "is_critical_xid",
    "leased_by_book",
    "open_probe",
    "package_capture_names",
    "probe_json",
    "summary_metrics",
    "summary_static",
    "throttle_reason_names",
]
