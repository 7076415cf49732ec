"""Real ``populi`` processes for end-to-end tests, always cleaned up by PID, and looks
into ``/proc`` for what their tasks left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from populi_peer.selfexec import SUPERVISOR_VERB as _VERB
from populi_peer.selfexec import started_as
from support.waiting import wait_for

POPULI = [sys.executable, "-m", "populi_peer"]
SUPERVISOR_VERB = _VERB.encode()
#: Every task these tests start carries this variable, so that its processes can be
#: found in ``/proc`` without mistaking anybody else's for them.
MARK_NAME = "E2E_EXEC_MARK"
MARK = "m" + uuid.uuid4().hex


def populi(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, **(env or {})}
    result = subprocess.run(
        [*POPULI, *args], capture_output=True, text=True, env=merged, timeout=timeout
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

    def init_and_start(self, data_dir: Path, *extra: str, **start: Any) -> AgentProcess:
        """``populi init`` a new cluster in ``data_dir``, then start its agent (the
        arguments after ``data_dir`` are :meth:`start_agent`'s)."""
        init(data_dir)
        return self.start_agent(data_dir, *extra, **start)

    def start_agent(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        guard_s: float = 30.0,
        argv: Callable[[list[str]], list[str]] = list,
        health: bool = True,
    ) -> AgentProcess:
        """Start ``populi agent`` on ``data_dir`` (its command line through ``argv``, e.g.
        into a network namespace: the PID must stay the agent's own) and, with ``wait``,
        wait until it serves (see :meth:`wait_ready`)."""
        log_path = data_dir.parent / f"{data_dir.name}.agent.log"
        runtime = data_dir / "run" / "agent.json"
        runtime.unlink(missing_ok=True)
        handle = log_path.open("ab")
        proc = subprocess.Popen(
            argv([*POPULI, "agent", "--data-dir", str(data_dir), *extra]),
            stdout=handle,
            stderr=handle,
            # Any free port for /metrics: agents of parallel tests never share 7432.
            env={"POPULI_METRICS__LISTEN": "127.0.0.1:0", **os.environ, **(env or {})},
        )
        handle.close()
        agent = AgentProcess(data_dir=data_dir, proc=proc, log_path=log_path)
        self.started.append(agent)
        if wait:
            self.wait_ready(agent, guard_s=guard_s, health=health)
        return agent

    def wait_ready(
        self, agent: AgentProcess, *, guard_s: float = 30.0, health: bool = True
    ) -> float:
        """Wait until the agent serves: its runtime file names it (written once the API is
        bound) and, with ``health``, it answers health. Returns how long it took."""
        runtime = agent.data_dir / "run" / "agent.json"

        def ready() -> dict[str, object] | None:
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()[-2000:]}")
            try:
                info = json.loads(runtime.read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(info, dict):
                return None
            # The single file's agent is the Python child of the file's loader.
            if not started_as(int(info.get("pid") or 0), agent.proc.pid):
                return None
            if health:
                try:
                    answer = httpx.get(info["url"] + "/v1/populi/health", verify=False, timeout=2)
                except httpx.HTTPError:
                    return None
                if answer.status_code != 200:
                    return None
            return info

        try:
            info, took = wait_for("the agent serves", ready, guard_s=guard_s, every_s=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {agent.log()[-2000:]}") from None
        agent.url, agent.node_id = str(info["url"]), str(info["node_id"])
        return took

    def stop(self, agent: AgentProcess, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if agent.proc.poll() is None:
            agent.proc.send_signal(sig)
        return agent.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        for agent in self.started:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(timeout=10)


# -- what tasks leave behind -------------------------------------------------------------


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    return _stat_state(pid) not in ("Z", "")


def marked_pids(needle: bytes) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``needle``."""
    out = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        if needle in _read(f"/proc/{pid}/environ").split(b"\0") and pid_alive(pid):
            out.append(pid)
    return out


def task_pids(task_id: str) -> list[int]:
    return marked_pids(f"POPULI_TASK_ID={task_id}".encode())


def supervisor_pids(root: Path) -> list[int]:
    """Supervisors of task directories under ``root``."""
    out = []
    for pid in _pids():
        cmdline = _read(f"/proc/{pid}/cmdline").split(b"\0")
        # The package's supervisor, or the single file's (``populi _supervisor DIR``).
        supervisor = b"populi_peer.exec.supervisor" in cmdline or SUPERVISOR_VERB in cmdline
        if supervisor and any(arg.startswith(str(root).encode()) for arg in cmdline):
            if pid_alive(pid):
                out.append(pid)
    return out


def leftovers(root: Path) -> list[int]:
    """Processes of marked tasks, and supervisors of task directories under ``root``."""
    return sorted(set(marked_pids(f"{MARK_NAME}={MARK}".encode())) | set(supervisor_pids(root)))


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _loopback_node(data_dir: Path, name: str) -> tuple[str, ...]:
    """The arguments of ``populi init`` / ``populi join`` for node ``name`` in
    ``data_dir``, listening on a free loopback port."""
    return ("--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--name", name)


def init(data_dir: Path, *args: str, name: str = "cp") -> dict[str, object]:
    result = populi(
        "init",
        "--cluster-name",
        "lab",
        *_loopback_node(data_dir, name),
        "--json",
        *args,
        check=True,
    )
    return json.loads(result.stdout)


def one_line(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in text


__all__: Sequence[str] = [
    "MARK",
    "MARK_NAME",
    "POPULI",
    "AgentProcess",
    "Processes",
    "init",
    "kill_pids",
    "leftovers",
    "marked_pids",
    "one_line",
    "pid_alive",
    "populi",
    "supervisor_pids",
    "task_pids",
]


def create_token(data_dir: Path, *args: str) -> str:
    """``populi token create --json ARGS`` on ``data_dir``'s node: the token's text."""
    result = populi("token", "create", "--data-dir", str(data_dir), "--json", *args, check=True)
    return str(json.loads(result.stdout)["token"])


def join_node(token: str, data_dir: Path, name: str) -> None:
    """``populi join TOKEN`` into ``data_dir`` as ``name``, listening on a free loopback port."""
    populi("join", token, *_loopback_node(data_dir, name), check=True)
