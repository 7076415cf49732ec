"""The runbooks' machines on this one machine's loopback, for ``lab.runbook.Runbook``: each
host is a persistent ``bash`` of its own, the way a reader has a terminal on each machine.

A host has its own ``HOME`` (so the default data directory, ``~/.local/share/populi``, is
its own), its own API port in ``$PORT`` (pages write ``--listen 0.0.0.0:7431``; their
annotations substitute ``127.0.0.1:$PORT``), its metrics on any free port
(``POPULI_METRICS__LISTEN=127.0.0.1:0``: the default 7432 is one per machine), no
``POPULI_*`` variable of the test's own environment, and whatever the test adds (a GPU
capture to replay, a folder of stand-in commands on ``PATH``). ``$WORK`` is one folder all
hosts see at the same path, as a shared filesystem or a synced checkout would be.

A page runs ``populi agent`` in the foreground (a terminal of its own, or a service). Here a
line that starts the agent runs it in the background, its log in ``~/agent.log``, and the
step then waits until the agent answers (``populi status --wait``), as a reader would before
typing the next command. :meth:`LoopbackHosts.close` ends every agent by the PID recorded
when it started, then whatever task supervisors are left under the hosts' root.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.runbook import RunbookError, Shell

from support.mesh import free_port
from support.procs import MARK, MARK_NAME, kill_pids, leftovers, pid_alive

#: A line that starts an agent in the foreground: ``populi agent [--data-dir DIR] ...``.
AGENT_LINE = re.compile(r"^(?P<indent>\s*)(?P<cmd>populi agent\b[^&#\n]*?)\s*(?P<comment>#.*)?$")
DATA_DIR_FLAG = re.compile(r"--data-dir[ =](\S+)")
#: A guard for an agent to answer, not a measurement (it takes about a second).
AGENT_WAIT = "60s"


def background_agents(script: str) -> str:
    """``script`` with each foreground ``populi agent`` line started in the background,
    followed by a wait until it answers (module docstring)."""
    lines = []
    for line in script.split("\n"):
        match = AGENT_LINE.match(line)
        if match is None:
            lines.append(line)
            continue
        indent, cmd = match.group("indent"), match.group("cmd")
        data_dir = DATA_DIR_FLAG.search(cmd)
        where = f" --data-dir {data_dir.group(1)}" if data_dir else ""
        lines.append(f"{indent}{cmd} >> ~/agent.log 2>&1 &")
        lines.append(f"{indent}echo $! >> ~/.agent-pids")
        lines.append(f"{indent}populi status --wait {AGENT_WAIT}{where} > /dev/null")
    return "\n".join(lines)


class LoopbackHosts:
    """The hosts a runbook names, each a shell on this machine (module docstring)."""

    def __init__(
        self,
        root: Path,
        names: Sequence[str],
        *,
        host_env: Mapping[str, Mapping[str, str]] | None = None,
        path_dirs: Mapping[str, Sequence[Path]] | None = None,
    ) -> None:
        self.root = root
        self._names = tuple(names)
        self.host_env = {host: dict(values) for host, values in (host_env or {}).items()}
        self.path_dirs = {host: list(dirs) for host, dirs in (path_dirs or {}).items()}
        self.work = root / "work"
        self.shells: dict[str, Shell] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def home(self, host: str) -> Path:
        return self.root / host

    def dir(self, host: str, path: str) -> Path:
        raise RunbookError(f"{host}:{path}: copies between machines are not run on loopback")

    def open(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("POPULI_")}
        for host in self._names:
            home = self.home(host)
            home.mkdir(parents=True, exist_ok=True)
            dirs = [*map(str, self.path_dirs.get(host, [])), str(Path(sys.executable).parent)]
            env = {
                **base,
                "HOME": str(home),
                "PATH": os.pathsep.join([*dirs, base.get("PATH", "/usr/bin:/bin")]),
                "PORT": str(free_port()),
                "WORK": str(self.work),
                "POPULI_METRICS__LISTEN": "127.0.0.1:0",
                MARK_NAME: MARK,
                **self.host_env.get(host, {}),
            }
            env.pop("XDG_DATA_HOME", None)
            proc = subprocess.Popen(
                ["bash", "--noprofile", "--norc"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=home,
            )
            self.shells[host] = Shell(host, proc)

    def run(self, host: str, script: str, *, timeout: float = 120.0) -> str:
        """``script`` in ``host``'s shell; its output; :class:`RunbookError` if it failed."""
        status, output = self.shells[host].run(background_agents(script), timeout=timeout)
        if status != 0:
            raise RunbookError(
                f"[{host}] failed ({status}):\n{script}\n--- output:\n{output[-4000:]}"
            )
        return output

    def agent_pids(self, host: str) -> list[int]:
        pids = self.home(host) / ".agent-pids"
        return [int(pid) for pid in pids.read_text().split()] if pids.exists() else []

    def stop_agent(self, host: str, *, timeout: float = 60.0) -> None:
        """Stop ``host``'s agents (SIGTERM, as ``systemctl stop`` does) and wait for them."""
        pids = self.agent_pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise RunbookError(f"[{host}] the agent did not stop in {timeout:g} s")
            time.sleep(0.1)
        (self.home(host) / ".agent-pids").unlink(missing_ok=True)

    def close(self) -> None:
        """End every agent by its PID, then the task supervisors left under the root, then
        the shells."""
        kill_pids(pid for host in self._names for pid in self.agent_pids(host))
        kill_pids(leftovers(self.root))
        for shell in self.shells.values():
            proc = shell.proc
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


__all__ = ["AGENT_WAIT", "LoopbackHosts", "background_agents"]
