"""Real ``populi`` processes for end-to-end tests, always cleaned up by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from populi_peer.selfexec import started_as

POPULI = [sys.executable, "-m", "populi_peer"]


def populi(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = False,
    command: Sequence[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``populi ARGS``: this checkout's package, or ``command`` (another install, the
    single file)."""
    merged = {**os.environ, **(env or {})}
    result = subprocess.run(
        [*(command or POPULI), *args], capture_output=True, text=True, env=merged, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"populi {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


@dataclass
class AgentProcess:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    node_id: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Processes:
    """Starts agents and guarantees that each is ended (by its PID) after the test."""

    started: list[AgentProcess] = field(default_factory=list)

    def start_agent(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        guard_s: float = 30.0,
        command: Sequence[str] | None = None,
    ) -> AgentProcess:
        log_path = data_dir.parent / f"{data_dir.name}.agent.log"
        runtime = data_dir / "run" / "agent.json"
        runtime.unlink(missing_ok=True)
        handle = log_path.open("ab")
        proc = subprocess.Popen(
            [*(command or POPULI), "agent", "--data-dir", str(data_dir), *extra],
            stdout=handle,
            stderr=handle,
            env={**os.environ, **(env or {})},
        )
        handle.close()
        agent = AgentProcess(data_dir=data_dir, proc=proc, log_path=log_path)
        self.started.append(agent)
        if wait:
            self.wait_ready(agent, guard_s=guard_s)
        return agent

    def wait_ready(self, agent: AgentProcess, *, guard_s: float = 30.0) -> float:
        """Wait until the agent answers health; returns how long it took."""
        started = time.monotonic()
        runtime = agent.data_dir / "run" / "agent.json"
        while time.monotonic() - started < guard_s:
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()[-2000:]}")
            if runtime.exists():
                try:
                    info = json.loads(runtime.read_text())
                except ValueError:
                    info = None
                # The single file's agent is the Python child of the file's loader.
                if info and started_as(int(info.get("pid") or 0), agent.proc.pid):
                    try:
                        response = httpx.get(
                            info["url"] + "/v1/populi/health", verify=False, timeout=2
                        )
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 200:
                        agent.url = info["url"]
                        agent.node_id = info["node_id"]
                        return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {guard_s} s: {agent.log()[-2000:]}")

    def stop(self, agent: AgentProcess, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if agent.proc.poll() is None:
            agent.proc.send_signal(sig)
        return agent.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        for agent in self.started:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(timeout=10)


def init(data_dir: Path, *args: str, name: str = "cp") -> dict[str, object]:
    result = populi(
        "init",
        "--cluster-name",
        "lab",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--json",
        *args,
        check=True,
    )
    return json.loads(result.stdout)


def one_line(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in text


__all__: Sequence[str] = ["POPULI", "AgentProcess", "Processes", "init", "one_line", "populi"]
