"""Fixtures the agent tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from populi_peer.agent.agent import Agent
from populi_peer.testing.clock import require_mock_clock
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import heard_from, vcluster


@pytest.fixture
async def one_worker(tmp_path: Path) -> AsyncIterator[tuple[VirtualCluster, Agent, Agent]]:
    """A virtual cluster, its control plane and its one worker ``w1``, once the control
    plane has heard from it. The test itself must name ``autojump_clock`` (pytest-trio
    ignores a clock a fixture asks for)."""
    require_mock_clock("the one_worker fixture")
    async with vcluster(tmp_path, workers=1) as cluster:
        await heard_from(cluster, "w1")
        yield cluster, cluster.cp, cluster["w1"]
