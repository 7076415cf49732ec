"""Verified GPU facts as immutable records, and their JSON form.

Every field that NVML may refuse is ``None`` when unknown, and the device's ``unknown``
mapping says why (``not_supported``, ``timeout``, ``wedged``, ``gpu_lost``,
``error:<NVML error class>``, ``unreadable``). A field never holds a made-up value.

The JSON form (``to_json`` / ``from_json``) follows ``docs/conventions.md``: ``"v"`` is
carried, unknown keys are ignored, a missing optional key reads as ``None`` (so an old
payload parses), and a key of the wrong type raises :class:`InventoryFormatError` naming
the field — the only error ``from_json`` raises.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from populi_peer import PROTOCOL_VERSION
from populi_peer.core.wire import record_json
from populi_peer.gpu.errors import InventoryFormatError

#: Clock event ("throttle") reason bits, as NVML defines them (``nvmlClocksEventReason*``).
THROTTLE_REASON_BITS: Mapping[int, str] = types.MappingProxyType(
    {
        0x1: "gpu_idle",
        0x2: "applications_clocks_setting",
        0x4: "sw_power_cap",
        0x8: "hw_slowdown",
        0x10: "sync_boost",
        0x20: "sw_thermal_slowdown",
        0x40: "hw_thermal_slowdown",
        0x80: "hw_power_brake_slowdown",
        0x100: "display_clock_setting",
    }
)


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """Decode an NVML clock event reason bitmask; unnamed bits read ``bit_0x...``."""
    names: list[str] = []
    bit = 1
    rest = mask
    while rest:
        if rest & bit:
            names.append(THROTTLE_REASON_BITS.get(bit, f"bit_{bit:#x}"))
            rest &= ~bit
        bit <<= 1
    return tuple(names)


def _frozen_map(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True, slots=True)
class ComputeProcess:
    """A process holding a compute context on a GPU.

    ``pid`` is ``None`` when NVML's entry could not be read; such a process counts as
    foreign (``gpu_in_use_foreign``), since nobody can prove Populi started it.
    """

    pid: int | None
    used_memory_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)


@dataclass(frozen=True, slots=True)
class NvLink:
    """One NVLink of a device: whether it is up, and what is at its other end."""

    link: int
    active: bool
    remote_pci_bus_id: str | None = None
    #: Index of the local GPU at the other end, when the remote bus id is one of ours.
    peer_index: int | None = None

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """What the node's own NVML said about one GPU in one refresh."""

    index: int
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    temperature_c: int | None = None
    power_draw_mw: int | None = None
    power_limit_mw: int | None = None
    compute_capability: tuple[int, int] | None = None
    mig_mode_current: bool | None = None
    mig_mode_pending: bool | None = None
    ecc_mode_current: bool | None = None
    ecc_mode_pending: bool | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failure: bool | None = None
    throttle_reasons_mask: int | None = None
    persistence_mode: bool | None = None
    compute_processes: tuple[ComputeProcess, ...] | None = None
    nvlinks: tuple[NvLink, ...] | None = None
    numa_node: int | None = None
    pcie_link_gen: int | None = None
    pcie_link_width: int | None = None
    fan_speed_pct: int | None = None
    #: NVML answered ``NVMLError_GpuIsLost`` for this device in this refresh.
    lost: bool = False
    #: field name -> why it is ``None``.
    unknown: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unknown", _frozen_map(self.unknown))

    @property
    def throttle_reasons(self) -> tuple[str, ...] | None:
        """The decoded names of ``throttle_reasons_mask``."""
        if self.throttle_reasons_mask is None:
            return None
        return throttle_reason_names(self.throttle_reasons_mask)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in _DEVICE_FIELDS:
            out[spec.name] = _dump(spec.kind, getattr(self, spec.name))
            if spec.name == "throttle_reasons_mask":
                # Decoded for people reading the JSON; ignored by from_json.
                reasons = self.throttle_reasons
                out["throttle_reasons"] = list(reasons) if reasons is not None else None
        out["lost"] = self.lost
        out["unknown"] = dict(self.unknown)
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str = "device") -> GpuDevice:
        if not isinstance(data, dict):
            raise InventoryFormatError(f"{where}: expected an object, got {_tname(data)}")
        index = data.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise InventoryFormatError(
                f"{where}.index: expected a non-negative integer, got {index!r:.40}"
            )
        kwargs: dict[str, Any] = {"index": index}
        for spec in _DEVICE_FIELDS:
            if spec.name == "index":
                continue
            kwargs[spec.name] = _load(spec.kind, data.get(spec.name), f"{where}.{spec.name}")
        lost = data.get("lost", False)
        if not isinstance(lost, bool):
            raise InventoryFormatError(f"{where}.lost: expected a boolean, got {_tname(lost)}")
        kwargs["lost"] = lost
        kwargs["unknown"] = _load_reasons(data.get("unknown"), f"{where}.unknown")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class GpuInventory:
    """One refresh of the node's verified GPU facts.

    ``cpu_only_reason`` is set (and ``devices`` empty) when the node has no usable NVIDIA
    driver: ``nvml_library_not_found``, ``nvml_driver_not_loaded``, ``no_gpus``,
    ``pynvml_missing``, ``nvml_init_timeout`` or ``nvml_init_failed:<NVML error>``.
    ``wedged`` is true when an NVML call of this refresh did not answer in time: the
    fields it left are ``unknown`` (``timeout`` / ``wedged``).
    """

    devices: tuple[GpuDevice, ...] = ()
    backend: str = "unknown"
    source: str | None = None
    driver_version: str | None = None
    nvml_version: str | None = None
    cuda_driver_version: int | None = None
    cpu_only_reason: str | None = None
    wedged: bool = False
    probed_at_ms: int | None = None
    unknown: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unknown", _frozen_map(self.unknown))
        object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def cpu_only(self) -> bool:
        return self.cpu_only_reason is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            **record_json(self, omit=("devices", "unknown"), nulls=True),
            "unknown": dict(self.unknown),
            "devices": [d.to_json() for d in self.devices],
        }

    @classmethod
    def from_json(cls, data: Any) -> GpuInventory:
        """Parse a payload; raises only :class:`InventoryFormatError`."""
        if not isinstance(data, dict):
            raise InventoryFormatError(f"GPU inventory: expected an object, got {_tname(data)}")
        raw_devices = data.get("devices", [])
        if raw_devices is None:
            raw_devices = []
        if not isinstance(raw_devices, list):
            raise InventoryFormatError(
                f"GPU inventory.devices: expected a list, got {_tname(raw_devices)}"
            )
        devices = tuple(
            GpuDevice.from_json(d, where=f"devices[{i}]") for i, d in enumerate(raw_devices)
        )
        backend = data.get("backend", "unknown")
        if backend is None:
            backend = "unknown"
        if not isinstance(backend, str):
            raise InventoryFormatError(f"backend: expected a string, got {_tname(backend)}")
        wedged = data.get("wedged", False)
        if wedged is None:
            wedged = False
        if not isinstance(wedged, bool):
            raise InventoryFormatError(f"wedged: expected a boolean, got {_tname(wedged)}")
        return cls(
            devices=devices,
            backend=backend,
            source=_load("str", data.get("source"), "source"),
            driver_version=_load("str", data.get("driver_version"), "driver_version"),
            nvml_version=_load("str", data.get("nvml_version"), "nvml_version"),
            cuda_driver_version=_load(
                "int", data.get("cuda_driver_version"), "cuda_driver_version"
            ),
            cpu_only_reason=_load("str", data.get("cpu_only_reason"), "cpu_only_reason"),
            wedged=wedged,
            probed_at_ms=_load("int", data.get("probed_at_ms"), "probed_at_ms"),
            unknown=_load_reasons(data.get("unknown"), "unknown"),
        )


