"""The one table of timings by path scope (docs/wan.md, "Timings by scope").

Scope belongs to the path (:mod:`populi_peer.core.scope`); the control plane judges each
node's heartbeats by the scope of the path they arrive on and tells the node, in every
answer, the interval, timeout and staleness bound it judges by. Everything that decides
"is this node alive" reads :class:`TimingTable`: the heartbeat sender's cadence and retry
schedule (:func:`heartbeat_retry_delay_s`), the control plane's stale verdict (placement
eligibility, ``populi nodes``), and the stale-holder flag of a lease (and its automatic
revocation, when the cluster turns that on).

Keys, per scope (node config ``[timings.local|lan|overlay]``):

``heartbeat_interval_s``
    how often a node sends a heartbeat on a path of this scope;
``heartbeat_timeout_s``
    how long one heartbeat waits for its answer before it counts as lost (the next one
    is sent one interval later: :func:`heartbeat_retry_delay_s`);
``stale_after_s``
    heartbeat age after which the control plane calls the node stale.

A table is refused unless every scope tolerates at least one lost heartbeat
(:func:`tolerated_losses`): with the worst case of the sender's schedule, one heartbeat
lost on the way (taking its whole timeout to be noticed) must not make the node stale.
The defaults tolerate two losses in a row on an overlay path with 150 ms round trips.

What is *not* here, on purpose: the lease TTL, its renewal cadence (TTL/3) and expiry
margin, the election timeout and the leader lease are cluster-wide settings (the signed
settings record, ``populi settings``), sized for the slowest scope between the parties.
A safety deadline that depended on the path a holder happened to use would make two
nodes disagree about when a lease is dead (safety rules 3 and 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Final, Protocol

from populi_peer.core.scope import SCOPES, Scope
from populi_peer.errors import ConfigError

#: Consecutive failures retried one interval apart before the sender backs off: a lost
#: heartbeat or two on a lossy overlay path must not stretch the gap a stale verdict sees.
FAST_RETRIES: Final = 2
#: The longest wait between heartbeats to a control plane that does not answer.
MAX_BACKOFF_S: Final = 30.0
#: Round trip assumed when a table is checked (the overlay bound docs/wan.md sizes for).
DESIGN_RTT_S: Final = 0.15


class Rng(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def _seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}", key=name)
    return float(value)


@dataclass(frozen=True, slots=True)
class ScopeTimings:
    """Heartbeat timings on a path of one scope (keys: module docstring)."""

    heartbeat_interval_s: float
    stale_after_s: float
    heartbeat_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "stale_after_s", "heartbeat_timeout_s"):
            _seconds(name, getattr(self, name))
        if self.stale_after_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"stale_after_s ({self.stale_after_s}) must be greater than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or every peer "
                "would look stale between two heartbeats",
                key="stale_after_s",
            )

    @property
    def stale_after_ms(self) -> int:
        """``stale_after_s`` in whole milliseconds, as :func:`routing_eligibility` takes it."""
        return round(self.stale_after_s * 1000)

    def to_json(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


#: Defaults per scope. LAN and local paths answer in milliseconds. An overlay may relay
#: (a DERP server, a Nebula relay) or cross the Internet: 150 ms round trips and 1 % loss
#: are normal there, so it beats less often, waits longer for an answer and takes three
#: missed beats before "stale" (docs/wan.md works the numbers).
DEFAULT_SCOPE_TIMINGS: Final[Mapping[Scope, ScopeTimings]] = MappingProxyType(
    {
        "local": ScopeTimings(heartbeat_interval_s=1.0, stale_after_s=5.0, heartbeat_timeout_s=2.0),
        "lan": ScopeTimings(heartbeat_interval_s=1.0, stale_after_s=5.0, heartbeat_timeout_s=2.0),
        "overlay": ScopeTimings(
            heartbeat_interval_s=2.0, stale_after_s=15.0, heartbeat_timeout_s=4.0
        ),
    }
)


def worst_age_s(timing: ScopeTimings, *, losses: int, rtt_s: float = DESIGN_RTT_S) -> float:
    """The oldest a node's last heartbeat can look to the control plane just before the
    heartbeat that follows ``losses`` lost ones arrives, on the sender's schedule:

    the last good heartbeat arrives (half a round trip after it was sent); its answer
    comes back, the sender waits one interval and sends the next; each lost one is
    noticed after ``heartbeat_timeout_s`` and retried after
    :func:`heartbeat_retry_delay_s` (its upper bound); the good one arrives half a round
    trip after it was sent.
    """
    if losses < 0:
        raise ValueError("losses must be >= 0")
    age = rtt_s / 2 + timing.heartbeat_interval_s + rtt_s / 2
    for failures in range(1, losses + 1):
        age += timing.heartbeat_timeout_s + _retry_bound_s(timing, failures, FAST_RETRIES)
    return age


def tolerated_losses(timing: ScopeTimings, *, rtt_s: float = DESIGN_RTT_S) -> int:
    """How many heartbeats in a row may be lost without a stale verdict (at most 16)."""
    losses = 0
    while (
        losses < 16 and worst_age_s(timing, losses=losses + 1, rtt_s=rtt_s) <= timing.stale_after_s
    ):
        losses += 1
    return losses


def fast_retries(
    timing: ScopeTimings, *, election_timeout_max_s: float = 0.0, voters: int = 1
) -> int:
    """How many consecutive failures are retried one interval apart: :data:`FAST_RETRIES`,
    plus, where another voter could be elected (``voters`` > 1), as many as cover the
    cluster's longest election timeout (a node whose leader died asks the voters who
    leads at every failure from the second on, and finds the new leader within one
    interval of its election, not a backoff later: ADR 0019)."""
    span = election_timeout_max_s
    if isinstance(span, bool) or not isinstance(span, (int, float)):
        raise ValueError(f"election_timeout_max_s must be a number of seconds, got {span!r}")
    if not math.isfinite(span) or span < 0:
        raise ValueError(f"election_timeout_max_s must be >= 0, got {span}")
    if voters <= 1:
        return FAST_RETRIES
    return FAST_RETRIES + math.ceil(span / timing.heartbeat_interval_s)


def _retry_bound_s(timing: ScopeTimings, failures: int, fast: int) -> float:
    interval = timing.heartbeat_interval_s
    if failures <= fast:
        return interval
    backoff: float = interval * 2.0 ** min(failures - fast, 6)
    return max(interval, min(backoff, MAX_BACKOFF_S))


def heartbeat_retry_delay_s(
    timing: ScopeTimings,
    failures: int,
    rng: Rng,
    *,
    election_timeout_max_s: float = 0.0,
    voters: int = 1,
) -> float:
    """How long the sender waits before its next heartbeat after ``failures`` consecutive
    failures (0: the last one was answered): one interval for the first
    :func:`fast_retries` failures (:data:`FAST_RETRIES`, more through an election), then
    exponential backoff (capped at :data:`MAX_BACKOFF_S`, jittered to half of it at the
    least, never below one interval) so that a control plane that is down is not hammered
    by every node at once."""
    if failures < 0:
        raise ValueError("failures must be >= 0")
    fast = fast_retries(timing, election_timeout_max_s=election_timeout_max_s, voters=voters)
    bound = _retry_bound_s(timing, failures, fast)
    if failures <= fast:
        return bound
    jittered: float = bound * rng.uniform(0.5, 1.0)
    return max(timing.heartbeat_interval_s, jittered)


@dataclass(frozen=True, slots=True)
class TimingTable:
    """The timings of every scope; the one place the agent reads them from."""

    local: ScopeTimings = DEFAULT_SCOPE_TIMINGS["local"]
    lan: ScopeTimings = DEFAULT_SCOPE_TIMINGS["lan"]
    overlay: ScopeTimings = DEFAULT_SCOPE_TIMINGS["overlay"]

    def __post_init__(self) -> None:
        for scope in SCOPES:
            timing = self.for_scope(scope)
            if tolerated_losses(timing) < 1:
                raise ConfigError(
                    f"timings.{scope}: one lost heartbeat would make a node stale "
                    f"(interval {timing.heartbeat_interval_s:g} s + timeout "
                    f"{timing.heartbeat_timeout_s:g} s + retry {timing.heartbeat_interval_s:g} s "
                    f"> stale_after_s {timing.stale_after_s:g} s): raise stale_after_s",
                    key=f"timings.{scope}.stale_after_s",
                )

    def for_scope(self, scope: Scope) -> ScopeTimings:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        timing: ScopeTimings = getattr(self, scope)
        return timing

    def to_json(self) -> dict[str, dict[str, float]]:
        return {scope: self.for_scope(scope).to_json() for scope in SCOPES}


__all__ = [
    "DEFAULT_SCOPE_TIMINGS",
    "DESIGN_RTT_S",
    "FAST_RETRIES",
    "MAX_BACKOFF_S",
    "ScopeTimings",
    "TimingTable",
    "fast_retries",
    "heartbeat_retry_delay_s",
    "tolerated_losses",
    "worst_age_s",
]
