"""Local work never waits for an unreachable control plane (safety rule 1, ADR 0015), end
to end: real agents on loopback (real TLS, real SQLite, real processes), ``w1`` replaying
a real H100 capture.

With the control plane stopped, ``populi run --node w1 --gpus 1`` on ``w1`` claims that
node's GPU locally, runs, and returns the command's exit code. While a claimed task runs
and the control plane is back, a grant on that GPU requested by another node is refused
(``no_free_gpu``: the node reported its claim) until the task ends; then it is granted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from e2e.exec_support import grant_as_cp

from support.mesh import Mesh
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _grant(mesh: Mesh, task_id: str) -> tuple[int, Any]:
    """A one-GPU grant on w1's GPU, asked by another node (the control plane's own, a submitter too)."""
    answer = grant_as_cp(mesh, "w1", task_id, ttl_s=6)
    return answer.status_code, answer.json()


def _reasons(answer: Any) -> list[str]:
    return list(answer.get("error", {}).get("details", {}).get("reasons", []))


def test_without_a_control_plane_a_local_gpu_run_claims_and_blocks_grants_until_it_ends(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    mesh = Mesh.create(tmp_path, gpu_nodes=["w1"])
    print(f"\nmesh up in {time.monotonic() - started:.2f} s")
    try:
        scenario(mesh, tmp_path)
    finally:
        mesh.close()


def scenario(mesh: Mesh, tmp_path: Path) -> None:
    mesh.stop("cp")
    started = time.monotonic()
    run = mesh.cli(
        "w1", "run", "--node", "w1", "--gpus", "1", after=["sh", "-c", "exit 7"], check=False
    )
    print(
        f"\nlocal GPU run without a control plane: exit {run.returncode} "
        f"in {time.monotonic() - started:.2f} s"
    )
    assert run.returncode == 7, run.stderr[-2000:]

    stop_file = tmp_path / "stop-the-claimed-task"
    task_id = mesh.run_detached(
        "w1",
        "--node",
        "w1",
        "--gpus",
        "1",
        "--",
        "sh",
        "-c",
        f"while [ ! -e {stop_file} ]; do sleep 0.1; done",
    )
    wait_for(
        "the claimed task runs",
        lambda: mesh.show("w1", task_id)["state"] == "running_local",
        guard_s=60,
    )
    shown = mesh.show("w1", task_id)
    assert "claimed_locally" in [code for _, code, _ in shown["reasons"]]

    restarted = time.monotonic()
    mesh.start("cp")
    wait_for(
        "a grant on w1's claimed GPU refused for no_free_gpu alone",
        lambda: (
            (answer := _grant(mesh, "t-probe"))[0] == 409
            and _reasons(answer[1]) == ["no_free_gpu"]
            and answer
        ),
        guard_s=60,
    )
    print(f"claim heard {time.monotonic() - restarted:.2f} s after the control plane restarted")
    # Refused again a moment later: the claim holds while the task runs.
    status, answer = _grant(mesh, "t-probe-2")
    assert (status, _reasons(answer)) == (409, ["no_free_gpu"]), answer
    assert mesh.show("w1", task_id)["state"] == "running_local"

    stop_file.write_text("done\n")
    ended = mesh.wait_cli("w1", task_id, guard_s=60)
    assert ended.returncode == 0, ended.stdout + ended.stderr
    granted, _ = wait_for(
        "a grant on w1's GPU once the claimed task ended",
        lambda: (answer := _grant(mesh, "t-after"))[0] == 200 and answer[1],
        guard_s=60,
    )
    assert granted["lease"]["holder"] == mesh["w1"].node_id
