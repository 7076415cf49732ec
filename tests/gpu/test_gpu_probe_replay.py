"""The probe's adapter against the fake NVML fed by real H100 captures and their variants."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from gpu import gpu_variants as v
from populi_peer.gpu import (
    GpuInventory,
    Health,
    health_verdict,
    open_probe,
    probe_json,
)
from populi_peer.gpu._probe import open_replay_probe
from populi_peer.testing import VirtualClock
from support.hints import allocations


async def probe_fixture(path: Path | str, clock: VirtualClock, **kwargs: Any) -> GpuInventory:
    async with open_probe(
        fixture=path, node_id=kwargs.pop("node_id", None), clock=clock, **kwargs
    ) as probe:
        return await probe.probe()


async def test_load_capture_acceptance(autojump_clock: MockClock, clock: VirtualClock) -> None:
    """What `populi probe --json` must say about the real H100 under load."""
    inventory = await probe_fixture(v.LOAD, clock)
    out = json.loads(json.dumps(probe_json(inventory)))
    assert out["cpu_only_reason"] is None
    (dev,) = out["devices"]
    assert dev["uuid"] == "GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae2d"
    assert dev["memory_total_bytes"] == 85520809984
    assert dev["utilization_gpu_pct"] == 99
    assert dev["health"] == "healthy"
    assert dev["health_reasons"] == []
    # Refused by the real card in its VM: unknown, with the reason, and not unhealthy.
    assert dev["fan_speed_pct"] is None
    assert dev["numa_node"] is None
    assert dev["nvlinks"] is None
    assert dev["unknown"] == {
        "fan_speed_pct": "not_supported",
        "numa_node": "not_supported",
        "nvlinks": "not_supported",
    }


async def test_idle_capture_fields(autojump_clock: MockClock, clock: VirtualClock) -> None:
    inventory = await probe_fixture(v.IDLE, clock)
    assert inventory.backend == "replay"
    assert inventory.source == v.IDLE
    assert inventory.driver_version == "580.159.04"
    assert inventory.nvml_version == "13.580.159.04"
    assert inventory.cuda_driver_version == 13000
    assert not inventory.wedged
    (d,) = inventory.devices
    assert d.index == 0
    assert d.name == "NVIDIA H100 80GB HBM3"
    assert d.pci_bus_id == "00000000:00:06.0"
    assert (d.memory_total_bytes, d.memory_used_bytes, d.memory_free_bytes) == (
        85520809984,
        503316480,
        85017493504,
    )
    # nvidia-smi's view of the same card: 81559 MiB total.
    assert d.memory_total_bytes is not None
    assert d.memory_total_bytes // 2**20 == 81559
    assert (d.utilization_gpu_pct, d.utilization_memory_pct) == (0, 0)
    assert d.temperature_c == 39
    assert (d.power_draw_mw, d.power_limit_mw) == (74080, 700000)
    assert d.compute_capability == (9, 0)
    assert (d.mig_mode_current, d.mig_mode_pending) == (False, False)
    assert (d.ecc_mode_current, d.ecc_mode_pending) == (True, True)
    assert (d.ecc_uncorrected_volatile, d.ecc_uncorrected_aggregate) == (0, 0)
    assert (d.row_remap_pending, d.row_remap_failure) == (False, False)
    assert d.throttle_reasons_mask == 1
    assert d.throttle_reasons == ("gpu_idle",)
    assert d.persistence_mode is True
    assert d.compute_processes == ()
    assert (d.pcie_link_gen, d.pcie_link_width) == (5, 16)
    assert d.lost is False
    assert health_verdict(d).health is Health.HEALTHY
    (alloc,) = allocations(inventory)
    assert alloc.allocatable
    assert alloc.uuid == v.LOAD_UUID


async def test_load_capture_unreadable_process_is_foreign(
    autojump_clock: MockClock, clock: VirtualClock
) -> None:
    """The real capture's process entry is an object repr: nobody can show it is ours."""
    inventory = await probe_fixture(v.LOAD, clock)
    (d,) = inventory.devices
    assert d.throttle_reasons == ("sw_power_cap",)  # normal at full load: not degraded
    assert d.compute_processes is not None
    assert len(d.compute_processes) == 1
    assert d.compute_processes[0].pid is None
    (alloc,) = allocations(inventory, own_pids=frozenset({432}))
    assert not alloc.allocatable
    assert alloc.reasons == ("gpu_in_use_foreign",)


