"""What a WAN link can carry: a three-node cluster over WireGuard in the namespace lab,
with delay and loss added on the underlay; prints figures (never pass/fail on time).
Root only; ``docs/wan.md`` holds the figures of a run.

    sudo .venv/bin/python bench/wan.py idle --rtt-ms 150 --loss 1 --minutes 10
    sudo .venv/bin/python bench/wan.py matrix

The cluster is the one ``runbooks/overlay-wireguard.md`` builds (its steps run as
``tests/lab`` runs them): ``cp``, ``wa``, ``wb`` on an Internet stand-in
(``198.18.0.0/24``), WireGuard between them, Populi over WireGuard. Delay: every host
holds its outgoing WireGuard packets for RTT/2 (``bench/netem.py``, NFQUEUE: the kernel
here has no netem); loss: every host drops incoming WireGuard packets with probability
LOSS (``iptables -m statistic``), so a round trip loses about twice LOSS.

``idle``: the cluster sits for ``--minutes``; ``populi nodes`` on ``cp`` is sampled every
2 s: a stale verdict, or the term changing (a leader change), is
reported. The largest heartbeat age seen says how close it came: a sample can miss a
stale spell only if it is shorter than the sampling period, so a largest age below
``stale_after - 2 s`` rules one out.

``matrix``: for each RTT in 50 and 150 ms and loss in 0, 1 and 2 %: a signed request on a
kept-alive connection and on a new one, a lease grant / renew / release, a remote run
(``populi run --node wb --gpus 1 -- true`` from ``wa``), and at 150 ms the time ``cp``
takes to call a cut-off node stale and to hear it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lab.netns import open_lab  # noqa: E402
from lab.overlay import HOSTS, UNDERLAY, overlay_hosts  # noqa: E402
from lab.runbook import Hosts, Runbook  # noqa: E402

WG_PORT = 51820


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p90": pct(values, 0.9),
        "max": round(max(values), 1) if values else None,
    }


class WanLab:
    def __init__(self, lab: Any, hosts: Hosts) -> None:
        self.lab, self.hosts = lab, hosts
        self.netem: list[subprocess.Popen[bytes]] = []

    def set_path(self, rtt_ms: float, loss_pct: float) -> None:
        """Delay and loss on every host's WireGuard packets (replacing what was set)."""
        self.clear_path()
        for index, host in enumerate(HOSTS):
            queue = 10 + index
            if rtt_ms > 0:
                proc = subprocess.Popen(
                    self.lab.argv(
                        host,
                        sys.executable,
                        str(ROOT / "bench" / "netem.py"),
                        "--queue",
                        str(queue),
                        "--delay-ms",
                        str(rtt_ms / 2),
                    ),
                    stdout=subprocess.PIPE,
                )
                assert proc.stdout is not None
                proc.stdout.readline()
                self.netem.append(proc)
                self._on_wireguard(host, "OUTPUT", "-o", "-j", "NFQUEUE", "--queue-num", str(queue))
            if loss_pct > 0:
                self._on_wireguard(
                    host,
                    "PREROUTING",
                    "-i",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    str(loss_pct / 100),
                    "-j",
                    "DROP",
                )

    def _on_wireguard(self, host: str, chain: str, direction: str, *rule: str) -> None:
        """An iptables mangle rule on ``host``'s WireGuard packets through eth0
        (``direction``: ``-o`` going out, ``-i`` coming in)."""
        self.lab.run(
            host,
            "iptables",
            "-t",
            "mangle",
            "-A",
            chain,
            direction,
            "eth0",
            "-p",
            "udp",
            "--dport",
            str(WG_PORT),
            *rule,
        )

    def clear_path(self) -> None:
        for host in HOSTS:
            self.lab.run(host, "iptables", "-t", "mangle", "-F")
        for proc in self.netem:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
        self.netem.clear()

    def ping_rtt(self) -> float:
        out = self.hosts.run("wb", "ping -c 5 -i 0.3 -q 10.8.0.1 || true")
        for line in out.splitlines():
            if "min/avg/max" in line:
                return float(line.split("=")[1].split("/")[1])
        return float("nan")

    def probe(self, host: str, what: str, n: int) -> dict[str, Any]:
        out = self.hosts.run(
            host,
            f"python3 {ROOT / 'bench' / 'wan_probe.py'} {what} --data-dir /var/lib/populi -n {n}",
            timeout=600,
        )
        return dict(json.loads(out[out.index("{") :]))

    def nodes(self) -> dict[str, Any]:
        out = self.hosts.run("cp", "populi nodes --json", timeout=60)
        return dict(json.loads(out[out.index("{") :]))

    def remote_runs(self, n: int) -> dict[str, Any]:
        times, errors = [], []
        for _ in range(n):
            started = time.monotonic()
            out = self.hosts.run(
                "wa",
                "populi run --node wb --gpus 1 --queue-timeout 2m -- true && echo RUN-OK || echo RUN-FAILED $?",
                timeout=300,
            )
            took = (time.monotonic() - started) * 1000
            if "RUN-OK" in out:
                times.append(took)
            else:
                errors.append(out.strip()[-200:])
        return {**summary(times), "errors": errors}

    def detection(self) -> dict[str, Any]:
        """Cut wb (its WireGuard packets dropped both ways); time until cp calls it stale
        and, healed, until cp hears it again."""
        rule = ["-p", "udp", "--dport", str(WG_PORT), "-j", "DROP"]
        self.lab.run("wb", "iptables", "-I", "INPUT", "1", *rule)
        self.lab.run("wb", "iptables", "-I", "OUTPUT", "1", *rule)
        cut = time.monotonic()
        stale_after = None
        while time.monotonic() - cut < 120:
            view = {n["name"]: n for n in self.nodes()["nodes"]}
            if view["wb"]["heartbeat_stale"]:
                stale_after = time.monotonic() - cut
                break
            time.sleep(0.5)
        self.lab.run("wb", "iptables", "-D", "INPUT", *rule)
        self.lab.run("wb", "iptables", "-D", "OUTPUT", *rule)
        healed = time.monotonic()
        fresh_after = None
        while time.monotonic() - healed < 120:
            view = {n["name"]: n for n in self.nodes()["nodes"]}
            if not view["wb"]["heartbeat_stale"]:
                fresh_after = time.monotonic() - healed
                break
            time.sleep(0.5)
        return {"stale_after_cut_s": stale_after, "fresh_after_heal_s": fresh_after}


