"""``populi --version`` names the commit: from git for a source checkout (the single
file carries it from its build: tests/binary/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from populi_peer.selfexec import populi_command
from populi_peer.version import source_commit

ROOT = Path(__file__).resolve().parents[2]


def test_version_names_the_checkouts_commit() -> None:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    result = subprocess.run(
        [sys.executable, "-m", "populi_peer", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    if head.returncode != 0:
        assert "commit unknown" in result.stdout
        return
    assert result.stdout.startswith("populi ")
    assert f"commit {head.stdout.strip()}" in result.stdout


def test_no_checkout_no_commit(tmp_path: Path) -> None:
    assert source_commit(tmp_path) is None


def test_populi_started_by_populi_ignores_modules_in_its_working_directory(
    tmp_path: Path,
) -> None:
    """The agents ``populi demo`` starts run from wherever the user ran it: a stray
    ``json.py`` there must not stand in for the standard library's."""
    (tmp_path / "json.py").write_text("raise SystemExit(99)\n")
    result = subprocess.run(
        [*populi_command(), "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("populi ")