VARIANTS = [
    ("ecc_uncorrected", v.ecc_uncorrected, Health.UNHEALTHY, ("ecc_uncorrected_volatile",)),
    ("row_remap_failure", v.row_remap_failure, Health.UNHEALTHY, ("row_remap_failure",)),
    ("row_remap_pending", v.row_remap_pending, Health.DEGRADED, ("row_remap_pending",)),
    ("hw_thermal", lambda: v.throttled(0x40), Health.DEGRADED, ("throttle_hw_thermal",)),
    ("sw_thermal", lambda: v.throttled(0x20), Health.DEGRADED, ("throttle_sw_thermal",)),
    ("hw_slowdown", lambda: v.throttled(0x8), Health.DEGRADED, ("throttle_hw_slowdown",)),
    (
        "power_brake",
        lambda: v.throttled(0x80 | 0x8),
        Health.DEGRADED,
        ("throttle_hw_slowdown", "throttle_hw_power_brake"),
    ),
    ("sw_power_cap", lambda: v.throttled(0x4), Health.HEALTHY, ()),
    ("reset_required", v.reset_required, Health.UNHEALTHY, ("gpu_reset_required",)),
    ("nothing_supported", v.nothing_supported, Health.HEALTHY, ()),
    ("mig_enabled", v.mig_enabled, Health.HEALTHY, ()),
    (
        "remap_failure_and_thermal",
        lambda: v.with_device(v.row_remap_failure(), clocks_throttle_reasons=0x40),
        Health.UNHEALTHY,
        ("row_remap_failure", "throttle_hw_thermal"),
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "health", "reasons"), VARIANTS, ids=[x[0] for x in VARIANTS]
)
async def test_variant_verdicts(
    autojump_clock: MockClock,
    tmp_path: Path,
    clock: VirtualClock,
    name: str,
    make: Callable[[], dict[str, Any]],
    health: Health,
    reasons: tuple[str, ...],
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, make()), clock)
    (d,) = inventory.devices
    verdict = health_verdict(d)
    assert verdict.health is health
    assert verdict.reasons == reasons


@pytest.mark.parametrize(
    ("variant", "usable", "reason"),
    [
        # MIG on: not allocatable whole.
        (v.mig_enabled, False, "mig_enabled"),
        # Degraded stays allocatable.
        (v.row_remap_pending, True, "gpu_degraded"),
        (v.ecc_uncorrected, False, "gpu_unhealthy"),
    ],
    ids=["mig-enabled", "degraded", "unhealthy"],
)
async def test_a_variant_is_allocatable_or_not_with_its_reason(
    variant: Callable[[], dict[str, Any]],
    usable: bool,
    reason: str,
    autojump_clock: MockClock,
    tmp_path: Path,
    clock: VirtualClock,
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, variant()), clock)
    (alloc,) = allocations(inventory)
    assert alloc.allocatable is usable
    assert alloc.reasons == (reason,)


async def test_foreign_and_own_processes(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, v.busy(4242)), clock)
    (d,) = inventory.devices
    assert d.compute_processes is not None
    assert [(p.pid, p.used_memory_bytes) for p in d.compute_processes] == [(4242, 21610 * 2**20)]
    (foreign,) = allocations(inventory, own_pids=frozenset({1, 2}))
    assert (foreign.allocatable, foreign.reasons) == (False, ("gpu_in_use_foreign",))
    (ours,) = allocations(inventory, own_pids=frozenset({4242}))
    assert (ours.allocatable, ours.reasons) == (True, ())
    (ours_leased,) = allocations(
        inventory, own_pids=frozenset({4242}), leased=frozenset({v.LOAD_UUID})
    )
    assert (ours_leased.allocatable, ours_leased.reasons) == (False, ("gpu_leased",))


async def test_processes_not_supported_vs_unreadable(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, v.nothing_supported()), clock)
    (alloc,) = allocations(inventory)
    assert (alloc.allocatable, alloc.reasons) == (True, ("gpu_processes_not_supported",))
    error = {"error": "NVMLError_NoPermission", "code": 4}
    inventory = await probe_fixture(
        v.write(tmp_path, v.with_device(compute_processes=error), "noperm.json"), clock
    )
    (d,) = inventory.devices
    assert d.unknown["compute_processes"] == "error:NVMLError_NoPermission"
    (alloc,) = allocations(inventory)
    assert (alloc.allocatable, alloc.reasons) == (False, ("gpu_processes_unknown",))


async def test_eight_gpu_host(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, v.eight_gpus()), clock)
    assert [d.index for d in inventory.devices] == list(range(8))
    assert len({d.uuid for d in inventory.devices}) == 8
    assert len({d.pci_bus_id for d in inventory.devices}) == 8
    assert all(health_verdict(d).health is Health.HEALTHY for d in inventory.devices)
    assert all(a.allocatable for a in allocations(inventory))


