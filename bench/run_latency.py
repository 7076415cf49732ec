"""Round trip of a remote ``true``: ``populi run --node W -- true`` on a real three-node mesh
(control plane, submitter, worker), against a local ``true`` and ``ssh localhost true``.
Prints figures; never passes or fails on them.

    python bench/run_latency.py [--runs 20]

How it works:

- A fresh cluster in a temporary folder: the control plane (started as
  ``bench/heartbeat_capacity.py`` starts it, whose helpers this script imports), then a
  submitter and a worker that join with name-bound tokens and run their own ``populi
  agent``; ``remote_exec_enabled`` is set to true before they start. Every agent logs at
  warning level; timings are the defaults (lease TTL 30 s).
- Each row is one command, measured as a whole: wall time from just before the process is
  started to its exit (monotonic clock), ``--runs`` times after ``--warmup`` unmeasured
  runs, the rows taken in turn so that other load on the machine hits them alike. A
  ``populi run`` must exit 0; afterwards the submitter's task list must show every measured
  remote run as succeeded on the worker (and every pinned-local one on the submitter).
- ``ssh localhost true`` runs only if ``ssh`` is installed and a password-less login works
  (``BatchMode=yes``); otherwise the row says why it is skipped. Nothing is installed or
  configured for it.
- "in agent" submits the same task through the submitter's API (``POST
  /v1/populi/tasks``) and waits for its end (``GET /v1/populi/tasks/{id}?wait_s=30``) on
  one kept-alive signed HTTPS connection from this process: the mesh's own latency,
  without the CLI's interpreter start-up, its output polling and its fresh connections.
  Its phases come from the task record (wall-clock ms on this one machine): placement and
  grant, hand-off until the command started on the worker, the command itself, and from
  its exit until the submitter recorded the result.
- Rows that split the rest: ``populi --version`` (interpreter and the CLI's first imports,
  no request); ``populi tasks --limit 1`` (a CLI command that makes one request to its
  agent); one signed request from this process on a fresh client and TLS connection (as
  every request of the CLI is made) and on a kept-alive one; and ``true`` under a real
  per-task supervisor started from this process (``populi_peer.exec.start_supervised``,
  as an attempt starts it), until it runs and until its exit is seen.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ``python bench/run_latency.py`` puts bench/ first on sys.path: the heartbeat benchmark's
# process ownership and control-plane start are shared, not copied.
import heartbeat_capacity as hb
import httpx
import trio

from populi_peer import __version__
from populi_peer.api.client import SyncPeerClient
from populi_peer.api.tls import client_context, peer_context
from populi_peer.cli.common import open_local
from populi_peer.clock import SystemClock, boot_time
from populi_peer.core.messages import TaskListAnswer
from populi_peer.errors import PopuliError
from populi_peer.exec import TaskSpec, build_task_env, start_supervised

GUARD_S = 60.0
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def _populi_cli() -> list[str]:
    """The ``populi`` a user runs: the console script next to this interpreter."""
    script = Path(sys.executable).parent / "populi"
    return [str(script)] if script.exists() else [*hb.POPULI]


@dataclass
class Node:
    name: str
    data_dir: Path
    url: str = ""
    node_id: str = ""
    proc: subprocess.Popen[Any] | None = None


@dataclass
class Series:
    label: str
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    def p99(self) -> float:
        return hb._pct(sorted(self.seconds), 0.99)


class Mesh(hb.Bench):
    """The heartbeat benchmark's control plane and process ownership, plus joined nodes."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, prefix="populi-run-bench-")
        self.env = {**os.environ, "POPULI_LOG__LEVEL": "warning"}

    def populi(self, *argv: str) -> str:
        out = subprocess.run(
            [*hb.POPULI, *argv],
            capture_output=True,
            text=True,
            timeout=GUARD_S,
            env=self.env,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"populi {argv[0]} exited {out.returncode}: {out.stderr[-500:]}")
        return out.stdout

    def join(self, name: str) -> Node:
        node = Node(name, self.root / name)
        answer = json.loads(
            self.populi(
                "token", "create", "--name", name, "--data-dir", str(self.data_dir), "--json"
            )
        )
        self.populi(
            "join",
            answer["token"],
            "--data-dir",
            str(node.data_dir),
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
        )
        log = (self.root / f"{name}.log").open("wb")
        node.proc = self._spawn(
            [*hb.POPULI, "agent", "--data-dir", str(node.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        runtime = node.data_dir / "run" / "agent.json"
        context = client_context(node.data_dir / "tls" / "ca.crt")
        deadline = time.monotonic() + GUARD_S
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"agent {name} exited: {self.log_tail(name)}")
            with contextlib.suppress(OSError, ValueError, KeyError, httpx.HTTPError):
                info = json.loads(runtime.read_text())
                if info["pid"] == node.proc.pid:
                    node.url, node.node_id = info["url"], info["node_id"]
                    if httpx.get(
                        node.url + "/v1/populi/health", verify=context, timeout=1
                    ).is_success:
                        return node
            time.sleep(0.05)
        raise RuntimeError(f"agent {name} did not answer health within {GUARD_S:.0f} s")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Api:
    """The submitter's own API on one kept-alive connection, signed as the CLI signs."""

    def __init__(self, node: Node) -> None:
        self.local = open_local(argparse.Namespace(data_dir=node.data_dir))
        info = self.local.runtime()
        self.url, self.node_id = info.url, info.node_id
        self.client = SyncPeerClient(
            credential=self.local.identity.cli_credential,
            clock=SystemClock(),
            verify=peer_context(self.local.identity.paths.ca_cert),
            timeout_s=GUARD_S,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.client.call(
            url=self.url, node_id=self.node_id, method=method, path=path, **kwargs
        )

    def run(self, node: str) -> dict[str, Any]:
        """Submit ``true`` pinned to ``node`` and wait for its end; the final task."""
        task = self.call(
            "POST", "/v1/populi/tasks", payload={"command": ["true"], "gpus": 0, "node": node}
        )["task"]
        deadline = time.monotonic() + GUARD_S
        while task["state"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {task['task_id']} did not end within {GUARD_S:.0f} s")
            task = self.call(
                "GET",
                f"/v1/populi/tasks/{task['task_id']}",
                params={"wait_s": 30},
                timeout_s=45.0,
            )["task"]
        return dict(task)

    def close(self) -> None:
        self.client.close()
        self.local.close()


def _timed(argv: list[str], env: dict[str, str]) -> float:
    began = time.monotonic()
    out = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        timeout=GUARD_S,
        check=False,
    )
    took = time.monotonic() - began
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])} exited {out.returncode}: {out.stderr.decode(errors='replace')[-500:]}"
        )
    return took


