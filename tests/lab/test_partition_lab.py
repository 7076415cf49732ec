"""A worker cut off from the control plane by the network itself: real agents in network
namespaces, real TLS and SQLite, iptables partitions (root; skipped otherwise).

The lab (``tests/lab/netns.py``): hosts ``cp`` (10.77.0.1, the control plane, CPU only),
``wa`` (10.77.0.2) and ``wb`` (10.77.0.3), both replaying an idle H100, each in its own
namespace, joined by veth pairs to a bridge in a fourth one; no default route, nothing
leaves the lab. Every ``populi`` process — agents and CLI alike — runs inside its host's
namespace (``ip netns exec``), each agent listening on its lab address (``--listen
10.77.0.X:7431``), and the CLI talks to its local agent at that advertised address.
Short leases as in ``tests/e2e/test_exec_e2e.py``: TTL 6 s, expiry margin 2 s, worker stop
margin 2 s, kill grace 1 s, kill latency 0.5 s.

The scenario: ``populi run --node wb --gpus 1`` on ``wa`` runs a ticking task (the tick
protocol of ``tests/e2e/exec_support.py``: ``node attempt pid time_ns token boot_ns
index`` lines in a file under ``tmp_path``, which every namespace sees) on ``wb``; then
``wb`` is cut from ``cp`` alone, by DROP rules in ``wb``'s namespace (``INPUT -s CP`` and
``OUTPUT -d CP``); ``wa`` still reaches both. The contract (safety rules 1-4, 7):

- the remote attempt ran on ``wb``; its supervisor stopped it by itself (``deadline``),
  its last tick before the lease deadline on CLOCK_BOOTTIME, and no tick of attempt 1
  came after the first tick of attempt 2;
- the lease expired on ``cp`` (its own clock plus margin), after the last tick;
- ``wa`` fell back on ``cp``'s word with a higher token and the task succeeded, with
  exactly one accepted result, the local attempt's;
- ``wb``'s own result for attempt 1 (``lease_lost``) reaches ``wa`` — during the
  partition, as ``wb -> wa`` still works — and is recorded; after healing, ``cp`` hears
  ``wb`` again and nothing changes: the task, its one accepted result, the dead lease.

How long the fallback took is printed, never asserted (two busy cores).

How partitions behave here, which this test relies on: partitions are
made with ``ip link set DEV down`` (cut cable) or ``iptables ... -j DROP`` per peer
(one-way if applied on one side) — ``tc netem`` is not available, the kernel lacks it; an
httpx request on a kept-alive connection across a partition does not fail fast: it hangs
until its timeout, and succeeds again after healing. So ``wb``'s renewals (and
heartbeats) to ``cp`` time out rather than being refused, which is exactly the case the
supervisor's own deadline is for: nothing tells ``wb`` that its lease is gone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from e2e.exec_support import (
    accepted_results,
    check_tick_order,
    read_ticks,
    supervisor_state,
    tick_command,
    ticks_of,
    wait_ticks,
)
from lab.agents import GUARD_S, fell_back_on_the_control_planes_word
from lab.netns import Lab

from support.mesh import Mesh
from support.procs import marked_pids
from support.waiting import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: Attempt 1 would tick for a minute (it is stopped long before); attempt 2 for 2 s.
N1, N2 = 600, 20


def test_worker_cut_from_the_control_plane_by_iptables(
    lab: Lab, mesh: Mesh, tmp_path: Path
) -> None:
    with mesh.logs_on_failure():
        scenario(lab, mesh, tmp_path)


def scenario(lab: Lab, mesh: Mesh, tmp_path: Path) -> None:
    started = time.monotonic()
    mesh.build(["wa", "wb"])
    print(f"\nthe lab's cluster up in {time.monotonic() - started:.1f} s")
    wb = mesh["wb"]
    ticks = tmp_path / "ticks"
    out = mesh.cli(
        "wa",
        "run",
        "--detach",
        "--node",
        "wb",
        "--node-fallback",
        "--gpus",
        "1",
        "--queue-timeout",
        "60s",
        after=tick_command(ticks, n1=N1, n2=N2),
    ).stdout
    task_id = out.strip()
    assert task_id.startswith("t-"), out

    # The remote attempt runs on wb, under its lease.
    took = wait_ticks(ticks, 1, guard_s=GUARD_S)
    print(f"remote attempt ticking {took:.1f} s after submission")
    first_ticks = ticks_of(ticks, 1)
    assert {t.node for t in first_ticks} == {"wb"}, first_ticks
    record = mesh.task_record("wa", task_id)
    remote = record["task"]["attempts"][0]
    assert (remote["where"], remote["node"]) == ("remote", wb.node_id), remote
    task_dir = wb.data_dir / "tasks" / "worker" / task_id / "1"

    # Cut wb from cp only.
    lab.cut("wb", "cp")
    cut_ns, cut_mono = time.time_ns(), time.monotonic()
    print(f"cut wb <-> cp at {cut_ns}")

    task, took = mesh.wait_task_ended("wa", task_id, guard_s=GUARD_S)
    print(f"task ended {took:.1f} s after the cut")

    # Never in two places at once; the remote attempt stopped itself before its deadline;
    # the lease expired on cp, after the last tick of the remote attempt; wa fell back on
    # cp's word, with a higher token, and ran the task once more.
    by_attempt, first, second, lease = fell_back_on_the_control_planes_word(
        mesh, task, ticks, task_dir, remote="wb", local="wa"
    )
    assert len(by_attempt[2]) == N2
    state = supervisor_state(task_dir)
    # (``ip netns exec`` mounts a fresh /sys: no cgroup there, so process-group isolation)
    print(f"wb's supervisor: isolation {state.get('isolation')}, signal {state.get('signal')}")
    assert not [
        pid
        for pid in marked_pids(f"POPULI_TASK_ID={task_id}".encode())
        if pid in marked_pids(b"POPULI_ATTEMPT=1")
    ], "a process of attempt 1 is still alive"
    # The cut did its work: wb's packets to cp were dropped.
    drops = lab.drop_counts("wb")
    assert drops.get("OUTPUT", 0) > 0, drops
    # (lease_lost when wb's own report that it stopped reached wa first: wb -> wa works)
    assert (first["where"], first["node"]) == ("remote", wb.node_id), first
    assert first["outcome"] in ("lease_lost", "lease_dead"), first
    assert by_attempt[1][0].token == first["token"] and by_attempt[2][0].token == second["token"]
    first_local_ns = min(t.time_ns for t in by_attempt[2])
    last_remote_ns = max(t.time_ns for t in by_attempt[1])
    print(
        "fallback: remote attempt's last tick {:.2f} s after the cut, lease expired on cp "
        "{:.2f} s after the cut, local attempt's first tick {:.2f} s after the cut".format(
            (last_remote_ns - cut_ns) / 1e9,
            (lease["state_changed_wall_ms"] * 1e6 - cut_ns) / 1e9,
            (first_local_ns - cut_ns) / 1e9,
        )
    )

    # The real CLI, from inside each namespace, says the same.
    shown = mesh.show("wa", task_id)
    assert shown["state"] == "succeeded" and len(shown["attempts"]) == 2, shown
    leases = mesh.leases(task=task_id)
    assert {x["lease_id"]: x["state"] for x in leases}[first["lease_id"]] == "expired", leases

    # The cut cut heartbeats too: cp no longer hears wb.
    assert cp_view_of(mesh, "wb")["heartbeat_stale"], cp_view_of(mesh, "wb")

    # Heal: wb's result for attempt 1 gets through, is recorded, and changes nothing.
    delivered_before = (mesh.worker_attempt("wb", task_id, 1) or {}).get("delivered_ms")
    lab.heal()
    healed_mono = time.monotonic()
    row, took = wait_for(
        "wb's result for attempt 1 is delivered",
        lambda: (r := mesh.worker_attempt("wb", task_id, 1)) and r["delivered_ms"] and r,
        guard_s=GUARD_S,
        every_s=0.2,
    )
    print(
        "wb's attempt-1 result delivered "
        + (
            "during the partition (wb -> wa works)"
            if delivered_before
            else f"{took:.1f} s after healing"
        )
    )
    assert row["state"] == "finished"
    worker_result = json.loads(row["result"])
    assert worker_result["outcome"] == "lease_lost", worker_result
    after = mesh.task_record("wa", task_id)
    assert after["results"]["1"]["token"] == first["token"], after["results"]
    assert after["results"]["1"]["outcome"] == "lease_lost", after["results"]["1"]
    # wb is back in touch with cp (its heartbeats get through again), and nothing moved.
    _, took = wait_for(
        "cp hears wb again",
        lambda: not cp_view_of(mesh, "wb")["heartbeat_stale"] or None,
        guard_s=GUARD_S,
        every_s=0.5,
    )
    print(f"cp hears wb again {time.monotonic() - healed_mono:.1f} s after healing")
    again = mesh.task_record("wa", task_id)
    assert again["task"] == task, "the task changed after healing"
    assert len(accepted_results(again["task"])) == 1
    assert mesh.lease_record(first["lease_id"])["state"] == "expired"
    assert check_tick_order(read_ticks(ticks)).keys() == {1, 2}
    print(f"whole scenario after the cut: {time.monotonic() - cut_mono:.1f} s")


def cp_view_of(mesh: Mesh, name: str) -> dict[str, Any]:
    """``populi nodes --json`` on cp: its view of node ``name``."""
    return mesh.nodes_view()[name]
