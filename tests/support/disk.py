"""A real full disk for tests: a small tmpfs mounted as root, filled to the last byte.

Tests that use it are skipped, with the reason, where this process cannot mount one (not
root, or a container without ``CAP_SYS_ADMIN``). Nothing here fakes a failure: SQLite and
the agent meet ``ENOSPC`` from the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, *, size_kib: int = 16 * 1024) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB at ``mount_point`` (created) for the block, lazily
    unmounted after it; skips the test where none can be mounted."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, and mounting one needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file into ``directory`` until its file system has no byte left; returns
    the file (delete it to give the space back)."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            data = b"\0" * chunk
            while True:
                try:
                    os.write(fd, data)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


__all__ = ["fill", "small_tmpfs"]
