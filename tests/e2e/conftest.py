from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.procs import Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()
