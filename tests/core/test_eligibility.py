from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core import eligibility as elig
from populi_peer.core.eligibility import (
    REASON_ORDER,
    Eligibility,
    heartbeat_age_ms,
    is_stale,
    routing_eligibility,
)
from populi_peer.core.lifecycle import STATES, NodeLifecycle, State
from populi_peer.errors import BadRequest

NOW = 1_700_000_000_000
STALE_MS = 5_000


def lc(state: State, **kwargs: Any) -> NodeLifecycle:
    return NodeLifecycle(state, NOW - 1000, "op:alice", "r", **kwargs)


def check(**kwargs: Any) -> Eligibility:
    fields: dict[str, Any] = {
        "lifecycle": lc("active"),
        "heartbeat_age_ms": 100,
        "stale_after_ms": STALE_MS,
        "now_wall_ms": NOW,
    }
    fields.update(kwargs)
    return routing_eligibility(**fields)


def test_healthy_active_node_is_eligible() -> None:
    assert check() == Eligibility(eligible=True, reasons=())
    assert check(gpus_wanted=2, allocatable_gpus=2) == Eligibility(True, ())


def test_reason_codes_are_exported_and_ordered() -> None:
    assert REASON_ORDER == (
        "unknown_node",
        "retired",
        "left",
        "quarantined",
        "maintenance",
        "draining",
        "cordoned",
        "heartbeat_never",
        "heartbeat_stale",
        "unhealthy_gpu",
        "no_free_gpu",
    )
    exported = {
        getattr(elig, name)
        for name in elig.__all__
        if name.startswith("REASON_") and name != "REASON_ORDER"
    }
    assert exported == set(REASON_ORDER)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("cordoned", "cordoned"),
        ("draining", "draining"),
        ("maintenance", "maintenance"),
        ("quarantined", "quarantined"),
        ("retired", "retired"),
        ("left", "left"),
    ],
)
def test_each_lifecycle_state_but_active_gives_its_reason(state: State, reason: str) -> None:
    assert check(lifecycle=lc(state)) == Eligibility(False, (reason,))


def test_every_state_is_covered() -> None:
    for state in STATES:
        got = check(lifecycle=lc(state))
        assert got.eligible == (state == "active")


def test_unknown_node_is_not_eligible() -> None:
    assert check(lifecycle=None) == Eligibility(False, ("unknown_node",))


def test_maintenance_is_read_at_now() -> None:
    record = lc("maintenance", until_wall_ms=NOW + 10)
    assert check(lifecycle=record, now_wall_ms=NOW + 9).reasons == ("maintenance",)
    assert check(lifecycle=record, now_wall_ms=NOW + 10).eligible


def test_heartbeat_boundary_equal_is_fresh_one_more_is_stale() -> None:
    assert check(heartbeat_age_ms=STALE_MS).eligible
    assert check(heartbeat_age_ms=STALE_MS + 1).reasons == ("heartbeat_stale",)
    assert check(heartbeat_age_ms=None).reasons == ("heartbeat_never",)
    assert check(heartbeat_age_ms=0).eligible


def test_is_stale_boundary() -> None:
    assert not is_stale(5000, 5000)
    assert is_stale(5001, 5000)
    assert not is_stale(0, 0)
    assert is_stale(1, 0)
    assert is_stale(None, 5000)


def test_heartbeat_age_rounds_to_nearest_ms() -> None:
    assert heartbeat_age_ms(None, 10.0) is None
    assert heartbeat_age_ms(0.0, 5.0) == 5000
    # 5.001 - 0 is 5000.999... ms in floating point: it must not round down to 5000.
    assert heartbeat_age_ms(0.0, 5.001) == 5001
    assert heartbeat_age_ms(0.1, 0.3) == 200
    assert heartbeat_age_ms(10.0, 10.0004) == 0
    assert heartbeat_age_ms(10.0, 10.0006) == 1
    assert heartbeat_age_ms(10.0, 9.0) == 0


def test_heartbeat_age_and_staleness_compose_at_the_boundary() -> None:
    assert not is_stale(heartbeat_age_ms(100.0, 105.0), 5000)
    assert is_stale(heartbeat_age_ms(100.0, 105.001), 5000)


