"""Virtual time cannot be used on the real clock by mistake.

pytest-trio hands a clock to ``trio.run`` only when the test function itself names it; a
test that reached ``autojump_clock`` only through a fixture ran on the real clock,
waiting out every virtual second. Every virtual-time helper now checks the clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from populi_peer.testing import VirtualClock
from populi_peer.testing.clock import NotVirtualTime, require_mock_clock
from populi_peer.testing.cluster import open_virtual_agent, open_virtual_cluster
from populi_peer.testing.sim import open_sim_host


async def test_a_virtual_clock_refuses_the_real_clock() -> None:
    clock = VirtualClock()
    for read in (clock.wall, clock.mono, clock.boot):
        with pytest.raises(NotVirtualTime, match=r"name autojump_clock .* own arguments"):
            read()


def test_a_virtual_clock_refuses_to_be_read_outside_trio() -> None:
    with pytest.raises(NotVirtualTime, match=r"trio\.run"):
        VirtualClock().wall()


async def test_the_virtual_builders_refuse_the_real_clock(tmp_path: Path) -> None:
    with pytest.raises(NotVirtualTime, match="a VirtualCluster runs on trio's real clock"):
        async with open_virtual_cluster(tmp_path / "cluster"):
            pass  # pragma: no cover
    with pytest.raises(NotVirtualTime, match="a virtual agent"):
        async with open_virtual_agent(tmp_path / "agent", url="https://cp.virtual"):
            pass  # pragma: no cover
    with pytest.raises(NotVirtualTime, match="a SimHost"):
        async with open_sim_host():
            pass  # pragma: no cover


FORGOT_THE_CLOCK = """
from populi_peer.agent.agent import Agent


async def test_forgot_the_clock(virtual_agent: Agent) -> None:
    pass


async def test_named_the_clock(autojump_clock, virtual_agent: Agent) -> None:
    assert virtual_agent.clock.mono() == 0.0
"""

CONFTEST = """
import importlib.util

_spec = importlib.util.spec_from_file_location("suite_conftest", {path!r})
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
cluster_dir, virtual_agent = _suite.cluster_dir, _suite.virtual_agent
"""


def test_the_fixtures_refuse_a_test_that_does_not_name_the_clock(tmp_path: Path) -> None:
    """The suite's ``virtual_agent`` fixture, in a test that forgot ``autojump_clock``:
    the test fails, naming the fixture and the fix (it ran on the real clock before)."""
    suite_conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    (tmp_path / "conftest.py").write_text(CONFTEST.format(path=str(suite_conftest)))
    (tmp_path / "test_forgot.py").write_text(FORGOT_THE_CLOCK)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "trio_mode=true"]
        + ["--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_forgot.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert "1 failed, 1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert "FAILED test_forgot.py::test_forgot_the_clock" in result.stdout
    assert "NotVirtualTime: the virtual_agent fixture runs on trio's real clock" in result.stdout


async def test_named_clock_is_virtual_and_exact(autojump_clock: MockClock) -> None:
    assert require_mock_clock() is autojump_clock
    clock = VirtualClock(boot_start_s=500.0)
    await trio.sleep(3600)
    assert trio.current_time() == 3600.0
    assert (clock.mono(), clock.boot()) == (3600.0, 4100.0)
