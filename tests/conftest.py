from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from populi_peer.agent.agent import Agent
from populi_peer.cluster import InitResult
from populi_peer.testing.clock import require_mock_clock
from populi_peer.testing.cluster import open_virtual_agent

# The shared test helpers (``support``) sit beside this file; a pytest run that loads this
# file from elsewhere (tests/testing/test_virtual_time.py runs one) finds them too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.cluster import init_lab_cluster
from support.procs import Processes

#: Tests reach loopback and the namespaces they build, never this machine's own network:
#: every ``populi`` they start inherits LAN discovery off (no multicast on the host's
#: interfaces, e.g. when a join's contacts fail). Lab tests turn it on in their namespaces.
os.environ["POPULI_DISCOVERY__ENABLED"] = "0"

#: Property tests judge what a function returns, never how long one example took on a
#: shared 2-core machine: no per-example wall-clock deadline (hypothesis's is 200 ms).
settings.register_profile("populi", deadline=None)
settings.load_profile("populi")


@pytest.fixture
def cluster_dir(tmp_path: Path) -> tuple[Path, InitResult]:
    data_dir = tmp_path / "cp"
    result = init_lab_cluster(data_dir)
    return data_dir, result


@pytest.fixture
async def virtual_agent(cluster_dir: tuple[Path, InitResult]) -> AsyncIterator[Agent]:
    """The agent of ``cluster_dir``, running on virtual time. The test itself must name
    ``autojump_clock`` (pytest-trio ignores a clock a fixture asks for); this fixture
    raises ``NotVirtualTime`` when it did not."""
    require_mock_clock("the virtual_agent fixture")
    async with open_virtual_agent(cluster_dir[0], url="https://cp.virtual") as agent:
        yield agent


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Real ``populi`` processes; each one started is ended (by its PID) after the test."""
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()


@pytest.fixture
def wall_now() -> float:
    return time.time()
