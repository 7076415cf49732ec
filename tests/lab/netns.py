"""A lab of network namespaces for multi-host tests (root only).

One namespace per host, each with loopback up and one interface ``eth0`` (a veth pair)
whose other end sits on a bridge ``br0`` in a namespace of its own (the hub). Hosts get
``SUBNET.1``, ``SUBNET.2``, ... in the order given, on a /24 that exists only inside the
lab: there is no default route and no interface in the caller's namespace, so nothing
leaves the lab.

    with open_lab(["cp", "wa", "wb"]) as lab:
        lab.run("cp", "ip", "addr")           # ip netns exec <cp's namespace> ip addr
        lab.cut("wb", "cp")                   # iptables DROP both ways, inside wb only
        lab.heal()

Partitions are ``iptables ... -j DROP`` rules inside one host's namespace (``tc netem``
is not available on these machines). Everything is torn down on exit, also when the block
fails: the namespaces (which takes their veths and iptables rules with them) and the hub
(with its bridge). Processes started inside the lab are the caller's to end first: a
namespace lives on while a process is in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SUBNET = "10.77.0"
PREFIX_LEN = 24
BRIDGE = "br0"
IFACE = "eth0"


class LabError(RuntimeError):
    """A lab command failed; the message names the command and what it printed."""


def sh(*argv: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[:500]}"
        )
    return result


def unavailable() -> str | None:
    """Why a lab cannot be built here (``None`` when it can)."""
    if os.geteuid() != 0:
        return "the network-namespace lab needs root (CI's .ci/run runs as root)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install {package})"
    probe = f"populi-probe-{uuid.uuid4().hex[:8]}"
    try:
        made = sh("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"'ip netns' is unavailable here: {made.stderr.strip()[:200]}"
        rules = sh("ip", "netns", "exec", probe, "iptables", "-S", check=False)
        if rules.returncode != 0:
            return f"iptables does not work inside a namespace: {rules.stderr.strip()[:200]}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Lab:
    prefix: str
    names: tuple[str, ...]
    #: The first three octets of the hosts' /24 (``SUBNET`` unless given).
    subnet: str = SUBNET
    #: name -> IPv4 address on the lab's /24.
    addresses: dict[str, str] = field(default_factory=dict)
    #: Namespaces made so far (hub last), for the teardown.
    made: list[str] = field(default_factory=list)
    #: iptables rules added by ``cut`` (namespace, rule), for ``heal``.
    rules: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def ns(self, name: str) -> str:
        """The namespace of host ``name``."""
        if name not in self.names:
            raise KeyError(f"no host {name!r} in the lab ({', '.join(self.names)})")
        return f"{self.prefix}-{name}"

    def ip(self, name: str) -> str:
        return self.addresses[name]

    def argv(self, name: str, *command: str) -> list[str]:
        """``command`` as run inside host ``name``'s namespace (``ip netns exec`` execs
        it: the process id is the command's own)."""
        return ["ip", "netns", "exec", self.ns(name), *command]

    def run(
        self, name: str, *command: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(name, *command), timeout=timeout, check=check)

    # -- building ---------------------------------------------------------------------

    def build(self) -> None:
        sh("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", BRIDGE, "up")
        for number, name in enumerate(self.names, start=1):
            ns = self.ns(name)
            address = f"{self.subnet}.{number}"
            sh("ip", "netns", "add", ns)
            self.made.insert(0, ns)  # hosts go before the hub
            port = f"v-{number}"
            sh(
                "ip",
                "-n",
                self.hub,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                IFACE,
                "netns",
                ns,
            )
            sh("ip", "-n", self.hub, "link", "set", port, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", IFACE)
            sh("ip", "-n", ns, "link", "set", IFACE, "up")
            self.addresses[name] = address
        for name in self.names:
            routes = sh("ip", "-n", self.ns(name), "route", "show", "default").stdout.strip()
            if routes:
                raise LabError(f"{name} has a default route ({routes}): the lab must be closed")

    def close(self) -> list[str]:
        """Delete every namespace made (hosts first, then the hub); returns the problems
        met (the teardown goes on past each one)."""
        problems = []
        for ns in list(self.made):
            result = sh("ip", "netns", "del", ns, check=False)
            if result.returncode != 0 and ns in namespaces():
                problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
            else:
                self.made.remove(ns)
        self.rules.clear()
        return problems

    # -- partitions -------------------------------------------------------------------

    def cut(self, name: str, peer: str) -> None:
        """Drop everything between ``name`` and ``peer``, both ways, by rules inside
        ``name``'s namespace alone (the others keep reaching both)."""
        ns, address = self.ns(name), self.ip(peer)
        for rule in (
            ("INPUT", "-s", address, "-j", "DROP"),
            ("OUTPUT", "-d", address, "-j", "DROP"),
        ):
            sh("ip", "netns", "exec", ns, "iptables", "-A", *rule)
            self.rules.append((ns, rule))

    def heal(self) -> None:
        """Remove every rule ``cut`` added."""
        while self.rules:
            ns, rule = self.rules.pop()
            sh("ip", "netns", "exec", ns, "iptables", "-D", *rule)

    def drop_counts(self, name: str) -> dict[str, int]:
        """Packets dropped so far by ``cut``'s rules in ``name``'s namespace, by chain."""
        out = self.run(name, "iptables", "-L", "-v", "-n", "-x").stdout
        counts: dict[str, int] = {}
        chain = ""
        for line in out.splitlines():
            parts = line.split()
            if line.startswith("Chain "):
                chain = parts[1]
            elif len(parts) > 2 and parts[2] == "DROP" and parts[0].isdigit():
                counts[chain] = counts.get(chain, 0) + int(parts[0])
        return counts


def namespaces() -> set[str]:
    listing = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@contextlib.contextmanager
def open_lab(
    names: Sequence[str], *, prefix: str | None = None, subnet: str = SUBNET
) -> Iterator[Lab]:
    """Build the lab, yield it, tear it down (even when building or the block fails).
    ``subnet``: the hosts' /24, e.g. ``198.18.0`` for an underlay that stands for the
    Internet (a benchmarking range, RFC 2544: neither LAN nor anyone's real address)."""
    lab = Lab(prefix or f"populi-{os.getpid()}-{uuid.uuid4().hex[:4]}", tuple(names), subnet)
    try:
        lab.build()
        yield lab
    except BaseException:
        lab.close()  # the block's own failure is the one to report
        raise
    problems = lab.close()
    if problems:
        raise LabError("lab teardown: " + "; ".join(problems))


__all__ = ["Lab", "LabError", "namespaces", "open_lab", "sh", "unavailable"]
