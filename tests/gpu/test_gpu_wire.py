"""The JSON form of inventories, the heartbeat summary, and derived replay UUIDs."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from gpu import gpu_variants as v
from populi_peer.gpu import (
    ComputeProcess,
    DeviceAllocation,
    GpuDevice,
    GpuInventory,
    Health,
    HealthVerdict,
    InventoryFormatError,
    NvLink,
    XidEvent,
    derive_replay_uuid,
    facts_version,
    gpu_summary,
    open_probe,
    probe_json,
    summary_metrics,
    summary_static,
)
from populi_peer.testing import VirtualClock
from support.fuzz import json_paths, json_trees
from support.hints import allocations


async def _probe(path: Path | str, clock: VirtualClock, node_id: str | None = None) -> GpuInventory:
    async with open_probe(fixture=path, node_id=node_id, clock=clock) as probe:
        return await probe.probe()


async def _inventories(tmp_path: Path, clock: VirtualClock) -> list[GpuInventory]:
    lost = v.sequence({"at_s": 0, "capture": v.eight_gpus()}, {"at_s": 0, "lost": [5]})
    out = [
        await _probe(v.IDLE, clock),
        await _probe(v.LOAD, clock),
        await _probe(v.write(tmp_path, v.eight_gpus(), "eight.json"), clock),
        await _probe(v.write(tmp_path, lost, "lost.json"), clock),
        await _probe(v.write(tmp_path, v.no_driver(), "nodriver.json"), clock),
        await _probe(v.write(tmp_path, v.busy(7, 8), "busy.json"), clock),
    ]
    linked = GpuDevice(
        index=0,
        uuid="GPU-00000000-0000-0000-0000-000000000000",
        nvlinks=(NvLink(0, True, "00000000:00:07.0", 1), NvLink(1, False)),
        compute_processes=(ComputeProcess(1, None), ComputeProcess(None, 5)),
    )
    out.append(
        GpuInventory(
            devices=(linked,), backend="nvml", wedged=True, unknown={"driver_version": "timeout"}
        )
    )
    return out


async def test_round_trip(autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock) -> None:
    for inventory in await _inventories(tmp_path, clock):
        wire = json.loads(json.dumps(inventory.to_json()))
        assert GpuInventory.from_json(wire) == inventory


async def test_probe_json_parses_as_inventory(
    autojump_clock: MockClock, clock: VirtualClock
) -> None:
    inventory = await _probe(v.LOAD, clock)
    assert GpuInventory.from_json(json.loads(json.dumps(probe_json(inventory)))) == inventory


async def test_old_payload_without_optional_fields(
    autojump_clock: MockClock, clock: VirtualClock
) -> None:
    """A sender that predates fields: what it lacks reads as None / defaults."""
    wire = (await _probe(v.LOAD, clock)).to_json()
    for key in ("source", "nvml_version", "wedged", "probed_at_ms", "unknown", "v"):
        del wire[key]
    device = wire["devices"][0]
    for key in (
        "nvlinks",
        "numa_node",
        "fan_speed_pct",
        "row_remap_pending",
        "row_remap_failure",
        "lost",
        "unknown",
        "throttle_reasons",
        "compute_processes",
    ):
        del device[key]
    parsed = GpuInventory.from_json(wire)
    assert parsed.nvml_version is None
    assert parsed.wedged is False
    (d,) = parsed.devices
    assert d.uuid == v.LOAD_UUID
    assert d.memory_total_bytes == 85520809984
    assert d.row_remap_pending is None
    assert d.compute_processes is None
    assert d.lost is False
    assert dict(d.unknown) == {}
    # The smallest payload there is.
    assert GpuInventory.from_json({}) == GpuInventory()
    assert GpuInventory.from_json({"devices": [{"index": 3}]}).devices == (GpuDevice(index=3),)


async def test_new_payload_with_unknown_fields(
    autojump_clock: MockClock, clock: VirtualClock
) -> None:
    """A newer sender's extra fields are ignored, at every level."""
    inventory = await _probe(v.LOAD, clock)
    wire = copy.deepcopy(inventory.to_json())
    wire["v"] = 9
    wire["mig_instances"] = [{"id": 1}]
    wire["devices"][0]["gpm_metrics"] = {"sm_occupancy_pct": 40}
    wire["devices"][0]["compute_processes"][0]["container"] = "abc"
    parsed = GpuInventory.from_json(wire)
    assert parsed == inventory


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda w: w.update(devices={}), "devices"),
        (
            lambda w: w["devices"][0].update(memory_total_bytes="85 GB"),
            "devices[0].memory_total_bytes",
        ),
        (lambda w: w["devices"][0].update(ecc_mode_current=1), "devices[0].ecc_mode_current"),
        (lambda w: w["devices"][0].update(index=True), "devices[0].index"),
        (lambda w: w["devices"][0].update(compute_capability=[9]), "devices[0].compute_capability"),
        (
            lambda w: w["devices"][0].update(compute_processes=[{"pid": "x"}]),
            "devices[0].compute_processes[0].pid",
        ),
        (lambda w: w["devices"][0].update(unknown={"fan_speed_pct": 3}), "devices[0].unknown"),
        (lambda w: w.update(wedged="no"), "wedged"),
    ],
)
async def test_wrong_types_name_the_field(
    autojump_clock: MockClock,
    clock: VirtualClock,
    mutate: Callable[[dict[str, Any]], None],
    field: str,
) -> None:
    wire = (await _probe(v.LOAD, clock)).to_json()
    mutate(wire)
    with pytest.raises(InventoryFormatError) as info:
        GpuInventory.from_json(wire)
    assert str(info.value).startswith(field) or f"{field}:" in str(info.value)
    assert info.value.code == "bad_gpu_inventory"
    assert info.value.http_status == 400


