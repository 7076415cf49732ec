"""Helpers for the execution-plane end-to-end tests: a real mesh on loopback, the tick
protocol, and looks at what every process left behind (``/proc``, the agents' SQLite).

Everything here drives real ``populi`` processes; nothing of what runs is faked. The only
stand-in is the GPU: nodes replay an NVML capture (``POPULI_GPU_FIXTURE``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from populi_peer.selfexec import SUPERVISOR_VERB as _VERB
from support.procs import AgentProcess, Processes, populi

#: How the single file runs a supervisor (``populi _supervisor TASK_DIR``).
SUPERVISOR_VERB = _VERB.encode()

T = TypeVar("T")

GPU_FIXTURE = "h100-80gb-hbm3-idle.json"
#: Short leases keep fallbacks quick. The worker's stop margin must cover the kill grace
#: plus the kill latency plus drift over one TTL, and stay below two thirds of the TTL.
LEASE_TTL_S = 6
EXPIRY_MARGIN_S = 2
EXEC_ENV = {
    "POPULI_EXEC__STOP_MARGIN_S": "2",
    "POPULI_EXEC__KILL_GRACE_S": "1",
    "POPULI_EXEC__KILL_LATENCY_S": "0.5",
}
STOP_MARGIN_S = 2.0
#: Every task these tests start carries this variable, so that its processes can be
#: found in ``/proc`` without mistaking anybody else's for them.
MARK_NAME = "E2E_EXEC_MARK"
MARK = "m" + uuid.uuid4().hex
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")

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


# -- processes ----------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_state(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""


def marked_pids(needle: bytes) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``needle``."""
    out = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        if needle in _read(f"/proc/{pid}/environ").split(b"\0") and _stat_state(pid) not in (
            "Z",
            "",
        ):
            out.append(pid)
    return out


def task_pids(task_id: str) -> list[int]:
    return marked_pids(f"POPULI_TASK_ID={task_id}".encode())


def supervisor_pids(root: Path) -> list[int]:
    """Supervisors of task directories under ``root``."""
    out = []
    for pid in _pids():
        cmdline = _read(f"/proc/{pid}/cmdline").split(b"\0")
        supervisor = b"populi_peer.exec.supervisor" in cmdline or SUPERVISOR_VERB in cmdline
        if supervisor and any(arg.startswith(str(root).encode()) for arg in cmdline):
            if _stat_state(pid) not in ("Z", ""):
                out.append(pid)
    return out


def leftovers(root: Path) -> list[int]:
    return sorted(set(marked_pids(f"{MARK_NAME}={MARK}".encode())) | set(supervisor_pids(root)))


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# -- waiting ------------------------------------------------------------------------------


