from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.cluster import InitResult, init_cluster
from populi_peer.config import Config
from populi_peer.testing import VirtualClock


@pytest.fixture
def cluster_dir(tmp_path: Path) -> tuple[Path, InitResult]:
    data_dir = tmp_path / "cp"
    result = init_cluster(
        data_dir,
        cluster_name="lab",
        node_name="cp",
        listen="127.0.0.1:0",
        advertise=[],
        force=False,
        now_wall_s=VirtualClock().wall_start_s,
    )
    return data_dir, result


@pytest.fixture
async def virtual_agent(
    cluster_dir: tuple[Path, InitResult], autojump_clock: trio.testing.MockClock
) -> AsyncIterator[Agent]:
    data_dir, _ = cluster_dir
    agent = Agent(
        data_dir=data_dir,
        config=Config(),
        clock=VirtualClock(),
        serve=False,
        url="https://cp.virtual",
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield agent
        agent.request_stop()
        await agent.stopped.wait()


@pytest.fixture
def wall_now() -> float:
    return time.time()
