from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.canonical import canonical_json
from populi_peer.core.policy import (
    DEFAULT_MATRIX,
    SCOPES,
    WORK_CLASSES,
    PolicySettings,
    decide,
)
from populi_peer.errors import BadRequest

NO_GATES: frozenset[tuple[str, str]] = frozenset()


def test_default_matrix_is_complete_and_as_documented() -> None:
    assert set(DEFAULT_MATRIX) == set(itertools.product(WORK_CLASSES, SCOPES))
    expected = {
        "agent": ("allowed", "allowed", "allowed"),
        "inference": ("allowed", "allowed", "gated"),
        "training": ("allowed", "allowed", "gated"),
        "collective": ("allowed", "gated", "blocked"),
    }
    for work_class, row in expected.items():
        assert tuple(DEFAULT_MATRIX[(work_class, scope)] for scope in SCOPES) == row  # type: ignore[index]


def test_allowed_cells() -> None:
    decision = decide("agent", "overlay", gates_enabled=NO_GATES)
    assert decision.allowed and decision.reason == "policy_allowed"


def test_gated_cell_is_off_until_its_gate_opens() -> None:
    off = decide("inference", "overlay", gates_enabled=NO_GATES)
    assert not off.allowed and off.reason == "policy_gated_off"
    on = decide("inference", "overlay", gates_enabled=frozenset({("inference", "overlay")}))
    assert on.allowed and on.reason == "policy_gated_on"
    # A gate opens its own cell only.
    other = decide("training", "overlay", gates_enabled=frozenset({("inference", "overlay")}))
    assert not other.allowed


def test_no_gate_opens_a_blocked_cell() -> None:
    decision = decide("collective", "overlay", gates_enabled=frozenset({("collective", "overlay")}))
    assert not decision.allowed and decision.reason == "policy_blocked"


@pytest.mark.parametrize(("work_class", "scope"), [("mining", "lan"), ("agent", "internet")])
def test_unknown_names_are_refused(work_class: str, scope: str) -> None:
    with pytest.raises(BadRequest):
        decide(work_class, scope, gates_enabled=NO_GATES)


@given(
    st.sampled_from(WORK_CLASSES),
    st.sampled_from(SCOPES),
    st.frozensets(st.tuples(st.sampled_from(WORK_CLASSES), st.sampled_from(SCOPES))),
)
def test_decision_follows_the_cell(
    work_class: str, scope: str, gates: frozenset[tuple[str, str]]
) -> None:
    verdict = DEFAULT_MATRIX[(work_class, scope)]  # type: ignore[index]
    decision = decide(work_class, scope, gates_enabled=gates)
    assert decision.allowed == (
        verdict == "allowed" or (verdict == "gated" and (work_class, scope) in gates)
    )


def test_settings_override_cells_and_round_trip_as_canonical_json() -> None:
    settings = PolicySettings(
        {("agent", "overlay"): "blocked"},
        frozenset({("training", "overlay")}),
    )
    assert settings.matrix[("agent", "overlay")] == "blocked"
    assert settings.matrix[("inference", "lan")] == "allowed"  # filled from defaults
    assert not settings.decide("agent", "overlay").allowed
    assert settings.decide("training", "overlay").allowed
    body = settings.to_json()
    canonical_json(body)  # signed cluster record: no floats, only JSON
    assert PolicySettings.from_json(body) == settings
    assert hash(PolicySettings.from_json(body)) == hash(settings)


def test_from_json_ignores_what_it_does_not_know_and_refuses_bad_verdicts() -> None:
    body = {
        "matrix": {"agent": {"lan": "gated", "mars": "allowed"}, "quantum": {"lan": "allowed"}},
        "gates_enabled": [["agent", "lan"], ["quantum", "lan"]],
        "future": True,
    }
    settings = PolicySettings.from_json(body)
    assert settings.matrix[("agent", "lan")] == "gated"
    assert settings.gates_enabled == {("agent", "lan")}
    assert PolicySettings.from_json({}) == PolicySettings()
    with pytest.raises(BadRequest):
        PolicySettings.from_json({"matrix": {"agent": {"lan": "maybe"}}})
    with pytest.raises(BadRequest):
        PolicySettings.from_json({"gates_enabled": ["agent"]})
    with pytest.raises(BadRequest):
        PolicySettings(gates_enabled=frozenset({("agent", "moon")}))  # type: ignore[arg-type]


def test_the_settings_policy_gates_open_exactly_their_cells() -> None:
    """``policy_gates`` (``CLASS:SCOPE`` texts in the settings record) is read by one rule,
    :func:`populi_peer.core.settings.gates_enabled` (``ClusterRecords.policy_gates``)."""
    from populi_peer.core.settings import defaults, gates_enabled, validate_value

    values = {**defaults(), "policy_gates": validate_value("policy_gates", ["inference:overlay"])}
    gates = gates_enabled(values)
    assert gates == {("inference", "overlay")}
    assert decide("inference", "overlay", gates_enabled=gates).allowed
    assert not decide("training", "overlay", gates_enabled=gates).allowed
    assert gates_enabled(defaults()) == NO_GATES