def _supervised_true(folder: Path, index: int) -> tuple[float, float]:
    """``true`` under a real supervisor, as an attempt runs it (default stop margin and
    grace): (seconds until it runs, seconds until its exit is seen), from this process."""

    async def go() -> tuple[float, float]:
        task_id = f"t-supervised-{index}"
        work = folder / str(index) / "work"
        work.mkdir(parents=True)
        spec = TaskSpec(
            task_id=task_id,
            attempt=1,
            argv=("true",),
            env=build_task_env(
                base=None,
                passed={},
                task_id=task_id,
                attempt=1,
                fencing_token="1.1",
                cuda_visible_devices="",
            ),
            cwd=str(work),
            stop_margin_s=7.0,
            kill_grace_s=5.0,
        )
        began = time.monotonic()
        execution = await start_supervised(folder / str(index), spec, boot_time() + 30.0)
        running = time.monotonic()
        outcome = await execution.wait()
        ended = time.monotonic()
        if outcome.exit_code != 0:
            raise RuntimeError(f"supervised true ended {outcome}")
        with trio.move_on_after(GUARD_S):  # it exits right after its final write
            while execution.alive():  # noqa: ASYNC110 - /proc has no event to wait on
                await trio.sleep(0.01)
        if execution.alive():
            raise RuntimeError(f"supervisor {execution.supervisor_pid} did not exit")
        return running - began, ended - began

    return trio.run(go)


def _ssh_argv() -> tuple[list[str] | None, str]:
    ssh = shutil.which("ssh")
    if ssh is None:
        return None, "skipped: no ssh client installed"
    argv = [ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "localhost", "true"]
    try:
        probe = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        return None, "skipped: ssh localhost did not answer within 15 s"
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return None, f"skipped: ssh localhost true failed ({why[-1] if why else probe.returncode})"
    return argv, ""


@dataclass
class Phases:
    placed: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    ran: list[float] = field(default_factory=list)
    reported: list[float] = field(default_factory=list)
    api: list[float] = field(default_factory=list)

    def add(self, task: dict[str, Any], measured_s: float) -> None:
        attempt = task["attempts"][0]
        result = task["results"]["1"]
        created, placed = task["created_wall_ms"], attempt["started_wall_ms"]
        began, stopped = result["started_wall_ms"], result["stopped_wall_ms"]
        finished = task["finished_wall_ms"]
        self.placed.append((placed - created) / 1000)
        self.started.append((began - placed) / 1000)
        self.ran.append((stopped - began) / 1000)
        self.reported.append((finished - stopped) / 1000)
        self.api.append(measured_s - (finished - created) / 1000)


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f}" if values else "       -"


