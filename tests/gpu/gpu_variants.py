"""Variants of the real H100 captures, each made by editing a deep copy of one.

Only what this machine lacks is faked: the GPU. Every variant starts from a capture that a
real H100 produced (shipped in ``populi_peer/gpu/captures/``) and changes the few readings
that the condition under test changes, in the form NVML gives them.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

IDLE = "h100-80gb-hbm3-idle.json"
LOAD = "h100-80gb-hbm3-load.json"
LOAD_UUID = "GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae2d"

NOT_SUPPORTED = {"error": "NVMLError_NotSupported", "code": 3, "msg": "Not Supported"}


def capture(name: str = IDLE) -> dict[str, Any]:
    """A fresh deep copy of a shipped capture."""
    text = resources.files("populi_peer.gpu").joinpath("captures", name).read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def device0(data: dict[str, Any]) -> dict[str, Any]:
    device: dict[str, Any] = data["devices"][0]
    return device


def eight_gpus(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """An 8-GPU host: the captured device eight times, each with its own UUID and bus."""
    data = copy.deepcopy(base or capture())
    template = device0(data)
    devices = []
    for i in range(8):
        dev = copy.deepcopy(template)
        dev["index"] = i
        dev["uuid"] = f"GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae{i:02x}"
        dev["pci"]["busId"] = f"00000000:00:{6 + i:02X}.0"
        dev["minor_number"] = i
        devices.append(dev)
    data["devices"] = devices
    data["device_count"] = 8
    return data


def with_device(base: dict[str, Any] | None = None, **readings: Any) -> dict[str, Any]:
    """The capture with device 0's readings replaced (capture keys, NVML value shapes)."""
    data = copy.deepcopy(base or capture())
    device0(data).update(readings)
    return data


def ecc_uncorrected() -> dict[str, Any]:
    return with_device(ecc_volatile_uncorrected=2, ecc_aggregate_uncorrected=2)


def row_remap_failure() -> dict[str, Any]:
    # nvmlDeviceGetRemappedRows: (correctable, uncorrectable, isPending, failureOccurred)
    return with_device(remapped_rows=[0, 512, 0, 1])


def row_remap_pending() -> dict[str, Any]:
    return with_device(remapped_rows=[0, 1, 1, 0])


def mig_enabled() -> dict[str, Any]:
    return with_device(mig_mode=[1, 1], gpu_instance_count_max=7)


def throttled(mask: int) -> dict[str, Any]:
    return with_device(clocks_throttle_reasons=mask)


def busy(*pids: int) -> dict[str, Any]:
    """Load capture with readable process entries (the real one is an object repr)."""
    procs = [{"pid": pid, "usedGpuMemory": 21610 * 2**20} for pid in pids]
    return with_device(capture("h100-80gb-hbm3-load.json"), compute_processes=procs)


def reset_required() -> dict[str, Any]:
    error = {"error": "NVMLError_ResetRequired", "code": 16, "msg": "GPU requires restart"}
    return with_device(ecc_volatile_uncorrected=error)


def nothing_supported() -> dict[str, Any]:
    """Every health query refused as not supported (a consumer card in a VM, say)."""
    return with_device(
        ecc_volatile_uncorrected=NOT_SUPPORTED,
        ecc_aggregate_uncorrected=NOT_SUPPORTED,
        ecc_mode=NOT_SUPPORTED,
        remapped_rows=NOT_SUPPORTED,
        clocks_throttle_reasons=NOT_SUPPORTED,
        compute_processes=NOT_SUPPORTED,
    )


def no_driver() -> dict[str, Any]:
    data = capture()
    data["init"] = {"error": "NVMLError_DriverNotLoaded", "code": 9, "msg": "Driver Not Loaded"}
    return data


def sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"populi_replay": 1, "steps": list(steps)}


def write(folder: Path, data: dict[str, Any], name: str = "fixture.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data), "utf-8")
    return path
