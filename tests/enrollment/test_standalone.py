"""``enrollment`` is standalone: every module imports, in a fresh interpreter, with
``populi_peer`` made unimportable (issue 11; docs/conventions.md, Errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import enrollment

ROOT = Path(__file__).resolve().parents[2]

#: Run in a fresh interpreter: a meta-path finder refuses ``populi_peer`` (and any of its
#: submodules) before any other finder is asked, then every module of the package is
#: imported. Prints the modules it imported.
PROBE = """
import importlib, pkgutil, sys

class RefusePopuli:
    def find_spec(self, name, path=None, target=None):
        if name == "populi_peer" or name.startswith("populi_peer."):
            raise ImportError(f"enrollment must not import {name}")
        return None

sys.meta_path.insert(0, RefusePopuli())
import enrollment
names = ["enrollment"] + [
    m.name for m in pkgutil.walk_packages(enrollment.__path__, prefix="enrollment.")
]
for name in names:
    importlib.import_module(name)
assert not any(m == "populi_peer" or m.startswith("populi_peer.") for m in sys.modules)
print("\\n".join(names))
"""


def _probe(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_enrollment_module_imports_without_populi_peer() -> None:
    result = _probe(PROBE)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    on_disk = {
        f"enrollment.{path.stem}"
        for path in Path(enrollment.__file__).parent.glob("*.py")
        if path.stem != "__init__"
    }
    assert on_disk and on_disk <= imported


def test_the_probe_catches_an_import_of_populi_peer() -> None:
    """The guard itself works: a module that reaches for ``populi_peer`` fails the probe."""
    result = _probe(
        PROBE.replace("import enrollment\n", "import enrollment\nimport populi_peer.errors\n", 1)
    )
    assert result.returncode != 0
    assert "enrollment must not import populi_peer" in result.stderr