# ---------------------------------------------------------------------------------------
# JSON helpers. A field's "kind" says how it is written and checked.


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    kind: str  # int | str | bool | cc | procs | nvlinks


_KINDS = {
    "uuid": "str",
    "name": "str",
    "pci_bus_id": "str",
    "compute_capability": "cc",
    "mig_mode_current": "bool",
    "mig_mode_pending": "bool",
    "ecc_mode_current": "bool",
    "ecc_mode_pending": "bool",
    "row_remap_pending": "bool",
    "row_remap_failure": "bool",
    "persistence_mode": "bool",
    "compute_processes": "procs",
    "nvlinks": "nvlinks",
}

_DEVICE_FIELDS: tuple[_FieldSpec, ...] = tuple(
    _FieldSpec(f.name, _KINDS.get(f.name, "int"))
    for f in fields(GpuDevice)
    if f.name not in ("lost", "unknown")
)

#: The fields of a device that NVML reports (the keys of ``GpuDevice.unknown``).
DEVICE_FIELD_NAMES: tuple[str, ...] = tuple(s.name for s in _DEVICE_FIELDS if s.name != "index")


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dump(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "cc":
        return [value[0], value[1]]
    if kind in ("procs", "nvlinks"):
        return [item.to_json() for item in value]
    return value


def _load(kind: str, value: Any, where: str) -> Any:
    if value is None:
        return None
    if kind == "int":
        if _is_int(value):
            return value
        # JSON writers may send 3.0 for 3; accept exact integral floats only.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise InventoryFormatError(f"{where}: expected an integer, got {_tname(value)}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise InventoryFormatError(f"{where}: expected a string, got {_tname(value)}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise InventoryFormatError(f"{where}: expected a boolean, got {_tname(value)}")
    if kind == "cc":
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_int(v) and v >= 0 for v in value)
        ):
            return (value[0], value[1])
        raise InventoryFormatError(f"{where}: expected [major, minor], got {value!r:.40}")
    if kind == "procs":
        if not isinstance(value, list):
            raise InventoryFormatError(f"{where}: expected a list, got {_tname(value)}")
        return tuple(_load_process(p, f"{where}[{i}]") for i, p in enumerate(value))
    if kind == "nvlinks":
        if not isinstance(value, list):
            raise InventoryFormatError(f"{where}: expected a list, got {_tname(value)}")
        return tuple(_load_nvlink(p, f"{where}[{i}]") for i, p in enumerate(value))
    raise AssertionError(kind)  # pragma: no cover - the kinds are ours


