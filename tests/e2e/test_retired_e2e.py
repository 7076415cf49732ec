"""A retired node knows it, with real agents on loopback: after `populi node retire w1` on
the control plane, `populi status` on w1 says RETIRED — since when, by whom, why — and how
to re-join, within a few heartbeats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from support.procs import Processes, init, populi

pytestmark = pytest.mark.e2e


def test_a_retired_worker_says_so_in_its_status(tmp_path: Path, procs: Processes) -> None:
    cp, w1 = tmp_path / "cp", tmp_path / "w1"
    created = init(cp)
    procs.start_agent(cp)
    token = json.loads(
        populi("token", "create", "--json", "--data-dir", str(cp), check=True).stdout
    )["token"]
    populi(
        "join", token, "--data-dir", str(w1), "--listen", "127.0.0.1:0", "--name", "w1", check=True
    )
    procs.start_agent(w1)
    before = json.loads(populi("status", "--json", "--data-dir", str(w1), check=True).stdout)
    assert before["standing"]["state"] == "member"

    populi("node", "retire", "w1", "--reason", "stolen", "--data-dir", str(cp), check=True)
    retired_at = time.monotonic()
    while True:
        status = json.loads(populi("status", "--json", "--data-dir", str(w1), check=True).stdout)
        if status["standing"]["state"] == "retired":
            break
        assert time.monotonic() - retired_at < 30, status["standing"]
        time.sleep(0.2)
    print(f"w1 knew it was retired {time.monotonic() - retired_at:.1f} s after the retire")
    standing = status["standing"]
    assert standing["by"] == created["operator_id"]
    assert standing["reason"] == "stolen" and standing["since_ms"]
    assert status["lifecycle"]["state"] == "retired"
    events = json.loads(
        populi("events", "--node", "w1", "--json", "--data-dir", str(cp), check=True).stdout
    )["events"]
    retire = [e for e in events if e["detail"].get("command") == "retire"]
    assert retire and retire[-1]["actor"] == standing["by"]

    human = populi("status", "--data-dir", str(w1), check=True).stdout
    assert "RETIRED since" in human and "(stolen)" in human, human
    assert "populi node unretire w1" in human and "populi join TOKEN --force" in human, human
