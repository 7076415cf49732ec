"""Membership end to end: three real agents, SIGKILL, leave, on loopback."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from support.procs import Processes, init, populi

pytestmark = pytest.mark.e2e


def _nodes(cp: Path) -> dict[str, dict]:
    answer = json.loads(populi("nodes", "--data-dir", str(cp), "--json", check=True).stdout)
    return {n["name"]: n for n in answer["nodes"]}


def _wait(cp: Path, predicate, guard_s: float = 30.0) -> tuple[dict[str, dict], float]:
    started = time.monotonic()
    while True:
        nodes = _nodes(cp)
        if predicate(nodes):
            return nodes, time.monotonic() - started
        assert time.monotonic() - started < guard_s, nodes
        time.sleep(0.2)


def test_three_agents_sigkill_goes_stale_and_leave_shows_left(
    tmp_path: Path, procs: Processes
) -> None:
    cp = tmp_path / "cp"
    init(cp)
    procs.start_agent(cp)
    agents = {}
    for name in ("w1", "w2"):
        token = json.loads(
            populi("token", "create", "--data-dir", str(cp), "--json", check=True).stdout
        )["token"]
        populi(
            "join",
            token,
            "--data-dir",
            str(tmp_path / name),
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            check=True,
        )
        agents[name] = procs.start_agent(tmp_path / name)
    nodes, _ = _wait(
        cp,
        lambda n: (
            len(n) == 3
            and all(
                x["heartbeat_age_ms"] is not None and not x["heartbeat_stale"] for x in n.values()
            )
        ),
    )
    assert all(n["state"] == "active" for n in nodes.values())
    assert all(n["scope"] == "local" for n in nodes.values())

    agents["w1"].proc.send_signal(signal.SIGKILL)
    agents["w1"].proc.wait(timeout=10)
    nodes, took = _wait(cp, lambda n: n["w1"]["heartbeat_stale"])
    print(f"SIGKILLed node marked heartbeat_stale after {took:.1f} s")
    assert "heartbeat_stale" in nodes["w1"]["ineligible_reasons"]
    assert nodes["w1"]["state"] == "active"  # stale is derived; the node is not removed

    left = populi(
        "leave", "--reason", "going on holiday", "--data-dir", str(tmp_path / "w2"), "--json"
    )
    assert left.returncode == 0, left.stderr
    assert json.loads(left.stdout)["acknowledged"] is True
    assert agents["w2"].proc.wait(timeout=30) == 0  # the agent exits after leaving
    nodes, _ = _wait(cp, lambda n: n["w2"]["state"] == "left")
    assert nodes["w2"]["lifecycle"]["reason"] == "going on holiday"
    assert "left" in nodes["w2"]["ineligible_reasons"]
    events = json.loads(
        populi("events", "--node", "w2", "--data-dir", str(cp), "--json", check=True).stdout
    )["events"]
    assert any(e["kind"] == "lifecycle" and e["detail"]["to"] == "left" for e in events)
    # A vanished node and a node that left are told apart.
    assert nodes["w1"]["state"] == "active" and nodes["w1"]["heartbeat_stale"]
