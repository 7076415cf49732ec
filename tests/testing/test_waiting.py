"""The two ways to wait: in virtual time (``populi_peer.testing.waiting``) and for real
processes (``support.waiting``)."""

from __future__ import annotations

import time

import pytest
import trio
from trio.testing import MockClock

from populi_peer.testing.clock import NotVirtualTime
from populi_peer.testing.waiting import Changes, wait_for
from support import waiting as real


async def test_a_change_is_seen_at_its_own_instant(autojump_clock: MockClock) -> None:
    """Woken by the change, not by the next poll: the time it took is exact."""
    changes = Changes()
    state = {"done": False}

    async def later() -> None:
        await trio.sleep(3.217)
        state["done"] = True
        changes.notify()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        value, took = await wait_for("done", lambda: state["done"], poll_s=10, changes=changes)
    assert (value, took) == (True, 3.217)


async def test_each_look_comes_once_the_instant_has_settled(autojump_clock: MockClock) -> None:
    """A change whose consequences other tasks complete at the same instant: the look
    comes after them, whatever order trio runs the tasks in."""
    changes = Changes()
    handed_on = trio.Event()
    state = {"sent": False, "received": False}

    async def sender() -> None:
        await trio.sleep(1)
        state["sent"] = True
        changes.notify()
        handed_on.set()

    async def receiver() -> None:
        await handed_on.wait()
        await trio.lowlevel.checkpoint()
        state["received"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
        seen, took = await wait_for(
            "sent", lambda: state["sent"] and dict(state), poll_s=10, changes=changes
        )
    assert seen == {"sent": True, "received": True}
    assert took == 1


async def test_state_that_moves_with_time_alone_is_polled(autojump_clock: MockClock) -> None:
    async def ripe() -> float | None:
        await trio.lowlevel.checkpoint()
        return trio.current_time() if trio.current_time() >= 2 else None

    value, took = await wait_for("ripe", ripe, poll_s=0.5)
    assert (value, took) == (2.0, 2.0)


async def test_a_virtual_wait_names_what_did_not_happen(autojump_clock: MockClock) -> None:
    with pytest.raises(AssertionError, match=r"the moon: not within 5 s of virtual time"):
        await wait_for("the moon", lambda: None, timeout_s=5)
    assert trio.current_time() == 5


async def test_a_virtual_wait_refuses_the_real_clock() -> None:
    with pytest.raises(NotVirtualTime):
        await wait_for("anything", lambda: True)


def test_a_real_wait_returns_the_answer_or_names_what_did_not_happen() -> None:
    started = time.monotonic()
    value, took = real.wait_for("soon", lambda: time.monotonic() - started > 0.05 and "yes")
    assert value == "yes" and took > 0.05
    with pytest.raises(AssertionError, match=r"never: not within 0.1 s \(last: 0\)"):
        real.wait_for("never", lambda: 0, guard_s=0.1, every_s=0.01)
    assert not real.settle(lambda: False, guard_s=0.05)


async def test_a_real_wait_refuses_virtual_time(autojump_clock: MockClock) -> None:
    with pytest.raises(RuntimeError, match="real processes"):
        await real.wait_for_async("a process", lambda: True)
