"""A mesh of real ``populi`` agents: the one builder of the tests that run real processes
(the virtual cluster is :func:`populi_peer.testing.cluster.open_virtual_cluster`).

``Mesh.create(root, gpu_nodes=[...], cpu_nodes=[...])`` inits a control plane ``cp`` (CPU
only), joins every other node with a single-use token of its own (the roles it grants per
node), starts each agent and waits until the control plane sees every node fresh (and every
GPU node's GPU allocatable). The joins and the agent starts run all at once. GPU nodes
replay an idle H100 capture (``POPULI_GPU_FIXTURE``); every node runs short kills (see
``EXEC_ENV``) and logs at debug (``LOG_ENV``: the access log), plus whatever ``env`` adds
for it; with ``remote`` the cluster gets remote execution and short leases, and any other
``settings`` with them: set before the nodes join (on loopback in one record, through the
operator API) and awaited on every node.

Where the agents run is the mesh's :class:`Host`: this machine's loopback by default; the
network-namespace lab (``tests/lab/agents.py``'s ``LabHost``) gives each node its own
namespace and address. Every agent is ended by its PID; whatever its tasks left is found by
the mark every task of these tests carries (``support.procs.leftovers``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.core.settings import defaults, parse_setting
from populi_peer.identity import Credential, Identity, load_identity
from populi_peer.store import Store
from support.contract import sync_hook
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
#: Tests read the agents' access log (``request`` lines) to prove which requests happened;
#: it is logged at debug.
LOG_ENV = {"POPULI_LOG__LEVEL": "debug"}
#: Gossip rounds once a second instead of the default 0.3 s: the same protocol, a third of
#: the signed exchanges (and debug access-log lines) on a machine that runs many agents.
GOSSIP_ENV = {"POPULI_GOSSIP__ROUND_INTERVAL_S": "1"}
#: What ``remote`` sets: remote execution on, with the short leases above.
REMOTE_SETTINGS: Mapping[str, object] = {
    "remote_exec_enabled": True,
    "max_lease_ttl_s": LEASE_TTL_S,
    "lease_expiry_margin_s": EXPIRY_MARGIN_S,
}
#: The roles a join token grants unless ``roles`` says otherwise (the CLI's default).
DEFAULT_ROLES = "worker,submit"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


#: Where :func:`free_port` looks first: below the kernel's ephemeral range.
FIXED_PORTS_FROM = 10_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where there is room:
    a node restarted on its port (its address in every other node's records) must find it
    free, and the kernel takes the local end of every outgoing connection from that range
    — a port picked there can be taken by any client of any test in between."""
    low = _ephemeral_low()
    if low - FIXED_PORTS_FROM >= 1000:
        pick = random.SystemRandom()
        for _ in range(100):
            port = pick.randrange(FIXED_PORTS_FROM, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
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


def identity_of(data_dir: Path) -> Identity:
    """The identity a data directory holds (keys, certificates, cluster), read without
    an agent (one may be running)."""
    store = Store.open(data_dir, readonly=True)
    try:
        return load_identity(data_dir, store)
    finally:
        store.close()


def credential_of(data_dir: Path, *, operator: bool = False) -> Credential:
    """The node key (or the operator key) a data directory holds: what anyone who can
    read that directory can sign with."""
    identity = identity_of(data_dir)
    if operator:
        assert identity.operator is not None, f"{data_dir} holds no operator credential"
        return identity.operator
    return identity.node_credential


def meta_of(data_dir: Path, key: str) -> str:
    """A fact of a data directory (its node id, its cluster id), read without an agent."""
    store = Store.open(data_dir, readonly=True)
    try:
        return store.require_meta(key)
    finally:
        store.close()


@contextmanager
def signed_client(
    ca: Path,
    url: str,
    node_id: str,
    credential: Credential | None,
    *,
    validate: bool = True,
    local_address: str | None = None,
    timeout: float = 30.0,
) -> Iterator[httpx.Client]:
    """A client of the node ``node_id`` at ``url`` over real TLS (the cluster CA ``ca``),
    signing as ``credential`` (unsigned with ``None``); with ``validate``, every answer is
    checked against the OpenAPI contract. (:meth:`Mesh.client` where this process reaches
    the node; the lab's callers inside a namespace otherwise.)"""
    transport = httpx.HTTPTransport(
        verify=client_context(ca), local_address=local_address, retries=0
    )
    with httpx.Client(
        base_url=url,
        transport=transport,
        auth=SignedAuth(credential, node_id, SystemClock()) if credential else None,
        event_hooks={"response": [sync_hook]} if validate else {},
        timeout=timeout,
    ) as client:
        yield client


def _setting(value: object) -> str:
    """A setting's value as ``populi settings set`` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
    #: Extra environment by node name (``"cp"`` included), for its agent and its CLI.
    env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

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
        roles: Mapping[str, str] | None = None,
        settings: Mapping[str, object] | None = None,
        env: Mapping[str, Mapping[str, str]] | None = None,
        init_args: Sequence[str] = (),
    ) -> Mesh:
        """:meth:`build` a new mesh; closed again if that fails."""
        mesh = cls(root, host=host or Host(), remote=remote, env=env or {})
        try:
            mesh.build(
                gpu_nodes, cpu_nodes=cpu_nodes, roles=roles, settings=settings, init_args=init_args
            )
        except BaseException:
            mesh.close()
            raise
        return mesh

    def build(
        self,
        gpu_nodes: Iterable[str] = (),
        *,
        cpu_nodes: Iterable[str] = (),
        roles: Mapping[str, str] | None = None,
        settings: Mapping[str, object] | None = None,
        init_args: Sequence[str] = (),
    ) -> None:
        """A control plane ``cp`` (CPU only) and the named nodes, all running, seen fresh
        by the control plane. ``roles`` maps a node to the roles its token grants
        (comma-separated; :data:`DEFAULT_ROLES` otherwise). The cluster settings (with
        ``remote``, :data:`REMOTE_SETTINGS` under ``settings``) are set once, before the
        nodes join, and awaited on every node. ``init_args`` go to ``populi init``."""
        cp = self.add("cp", gpu=False)
        init = self.cli(
            "cp",
            "init",
            "--cluster-name",
            "lab",
            "--listen",
            cp.listen,
            "--name",
            "cp",
            "--json",
            *init_args,
        )
        cp.node_id = json.loads(init.stdout)["node"]["id"]
        self.start("cp")
        changes = {**(REMOTE_SETTINGS if self.remote else {}), **(settings or {})}
        serial = self.set_settings(changes) if changes else 0
        joining = [self.add(name, gpu=True) for name in gpu_nodes]
        joining += [self.add(name, gpu=False) for name in cpu_nodes]
        tokens = self.mint_tokens([(roles or {}).get(n.name, DEFAULT_ROLES) for n in joining])
        self.cli_all(
            (n.name, ["join", token, "--listen", n.listen, "--name", n.name])
            for n, token in zip(joining, tokens, strict=True)
        )
        self.start(*(n.name for n in joining))
        self.wait_settings(serial)
        self.wait_settled()

    def add(self, name: str, *, gpu: bool) -> Node:
        env = {**EXEC_ENV, **LOG_ENV, **GOSSIP_ENV}
        if gpu:
            env["POPULI_GPU_FIXTURE"] = GPU_FIXTURE
            # Fresher hints (which GPUs the node itself runs tasks on) for placement.
            env["POPULI_GPU__REFRESH_S"] = "1"
        env.update(self.env.get(name, {}))
        node = Node(name, self.root / name, self.host.listen(name), env, gpu)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self, *names: str) -> float:
        """Start (or restart) the nodes' agents, all at once; returns how long until every
        one of them served."""
        started = time.monotonic()
        for name in names:
            node = self.nodes[name]
            node.agent = self.procs.start_agent(
                node.data_dir,
                env=node.env,
                wait=False,
                argv=lambda argv, name=name: self.host.argv(name, argv),
            )
        for name in names:
            node = self.nodes[name]
            assert node.agent is not None
            self.procs.wait_ready(node.agent, guard_s=60.0, health=self.host.reachable)
            if not node.listen.startswith(("0.0.0.0:", "[::]:")):
                # On a wildcard the node plans its URL from its interfaces (docs/wan.md).
                assert node.agent.url == f"https://{node.listen}", (name, node.agent.url)
            node.node_id = node.agent.node_id
        return time.monotonic() - started

    def stop(self, name: str, sig: int = signal.SIGTERM, *, timeout: float = 30.0) -> int:
        """Signal the node's agent (by its PID) and wait until it exits; its exit status."""
        agent = self.nodes[name].agent
        assert agent is not None, f"{name} never started"
        return self.procs.stop(agent, sig, timeout=timeout)

    def heal(self, *, kill_leftovers: bool = False) -> None:
        """The mesh as a test found it: a paused agent continues, a dead one starts again
        (with ``kill_leftovers``, then whatever their tasks left is ended), the lease TTL is
        :data:`LEASE_TTL_S` again, and :meth:`wait_settled`."""
        for node in self.nodes.values():
            if node.alive():
                os.kill(node.pid, signal.SIGCONT)
        dead = [name for name, node in self.nodes.items() if not node.alive()]
        if dead:
            print(f"healed: {', '.join(dead)} restarted in {self.start(*dead):.1f} s")
        if kill_leftovers:
            kill_pids(leftovers(self.root))
        if self.ttl_s != LEASE_TTL_S:
            self.settings(max_lease_ttl_s=str(LEASE_TTL_S))
        self.wait_settled()

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

    # -- the API (where this process reaches the agents) -----------------------------

    @contextmanager
    def client(
        self,
        to: str,
        credential: Credential | None,
        *,
        validate: bool = True,
        local_address: str | None = None,
    ) -> Iterator[httpx.Client]:
        """A client of node ``to`` over real TLS (the cluster CA), signing as ``credential``
        (unsigned with ``None``); with ``validate``, every answer is checked against the
        OpenAPI contract."""
        assert self.host.reachable, f"this process cannot reach {to}'s API"
        node = self.nodes[to]
        with signed_client(
            self.nodes["cp"].data_dir / "tls" / "ca.crt",
            f"https://{node.listen}",
            node.node_id,
            credential,
            validate=validate,
            local_address=local_address,
        ) as client:
            yield client

    def credential(self, name: str) -> Credential:
        """Node ``name``'s own key (``"operator"``: the operator's, which ``cp`` holds)."""
        if name == "operator":
            return credential_of(self.nodes["cp"].data_dir, operator=True)
        return credential_of(self.nodes[name].data_dir)

    @contextmanager
    def operator(self, to: str = "cp") -> Iterator[httpx.Client]:
        """:meth:`client` of ``to``, signing as the operator."""
        with self.client(to, self.credential("operator")) as client:
            yield client

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
        result = self._finish(self._spawn(name, [*args], after), timeout)
        if check:
            self._check(name, args, result)
        return result

    def cli_all(
        self, calls: Iterable[tuple[str, Sequence[str]]], *, timeout: float = 120.0
    ) -> list[subprocess.CompletedProcess[str]]:
        """Several ``populi`` commands (node name, arguments) run at once, each as
        :meth:`cli` runs it and checked; their results in the same order."""
        spawned = [(name, args, self._spawn(name, args)) for name, args in calls]
        results = [self._finish(proc, timeout) for _, _, proc in spawned]
        for (name, args, _), result in zip(spawned, results, strict=True):
            self._check(name, args, result)
        return results

    def _spawn(
        self, name: str, args: Sequence[str], after: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        node = self.nodes[name]
        argv = self.host.argv(name, [*POPULI, *args, "--data-dir", str(node.data_dir), *after])
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **node.env},
        )

    @staticmethod
    def _finish(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # by its PID, as subprocess.run does
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def _check(name: str, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise AssertionError(
                f"[{name}] populi {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.strip()[-1500:]}"
            )

    def mint_tokens(self, roles: Sequence[str]) -> list[str]:
        """Single-use join tokens, one for each entry of ``roles`` (the comma-separated
        roles it grants): through the operator API where this process reaches ``cp``, else
        ``populi token create`` on ``cp``, all at once."""
        if self.host.reachable:
            with self.operator() as op:
                answers = [
                    op.post("/v1/populi/admin/tokens", json={"ttl_s": 600, "roles": r.split(",")})
                    for r in roles
                ]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            return [str(a.json()["token"]) for a in answers]
        minted = self.cli_all(("cp", ["token", "create", "--roles", r, "--json"]) for r in roles)
        return [str(json.loads(m.stdout)["token"]) for m in minted]

    def settings(self, **changes: object) -> float:
        """Change cluster settings and wait until every running node holds the new record
        (it travels on heartbeat answers); returns how long that took."""
        return self.wait_settings(self.set_settings(changes))

    def set_settings(self, changes: Mapping[str, object]) -> int:
        """Change cluster settings on ``cp`` (values as ``populi settings set`` takes them,
        or typed): in one record through the operator API where this process reaches
        ``cp``, else ``populi settings set`` for each. Returns the (last) record's serial."""
        serial = 0
        if self.host.reachable:
            typed = {key: parse_setting(key, _setting(value)) for key, value in changes.items()}
            with self.operator() as op:
                answer = op.post("/v1/populi/admin/settings", json={"changes": typed})
            assert answer.status_code == 200, answer.text
            serial = int(answer.json()["settings"]["serial"])
        else:
            for key, value in changes.items():
                set_one = self.cli("cp", "settings", "set", key, _setting(value), "--json")
                serial = int(json.loads(set_one.stdout)["settings"]["serial"])
        if "max_lease_ttl_s" in changes:
            self.ttl_s = int(_setting(changes["max_lease_ttl_s"]))
        return serial

    def wait_settings(self, serial: int) -> float:
        """Wait until every running node holds settings record ``serial`` or a later one;
        returns how long that took."""
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

    def wait_task_ended(
        self, name: str, task_id: str, *, guard_s: float = 60.0
    ) -> tuple[dict[str, Any], float]:
        """Wait until the submitter ``name``'s record of the task is in a terminal state;
        returns that task (the record's ``task``) and how long it took."""
        return wait_for(
            f"task {task_id} ends at {name}",
            lambda: (t := self.task_record(name, task_id)["task"])["state"] in TERMINAL and t,
            guard_s=guard_s,
            every_s=0.2,
        )

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

    def wait_delivered(
        self, name: str, task_id: str, *, what: str = "the worker's result is delivered"
    ) -> tuple[list[dict[str, Any]], float]:
        """Wait until worker ``name`` delivered a result of the task to its submitter;
        returns its attempt rows so delivered and how long that took."""
        return wait_for(
            what,
            lambda: [
                r
                for r in self.worker_attempts(name)
                if r["task_id"] == task_id and r["delivered_ms"] is not None
            ],
            guard_s=60.0,
        )

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

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print every agent's log tail when the block fails (then the failure goes on)."""
        try:
            yield
        except BaseException:
            print(self.logs())
            raise


def give_issuers(mesh: Mesh, names: tuple[str, ...]) -> None:
    """Each voter makes its issuer key and request; the root's holder (``cp``, whose data
    directory still has the root key) signs it; the voter installs it and restarts, one at
    a time (runbooks/offline-root.md, "A new voter")."""
    for name in names:
        request, issued = mesh.root / f"{name}-request.pem", mesh.root / f"{name}-issuer.crt"
        mesh.cli(name, "ca", "request", "--out", str(request))
        mesh.cli("cp", "ca", "sign", str(request), "--out", str(issued))
        mesh.stop(name)
        mesh.cli(name, "ca", "install", str(issued))
        mesh.start(name)


def settled_leader(
    statuses: Mapping[str, Mapping[str, Any] | None], voters: Mapping[str, str]
) -> str | None:
    """The name of the leader that every voter's status (by name) names, once each answers
    and holds the settled set ``voters`` (node id -> name); ``None`` until then."""
    if any(
        s is None
        or {v["id"] for v in s["voters"]} != set(voters)
        or s.get("voters_settled") is not True
        for s in statuses.values()
    ):
        return None
    named = {s["leader"]["id"] if s and s["leader"] else None for s in statuses.values()}
    if len(named) != 1:
        return None
    return voters.get(named.pop() or "")


#: The election timings of a cluster (ADR 0019).
ELECTION_TIMINGS = (
    "election_heartbeat_s",
    "leader_lease_s",
    "election_lease_margin_s",
    "election_timeout_min_s",
    "election_timeout_max_s",
    "max_clock_drift_ppm",
)


def shipped_election_timings(mesh: Mesh, name: str) -> dict[str, Any]:
    """Node ``name``'s settings values, asserted to run the shipped election timings
    (a test of failover trades none of them, the lease margin least of all, for speed)."""
    out = mesh.cli(name, "settings", "show", "--json").stdout
    values: dict[str, Any] = json.loads(out)["settings"]["values"]
    shipped = defaults()
    assert {k: values[k] for k in ELECTION_TIMINGS} == {k: shipped[k] for k in ELECTION_TIMINGS}
    return values


__all__ = [
    "DEFAULT_ROLES",
    "ELECTION_TIMINGS",
    "EXEC_ENV",
    "EXPIRY_MARGIN_S",
    "GPU_FIXTURE",
    "LEASE_TTL_S",
    "REMOTE_SETTINGS",
    "STOP_MARGIN_S",
    "TERMINAL",
    "Host",
    "Mesh",
    "Node",
    "credential_of",
    "free_port",
    "give_issuers",
    "meta_of",
    "settled_leader",
    "shipped_election_timings",
    "signed_client",
]
