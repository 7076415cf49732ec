"""A clock driven by trio's clock, for tests and the virtual cluster.

``wall()``, ``mono()`` and ``boot()`` all follow ``trio.current_time()`` (so pytest-trio's
``autojump_clock`` moves them together); per-node skew shifts ``wall()`` alone, and
:meth:`VirtualClock.suspend` plays a suspend: boot and wall time jump, trio's clock does not.

Virtual time needs trio's :class:`~trio.testing.MockClock`: every reading checks for it
(:func:`require_mock_clock`) and fails loudly otherwise. pytest-trio hands a clock to
``trio.run`` only when the *test function itself* names it (``autojump_clock`` or
``mock_clock`` among its arguments); a fixture asking for it is not enough, and the test
would silently run on the real clock, waiting out every virtual second.
"""

from __future__ import annotations

import trio
import trio.testing

#: 2027-01-15T08:00:00Z: a fixed start so virtual records are reproducible.
DEFAULT_WALL_START_S = 1_800_000_000.0


class NotVirtualTime(RuntimeError):
    """Virtual-time test helpers were used on trio's real clock."""


def require_mock_clock(what: str = "virtual time") -> trio.testing.MockClock:
    """The running trio clock, which must be a :class:`~trio.testing.MockClock`; raises
    :class:`NotVirtualTime` naming ``what`` otherwise (or outside ``trio.run``)."""
    try:
        clock = trio.lowlevel.current_clock()
    except RuntimeError:
        raise NotVirtualTime(f"{what} needs a running trio.run on a MockClock") from None
    if not isinstance(clock, trio.testing.MockClock):
        raise NotVirtualTime(
            f"{what} runs on trio's real clock ({type(clock).__name__}): name autojump_clock "
            "(or mock_clock) in the test function's own arguments; pytest-trio ignores a "
            "clock that only a fixture asks for"
        )
    return clock


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
        return self.wall_start_s + _virtual_now() + self.skew_s + self.suspended_s

    def mono(self) -> float:
        return _virtual_now()

    def boot(self) -> float:
        return self.boot_start_s + _virtual_now() + self.suspended_s

    def suspend(self, seconds: float) -> None:
        """The machine slept ``seconds``: boot and wall time moved, trio's clock did not."""
        self.suspended_s += seconds

    def set_skew(self, skew_s: float) -> None:
        self.skew_s = skew_s


def _virtual_now() -> float:
    return require_mock_clock("a VirtualClock").current_time()


__all__ = ["DEFAULT_WALL_START_S", "NotVirtualTime", "VirtualClock", "require_mock_clock"]
