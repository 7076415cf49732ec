"""The agent is a composition root only (issue 11): no service imports it, and no fact of
the node is read through it; a fact is asked of the service that owns it
(docs/design.md, "Layout")."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from populi_peer.agent.agent import Agent

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "populi_peer" / "agent"

#: What the composition root does beyond building: its lifetime and its service list.
LIFETIME = {"run", "request_stop", "services", "shutdown_services"}


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, under TYPE_CHECKING too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_service_imports_the_composition_root() -> None:
    importers = [
        path.name
        for path in sorted(AGENT_DIR.glob("*.py"))
        if path.name != "agent.py" and "populi_peer.agent.agent" in _imported_modules(path)
    ]
    assert importers == []


def test_enrollment_imports_nothing_from_populi_peer() -> None:
    importers = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "enrollment").rglob("*.py"))
        if any(m.split(".")[0] == "populi_peer" for m in _imported_modules(path))
    ]
    assert importers == []


def test_the_agent_passes_nothing_through() -> None:
    """No property and no public method beyond the lifetime: ``agent.term`` or
    ``agent.remote_enabled()`` would be a second way to a fact its service owns."""
    properties = [name for name, value in vars(Agent).items() if isinstance(value, property)]
    public = {
        name
        for name, value in vars(Agent).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    assert properties == []
    assert public == LIFETIME
