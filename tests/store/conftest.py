from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from populi_peer.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated database in a temporary data directory."""
    opened = Store.open(tmp_path, create=True)
    yield opened
    opened.close()


@pytest.fixture
def reopen(tmp_path: Path, store: Store) -> Iterator[object]:
    """Close ``store`` and open the same file again: what a restarted agent reads."""
    opened: list[Store] = []

    def _reopen() -> Store:
        store.close()
        again = Store.open(tmp_path)
        opened.append(again)
        return again

    yield _reopen
    for again in opened:
        again.close()
