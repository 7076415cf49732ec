"""The GPU columns ``populi gpus`` prints, from the control plane or from hints: one
device's cells, and the row of a node without GPUs, as wide as the headers."""

from __future__ import annotations

from populi_peer.cli.cmd_gpu import _GPU_HEADERS, _gpu_cells, _no_gpu_cells
from populi_peer.core.messages import GpuDevice


def _device(**fields: object) -> GpuDevice:
    base: dict[str, object] = {
        "index": 0,
        "uuid": "GPU-0",
        "name": "H100",
        "memory_total_bytes": 80 * 2**30,
        "memory_free_bytes": 12 * 2**30,
        "utilization_gpu_pct": None,
        "health": "healthy",
        "health_reasons": (),
        "allocatable": True,
        "allocation_reasons": (),
        "quarantined": False,
        "quarantine_reason": None,
        "verified": True,
    }
    return GpuDevice(**{**base, **fields})  # type: ignore[arg-type]


def test_a_gpu_shows_memory_in_gib_and_every_reason() -> None:
    assert _gpu_cells(_device()) == (0, "GPU-0", "H100", "12.0/80.0", "healthy", "yes", "-")
    sick = _device(
        memory_free_bytes=None,
        health="unhealthy",
        health_reasons=("xid_critical",),
        allocatable=False,
        allocation_reasons=("quarantined",),
    )
    assert _gpu_cells(sick)[3:] == ("-/80.0", "unhealthy", "no", "xid_critical,quarantined")


def test_a_node_without_gpus_fills_every_gpu_column_and_says_why() -> None:
    cells = _no_gpu_cells("no report yet")
    assert len(cells) == len(_GPU_HEADERS) == len(_gpu_cells(_device()))
    assert cells == ("-", "-", "-", "-", "-", "-", "no report yet")
