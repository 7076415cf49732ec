"""Run a runbook's own shell blocks in the lab, so that the runbook and the test cannot
drift: the test runs what the page shows, step by step, on the hosts the page names.

**The page.** Every fenced ``sh`` block of a runbook carries an annotation just above it,
an HTML comment a reader does not see::

    <!-- lab: id=keys on=all -->
    ```sh
    wg genkey | tee /etc/wireguard/private.key | wg pubkey > /etc/wireguard/public.key
    ```

- ``id=NAME``: the step's name (the test runs steps by name, in page order);
- ``on=all`` or ``on=cp,wa``: the hosts it runs on (the page says "on every machine",
  "on cp"...);
- ``vars``: the "describe your machines" block: run at the start of every step on every
  host (``NODE`` is then set to the host's name, as the reader sets it on each machine);
- ``skip="why"``: not run in the lab (installing packages: ``.ci/run`` does it);
- ``copy="SRC -> DST"`` (several separated by ``;``): the block copies files between
  machines (``scp``); the lab copies them itself. ``SRC`` is ``HOST:PATH`` or ``each:PATH`` (every host in ``on``);
  ``DST`` is ``HOSTS:PATH`` or ``others:PATH`` (every other host in ``on``); ``{src}``
  and ``{dst}`` in either path stand for the source and destination host's names;
- ``expect="TEXT"``: the step's output must contain TEXT;
- ``timeout=SECONDS`` (default 120);
- ``sub="OLD -> NEW"`` (several separated by ``;``): the page's placeholder OLD (a name
  like ``TOKEN_ID``, an address the lab does not have) is run as NEW, e.g. ``$TOKEN``
  that an earlier step or the test set;
- ``exit="TEXT=N"`` (several separated by ``;``): the line that contains TEXT must exit
  with N (a refusal the page documents, e.g. exit 4 where no node fits); every other
  command must succeed.

A block may be indented (inside a list item): its lines are run dedented.

A block without an annotation fails :func:`parse_runbook`: a new step cannot slip past
the lab.

**The hosts.** Each host is a network namespace of the lab plus a mount namespace of its
own, kept by a holder process: ``/etc/wireguard``, ``/etc/nebula``, ``/var/lib/populi``
and ``/var/log/populi`` are bind mounts of per-host directories (each machine has its
own), ``/run/wireguard`` is a tmpfs (wireguard-go's control sockets, ``../shared/LAB.md``).
A step runs in one persistent ``bash`` per host entered into those namespaces (variables
set by one step are there in the next, as in a terminal); a failing command (bash's ERR
trap: what ``set -e`` would stop at) fails the step. Processes a step leaves running
(wireguard-go, nebula, the agent) live in the namespace; :meth:`Hosts.close` ends every
process of each namespace by its PID (``ip netns pids``), then the holders.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lab.netns import Lab

#: Paths every lab host has its own copy of.
PRIVATE_DIRS = (
    "/etc/wireguard",
    "/etc/nebula",
    "/etc/populi",
    "/var/lib/populi",
    "/var/log/populi",
    "/var/log/nebula",
)
ANNOTATION = re.compile(r"<!--\s*lab:(.*?)-->[ \t]*\n([ \t]*)```(\w*)\n(.*?)\n[ \t]*```", re.S)
FENCE = re.compile(r"^[ \t]*```(sh|bash|shell)\s*$", re.M)
ATTRIBUTES = frozenset({"id", "on", "vars", "skip", "copy", "expect", "timeout", "sub", "exit"})


class RunbookError(AssertionError):
    """A runbook step failed in the lab, or the page is not annotated right."""


@dataclass
class Step:
    id: str
    script: str
    hosts: tuple[str, ...] = ()
    on_all: bool = False
    vars: bool = False
    skip: str = ""
    copy: str = ""
    expect: str = ""
    timeout: float = 120.0
    line: int = 0
    sub: str = ""
    exit: str = ""

    def command(self) -> str:
        """The script as it runs: placeholders substituted (``sub``), and each line named
        by ``exit`` checked for its exit code instead of failing the step."""
        script = self.script
        for spec in filter(None, (part.strip() for part in self.sub.split(";"))):
            old, _, new = (part.strip() for part in spec.partition("->"))
            if old not in script:
                raise RunbookError(f"step {self.id!r}: sub {old!r} is not in the block")
            script = script.replace(old, new)
        lines = script.split("\n")
        for spec in filter(None, (part.strip() for part in self.exit.split(";"))):
            text, _, code = spec.rpartition("=")
            hits = [i for i, line in enumerate(lines) if text in line]
            if len(hits) != 1 or not code.isdigit():
                raise RunbookError(f"step {self.id!r}: exit {spec!r} must name one line")
            line = lines[hits[0]]
            lines[hits[0]] = (
                f"__rc=0; {{ {line}\n}} || __rc=$?\n"
                f'if [ "$__rc" != {code} ]; then __failed=1; '
                f'echo "lab: exited $__rc, not {code}: "{shlex.quote(line.strip())}; fi'
            )
        return "\n".join(lines)


def parse_runbook(path: Path) -> list[Step]:
    """The annotated ``sh`` blocks of ``path``, in order; a :class:`RunbookError` for a
    block without an annotation, an unknown attribute or a step id used twice."""
    text = path.read_text()
    steps: list[Step] = []
    annotated: set[int] = set()
    for match in ANNOTATION.finditer(text):
        attrs = dict(
            (item.split("=", 1) + [""])[:2] for item in shlex.split(match.group(1).strip())
        )
        line = text.count("\n", 0, match.start(2)) + 1
        annotated.add(line)
        unknown = set(attrs) - ATTRIBUTES
        if unknown or "id" not in attrs:
            raise RunbookError(f"{path.name}:{line}: bad annotation {match.group(1).strip()!r}")
        on = attrs.get("on", "all")
        step = Step(
            id=attrs["id"],
            script=textwrap.dedent(match.group(4)) if match.group(2) else match.group(4),
            hosts=() if on == "all" else tuple(on.split(",")),
            on_all=on == "all",
            vars="vars" in attrs,
            skip=attrs.get("skip", ""),
            copy=attrs.get("copy", ""),
            expect=attrs.get("expect", ""),
            timeout=float(attrs.get("timeout", "120")),
            line=line,
            sub=attrs.get("sub", ""),
            exit=attrs.get("exit", ""),
        )
        if any(s.id == step.id for s in steps):
            raise RunbookError(f"{path.name}:{line}: step id {step.id!r} used twice")
        steps.append(step)
    for fence in FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        if line not in annotated:
            raise RunbookError(
                f"{path.name}:{line}: a shell block without a '<!-- lab: ... -->' annotation "
                "(every step of a runbook is run by tests/lab)"
            )
    return steps


@dataclass
class Shell:
    """One persistent bash inside a host's namespaces."""

    host: str
    proc: subprocess.Popen[bytes]
    transcript: list[str] = field(default_factory=list)

    def run(self, script: str, *, timeout: float) -> tuple[int, str]:
        marker = f"__STEP_DONE_{time.monotonic_ns()}__"
        body = (
            "__failed=0\n"
            "trap '__failed=$?; echo \"lab: failed with $__failed: $BASH_COMMAND\"' ERR\n"
            f"{script}\n"
            "trap - ERR\n"
            f'echo "{marker} $__failed"\n'
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(body.encode())
        self.proc.stdin.flush()
        out = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunbookError(
                    f"[{self.host}] step did not finish in {timeout:g} s; output so far:\n"
                    + out.decode(errors="replace")[-3000:]
                )
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                if self.proc.poll() is not None:
                    raise RunbookError(f"[{self.host}] the shell exited: {out.decode()[-3000:]}")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RunbookError(f"[{self.host}] the shell closed: {out.decode()[-3000:]}")
            out += chunk
            text = out.decode(errors="replace")
            found = re.search(re.escape(marker) + r" (\d+)\n", text)
            if found:
                output = text[: found.start()]
                self.transcript.append(output)
                return int(found.group(1)), output


class HostSet(Protocol):
    """Where a runbook runs: :class:`Hosts` (the lab), or one machine's loopback
    (``tests/e2e/runbook_loopback.py``)."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def run(self, host: str, script: str, *, timeout: float = 120.0) -> str: ...

    def dir(self, host: str, path: str) -> Path: ...


class Hosts:
    """The lab's hosts as machines of their own (module docstring)."""

    def __init__(
        self,
        lab: Lab,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        host_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.lab = lab
        self.root = root
        self.env = dict(env or {})
        self.host_env = {host: dict(values) for host, values in (host_env or {}).items()}
        self.holders: dict[str, subprocess.Popen[bytes]] = {}
        self.shells: dict[str, Shell] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.lab.names)

    def dir(self, host: str, path: str) -> Path:
        """Where ``path`` of ``host`` (one of :data:`PRIVATE_DIRS`, or below) lives here."""
        for private in PRIVATE_DIRS:
            if path == private or path.startswith(private + "/"):
                return (
                    self.root
                    / host
                    / private.strip("/").replace("/", "-")
                    / path[len(private) :].lstrip("/")
                )
        raise KeyError(f"{path} is not private to a lab host")

    def open(self) -> None:
        for private in PRIVATE_DIRS:
            Path(private).mkdir(parents=True, exist_ok=True)  # mount points
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)
        for host in self.lab.names:
            mounts = []
            for private in PRIVATE_DIRS:
                mine = self.dir(host, private)
                mine.mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {shlex.quote(str(mine))} {private}")
            script = " && ".join(
                [
                    *mounts,
                    "mount -t tmpfs tmpfs /run/wireguard",
                    "echo ready",
                    "exec sleep infinity",
                ]
            )
            holder = subprocess.Popen(
                self.lab.argv(host, "sh", "-c", script), stdout=subprocess.PIPE
            )
            assert holder.stdout is not None
            if holder.stdout.readline().strip() != b"ready":
                raise RunbookError(f"[{host}] the mount namespace could not be made")
            self.holders[host] = holder
            path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
            shell = subprocess.Popen(
                ["nsenter", "-t", str(holder.pid), "-m", "-n", "bash", "--noprofile", "--norc"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, **self.host_env.get(host, {}), "PATH": path},
                cwd="/",
            )
            self.shells[host] = Shell(host, shell)

    def run(self, host: str, script: str, *, timeout: float = 120.0) -> str:
        """``script`` in ``host``'s shell; its output; :class:`RunbookError` if it failed."""
        status, output = self.shells[host].run(script, timeout=timeout)
        if status != 0:
            raise RunbookError(
                f"[{host}] failed ({status}):\n{script}\n--- output:\n{output[-4000:]}"
            )
        return output

    def pids(self, host: str) -> list[int]:
        listing = subprocess.run(
            ["ip", "netns", "pids", self.lab.ns(host)], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in listing.split()]

    def close(self) -> None:
        """End every process in each host's namespace by its PID (SIGTERM, then SIGKILL),
        then the shells and holders."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for host in self.lab.names:
                for pid in self.pids(host):
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(self.pids(h) for h in self.lab.names):
                time.sleep(0.2)
        for proc in [*(s.proc for s in self.shells.values()), *self.holders.values()]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


class Runbook:
    """A runbook's steps, run on :class:`Hosts` by name and in page order."""

    def __init__(self, path: Path, hosts: HostSet) -> None:
        self.path = path
        self.hosts = hosts
        self.steps = parse_runbook(path)
        self.done: list[str] = []
        self.outputs: dict[tuple[str, str], str] = {}
        self.timings: dict[str, float] = {}
        self.profile = "\n".join(s.script for s in self.steps if s.vars)

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise RunbookError(f"{self.path.name} has no step {step_id!r}")

    def targets(self, step: Step) -> tuple[str, ...]:
        return self.hosts.names if step.on_all else step.hosts

    def run(self, step_id: str) -> dict[str, str]:
        """Run one step on its hosts (in the order the page lists them); the output per
        host. Steps must be run in page order: skipping one is an error."""
        step = self.step(step_id)
        position = self.steps.index(step)
        missing = [s.id for s in self.steps[:position] if s.id not in self.done and not s.vars]
        if missing:
            raise RunbookError(f"step {step_id!r} before {', '.join(missing)}")
        started = time.monotonic()
        outputs: dict[str, str] = {}
        if step.skip:
            pass
        elif step.copy:
            self._copy(step)
        else:
            for host in self.targets(step):
                script = f"{self.profile}\nNODE={host}\n{step.command()}"
                output = self.hosts.run(host, script, timeout=step.timeout)
                if step.expect and step.expect not in output:
                    raise RunbookError(
                        f"[{host}] step {step_id!r}: expected {step.expect!r} in:\n{output[-3000:]}"
                    )
                outputs[host] = output
                self.outputs[(step_id, host)] = output
        self.timings[step_id] = time.monotonic() - started
        self.done.append(step_id)
        return outputs

    def run_through(self, last: str) -> None:
        """Every step not run yet, up to and including ``last``."""
        for step in self.steps:
            if step.id not in self.done and not step.vars:
                self.run(step.id)
            if step.id == last:
                return

    def _copy(self, step: Step) -> None:
        for spec in step.copy.split(";"):
            self._copy_one(step, spec)

    def _copy_one(self, step: Step, spec: str) -> None:
        src, _, dst = (part.strip() for part in spec.partition("->"))
        src_host, _, src_path = src.partition(":")
        dst_hosts, _, dst_path = dst.partition(":")
        on = self.targets(step)
        sources = on if src_host == "each" else (src_host,)
        for source in sources:
            if dst_hosts == "others":
                destinations: Sequence[str] = [h for h in on if h != source]
            else:
                destinations = dst_hosts.split(",")
            for dest in destinations:
                names = {"{src}": source, "{dst}": dest}
                source_path, target_path = src_path, dst_path
                for key, value in names.items():
                    source_path = source_path.replace(key, value)
                    target_path = target_path.replace(key, value)
                target = self.hosts.dir(dest, target_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.hosts.dir(source, source_path), target)

    def check_all_run(self) -> None:
        """Every step of the page ran (or was skipped by its own annotation)."""
        left = [s.id for s in self.steps if s.id not in self.done and not s.vars]
        if left:
            raise RunbookError(f"{self.path.name}: steps not run: {', '.join(left)}")


__all__ = ["PRIVATE_DIRS", "HostSet", "Hosts", "Runbook", "RunbookError", "Step", "parse_runbook"]
