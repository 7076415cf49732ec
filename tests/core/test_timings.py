"""The one timing table by scope (populi_peer/core/timings.py)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.config import Config, apply_mapping
from populi_peer.core.scope import SCOPES
from populi_peer.core.timings import (
    DEFAULT_SCOPE_TIMINGS,
    FAST_RETRIES,
    MAX_BACKOFF_S,
    ScopeTimings,
    TimingTable,
    fast_retries,
    heartbeat_retry_delay_s,
    tolerated_losses,
    worst_age_s,
)
from populi_peer.errors import ConfigError


def test_default_timings() -> None:
    assert dict(DEFAULT_SCOPE_TIMINGS) == {
        "local": ScopeTimings(1.0, 5.0, 2.0),
        "lan": ScopeTimings(1.0, 5.0, 2.0),
        "overlay": ScopeTimings(2.0, 15.0, 4.0),
    }
    assert set(DEFAULT_SCOPE_TIMINGS) == set(SCOPES)
    assert DEFAULT_SCOPE_TIMINGS["overlay"].stale_after_ms == 15_000
    assert ScopeTimings(0.5, 2.0015).stale_after_ms == 2002


@pytest.mark.parametrize(
    ("interval", "stale"),
    [(0, 5), (-1, 5), (1, 1), (2, 1), (float("nan"), 5), (1, float("inf")), (True, 5), ("1", 5)],
)
def test_timings_refuse_nonsense(interval: Any, stale: Any) -> None:
    with pytest.raises(ConfigError):
        ScopeTimings(interval, stale)


def test_config_defaults_are_the_table() -> None:
    """One table: the config's ``[timings.*]`` defaults are the core's, key by key."""
    assert Config().timings.table() == TimingTable()
    for scope in SCOPES:
        assert TimingTable().for_scope(scope) == DEFAULT_SCOPE_TIMINGS[scope]


def test_overlay_defaults_survive_two_lost_heartbeats_at_150_ms() -> None:
    """docs/wan.md: on an overlay path with 150 ms round trips, two heartbeats lost in a
    row (each noticed only at its 4 s timeout) leave the node fresh; LAN and local paths
    survive one."""
    overlay = DEFAULT_SCOPE_TIMINGS["overlay"]
    assert tolerated_losses(overlay, rtt_s=0.15) == 2
    assert worst_age_s(overlay, losses=2, rtt_s=0.15) == pytest.approx(14.15)
    assert worst_age_s(overlay, losses=2, rtt_s=0.15) < overlay.stale_after_s
    assert worst_age_s(overlay, losses=3, rtt_s=0.15) > overlay.stale_after_s
    assert tolerated_losses(DEFAULT_SCOPE_TIMINGS["lan"], rtt_s=0.001) == 1
    assert tolerated_losses(DEFAULT_SCOPE_TIMINGS["local"], rtt_s=0.0) == 1


def test_a_table_that_cannot_lose_one_heartbeat_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"timings.overlay: one lost heartbeat"):
        TimingTable(overlay=ScopeTimings(2.0, 7.0, 4.0))
    with pytest.raises(ConfigError, match=r"timings.overlay") as caught:
        apply_mapping(Config(), {"timings": {"overlay": {"stale_after_s": 7.0}}}, source="t")
    assert caught.value.details["key"] == "timings.overlay.stale_after_s"


def test_retry_schedule_fast_then_backoff() -> None:
    timing = DEFAULT_SCOPE_TIMINGS["overlay"]
    rng = random.Random(1)
    assert heartbeat_retry_delay_s(timing, 0, rng) == 2.0
    for failures in range(1, FAST_RETRIES + 1):
        assert heartbeat_retry_delay_s(timing, failures, rng) == 2.0
    later = [heartbeat_retry_delay_s(timing, n, rng) for n in range(FAST_RETRIES + 1, 20)]
    assert all(2.0 <= delay <= MAX_BACKOFF_S for delay in later)
    assert max(later) > 10.0  # it does back off from a control plane that is down


@given(
    interval=st.floats(0.1, 10),
    timeout=st.floats(0.1, 10),
    extra=st.floats(0.01, 60),
    failures=st.integers(0, 40),
    seed=st.integers(0, 1000),
)
def test_retry_delay_never_exceeds_the_bound_the_check_assumes(
    interval: float, timeout: float, extra: float, failures: int, seed: int
) -> None:
    timing = ScopeTimings(interval, interval + extra, timeout)
    delay = heartbeat_retry_delay_s(timing, failures, random.Random(seed))
    worst = worst_age_s(timing, losses=failures, rtt_s=0.0) - worst_age_s(
        timing, losses=max(0, failures - 1), rtt_s=0.0
    )
    assert interval <= delay
    if failures:
        assert delay <= worst - timeout + 1e-9


def test_a_node_whose_leader_died_retries_at_one_interval_through_an_election_timeout() -> None:
    """ADR 0019: from the second failure on, each failed beat asks the voters who leads; a
    backoff inside the election timeout would find the new leader seconds after its
    election (the failover figure's first grant waits for the node's report)."""
    lan = DEFAULT_SCOPE_TIMINGS["lan"]
    rng = random.Random(1)
    election = {"election_timeout_max_s": 3.0, "voters": 3}
    assert fast_retries(lan, **election) == FAST_RETRIES + 3
    assert fast_retries(lan, election_timeout_max_s=0.0, voters=3) == FAST_RETRIES
    # A lone voter: nobody else can be elected, so no reason to keep retrying fast.
    assert fast_retries(lan, election_timeout_max_s=3.0, voters=1) == FAST_RETRIES
    for failures in range(1, FAST_RETRIES + 4):
        assert heartbeat_retry_delay_s(lan, failures, rng, **election) == 1.0
    # Past the election timeout: back off from a control plane that is down, as before.
    later = [heartbeat_retry_delay_s(lan, n, rng, **election) for n in range(6, 20)]
    assert max(later) > 10.0
    with pytest.raises(ValueError):
        fast_retries(lan, election_timeout_max_s=-1.0, voters=3)
