"""``/proc`` and cgroup pid lists, read from real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from populi_peer.exec import _proc


def test_read_pids_reads_every_pid_up_to_one_that_does_not_read(tmp_path: Path) -> None:
    listed = tmp_path / "cgroup.procs"
    listed.write_text("12\n34 56\n")
    assert _proc.read_pids(listed) == [12, 34, 56]
    listed.write_text("12 x 34")
    assert _proc.read_pids(listed) == [12]
    assert _proc.read_pids(tmp_path / "gone") == []


def test_children_of_lists_a_child_this_process_started() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in _proc.children_of(os.getpid())
        assert child.pid in _proc.read_pids(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    finally:
        child.communicate(b"")
    assert child.pid not in _proc.children_of(os.getpid())