def run(args: argparse.Namespace) -> None:
    mesh = Mesh(args)
    api: Api | None = None
    try:
        background = hb._background_busy()
        mesh.start_control_plane()
        mesh.populi(
            "settings", "set", "remote_exec_enabled", "true", "--data-dir", str(mesh.data_dir)
        )
        submitter = mesh.join("sub")
        worker = mesh.join("w")
        api = Api(submitter)
        # Ready when a pinned task really runs on the worker (its heartbeats are fresh and
        # the submitter has the settings that turn remote execution on).
        deadline = time.monotonic() + GUARD_S
        ready = [0, 0]  # readiness tasks that ran on the worker, on the submitter
        while True:
            try:
                task = api.run("w")
            except PopuliError as exc:  # the submitter may not know 'w' yet
                if time.monotonic() > deadline:
                    raise
                task = {"attempts": [], "error": str(exc)}
                time.sleep(0.5)
                continue
            remote = bool(task["attempts"]) and task["attempts"][0]["where"] == "remote"
            ready[0 if remote else 1] += 1
            if remote:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no remote placement within {GUARD_S:.0f} s: {task}")
            time.sleep(0.5)

        cli = _populi_cli()
        env = {**os.environ, "POPULI_LOG__LEVEL": "warning"}
        sub_dir = str(submitter.data_dir)
        ssh_argv, ssh_note = _ssh_argv()
        # (series, measure -> (seconds, the task for in-agent rows), phases of in-agent rows)
        rows: list[tuple[Series, Callable[[], tuple[float, Any]], Phases | None]] = []

        def command(label: str, argv: list[str]) -> None:
            rows.append((Series(label), lambda: (_timed(argv, env), None), None))

        def in_agent(label: str, node: str, where: str) -> None:
            assert api is not None

            def measure() -> tuple[float, Any]:
                began = time.monotonic()
                task = api.run(node)
                took = time.monotonic() - began
                attempt = task["attempts"][0]
                if task["state"] != "succeeded" or attempt["where"] != where:
                    raise RuntimeError(f"in-agent run on {node} ended {task['state']}: {attempt}")
                return took, task

            rows.append((Series(label), measure, Phases()))

        command("local: true (subprocess)", ["true"])
        ssh = Series("ssh localhost true", note=ssh_note)
        if ssh_argv is not None:
            command(ssh.label, ssh_argv)
        command("populi --version (CLI start-up)", [*cli, "--version"])
        command(
            "populi tasks --limit 1 (CLI + 1 request)",
            [*cli, "tasks", "--limit", "1", "--json", "--data-dir", sub_dir],
        )
        command(
            "populi run --node w -- true (remote)",
            [*cli, "run", "--node", "w", "--data-dir", sub_dir, "--", "true"],
        )
        command(
            "populi run --node sub -- true (pinned local)",
            [*cli, "run", "--node", "sub", "--data-dir", sub_dir, "--", "true"],
        )
        assert api is not None
        fresh = Series("1 request, fresh TLS connection (as the CLI)")
        kept = Series("1 request, kept-alive connection")

        def request(keep_alive: bool) -> Callable[[], tuple[float, Any]]:
            def measure() -> tuple[float, Any]:
                assert api is not None
                began = time.monotonic()
                if keep_alive:
                    api.call("GET", "/v1/populi/tasks", params={"limit": 1}, answer=TaskListAnswer)
                else:  # what every request of the CLI does: a new client, a new handshake
                    api.local.call_agent(
                        "GET", "/v1/populi/tasks", params={"limit": 1}, answer=TaskListAnswer
                    )
                return time.monotonic() - began, None

            return measure

        rows.append((fresh, request(False), None))
        rows.append((kept, request(True), None))
        in_agent("in agent: API submit + wait (remote)", "w", "remote")
        in_agent("in agent: API submit + wait (pinned local)", "sub", "local")
        supervised = Series("supervisor alone: start + wait (true)")
        supervised_start = Series("supervisor alone: start only")
        runs = itertools.count()

        def supervisor_alone() -> tuple[float, Any]:
            start_s, total_s = _supervised_true(mesh.root / "supervised", next(runs))
            supervised_start.seconds.append(start_s)
            return total_s, None

        rows.append((supervised, supervisor_alone, None))

        print(
            f"run latency: populi {__version__} on a 3-node mesh on loopback (control plane, "
            f"submitter 'sub', worker 'w'), {os.cpu_count()} CPU cores shared by all, real "
            "processes, signed HTTPS, agents logging at warning level, lease TTL 30 s"
        )
        print(
            f"python {sys.version.split()[0]}, trio {trio.__version__}, httpx {httpx.__version__}; "
            f"{args.runs} measured runs per row after {args.warmup} warm-up runs, rows taken "
            "in turn; wall time from process start to exit"
        )
        print(
            f"other load on this machine before the start: {background:.0f} % of all cores "
            "(it competes with every row)"
        )
        for index in range(args.warmup + args.runs):
            for series, measure, phases in rows:
                took, task = measure()
                if index >= args.warmup:
                    series.seconds.append(took)
                    if phases is not None:
                        phases.add(task, took)
        del supervised_start.seconds[: args.warmup]

        # Honesty: every populi run and API run ran where it was pinned, and succeeded.
        each = args.warmup + args.runs
        expected = {worker.node_id: 2 * each + ready[0], submitter.node_id: 2 * each + ready[1]}
        tasks = api.call("GET", "/v1/populi/tasks", params={"limit": 1000})["tasks"]
        found: dict[str, int] = {}
        for task in tasks:
            if task["state"] != "succeeded" or len(task["attempts"]) != 1:
                raise RuntimeError(f"task {task['task_id']} ended {task['state']}: {task}")
            node = task["attempts"][0]["node"]
            found[node] = found.get(node, 0) + 1
        if found != expected:
            raise RuntimeError(f"tasks by node: expected {expected}, found {found}")

        local = rows[0][0]
        ordered = [series for series, _, _ in rows]
        ordered.append(supervised_start)
        if ssh_argv is None:
            ordered.insert(1, ssh)
        print()
        print(f"{'':46} {'median ms':>10} {'p99 ms':>9} {'x local':>8} {'x local p99':>11}")
        for series in ordered:
            if not series.seconds:
                print(f"{series.label:46} {series.note}")
                continue
            print(
                f"{series.label:46} {series.median() * 1000:>10.1f} {series.p99() * 1000:>9.1f} "
                f"{series.median() / local.median():>8.0f} {series.p99() / local.p99():>11.0f}"
            )
        print()
        print(
            "in-agent phases, median ms (from the task record; ms resolution): placed = "
            "submit to lease granted (node list, GPU list, grant); started = hand-off to the "
            "command running under its supervisor (worker renewal first for remote); ran = "
            "the command; reported = its exit to the task's end at the submitter (supervisor "
            "poll, release, result delivery); API = the measured round trip minus all of that"
        )
        print(f"{'':28} {'placed':>8} {'started':>8} {'ran':>8} {'reported':>8} {'API':>8}")
        for series, _, phases in rows:
            if phases is None:
                continue
            label = "remote (worker w)" if series.label.endswith("(remote)") else "pinned local"
            print(
                f"{label:28} {_ms(phases.placed)} {_ms(phases.started)} {_ms(phases.ran)} "
                f"{_ms(phases.reported)} {_ms(phases.api)}"
            )
        cli_remote = next(s for s in ordered if s.label.startswith("populi run --node w"))
        remote_api = next(s for s in ordered if s.label == "in agent: API submit + wait (remote)")
        one_call = next(s for s in ordered if s.label.startswith("populi tasks"))
        rest = cli_remote.median() - one_call.median() - remote_api.median()
        print()
        print(
            f"populi run (remote), medians: {cli_remote.median() * 1000:.0f} ms = a CLI command "
            f"with one request {one_call.median() * 1000:.0f} ms + the mesh (in agent) "
            f"{remote_api.median() * 1000:.0f} ms + {rest * 1000:.0f} ms more of the CLI "
            "following the task (its further requests and its output polling every 0.3 s)"
        )
        print(
            "each request of the CLI opens its own client and TLS connection "
            f"(Local.call_agent): {fresh.median() * 1000:.1f} ms a request, against "
            f"{kept.median() * 1000:.1f} ms on a kept-alive connection (medians, from this "
            "process)"
        )
        print(
            f"supervisor alone: 'true' runs {supervised_start.median() * 1000:.0f} ms after "
            f"start_supervised is called, and its exit is seen "
            f"{(supervised.median() - supervised_start.median()) * 1000:.0f} ms later (medians)"
        )
        print(
            f"checked in the submitter's task list: {found[worker.node_id]} tasks succeeded on "
            f"the worker, {found[submitter.node_id]} on the submitter, each in one attempt, as "
            "pinned"
        )
    finally:
        if api is not None:
            api.close()
        mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured runs per row (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs per row first")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or 4 * (args.runs + args.warmup) > 900:
        # (the check afterwards reads the submitter's last 1000 tasks)
        parser.error("need --runs >= 1, --warmup >= 0 and --runs + --warmup <= 225")
    hb.run_interruptible(run, args)


if __name__ == "__main__":
    main()
