"""Hint gossip end to end: real agents on loopback (real TLS, real SQLite), two replaying
an H100. With the control plane stopped, a hint signed after it stopped still reaches
every node, and ``populi gpus`` on any node shows the cluster's GPUs from its hints,
marked as hints, with their age."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from support.mesh import Mesh
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

LIVE = ("g1", "g2", "c1")
GUARD_S = 90.0


def hints(mesh: Mesh, name: str) -> dict[str, dict[str, Any]]:
    """The hints node ``name`` holds, by node name (``populi gpus --hints --json``)."""
    answer = json.loads(mesh.cli(name, "gpus", "--hints", "--json").stdout)
    assert answer["source"] == "hints"
    return {node["name"]: node for node in answer["nodes"]}


def test_hints_reach_every_node_with_the_control_plane_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("POPULI_GPU_FIXTURE", "POPULI_GPU__FIXTURE", "POPULI_CONFIG", "POPULI_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    mesh = Mesh.create(tmp_path, gpu_nodes=["g1", "g2"], cpu_nodes=["c1"], remote=False)
    try:
        everyone = {"cp", *LIVE}
        _, took = wait_for(
            "every node holds every node's hint",
            lambda: all(set(hints(mesh, n)) == everyone for n in ("cp", *LIVE)),
            guard_s=GUARD_S,
            every_s=0.5,
        )
        print(f"every hint on every node {took:.2f} s after the mesh was up")
        mesh.stop("cp")
        stopped = time.time()
        # g1 re-signs its hint at least every gossip.republish_max_s (10 s): that record is
        # born after the control plane stopped, and must reach every live node.
        _, took = wait_for(
            "a hint of g1 signed after the control plane stopped, on every live node",
            lambda: all(
                (h := hints(mesh, n).get("g1")) is not None
                and int(h["version"].split(".")[0]) > stopped * 1000
                for n in LIVE
            ),
            guard_s=GUARD_S,
            every_s=0.5,
        )
        print(f"g1's new hint on every live node {took:.2f} s after the control plane stopped")
        # `populi gpus` on c1 (no GPU of its own) falls back to its hints, and says so.
        table = mesh.cli("c1", "gpus").stdout
        assert table.startswith("source: hints held by this node (control plane unreachable")
        assert "HINT AGE" in table and "H100" in table
        listing = json.loads(mesh.cli("c1", "gpus", "--json").stdout)
        assert listing["source"] == "hints"
        assert "control plane unreachable" in listing["why_hints"]
        by_name = {node["name"]: node for node in listing["nodes"]}
        for gpu_node in ("g1", "g2"):
            (device,) = by_name[gpu_node]["devices"]
            assert "H100" in device["name"] and device["verified"]
            assert by_name[gpu_node]["age_s"] >= 0
    finally:
        mesh.close()
