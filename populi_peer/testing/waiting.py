"""Waiting in virtual time: the one polling helper of the virtual-time tests (tests of
real processes use ``tests/support/waiting.py``).

:func:`wait_for` looks again whenever something it is told about changes — a
:class:`Changes` signal, which the virtual cluster fires at every delivery on its network
and the simulated host at every start and end of a simulated task — and otherwise every
``poll_s`` of virtual time, for state that moves with time alone (a heartbeat going stale).
So a condition that a delivery makes true is seen at the very instant of that delivery.
Each look comes once every task is blocked (:func:`trio.testing.wait_all_tasks_blocked`,
which an autojump clock waits for before it jumps): whatever that instant set off — the
answer reaching its sender, the tasks it wakes — has happened, whatever order trio ran
them in.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
import trio.testing

from populi_peer.testing.clock import require_mock_clock

T = TypeVar("T")


class Changes:
    """A broadcast "something may have changed": :meth:`notify` wakes every waiter."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


async def wait_for(
    what: str,
    probe: Callable[[], T | Awaitable[T | None] | None],
    *,
    timeout_s: float = 60.0,
    poll_s: float = 0.05,
    changes: Changes | None = None,
) -> tuple[T, float]:
    """Wait (virtual time) until ``probe()`` (sync or async) returns something truthy;
    returns that and how many virtual seconds it took. Raises ``AssertionError`` naming
    ``what`` (and the last answer) after ``timeout_s``."""
    require_mock_clock(f"wait_for({what!r})")
    started = trio.current_time()
    deadline = started + timeout_s
    while True:
        await trio.testing.wait_all_tasks_blocked()
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value, trio.current_time() - started
        now = trio.current_time()
        if now >= deadline:
            raise AssertionError(
                f"{what}: not within {timeout_s:g} s of virtual time (last: {value!r})"
            )
        with trio.move_on_at(min(now + poll_s, deadline)):
            if changes is None:
                await trio.sleep_forever()
            else:
                await changes.wait()


__all__ = ["Changes", "wait_for"]