async def test_lost_gpu_from_the_start(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence({"at_s": 0, "capture": v.eight_gpus()}, {"at_s": 0, "lost": [3]})
    inventory = await probe_fixture(v.write(tmp_path, seq), clock)
    lost = inventory.devices[3]
    assert lost.lost
    assert lost.uuid is None  # never read before it was lost
    assert set(lost.unknown.values()) == {"gpu_lost"}
    verdict = health_verdict(lost)
    assert (verdict.health, verdict.reasons) == (Health.UNHEALTHY, ("gpu_lost",))
    others = [d for d in inventory.devices if d.index != 3]
    assert all(health_verdict(d).health is Health.HEALTHY for d in others)
    blocked = allocations(inventory)[3]
    assert blocked.reasons == ("gpu_uuid_unknown", "gpu_unhealthy", "gpu_processes_unknown")


async def test_no_driver_is_cpu_only(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    inventory = await probe_fixture(v.write(tmp_path, v.no_driver()), clock)
    assert inventory.cpu_only
    assert inventory.cpu_only_reason == "nvml_driver_not_loaded"
    assert inventory.devices == ()
    assert allocations(inventory) == []


async def test_zero_devices_is_cpu_only(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    data = v.capture()
    data["devices"] = []
    data["device_count"] = 0
    inventory = await probe_fixture(v.write(tmp_path, data), clock)
    assert inventory.cpu_only_reason == "no_gpus"
    assert inventory.driver_version == "580.159.04"


async def test_unreadable_values_are_unknown(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    """A hand-edited fixture with nonsense values yields unknown fields, not a crash."""
    data = v.with_device(memory="lots", temperature_gpu=True, cuda_cc=[9], remapped_rows=7)
    del v.device0(data)["fan_speed"]
    inventory = await probe_fixture(v.write(tmp_path, data), clock)
    (d,) = inventory.devices
    assert d.memory_total_bytes is None
    assert d.unknown["memory_total_bytes"] == "unreadable"
    assert d.unknown["temperature_c"] == "unreadable"
    assert d.unknown["compute_capability"] == "unreadable"
    assert d.unknown["row_remap_pending"] == "unreadable"
    assert d.unknown["fan_speed_pct"] == "error:NVMLError_FunctionNotFound"
    assert d.name == "NVIDIA H100 80GB HBM3"


async def test_nvlinks_and_peers(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    """Two GPUs linked to each other by NVLink (the H100 PCIe in the capture has none)."""
    data = v.eight_gpus()
    data["devices"] = data["devices"][:2]
    data["device_count"] = 2
    buses = [d["pci"]["busId"] for d in data["devices"]]
    for i, dev in enumerate(data["devices"]):
        peer = buses[1 - i]
        dev["nvlink"] = [
            {"link": 0, "state": 1, "remote_pci": {"busId": peer}},
            {"link": 1, "state": 0},
            {"link": 2, "state": {"error": "NVMLError_InvalidArgument", "code": 2}},
        ]
    inventory = await probe_fixture(v.write(tmp_path, data), clock)
    for i, d in enumerate(inventory.devices):
        assert "nvlinks" not in d.unknown
        assert d.nvlinks is not None
        assert [(x.link, x.active, x.remote_pci_bus_id, x.peer_index) for x in d.nvlinks] == [
            (0, True, buses[1 - i], 1 - i),
            (1, False, None, None),
        ]


def uuids(inventory: GpuInventory) -> list[str | None]:
    return [d.uuid for d in inventory.devices]


async def test_derived_uuids(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    path = v.write(tmp_path, v.eight_gpus())
    a = await probe_fixture(path, clock, node_id="node-a")
    a_again = await probe_fixture(path, clock, node_id="node-a")
    b = await probe_fixture(path, clock, node_id="node-b")
    kept = await probe_fixture(path, clock, node_id="node-a", keep_fixture_uuids=True)
    plain = await probe_fixture(path, clock)
    assert uuids(a) == uuids(a_again)
    assert not set(uuids(a)) & set(uuids(b))
    assert uuids(kept) == uuids(plain) == [d["uuid"] for d in v.eight_gpus()["devices"]]
    assert not set(uuids(a)) & set(uuids(plain))


async def test_threaded_replay_reads_the_same(
    thread_autojump_clock: MockClock, tmp_path: Path
) -> None:
    """The worker-thread caller (the one NVML uses) reads what the in-loop one reads."""
    clock = VirtualClock()
    path = v.write(tmp_path, v.eight_gpus(v.capture(v.LOAD)))
    async with open_replay_probe(path, node_id=None, clock=clock, threaded=True) as probe:
        threaded = await probe.probe()
    inline = await probe_fixture(path, clock)
    assert threaded.devices == inline.devices
    assert trio.current_time() == 0