json_values = json_trees(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    width=4,
    key_size=8,
    max_leaves=20,
)


RICH = GpuInventory(
    devices=(
        GpuDevice(
            index=0,
            uuid="GPU-00000000-0000-0000-0000-000000000000",
            name="x",
            memory_total_bytes=1,
            compute_capability=(9, 0),
            ecc_mode_current=True,
            compute_processes=(ComputeProcess(1, 2), ComputeProcess(None, None)),
            nvlinks=(NvLink(0, True, "00000000:00:07.0", 1), NvLink(1, False)),
            unknown={"fan_speed_pct": "not_supported"},
        ),
        GpuDevice(index=1, lost=True, unknown={"uuid": "gpu_lost"}),
    ),
    backend="nvml",
    driver_version="580",
    cuda_driver_version=13000,
    probed_at_ms=5,
    unknown={"nvml_version": "timeout"},
).to_json()


DELETE = object()
mutations = st.lists(
    st.tuples(st.sampled_from(json_paths(RICH)), st.just(DELETE) | json_values),
    min_size=1,
    max_size=3,
)


def _mutate(payload: dict[str, Any], changes: list[tuple[tuple[Any, ...], Any]]) -> Any:
    data = copy.deepcopy(payload)
    for path, new in changes:
        parent: Any = data
        try:
            for step in path[:-1]:
                parent = parent[step]
            if new is DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = new
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced this path
    return data