def _load_process(value: Any, where: str) -> ComputeProcess:
    if not isinstance(value, dict):
        raise InventoryFormatError(f"{where}: expected an object, got {_tname(value)}")
    return ComputeProcess(
        pid=_load("int", value.get("pid"), f"{where}.pid"),
        used_memory_bytes=_load(
            "int", value.get("used_memory_bytes"), f"{where}.used_memory_bytes"
        ),
    )


def _load_nvlink(value: Any, where: str) -> NvLink:
    if not isinstance(value, dict):
        raise InventoryFormatError(f"{where}: expected an object, got {_tname(value)}")
    link = _load("int", value.get("link"), f"{where}.link")
    active = _load("bool", value.get("active"), f"{where}.active")
    if link is None or active is None:
        raise InventoryFormatError(f"{where}: 'link' and 'active' are required")
    return NvLink(
        link=link,
        active=active,
        remote_pci_bus_id=_load(
            "str", value.get("remote_pci_bus_id"), f"{where}.remote_pci_bus_id"
        ),
        peer_index=_load("int", value.get("peer_index"), f"{where}.peer_index"),
    )


def _load_reasons(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InventoryFormatError(f"{where}: expected an object, got {_tname(value)}")
    out: dict[str, str] = {}
    for key, reason in value.items():
        if not isinstance(key, str) or not isinstance(reason, str):
            raise InventoryFormatError(f"{where}: expected string -> string, got {key!r:.40}")
        out[key] = reason
    return out


__all__ = [
    "DEVICE_FIELD_NAMES",
    "THROTTLE_REASON_BITS",
    "ComputeProcess",
    "GpuDevice",
    "GpuInventory",
    "NvLink",
    "throttle_reason_names",
]
