"""Helpers for the execution-plane end-to-end tests: the tick protocol, and looks at what
every process left behind (the mesh itself is ``support.mesh``).

Everything here drives real ``populi`` processes; nothing of what runs is faked. The only
stand-in is the GPU: nodes replay an NVML capture (``POPULI_GPU_FIXTURE``).
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# The mesh, the waiting and the looks into /proc are shared with the other real-process
# tests; they are re-exported here for the tests that import them from this module.
from support.mesh import (
    EXEC_ENV,
    EXPIRY_MARGIN_S,
    GPU_FIXTURE,
    LEASE_TTL_S,
    STOP_MARGIN_S,
    TERMINAL,
    Mesh,
    Node,
    free_port,
)
from support.procs import (
    MARK,
    MARK_NAME,
    kill_pids,
    leftovers,
    marked_pids,
    supervisor_pids,
    task_pids,
)
from support.waiting import wait_for

# The tick protocol: one line ``node attempt pid time_ns token boot_ns index`` every
# 100 ms, appended (O_APPEND, one write per line) to $TICKS. The node is read from the
# task's working directory, which Populi makes under the data directory of the node that
# runs the attempt (``<data_dir>/tasks/<role>/<task>/<attempt>/work``): the task gets no
# other hint of where it runs. ``boot_ns`` is CLOCK_BOOTTIME, the clock the supervisor's
# deadline is written in. Attempt 1 ticks $N1 times, later attempts $N2 times; the task
# exits with $EXIT_CODE (default 0).
TICK_SCRIPT = """\
import os, sys, time
path = os.environ["TICKS"]
attempt = int(os.environ["POPULI_ATTEMPT"])
count = int(os.environ["N1"] if attempt == 1 else os.environ["N2"])
node = os.getcwd().split(os.sep + "tasks" + os.sep)[0].rsplit(os.sep, 1)[-1]
token = os.environ["POPULI_FENCING_TOKEN"]
for index in range(count):
    line = "%s %d %d %d %s %d %d\\n" % (
        node, attempt, os.getpid(), time.time_ns(), token,
        time.clock_gettime_ns(time.CLOCK_BOOTTIME), index,
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    time.sleep(0.1)
print("ticked", count, "times on", node, "attempt", attempt, "token", token)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def tick_command(ticks: Path, *, n1: int, n2: int) -> list[str]:
    """``populi run`` arguments (after the options) for a ticking task."""
    return [
        "--env",
        f"TICKS={ticks}",
        "--env",
        f"N1={n1}",
        "--env",
        f"N2={n2}",
        "--env",
        f"{MARK_NAME}={MARK}",
        "--",
        sys.executable,
        "-c",
        TICK_SCRIPT,
    ]


@dataclass(frozen=True)
class Tick:
    node: str
    attempt: int
    pid: int
    time_ns: int
    token: str
    boot_ns: int
    index: int


def read_ticks(path: Path) -> list[Tick]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 7:
            raise AssertionError(f"torn or foreign tick line {line!r}")
        node, attempt, pid, time_ns, token, boot_ns, index = parts
        out.append(
            Tick(node, int(attempt), int(pid), int(time_ns), token, int(boot_ns), int(index))
        )
    return out


def ticks_of(path: Path, attempt: int) -> list[Tick]:
    return [t for t in read_ticks(path) if t.attempt == attempt]


def wait_ticks(path: Path, attempt: int, count: int = 3, guard_s: float = 60.0) -> float:
    """Wait until attempt ``attempt`` ticked ``count`` times; returns how long it took."""
    _, took = wait_for(
        f"{count} ticks of attempt {attempt}",
        lambda: len(ticks_of(path, attempt)) >= count or None,
        guard_s=guard_s,
        every_s=0.05,
    )
    return float(took)


def token_key(token: str) -> tuple[int, int]:
    term, seq = token.split(".")
    return int(term), int(seq)


def check_tick_order(ticks: list[Tick]) -> dict[int, list[Tick]]:
    """The tick protocol's invariants; returns the ticks by attempt.

    - each attempt ticked from one process with one token, on one node;
    - tokens strictly increase with the attempt number;
    - no tick of attempt N comes after the first tick of attempt N+1 (same machine, same
      wall clock): never in two places at once (safety rule 1).
    """
    by_attempt: dict[int, list[Tick]] = {}
    for tick in ticks:
        by_attempt.setdefault(tick.attempt, []).append(tick)
    for attempt, own in by_attempt.items():
        assert len({t.pid for t in own}) == 1, f"attempt {attempt} ticked from several processes"
        assert len({t.token for t in own}) == 1, f"attempt {attempt} saw several tokens"
        assert len({t.node for t in own}) == 1, f"attempt {attempt} ran on several nodes"
        assert [t.index for t in own] == list(range(len(own))), (
            f"attempt {attempt} started twice or lost ticks: {[t.index for t in own]}"
        )
    numbers = sorted(by_attempt)
    for before, after in itertools.pairwise(numbers):
        assert token_key(by_attempt[before][0].token) < token_key(by_attempt[after][0].token), (
            f"tokens do not increase: {by_attempt[before][0].token} then "
            f"{by_attempt[after][0].token}"
        )
        last = max(t.time_ns for t in by_attempt[before])
        first = min(t.time_ns for t in by_attempt[after])
        assert last < first, (
            f"attempt {before} ticked {(last - first) / 1e6:.0f} ms after attempt {after} began"
        )
    return by_attempt


def log_events(text: str, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
    """The agent's JSON log lines (optionally only ``event`` with these fields)."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if event is not None and entry.get("event") != event:
            continue
        if all(entry.get(k) == v for k, v in match.items()):
            out.append(entry)
    return out


def deadline_boot_ns(task_dir: Path) -> int:
    """The supervisor's current lease deadline (CLOCK_BOOTTIME), in ns."""
    text = (task_dir / "deadline").read_text().strip()
    return round(float(text) * 1e9)


def wait_renewal(task_dir: Path, guard_s: float = 60.0) -> float:
    """Block until the supervisor's deadline moves (a renewal just landed); returns the
    new deadline (CLOCK_BOOTTIME seconds)."""
    first = deadline_boot_ns(task_dir)
    moved, _ = wait_for(
        "a lease renewal moves the supervisor's deadline",
        lambda: (d := deadline_boot_ns(task_dir)) > first and d,
        guard_s=guard_s,
        every_s=0.02,
    )
    return float(moved) / 1e9


def supervisor_state(task_dir: Path) -> dict[str, Any]:
    return dict(json.loads((task_dir / "state.json").read_text()))


def grant_request(mesh: Mesh, target: str, task_id: str, *, ttl_s: float) -> dict[str, Any]:
    """The body of a one-GPU lease on ``target`` for attempt 1 of ``task_id``, a task nobody
    hands off."""
    return {
        "task_id": task_id,
        "attempt": 1,
        "work_class": "inference",
        "target": mesh[target].node_id,
        "gpus_wanted": 1,
        "ttl_s": ttl_s,
    }


def grant_as_cp(mesh: Mesh, target: str, task_id: str, *, ttl_s: float) -> httpx.Response:
    """:func:`grant_request`, asked by the control plane's own node (a submitter too)."""
    with mesh.client("cp", mesh.credential("cp")) as client:
        return client.post(
            "/v1/populi/exec/leases", json=grant_request(mesh, target, task_id, ttl_s=ttl_s)
        )


def accepted_results(task: dict[str, Any]) -> list[list[Any]]:
    """The task's decision-log rows of accepted results (stale ones are ``stale_result``)."""
    return [r for r in task["reasons"] if r[1] == "result"]


__all__ = [
    "EXEC_ENV",
    "EXPIRY_MARGIN_S",
    "GPU_FIXTURE",
    "LEASE_TTL_S",
    "MARK",
    "MARK_NAME",
    "STOP_MARGIN_S",
    "TERMINAL",
    "Mesh",
    "Node",
    "Tick",
    "accepted_results",
    "check_tick_order",
    "deadline_boot_ns",
    "free_port",
    "grant_as_cp",
    "grant_request",
    "kill_pids",
    "leftovers",
    "log_events",
    "marked_pids",
    "read_ticks",
    "supervisor_pids",
    "supervisor_state",
    "task_pids",
    "tick_command",
    "ticks_of",
    "token_key",
    "wait_for",
    "wait_renewal",
    "wait_ticks",
]
