"""``populi events`` as an operator meets it: newest last, names beside ids, filters that
refuse what they do not know (exit 4), and ``--follow`` printing what happens next."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from support.procs import POPULI, Processes, one_line, populi
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_events_newest_last_with_names_and_refused_filters(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "cp"
    procs.init_and_start(data_dir)
    d = ("--data-dir", str(data_dir))
    for _ in range(3):
        populi("token", "create", *d, check=True)
    listing = populi("events", "--limit", "2", *d, check=True)
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:3] == ["WHEN", "NODE", "ID"]
    assert len(rows) == 2 and all("token_created" in row for row in rows)
    assert all(row.split()[2] == "cp" for row in rows)  # the name, beside the id
    assert "older events left out" in listing.stderr
    everything = populi("events", *d, check=True).stdout.splitlines()
    assert "cluster_created" in everything[1] and "token_created" in everything[-1]

    for args in (("--node", "w9"), ("--kind", "bogus")):
        refused = populi("events", *args, *d)
        assert refused.returncode == 4, (args, refused.stderr)
        assert one_line(refused.stderr) and args[1] in refused.stderr
        assert refused.stdout == ""
    usage = populi("events", "--since", "soon", *d)
    assert usage.returncode == 2 and one_line(usage.stderr)


def test_events_follow_prints_what_happens_next(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "cp"
    procs.init_and_start(data_dir)
    follower = subprocess.Popen(
        [*POPULI, "events", "--follow", "--limit", "1", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for("the first page", lambda: len(lines) >= 2, guard_s=30)
        populi(
            "node", "cordon", "cp", "--reason", "follow-me", "--data-dir", str(data_dir), check=True
        )
        (line,), took = wait_for(
            "the cordon printed by the follower",
            lambda: [x for x in lines if "follow-me" in x],
            guard_s=30,
        )
        print(f"the follower printed the event {took:.2f} s after the command returned")
        assert "cordon: active -> cordoned" in line and " cp " in line
        follower.send_signal(signal.SIGINT)
        code = follower.wait(timeout=30)
        reader.join(timeout=10)
        assert follower.stderr is not None
        assert code == 0, follower.stderr.read()  # Ctrl-C is how --follow ends
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        reader.join(timeout=10)
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
