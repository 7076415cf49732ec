"""A mesh of real ``populi`` agents: the one builder of the tests that run real processes
(the virtual cluster is :func:`populi_peer.testing.cluster.open_virtual_cluster`).

``Mesh.create(root, gpu_nodes=[...], cpu_nodes=[...])`` inits a control plane ``cp`` (CPU
only), joins every other node with a single-use token, starts each agent and waits until
the control plane sees every node fresh (and every GPU node's GPU allocatable). GPU nodes
replay an idle H100 capture (``POPULI_GPU_FIXTURE``); every node runs short kills (see
``EXEC_ENV``), and with ``remote`` the cluster gets remote execution and short leases.

Where the agents run is the mesh's :class:`Host`: this machine's loopback by default; the
network-namespace lab (``tests/lab``) gives each node its own namespace and address.
Every agent is ended by its PID; whatever its tasks left is found by the mark every task
of these tests carries (``support.procs.leftovers``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.procs import POPULI, AgentProcess, Processes, kill_pids, leftovers
from support.waiting import settle, wait_for

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Host:
    """Where a mesh's processes run: here, each agent on a free loopback port."""

    #: Whether this process can reach the agents' API (to ask for their health).
    reachable = True

    def listen(self, name: str) -> str:
        return f"127.0.0.1:{free_port()}"

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """How to run ``argv`` as node ``name`` (here: as it is)."""
        return list(argv)


@dataclass
class Node:
    name: str
    data_dir: Path
    listen: str
    env: dict[str, str]
    gpu: bool
    agent: AgentProcess | None = None
    node_id: str = ""

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

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

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


