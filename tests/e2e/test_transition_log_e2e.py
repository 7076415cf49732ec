"""Logs a person can follow (issue 15, item 5): real agents on loopback, each writing JSON
lines into its log file. During a fallback (the worker's agent SIGKILLed mid-task) every
placement, lease and fallback transition is one line carrying ``task_id``, ``attempt``,
``lease_id``, ``token`` and ``reason``; the submitter's lines name the same reason codes, in
the same order, as ``populi task show``; the control plane's lines follow the same leases."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from e2e.exec_support import Mesh, tick_command, wait_ticks

pytestmark = pytest.mark.e2e

FIELDS = ("task_id", "attempt", "lease_id", "token", "reason")


def transitions(log_text: str, event: str, task_id: str) -> list[dict[str, Any]]:
    lines = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == event and entry.get("task_id") == task_id:
            lines.append(entry)
    return lines


def test_every_transition_of_a_fallback_is_one_json_line_as_task_show_tells_it(
    tmp_path: Path,
) -> None:
    mesh = Mesh.create(tmp_path / "mesh", ["w1", "w2"])
    try:
        ticks = tmp_path / "ticks"
        task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=600, n2=5))
        wait_ticks(ticks, 1)
        mesh.stop("w2", signal.SIGKILL)
        killed = time.monotonic()
        waited = mesh.wait_cli("w1", task_id)
        assert waited.returncode == 0, waited.stderr
        print(f"fell back and finished {time.monotonic() - killed:.1f} s after the kill")
        shown = mesh.show("w1", task_id)
        submitter = transitions(mesh["w1"].log(), "task transition", task_id)
        control_plane = transitions(mesh["cp"].log(), "lease transition", task_id)
    finally:
        mesh.close()

    print(json.dumps(submitter, indent=1)[:4000])
    for line in submitter + control_plane:
        assert all(key in line for key in FIELDS), line
        assert line["reason"], line
    # The submitter: one line per decision, the same codes as the record, in order.
    decisions = [(line["decision"], *line["reasons"]) for line in submitter]
    logged = [code for row in decisions for code in row]
    recorded = [row[1] for row in shown["reasons"]]
    assert recorded[0] == "submitted"
    assert logged == recorded[1:], (logged, recorded)
    by_transition = {line["transition"]: line for line in submitter}
    remote, local = shown["attempts"]
    placed = by_transition["placed_remote"]
    assert (placed["attempt"], placed["lease_id"], placed["token"]) == (
        1,
        remote["lease_id"],
        remote["token"],
    )
    fell_back = by_transition["lease_dead_confirmed"]
    assert (fell_back["attempt"], fell_back["lease_id"], fell_back["token"]) == (
        2,
        local["lease_id"],
        local["token"],
    )
    assert fell_back["reason"] == "lease_expired"
    assert fell_back["state"] == "running_local"
    assert by_transition["result_ok"]["state"] == "succeeded"
    # The control plane: the remote lease granted then expired, the local one granted,
    # then completed; each line joins the task by lease id and token.
    story = [(line["lease_id"], line["state"], line["reason"]) for line in control_plane]
    assert (remote["lease_id"], "live", "granted") in story
    assert (remote["lease_id"], "expired", "expired") in story
    assert (local["lease_id"], "live", "granted") in story
    assert story.index((remote["lease_id"], "expired", "expired")) < story.index(
        (local["lease_id"], "live", "granted")
    )
    tokens = {line["lease_id"]: line["token"] for line in control_plane}
    assert tokens[remote["lease_id"]] == remote["token"]
    assert tokens[local["lease_id"]] == local["token"]
