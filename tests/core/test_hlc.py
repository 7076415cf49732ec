from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.hlc import (
    HLC_ZERO,
    ClockSkewError,
    Hlc,
    check_clock_skew,
    hlc_receive,
    hlc_tick,
)
from populi_peer.errors import BadRequest, RefusedError

MAX_SKEW_MS = 300_000

hlcs = st.builds(Hlc, st.integers(0, 10**13), st.integers(0, 1000))


def test_order_is_wall_then_counter() -> None:
    assert Hlc(1, 5) < Hlc(2, 0)
    assert Hlc(2, 0) < Hlc(2, 1)
    assert max(Hlc(2, 1), Hlc(1, 9), Hlc(2, 0)) == Hlc(2, 1)
    assert Hlc(0, 1) > HLC_ZERO


@pytest.mark.parametrize("bad", [(-1, 0), (0, -1), (True, 0), (1.5, 0), ("1", 0)])
def test_refuses_bad_components(bad: tuple[object, object]) -> None:
    with pytest.raises(BadRequest):
        Hlc(*bad)  # type: ignore[arg-type]


def test_tick_takes_wall_clock_when_it_moved_forward() -> None:
    assert hlc_tick(Hlc(1000, 7), 1500) == Hlc(1500, 0)


def test_tick_bumps_counter_when_wall_clock_stands_still_or_steps_back() -> None:
    assert hlc_tick(Hlc(1000, 7), 1000) == Hlc(1000, 8)
    assert hlc_tick(Hlc(1000, 7), 400) == Hlc(1000, 8)


def test_receive_cases_of_the_paper() -> None:
    # Physical clock ahead of both: take it, counter 0.
    assert hlc_receive(Hlc(10, 3), Hlc(20, 4), 30, MAX_SKEW_MS) == Hlc(30, 0)
    # Remote ahead: take the remote's wall, counter after the remote's.
    assert hlc_receive(Hlc(10, 3), Hlc(20, 4), 15, MAX_SKEW_MS) == Hlc(20, 5)
    # Local ahead: keep ours, bump our counter.
    assert hlc_receive(Hlc(20, 3), Hlc(10, 9), 15, MAX_SKEW_MS) == Hlc(20, 4)
    # Same wall: counter after the larger of the two.
    assert hlc_receive(Hlc(20, 3), Hlc(20, 9), 15, MAX_SKEW_MS) == Hlc(20, 10)
    assert hlc_receive(Hlc(20, 9), Hlc(20, 3), 15, MAX_SKEW_MS) == Hlc(20, 10)


def test_receive_accepts_a_remote_exactly_at_the_skew_limit() -> None:
    now = 1_000_000
    got = hlc_receive(HLC_ZERO, Hlc(now + MAX_SKEW_MS, 0), now, MAX_SKEW_MS)
    assert got == Hlc(now + MAX_SKEW_MS, 1)


def test_receive_refuses_a_remote_one_ms_beyond_the_skew_limit() -> None:
    now = 1_000_000
    with pytest.raises(ClockSkewError) as info:
        hlc_receive(HLC_ZERO, Hlc(now + MAX_SKEW_MS + 1, 0), now, MAX_SKEW_MS)
    err = info.value
    assert isinstance(err, RefusedError)
    assert err.code == "clock_skew"
    assert err.http_status == 400
    assert "300.001 s ahead" in str(err)
    assert "300.000 s" in str(err)
    assert "\n" not in str(err)
    assert err.details == {"skew_ms": MAX_SKEW_MS + 1, "max_skew_ms": MAX_SKEW_MS}


def test_past_remote_is_never_a_skew_problem() -> None:
    check_clock_skew(Hlc(0, 0), now_wall_ms=10**12, max_skew_ms=0)


@pytest.mark.parametrize("bad", [-1, 1.0, None])
def test_refuses_bad_skew_budget(bad: object) -> None:
    with pytest.raises(BadRequest):
        hlc_receive(HLC_ZERO, HLC_ZERO, 0, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_refuses_bad_now(bad: object) -> None:
    with pytest.raises(BadRequest):
        hlc_tick(HLC_ZERO, bad)  # type: ignore[arg-type]


def test_json_round_trip_ignores_unknown_fields() -> None:
    value = Hlc(1_700_000_000_000, 3)
    assert Hlc.from_json(value.to_json()) == value
    assert Hlc.from_json({**value.to_json(), "future_field": [1, 2]}) == value


@pytest.mark.parametrize(
    "bad", [None, [], {"wall_ms": 1}, {"counter": 1}, {"wall_ms": "1", "counter": 0}]
)
def test_from_json_refuses_malformed(bad: object) -> None:
    with pytest.raises(BadRequest):
        Hlc.from_json(bad)


@given(prev=hlcs, now=st.integers(0, 10**13))
def test_tick_is_strictly_increasing_and_never_behind_the_wall_clock(prev: Hlc, now: int) -> None:
    got = hlc_tick(prev, now)
    assert got > prev
    assert got.wall_ms == max(prev.wall_ms, now)


@given(prev=hlcs, remote=hlcs, now=st.integers(0, 10**13))
def test_receive_is_after_both_sides(prev: Hlc, remote: Hlc, now: int) -> None:
    if remote.wall_ms > now + MAX_SKEW_MS:
        with pytest.raises(ClockSkewError):
            hlc_receive(prev, remote, now, MAX_SKEW_MS)
        return
    got = hlc_receive(prev, remote, now, MAX_SKEW_MS)
    assert got > prev
    assert got > remote
    assert got.wall_ms == max(prev.wall_ms, remote.wall_ms, now)


@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which node acts
            st.integers(-50, 200),  # how far its wall clock moved (may step back)
            st.one_of(st.none(), st.integers(0, 2)),  # None: local event; else receive from
        ),
        max_size=60,
    )
)
def test_causality_and_bounded_drift_in_a_small_cluster(
    steps: list[tuple[int, int, int | None]],
) -> None:
    # Three nodes with their own (non-monotonic) wall clocks exchange messages. Every
    # event is stamped after every event it causally follows, and a clock's wall part is
    # always some physical reading that the cluster has taken (paper, Theorem 2).
    walls = [1000, 1000, 1000]
    clocks = [HLC_ZERO, HLC_ZERO, HLC_ZERO]
    readings: set[int] = {0, *walls}
    for node, delta, source in steps:
        walls[node] = max(0, walls[node] + delta)
        readings.add(walls[node])
        if source is None:
            new = hlc_tick(clocks[node], walls[node])
        else:
            sent = hlc_tick(clocks[source], walls[source])
            clocks[source] = sent
            new = hlc_receive(clocks[node], sent, walls[node], 10**9)
            assert new > sent
        assert new > clocks[node]
        assert new.wall_ms in readings
        clocks[node] = new