@dataclass
class Mesh:
    root: Path
    host: Host = field(default_factory=Host)
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
        gpu_nodes: Iterable[str] = (),
        *,
        cpu_nodes: Iterable[str] = (),
        remote: bool = True,
        host: Host | None = None,
    ) -> Mesh:
        """:meth:`build` a new mesh; closed again if that fails."""
        mesh = cls(root, host=host or Host(), remote=remote)
        try:
            mesh.build(gpu_nodes, cpu_nodes=cpu_nodes)
        except BaseException:
            mesh.close()
            raise
        return mesh

    def build(self, gpu_nodes: Iterable[str] = (), *, cpu_nodes: Iterable[str] = ()) -> None:
        """A control plane ``cp`` (CPU only) and the named nodes, all running, seen fresh
        by the control plane; with ``remote``, remote execution on with short leases."""
        cp = self.add("cp", gpu=False)
        init = self.cli(
            "cp", "init", "--cluster-name", "lab", "--listen", cp.listen, "--name", "cp", "--json"
        )
        cp.node_id = json.loads(init.stdout)["node"]["id"]
        self.start("cp")
        joining = [(name, True) for name in gpu_nodes] + [(name, False) for name in cpu_nodes]
        for name, gpu in joining:
            node = self.add(name, gpu=gpu)
            token = json.loads(self.cli("cp", "token", "create", "--json").stdout)["token"]
            self.cli(name, "join", token, "--listen", node.listen, "--name", name)
            self.start(name)
        if self.remote:
            self.settings(
                remote_exec_enabled="true",
                max_lease_ttl_s=str(LEASE_TTL_S),
                lease_expiry_margin_s=str(EXPIRY_MARGIN_S),
            )
        self.wait_settled()

    def add(self, name: str, *, gpu: bool) -> Node:
        env = dict(EXEC_ENV)
        if gpu:
            env["POPULI_GPU_FIXTURE"] = GPU_FIXTURE
            # Fresher hints (which GPUs the node itself runs tasks on) for placement.
            env["POPULI_GPU__REFRESH_S"] = "1"
        node = Node(name, self.root / name, self.host.listen(name), env, gpu)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self, name: str) -> float:
        """Start (or restart) the node's agent; returns how long it took to serve."""
        node = self.nodes[name]
        started = time.monotonic()
        node.agent = self.procs.start_agent(
            node.data_dir,
            env=node.env,
            guard_s=60.0,
            argv=lambda argv: self.host.argv(name, argv),
            health=self.host.reachable,
        )
        node.node_id = node.agent.node_id
        return time.monotonic() - started

    def close(self) -> None:
        """End the agents (SIGCONT for a paused one, SIGTERM, then SIGKILL) and whatever
        their tasks left (by their mark, supervisors by their task directory), each by
        its PID."""
        for node in self.nodes.values():
            if node.alive():
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.kill(node.pid, sig)
                    except OSError:
                        pass
        for agent in self.procs.started:
            try:
                agent.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.procs.cleanup()  # SIGKILL by PID whatever is still there
        kill_pids(leftovers(self.root))  # supervisors and tasks outlive their agent
        if not settle(lambda: not leftovers(self.root), guard_s=10):
            kill_pids(leftovers(self.root))

    # -- commands ---------------------------------------------------------------------

    def cli(
        self,
        name: str,
        *args: str,
        after: Sequence[str] = (),
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """``populi ARGS --data-dir D AFTER`` as node ``name`` (its host, its environment).
        (``AFTER`` for ``run``: the command after ``--`` takes the rest of the line.)"""
        node = self.nodes[name]
        argv = self.host.argv(name, [*POPULI, *args, "--data-dir", str(node.data_dir), *after])
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **node.env}
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"[{name}] populi {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.strip()[-1500:]}"
            )
        return result

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
        task_id = self.cli(name, "run", "--detach", after=args).stdout.strip()
        assert task_id.startswith("t-"), task_id
        return task_id

    def show(self, name: str, task_id: str) -> dict[str, Any]:
        return dict(json.loads(self.cli(name, "task", "show", task_id, "--json").stdout))

    def leases(self, **filters: str) -> list[dict[str, Any]]:
        args = [f"--{k}={v}" for k, v in filters.items()]
        return list(json.loads(self.cli("cp", "leases", "--json", *args).stdout)["leases"])

    def gpus_view(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("cp", "gpus", "--json").stdout)["nodes"])

    def nodes_view(self) -> dict[str, dict[str, Any]]:
        """``populi nodes --json`` on the control plane, by node name."""
        answer = json.loads(self.cli("cp", "nodes", "--json").stdout)
        return {node["name"]: node for node in answer["nodes"]}

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

    # -- looks inside (each node's own SQLite, cheap to poll) -------------------------

    def settings_serial(self, name: str) -> int:
        rows = self.nodes[name].query("SELECT serial FROM cluster_records WHERE kind = 'settings'")
        return int(rows[0]["serial"]) if rows else 0

    def task_record(self, name: str, task_id: str) -> dict[str, Any]:
        """The submitter's durable task record."""
        rows = self.nodes[name].query("SELECT body FROM tasks WHERE task_id = ?", task_id)
        assert rows, f"no task {task_id} on {name}"
        return dict(json.loads(rows[0]["body"]))

    def holding_leases(self) -> list[dict[str, Any]]:
        """Leases still held (live or revoking), from the control plane's own database,
        where every lease change is written before it takes effect."""
        rows = self.nodes["cp"].query("SELECT body FROM leases WHERE state IN ('live', 'revoking')")
        return [json.loads(row["body"]) for row in rows]

    def lease_record(self, lease_id: str) -> dict[str, Any]:
        rows = self.nodes["cp"].query("SELECT body FROM leases WHERE lease_id = ?", lease_id)
        assert rows, f"no lease {lease_id}"
        return dict(json.loads(rows[0]["body"]))

    def worker_attempts(self, name: str) -> list[dict[str, Any]]:
        rows = self.nodes[name].query("SELECT * FROM attempts WHERE role = 'worker'")
        return [dict(row) for row in rows]

    def worker_attempt(self, name: str, task_id: str, attempt: int) -> dict[str, Any] | None:
        rows = self.nodes[name].query(
            "SELECT * FROM attempts WHERE task_id = ? AND attempt = ? AND role = 'worker'",
            task_id,
            attempt,
        )
        return dict(rows[0]) if rows else None

    def task_dir(self, name: str, role: str, task_id: str, attempt: int) -> Path:
        return self.nodes[name].data_dir / "tasks" / role / task_id / str(attempt)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {name}'s agent log (tail)\n{node.log()[-chars:]}"
            for name, node in self.nodes.items()
        )


__all__ = [
    "EXEC_ENV",
    "EXPIRY_MARGIN_S",
    "GPU_FIXTURE",
    "LEASE_TTL_S",
    "STOP_MARGIN_S",
    "Host",
    "Mesh",
    "Node",
    "free_port",
]