@pytest.mark.parametrize(("last", "now"), [(float("nan"), 1.0), (0.0, float("inf")), ("0", 1.0)])
def test_heartbeat_age_refuses_non_finite(last: Any, now: Any) -> None:
    with pytest.raises(BadRequest):
        heartbeat_age_ms(last, now)


@pytest.mark.parametrize(
    ("wanted", "allocatable", "unhealthy", "reasons"),
    [
        (0, 0, 3, ()),  # no GPUs wanted: GPUs are not looked at
        (1, 1, 0, ()),
        (1, 1, 5, ()),  # unhealthy GPUs do not matter when enough are free
        (1, 0, 0, ("no_free_gpu",)),
        (2, 1, 0, ("no_free_gpu",)),
        (1, 0, 1, ("unhealthy_gpu",)),  # only a broken GPU stands in the way
        (2, 1, 1, ("unhealthy_gpu",)),
        (2, 0, 1, ("unhealthy_gpu", "no_free_gpu")),  # broken and busy both
        (4, 1, 2, ("unhealthy_gpu", "no_free_gpu")),
    ],
)
def test_gpu_reasons(
    wanted: int, allocatable: int, unhealthy: int, reasons: tuple[str, ...]
) -> None:
    got = check(gpus_wanted=wanted, allocatable_gpus=allocatable, unhealthy_gpus=unhealthy)
    assert got == Eligibility(not reasons, reasons)


def test_all_reasons_are_reported_in_the_fixed_order() -> None:
    got = check(
        lifecycle=lc("quarantined"),
        heartbeat_age_ms=STALE_MS * 10,
        gpus_wanted=4,
        allocatable_gpus=0,
        unhealthy_gpus=1,
    )
    assert got == Eligibility(
        False, ("quarantined", "heartbeat_stale", "unhealthy_gpu", "no_free_gpu")
    )
    got = check(lifecycle=None, heartbeat_age_ms=None, gpus_wanted=1)
    assert got.reasons == ("unknown_node", "heartbeat_never", "no_free_gpu")


@given(
    state=st.one_of(st.none(), st.sampled_from(STATES)),
    age=st.one_of(st.none(), st.integers(0, 20_000)),
    wanted=st.integers(0, 8),
    allocatable=st.integers(0, 8),
    unhealthy=st.integers(0, 8),
)
def test_verdict_is_consistent(
    state: State | None, age: int | None, wanted: int, allocatable: int, unhealthy: int
) -> None:
    got = check(
        lifecycle=None if state is None else lc(state),
        heartbeat_age_ms=age,
        gpus_wanted=wanted,
        allocatable_gpus=allocatable,
        unhealthy_gpus=unhealthy,
    )
    assert got.eligible == (not got.reasons)
    assert list(got.reasons) == sorted(set(got.reasons), key=REASON_ORDER.index)
    expected_eligible = (
        state == "active" and age is not None and age <= STALE_MS and allocatable >= wanted
    )
    assert got.eligible == expected_eligible
    assert Eligibility.from_json(got.to_json()) == got


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stale_after_ms": -1},
        {"gpus_wanted": -1},
        {"allocatable_gpus": 1.0},
        {"unhealthy_gpus": True},
        {"heartbeat_age_ms": -5},
    ],
)
def test_bad_inputs_are_refused_naming_the_field(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as info:
        check(**kwargs)
    assert next(iter(kwargs)) in str(info.value)


@pytest.mark.parametrize(
    ("eligible", "reasons"),
    [
        (True, ("cordoned",)),
        (False, ()),
        (False, ("bogus",)),
        (False, ("no_free_gpu", "cordoned")),
        (False, ("left", "left")),
    ],
)
def test_eligibility_refuses_contradictions(eligible: bool, reasons: tuple[str, ...]) -> None:
    with pytest.raises(BadRequest):
        Eligibility(eligible, reasons)


def test_json_round_trip_ignores_unknown_fields() -> None:
    got = Eligibility(False, ("draining", "heartbeat_stale"))
    assert Eligibility.from_json({**got.to_json(), "node_id": "n1"}) == got
    with pytest.raises(BadRequest):
        Eligibility.from_json({"eligible": "no", "reasons": []})
    with pytest.raises(BadRequest):
        Eligibility.from_json({"eligible": False, "reasons": "cordoned"})
