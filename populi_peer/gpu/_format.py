"""What ``populi probe`` prints: a table for people, a JSON object for programs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from populi_peer.gpu._health import HealthVerdict, health_verdicts
from populi_peer.gpu._records import GpuDevice, GpuInventory

UNKNOWN = "unknown"
_MIB = 2**20


def _cuda(version: int | None) -> str:
    if version is None:
        return UNKNOWN
    return f"{version // 1000}.{(version % 1000) // 10}"


def _memory(d: GpuDevice) -> str:
    used = UNKNOWN if d.memory_used_bytes is None else str(d.memory_used_bytes // _MIB)
    total = UNKNOWN if d.memory_total_bytes is None else str(d.memory_total_bytes // _MIB)
    return f"{used}/{total} MiB"


def _power(d: GpuDevice) -> str:
    draw = UNKNOWN if d.power_draw_mw is None else f"{d.power_draw_mw / 1000:.0f}"
    limit = UNKNOWN if d.power_limit_mw is None else f"{d.power_limit_mw / 1000:.0f}"
    return f"{draw}/{limit} W"


def _or_unknown(value: object, suffix: str = "") -> str:
    return UNKNOWN if value is None else f"{value}{suffix}"


def _unknown_note(d: GpuDevice) -> str:
    """``reason (field, field)`` per reason; a long list is counted, not spelled out."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in sorted(d.unknown.items()):
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        listed = ", ".join(names) if len(names) <= 4 else f"{len(names)} fields"
        parts.append(f"{reason} ({listed})")
    return "; ".join(parts)


def _verdicts(
    inventory: GpuInventory, verdicts: Sequence[HealthVerdict] | None
) -> dict[int, HealthVerdict]:
    chosen = verdicts if verdicts is not None else health_verdicts(inventory)
    return {v.index: v for v in chosen}


def format_probe(inventory: GpuInventory, verdicts: Sequence[HealthVerdict] | None = None) -> str:
    """A table of the node's GPUs; unknown fields read ``unknown``."""
    source = inventory.backend
    if inventory.source:
        source += f" ({inventory.source})"
    head = (
        f"GPU probe: {source}; driver {_or_unknown(inventory.driver_version)}, "
        f"CUDA {_cuda(inventory.cuda_driver_version)}, "
        f"NVML {_or_unknown(inventory.nvml_version)}"
    )
    if inventory.cpu_only_reason is not None:
        return f"GPU probe: {source}; no GPU: this node is CPU-only ({inventory.cpu_only_reason})\n"
    by_index = _verdicts(inventory, verdicts)
    header = ("IDX", "UUID", "NAME", "MEMORY USED/TOTAL", "UTIL", "TEMP", "POWER", "HEALTH")
    rows = [header]
    notes = []
    for d in inventory.devices:
        verdict = by_index.get(d.index)
        health = verdict.health.value if verdict else UNKNOWN
        if verdict and verdict.reasons:
            health += " (" + ", ".join(verdict.reasons) + ")"
        rows.append(
            (
                str(d.index),
                _or_unknown(d.uuid),
                _or_unknown(d.name),
                _memory(d),
                _or_unknown(d.utilization_gpu_pct, "%"),
                _or_unknown(d.temperature_c, "C"),
                _power(d),
                health,
            )
        )
        if d.unknown:
            notes.append(f"  GPU {d.index}: {_unknown_note(d)}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [head]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if inventory.wedged:
        lines.append("NVML did not answer in time: some facts are unknown (wedged)")
    if notes:
        lines.append("unknown:")
        lines += notes
    return "\n".join(lines) + "\n"


def probe_json(
    inventory: GpuInventory, verdicts: Sequence[HealthVerdict] | None = None
) -> dict[str, Any]:
    """``populi probe --json``: the inventory's JSON with each device's verdict added.

    The result still parses with ``GpuInventory.from_json`` (the added keys are ignored).
    """
    by_index = _verdicts(inventory, verdicts)
    out = inventory.to_json()
    for entry in out["devices"]:
        verdict = by_index.get(entry["index"])
        entry["health"] = verdict.health.value if verdict else UNKNOWN
        entry["health_reasons"] = list(verdict.reasons) if verdict else []
    return out


__all__ = ["format_probe", "probe_json"]
