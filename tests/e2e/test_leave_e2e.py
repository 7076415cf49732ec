"""``populi leave`` on a worker with another node's task running (real agents on loopback):
the worker stops the attempt and releases its lease, and the submitter falls back at once
with the reason ``worker_left`` — the task is not cancelled, and never runs in two places."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.exec_support import (
    Mesh,
    check_tick_order,
    leftovers,
    read_ticks,
    tick_command,
    wait_ticks,
)

from support.procs import kill_pids

pytestmark = pytest.mark.e2e


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    built = Mesh.create(tmp_path / "mesh", ["w1"])
    try:
        yield built
    finally:
        built.close()
        kill_pids(leftovers(tmp_path))


def test_a_leaving_worker_hands_its_task_back_as_worker_left(mesh: Mesh, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    task_id = mesh.run_detached("cp", "--gpus", "1", *tick_command(ticks, n1=600, n2=3))
    wait_ticks(ticks, 1, count=3)
    left = mesh.cli("w1", "leave")
    assert "left the cluster" in left.stdout, left.stdout
    task, _ = mesh.wait_task_ended("cp", task_id, guard_s=90)
    assert task["state"] == "succeeded", task["reasons"]
    first, second = task["attempts"]
    assert (first["where"], first["outcome"]) == ("remote", "lease_lost")
    assert second["where"] == "local" and "worker_left" in second["placement_reasons"], second
    codes = [row[1] for row in task["reasons"]]
    assert "cancelled" not in codes and "worker_left" in codes, codes
    # Never in two places: every tick of attempt 1 came before attempt 2's first.
    by_attempt = check_tick_order(read_ticks(ticks))
    assert sorted(by_attempt) == [1, 2] and len(by_attempt[1]) < 600
