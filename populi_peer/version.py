"""What ``populi --version`` says: the release, and the commit it was built from.

The single-file build carries the commit in a module that ``scripts/build-binary`` writes
at build time (:data:`BUILD_INFO_MODULE`); a source checkout (an editable install) asks
git; any other install says ``unknown``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from populi_peer import __version__, selfexec

#: The module the build writes: ``COMMIT`` (40 hex digits, ``-dirty`` when the tree had
#: changes) and ``BUILT_WITH`` (the tool and its version).
BUILD_INFO_MODULE = "_populi_build"
GIT_TIMEOUT_S = 5.0


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout Populi runs from (``-dirty`` when tracked files were
    changed), or None when it does not run from a git checkout."""
    if root is None:
        import populi_peer

        root = Path(populi_peer.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    head = _git(root, "rev-parse", "HEAD")
    if not head:
        return None
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if changes else "")


def build_info() -> dict[str, str]:
    """``commit`` and ``kind`` (``single-file``, ``source`` or ``installed``), plus
    ``built_with`` for the single file."""
    if selfexec.frozen():
        try:
            module = importlib.import_module(BUILD_INFO_MODULE)
        except ImportError:
            return {"commit": "unknown", "kind": "single-file"}
        return {
            "commit": str(getattr(module, "COMMIT", "unknown")),
            "kind": "single-file",
            "built_with": str(getattr(module, "BUILT_WITH", "unknown")),
        }
    commit = source_commit()
    if commit is None:
        return {"commit": "unknown", "kind": "installed"}
    return {"commit": commit, "kind": "source"}


def version_text() -> str:
    """``populi 0.1.0 (commit 0123abcd…, single-file, Python 3.11.7)``."""
    info = build_info()
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"populi {__version__} (commit {info['commit']}, {info['kind']}, Python {python})"


__all__ = ["BUILD_INFO_MODULE", "build_info", "source_commit", "version_text"]
