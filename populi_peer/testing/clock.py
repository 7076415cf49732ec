"""A clock driven by trio's clock, for tests and the virtual cluster.

``wall()``, ``mono()`` and ``boot()`` all follow ``trio.current_time()`` (so pytest-trio's
``autojump_clock`` moves them together); per-node skew shifts ``wall()`` alone, and
:meth:`VirtualClock.suspend` plays a suspend: boot and wall time jump, trio's clock does not.
"""

from __future__ import annotations

import trio

#: 2027-01-15T08:00:00Z: a fixed start so virtual records are reproducible.
DEFAULT_WALL_START_S = 1_800_000_000.0


class VirtualClock:
    def __init__(
        self,
        *,
        wall_start_s: float = DEFAULT_WALL_START_S,
        skew_s: float = 0.0,
        boot_start_s: float = 1000.0,
    ) -> None:
        self.wall_start_s = wall_start_s
        self.skew_s = skew_s
        self.boot_start_s = boot_start_s
        self.suspended_s = 0.0

    def wall(self) -> float:
        return self.wall_start_s + trio.current_time() + self.skew_s + self.suspended_s

    def mono(self) -> float:
        return trio.current_time()

    def boot(self) -> float:
        return self.boot_start_s + trio.current_time() + self.suspended_s

    def suspend(self, seconds: float) -> None:
        """The machine slept ``seconds``: boot and wall time moved, trio's clock did not."""
        self.suspended_s += seconds

    def set_skew(self, skew_s: float) -> None:
        self.skew_s = skew_s


__all__ = ["DEFAULT_WALL_START_S", "VirtualClock"]
