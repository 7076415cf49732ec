"""The public surface is curated: each package's ``__all__`` is pinned in ``exports.json``
beside this test, so a change to it is a deliberate change to that file (STYLE: small
curated public surface)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

#: Each package and the names its ``__all__`` must hold, read from the pinned list.
EXPECTED: dict[str, list[str]] = json.loads(
    Path(__file__).with_name("exports.json").read_text(encoding="utf-8")
)


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_pinned(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"


def test_importing_the_package_is_cheap() -> None:
    """``import populi_peer`` must not pull in trio, httpx or cryptography (the CLI's
    usage errors and --help stay fast)."""
    import subprocess
    import sys

    code = "import sys, populi_peer, populi_peer.cli.main; print(','.join(m for m in ('trio', 'httpx', 'cryptography') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
