"""One agent per data directory: the lock itself, with real ``flock`` and real processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from populi_peer.cluster import wipe_node_files
from populi_peer.datadir_lock import LOCK_FILE_NAME, DataDirLock, holder_pid
from populi_peer.errors import AlreadyRunning
from support.cluster import init_lab_cluster

#: A separate process that tries the lock: 0 taken (and given back), 1 found held.
TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
sys.exit(0)
"""


def other_process_can_lock(data_dir: Path) -> bool:
    code = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(data_dir / LOCK_FILE_NAME)]
    ).returncode
    assert code in (0, 1)
    return code == 0


def test_a_second_lock_says_already_running_with_the_pid(tmp_path: Path) -> None:
    lock = DataDirLock.acquire(tmp_path)
    try:
        assert holder_pid(tmp_path) == os.getpid()
        assert not other_process_can_lock(tmp_path)
        with pytest.raises(AlreadyRunning) as info:
            DataDirLock.acquire(tmp_path)
        assert info.value.exit_code == 4 and info.value.code == "already_running"
        assert str(info.value).startswith(f"already running (pid {os.getpid()})")
        assert "\n" not in str(info.value)
        assert info.value.details["pid"] == os.getpid()
    finally:
        lock.release()
    assert other_process_can_lock(tmp_path)
    again = DataDirLock.acquire(tmp_path)
    again.release()
    assert (tmp_path / LOCK_FILE_NAME).exists()  # the file stays; only the lock goes


def test_the_lock_is_not_inherited_by_child_processes(tmp_path: Path) -> None:
    """A child that outlives the agent (a task supervisor) must not keep the directory
    locked: the descriptor is close-on-exec, even for a child that keeps every fd."""
    lock = DataDirLock.acquire(tmp_path)
    assert lock._fd is not None
    assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        close_fds=False,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # settled
        lock.release()
        assert other_process_can_lock(tmp_path), "a child process kept the data directory locked"
        targets = set()
        for fd in os.listdir(f"/proc/{child.pid}/fd"):
            try:
                targets.add(os.readlink(f"/proc/{child.pid}/fd/{fd}"))
            except FileNotFoundError:  # closed between the listing and the read
                continue
        assert str(tmp_path / LOCK_FILE_NAME) not in targets
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_force_refuses_to_wipe_a_directory_an_agent_runs_on(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    init_lab_cluster(data_dir, now_wall_s=1_700_000_000.0)
    lock = DataDirLock.acquire(data_dir)
    before = sorted(p.name for p in data_dir.iterdir())
    try:
        with pytest.raises(AlreadyRunning):
            init_lab_cluster(data_dir, force=True, now_wall_s=1_700_000_000.0)
        with pytest.raises(AlreadyRunning):
            wipe_node_files(data_dir)
        assert sorted(p.name for p in data_dir.iterdir()) == before
    finally:
        lock.release()
    wipe_node_files(data_dir)
    assert not (data_dir / "populi.db").exists()
