"""``populi demo``: a real mesh on this machine, end to end, then cleaned up.

Every node is a real ``populi agent`` process with its own temporary data directory, real
TLS and signed requests on loopback. The demo prints a timeline of what happened.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from populi_peer.cli.common import add_json, print_json
from populi_peer.errors import PopuliError, UsageError
from populi_peer.selfexec import child_env, populi_command, started_as

#: This very installation: the installed package, or the single file (its agents are
#: instances of their own, see populi_peer.selfexec).
POPULI = populi_command()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="start a real mesh on this machine, show it working, clean up"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the mesh running and print how to use it"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent folder for the demo's data directories (default: a new temp folder)",
    )
    parser.add_argument(
        "--guard",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up on any one step after this long (default 60)",
    )
    add_json(parser)
    parser.set_defaults(handler=run)


@dataclass
class Node:
    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    node_id: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Demo:
    root: Path
    guard_s: float
    quiet: bool
    started: float = field(default_factory=time.monotonic)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def say(self, event: str, **detail: Any) -> None:
        at = time.monotonic() - self.started
        self.timeline.append({"t_s": round(at, 3), "event": event, **detail})
        if not self.quiet:
            extra = "  ".join(f"{k}={v}" for k, v in detail.items())
            sys.stdout.write(f"[{at:7.2f}s] {event}{'  ' + extra if extra else ''}\n")
            sys.stdout.flush()

    def populi(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*POPULI, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=self.guard_s,
            env={**child_env(), **(env or {})},
        )
        if check and result.returncode != 0:
            raise PopuliError(
                f"demo step 'populi {args[0]}' failed (exit {result.returncode}): {result.stderr.strip()[:300]}"
            )
        return result

    def start_agent(self, node: Node, env: dict[str, str] | None = None) -> None:
        node.env = env or {}
        log = (self.root / f"{node.name}.log").open("ab")
        runtime = node.data_dir / "run" / "agent.json"
        runtime.unlink(missing_ok=True)
        node.proc = subprocess.Popen(
            [*POPULI, "agent", "--data-dir", str(node.data_dir)],
            stdout=log,
            stderr=log,
            # Three agents on one machine: each takes any free port for /metrics rather
            # than the default one, which only the first could bind.
            env={**child_env(), "POPULI_METRICS__LISTEN": "127.0.0.1:0", **(env or {})},
            start_new_session=True,
        )
        log.close()
        import httpx

        deadline = time.monotonic() + self.guard_s
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise PopuliError(
                    f"agent {node.name} exited with {node.proc.returncode}; see {self.root / (node.name + '.log')}"
                )
            try:
                info = json.loads(runtime.read_text())
            except (OSError, ValueError):
                info = None
            if info and started_as(int(info.get("pid") or 0), node.proc.pid):
                try:
                    response = httpx.get(info["url"] + "/v1/populi/health", verify=False, timeout=2)  # noqa: S501 - liveness only
                    if response.status_code == 200:
                        node.url, node.node_id = info["url"], info["node_id"]
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise PopuliError(f"agent {node.name} did not answer within {self.guard_s:.0f} s")

    def stop_agent(self, node: Node, sig: int = signal.SIGTERM) -> int | None:
        if node.proc is None or node.proc.poll() is not None:
            return None if node.proc is None else node.proc.returncode
        node.proc.send_signal(sig)
        try:
            return node.proc.wait(timeout=self.guard_s)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            return node.proc.wait(timeout=10)

    def cleanup(self) -> None:
        for node in self.nodes:
            self.stop_agent(node)


def run(args: argparse.Namespace) -> int:
    try:
        root = Path(tempfile.mkdtemp(prefix="populi-demo-", dir=args.dir))
    except OSError as exc:
        # A --dir that is missing or not writable: the user's input, not our failure.
        raise UsageError(f"--dir {args.dir}: {exc.strerror or exc}", code="bad_dir") from None
    demo = Demo(root=root, guard_s=args.guard, quiet=args.json)
    keep = False
    passed = False
    try:
        _scenario(demo)
        if args.keep:
            keep = True
            for node in demo.nodes:  # bring the killed worker back
                if node.proc is not None and node.proc.poll() is not None:
                    demo.start_agent(node, env=node.env)
            if not args.json:
                _print_keep(demo)
        if args.json:
            nodes = [
                {
                    "name": n.name,
                    "url": n.url,
                    "node_id": n.node_id,
                    "data_dir": str(n.data_dir),
                    "pid": n.proc.pid if n.proc else None,
                }
                for n in demo.nodes
            ]
            print_json(
                {
                    "ok": True,
                    "timeline": demo.timeline,
                    "root": str(root),
                    "kept": keep,
                    "nodes": nodes if keep else [],
                }
            )
        else:
            sys.stdout.write("demo finished: every step passed\n")
        passed = True
        return 0
    finally:
        if not keep:
            demo.cleanup()
            if passed:  # a failed demo keeps its logs: the error names one of them
                shutil.rmtree(root, ignore_errors=True)


TICK_SCRIPT = (
    "for i in $(seq 1 40); do "
    'echo "$POPULI_ATTEMPT $POPULI_FENCING_TOKEN $$ $(date +%s%N)" >> "$TICKS"; '
    'echo "tick $i attempt=$POPULI_ATTEMPT token=$POPULI_FENCING_TOKEN gpu=$CUDA_VISIBLE_DEVICES"; '
    "sleep 0.1; done"
)
#: Node config for the demo: short leases so the fallback shows within seconds.
WORKER_ENV = {
    "POPULI_EXEC__STOP_MARGIN_S": "2",
    "POPULI_EXEC__KILL_GRACE_S": "1",
    "POPULI_EXEC__KILL_LATENCY_S": "0.5",
    "POPULI_LOG__FORMAT": "text",
}
GPU_ENV = {**WORKER_ENV, "POPULI_GPU_FIXTURE": "h100-80gb-hbm3-idle.json"}


def _client(node: Node) -> Any:
    from populi_peer.cli.common import open_local

    return open_local(argparse.Namespace(data_dir=node.data_dir))


def _wait(demo: Demo, what: str, check: Any, poll_s: float = 0.2, describe: Any = None) -> Any:
    deadline = time.monotonic() + demo.guard_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    seen = f" (last seen: {describe()})" if describe is not None else ""
    raise PopuliError(f"demo: gave up waiting for {what} after {demo.guard_s:.0f} s{seen}")


def _scenario(demo: Demo) -> None:
    import httpx

    cp = Node("cp", demo.root / "cp")
    laptop = Node("gpu-a", demo.root / "gpu-a")
    worker = Node("gpu-b", demo.root / "gpu-b")
    demo.nodes += [cp, laptop, worker]
    out = json.loads(
        demo.populi(
            "init",
            "--cluster-name",
            "demo",
            "--data-dir",
            str(cp.data_dir),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "cp",
            "--json",
        ).stdout
    )
    demo.say("cluster created", cluster=out["cluster"]["id"], control_plane=out["node"]["id"])
    demo.start_agent(cp, env=WORKER_ENV)
    demo.say("control plane running (CPU only)", url=cp.url)

    unsigned = httpx.get(cp.url + "/v1/populi/status", verify=False, timeout=5)  # noqa: S501 - shows the refusal
    demo.say("unsigned request refused", status=unsigned.status_code)
    if unsigned.status_code != 401:
        raise PopuliError(f"an unsigned request got HTTP {unsigned.status_code}, expected 401")

    for key, value in (
        ("remote_exec_enabled", "true"),
        ("max_lease_ttl_s", "6"),
        ("lease_expiry_margin_s", "2"),
    ):
        demo.populi("settings", "set", key, value, "--data-dir", str(cp.data_dir))
    demo.say("remote execution enabled", max_lease_ttl_s=6, lease_expiry_margin_s=2)

    for node in (laptop, worker):
        token = json.loads(
            demo.populi(
                "token", "create", "--name", node.name, "--data-dir", str(cp.data_dir), "--json"
            ).stdout
        )["token"]
        demo.populi(
            "join",
            token,
            "--data-dir",
            str(node.data_dir),
            "--listen",
            "127.0.0.1:0",
            "--name",
            node.name,
        )
        demo.start_agent(node, env=GPU_ENV)
        demo.say(
            "node joined with a single-use token",
            node=node.name,
            id=node.node_id,
            gpu="replayed H100",
        )

    from populi_peer.core.messages import GpusAnswer, TaskAnswer

    local = _client(cp)
    try:

        def gpus_ready() -> Any:
            answer = local.call_control_plane("GET", "/v1/populi/gpus", answer=GpusAnswer)
            devices = {n.name: n.devices for n in answer.nodes}
            ready = all(
                devices.get(n.name) and devices[n.name][0].allocatable for n in (laptop, worker)
            )
            return devices if ready else None

        devices = _wait(demo, "verified GPUs on both nodes", gpus_ready)
    finally:
        local.close()
    uuids = {name: devs[0].uuid for name, devs in devices.items() if devs}
    demo.say("verified GPUs reported by heartbeat", **uuids)
    if uuids[laptop.name] == uuids[worker.name]:
        raise PopuliError("both replaying nodes show the same GPU UUID")

    ticks = demo.root / "ticks.log"
    task_id = demo.populi(
        "run",
        "--gpus",
        "1",
        "--class",
        "inference",
        "--node",
        worker.name,
        # The demo's point: when the worker dies, the task finishes here.
        "--node-fallback",
        "--env",
        f"TICKS={ticks}",
        "--detach",
        "--data-dir",
        str(laptop.data_dir),
        "--",
        "sh",
        "-c",
        TICK_SCRIPT,
    ).stdout.strip()
    demo.say("task submitted from gpu-a", task=task_id, command="populi run --gpus 1 -- <40 ticks>")
    submitter = _client(laptop)
    try:

        def task() -> dict[str, Any]:
            answer = submitter.call_agent("GET", f"/v1/populi/tasks/{task_id}", answer=TaskAnswer)
            return dict(answer.task.to_json())

        def describe() -> str:
            t = task()
            return f"state {t['state']}, decisions {[r[1] for r in t['reasons']]}"

        first = _wait(
            demo,
            "the remote attempt",
            lambda: (t := task())["attempts"] and t["state"] == "running_remote" and t,
            describe=describe,
        )
        attempt = first["attempts"][0]
        demo.say(
            "running remotely under a lease",
            node=worker.name,
            token=attempt["token"],
            lease=attempt["lease_id"],
            reasons=",".join(attempt["placement_reasons"]),
        )
        _wait(
            demo,
            "ticks from the remote attempt",
            lambda: ticks.exists() and ticks.read_text().count("\n") >= 5,
        )
        demo.stop_agent(worker, signal.SIGKILL)
        demo.say("SIGKILL the worker's agent mid-task", node=worker.name)
        fallback = _wait(
            demo,
            "the fallback",
            lambda: len((t := task())["attempts"]) >= 2 and t,
            describe=describe,
        )
        second = fallback["attempts"][1]
        demo.say(
            "control plane declared the lease dead; falling back locally",
            token=second["token"],
            reasons=",".join(second["placement_reasons"]),
        )
        done = _wait(
            demo, "the end of the task", lambda: (t := task())["exit_status"] is not None and t
        )
    finally:
        submitter.close()
    demo.say(
        "task finished",
        state=done["state"],
        exit=done["exit_status"],
        attempts=len(done["attempts"]),
    )
    if done["state"] != "succeeded":
        raise PopuliError(f"the task ended {done['state']}, expected succeeded")
    _check_ticks(demo, ticks)
    _timeline(demo, done)


def _check_ticks(demo: Demo, ticks: Path) -> None:
    rows = [line.split() for line in ticks.read_text().splitlines() if line.strip()]
    by_attempt: dict[str, list[int]] = {}
    for attempt, _token, _pid, at_ns in rows:
        by_attempt.setdefault(attempt, []).append(int(at_ns))
    if set(by_attempt) != {"1", "2"}:
        raise PopuliError(f"expected ticks from attempts 1 and 2, got {sorted(by_attempt)}")
    last_remote, first_local = max(by_attempt["1"]), min(by_attempt["2"])
    if last_remote >= first_local:
        raise PopuliError(
            "a tick of attempt 1 came after attempt 2 started: the task ran in two places"
        )
    demo.say(
        "single owner checked",
        remote_ticks=len(by_attempt["1"]),
        local_ticks=len(by_attempt["2"]),
        gap_ms=round((first_local - last_remote) / 1e6),
    )


def _timeline(demo: Demo, task: dict[str, Any]) -> None:
    if demo.quiet:
        return
    sys.stdout.write("\ntask decisions (reason codes):\n")
    start = task["reasons"][0][0]
    for at_ms, code, detail in task["reasons"]:
        sys.stdout.write(
            f"  +{(at_ms - start) / 1000:6.2f}s  {code}{'  ' + detail if detail else ''}\n"
        )
    for attempt in task["attempts"]:
        sys.stdout.write(
            f"  attempt {attempt['n']}: {attempt['where']} on {attempt['node']} token {attempt['token']} -> {attempt['outcome']}\n"
        )
    sys.stdout.write("\n")


def _print_keep(demo: Demo) -> None:
    sys.stdout.write("\nthe mesh keeps running:\n")
    for node in demo.nodes:
        pid = node.proc.pid if node.proc else "-"
        sys.stdout.write(
            f"  {node.name:8} {node.url}  pid {pid}  populi status --data-dir {node.data_dir}\n"
        )
    sys.stdout.write(
        f"stop it with: kill {' '.join(str(n.proc.pid) for n in demo.nodes if n.proc)}; logs in {demo.root}\n"
    )
