"""MTU of each overlay, and what breaks above it: measured in the namespace lab (root).

    sudo .venv/bin/python bench/mtu.py

For WireGuard (wireguard-go) and Nebula, built by their runbooks' own steps (through
"check the overlay"; ``tests/lab/runbook.py``): the tunnel interface's MTU, the largest
ICMP payload that crosses with "don't fragment", and a 1 MB HTTP download over the
tunnel (TCP, as Populi's API uses it, on Populi's port, which both runbooks open on the
tunnel). Then the path's middle is made to carry only 1400 bytes without telling anyone
(the bridge ports' MTU: a bridge neither fragments nor sends ICMP, so the hosts keep
sending 1500-byte frames): a path-MTU black hole, what an operator meets when the tunnel
MTU is too large for the path. The same is measured again, and for WireGuard once more
with the tunnel MTU lowered to fit (1400 - 80 = 1320).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lab.netns import open_lab, sh  # noqa: E402
from lab.runbook import Hosts, Runbook  # noqa: E402

OVERLAYS = {
    "wireguard": ("overlay-wireguard.md", "wg0", "10.8.0.1"),
    "nebula": ("overlay-nebula.md", "nebula1", "10.42.0.1"),
}


def largest_ping(hosts: Hosts, target: str) -> int:
    """The largest ICMP payload from wb to ``target`` that crosses with DF set."""
    low, high = 500, 1500
    if "1 received" not in hosts.run("wb", f"ping -c 1 -W 2 -M do -s {low} {target} || true"):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        out = hosts.run("wb", f"ping -c 1 -W 2 -M do -s {mid} {target} 2>&1 || true")
        if "1 received" in out:
            low = mid
        else:
            high = mid - 1
    return low


def download(hosts: Hosts, lab: Any, target: str, tmp: Path) -> dict[str, Any]:
    """1 MB over HTTP from cp to wb across the tunnel; time or failure."""
    (tmp / "blob").write_bytes(b"x" * 1_000_000)
    server = subprocess.Popen(
        lab.argv(
            "cp",
            sys.executable,
            "-m",
            "http.server",
            "7431",
            "--bind",
            target,
            "--directory",
            str(tmp),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        started = time.monotonic()
        out = hosts.run(
            "wb",
            f"python3 -c \"import urllib.request as u; print(len(u.urlopen('http://{target}:7431/blob', timeout=15).read()))\" 2>&1 | tail -1 || true",
            timeout=60,
        )
        took = time.monotonic() - started
        ok = out.strip().endswith("1000000")
        return {"ok": ok, "seconds": round(took, 2), "detail": "" if ok else out.strip()[-160:]}
    finally:
        server.terminate()
        server.wait(timeout=10)


def measure(name: str, tmp: Path) -> dict[str, Any]:
    page, dev, cp_overlay = OVERLAYS[name]
    with open_lab(("cp", "wa", "wb"), subnet="198.18.0") as lab:
        hosts = Hosts(lab, tmp / name / "hosts")
        try:
            hosts.open()
            book = Runbook(ROOT / "runbooks" / page, hosts)
            book.run_through("check-overlay")
            result: dict[str, Any] = {
                "tunnel_mtu": int(hosts.run("wb", f"cat /sys/class/net/{dev}/mtu").strip())
            }
            result["underlay_1500"] = {
                "largest_df_ping_payload": largest_ping(hosts, cp_overlay),
                "download_1MB": download(hosts, lab, cp_overlay, tmp / name),
            }
            # A path whose middle carries only 1400 bytes and says nothing (a bridge does
            # not fragment and sends no ICMP): the hosts still think 1500 — a PMTU black
            # hole, as behind some PPPoE links, tunnels and cloud networks.
            for number in range(1, 4):
                sh("ip", "-n", lab.hub, "link", "set", f"v-{number}", "mtu", "1400")
            time.sleep(1)
            result["path_1400_black_hole"] = {
                "largest_df_ping_payload": largest_ping(hosts, cp_overlay),
                "download_1MB": download(hosts, lab, cp_overlay, tmp / name),
            }
            if dev == "wg0":
                for host in ("cp", "wa", "wb"):
                    lab.run(host, "ip", "link", "set", dev, "mtu", "1320")
                result["same_path_tunnel_mtu_1320"] = {
                    "largest_df_ping_payload": largest_ping(hosts, cp_overlay),
                    "download_1MB": download(hosts, lab, cp_overlay, tmp / name),
                }
            return result
        finally:
            hosts.close()


def main() -> int:
    results = {}
    for name, tools in (("wireguard", ("wg", "wireguard-go")), ("nebula", ("nebula",))):
        if any(shutil.which(t) is None for t in tools):
            results[name] = {"skipped": f"{', '.join(tools)} not installed"}
            continue
        with tempfile.TemporaryDirectory(prefix="populi-mtu-") as tmp:
            results[name] = measure(name, Path(tmp))
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
