"""One clock interface with three readings.

- ``wall()``: UTC seconds since the epoch; for records, certificates and operator deadlines.
  May jump (NTP, skew). Never used for timers.
- ``mono()``: seconds on trio's clock; for timers inside one process. Never persisted.
- ``boot()``: seconds on ``CLOCK_BOOTTIME``, which keeps counting through suspend; for lease
  deadlines that a process on this machine enforces (safety rule 3).

The agent uses :class:`SystemClock`; tests use :class:`populi_peer.testing.VirtualClock`,
driven by trio's clock, so that ``autojump_clock`` moves all three readings together and a
test can move boot time alone to play a suspend.

Pure code (``populi_peer.core``, ``enrollment``) never calls a clock: it takes ``now_wall``
/ ``now_mono`` arguments.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float: ...

    def mono(self) -> float: ...

    def boot(self) -> float: ...


def boot_time() -> float:
    """``CLOCK_BOOTTIME`` in seconds (falls back to ``CLOCK_MONOTONIC`` off Linux)."""
    clock_id = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime(clock_id)


class SystemClock:
    """The real clocks. ``mono()`` is trio's clock when called inside ``trio.run``."""

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        try:
            import trio

            return trio.current_time()
        except RuntimeError:
            return time.monotonic()

    def boot(self) -> float:
        return boot_time()


def wall_ms(clock: Clock) -> int:
    """``clock.wall()`` in whole milliseconds (how records and events carry times)."""
    return int(clock.wall() * 1000)


__all__ = ["Clock", "SystemClock", "boot_time", "wall_ms"]
