"""The election timings' defaults (ADR 0019) and what a settings record that leaves them out
means (ADR 0016's values: a record signed before the defaults changed keeps its timings)."""

from __future__ import annotations

import itertools

import pytest

from populi_peer.core import settings as cluster_settings
from populi_peer.core.election import (
    ElectionSettings,
    check_election_settings,
    lease_outlives_hold_s,
)
from populi_peer.core.messages.records import SettingsValuesCodec
from populi_peer.errors import BadRequest

#: The body ``populi init`` signed before ADR 0019: every election timing at its value then,
#: so left out; ``leader_lease_s`` (a key older than the election) at 5 s, always signed.
BEFORE = {
    **{
        k: v
        for k, v in cluster_settings.defaults().items()
        if k not in cluster_settings.ELECTION_KEYS
    },
    "leader_lease_s": 5.0,
}
#: How an upgraded cluster moves to the defaults, one ``populi settings set`` each
#: (runbooks/voters.md), and back to ADR 0016's timings for voters over an overlay.
UPGRADE_STEPS = (
    {"election_heartbeat_s": 0.25},
    {"leader_lease_s": 1.0},
    {"election_timeout_min_s": 2.0},
    {"election_timeout_max_s": 3.0},
)
OVERLAY_STEPS = (
    {"election_timeout_max_s": 16.0},
    {"election_timeout_min_s": 8.0},
    {"leader_lease_s": 5.0},
    {"election_heartbeat_s": 1.0},
)


def test_the_defaults_are_the_lan_timings_of_adr_0019_and_safe() -> None:
    values = cluster_settings.defaults()
    timings = cluster_settings.election_settings(values)
    check_election_settings(timings)
    assert (timings.heartbeat_interval_s, timings.leader_lease_s) == (0.25, 1.0)
    assert (timings.election_timeout_min_s, timings.election_timeout_max_s) == (2.0, 3.0)
    # The safety margin and drift bound are ADR 0016's: not shrunk to fit the target.
    assert (timings.lease_margin_s, timings.max_clock_drift_ppm) == (0.5, 10_000)
    assert values["lease_expiry_margin_s"] == 5.0
    # Eight heartbeats lost in a row before a follower stands, as before ADR 0019.
    assert timings.election_timeout_min_s / timings.heartbeat_interval_s == 8
    assert lease_outlives_hold_s(timings) < timings.election_timeout_min_s / (1 + timings.drift)


def test_the_election_settings_defaults_are_the_cluster_settings_defaults() -> None:
    """The timings are written twice: as :class:`ElectionSettings`' field defaults and as
    the cluster settings' defaults (``max_skew_ms`` as :func:`election_settings`'s); a
    default changed in one place only would fail here."""
    assert ElectionSettings() == cluster_settings.election_settings(cluster_settings.defaults())


def test_a_record_signed_before_adr_0019_keeps_its_timings() -> None:
    """Its body leaves the election timings out: they read as ADR 0016's values, not as
    today's defaults (with which its 5 s lease would be refused as unsafe)."""
    values = cluster_settings.validate_settings(BEFORE)
    assert values["election_timeout_min_s"] == 8.0
    assert values["election_timeout_max_s"] == 16.0
    assert values["election_heartbeat_s"] == 1.0
    assert values["leader_lease_s"] == 5.0
    # Signed again unchanged, it is the same body.
    assert cluster_settings.signed_body(values) == BEFORE


def test_a_new_clusters_record_names_the_new_timings_and_reads_back_the_same() -> None:
    body = cluster_settings.signed_body(cluster_settings.defaults())
    assert body["election_timeout_min_s"] == 2.0 and body["election_heartbeat_s"] == 0.25
    # Unchanged timings (margin, drift, write timeout) are still left out.
    assert "election_lease_margin_s" not in body and "max_clock_drift_ppm" not in body
    assert cluster_settings.validate_settings(body) == cluster_settings.defaults()


def test_an_older_nodes_answer_without_the_timings_reads_adr_0016_values() -> None:
    answer = {k: v for k, v in BEFORE.items()}
    parsed = SettingsValuesCodec(complete=True).parse(answer, "settings.values")
    assert parsed["election_timeout_min_s"] == 8.0 and parsed["leader_lease_s"] == 5.0


def _walk(current: dict[str, object], steps: tuple[dict[str, float], ...]) -> dict[str, object]:
    for step in steps:
        following = cluster_settings.validate_settings({**current, **step})
        cluster_settings.check_settings_change(current, following)
        current = following
    return current


def test_an_upgraded_cluster_reaches_the_defaults_in_the_runbooks_steps_and_back() -> None:
    current = cluster_settings.validate_settings(BEFORE)
    at_once = cluster_settings.validate_settings({**current, **cluster_settings.defaults()})
    with pytest.raises(BadRequest) as refused:
        cluster_settings.check_settings_change(current, at_once)
    assert refused.value.details["reason"] == "unsafe_timing_change"
    current = _walk(current, UPGRADE_STEPS)
    assert cluster_settings.election_settings(current) == cluster_settings.election_settings(
        cluster_settings.defaults()
    )
    back = _walk(current, OVERLAY_STEPS)
    assert cluster_settings.election_settings(back) == cluster_settings.election_settings(
        cluster_settings.validate_settings(BEFORE)
    )


def test_a_body_that_leaves_the_leader_lease_out_reads_it_as_the_versions_before_did() -> None:
    """Every record signs ``leader_lease_s``; a body without it (none is made, but the
    rule must not depend on that) means the 5 s of the versions before ADR 0019, which
    fits the timings a body leaves out — not today's 1 s lease with a 1 s heartbeat."""
    values = cluster_settings.validate_settings({})
    assert values["leader_lease_s"] == 5.0
    assert values["election_heartbeat_s"] == 1.0
    check_election_settings(cluster_settings.election_settings(values))
    # A complete mapping (every key named) is read as it is.
    assert cluster_settings.validate_settings(cluster_settings.defaults())["leader_lease_s"] == 1.0


@pytest.mark.parametrize("direction", ["to the defaults", "back to the overlay timings"])
def test_every_other_order_of_the_four_keys_is_refused(direction: str) -> None:
    """runbooks/voters.md: one key at a time in the order it gives, "every other order is
    refused" — of the 24 orders of the four keys, only the runbook's passes every step."""
    start = cluster_settings.validate_settings(BEFORE)
    steps = UPGRADE_STEPS
    if direction != "to the defaults":
        start, steps = _walk(start, UPGRADE_STEPS), OVERLAY_STEPS
    passed = []
    for order in itertools.permutations(steps):
        try:
            _walk(start, order)
        except BadRequest:
            continue
        passed.append(order)
    assert passed == [steps]
