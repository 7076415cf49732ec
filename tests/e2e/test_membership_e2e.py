"""Membership end to end: three real agents, SIGKILL, leave, on loopback."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from support.mesh import Mesh
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _wait(
    mesh: Mesh, what: str, predicate: Any, guard_s: float = 30.0
) -> tuple[dict[str, dict[str, Any]], float]:
    """The control plane's ``populi nodes`` view, once ``predicate`` holds for it."""

    def view() -> dict[str, dict[str, Any]] | None:
        nodes = mesh.nodes_view()
        return nodes if predicate(nodes) else None

    return wait_for(what, view, guard_s=guard_s, every_s=0.2)


def test_three_agents_sigkill_goes_stale_and_leave_shows_left(tmp_path: Path) -> None:
    mesh = Mesh.create(tmp_path, cpu_nodes=["w1", "w2"], remote=False)
    try:
        scenario(mesh)
    finally:
        mesh.close()


def scenario(mesh: Mesh) -> None:
    nodes, _ = _wait(
        mesh,
        "three fresh nodes",
        lambda n: (
            len(n) == 3
            and all(
                x["heartbeat_age_ms"] is not None and not x["heartbeat_stale"] for x in n.values()
            )
        ),
    )
    assert all(n["state"] == "active" for n in nodes.values())
    assert all(n["scope"] == "local" for n in nodes.values())

    w1, w2 = mesh["w1"].agent, mesh["w2"].agent
    assert w1 is not None and w2 is not None
    w1.proc.send_signal(signal.SIGKILL)
    w1.proc.wait(timeout=10)
    nodes, took = _wait(mesh, "w1 goes stale", lambda n: n["w1"]["heartbeat_stale"])
    print(f"SIGKILLed node marked heartbeat_stale after {took:.1f} s")
    assert "heartbeat_stale" in nodes["w1"]["ineligible_reasons"]
    assert nodes["w1"]["state"] == "active"  # stale is derived; the node is not removed

    left = mesh.cli("w2", "leave", "--reason", "going on holiday", "--json", check=False)
    assert left.returncode == 0, left.stderr
    assert json.loads(left.stdout)["acknowledged"] is True
    assert w2.proc.wait(timeout=30) == 0  # the agent exits after leaving
    nodes, _ = _wait(mesh, "w2 has left", lambda n: n["w2"]["state"] == "left")
    assert nodes["w2"]["lifecycle"]["reason"] == "going on holiday"
    assert "left" in nodes["w2"]["ineligible_reasons"]
    events = json.loads(mesh.cli("cp", "events", "--node", "w2", "--json").stdout)["events"]
    assert any(e["kind"] == "lifecycle" and e["detail"]["to"] == "left" for e in events)
    # A vanished node and a node that left are told apart.
    assert nodes["w1"]["state"] == "active" and nodes["w1"]["heartbeat_stale"]
