"""GPU truth end to end: three real agents on loopback (real TLS, real SQLite), two of
them replaying a real H100 capture through ``POPULI_GPU_FIXTURE`` (``support.mesh``: the
mesh is up once the control plane sees both GPUs allocatable)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from populi_peer.gpu import derive_replay_uuid
from support.mesh import Mesh
from support.nvml import nvml_present
from support.procs import one_line

pytestmark = pytest.mark.e2e

IDLE = "h100-80gb-hbm3-idle.json"
CAPTURE_UUID = "GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae2d"


def _gpus(mesh: Mesh) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in mesh.gpus_view()}


def test_gpus_of_two_replaying_nodes_reach_the_control_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("POPULI_GPU_FIXTURE", "POPULI_GPU__FIXTURE", "POPULI_CONFIG", "POPULI_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    mesh = Mesh.create(tmp_path, gpu_nodes=["w1", "w2"], remote=False)
    print(
        f"both replaying nodes' GPUs on the control plane after {time.monotonic() - started:.2f} s"
    )
    try:
        scenario(mesh)
    finally:
        mesh.close()


def scenario(mesh: Mesh) -> None:
    # The mesh is up once the control plane sees both replayed GPUs, allocatable.
    view = _gpus(mesh)
    (d1,) = view["w1"]["devices"]
    (d2,) = view["w2"]["devices"]
    assert d1["uuid"] != d2["uuid"]
    assert d1["uuid"] == derive_replay_uuid(CAPTURE_UUID, mesh["w1"].node_id)
    assert d2["uuid"] == derive_replay_uuid(CAPTURE_UUID, mesh["w2"].node_id)
    for device in (d1, d2):
        assert device["name"] == "NVIDIA H100 80GB HBM3"
        assert device["memory_total_bytes"] == 85520809984
        assert device["health"] == "healthy"
        assert device["allocatable"] is True
    assert view["w1"]["backend"] == "replay"
    # The control plane has no fixture: this machine's own NVML answers for it.
    assert view["cp"]["backend"] == "nvml"
    if not nvml_present():
        assert view["cp"]["devices"] == [] and view["cp"]["cpu_only_reason"]

    # The table form names both GPUs too.
    table = mesh.cli("cp", "gpus").stdout
    assert d1["uuid"] in table and d2["uuid"] in table

    # Resuming a GPU that is not quarantined is refused, in one line.
    refused = mesh.cli("cp", "gpu", "resume", "w1", d1["uuid"], check=False)
    assert refused.returncode == 4, refused.stderr
    assert one_line(refused.stderr) and refused.stdout == ""
    assert "not quarantined" in refused.stderr
    after = _gpus(mesh)
    (still,) = after["w1"]["devices"]
    assert still["quarantined"] is False and still["allocatable"] is True
    for node in mesh.nodes.values():
        assert node.alive()
        assert "Traceback" not in node.log()
