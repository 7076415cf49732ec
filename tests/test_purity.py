"""The pure core imports no trio, socket, clock or global random (docs/design.md: how it is tested)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = sorted((ROOT / "populi_peer" / "core").rglob("*.py")) + [
    ROOT / "enrollment" / name
    for name in (
        "canonical.py",
        "signing.py",
        "tokens.py",
        "revocation.py",
        "records.py",
        "hints.py",
        "errors.py",
    )
]
FORBIDDEN_MODULES = {
    "trio",
    "socket",
    "time",
    "random",
    "secrets",
    "asyncio",
    "anyio",
    "httpx",
    "sqlite3",
    "threading",
    "os",
    "subprocess",
}
FORBIDDEN_CALLS = {
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in FORBIDDEN_CALLS:
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if (node.value.attr, node.attr) in FORBIDDEN_CALLS:
                found.append(f"...{node.value.attr}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path", [p for p in PURE if p.exists()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_module_is_pure(path: Path) -> None:
    assert _violations(path) == []


def test_checker_catches_what_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import time\nfrom trio import sleep\nimport datetime\nx = datetime.datetime.now()\n"
    )
    assert len(_violations(sample)) == 3


def test_pure_set_is_not_empty() -> None:
    assert len([p for p in PURE if p.exists()]) >= 5
