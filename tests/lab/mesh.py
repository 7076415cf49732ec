"""Real agents in the network-namespace lab: a :class:`LabMesh` runs ``populi`` (agents
and CLI alike) inside each host's namespace, each agent listening on its lab address
(``--listen 10.77.0.X:7431``). Short leases as in ``tests/e2e/test_exec_e2e.py``: TTL 6 s,
expiry margin 2 s, worker stop margin 2 s, kill grace 1 s, kill latency 0.5 s. Every host
but ``cp`` replays an idle H100.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.exec_support import (
    EXEC_ENV,
    EXPIRY_MARGIN_S,
    GPU_FIXTURE,
    LEASE_TTL_S,
    kill_pids,
    leftovers,
    wait_for,
)
from lab.netns import Lab

from support.procs import POPULI, AgentProcess, Processes

PORT = 7431
GUARD_S = 60.0


@dataclass
class LabNode:
    name: str
    data_dir: Path
    env: dict[str, str]
    agent: AgentProcess | None = None
    node_id: str = ""

    def db_query(self, sql: str, *args: Any) -> list[Any]:
        """A read-only look at the node's own SQLite (WAL: readers never block it)."""
        import sqlite3

        conn = sqlite3.connect(f"file:{self.data_dir / 'populi.db'}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def log_tail(self, chars: int = 3000) -> str:
        return self.agent.log()[-chars:] if self.agent is not None else "(not started)"


class LabMesh:
    """Agents and CLI calls inside the lab's namespaces; every agent ends by its PID."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.procs = Processes()
        self.nodes: dict[str, LabNode] = {}
        for name in lab.names:
            env = dict(EXEC_ENV)
            if name != "cp":
                env["POPULI_GPU_FIXTURE"] = GPU_FIXTURE
                env["POPULI_GPU__REFRESH_S"] = "1"
            self.nodes[name] = LabNode(name, root / name, env)

    def __getitem__(self, name: str) -> LabNode:
        return self.nodes[name]

    def listen(self, name: str) -> str:
        return f"{self.lab.ip(name)}:{PORT}"

    def cli(
        self, name: str, *args: str, after: tuple[str, ...] = (), timeout: float = 120.0
    ) -> str:
        """``populi ARGS --data-dir D AFTER`` inside ``name``'s namespace; returns stdout.
        (``AFTER`` for ``run``: the command after ``--`` takes the rest of the line.)"""
        node = self.nodes[name]
        argv = self.lab.argv(name, *POPULI, *args, "--data-dir", str(node.data_dir), *after)
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **node.env},
        )
        if result.returncode != 0:
            raise AssertionError(
                f"[{name}] populi {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.strip()[-1500:]}"
            )
        return result.stdout

    def start(self, name: str) -> float:
        """Start ``name``'s agent in its namespace; wait until it serves (it writes its
        runtime file once the API is bound). Returns how long that took."""
        node = self.nodes[name]
        log_path = self.root / f"{name}.agent.log"
        runtime = node.data_dir / "run" / "agent.json"
        runtime.unlink(missing_ok=True)
        started = time.monotonic()
        with log_path.open("ab") as handle:
            proc = subprocess.Popen(
                self.lab.argv(name, *POPULI, "agent", "--data-dir", str(node.data_dir)),
                stdout=handle,
                stderr=handle,
                env={**os.environ, **node.env},
            )
        # ``ip netns exec`` execs the agent: the PID is the agent's own.
        node.agent = AgentProcess(data_dir=node.data_dir, proc=proc, log_path=log_path)
        self.procs.started.append(node.agent)

        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"{name}'s agent exited {proc.returncode}: {node.log_tail()}")
            try:
                info = json.loads(runtime.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None

        info, _ = wait_for(f"{name}'s agent serves", ready, guard_s=GUARD_S, every_s=0.05)
        assert info["url"] == f"https://{self.listen(name)}", info
        node.agent.url, node.agent.node_id = info["url"], info["node_id"]
        node.node_id = info["node_id"]
        return time.monotonic() - started

    def settings_serial(self, name: str) -> int:
        rows = self.nodes[name].db_query(
            "SELECT serial FROM cluster_records WHERE kind = 'settings'"
        )
        return int(rows[0]["serial"]) if rows else 0

    def task_record(self, name: str, task_id: str) -> dict[str, Any]:
        rows = self.nodes[name].db_query("SELECT body FROM tasks WHERE task_id = ?", task_id)
        assert rows, f"no task {task_id} on {name}"
        return dict(json.loads(rows[0]["body"]))

    def lease_record(self, lease_id: str) -> dict[str, Any]:
        rows = self.nodes["cp"].db_query("SELECT body FROM leases WHERE lease_id = ?", lease_id)
        assert rows, f"no lease {lease_id} on cp"
        return dict(json.loads(rows[0]["body"]))

    def worker_attempt(self, name: str, task_id: str, attempt: int) -> dict[str, Any] | None:
        rows = self.nodes[name].db_query(
            "SELECT * FROM attempts WHERE task_id = ? AND attempt = ? AND role = 'worker'",
            task_id,
            attempt,
        )
        return dict(rows[0]) if rows else None

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}'s agent log (tail)\n{x.log_tail()}" for n, x in self.nodes.items()
        )

    def close(self) -> None:
        """End the agents (SIGTERM, then SIGKILL) and whatever they left (task processes
        by their mark, supervisors by their task directory), each by its PID."""
        for agent in self.procs.started:
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.procs.started:
            try:
                agent.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.procs.cleanup()  # SIGKILL by PID whatever is still there
        kill_pids(leftovers(self.root))  # supervisors and tasks outlive their agent
        try:
            wait_for("task processes gone", lambda: not leftovers(self.root), guard_s=10)
        except AssertionError:
            kill_pids(leftovers(self.root))


def build_cluster(mesh: LabMesh, joiners: tuple[str, ...] = ("wa", "wb")) -> None:
    """``cp`` inits and runs the cluster with remote execution on and short leases; the
    ``joiners`` join with single-use tokens; each node holds the settings."""
    cp = mesh["cp"]
    init = json.loads(
        mesh.cli(
            "cp",
            "init",
            "--cluster-name",
            "lab",
            "--listen",
            mesh.listen("cp"),
            "--name",
            "cp",
            "--json",
        )
    )
    cp.node_id = init["node"]["id"]
    took = mesh.start("cp")
    print(f"\ncp up in {took:.1f} s")
    serial = 0
    for key, value in (
        ("remote_exec_enabled", "true"),
        ("max_lease_ttl_s", str(LEASE_TTL_S)),
        ("lease_expiry_margin_s", str(EXPIRY_MARGIN_S)),
    ):
        answer = json.loads(mesh.cli("cp", "settings", "set", key, value, "--json"))
        serial = int(answer["settings"]["serial"])
    for name in joiners:
        token = json.loads(mesh.cli("cp", "token", "create", "--json"))["token"]
        mesh.cli(name, "join", token, "--listen", mesh.listen(name), "--name", name)
        took = mesh.start(name)
        print(f"{name} joined and up in {took:.1f} s")
    _, took = wait_for(
        f"settings serial {serial} on every node",
        lambda: all(mesh.settings_serial(n) >= serial for n in ("cp", *joiners)),
        guard_s=GUARD_S,
    )
    print(f"settings on every node after {took:.1f} s")


__all__ = ["GUARD_S", "PORT", "LabMesh", "LabNode", "build_cluster"]
