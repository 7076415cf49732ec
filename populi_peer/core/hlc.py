"""Hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", OPODIS 2014).

An :class:`Hlc` is ``(wall_ms, counter)``: ``wall_ms`` is the largest UTC wall reading (in
milliseconds) that this node has seen, its own or a peer's, and ``counter`` orders events
that share it. Values compare as tuples, so they are totally ordered, and every event a
node stamps is strictly greater than every event it has seen (the happened-before
relation is respected) while ``wall_ms`` stays close to real time.

Two operations, both pure (the caller reads the clock and passes ``now_wall_ms``):

- :func:`hlc_tick` for a local event or a send (Algorithm 5 of the paper, "send or local
  event");
- :func:`hlc_receive` for a message received (Algorithm 5, "receive event"). A remote
  value further ahead of our wall clock than ``max_skew_ms`` is refused with
  :class:`ClockSkewError`: accepting it would drag every later stamp of ours into the
  future (docs/design.md "Cluster state": "a clock value beyond now + max skew is refused").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from populi_peer.core.wire import json_record
from populi_peer.errors import BadRequest, RefusedError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ClockSkewError(RefusedError):
    """A peer's clock reading is further ahead of ours than the skew budget allows."""

    code = "clock_skew"


@dataclass(frozen=True, slots=True, order=True)
class Hlc:
    """One hybrid logical clock value; ordered by ``(wall_ms, counter)``."""

    wall_ms: int
    counter: int

    def __post_init__(self) -> None:
        for name in ("wall_ms", "counter"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise BadRequest(
                    f"hlc: {name} must be a non-negative integer, got {value!r}", field=name
                )

    def to_json(self) -> dict[str, Any]:
        return {"wall_ms": self.wall_ms, "counter": self.counter}

    @classmethod
    def from_json(cls, data: Any) -> Hlc:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        obj = json_record(data, "hlc", ("wall_ms", "counter"))
        return cls(wall_ms=obj["wall_ms"], counter=obj["counter"])


#: The smallest value; every tick of a fresh clock is greater.
HLC_ZERO = Hlc(0, 0)


def _check_now(now_wall_ms: int) -> None:
    if not _is_int(now_wall_ms) or now_wall_ms < 0:
        raise BadRequest(
            f"now_wall_ms must be a non-negative integer, got {now_wall_ms!r}",
            field="now_wall_ms",
        )


def check_clock_skew(remote: Hlc, *, now_wall_ms: int, max_skew_ms: int) -> None:
    """Refuse ``remote`` if its wall reading is beyond ``now_wall_ms + max_skew_ms``.

    A reading exactly at the limit is accepted. Readings in the past are always fine: a
    lagging peer cannot push our clock anywhere.
    """
    _check_now(now_wall_ms)
    if not _is_int(max_skew_ms) or max_skew_ms < 0:
        raise BadRequest(
            f"max_skew_ms must be a non-negative integer, got {max_skew_ms!r}",
            field="max_skew_ms",
        )
    skew_ms = remote.wall_ms - now_wall_ms
    if skew_ms > max_skew_ms:
        raise ClockSkewError(
            f"clock value is {skew_ms / 1000:.3f} s ahead of this node's clock, beyond the "
            f"{max_skew_ms / 1000:.3f} s skew budget; check NTP on both machines",
            skew_ms=skew_ms,
            max_skew_ms=max_skew_ms,
        )


def hlc_tick(prev: Hlc, now_wall_ms: int) -> Hlc:
    """The clock value for a local event or a send, strictly greater than ``prev``.

    If the wall clock has moved past ``prev`` it is taken with counter 0; otherwise (the
    wall clock stood still or stepped back) ``prev`` is kept and its counter bumped.
    """
    _check_now(now_wall_ms)
    if now_wall_ms > prev.wall_ms:
        return Hlc(now_wall_ms, 0)
    return Hlc(prev.wall_ms, prev.counter + 1)


def hlc_receive(prev: Hlc, remote: Hlc, now_wall_ms: int, max_skew_ms: int) -> Hlc:
    """The clock value after receiving ``remote``: greater than both ``prev`` and ``remote``.

    Raises :class:`ClockSkewError` (and the caller keeps ``prev``) when ``remote.wall_ms``
    is beyond ``now_wall_ms + max_skew_ms``.
    """
    check_clock_skew(remote, now_wall_ms=now_wall_ms, max_skew_ms=max_skew_ms)
    wall_ms = max(prev.wall_ms, remote.wall_ms, now_wall_ms)
    if wall_ms == prev.wall_ms and wall_ms == remote.wall_ms:
        counter = max(prev.counter, remote.counter) + 1
    elif wall_ms == prev.wall_ms:
        counter = prev.counter + 1
    elif wall_ms == remote.wall_ms:
        counter = remote.counter + 1
    else:
        counter = 0
    return Hlc(wall_ms, counter)


__all__ = [
    "HLC_ZERO",
    "ClockSkewError",
    "Hlc",
    "check_clock_skew",
    "hlc_receive",
    "hlc_tick",
]
