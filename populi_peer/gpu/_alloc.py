"""Which GPUs may be leased: a pure function of verified facts and the agent's own state.

Capacity comes from the *verified* layer only (docs/design.md, "GPU truth"). The *advertised*
layer (operator labels from ``[gpu.labels]``) becomes capacity only when the operator
says ``trust_advertised = true`` *and* the probe verified no GPU at all; then each of the
``count`` advertised GPUs becomes a pseudo-device whose uuid starts with
:data:`ADVERTISED_UUID_PREFIX` (never the ``GPU-`` form of a real UUID) and whose reasons
say ``advertised_trusted``. See ``docs/adr/0004-gpu-truth-layering.md``.

Reason codes, in the order they are listed (``blocks``: the device is not allocatable):

- ``gpu_uuid_unknown`` (blocks): the probe could not read the GPU's UUID;
- ``gpu_unhealthy`` (blocks): the health verdict is ``unhealthy``;
- ``gpu_unknown_health`` (blocks): the health verdict is ``unknown``;
- ``gpu_quarantined`` (blocks): the UUID is in the quarantine set;
- ``gpu_leased`` (blocks): the UUID is under a live lease;
- ``mig_enabled`` (blocks): MIG mode is on, so the whole GPU cannot be leased;
- ``gpu_in_use_foreign`` (blocks): a compute process not in ``own_pids`` (or one whose
  entry NVML could not give) runs on it;
- ``gpu_processes_unknown`` (blocks): the process list could not be read;
- ``gpu_degraded``: the health verdict is ``degraded`` (still allocatable);
- ``gpu_processes_not_supported``: NVML does not list processes on this GPU;
- ``advertised_trusted``: a pseudo-device from a trusted advertised ``count``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from populi_peer.core.wire import record_json
from populi_peer.gpu._health import Health, health_verdict
from populi_peer.gpu._records import GpuDevice, GpuInventory
from populi_peer.gpu.errors import AdvertisedLabelError

#: Prefix of the uuid of a pseudo-device made from a trusted advertised ``count``.
ADVERTISED_UUID_PREFIX = "advertised-"

#: More advertised GPUs than this on one node is a typo, not a machine.
MAX_ADVERTISED_COUNT = 64

#: reason code -> whether it makes a device not allocatable.
ALLOCATION_REASONS: Mapping[str, bool] = types.MappingProxyType(
    {
        "gpu_uuid_unknown": True,
        "gpu_unhealthy": True,
        "gpu_unknown_health": True,
        "gpu_quarantined": True,
        "gpu_leased": True,
        "mig_enabled": True,
        "gpu_in_use_foreign": True,
        "gpu_processes_unknown": True,
        "gpu_degraded": False,
        "gpu_processes_not_supported": False,
        "advertised_trusted": False,
    }
)


@dataclass(frozen=True, slots=True)
class DeviceAllocation:
    """Whether one GPU may be leased now, and why (not)."""

    uuid: str | None
    index: int | None
    allocatable: bool
    reasons: tuple[str, ...] = ()
    #: False for a pseudo-device made from advertised labels.
    verified: bool = True

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)


def advertised_count(advertised: Mapping[str, str]) -> int | None:
    """The ``count`` label as a number; ``None`` when absent.

    Raises :class:`AdvertisedLabelError` when it is present but not an integer in
    ``0..MAX_ADVERTISED_COUNT`` (the config layer calls this to refuse a bad label).
    """
    raw = advertised.get("count")
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        raise AdvertisedLabelError(
            f'[gpu.labels] count = {raw!r}: expected a whole number of GPUs, like "2"'
        )
    value = int(text)
    if value > MAX_ADVERTISED_COUNT:
        raise AdvertisedLabelError(
            f"[gpu.labels] count = {raw!r}: more than {MAX_ADVERTISED_COUNT} GPUs on one node"
        )
    return value


def _device_allocation(
    device: GpuDevice,
    *,
    quarantined: frozenset[str],
    leased: frozenset[str],
    own_pids: frozenset[int],
) -> DeviceAllocation:
    reasons: list[str] = []
    uuid = device.uuid
    if uuid is None:
        reasons.append("gpu_uuid_unknown")
    verdict = health_verdict(device)
    if verdict.health is Health.UNHEALTHY:
        reasons.append("gpu_unhealthy")
    elif verdict.health is Health.UNKNOWN:
        reasons.append("gpu_unknown_health")
    if uuid is not None and uuid in quarantined:
        reasons.append("gpu_quarantined")
    if uuid is not None and uuid in leased:
        reasons.append("gpu_leased")
    if device.mig_mode_current is True:
        # In MIG mode CUDA sees GPU instances, not the parent GPU: a lease on the whole
        # device could not run anything. MIG instances are not leased yet (ADR 0004).
        reasons.append("mig_enabled")
    if device.compute_processes is not None:
        if any(p.pid is None or p.pid not in own_pids for p in device.compute_processes):
            reasons.append("gpu_in_use_foreign")
    elif device.unknown.get("compute_processes") == "not_supported":
        reasons.append("gpu_processes_not_supported")
    else:
        reasons.append("gpu_processes_unknown")
    if verdict.health is Health.DEGRADED:
        reasons.append("gpu_degraded")
    free, ordered = _judged(reasons)
    return DeviceAllocation(uuid, device.index, free, ordered, True)


def _judged(reasons: Sequence[str]) -> tuple[bool, tuple[str, ...]]:
    """(allocatable, ``reasons`` in their listed order): a reason this version does not
    know (a newer node's) blocks and goes last."""
    known = list(ALLOCATION_REASONS)
    ordered = tuple(sorted(reasons, key=lambda r: known.index(r) if r in known else len(known)))
    return not any(ALLOCATION_REASONS.get(r, True) for r in ordered), ordered


def leased_by_book(
    allocatable: bool, reasons: Sequence[str], *, leased: bool
) -> tuple[bool, tuple[str, ...]]:
    """A node's reported allocation of one GPU, with ``gpu_leased`` taken from the
    control plane's lease book (``leased``: the GPU is in a holding lease or a reported
    claim there) instead of from the report, which lags the book by up to a heartbeat:
    a GPU whose lease was just released is free at once, one just granted is leased at
    once. Only the lease is the book's to say: a device the node calls allocatable stays
    so unless leased, and one it calls blocked is freed only when its lease was the one
    block (a reason this version does not know might have been another)."""
    others = [r for r in reasons if r != "gpu_leased"]
    free_but_lease, ordered = _judged([*others, *(("gpu_leased",) if leased else ())])
    if leased:
        return False, ordered
    return allocatable or ("gpu_leased" in reasons and free_but_lease), ordered


def allocatable(
    inventory: GpuInventory,
    *,
    quarantined: frozenset[str],
    leased: frozenset[str],
    own_pids: frozenset[int],
    advertised: Mapping[str, str],
    trust_advertised: bool,
) -> list[DeviceAllocation]:
    """One entry per verified GPU (or per trusted advertised GPU, see the module doc)."""
    entries = [
        _device_allocation(d, quarantined=quarantined, leased=leased, own_pids=own_pids)
        for d in inventory.devices
    ]
    if entries or not trust_advertised:
        # Verified facts win: advertised labels never add to or replace verified GPUs.
        return entries
    try:
        count = advertised_count(advertised)
    except AdvertisedLabelError:
        count = None  # the config layer refuses it; here it just gives no capacity
    for i in range(count or 0):
        uuid = f"{ADVERTISED_UUID_PREFIX}{i}"
        reasons = ["advertised_trusted"]
        if uuid in quarantined:
            reasons.append("gpu_quarantined")
        if uuid in leased:
            reasons.append("gpu_leased")
        free, ordered = _judged(reasons)
        entries.append(DeviceAllocation(uuid, None, free, ordered, False))
    return entries


__all__ = [
    "ADVERTISED_UUID_PREFIX",
    "ALLOCATION_REASONS",
    "MAX_ADVERTISED_COUNT",
    "DeviceAllocation",
    "advertised_count",
    "allocatable",
    "leased_by_book",
]
