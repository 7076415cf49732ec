"""Settings reach every node at once, with real agents on loopback (replayed H100s).

Heartbeats here are slow (every 6 s), so a node that waited for its next heartbeat answer
to learn a new settings record would still hold the old one when the next command runs:
right after ``settings set remote_exec_enabled true`` returns, ``populi run --gpus 1`` on
``w1`` must run on ``w2``; right after ``settings set kill_switch true`` returns, no new
remote attempt starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from e2e.exec_support import Mesh, wait_for

pytestmark = pytest.mark.e2e

SLOW_HEARTBEATS = "[timings.local]\nheartbeat_interval_s = 6.0\nstale_after_s = 60.0\n"
WHERE = [
    "--",
    sys.executable,
    "-c",
    "import os; print(os.getcwd().split('/tasks/')[0].rsplit('/', 1)[-1])",
]


def slow_heartbeat_mesh(root: Path, gpu_nodes: list[str]) -> Mesh:
    """A mesh whose every node (``cp`` too) reads ``SLOW_HEARTBEATS``."""
    config = root / "slow-heartbeats.toml"
    root.mkdir(parents=True)
    config.write_text(SLOW_HEARTBEATS)
    env = {"POPULI_CONFIG": str(config)}
    return Mesh.create(
        root / "mesh", gpu_nodes, remote=False, env={n: env for n in ["cp", *gpu_nodes]}
    )


def test_settings_reach_every_node_before_settings_set_returns(tmp_path: Path) -> None:
    mesh = slow_heartbeat_mesh(tmp_path / "slow", ["w1", "w2"])
    try:
        # w1 must know w2 to hand it work; membership travels with heartbeats.
        wait_for(
            "w1 knows w2",
            lambda: mesh["w1"].db().execute("SELECT COUNT(*) FROM principals").fetchone()[0] >= 4,
            guard_s=60,
        )
        switched = mesh.cli("cp", "settings", "set", "remote_exec_enabled", "true")
        assert "pushed to every node (2 confirmed)" in switched.stdout, switched.stdout
        task_id = mesh.run_detached("w1", "--gpus", "1", *WHERE)
        waited = mesh.wait_cli("w1", task_id)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        task = mesh.show("w1", task_id)
        (attempt,) = task["attempts"]
        assert attempt["where"] == "remote", task["reasons"]
        assert attempt["node"] == mesh["w2"].node_id
        remote_attempts = len(mesh.worker_attempts("w2"))

        stopped = json.loads(
            mesh.cli("cp", "settings", "set", "kill_switch", "true", "--json").stdout
        )
        assert stopped["push"]["unconfirmed"] == []
        assert sorted(stopped["push"]["confirmed"]) == sorted(
            [mesh["w1"].node_id, mesh["w2"].node_id]
        )
        task_id = mesh.run_detached("w1", "--gpus", "1", *WHERE)
        waited = mesh.wait_cli("w1", task_id)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        task = mesh.show("w1", task_id)
        (attempt,) = task["attempts"]
        assert attempt["where"] == "local" and attempt["node"] == mesh["w1"].node_id
        assert attempt["placement_reasons"] == ["kill_switch"]
        assert len(mesh.worker_attempts("w2")) == remote_attempts
    finally:
        mesh.close()


def test_settings_set_names_the_nodes_that_did_not_confirm(tmp_path: Path) -> None:
    mesh = slow_heartbeat_mesh(tmp_path / "slow", ["w1"])
    try:
        assert mesh.stop("w1") == 0
        human = mesh.cli("cp", "settings", "set", "remote_exec_enabled", "true")
        assert "NOT confirmed by w1 (" in human.stdout, human.stdout
        assert "next heartbeat" in human.stdout
        answer = json.loads(
            mesh.cli("cp", "settings", "set", "kill_switch", "true", "--json").stdout
        )
        (missing,) = answer["push"]["unconfirmed"]
        assert (missing["name"], missing["node_id"]) == ("w1", mesh["w1"].node_id)
        assert missing["reason"] and missing["detail"]
    finally:
        mesh.close()
