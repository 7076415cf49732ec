"""What ``populi agent`` writes: on a terminal (a real pty), a short human summary and then
only what matters; into a file, JSON lines without the access log unless asked for."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from support.procs import POPULI, Processes, init, populi
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

FIXTURE = "h100-80gb-hbm3-idle.json"


def test_on_a_terminal_a_summary_then_only_what_matters(tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"
    init(data_dir)
    controller, terminal = pty.openpty()
    agent = subprocess.Popen(
        [*POPULI, "agent", "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "POPULI_GPU_FIXTURE": FIXTURE},
    )
    os.close(terminal)
    screen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not chunk:
                return
            screen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def text() -> str:
        return b"".join(screen).decode(errors="replace").replace("\r\n", "\n")

    try:
        wait_for("the start-up summary", lambda: "  log " in text(), guard_s=60)
        # Requests the agent answers (each was an INFO line before): none shows up here.
        for _ in range(3):
            populi("status", "--data-dir", str(data_dir), check=True)
        populi("events", "--data-dir", str(data_dir), check=True)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0
        reader.join(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        os.close(controller)
    shown = text()
    print(shown)
    lines = [line for line in shown.splitlines() if line.strip()]
    summary = "\n".join(lines[:6])
    assert lines[0].startswith("populi agent: node cp (n-") and "of cluster lab" in lines[0]
    assert "API            https://127.0.0.1:" in summary
    assert "control plane  this node" in summary
    assert f"1 x NVIDIA H100 80GB HBM3, replayed from the capture {FIXTURE}" in summary
    rest = lines[6:]
    assert [line.split(" ", 1)[1] for line in rest] == [
        "notice  agent: agent stopping",
        "notice  agent: agent stopped",
    ], rest
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON here
    assert "request" not in shown


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_into_a_file_json_lines_and_the_access_log_only_at_debug(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "cp"
    agent = procs.init_and_start(data_dir)
    for _ in range(3):
        populi("status", "--data-dir", str(data_dir), check=True)
    assert procs.stop(agent) == 0
    lines = json_lines(agent.log())  # every line is JSON: it raises otherwise
    events = [line["event"] for line in lines]
    assert "agent started" in events and "agent stopped" in events
    assert "request" not in events
    assert "populi agent: node" not in agent.log()  # the summary is for terminals

    # Asked for (the config key, here through its variable): every request answered.
    before = len(agent.log())
    again = procs.start_agent(data_dir, env={"POPULI_LOG__LEVEL": "debug"})
    populi("status", "--data-dir", str(data_dir), check=True)
    assert procs.stop(again) == 0
    requests = [line for line in json_lines(again.log()[before:]) if line["event"] == "request"]
    status = [r for r in requests if r["path"] == "/v1/populi/status"]
    assert status and all(r["method"] == "GET" and r["status"] == 200 for r in status)
    assert {line["level"] for line in requests} == {"debug"}
