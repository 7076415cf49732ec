"""``/metrics`` end to end: real agents on loopback under short leases. The control plane's
scrape passes ``promtool check metrics`` (Debian's ``prometheus`` package), and during a
remote task its lease counters move; when the worker's agent is killed, the confirmed
fallback shows in ``populi_fallbacks_total``."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from e2e.exec_support import Mesh, tick_command, wait_for, wait_ticks
from prometheus_client.parser import text_string_to_metric_families

from support.procs import Processes, init, populi

pytestmark = pytest.mark.e2e


def scrape(mesh: Mesh, name: str) -> str:
    status = json.loads(mesh.cli(name, "status", "--json").stdout)
    url = status["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
    return httpx.get(url, timeout=10).text


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_scrape_passes_promtool_and_sees_lease_and_fallback_counters_move(
    tmp_path: Path,
) -> None:
    mesh = Mesh.create(tmp_path / "mesh", ["w1", "w2"])
    try:
        before = scrape(mesh, "cp")
        promtool_check(before)
        assert sample(before, "populi_nodes", state="active") == 3
        ticks = tmp_path / "ticks"
        task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=600, n2=10))
        wait_ticks(ticks, 1)
        # During the remote task: a grant, then renewals, each counted as it happens.
        during, took = wait_for(
            "a renewal counted during the remote task",
            lambda: (
                text
                if sample(
                    text := scrape(mesh, "cp"),
                    "populi_lease_decisions_total",
                    decision="renewals",
                    outcome="ok",
                )
                > sample(before, "populi_lease_decisions_total", decision="renewals", outcome="ok")
                else None
            ),
            guard_s=60,
        )
        print(f"a renewal counted {took:.1f} s after the first tick")
        assert sample(during, "populi_lease_decisions_total", decision="grants", outcome="ok") >= 1
        assert sample(during, "populi_leases", state="live") >= 1
        promtool_check(during)
        mesh.stop("w2", signal.SIGKILL)
        killed = time.monotonic()
        try:
            wait_ticks(ticks, 2, count=1, guard_s=90)
            after, _ = wait_for(
                "the confirmed fallback counted",
                lambda: (
                    text
                    if sample(text := scrape(mesh, "cp"), "populi_fallbacks_total") >= 1
                    else None
                ),
                guard_s=60,
            )
            print(f"fallback counted {time.monotonic() - killed:.1f} s after the kill")
            assert sample(after, "populi_fallbacks_total", reason="lease_expired") >= 1
            promtool_check(after)
            waited = mesh.wait_cli("w1", task_id)
            assert waited.returncode == 0, waited.stderr
            # The submitter counts the task's duration once it ended.
            finished = scrape(mesh, "w1")
            assert sample(finished, "populi_task_duration_seconds_count", state="succeeded") == 1
            assert sample(finished, "populi_task_duration_seconds_sum", state="succeeded") > 0
            promtool_check(finished)
        finally:
            mesh.start("w2")
    finally:
        mesh.close()


def test_a_metrics_port_taken_leaves_the_agent_up_and_degraded(
    tmp_path: Path, procs: Processes
) -> None:
    """Two agents on one machine with the default metrics port: the second cannot bind it.
    It serves on, says so in its health, and names no metrics URL."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        data_dir = tmp_path / "d"
        init(data_dir)
        agent = procs.start_agent(
            data_dir, env={"POPULI_METRICS__LISTEN": f"127.0.0.1:{port}"}, health=True
        )
        status, _ = wait_for(
            "the agent reports the metrics listener as failed",
            lambda: (
                s
                if (
                    s := json.loads(populi("status", "--data-dir", str(data_dir), "--json").stdout)
                )["health"]["state"]
                == "degraded"
                else None
            ),
            guard_s=30,
            every_s=0.5,
        )
        assert [p["component"] for p in status["health"]["problems"]] == ["metrics"]
        assert status.get("metrics_url") is None
        assert agent.proc.poll() is None
        assert "Traceback" not in agent.log()
    finally:
        taken.close()
