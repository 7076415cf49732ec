"""One agent per data directory, with real agent processes, a real task supervisor and
real ``flock`` (issue 10, item 7).

- A second ``populi agent`` on a data directory an agent runs on (on the same port, or on
  another) says ``already running (pid N)`` in one line and exits 4; the first one runs
  on, untouched. ``populi init --force`` is refused the same way.
- SIGKILL the agent while its task runs: the lock goes with the process (the supervisor
  that outlives it does not hold it), a new agent starts at once and re-adopts the task,
  which runs to its end in one piece.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from e2e.exec_support import free_port, log_events, wait_for

from populi_peer.datadir_lock import LOCK_FILE_NAME
from support.procs import Processes, init, one_line, populi

pytestmark = pytest.mark.e2e

#: A task that ticks (one line per 0.1 s, from one process) until ``$STOP`` exists.
TICKER = """\
import os, time
ticks, stop = os.environ["TICKS"], os.environ["STOP"]
index = 0
while not os.path.exists(stop) and index < 1200:
    with open(ticks, "a") as f:
        f.write("%d %d\\n" % (os.getpid(), index))
    index += 1
    time.sleep(0.1)
"""


def runtime_pid(data_dir: Path) -> int:
    return int(json.loads((data_dir / "run" / "agent.json").read_text())["pid"])


def test_a_second_agent_on_the_same_data_dir_says_already_running(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "d"
    port = free_port()
    init(data_dir, "--listen", f"127.0.0.1:{port}")
    first = procs.start_agent(data_dir)
    for extra in ([], ["--listen", "127.0.0.1:0"]):  # the same port, then another one
        second = populi("agent", "--data-dir", str(data_dir), *extra, timeout=60)
        assert second.returncode == 4, second.stderr
        assert one_line(second.stderr), second.stderr
        assert f"already running (pid {first.proc.pid})" in second.stderr
    forced = populi("init", "--cluster-name", "lab", "--data-dir", str(data_dir), "--force")
    assert forced.returncode == 4, forced.stderr
    assert one_line(forced.stderr) and "already running" in forced.stderr
    # The first agent runs on, with its data directory and its runtime file intact.
    assert first.proc.poll() is None
    assert runtime_pid(data_dir) == first.proc.pid
    assert httpx.get(first.url + "/v1/populi/health", verify=False, timeout=10).status_code == 200
    status = populi("status", "--data-dir", str(data_dir), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["url"] == first.url


def test_sigkilled_agent_restarts_at_once_and_readopts_its_task(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    ticks, stop = tmp_path / "ticks", tmp_path / "stop"
    ran = populi(
        "run", "--detach", "--data-dir", str(data_dir),
        "--env", f"TICKS={ticks}", "--env", f"STOP={stop}",
        "--", sys.executable, "-c", TICKER,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    task_id = ran.stdout.strip()
    task_dir = data_dir / "tasks" / "local" / task_id / "1"
    wait_for("the task ticks", lambda: ticks.exists() and ticks.read_text().count("\n") >= 3)
    state = json.loads((task_dir / "state.json").read_text())
    lock_path = str(data_dir / LOCK_FILE_NAME)
    for pid in (int(state["supervisor_pid"]), int(state["child_pid"])):
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert lock_path not in held, f"process {pid} inherited the data directory lock"
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=30)
    # At once: the lock went with the process, though its supervisor lives on.
    restarted = procs.start_agent(data_dir)
    assert restarted.proc.pid != agent.proc.pid
    wait_for(
        "the new agent re-adopts the task",
        lambda: log_events(restarted.log(), "attempt re-adopted", task_id=task_id),
        guard_s=60,
    )
    stop.write_text("")
    waited = populi(
        "task", "wait", task_id, "--timeout", "120s", "--json", "--data-dir", str(data_dir),
        timeout=150,
    )  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    lines = [line.split() for line in ticks.read_text().splitlines()]
    assert len({pid for pid, _ in lines}) == 1, "the task was started twice"
    assert [int(index) for _, index in lines] == list(range(len(lines)))
    show = json.loads(populi("task", "show", task_id, "--json", "--data-dir", str(data_dir)).stdout)
    assert show["state"] == "succeeded", show
    assert len(show["attempts"]) == 1, show