def wait_for(
    what: str, probe: Callable[[], T | None], *, guard_s: float = 60.0, every_s: float = 0.1
) -> tuple[T, float]:
    """Poll ``probe`` until it returns something truthy; returns it and how long it took."""
    started = time.monotonic()
    while True:
        value = probe()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > guard_s:
            raise AssertionError(f"{what}: not within {guard_s:.0f} s")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the mesh -----------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    data_dir: Path
    port: int
    env: dict[str, str]
    gpu: bool
    agent: AgentProcess | None = None
    node_id: str = ""
    #: How this node runs ``populi`` (None: this checkout); an upgrade changes it.
    command: list[str] | None = None

    @property
    def pid(self) -> int:
        assert self.agent is not None
        return int(self.agent.proc.pid)

    def alive(self) -> bool:
        return self.agent is not None and self.agent.proc.poll() is None

    def log(self) -> str:
        return self.agent.log() if self.agent is not None else ""

    def db(self) -> sqlite3.Connection:
        """A read-only look at the node's own database (WAL: readers never block it)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'populi.db'}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn


@dataclass
class Mesh:
    root: Path
    procs: Processes = field(default_factory=Processes)
    nodes: dict[str, Node] = field(default_factory=dict)
    #: Remote execution on. Off, the mesh itself never asks about leases either, so that
    #: a test can show that nothing did.
    remote: bool = True
    #: The cluster's max_lease_ttl_s as last set here.
    ttl_s: int = LEASE_TTL_S

    # -- building ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        gpu_nodes: Iterable[str],
        *,
        remote: bool = True,
        commands: dict[str, list[str]] | None = None,
    ) -> Mesh:
        """A control plane ``cp`` (CPU only) and the named GPU nodes, all running;
        ``commands`` says how a node runs ``populi`` where not this checkout."""
        mesh = cls(root, remote=remote)
        commands = commands or {}
        try:
            cp = mesh._add("cp", gpu=False, command=commands.get("cp"))
            result = populi(
                "init",
                "--cluster-name",
                "lab",
                "--data-dir",
                str(cp.data_dir),
                "--listen",
                f"127.0.0.1:{cp.port}",
                "--name",
                "cp",
                "--json",
                check=True,
                command=cp.command,
            )
            cp.node_id = json.loads(result.stdout)["node"]["id"]
            mesh.start("cp")
            for name in gpu_nodes:
                node = mesh._add(name, gpu=True, command=commands.get(name))
                token = json.loads(mesh.cli("cp", "token", "create", "--json").stdout)["token"]
                populi(
                    "join",
                    token,
                    "--data-dir",
                    str(node.data_dir),
                    "--listen",
                    f"127.0.0.1:{node.port}",
                    "--name",
                    name,
                    check=True,
                    command=node.command,
                )
                mesh.start(name)
            if remote:
                mesh.settings(
                    remote_exec_enabled="true",
                    max_lease_ttl_s=str(LEASE_TTL_S),
                    lease_expiry_margin_s=str(EXPIRY_MARGIN_S),
                )
            mesh.wait_settled()
        except BaseException:
            mesh.close()
            raise
        return mesh

    def _add(self, name: str, *, gpu: bool, command: list[str] | None = None) -> Node:
        env = dict(EXEC_ENV)
        if gpu:
            env["POPULI_GPU_FIXTURE"] = GPU_FIXTURE
            # Fresher hints (which GPUs the node itself runs tasks on) for placement.
            env["POPULI_GPU__REFRESH_S"] = "1"
        node = Node(name, self.root / name, free_port(), env, gpu, command=command)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self, name: str) -> float:
        """Start (or restart) the node's agent; returns how long it took to answer."""
        node = self.nodes[name]
        started = time.monotonic()
        node.agent = self.procs.start_agent(
            node.data_dir, env=node.env, guard_s=60.0, command=node.command
        )
        node.node_id = node.agent.node_id
        return time.monotonic() - started

    def close(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                try:
                    os.kill(node.pid, signal.SIGCONT)
                except OSError:
                    pass
        self.procs.cleanup()
        kill_pids(leftovers(self.root))

    # -- commands ---------------------------------------------------------------------

    def cli(self, name: str, *args: str, check: bool = True, timeout: float = 120.0) -> Any:
        node = self.nodes[name]
        return populi(
            *args,
            "--data-dir",
            str(node.data_dir),
            check=check,
            timeout=timeout,
            command=node.command,
        )

    def settings(self, **changes: str) -> float:
        """Change cluster settings and wait until every running node holds the new record
        (it travels on heartbeat answers); returns how long that took."""
        serial = 0
        for key, value in changes.items():
            answer = json.loads(self.cli("cp", "settings", "set", key, value, "--json").stdout)
            serial = int(answer["settings"]["serial"])
            if key == "max_lease_ttl_s":
                self.ttl_s = int(value)
        _, took = wait_for(
            f"settings serial {serial} reaches every node",
            lambda: all(
                self.settings_serial(name) >= serial
                for name, node in self.nodes.items()
                if node.alive()
            ),
            guard_s=60.0,
        )
        return took

    def settings_serial(self, name: str) -> int:
        conn = self.nodes[name].db()
        try:
            row = conn.execute(
                "SELECT serial FROM cluster_records WHERE kind = 'settings'"
            ).fetchone()
        finally:
            conn.close()
        return int(row["serial"]) if row else 0

    def task_record(self, name: str, task_id: str) -> dict[str, Any]:
        """The submitter's durable task record, read from its database (cheap to poll)."""
        conn = self.nodes[name].db()
        try:
            row = conn.execute("SELECT body FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        finally:
            conn.close()
        assert row is not None, f"no task {task_id} on {name}"
        return dict(json.loads(row["body"]))

    def wait_cli(self, name: str, *task_ids: str, guard_s: float = 120.0) -> Any:
        """``populi task wait ID...``: returns the finished process (exit status, JSON)."""
        return self.cli(
            name,
            "task",
            "wait",
            *task_ids,
            "--timeout",
            f"{int(guard_s)}s",
            "--json",
            check=False,
            timeout=guard_s + 30,
        )

    def run_detached(self, name: str, *args: str) -> str:
        # The command after ``--`` takes the rest of the line: --data-dir goes first.
        node = self.nodes[name]
        result = populi(
            "run",
            "--detach",
            "--data-dir",
            str(node.data_dir),
            *args,
            check=True,
            command=node.command,
        )
        task_id = str(result.stdout).strip()
        assert task_id.startswith("t-"), result.stdout
        return task_id

    def show(self, name: str, task_id: str) -> dict[str, Any]:
        return dict(json.loads(self.cli(name, "task", "show", task_id, "--json").stdout))

    def leases(self, **filters: str) -> list[dict[str, Any]]:
        args = [f"--{k}={v}" for k, v in filters.items()]
        return list(json.loads(self.cli("cp", "leases", "--json", *args).stdout)["leases"])

    def gpus_view(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("cp", "gpus", "--json").stdout)["nodes"])

    def holding_leases(self) -> list[dict[str, Any]]:
        """Leases still held (live or revoking), from the control plane's own database,
        where every lease change is written before it takes effect (cheap to poll)."""
        conn = self.nodes["cp"].db()
        try:
            rows = conn.execute(
                "SELECT body FROM leases WHERE state IN ('live', 'revoking')"
            ).fetchall()
        finally:
            conn.close()
        return [json.loads(row["body"]) for row in rows]

    def lease_record(self, lease_id: str) -> dict[str, Any]:
        conn = self.nodes["cp"].db()
        try:
            row = conn.execute("SELECT body FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        finally:
            conn.close()
        assert row is not None, f"no lease {lease_id}"
        return dict(json.loads(row["body"]))

    def wait_settled(self, *, guard_s: float = 90.0) -> float:
        """The state each test starts from: no lease still held, and the control plane
        sees every node fresh with its GPU allocatable (placement reads those hints, which
        lag a finished task by a GPU refresh and a heartbeat)."""

        def fresh() -> bool:
            view = {n["name"]: n for n in self.gpus_view()}
            if set(view) != set(self.nodes):
                return False
            for name, node in self.nodes.items():
                if view[name]["heartbeat_stale"]:
                    return False
                if node.gpu and not any(d.get("allocatable") for d in view[name]["devices"]):
                    return False
            return True

        started = time.monotonic()
        if self.remote:
            wait_for("no lease held", lambda: not self.holding_leases(), guard_s=guard_s)
        wait_for("every node fresh", fresh, guard_s=guard_s, every_s=0.3)
        return time.monotonic() - started

    # -- looks inside -----------------------------------------------------------------

    def worker_attempts(self, name: str) -> list[dict[str, Any]]:
        conn = self.nodes[name].db()
        try:
            rows = conn.execute("SELECT * FROM attempts WHERE role = 'worker'").fetchall()
        finally:
            conn.close()
        return [dict(row) for row in rows]

    def task_dir(self, name: str, role: str, task_id: str, attempt: int) -> Path:
        return self.nodes[name].data_dir / "tasks" / role / task_id / str(attempt)


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


def supervisor_state(task_dir: Path) -> dict[str, Any]:
    return dict(json.loads((task_dir / "state.json").read_text()))


def accepted_results(task: dict[str, Any]) -> list[list[Any]]:
    """The task's decision-log rows of accepted results (stale ones are ``stale_result``)."""
    return [r for r in task["reasons"] if r[1] == "result"]
