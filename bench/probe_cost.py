"""GPU probe cost: ms per refresh on the replay backend (median and p99 over many
refreshes), and the heartbeat summary's size in bytes, for 1 and 8 GPUs. Prints figures;
never passes or fails on them.

    python bench/probe_cost.py [--refreshes 2000]
    python bench/probe_cost.py --nvml [--refreshes 200]    # this host's GPUs, real NVML

Two replay modes are measured: in-loop (what ``open_probe(fixture=...)`` uses) and
threaded (every call through the worker-thread caller that real NVML uses, so the figure
is the adapter's own overhead per refresh; a real driver adds its per-call latency).
The 8-GPU host is the real H100 capture repeated with distinct UUIDs. ``--nvml`` measures
the same refresh against this host's driver instead (a CPU-only host prints one line).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import trio

from populi_peer.clock import SystemClock
from populi_peer.gpu import allocatable, gpu_summary
from populi_peer.gpu._probe import open_probe, open_replay_probe

CAPTURE = "h100-80gb-hbm3-load.json"


def _capture(gpus: int) -> dict[str, Any]:
    text = resources.files("populi_peer.gpu").joinpath("captures", CAPTURE).read_text()
    data: dict[str, Any] = json.loads(text)
    template = data["devices"][0]
    devices = []
    for i in range(gpus):
        dev = copy.deepcopy(template)
        dev["index"] = i
        dev["uuid"] = f"{template['uuid'][:-2]}{i:02x}"
        dev["pci"]["busId"] = f"00000000:00:{6 + i:02X}.0"
        devices.append(dev)
    data["devices"] = devices
    data["device_count"] = gpus
    return data


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _timed_refreshes(probe: Any, refreshes: int) -> tuple[list[float], Any]:
    """``refreshes`` refreshes of an opened probe: each one's ms, and the last inventory."""
    samples = []
    inventory = None
    for _ in range(refreshes):
        start = time.perf_counter()
        inventory = await probe.probe()
        samples.append((time.perf_counter() - start) * 1000)
    return samples, inventory


async def _measure(path: Path, refreshes: int, threaded: bool) -> tuple[list[float], Any, int]:
    async with open_replay_probe(
        path, node_id="bench-node", clock=SystemClock(), threaded=threaded
    ) as probe:
        await probe.probe()  # first refresh reads and caches static facts
        calls_before = probe._nvml.calls
        samples, inventory = await _timed_refreshes(probe, refreshes)
        calls = (probe._nvml.calls - calls_before) // refreshes
    return samples, inventory, calls


async def _measure_nvml(refreshes: int) -> tuple[list[float], Any, float]:
    async with open_probe(fixture=None, node_id=None, clock=SystemClock()) as probe:
        (first_ms,), _ = await _timed_refreshes(probe, 1)  # nvmlInit and the static facts
        samples, inventory = await _timed_refreshes(probe, refreshes)
    return samples, inventory, first_ms


def _sizes(inventory: Any) -> tuple[int, int]:
    allocs = allocatable(
        inventory,
        quarantined=frozenset(),
        leased=frozenset(),
        own_pids=frozenset(),
        advertised={},
        trust_advertised=False,
    )
    compact = (",", ":")
    full = len(json.dumps(gpu_summary(inventory, allocs), separators=compact))
    short = len(
        json.dumps(gpu_summary(inventory, allocs, include_static=False), separators=compact)
    )
    return full, short


def _nvml_main(refreshes: int) -> int:
    samples, inventory, first_ms = trio.run(_measure_nvml, refreshes)
    if not inventory.devices:
        print(f"nvml: no GPU here ({inventory.cpu_only_reason}); nothing to measure")
        return 0
    full, short = _sizes(inventory)
    names = sorted({d.name for d in inventory.devices})
    print(
        f"nvml: {len(inventory.devices)} GPU(s) {', '.join(names)}, driver "
        f"{inventory.driver_version}, {refreshes} refreshes"
    )
    print(f"first refresh (nvmlInit + static facts): {first_ms:.1f} ms")
    print(
        f"refresh median {statistics.median(samples):.3f} ms, p99 {_pct(samples, 0.99):.3f} ms, "
        f"max {max(samples):.3f} ms; summary static+metrics {full} B, metrics {short} B"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refreshes", type=int, default=2000)
    parser.add_argument("--nvml", action="store_true", help="measure this host's GPUs (NVML)")
    args = parser.parse_args()
    if args.refreshes < 1:
        parser.error("--refreshes must be at least 1")
    if args.nvml:
        return _nvml_main(args.refreshes)
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {args.refreshes} refreshes")
    print(
        f"{'gpus':>4}  {'mode':<9} {'calls/refresh':>13}  {'median ms':>9}  {'p99 ms':>7}  "
        f"{'static+metrics B':>16}  {'metrics B':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for gpus in (1, 8):
            path = Path(tmp) / f"{gpus}.json"
            path.write_text(json.dumps(_capture(gpus)))
            for threaded in (False, True):
                refreshes = args.refreshes if not threaded else max(1, args.refreshes // 4)
                samples, inventory, calls = trio.run(_measure, path, refreshes, threaded)
                full, short = _sizes(inventory)
                mode = "threaded" if threaded else "in-loop"
                print(
                    f"{gpus:>4}  {mode:<9} {calls:>13}  {statistics.median(samples):>9.3f}  "
                    f"{_pct(samples, 0.99):>7.3f}  {full:>16}  {short:>9}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
