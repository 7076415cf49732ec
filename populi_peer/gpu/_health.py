"""Health verdicts and critical XIDs: pure functions over verified facts.

The rules live in one table, :data:`HEALTH_RULES`, and ``docs/gpu-health.md`` mirrors it
row for row (a test compares the two). A device's verdict is the worst verdict among the
rules that fire, with every firing rule's reason code; when none fires it is healthy.

``not_supported`` is never a reason to doubt a GPU: a real, healthy H100 in a VM refuses
fan speed, NUMA node, retired pages and NVLink state. Only when *every* field that a rule
reads is unknown, and at least one of them for another reason than ``not_supported``
(a timeout, a wedged NVML, an NVML error), is the verdict ``unknown``.

XIDs arrive as events (``run_xid_watch``), not as probe fields: :func:`is_critical_xid`
decides whether one should quarantine its GPU. Keeping the quarantine is the agent's job.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from populi_peer.core.wire import record_json
from populi_peer.gpu._records import GpuDevice, GpuInventory


class Health(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNKNOWN = "unknown"
    UNHEALTHY = "unhealthy"


#: Worse verdicts rank higher. ``unknown`` ranks above ``degraded``: a GPU we cannot read
#: is not allocatable, a degraded one is.
_RANK = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.UNKNOWN: 2, Health.UNHEALTHY: 3}

#: Fields that the health rules read. All of them unknown (not merely unsupported) makes
#: the verdict ``unknown``.
HEALTH_FIELDS: tuple[str, ...] = (
    "ecc_uncorrected_volatile",
    "row_remap_pending",
    "row_remap_failure",
    "throttle_reasons_mask",
)

_HW_SLOWDOWN = 0x8
_SW_THERMAL = 0x20
_HW_THERMAL = 0x40
_HW_POWER_BRAKE = 0x80


@dataclass(frozen=True, slots=True)
class HealthRule:
    """One row of the health table: when ``check(device)`` is true, ``reason`` applies."""

    reason: str
    health: Health
    condition: str
    check: Callable[[GpuDevice], bool]


def _bit(mask: int) -> Callable[[GpuDevice], bool]:
    return lambda d: d.throttle_reasons_mask is not None and bool(d.throttle_reasons_mask & mask)


def _reset_required(d: GpuDevice) -> bool:
    return "error:NVMLError_ResetRequired" in d.unknown.values()


def _unreadable(d: GpuDevice) -> bool:
    if d.lost or _reset_required(d):
        return False  # those rules say more than "unknown"
    reasons = [d.unknown.get(name) for name in HEALTH_FIELDS]
    if any(r is None for r in reasons):
        return False  # at least one health field was read
    return any(r != "not_supported" for r in reasons)


HEALTH_RULES: tuple[HealthRule, ...] = (
    HealthRule(
        "gpu_lost",
        Health.UNHEALTHY,
        "NVML answers NVMLError_GpuIsLost for the device (fallen off the bus)",
        lambda d: d.lost,
    ),
    HealthRule(
        "gpu_reset_required",
        Health.UNHEALTHY,
        "NVML answers NVMLError_ResetRequired for a query of the device",
        _reset_required,
    ),
    HealthRule(
        "ecc_uncorrected_volatile",
        Health.UNHEALTHY,
        "volatile uncorrected ECC error count > 0 (since the last driver load)",
        lambda d: bool(d.ecc_uncorrected_volatile),
    ),
    HealthRule(
        "row_remap_failure",
        Health.UNHEALTHY,
        "row remapping failed (nvmlDeviceGetRemappedRows failureOccurred)",
        lambda d: d.row_remap_failure is True,
    ),
    HealthRule(
        "row_remap_pending",
        Health.DEGRADED,
        "a row remapping waits for the next GPU reset (isPending)",
        lambda d: d.row_remap_pending is True,
    ),
    HealthRule(
        "throttle_hw_slowdown",
        Health.DEGRADED,
        "clock event reason HW slowdown (0x8) is active",
        _bit(_HW_SLOWDOWN),
    ),
    HealthRule(
        "throttle_sw_thermal",
        Health.DEGRADED,
        "clock event reason SW thermal slowdown (0x20) is active",
        _bit(_SW_THERMAL),
    ),
    HealthRule(
        "throttle_hw_thermal",
        Health.DEGRADED,
        "clock event reason HW thermal slowdown (0x40) is active",
        _bit(_HW_THERMAL),
    ),
    HealthRule(
        "throttle_hw_power_brake",
        Health.DEGRADED,
        "clock event reason HW power brake slowdown (0x80) is active",
        _bit(_HW_POWER_BRAKE),
    ),
    HealthRule(
        "health_unreadable",
        Health.UNKNOWN,
        "every health field is unknown, and not all of them because NVML does not support it",
        _unreadable,
    ),
)


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    index: int
    uuid: str | None
    health: Health
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True) | {"health": self.health.value}


def health_verdict(device: GpuDevice) -> HealthVerdict:
    """The verdict of one device, from :data:`HEALTH_RULES` alone."""
    fired = [rule for rule in HEALTH_RULES if rule.check(device)]
    if not fired:
        return HealthVerdict(device.index, device.uuid, Health.HEALTHY, ())
    worst = max((rule.health for rule in fired), key=_RANK.__getitem__)
    return HealthVerdict(device.index, device.uuid, worst, tuple(rule.reason for rule in fired))


def health_verdicts(inventory: GpuInventory) -> tuple[HealthVerdict, ...]:
    return tuple(health_verdict(d) for d in inventory.devices)


# ---------------------------------------------------------------------------------------
# XIDs

#: XIDs that quarantine their GPU: the GPU itself (not the application) failed, and NVIDIA's
#: XID catalogue asks for a GPU reset, a node reboot or service before new work. Why each
#: is here, and why 13/31/43/45/63 are not, is in docs/gpu-health.md.
CRITICAL_XIDS: Mapping[int, str] = types.MappingProxyType(
    {
        48: "double bit ECC error (uncorrectable memory error)",
        62: "internal micro-controller halt",
        64: "ECC page retirement or row remapping recording failure",
        74: "NVLink error",
        79: "GPU has fallen off the bus",
        92: "high single-bit ECC error rate",
        94: "contained ECC error",
        95: "uncontained ECC error",
        119: "GSP RPC timeout",
        120: "GSP error",
    }
)


def is_critical_xid(code: int) -> bool:
    """Whether an XID event should quarantine its GPU (see :data:`CRITICAL_XIDS`)."""
    return code in CRITICAL_XIDS


@dataclass(frozen=True, slots=True)
class XidEvent:
    """An XID the driver reported for a GPU. ``uuid`` is ``None`` if it could not be read."""

    uuid: str | None
    index: int | None
    code: int
    critical: bool
    at_wall: float

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)


__all__ = [
    "CRITICAL_XIDS",
    "HEALTH_FIELDS",
    "HEALTH_RULES",
    "Health",
    "HealthRule",
    "HealthVerdict",
    "XidEvent",
    "health_verdict",
    "health_verdicts",
    "is_critical_xid",
]