def _parses_or_refuses(data: Any) -> None:
    try:
        inventory = GpuInventory.from_json(data)
    except InventoryFormatError:
        return
    event("parsed")
    # Whatever parsed must write back out and parse to the same thing.
    assert GpuInventory.from_json(json.loads(json.dumps(inventory.to_json()))) == inventory


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_from_json_on_anything(data: Any) -> None:
    _parses_or_refuses(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_from_json_on_damaged_payloads(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    """Each field of a full payload deleted or replaced by anything: parsed, or refused."""
    _parses_or_refuses(_mutate(RICH, changes))


async def test_summary_static_and_metrics(autojump_clock: MockClock, clock: VirtualClock) -> None:
    idle = await _probe(v.IDLE, clock)
    load = await _probe(v.LOAD, clock)
    # Static facts are the same card idle and under load: one facts_version.
    assert facts_version(idle) == facts_version(load)
    full = gpu_summary(load, allocations(load))
    assert set(full) == {"v", "facts_version", "static", "metrics"}
    assert full["static"] == {
        "backend": "replay",
        "driver_version": "580.159.04",
        "cuda_driver_version": 13000,
        "devices": [
            {
                "index": 0,
                "uuid": v.LOAD_UUID,
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 85520809984,
                "compute_capability": "9.0",
                "mig_mode": False,
                "ecc_mode": True,
            }
        ],
    }
    assert full["metrics"] == {
        "devices": [
            {
                "index": 0,
                "memory_used_bytes": 23172284416,
                "memory_free_bytes": 62348525568,
                "utilization_gpu_pct": 99,
                "temperature_c": 61,
                "power_draw_mw": 698494,
                "health": "healthy",
                "allocatable": False,
                "allocation_reasons": ["gpu_in_use_foreign"],
            }
        ],
    }
    short = gpu_summary(load, allocations(load), include_static=False)
    assert set(short) == {"v", "facts_version", "metrics"}
    assert short["metrics"] == summary_metrics(load, allocations(load))
    # Static facts change: a new version.
    labelled = facts_version(load, advertised={"model": "H100"})
    assert labelled != facts_version(load)
    assert summary_static(load, advertised={"model": "H100"})["advertised"] == {"model": "H100"}


async def test_summary_changes_version_with_static_facts(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    base = await _probe(v.IDLE, clock)
    mig = await _probe(v.write(tmp_path, v.mig_enabled()), clock)
    other_node = await _probe(v.IDLE, clock, node_id="node-b")
    assert len({facts_version(base), facts_version(mig), facts_version(other_node)}) == 3


async def test_summary_omits_unknown_and_carries_pseudo_devices(clock: VirtualClock) -> None:
    inventory = GpuInventory(backend="nvml", cpu_only_reason="nvml_library_not_found")
    allocs = allocations(inventory, advertised={"count": "2"}, trust_advertised=True)
    summary = gpu_summary(inventory, allocs, advertised={"count": "2"})
    assert summary["static"] == {
        "backend": "nvml",
        "cpu_only_reason": "nvml_library_not_found",
        "devices": [],
        "advertised": {"count": "2"},
    }
    assert summary["metrics"]["advertised_devices"] == [
        {"uuid": "advertised-0", "allocatable": True, "reasons": ["advertised_trusted"]},
        {"uuid": "advertised-1", "allocatable": True, "reasons": ["advertised_trusted"]},
    ]
    wedged = GpuInventory(
        devices=(GpuDevice(index=0, unknown={"memory_used_bytes": "timeout"}),), wedged=True
    )
    metrics = summary_metrics(wedged, [])
    assert metrics["wedged"] is True
    assert metrics["devices"] == [{"index": 0, "health": "healthy"}]


def test_derive_replay_uuid() -> None:
    a = derive_replay_uuid(v.LOAD_UUID, "node-a")
    b = derive_replay_uuid(v.LOAD_UUID, "node-b")
    assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", a)
    assert a != b
    assert a == derive_replay_uuid(v.LOAD_UUID, "node-a")
    assert a != v.LOAD_UUID
    # Pinned: the derivation is part of the replay format (docs/gpu-health.md):
    # sha256(b"populi replay gpu uuid v1\0" + capture_uuid + b"\0" + node_id)[:128 bits].
    assert a == "GPU-f1e7c5a4-0036-6787-cb54-341f544e4fa2"
    assert derive_replay_uuid("GPU-x", "n") != derive_replay_uuid("GPU-", "xn")


def test_inventory_keys_keep_their_order_and_nulls() -> None:
    """The inventory's own keys: ``v``, its facts in order, then ``unknown`` and the
    devices (what ``populi gpus --json`` and the heartbeat show)."""
    full = GpuInventory(
        devices=(GpuDevice(index=0),),
        backend="nvml",
        source="capture.json",
        driver_version="580",
        nvml_version="12.580",
        cuda_driver_version=13000,
        cpu_only_reason="no_gpus",
        wedged=True,
        probed_at_ms=5,
        unknown={"x": "timeout"},
    ).to_json()
    assert [(key, value) for key, value in full.items() if key != "devices"] == [
        ("v", 1),
        ("backend", "nvml"),
        ("source", "capture.json"),
        ("driver_version", "580"),
        ("nvml_version", "12.580"),
        ("cuda_driver_version", 13000),
        ("cpu_only_reason", "no_gpus"),
        ("wedged", True),
        ("probed_at_ms", 5),
        ("unknown", {"x": "timeout"}),
    ]
    assert list(full)[-1] == "devices"
    assert full["devices"] == [GpuDevice(index=0).to_json()]
    assert list(GpuInventory().to_json().items()) == [
        ("v", 1),
        ("backend", "unknown"),
        ("source", None),
        ("driver_version", None),
        ("nvml_version", None),
        ("cuda_driver_version", None),
        ("cpu_only_reason", None),
        ("wedged", False),
        ("probed_at_ms", None),
        ("unknown", {}),
        ("devices", []),
    ]
    assert type(GpuInventory().to_json()["unknown"]) is dict


def test_small_gpu_records_write_every_field_in_order_nulls_included() -> None:
    assert list(ComputeProcess(7, 1024).to_json().items()) == [
        ("pid", 7),
        ("used_memory_bytes", 1024),
    ]
    assert ComputeProcess(None).to_json() == {"pid": None, "used_memory_bytes": None}
    assert list(NvLink(0, True, "00000000:00:07.0", 1).to_json().items()) == [
        ("link", 0),
        ("active", True),
        ("remote_pci_bus_id", "00000000:00:07.0"),
        ("peer_index", 1),
    ]
    assert NvLink(1, False).to_json() == {
        "link": 1,
        "active": False,
        "remote_pci_bus_id": None,
        "peer_index": None,
    }
    verdict = HealthVerdict(0, "GPU-a", Health.DEGRADED, ("hw_slowdown",)).to_json()
    assert list(verdict.items()) == [
        ("index", 0),
        ("uuid", "GPU-a"),
        ("health", "degraded"),
        ("reasons", ["hw_slowdown"]),
    ]
    assert type(verdict["health"]) is str
    assert HealthVerdict(1, None, Health.HEALTHY).to_json() == {
        "index": 1,
        "uuid": None,
        "health": "healthy",
        "reasons": [],
    }
    assert list(XidEvent("GPU-a", 0, 79, True, 12.5).to_json().items()) == [
        ("uuid", "GPU-a"),
        ("index", 0),
        ("code", 79),
        ("critical", True),
        ("at_wall", 12.5),
    ]
    assert XidEvent(None, None, 13, False, 1.0).to_json() == {
        "uuid": None,
        "index": None,
        "code": 13,
        "critical": False,
        "at_wall": 1.0,
    }
    assert list(DeviceAllocation("GPU-a", 0, False, ("leased",)).to_json().items()) == [
        ("uuid", "GPU-a"),
        ("index", 0),
        ("allocatable", False),
        ("reasons", ["leased"]),
        ("verified", True),
    ]
    assert DeviceAllocation(None, None, True, verified=False).to_json() == {
        "uuid": None,
        "index": None,
        "allocatable": True,
        "reasons": [],
        "verified": False,
    }
