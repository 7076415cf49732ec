"""A second, independent mDNS implementation for the lab: avahi-daemon in one namespace,
on a private D-Bus (``../shared/LAB.md``: no systemd, no system bus here).

    with open_avahi(lab, "obs", tmp_path) as avahi:
        services = avahi.browse("_populi._tcp")      # avahi-browse -rtp, parsed

The D-Bus daemon runs from a copy of ``/usr/share/dbus-1/system.conf`` whose listen
address and pid file point into a temporary directory (no ``<user>``, no fork, no
syslog); avahi-daemon runs as root (``--no-drop-root --no-chroot``) in the namespace,
with a tmpfs over ``/run/avahi-daemon`` (its pid file and socket stay private to it).
Both are ended by their PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lab.netns import Lab

SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
SYSTEM_D = "/usr/share/dbus-1/system.d"


def avahi_unavailable() -> str | None:
    for tool, package in (
        ("avahi-daemon", "avahi-daemon"),
        ("avahi-browse", "avahi-utils"),
        ("dbus-daemon", "dbus"),
    ):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install {package})"
    if not SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} is missing (apt-get install dbus)"
    return None


@dataclass
class AvahiService:
    """One resolved line of ``avahi-browse -rp``."""

    interface: str
    name: str
    host: str
    address: str
    port: int
    txt: dict[str, str] = field(default_factory=dict)


def parse_browse(output: str) -> list[AvahiService]:
    """The resolved (``=``) lines of ``avahi-browse -rtp``; TXT strings are quoted with
    ``\\DDD`` escapes for odd bytes."""
    services = []
    for line in output.splitlines():
        if not line.startswith("="):
            continue
        parts = line.split(";", 9)
        if len(parts) < 10:
            continue
        txt = {}
        for item in re.findall(r'"((?:[^"\\]|\\.)*)"', parts[9]):
            key, _, value = item.partition("=")
            txt[key] = value
        services.append(
            AvahiService(
                interface=parts[1],
                name=_unescape(parts[3]),
                host=parts[6],
                address=parts[7],
                port=int(parts[8]),
                txt=txt,
            )
        )
    return services


def _unescape(text: str) -> str:
    return re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), text)


class Avahi:
    def __init__(self, lab: Lab, host: str, root: Path) -> None:
        self.lab, self.host, self.root = lab, host, root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bus = root / "bus"
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus}"}

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        conf = SYSTEM_CONF.read_text()
        conf = re.sub(r"<listen>.*?</listen>", f"<listen>unix:path={self.bus}</listen>", conf)
        conf = re.sub(r"<pidfile>.*?</pidfile>", f"<pidfile>{self.root}/dbus.pid</pidfile>", conf)
        conf = conf.replace(
            "<includedir>system.d</includedir>", f"<includedir>{SYSTEM_D}</includedir>"
        )
        conf = re.sub(r"\s*<user>.*?</user>", "", conf)
        conf = conf.replace("<fork/>", "").replace("<syslog/>", "")
        (self.root / "system.conf").write_text(conf)
        with (self.root / "dbus.log").open("ab") as log:
            self.procs.append(
                subprocess.Popen(
                    ["dbus-daemon", f"--config-file={self.root / 'system.conf'}", "--nofork"],
                    stdout=log,
                    stderr=log,
                )
            )
        self._wait(self.bus.exists, "the private D-Bus socket")
        (self.root / "avahi.conf").write_text(
            "[server]\nhost-name=avahi-observer\nuse-ipv4=yes\nuse-ipv6=no\n"
            "allow-interfaces=eth0\nenable-dbus=yes\nratelimit-interval-usec=1000000\n"
            "ratelimit-burst=1000\n[wide-area]\nenable-wide-area=no\n"
            "[publish]\npublish-hinfo=no\npublish-workstation=no\npublish-addresses=no\n"
        )
        script = (
            "mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon && "
            f"exec avahi-daemon --no-drop-root --no-chroot --no-rlimits -f {self.root}/avahi.conf"
        )
        with (self.root / "avahi.log").open("ab") as log:
            self.procs.append(
                subprocess.Popen(
                    self.lab.argv(self.host, "sh", "-c", script),
                    stdout=log,
                    stderr=log,
                    env=self.env,
                )
            )
        self._wait(self._daemon_ready, "avahi-daemon on the private bus")

    def _daemon_ready(self) -> bool:
        if self.procs[-1].poll() is not None:
            raise AssertionError(f"avahi-daemon exited: {self.log()}")
        return "Server startup complete" in self.log()

    def log(self) -> str:
        path = self.root / "avahi.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    @staticmethod
    def _wait(ready: object, what: str, guard_s: float = 30.0) -> None:
        deadline = time.monotonic() + guard_s
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise AssertionError(f"{what}: not ready after {guard_s} s")

    def browse(self, service_type: str) -> tuple[list[AvahiService], str]:
        """``avahi-browse -rtp TYPE`` (resolve, terminate when the cache is dumped,
        parsable) in the observer's namespace: the services and the raw output."""
        result = subprocess.run(
            self.lab.argv(self.host, "avahi-browse", "-rtp", service_type),
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        if result.returncode != 0:
            raise AssertionError(f"avahi-browse exited {result.returncode}: {result.stderr}")
        return parse_browse(result.stdout), result.stdout

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@contextlib.contextmanager
def open_avahi(lab: Lab, host: str, root: Path) -> Iterator[Avahi]:
    avahi = Avahi(lab, host, root)
    try:
        avahi.start()
        yield avahi
    finally:
        avahi.close()


__all__ = ["Avahi", "AvahiService", "avahi_unavailable", "open_avahi", "parse_browse"]
