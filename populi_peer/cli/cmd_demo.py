"""``populi demo``: a real mesh on this machine, end to end, then cleaned up.

Every node is a real ``populi agent`` process with its own temporary data directory, real
TLS and signed requests on loopback. The demo prints a timeline of what happened.
"""

from __future__ import annotations

import argparse
import json
import os
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
from populi_peer.errors import PopuliError

POPULI = [sys.executable, "-m", "populi_peer"]


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
            env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise PopuliError(
                f"demo step 'populi {args[0]}' failed (exit {result.returncode}): {result.stderr.strip()[:300]}"
            )
        return result

    def start_agent(self, node: Node, env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{node.name}.log").open("ab")
        runtime = node.data_dir / "run" / "agent.json"
        runtime.unlink(missing_ok=True)
        node.proc = subprocess.Popen(
            [*POPULI, "agent", "--data-dir", str(node.data_dir)],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
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
            if info and info.get("pid") == node.proc.pid:
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
    root = Path(tempfile.mkdtemp(prefix="populi-demo-", dir=args.dir))
    demo = Demo(root=root, guard_s=args.guard, quiet=args.json)
    keep = False
    try:
        _scenario(demo)
        if args.keep:
            keep = True
            _print_keep(demo)
        if args.json:
            print_json({"ok": True, "timeline": demo.timeline, "root": str(root), "kept": keep})
        else:
            sys.stdout.write("demo finished: every step passed\n")
        return 0
    finally:
        if not keep:
            demo.cleanup()
            shutil.rmtree(root, ignore_errors=True)


def _scenario(demo: Demo) -> None:
    cp = Node("cp", demo.root / "cp")
    demo.nodes.append(cp)
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
    demo.say("cluster created", cluster=out["cluster"]["id"], node=out["node"]["id"])
    demo.start_agent(cp)
    demo.say("agent running", node="cp", url=cp.url)
    status = json.loads(demo.populi("status", "--data-dir", str(cp.data_dir), "--json").stdout)
    demo.say(
        "signed status over TLS",
        cluster=status["cluster"]["name"],
        term=status["term"],
        control_plane=status["control_plane"]["node_id"],
    )
    import httpx

    unsigned = httpx.get(cp.url + "/v1/populi/status", verify=False, timeout=5)  # noqa: S501 - shows the refusal
    demo.say("unsigned request refused", status=unsigned.status_code)
    if unsigned.status_code != 401:
        raise PopuliError(f"an unsigned request got HTTP {unsigned.status_code}, expected 401")


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