def build(tmp: Path) -> tuple[Any, Any, Hosts, WanLab, Runbook]:
    lab_cm = open_lab(HOSTS, subnet=UNDERLAY)
    lab = lab_cm.__enter__()
    hosts = overlay_hosts(lab, tmp / "hosts", discovery=False)
    hosts.open()
    book = Runbook(ROOT / "runbooks" / "overlay-wireguard.md", hosts)
    book.run_through("remote-on")
    return lab_cm, lab, hosts, WanLab(lab, hosts), book


def idle(args: argparse.Namespace, wan: WanLab) -> dict[str, Any]:
    wan.set_path(args.rtt_ms, args.loss)
    time.sleep(10)
    measured_rtt = wan.ping_rtt()
    start_term = wan.nodes()["term"]
    started = time.monotonic()
    samples = stale_samples = 0
    max_age: dict[str, int] = {}
    stale_seen: list[dict[str, Any]] = []
    terms = {start_term}
    while time.monotonic() - started < args.minutes * 60:
        view = wan.nodes()
        terms.add(view["term"])
        samples += 1
        for node in view["nodes"]:
            age = node.get("heartbeat_age_ms")
            if age is not None:
                max_age[node["name"]] = max(max_age.get(node["name"], 0), int(age))
            if node["heartbeat_stale"]:
                stale_samples += 1
                stale_seen.append(
                    {
                        "t_s": round(time.monotonic() - started, 1),
                        "node": node["name"],
                        "age_ms": age,
                    }
                )
        time.sleep(2)
    warnings = {
        host: wan.hosts.run(
            host, "grep -c 'control plane unreachable' /var/log/populi/agent.log || true"
        ).strip()
        for host in ("wa", "wb")
    }
    return {
        "rtt_ms_set": args.rtt_ms,
        "loss_pct_each_way": args.loss,
        "ping_rtt_ms": measured_rtt,
        "minutes": args.minutes,
        "samples": samples,
        "stale_samples": stale_samples,
        "stale_seen": stale_seen[:20],
        "max_heartbeat_age_ms": max_age,
        "terms_seen": sorted(terms),
        "heartbeat_failures_logged": warnings,
        "stale_after_s": {n["name"]: n["stale_after_ms"] / 1000 for n in wan.nodes()["nodes"]},
    }


def matrix(args: argparse.Namespace, wan: WanLab) -> list[dict[str, Any]]:
    rows = []
    for rtt in (50, 150):
        for loss in (0, 1, 2):
            wan.set_path(rtt, loss)
            time.sleep(5)
            row: dict[str, Any] = {"rtt_ms_set": rtt, "loss_pct_each_way": loss}
            row["ping_rtt_ms"] = wan.ping_rtt()
            rtt_probe = wan.probe("wb", "rtt", 30)
            row["signed_request_ms"] = {**summary(rtt_probe["ms"]), "errors": rtt_probe["errors"]}
            cold = wan.probe("wb", "cold", 8)
            row["new_connection_request_ms"] = {**summary(cold["ms"]), "errors": cold["errors"]}
            lease = wan.probe("wb", "lease", 8)
            row["lease_grant_ms"] = summary(lease["grant_ms"])
            row["lease_renew_ms"] = summary(lease["renew_ms"])
            row["lease_release_ms"] = summary(lease["release_ms"])
            row["lease_errors"] = lease["errors"]
            row["remote_run_ms"] = wan.remote_runs(3)
            if loss in (0, 1):
                row["failure_detection"] = wan.detection()
            print(json.dumps(row), flush=True)
            rows.append(row)
    wan.clear_path()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("idle")
    one.add_argument("--rtt-ms", type=float, default=150)
    one.add_argument("--loss", type=float, default=1.0, help="percent, each way")
    one.add_argument("--minutes", type=float, default=10)
    sub.add_parser("matrix")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    for tool in ("wg", "wireguard-go", "iptables"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install wireguard-tools wireguard-go iptables")
            return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="populi-wan-") as tmp:
        lab_cm, _lab, hosts, wan, _book = build(Path(tmp))
        try:
            result: Any = idle(args, wan) if args.what == "idle" else matrix(args, wan)
        finally:
            try:
                wan.clear_path()
            finally:
                hosts.close()
                lab_cm.__exit__(None, None, None)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
