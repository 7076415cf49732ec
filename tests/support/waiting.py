"""Waiting for real processes, in real time: the one polling helper of the tests that run
real agents, supervisors and tasks (virtual-time tests use
:func:`populi_peer.testing.waiting.wait_for`).

The guard is there so that a hang fails the test; it is never a timing assertion (two
busy cores). Print how long something took; do not assert it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio
import trio.testing

T = TypeVar("T")


class _Guard:
    """Looks at the answers of one wait: done when one is truthy, AssertionError naming
    ``what`` (and the last answer) once ``guard_s`` has passed."""

    def __init__(self, what: str, guard_s: float) -> None:
        self.what = what
        self.guard_s = guard_s
        self.started = time.monotonic()

    def done(self, value: object) -> bool:
        if value:
            return True
        if self.took > self.guard_s:
            raise AssertionError(f"{self.what}: not within {self.guard_s:g} s (last: {value!r})")
        return False

    @property
    def took(self) -> float:
        return time.monotonic() - self.started


def wait_for(
    what: str, probe: Callable[[], T | None], *, guard_s: float = 60.0, every_s: float = 0.1
) -> tuple[T, float]:
    """Call ``probe`` until it returns something truthy; returns that and how long it took.
    Raises ``AssertionError`` naming ``what`` (and the last answer) after ``guard_s``."""
    guard = _Guard(what, guard_s)
    while not guard.done(value := probe()):
        time.sleep(every_s)
    return value, guard.took  # type: ignore[return-value]


def settle(probe: Callable[[], object], *, guard_s: float, every_s: float = 0.01) -> bool:
    """Give ``probe`` up to ``guard_s`` to come true; whether it did. For clean-ups that
    look afterwards and report what is left."""
    try:
        wait_for("settle", probe, guard_s=guard_s, every_s=every_s)
    except AssertionError:
        return False
    return True


async def wait_for_async(
    what: str, probe: Callable[[], T | None], *, guard_s: float = 60.0, every_s: float = 0.1
) -> tuple[T, float]:
    """:func:`wait_for` inside ``trio.run`` on the real clock (it checkpoints between
    looks). Refuses a ``MockClock``: real processes do not follow virtual time."""
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        raise RuntimeError(f"wait_for_async({what!r}) waits for real processes: not on a MockClock")
    guard = _Guard(what, guard_s)
    while not guard.done(value := probe()):
        await trio.sleep(every_s)
    return value, guard.took  # type: ignore[return-value]


__all__ = ["settle", "wait_for", "wait_for_async"]
