"""Agent footprint: idle RSS, idle CPU % over a window, and time from process start to
health answering. Prints figures; never passes or fails on them.

    python bench/agent_footprint.py [--runs 5] [--idle-s 30]

Each run creates a fresh single-node cluster in a temporary folder, starts a real
``populi agent`` process, measures, and stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

POPULI = [sys.executable, "-m", "populi_peer"]
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_run(idle_s: float) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="populi-bench-"))
    data_dir = root / "d"
    subprocess.run(
        [
            *POPULI,
            "init",
            "--cluster-name",
            "bench",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
        ],
        check=True,
        capture_output=True,
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [*POPULI, "agent", "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runtime = data_dir / "run" / "agent.json"
        url = None
        while time.monotonic() - started < 60:
            if url is None and runtime.exists():
                try:
                    url = json.loads(runtime.read_text())["url"]
                except (ValueError, KeyError):
                    url = None
            if url:
                try:
                    if (
                        httpx.get(url + "/v1/populi/health", verify=False, timeout=1).status_code
                        == 200
                    ):
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.01)
        ready_s = time.monotonic() - started
        time.sleep(1.0)  # let start-up work settle before measuring idle
        ticks0, t0 = _cpu_ticks(proc.pid), time.monotonic()
        time.sleep(idle_s)
        ticks1, t1 = _cpu_ticks(proc.pid), time.monotonic()
        cpu_pct = 100.0 * (ticks1 - ticks0) / TICKS / (t1 - t0)
        rss_mib = _rss_kib(proc.pid) / 1024
        return {"start_to_health_s": ready_s, "idle_cpu_pct": cpu_pct, "idle_rss_mib": rss_mib}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=30.0)
    args = parser.parse_args()
    results = [one_run(args.idle_s) for _ in range(args.runs)]
    print(f"agent footprint, {args.runs} runs, idle window {args.idle_s:.0f} s")
    for key, unit in (("start_to_health_s", "s"), ("idle_cpu_pct", "%"), ("idle_rss_mib", "MiB")):
        values = sorted(r[key] for r in results)
        print(
            f"  {key:20} median {statistics.median(values):8.3f} {unit}   min {values[0]:8.3f}   max {values[-1]:8.3f}"
        )


if __name__ == "__main__":
    main()
