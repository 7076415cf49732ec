"""Health table, XIDs and allocatability: pure functions, and the docs that mirror them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from populi_peer.gpu import (
    ADVERTISED_UUID_PREFIX,
    ALLOCATION_REASONS,
    CRITICAL_XIDS,
    HEALTH_RULES,
    AdvertisedLabelError,
    ComputeProcess,
    DeviceAllocation,
    GpuDevice,
    GpuInventory,
    Health,
    advertised_count,
    allocatable,
    format_probe,
    health_verdict,
    is_critical_xid,
    leased_by_book,
    throttle_reason_names,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "gpu-health.md"

READ_OK: dict[str, Any] = {
    "ecc_uncorrected_volatile": 0,
    "row_remap_pending": False,
    "row_remap_failure": False,
    "throttle_reasons_mask": 0,
    "compute_processes": (),
}


def _device(**fields: Any) -> GpuDevice:
    base: dict[str, Any] = {
        "index": 0,
        "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
        **READ_OK,
    }
    base.update(fields)
    return GpuDevice(**base)


def _section(title: str) -> str:
    text = DOC.read_text("utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_doc_mirrors_health_table() -> None:
    rows = [r for r in _rows(_section("Health table")) if r[0].startswith("`")]
    assert [(r[0].strip("`"), r[1]) for r in rows] == [
        (rule.reason, rule.health.value) for rule in HEALTH_RULES
    ]
    for row, rule in zip(rows, HEALTH_RULES, strict=True):
        assert row[2].replace("`", "") == rule.condition


def test_doc_mirrors_critical_xids() -> None:
    section = _section("Critical XIDs")
    critical_part, _, not_critical_part = section.partition("Not critical")
    critical = {int(r[0]) for r in _rows(critical_part) if r[0].isdigit()}
    not_critical = {int(r[0]) for r in _rows(not_critical_part) if r[0].isdigit()}
    assert critical == set(CRITICAL_XIDS)
    assert not critical & not_critical
    for row in _rows(critical_part):
        if row[0].isdigit():
            assert row[1] == CRITICAL_XIDS[int(row[0])]


def test_doc_mirrors_allocation_reasons() -> None:
    rows = [r for r in _rows(_section("Allocation reasons")) if r[0].startswith("`")]
    assert [(r[0].strip("`"), r[1] == "yes") for r in rows] == list(ALLOCATION_REASONS.items())


def test_critical_xids() -> None:
    for code in (48, 62, 64, 74, 79, 92, 94, 95, 119, 120):
        assert is_critical_xid(code), code
    for code in (13, 31, 43, 45, 63, 0, 999):
        assert not is_critical_xid(code), code


def test_throttle_reason_names() -> None:
    assert throttle_reason_names(0) == ()
    assert throttle_reason_names(0x1) == ("gpu_idle",)
    assert throttle_reason_names(0x4 | 0x40) == ("sw_power_cap", "hw_thermal_slowdown")
    assert throttle_reason_names(0x1000) == ("bit_0x1000",)


def test_not_supported_alone_is_healthy() -> None:
    refused = {name: "not_supported" for name in READ_OK}
    device = GpuDevice(index=0, uuid="GPU-x", unknown=refused)
    assert health_verdict(device).health is Health.HEALTHY


@pytest.mark.parametrize("reason", ["timeout", "wedged", "error:NVMLError_Unknown"])
def test_all_health_fields_unanswered_is_unknown(reason: str) -> None:
    unknown = {name: reason for name in READ_OK}
    unknown["ecc_uncorrected_volatile"] = "not_supported"  # one refusal does not matter
    verdict = health_verdict(GpuDevice(index=0, unknown=unknown))
    assert (verdict.health, verdict.reasons) == (Health.UNKNOWN, ("health_unreadable",))


def test_one_health_field_read_is_enough() -> None:
    unknown = {
        "ecc_uncorrected_volatile": "timeout",
        "row_remap_pending": "timeout",
        "row_remap_failure": "timeout",
    }
    device = GpuDevice(index=0, throttle_reasons_mask=0x40, unknown=unknown)
    verdict = health_verdict(device)
    assert (verdict.health, verdict.reasons) == (Health.DEGRADED, ("throttle_hw_thermal",))


def _alloc(inventory: GpuInventory, **kwargs: Any) -> list[DeviceAllocation]:
    args: dict[str, Any] = {
        "quarantined": frozenset(),
        "leased": frozenset(),
        "own_pids": frozenset(),
        "advertised": {},
        "trust_advertised": False,
    }
    args.update(kwargs)
    return allocatable(inventory, **args)


def test_allocation_reasons_combine_in_order() -> None:
    uuid = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    device = _device(
        ecc_uncorrected_volatile=1,
        mig_mode_current=True,
        compute_processes=(ComputeProcess(99, 1),),
    )
    (entry,) = _alloc(
        GpuInventory(devices=(device,)), quarantined=frozenset({uuid}), leased=frozenset({uuid})
    )
    assert not entry.allocatable
    assert entry.reasons == (
        "gpu_unhealthy",
        "gpu_quarantined",
        "gpu_leased",
        "mig_enabled",
        "gpu_in_use_foreign",
    )
    (free,) = _alloc(GpuInventory(devices=(_device(),)))
    assert (free.allocatable, free.reasons, free.verified) == (True, (), True)


def test_unknown_health_is_not_allocatable() -> None:
    device = GpuDevice(
        index=0,
        uuid="GPU-a",
        compute_processes=(),
        unknown={name: "wedged" for name in READ_OK if name != "compute_processes"},
    )
    (entry,) = _alloc(GpuInventory(devices=(device,)))
    assert (entry.allocatable, entry.reasons) == (False, ("gpu_unknown_health",))


def test_advertised_is_never_capacity_untrusted() -> None:
    cpu_only = GpuInventory(backend="nvml", cpu_only_reason="nvml_library_not_found")
    assert _alloc(cpu_only, advertised={"model": "RTX 4090", "count": "2"}) == []


def test_advertised_trusted_without_verified_gpus() -> None:
    cpu_only = GpuInventory(backend="nvml", cpu_only_reason="nvml_library_not_found")
    entries = _alloc(
        cpu_only,
        advertised={"model": "RTX 4090", "count": "3"},
        trust_advertised=True,
        leased=frozenset({"advertised-1"}),
    )
    assert [(e.uuid, e.allocatable, e.reasons, e.verified, e.index) for e in entries] == [
        ("advertised-0", True, ("advertised_trusted",), False, None),
        ("advertised-1", False, ("gpu_leased", "advertised_trusted"), False, None),
        ("advertised-2", True, ("advertised_trusted",), False, None),
    ]
    assert all(str(e.uuid).startswith(ADVERTISED_UUID_PREFIX) for e in entries)
    assert not any(str(e.uuid).startswith("GPU-") for e in entries)


def test_advertised_never_adds_to_verified() -> None:
    inventory = GpuInventory(devices=(_device(),))
    entries = _alloc(inventory, advertised={"count": "8"}, trust_advertised=True)
    assert [e.uuid for e in entries] == [_device().uuid]
    assert entries[0].reasons == ()


@pytest.mark.parametrize("count", ["two", "-1", "1.5", "", "65", "٣"])
def test_bad_advertised_count(count: str) -> None:
    with pytest.raises(AdvertisedLabelError) as info:
        advertised_count({"count": count})
    assert "count" in str(info.value)
    assert info.value.exit_code == 4
    cpu_only = GpuInventory(cpu_only_reason="no_gpus")
    assert _alloc(cpu_only, advertised={"count": count}, trust_advertised=True) == []


def test_advertised_count_values() -> None:
    assert advertised_count({}) is None
    assert advertised_count({"count": " 2 "}) == 2
    assert advertised_count({"count": "0"}) == 0


def test_format_probe_shows_unknown() -> None:
    device = _device(
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=85520809984,
        memory_used_bytes=None,
        temperature_c=None,
        unknown={"memory_used_bytes": "timeout", "temperature_c": "timeout"},
    )
    text = format_probe(GpuInventory(devices=(device,), backend="nvml", wedged=True))
    row = text.splitlines()[2]
    assert re.search(r"unknown/81559 MiB", row)
    assert "unknown" in row.split("MiB")[1]
    assert "timeout (memory_used_bytes, temperature_c)" in text
    assert "wedged" in text
    cpu = format_probe(GpuInventory(backend="nvml", cpu_only_reason="nvml_library_not_found"))
    assert "CPU-only (nvml_library_not_found)" in cpu


def test_records_are_immutable() -> None:
    device = _device(unknown={"fan_speed_pct": "not_supported"})
    with pytest.raises(AttributeError):
        device.index = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        device.unknown["fan_speed_pct"] = "x"  # type: ignore[index]
    hash(device)
    hash(GpuInventory(devices=(device,)))


@pytest.mark.parametrize(
    ("reported", "reasons", "leased", "expected"),
    [
        # The report still says leased; the book already released it: free at once.
        (False, ("gpu_leased",), False, (True, ())),
        (False, ("gpu_leased", "gpu_degraded"), False, (True, ("gpu_degraded",))),
        # Just granted by the book, the report not yet: leased at once.
        (True, (), True, (False, ("gpu_leased",))),
        (True, ("advertised_trusted",), True, (False, ("gpu_leased", "advertised_trusted"))),
        # Other blocks stay whatever the book says.
        (False, ("gpu_unhealthy", "gpu_leased"), False, (False, ("gpu_unhealthy",))),
        (False, ("gpu_in_use_foreign",), False, (False, ("gpu_in_use_foreign",))),
        # Not allocatable for no reason the report names: it stays so.
        (False, (), False, (False, ())),
        # A reason this version does not know (a newer node's): the node's own verdict
        # stands, listed last; a lease it reported is freed only if nothing else blocks.
        (
            True,
            ("gpu_from_the_future", "gpu_degraded"),
            False,
            (True, ("gpu_degraded", "gpu_from_the_future")),
        ),
        (
            False,
            ("gpu_leased", "gpu_from_the_future"),
            False,
            (False, ("gpu_from_the_future",)),
        ),
    ],
)
def test_leased_by_book(
    reported: bool, reasons: tuple[str, ...], leased: bool, expected: tuple[bool, tuple[str, ...]]
) -> None:
    assert leased_by_book(reported, reasons, leased=leased) == expected
