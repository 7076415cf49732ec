from __future__ import annotations

import pytest
import trio.testing

from populi_peer.testing import VirtualClock


@pytest.fixture
def clock() -> VirtualClock:
    """Wall, mono and boot time on trio's clock (virtual under a MockClock)."""
    return VirtualClock()


@pytest.fixture
def thread_autojump_clock() -> trio.testing.MockClock:
    """An autojump clock for tests that run NVML calls in real worker threads.

    ``autojump_clock`` (threshold 0) jumps as soon as no *task* is runnable, and a task
    waiting for a worker thread is not runnable: the clock would jump past the call's
    timeout while the thread is still answering. Jumping only after 50 ms of real idleness
    lets a worker thread answer first; times stay exact (the clock still jumps straight to
    the next deadline).
    """
    return trio.testing.MockClock(autojump_threshold=0.05)
