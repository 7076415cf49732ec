from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import (
    CONTROL_PLANE_ACTOR,
    DEAD_STATES,
    HOLDING_STATES,
    LEASE_STATES,
    MIN_LEASE_TTL_S,
    RENEW_TIMEOUT_FLOOR_S,
    STOPPING_REFUSALS,
    TERMINAL_STATES,
    TRANSITIONS,
    GrantRequest,
    GrantWait,
    HolderStatus,
    HolderView,
    IllegalLeaseTransition,
    Lease,
    LeaseChange,
    LeaseNotFound,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    ResumeWindow,
    TargetView,
    renew_interval_s,
    renew_timeout_s,
    stop_margin_floor_s,
    ttl_reasons,
    validate_stop_margin,
    worker_deadline_boot,
    worker_stop_at_boot,
)
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import LeaseReleaseRequest
from populi_peer.core.policy import WorkClass
from populi_peer.core.reports import (
    Claim,
    FullReport,
    Incarnation,
    NodeHoldings,
    ReportedLease,
    ReportedPhase,
)
from populi_peer.errors import BadRequest, ConfigError, Conflict, StoreError
from support.reports import as_reported

SETTINGS = LeaseSettings(max_lease_ttl_s=30.0, expiry_margin_s=5.0, leader_lease_s=10.0)
W = 1_700_000_000_000  # a wall clock in ms


def target(
    node: str = "w1",
    gpus: tuple[str, ...] = ("G0", "G1"),
    *,
    eligible: bool = True,
    reasons: tuple[str, ...] = (),
) -> TargetView:
    return TargetView(node, eligible=eligible, reasons=reasons, allocatable_gpus=gpus)


def req(
    task_id: str = "t1",
    node: str = "w1",
    *,
    attempt: int = 1,
    gpus: int = 1,
    ttl_s: float = 10.0,
    submitter: str = "sub",
    previous: str | None = None,
    work_class: WorkClass = "training",
) -> GrantRequest:
    """A grant request from ``sub`` for a ``work_class`` task (``previous``: the node its last
    attempt ran on)."""
    return GrantRequest(
        task_id=task_id,
        attempt=attempt,
        work_class=work_class,
        target=node,
        gpus_wanted=gpus,
        ttl_s=ttl_s,
        submitter=submitter,
        previous_node=previous,
    )


def granted(
    table: LeaseTable | None = None,
    *,
    lease_id: str = "L1",
    now: float = 100.0,
    task_id: str = "t1",
    attempt: int = 1,
    node: str = "w1",
    gpus: int = 1,
    submitter: str = "sub",
    target_gpus: tuple[str, ...] = ("G0", "G1"),
) -> tuple[LeaseTable, Lease]:
    table = table or LeaseTable.new(SETTINGS)
    request = req(task_id, attempt=attempt, node=node, gpus=gpus, submitter=submitter)
    table, change = table.grant(
        request, now_mono=now, now_wall_ms=W, lease_id=lease_id, target=target(node, target_gpus)
    )
    return table, change.lease


def held_by(table: LeaseTable, node: str, phase: ReportedPhase = "started") -> NodeHoldings:
    """What ``node`` holds by the table: its holding leases, in ``phase``."""
    return NodeHoldings(tuple(as_reported(x, phase) for x in table.by_node(node) if x.holding))


def report(
    table: LeaseTable,
    node: str,
    *,
    now: float,
    holdings: NodeHoldings | None = None,
    epoch: int = 1,
    seq: int = 1,
) -> LeaseTable:
    """``node`` reports in full to the table's incarnation (by default what it holds by the
    table itself)."""
    message = FullReport(
        node, table.incarnation, epoch, seq, held_by(table, node) if holdings is None else holdings
    )
    table, result = table.receive(message, now_mono=now, now_wall_ms=W)
    assert result.answer.status == "applied", result
    return table


def refused(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[str, ...]:
    with pytest.raises(LeaseRefused) as info:
        fn(*args, **kwargs)
    return info.value.reasons


def grant_refused(
    table: LeaseTable,
    request: GrantRequest,
    *,
    now_mono: float,
    lease_id: str = "L2",
    to: TargetView | None = None,
) -> tuple[str, ...]:
    """The reasons ``table`` refuses to grant ``request`` (on ``to``, by default
    :func:`target`'s ``w1``)."""
    return refused(
        table.grant,
        request,
        now_mono=now_mono,
        now_wall_ms=W,
        lease_id=lease_id,
        target=to or target(),
    )


# -- settings and timing helpers ----------------------------------------------------------


def test_settings_defaults_and_no_grant_hold() -> None:
    s = LeaseSettings()
    assert (s.max_lease_ttl_s, s.expiry_margin_s) == (30.0, 5.0)
    # The global grant hold of ADR 0006 is gone: grants resume per node (ADR 0015).
    assert not hasattr(s, "grant_hold_s")
    assert not hasattr(LeaseTable.new(), "grants_allowed_from_mono")


@pytest.mark.parametrize("key", ["max_lease_ttl_s", "expiry_margin_s", "leader_lease_s"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "5"])
def test_settings_validation_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        LeaseSettings(**{key: value})  # type: ignore[arg-type]
    assert info.value.details["key"] == key
    assert key in str(info.value)


def test_settings_json_is_integer_milliseconds() -> None:
    s = LeaseSettings(max_lease_ttl_s=12.5, expiry_margin_s=2.0, leader_lease_s=1.25)
    body = s.to_json()
    assert body == {"max_lease_ttl_ms": 12500, "expiry_margin_ms": 2000, "leader_lease_ms": 1250}
    assert all(type(v) is int for v in body.values())
    assert LeaseSettings.from_json({**body, "future": 1}) == s
    assert LeaseSettings.from_json({}) == LeaseSettings()
    with pytest.raises(BadRequest):
        LeaseSettings.from_json({"max_lease_ttl_ms": 1.5})


def test_timing_helpers() -> None:
    assert renew_interval_s(30.0) == 10.0
    assert worker_deadline_boot(1000.0, 30.0) == 1030.0
    assert worker_stop_at_boot(1000.0, 30.0, 4.0) == 1026.0
    with pytest.raises(BadRequest):
        renew_interval_s(0)
    with pytest.raises(BadRequest):
        worker_deadline_boot(1.0, -1)


def test_stop_margin_accepts_enough() -> None:
    validate_stop_margin(4.0, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=500, ttl_s=30.0)


def test_stop_margin_below_grace_plus_latency_plus_drift_names_the_key() -> None:
    # grace 2 + latency 1 + 30 s * 100000 ppm (3 s) = 6 s: 5 s is not enough, though it
    # covers grace + latency alone.
    with pytest.raises(ConfigError) as info:
        validate_stop_margin(
            5.0, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=100_000, ttl_s=30.0
        )
    assert info.value.details["key"] == "exec.stop_margin_s"
    assert "exec.stop_margin_s" in str(info.value)
    validate_stop_margin(6.0, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=100_000, ttl_s=30.0)


def test_the_stop_margin_floor_is_grace_plus_latency_plus_drift() -> None:
    assert stop_margin_floor_s(
        kill_grace_s=5.0, kill_latency_s=0.5, drift_ppm=100.0, ttl_s=30.0
    ) == pytest.approx(5.5 + 0.003)
    assert stop_margin_floor_s(kill_grace_s=0, kill_latency_s=0, drift_ppm=0, ttl_s=0) == 0.0


def test_a_stop_margin_before_any_ttl_is_known_covers_grace_and_latency() -> None:
    """The config's check (no cluster TTL yet): the same rule, without the drift."""
    validate_stop_margin(3.0, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=10**6, ttl_s=None)
    with pytest.raises(ConfigError) as info:
        validate_stop_margin(2.9, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=0, ttl_s=None)
    assert info.value.details["key"] == "exec.stop_margin_s"
    # Large: no renewal to leave room for yet.
    validate_stop_margin(1e6, kill_grace_s=2.0, kill_latency_s=1.0, drift_ppm=0, ttl_s=None)


def test_stop_margin_must_leave_room_to_renew() -> None:
    with pytest.raises(ConfigError) as info:
        validate_stop_margin(
            20.0,
            kill_grace_s=1.0,
            kill_latency_s=1.0,
            drift_ppm=0,
            ttl_s=30.0,
            key="worker.stop_margin_s",
        )
    assert info.value.details["key"] == "worker.stop_margin_s"


def test_stop_margin_refuses_negative_inputs() -> None:
    with pytest.raises(ConfigError):
        validate_stop_margin(4.0, kill_grace_s=-1.0, kill_latency_s=1.0, drift_ppm=0, ttl_s=30)


# -- the transition table as data ---------------------------------------------------------


def test_terminal_rows_are_empty_and_nothing_returns_to_holding() -> None:
    assert set(TRANSITIONS) == set(LEASE_STATES)
    for state in TERMINAL_STATES:
        assert dict(TRANSITIONS[state]) == {}
    for row in TRANSITIONS.values():
        for event, after in row.items():
            assert after in LEASE_STATES
            if event != "renew":
                assert after != "live"
    assert {"released", "revoked", "expired"} == DEAD_STATES
    assert "completed" not in DEAD_STATES


# -- lease records ------------------------------------------------------------------------


def test_lease_json_round_trip_omits_the_monotonic_timer() -> None:
    _, lease = granted()
    body = lease.to_json()
    assert "expires_mono" not in body
    assert body["task_key"] == "task:t1"
    assert body["token"] == "1.1"
    back = Lease.from_json({**body, "from_the_future": True})
    assert back == replace(lease, expires_mono=math.inf)


@pytest.mark.parametrize(
    "change",
    [
        {"state": "zombie"},
        {"kind": "teleport"},
        {"token": "1.01"},
        {"attempt": 0},
        {"gpus": ["G0", "G0"]},
        {"ttl_s": "10"},
        {"granted_wall_ms": -1},
    ],
)
def test_lease_from_json_refuses_bad_fields(change: dict[str, object]) -> None:
    _, lease = granted()
    with pytest.raises(BadRequest):
        Lease.from_json({**lease.to_json(), **change})


def test_lease_kind_must_match_its_holder() -> None:
    _, lease = granted()
    with pytest.raises(BadRequest):
        replace(lease, holder="sub")  # remote lease held by its submitter
    with pytest.raises(BadRequest):
        replace(lease, kind="local")  # local lease held by a worker
    with pytest.raises(BadRequest):
        replace(lease, kind="fence", holder="sub")  # a fence has no GPUs / TTL


# -- grant --------------------------------------------------------------------------------


def test_grant_issues_increasing_tokens_and_records_the_lease() -> None:
    table = LeaseTable.new(SETTINGS)
    table, change = table.grant(
        req("t1"), now_mono=100.0, now_wall_ms=W, lease_id="L1", target=target()
    )
    first = change.lease
    assert change.records == (first,)
    assert first.state == "live" and first.kind == "remote"
    assert first.token == FencingToken(1, 1)
    assert first.gpus == ("G0",)
    assert first.expires_mono == 110.0
    assert first.granted_wall_ms == first.state_changed_wall_ms == W
    table, change = table.grant(
        req("t2"), now_mono=101.0, now_wall_ms=W, lease_id="L2", target=target()
    )
    assert change.lease.token == FencingToken(1, 2)
    assert change.lease.gpus == ("G1",)  # G0 is in a live lease
    assert table.live_gpus() == {("w1", "G0"), ("w1", "G1")}


def test_grant_to_the_submitter_is_a_local_lease() -> None:
    _table, lease = granted(node="sub")
    assert lease.kind == "local" and lease.holder == lease.submitter == "sub"


def test_grant_is_refused_for_a_mismatched_target_view() -> None:
    with pytest.raises(BadRequest):
        LeaseTable.new(SETTINGS).grant(
            req(node="w1"), now_mono=0.0, now_wall_ms=W, lease_id="L", target=target("w2")
        )


def test_a_new_term_resumes_grants_per_node_and_keeps_renewing() -> None:
    table, lease = granted(now=100.0)
    table = table.set_term(2, now_mono=101.0, incarnation_id="i2")
    assert table.window == ResumeWindow(101.0, 101.0, 101.0 + 30.0 + 5.0)
    with pytest.raises(LeaseRefused) as info:
        table.grant(req("t2"), now_mono=102.0, now_wall_ms=W, lease_id="L2", target=target())
    assert info.value.reasons == ("node_not_reported",)
    assert info.value.details["wait_s"] == 34.0
    assert table.grant_wait("w1", 102.0) == GrantWait("node_not_reported", 136.0)
    table, change = table.renew(lease.lease_id, "w1", now_mono=105.0, now_wall_ms=W)
    assert change.lease.expires_mono == 115.0
    # A silent node's GPUs are free for grants once any lease on it could have expired.
    _, change = table.grant(
        req("t2"), now_mono=136.0, now_wall_ms=W, lease_id="L2", target=target()
    )
    assert change.lease.token == FencingToken(2, 1) > lease.token
    # A node that reported is open at once.
    table = report(table, "w1", now=106.0)
    assert table.grants_open_for("w1", 106.0) and not table.grants_open_for("w2", 106.0)
    table, change = table.grant(
        req("t2"), now_mono=106.0, now_wall_ms=W, lease_id="L2", target=target()
    )
    assert change.lease.token == FencingToken(2, 1)


def test_set_term_must_increase() -> None:
    table = LeaseTable.new(SETTINGS, term=3)
    for term in (3, 2):
        with pytest.raises(Conflict) as info:
            table.set_term(term, now_mono=0.0, incarnation_id="i")
        assert info.value.code == "stale_term"


@pytest.mark.parametrize("ttl_s", [1e-300, 0.5, 2.999])
def test_a_lease_is_never_born_dead(ttl_s: float) -> None:
    """A TTL below the documented minimum is refused (``ttl_too_short``) on every grant
    path, and nothing changes: such a lease would be due before its holder could renew."""
    table = LeaseTable.new(SETTINGS)
    reasons = grant_refused(table, req(ttl_s=ttl_s), now_mono=0.0, lease_id="L")
    assert reasons == ("ttl_too_short",)
    assert refused(
        table.local_grant,
        "t1",
        submitter="sub",
        attempt=1,
        work_class="agent",
        gpus_wanted=1,
        ttl_s=ttl_s,
        target=target("sub"),
        lease_id="L",
        now_mono=0.0,
        now_wall_ms=W,
    ) == ("ttl_too_short",)
    assert refused(
        table.confirm_dead_for_fallback,
        "t1",
        submitter="sub",
        attempt=1,
        gpus=("G0",),
        local_node="sub",
        ttl_s=ttl_s,
        lease_id="F",
        now_mono=0.0,
        now_wall_ms=W,
        work_class="agent",
    ) == ("ttl_too_short",)
    assert table.leases == {} and table.next_seq == 1


def test_the_minimum_ttl_leaves_a_renewal_its_whole_timeout() -> None:
    """The renewal sent one interval after the last may take its whole timeout and still
    land before the deadline the last one set; and the minimum is granted."""
    assert MIN_LEASE_TTL_S == 3.0
    assert renew_interval_s(MIN_LEASE_TTL_S) + renew_timeout_s(MIN_LEASE_TTL_S) <= MIN_LEASE_TTL_S
    assert renew_timeout_s(MIN_LEASE_TTL_S) == RENEW_TIMEOUT_FLOOR_S
    assert renew_timeout_s(30.0) == 10.0
    assert ttl_reasons(MIN_LEASE_TTL_S, max_lease_ttl_s=30.0) == []
    table, change = LeaseTable.new(SETTINGS).grant(
        req(ttl_s=MIN_LEASE_TTL_S), now_mono=0.0, now_wall_ms=W, lease_id="L", target=target()
    )
    assert change.lease.ttl_s == MIN_LEASE_TTL_S and table.get("L").holding
    with pytest.raises(ConfigError) as info:
        LeaseSettings(max_lease_ttl_s=MIN_LEASE_TTL_S / 2)
    assert info.value.details["key"] == "max_lease_ttl_s"


def test_a_lease_stored_before_the_minimum_still_loads() -> None:
    """The minimum is a grant rule, not a record rule: a short lease persisted by an older
    version is read back and restored (it can only err on the side of being held)."""
    lease = Lease.from_json({**_short_lease_json(), "ttl_s": 0.5})
    table = LeaseTable.restore(
        [lease], term=1, next_seq=2, settings=SETTINGS, now_mono=0.0, incarnation_id="r"
    )
    assert table.get("L1").holding


def _short_lease_json() -> dict[str, object]:
    _, change = LeaseTable.new(SETTINGS).grant(
        req(), now_mono=0.0, now_wall_ms=W, lease_id="L1", target=target()
    )
    return change.lease.to_json()


def test_ttl_too_long() -> None:
    reasons = grant_refused(LeaseTable.new(SETTINGS), req(ttl_s=30.5), now_mono=0.0, lease_id="L")
    assert reasons == ("ttl_too_long",)


@pytest.mark.parametrize("state", ["live", "revoking", "completed"])
def test_task_key_taken(state: str) -> None:
    table, _lease = granted()
    if state == "revoking":
        table, _ = table.revoke("L1", actor="op", reason="maint", now_mono=101.0, now_wall_ms=W)
    if state == "completed":
        table, _ = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    reasons = grant_refused(table, req(attempt=2, node="w2"), now_mono=102.0, to=target("w2"))
    assert "task_key_taken" in reasons
    assert ("task_completed" in reasons) == (state == "completed")


@pytest.mark.parametrize("state", ["released", "revoked", "expired"])
def test_a_dead_lease_frees_the_task_key_and_gpus(state: str) -> None:
    table, _lease = granted()
    if state == "revoked":
        table, _ = table.revoke("L1", actor="op", reason="r", now_mono=101.0, now_wall_ms=W)
    if state == "expired":
        table, _ = table.expire_due(now_mono=116.0, now_wall_ms=W)
    else:
        table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    assert table.get("L1").state == state
    table, change = table.grant(
        req(attempt=2, gpus=2), now_mono=120.0, now_wall_ms=W, lease_id="L2", target=target()
    )
    assert change.lease.gpus == ("G0", "G1")


def test_completed_frees_gpus_but_keeps_the_key() -> None:
    table, _ = granted()
    table, _ = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    assert table.live_gpus() == frozenset()
    table, change = table.grant(
        req("other", gpus=2), now_mono=102.0, now_wall_ms=W, lease_id="L2", target=target()
    )
    assert change.lease.gpus == ("G0", "G1")


def test_node_ineligible_carries_the_targets_reasons() -> None:
    reasons = grant_refused(
        LeaseTable.new(SETTINGS),
        req(),
        now_mono=0.0,
        lease_id="L",
        to=target(eligible=False, reasons=("node_cordoned", "node_stale")),
    )
    assert reasons == ("node_ineligible", "node_cordoned", "node_stale")


def test_no_free_gpu_counts_only_allocatable_and_unleased_gpus() -> None:
    table, _ = granted(gpus=1)  # takes G0 on w1
    reasons = grant_refused(table, req("t2", gpus=2), now_mono=101.0)
    assert reasons == ("no_free_gpu",)
    # A GPU the verified facts do not list (unhealthy, foreign process) is not offered.
    reasons = grant_refused(table, req("t2", gpus=1), now_mono=101.0, to=target(gpus=("G0",)))
    assert reasons == ("no_free_gpu",)
    # The same UUID on another node is another GPU (docs/design.md: a GPU is (node, UUID)).
    table, change = table.grant(
        req("t2", node="w2", gpus=1),
        now_mono=101.0,
        now_wall_ms=W,
        lease_id="L2",
        target=target("w2", gpus=("G0",)),
    )
    assert change.lease.gpus == ("G0",)


def test_every_applicable_reason_is_reported() -> None:
    table = LeaseTable.new(SETTINGS).set_term(2, now_mono=0.0, incarnation_id="i2")
    reasons = grant_refused(
        table,
        req(ttl_s=60.0, gpus=3),
        now_mono=1.0,
        lease_id="L",
        to=target(eligible=False, reasons=("node_draining",)),
    )
    assert set(reasons) == {
        "node_not_reported",
        "ttl_too_long",
        "node_ineligible",
        "node_draining",
        "no_free_gpu",
    }


def test_not_task_owner_and_stale_attempt() -> None:
    table, _ = granted()
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    reasons = grant_refused(table, req(attempt=2, submitter="intruder"), now_mono=102.0)
    assert reasons == ("not_task_owner",)
    reasons = grant_refused(table, req(attempt=1), now_mono=102.0)
    assert reasons == ("stale_attempt",)


def test_a_retried_grant_gets_the_same_lease_back() -> None:
    table, lease = granted()
    again, change = table.grant(
        req(), now_mono=101.0, now_wall_ms=W, lease_id="L-retry", target=target()
    )
    assert change.replay and change.lease == lease and change.records == ()
    assert again is table


def test_a_lease_id_is_never_reused() -> None:
    table, _ = granted()
    with pytest.raises(Conflict) as info:
        table.grant(req("t2"), now_mono=101.0, now_wall_ms=W, lease_id="L1", target=target())
    assert info.value.code == "lease_id_taken"


# -- renew --------------------------------------------------------------------------------


def test_renew_extends_from_now_and_persists_nothing() -> None:
    table, _ = granted(now=100.0)
    table, change = table.renew("L1", "w1", now_mono=108.0, now_wall_ms=W)
    assert change.lease.expires_mono == 118.0
    assert change.records == ()


def test_renew_at_the_last_instant_succeeds_and_one_tick_later_is_refused() -> None:
    table, _ = granted(now=100.0)
    table.renew("L1", "w1", now_mono=110.0, now_wall_ms=W)
    # Not yet declared dead (the margin has not passed) but no longer live on our clock.
    reasons = refused(table.renew, "L1", "w1", now_mono=math.nextafter(110.0, 200), now_wall_ms=W)
    assert reasons == ("lease_not_live",)
    assert table.get("L1").state == "live"


def test_renew_refusals() -> None:
    table, _ = granted()
    assert refused(table.renew, "L1", "w2", now_mono=101.0, now_wall_ms=W) == ("not_holder",)
    revoking, _ = table.revoke("L1", actor="op", reason="r", now_mono=101.0, now_wall_ms=W)
    assert refused(revoking.renew, "L1", "w1", now_mono=102.0, now_wall_ms=W) == ("lease_revoked",)
    done, _ = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    assert refused(done.renew, "L1", "w1", now_mono=102.0, now_wall_ms=W) == ("lease_not_live",)
    with pytest.raises(LeaseNotFound):
        table.renew("nope", "w1", now_mono=101.0, now_wall_ms=W)


@pytest.mark.parametrize("refusal", ["remote_disabled", "kill_switch"])
def test_renewal_before_start_of_a_remote_lease_obeys_the_settings(refusal: str) -> None:
    table, _ = granted(now=100.0)
    # The holder's renewal before it starts the task: refused while remote is off now.
    reasons = refused(
        table.renew,
        "L1",
        "w1",
        now_mono=101.0,
        now_wall_ms=W,
        before_start=True,
        remote_refusal=refusal,
    )
    assert reasons == (refusal,)
    assert table.get("L1").state == "live" and table.get("L1").expires_mono == 110.0
    _, start = table.renew("L1", "w1", now_mono=101.0, now_wall_ms=W, before_start=True)
    assert start.lease.expires_mono == 111.0
    if refusal == "kill_switch":
        # The kill switch stops running attempts too: every renewal is refused.
        assert refusal in STOPPING_REFUSALS
        assert refused(
            table.renew, "L1", "w1", now_mono=101.0, now_wall_ms=W, remote_refusal=refusal
        ) == (refusal,)
    else:
        # Remote turned off: a running attempt keeps renewing (it may finish).
        _, running = table.renew("L1", "w1", now_mono=101.0, now_wall_ms=W, remote_refusal=refusal)
        assert running.lease.expires_mono == 111.0


def test_the_kill_switch_revokes_every_live_remote_lease_and_only_those() -> None:
    table, _ = granted(now=100.0)
    local, _ = granted(node="sub", submitter="sub", target_gpus=("S0",))
    both = table._with(replace(local.get("L1"), lease_id="L2", task_id="t-local"))
    for refusal in (None, "remote_disabled"):
        _, kept = both.reconcile_holders(
            {},
            auto_revoke=False,
            now_mono=101.0,
            now_wall_ms=W,
            drain_actor="cp",
            remote_refusal=refusal,
        )
        assert kept.records == ()
    after, result = both.reconcile_holders(
        {},
        auto_revoke=False,
        now_mono=101.0,
        now_wall_ms=W,
        drain_actor="cp",
        remote_refusal="kill_switch",
    )
    (revoked,) = result.records
    assert (revoked.lease_id, revoked.state, revoked.reason) == ("L1", "revoking", "kill_switch")
    assert revoked.revoked_by == CONTROL_PLANE_ACTOR
    assert after.get("L2").state == "live"
    # Its holder stops and gives it back: it ends revoked, still saying why.
    _, gone = after.release("L1", "w1", outcome="stopped", now_mono=102.0, now_wall_ms=W)
    assert (gone.lease.state, gone.lease.reason) == ("revoked", "kill_switch")


def test_renewal_before_start_of_a_local_lease_ignores_remote_settings() -> None:
    table, _ = granted(node="sub", submitter="sub", target_gpus=("S0",))
    assert table.get("L1").kind == "local"
    _, change = table.renew(
        "L1", "sub", now_mono=101.0, now_wall_ms=W, before_start=True, remote_refusal="kill_switch"
    )
    assert change.lease.expires_mono == 111.0


# -- release and revoke -------------------------------------------------------------------


def test_release_outcomes() -> None:
    table, _ = granted()
    _t1, c1 = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W + 5)
    assert c1.lease.state == "released" and c1.records == (c1.lease,)
    assert c1.lease.state_changed_wall_ms == W + 5 and c1.lease.reason == "released"
    _t2, c2 = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    assert c2.lease.state == "completed"
    rev, _ = table.revoke("L1", actor="alice", reason="gpu_swap", now_mono=101.0, now_wall_ms=W)
    _t3, c3 = rev.release("L1", "w1", outcome="stopped", now_mono=102.0, now_wall_ms=W)
    assert c3.lease.state == "revoked"
    assert (c3.lease.reason, c3.lease.revoked_by) == ("gpu_swap", "alice")
    _t4, c4 = rev.release("L1", "w1", outcome="completed", now_mono=102.0, now_wall_ms=W)
    assert c4.lease.state == "completed"
    # A stop's reason, when the holder gives one (it left the cluster): the lease says it.
    _t5, c5 = table.release(
        "L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W, why="worker_left"
    )
    assert (c5.lease.state, c5.lease.reason) == ("released", "worker_left")
    # What the submitter falls back for: the holder's word, else how the lease died.
    assert (c1.lease.fallback_reason, c3.lease.fallback_reason) == (
        "lease_released",
        "lease_revoked",
    )
    assert c5.lease.fallback_reason == "worker_left"
    _t6, c6 = table.release(
        "L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W, why="worker_left"
    )
    assert (c6.lease.state, c6.lease.reason) == ("completed", "completed")
    _t7, c7 = rev.release(
        "L1", "w1", outcome="stopped", now_mono=102.0, now_wall_ms=W, why="worker_left"
    )
    assert (c7.lease.state, c7.lease.reason) == ("revoked", "gpu_swap")


def test_a_release_on_the_wire_takes_only_a_known_reason() -> None:
    assert LeaseReleaseRequest.from_json({"outcome": "stopped"}).reason is None
    body = LeaseReleaseRequest(outcome="stopped", reason="worker_left").to_json()
    assert body == {"outcome": "stopped", "reason": "worker_left"}
    with pytest.raises(BadRequest) as refused:
        LeaseReleaseRequest.from_json({"outcome": "stopped", "reason": "tired"})
    assert "reason" in str(refused.value)


def test_the_book_says_which_gpus_of_a_node_are_busy() -> None:
    """``busy_on``: a node's GPUs in a holding lease or a reported claim (what the control
    plane's GPU view says is leased); nothing to say before the node reports in full
    within a resumption window (its own report then says)."""
    table, lease = granted()
    assert table.busy_on("w1") == set(lease.gpus) and table.busy_on("w2") == frozenset()
    released, _ = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    assert released.busy_on("w1") == frozenset()
    restored = LeaseTable.restore(
        [lease], term=2, next_seq=2, settings=SETTINGS, now_mono=200.0, incarnation_id="r"
    )
    assert restored.window is not None and restored.busy_on("w1") is None
    claim = Claim(
        claim_id="c1",
        node="w1",
        task_id="t9",
        attempt=1,
        token=FencingToken(1, 9),
        gpus=("G1",),
        made_wall_ms=W,
    )
    holdings = NodeHoldings((as_reported(lease),), (claim,))
    reported = report(restored, "w1", now=201.0, holdings=holdings)
    assert reported.busy_on("w1") == {*lease.gpus, "G1"}
    assert reported.busy_on("w2") is None  # still silent in the window


def test_a_retried_release_is_a_replay() -> None:
    table, _ = granted()
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    again, change = table.release("L1", "w1", outcome="stopped", now_mono=102.0, now_wall_ms=W)
    assert again is table and change.replay and change.records == ()


def test_a_dead_lease_stays_dead() -> None:
    table, _ = granted()
    table, _ = table.expire_due(now_mono=200.0, now_wall_ms=W)
    with pytest.raises(IllegalLeaseTransition) as info:
        table.release("L1", "w1", outcome="completed", now_mono=201.0, now_wall_ms=W)
    assert info.value.reasons == ("lease_expired",)
    with pytest.raises(IllegalLeaseTransition):
        table.revoke("L1", actor="op", reason="r", now_mono=201.0, now_wall_ms=W)
    # Released and completed leases cannot become each other either.
    done, _ = granted()
    done, _ = done.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    with pytest.raises(IllegalLeaseTransition):
        done.release("L1", "w1", outcome="stopped", now_mono=102.0, now_wall_ms=W)


def test_release_refusals() -> None:
    table, _ = granted()
    assert refused(table.release, "L1", "w9", outcome="stopped", now_mono=101.0, now_wall_ms=W) == (
        "not_holder",
    )
    with pytest.raises(BadRequest):
        table.release("L1", "w1", outcome="vanished", now_mono=101.0, now_wall_ms=W)  # type: ignore[arg-type]


def test_revoke_keeps_gpus_and_key_until_release_or_expiry() -> None:
    table, lease = granted(gpus=2)
    table, change = table.revoke(
        "L1", actor="op", reason="maint", now_mono=101.0, now_wall_ms=W + 1
    )
    assert change.lease.state == "revoking" and change.records == (change.lease,)
    assert table.live_gpus() == {("w1", "G0"), ("w1", "G1")}
    assert grant_refused(table, req("t2"), now_mono=102.0) == ("no_free_gpu",)
    again, replay = table.revoke("L1", actor="op", reason="maint", now_mono=102.0, now_wall_ms=W)
    assert again is table and replay.replay
    # A revoking lease still expires only on the control plane's clock plus margin.
    _still, expired = table.expire_due(now_mono=lease.expires_mono + 5.0, now_wall_ms=W)
    assert expired == ()
    table, expired = table.expire_due(now_mono=lease.expires_mono + 5.1, now_wall_ms=W)
    assert [x.state for x in expired] == ["expired"]


# -- expiry -------------------------------------------------------------------------------


def test_expire_due_waits_for_the_margin_and_returns_what_to_persist() -> None:
    table, _lease = granted(now=100.0)  # expires_mono 110, margin 5
    same, expired = table.expire_due(now_mono=115.0, now_wall_ms=W)
    assert expired == () and same is table
    deadline = table.next_deadline()
    assert deadline is not None and 115.0 < deadline < 115.0001
    table, expired = table.expire_due(now_mono=deadline, now_wall_ms=W + 9)
    assert len(expired) == 1
    assert expired[0].state == "expired" and expired[0].reason == "expired"
    assert expired[0].state_changed_wall_ms == W + 9
    assert table.get("L1") == expired[0]
    assert table.next_deadline() is None


def test_next_deadline_follows_renewals() -> None:
    table, _ = granted(now=100.0)
    table, _ = granted(table, lease_id="L2", now=103.0, task_id="t2")
    assert table.next_deadline() == math.nextafter(115.0, math.inf)
    table, _ = table.renew("L1", "w1", now_mono=109.0, now_wall_ms=W)
    assert table.next_deadline() == math.nextafter(118.0, math.inf)


# -- fallback -----------------------------------------------------------------------------


def fallback(
    table: LeaseTable,
    *,
    gpus: tuple[str, ...] = (),
    attempt: int = 2,
    now: float = 200.0,
    lease_id: str = "F1",
    submitter: str = "sub",
    work_class: WorkClass | None = None,
    previous_node: str | None = None,
) -> tuple[LeaseTable, LeaseChange]:
    return table.confirm_dead_for_fallback(
        "t1",
        submitter=submitter,
        attempt=attempt,
        gpus=gpus,
        local_node=submitter,
        ttl_s=10.0,
        lease_id=lease_id,
        now_mono=now,
        now_wall_ms=W,
        work_class=work_class,
        previous_node=previous_node,
    )


def test_fallback_waits_while_the_lease_is_live() -> None:
    table, _ = granted(now=100.0)
    assert refused(fallback, table, now=105.0) == ("lease_live",)
    # Past expires_mono but inside the margin: not dead yet.
    assert refused(fallback, table, now=114.0) == ("lease_live",)
    revoking, _ = table.revoke("L1", actor="op", reason="r", now_mono=101.0, now_wall_ms=W)
    assert refused(fallback, revoking, now=105.0) == ("lease_live",)


def test_fallback_after_expiry_issues_a_higher_token_and_a_fence() -> None:
    table, lease = granted(now=100.0)
    table, _ = table.expire_due(now_mono=116.0, now_wall_ms=W)
    table, change = fallback(table, now=117.0)
    fence = change.lease
    assert fence.kind == "fence" and fence.holder == "sub" and fence.gpus == ()
    assert fence.token > lease.token
    assert fence.expires_mono == math.inf
    assert change.prior == table.get("L1")
    assert change.records == (fence,)
    assert table.next_deadline() is None  # a fence never expires
    # The fence takes the task key: a late grant for the task is refused.
    assert "task_key_taken" in grant_refused(table, req(attempt=3), now_mono=118.0, lease_id="L3")
    assert refused(table.renew, "F1", "sub", now_mono=118.0, now_wall_ms=W) == (
        "lease_not_renewable",
    )
    assert refused(table.revoke, "F1", actor="op", reason="r", now_mono=118.0, now_wall_ms=W) == (
        "lease_not_revocable",
    )
    table, done = table.release("F1", "sub", outcome="completed", now_mono=130.0, now_wall_ms=W)
    assert done.lease.state == "completed"


def test_fallback_declares_a_due_lease_dead_in_the_same_step() -> None:
    table, _lease = granted(now=100.0)
    table, change = fallback(table, now=115.5)  # due, but expire_due has not run
    records = change.records
    assert [r.lease_id for r in records] == ["L1", "F1"]
    assert records[0].state == "expired"
    assert table.get("L1").state == "expired"


def test_fallback_with_gpus_is_a_renewable_local_lease() -> None:
    table, _ = granted(now=100.0)
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    table, change = fallback(table, gpus=("S0",), now=102.0)
    local = change.lease
    assert local.kind == "local" and local.gpus == ("S0",) and local.expires_mono == 112.0
    assert ("sub", "S0") in table.live_gpus()
    table, renewed = table.renew("F1", "sub", now_mono=110.0, now_wall_ms=W)
    assert renewed.lease.expires_mono == 120.0
    # The submitter's GPU is not lent out while its own attempt holds it.
    assert grant_refused(
        table,
        req("t9", node="sub", submitter="other"),
        now_mono=111.0,
        lease_id="X",
        to=target("sub", gpus=("S0",)),
    ) == ("no_free_gpu",)


def test_fallback_with_busy_gpus_or_during_the_hold_is_refused() -> None:
    table, _ = granted(
        lease_id="L0", now=100.0, node="sub", submitter="other", task_id="t0", target_gpus=("S0",)
    )
    table, _ = granted(table, lease_id="L1", now=100.0)
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    assert refused(fallback, table, gpus=("S0",), now=102.0) == ("no_free_gpu",)
    held = table.set_term(2, now_mono=102.0, incarnation_id="i2")
    # Its own GPUs wait for its own report; the task key for its previous node's.
    assert refused(fallback, held, gpus=("S1",), now=103.0) == ("node_not_reported",)
    assert refused(fallback, held, now=103.0, previous_node="w1") == ("previous_node_not_reported",)
    # A fence takes no GPUs: nothing to wait for when the previous node is known.
    _, change = fallback(held, now=103.0)
    assert change.lease.token == FencingToken(2, 1)
    _, change = fallback(report(held, "w1", now=103.0), now=103.0, previous_node="w1")
    assert change.lease.token == FencingToken(2, 1)


def test_completed_never_enables_a_fallback() -> None:
    table, _ = granted(now=100.0)
    table, _ = table.release("L1", "w1", outcome="completed", now_mono=101.0, now_wall_ms=W)
    for now in (102.0, 1e6):
        assert refused(fallback, table, now=now) == ("task_completed",)


def test_fallback_refusals_and_replay() -> None:
    table, _ = granted(now=100.0)
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    assert refused(fallback, table, submitter="intruder") == ("not_task_owner",)
    assert refused(fallback, table, attempt=1) == ("stale_attempt",)
    with pytest.raises(BadRequest):
        table.confirm_dead_for_fallback(
            "t1",
            submitter="sub",
            attempt=2,
            gpus=(),
            local_node="elsewhere",
            ttl_s=10.0,
            lease_id="F",
            now_mono=102.0,
            now_wall_ms=W,
        )
    table, first = fallback(table)
    again, second = fallback(table, lease_id="F-retry")
    assert again is table and second.replay and second.lease == first.lease


def test_fallback_without_any_lease_needs_a_work_class() -> None:
    table = LeaseTable.new(SETTINGS)
    with pytest.raises(BadRequest):
        fallback(table, attempt=1)
    table, change = fallback(table, attempt=1, work_class="inference")
    assert change.lease.work_class == "inference" and change.prior is None


def test_local_grant_leases_the_submitters_own_gpus() -> None:
    table, change = LeaseTable.new(SETTINGS).local_grant(
        "t1",
        submitter="sub",
        attempt=1,
        work_class="training",
        gpus_wanted=1,
        ttl_s=10.0,
        target=target("sub", gpus=("S0",)),
        lease_id="L",
        now_mono=0.0,
        now_wall_ms=W,
    )
    assert change.lease.kind == "local" and change.lease.gpus == ("S0",)
    assert table.live_gpus() == {("sub", "S0")}


# -- restart and terms --------------------------------------------------------------------


def test_restore_counts_every_holding_lease_as_renewed_at_restart() -> None:
    table, _ = granted(now=100.0)
    table, _ = granted(table, lease_id="L2", task_id="t2", now=100.0)
    table, _ = table.revoke("L2", actor="op", reason="r", now_mono=101.0, now_wall_ms=W)
    table, _ = granted(table, lease_id="L3", task_id="t3", node="w3", now=100.0)
    table, _ = table.release("L3", "w3", outcome="completed", now_mono=101.0, now_wall_ms=W)
    stored = [Lease.from_json(x.to_json()) for x in table.leases.values()]
    # The new process's monotonic clock has another origin.
    restored = LeaseTable.restore(
        stored, term=1, next_seq=1, settings=SETTINGS, now_mono=5.0, incarnation_id="r"
    )
    assert restored.get("L1").expires_mono == 15.0
    assert restored.get("L2").expires_mono == 15.0 and restored.get("L2").state == "revoking"
    assert restored.get("L3").state == "completed"
    assert restored.next_seq == 4  # above every persisted token of the term
    assert restored.window == ResumeWindow(5.0, 5.0, 5.0 + 30.0 + 5.0)
    assert restored.incarnation == Incarnation(1, "r")
    # A renewal right after restart works; nothing expires before now + ttl + margin.
    restored.renew("L1", "w1", now_mono=6.0, now_wall_ms=W)
    assert restored.expire_due(now_mono=20.0, now_wall_ms=W)[1] == ()
    assert len(restored.expire_due(now_mono=20.1, now_wall_ms=W)[1]) == 2
    assert grant_refused(
        restored, req("t4", node="w3"), now_mono=6.0, lease_id="L4", to=target("w3")
    ) == ("node_not_reported",)


def test_restore_refuses_inconsistent_stores() -> None:
    _table, lease = granted(now=100.0)
    with pytest.raises(StoreError):
        LeaseTable.restore(
            [lease, lease], term=1, next_seq=1, settings=SETTINGS, now_mono=0.0, incarnation_id="r"
        )
    with pytest.raises(StoreError):
        LeaseTable.restore(
            [lease], term=0, next_seq=1, settings=SETTINGS, now_mono=0.0, incarnation_id="r"
        )
    twin = replace(lease, lease_id="L2", token=FencingToken(1, 2))
    with pytest.raises(StoreError):  # same GPU and task key in two live leases
        LeaseTable.restore(
            [lease, twin], term=1, next_seq=1, settings=SETTINGS, now_mono=0.0, incarnation_id="r"
        )


def test_a_new_terms_tokens_outrank_the_old_terms() -> None:
    table, old = granted(now=100.0)
    table = report(table.set_term(2, now_mono=100.0, incarnation_id="i2"), "w1", now=100.0)
    table, new = granted(table, lease_id="L2", task_id="t2", now=100.0)
    assert new.token == FencingToken(2, 1) > old.token


# -- reconcile and queries ----------------------------------------------------------------


def test_reconcile_flags_and_optionally_revokes() -> None:
    table, _ = granted(now=100.0)
    table, _ = granted(table, lease_id="L2", task_id="t2", node="w2", now=100.0)
    table, _ = granted(table, lease_id="L3", task_id="t3", node="w3", now=100.0)
    status: dict[str, HolderStatus] = {"w1": "stale", "w2": "quarantined", "w3": "ok"}
    same, result = table.reconcile(
        status,
        auto_revoke=False,
        now_mono=101.0,
        now_wall_ms=W,
    )
    assert same is table and result.records == ()
    assert [(f.lease_id, f.status, f.revoked) for f in result.flagged] == [
        ("L1", "stale", False),
        ("L2", "quarantined", False),
    ]
    table, result = table.reconcile(
        status,
        auto_revoke=True,
        now_mono=101.0,
        now_wall_ms=W,
    )
    assert [(x.lease_id, x.state, x.reason) for x in result.records] == [
        ("L1", "revoking", "holder_stale"),
        ("L2", "revoking", "holder_quarantined"),
    ]
    assert table.get("L3").state == "live"
    # Already revoking: flagged, not revoked again.
    _, result = table.reconcile(
        status,
        auto_revoke=True,
        now_mono=102.0,
        now_wall_ms=W,
    )
    assert [f.revoked for f in result.flagged] == [False, False] and result.records == ()


def _lc(state: str, **deadline: int) -> NodeLifecycle:
    return NodeLifecycle(state, W - 1000, "o-alice", "why", **deadline)  # type: ignore[arg-type]


def test_a_holders_view_gives_its_status() -> None:
    assert HolderView().status == "ok"
    assert HolderView(stale=True).status == "stale"
    # An operator's word outranks a silence.
    assert HolderView(_lc("quarantined"), stale=True).status == "quarantined"
    assert HolderView(_lc("draining"), stale=False).status == "ok"
    draining = HolderView(_lc("draining", deadline_wall_ms=W + 10))
    assert not draining.drain_overdue(W + 9) and draining.drain_overdue(W + 10)
    assert not HolderView(_lc("draining")).drain_overdue(W + 10**9)  # no deadline
    assert not HolderView(_lc("cordoned")).drain_overdue(W)


def test_reconcile_holders_revokes_the_live_leases_of_an_overdue_drain() -> None:
    table, _ = granted(now=100.0)
    table, _ = granted(table, lease_id="L2", task_id="t2", node="w2", now=100.0)
    table, _ = granted(table, lease_id="L3", task_id="t3", node="w3", now=100.0)
    table, _ = table.revoke("L3", actor="op", reason="swap", now_mono=100.0, now_wall_ms=W)
    assert table.holders() == ("w1", "w2", "w3")
    views = {
        "w1": HolderView(_lc("draining", deadline_wall_ms=W + 5)),
        "w2": HolderView(_lc("draining", deadline_wall_ms=W + 50)),
        "w3": HolderView(_lc("draining", deadline_wall_ms=W + 5)),
    }
    same, result = table.reconcile_holders(
        views, auto_revoke=False, now_mono=101.0, now_wall_ms=W, drain_actor="n-cp"
    )
    assert same is table and result.records == () and result.flagged == ()
    table, result = table.reconcile_holders(
        views, auto_revoke=False, now_mono=101.0, now_wall_ms=W + 5, drain_actor="n-cp"
    )
    # w1's live lease is revoked; w3's, already revoking, keeps its first reason.
    assert [(x.lease_id, x.state, x.reason, x.revoked_by) for x in result.records] == [
        ("L1", "revoking", "drain_deadline", "n-cp")
    ]
    assert table.get("L2").state == "live" and table.get("L3").reason == "swap"
    # Later w2's deadline passes too; w1's lease, revoking already, is not revoked again.
    _, again = table.reconcile_holders(
        views, auto_revoke=False, now_mono=102.0, now_wall_ms=W + 10**6, drain_actor="n-cp"
    )
    assert [x.lease_id for x in again.records] == ["L2"]


def test_reconcile_holders_flags_as_reconcile_does() -> None:
    table, _ = granted(now=100.0)
    table, _ = granted(table, lease_id="L2", task_id="t2", node="w2", now=100.0)
    views = {"w1": HolderView(stale=True), "w2": HolderView(_lc("quarantined"))}
    table, result = table.reconcile_holders(
        views, auto_revoke=True, now_mono=101.0, now_wall_ms=W, drain_actor="n-cp"
    )
    assert [(f.lease_id, f.status, f.revoked) for f in result.flagged] == [
        ("L1", "stale", True),
        ("L2", "quarantined", True),
    ]
    assert [(x.reason, x.revoked_by) for x in result.records] == [
        ("holder_stale", CONTROL_PLANE_ACTOR),
        ("holder_quarantined", CONTROL_PLANE_ACTOR),
    ]


def test_query_helpers() -> None:
    table, _ = granted(now=100.0)
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=101.0, now_wall_ms=W)
    table, _ = granted(table, lease_id="L2", attempt=2, now=102.0)
    table, _ = granted(table, lease_id="L3", task_id="t3", node="w2", now=102.0)
    assert [x.lease_id for x in table.by_task("t1")] == ["L1", "L2"]
    assert table.latest("t1") == table.get("L2")
    assert table.latest("none") is None
    assert [x.lease_id for x in table.by_node("w1")] == ["L1", "L2"]
    assert [x.lease_id for x in table.in_state("released")] == ["L1"]
    assert [x.lease_id for x in table.holding()] == ["L2", "L3"]
    assert table.find("zz") is None
    with pytest.raises(LeaseNotFound):
        table.get("zz")
    assert table.invariant_violation() is None
    assert all(x.state in HOLDING_STATES for x in table.holding())


# -- stateful: the safety contract after every step ---------------------------------------

NODES = ("a", "b", "c")
NODE_GPUS = {node: (f"{node}-g0", f"{node}-g1") for node in NODES}
TASKS = tuple(f"t{i}" for i in range(8))
OWNER = {task: NODES[i % len(NODES)] for i, task in enumerate(TASKS)}
MARGIN = SETTINGS.expiry_margin_s


class LeaseTableMachine(RuleBasedStateMachine):
    """Drives a LeaseTable with random operations and checks each answer against an
    independent model, and safety rules 1-5 after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable.new(SETTINGS)
        self.now = 0.0
        self.wall = W
        self.ids = 0
        self.max_token: FencingToken | None = None
        # lease id -> latest moment (control plane clock) a renewal or grant reached.
        self.model_expiry: dict[str, float] = {}
        # lease id -> last state seen.
        self.seen_state: dict[str, str] = {}
        # What the shell wrote durably: only what ``records`` told it to.
        self.store: dict[str, dict[str, object]] = {}
        self.incarnations = 0
        self.reports = 0

    # helpers ------------------------------------------------------------------------------

    def _lease_id(self) -> str:
        self.ids += 1
        return f"L{self.ids}"

    def _persist(self, records: tuple[Lease, ...]) -> None:
        for lease in records:
            self.store[lease.lease_id] = lease.to_json()

    def _new_token(self, token: FencingToken) -> None:
        assert self.max_token is None or token > self.max_token, "tokens strictly increase"
        self.max_token = token

    def _pick(self, data: st.DataObject) -> Lease | None:
        leases = sorted(self.table.leases)
        if not leases:
            return None
        return self.table.get(data.draw(st.sampled_from(leases)))

    def _next_attempt(self, task_id: str) -> int:
        return max((x.attempt for x in self.table.by_task(task_id)), default=0) + 1

    # rules --------------------------------------------------------------------------------

    # Steps on the scale of TTLs and the margin, so expiry lands inside and outside it.
    @rule(dt=st.one_of(st.sampled_from([0.5, 1.0, 2.0, 4.0, 6.0, 11.0]), st.floats(0.0, 25.0)))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.wall += int(dt * 1000)

    @rule(data=st.data(), offset=st.sampled_from([-0.5, 0.0, MARGIN / 2, MARGIN, MARGIN + 0.1]))
    def jump_to_an_expiry(self, data: st.DataObject, offset: float) -> None:
        """Move time to a boundary of a holding lease: before, at, inside the margin, at
        its end and just past it — where an off-by-a-margin bug would show."""
        due = sorted(x.expires_mono for x in self.table.holding() if x.kind != "fence")
        if due:
            moment = data.draw(st.sampled_from(due)) + offset
            if moment > self.now:
                self.wall += int((moment - self.now) * 1000)
                self.now = moment

    # Weighted towards grants that succeed; every refusal reason still comes up.
    @rule(
        data=st.data(),
        task_id=st.sampled_from(TASKS),
        node=st.sampled_from(NODES),
        gpus_wanted=st.sampled_from([0, 1, 1, 2, 3]),
        ttl=st.sampled_from([1.0, 3.0, 10.0, 30.0, 31.0]),
        eligible=st.sampled_from([True, True, True, False]),
        attempt_shift=st.sampled_from([0, 0, 0, -1]),
        wrong_owner=st.sampled_from([False, False, False, True]),
    )
    def grant(
        self,
        data: st.DataObject,
        task_id: str,
        node: str,
        gpus_wanted: int,
        ttl: float,
        eligible: bool,
        attempt_shift: int,
        wrong_owner: bool,
    ) -> None:
        submitter = OWNER[task_id]
        if wrong_owner:
            submitter = next(n for n in NODES if n != submitter)
        attempt = max(1, self._next_attempt(task_id) + attempt_shift)
        allocatable = data.draw(
            st.one_of(
                st.just(NODE_GPUS[node]),
                st.lists(st.sampled_from(NODE_GPUS[node]), unique=True, max_size=2).map(tuple),
            )
        )
        view = TargetView(
            node,
            eligible=eligible,
            reasons=() if eligible else ("node_cordoned",),
            allocatable_gpus=allocatable,
        )
        request = req(
            task_id,
            node,
            attempt=attempt,
            gpus=gpus_wanted,
            ttl_s=ttl,
            submitter=submitter,
            work_class="agent",
        )
        history = self.table.by_task(task_id)
        busy = self.table.busy_gpus()
        expected: set[str] = set()
        if any(x.submitter != submitter for x in history):
            expected.add("not_task_owner")
        if any(x.state in ("live", "revoking", "completed") for x in history):
            expected.add("task_key_taken")
        if any(x.state == "completed" for x in history):
            expected.add("task_completed")
        if history and attempt <= max(x.attempt for x in history):
            expected.add("stale_attempt")
        window = self.table.window
        if window is not None:
            if self.now < window.authority_from_mono:
                expected.add("previous_authority_live")
            if self.now < window.silent_until_mono and node not in self.table.marks:
                expected.add("node_not_reported")
        if ttl > SETTINGS.max_lease_ttl_s:
            expected.add("ttl_too_long")
        if ttl < MIN_LEASE_TTL_S:
            expected.add("ttl_too_short")
        if not eligible:
            expected.add("node_ineligible")
        if sum((node, g) not in busy for g in allocatable) < gpus_wanted:
            expected.add("no_free_gpu")
        before = self.table
        try:
            self.table, change = self.table.grant(
                request,
                now_mono=self.now,
                now_wall_ms=self.wall,
                lease_id=self._lease_id(),
                target=view,
            )
        except LeaseRefused as exc:
            assert self.table is before
            assert set(exc.reasons) - set(view.reasons) == expected
            assert expected
            return
        if change.replay:
            lease = change.lease
            assert self.table is before and change.records == ()
            assert lease.holding and lease.attempt == attempt and lease.holder == node
            return
        assert not expected, expected
        lease = change.lease
        assert change.records == (lease,)
        assert len(lease.gpus) == gpus_wanted
        assert not any((node, g) in busy for g in lease.gpus)
        assert set(lease.gpus) <= set(allocatable)
        self._new_token(lease.token)
        self.model_expiry[lease.lease_id] = self.now + ttl
        self._persist(change.records)

    @rule(data=st.data(), right_holder=st.booleans())
    def renew(self, data: st.DataObject, right_holder: bool) -> None:
        lease = self._pick(data)
        if lease is None:
            return
        holder = lease.holder if right_holder else "intruder"
        try:
            self.table, change = self.table.renew(
                lease.lease_id, holder, now_mono=self.now, now_wall_ms=self.wall
            )
        except LeaseRefused as exc:
            if holder != lease.holder:
                assert exc.reasons == ("not_holder",)
            elif lease.kind == "fence":
                assert exc.reasons == ("lease_not_renewable",)
            elif lease.state == "revoking":
                assert exc.reasons == ("lease_revoked",)
            else:
                assert lease.state != "live" or self.now > lease.expires_mono
            return
        # Renew never succeeds past expires_mono, nor for anything but a live lease.
        assert lease.state == "live" and lease.kind != "fence"
        assert self.now <= lease.expires_mono
        assert self.now <= self.model_expiry[lease.lease_id]
        assert change.records == ()
        self.model_expiry[lease.lease_id] = max(
            self.model_expiry[lease.lease_id], self.now + lease.ttl_s
        )

    @rule(data=st.data(), outcome=st.sampled_from(["stopped", "completed"]))
    def release(self, data: st.DataObject, outcome: str) -> None:
        lease = self._pick(data)
        if lease is None:
            return
        try:
            self.table, change = self.table.release(
                lease.lease_id,
                lease.holder,
                outcome=outcome,  # type: ignore[arg-type]
                now_mono=self.now,
                now_wall_ms=self.wall,
            )
        except IllegalLeaseTransition:
            assert lease.terminal
            return
        if change.replay:
            assert lease.terminal and change.records == ()
            return
        assert lease.holding
        self._persist(change.records)

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        lease = self._pick(data)
        if lease is None:
            return
        try:
            self.table, change = self.table.revoke(
                lease.lease_id, actor="op", reason="test", now_mono=self.now, now_wall_ms=self.wall
            )
        except LeaseRefused as exc:
            assert lease.terminal or exc.reasons == ("lease_not_revocable",)
            return
        self._persist(change.records)

    @rule()
    def expire_due(self) -> None:
        self.table, expired = self.table.expire_due(now_mono=self.now, now_wall_ms=self.wall)
        for lease in expired:
            # Only ever declared dead past the control plane's clock plus margin.
            assert self.now > self.model_expiry[lease.lease_id] + MARGIN
        self._persist(expired)

    @rule(
        data=st.data(),
        task_id=st.sampled_from(TASKS),
        with_gpu=st.booleans(),
        stale=st.sampled_from([False, False, True]),
        of_a_holder=st.booleans(),
    )
    def fallback(
        self, data: st.DataObject, task_id: str, with_gpu: bool, stale: bool, of_a_holder: bool
    ) -> None:
        holding_tasks = sorted({x.task_id for x in self.table.holding()})
        if of_a_holder and holding_tasks:
            task_id = data.draw(st.sampled_from(holding_tasks))
        submitter = OWNER[task_id]
        gpus = (data.draw(st.sampled_from(NODE_GPUS[submitter])),) if with_gpu else ()
        attempt = max(1, self._next_attempt(task_id) - (1 if stale else 0))
        before = self.table
        history = before.by_task(task_id)
        try:
            self.table, change = self.table.confirm_dead_for_fallback(
                task_id,
                submitter=submitter,
                attempt=attempt,
                gpus=gpus,
                local_node=submitter,
                ttl_s=10.0,
                lease_id=self._lease_id(),
                now_mono=self.now,
                now_wall_ms=self.wall,
                work_class="agent",
            )
        except LeaseRefused as exc:
            assert self.table is before
            if any(x.state == "completed" for x in history):
                assert "task_completed" in exc.reasons  # completed never enables fallback
            return
        if change.replay:
            assert self.table is before
            return
        # The control plane confirmed: nothing of the task holds, and nothing completed.
        assert not any(x.state == "completed" for x in history)
        for old in history:
            now_state = self.table.get(old.lease_id).state
            assert now_state in DEAD_STATES
            if old.holding:  # declared dead in this very step: must be due
                assert now_state == "expired"
                assert self.now > self.model_expiry[old.lease_id] + MARGIN
        lease = change.lease
        assert lease.kind == ("local" if gpus else "fence")
        self._new_token(lease.token)
        if gpus:
            self.model_expiry[lease.lease_id] = self.now + 10.0
        self._persist(change.records)

    @rule(lose_counter=st.booleans(), resume=st.booleans())
    def restart(self, lose_counter: bool, resume: bool) -> None:
        """The control plane restarts: it reads back only what was written (the store)."""
        leases = [Lease.from_json(body) for body in self.store.values()]
        before = self.table
        self.incarnations += 1
        self.table = LeaseTable.restore(
            leases,
            term=before.term,
            next_seq=1 if lose_counter else before.next_seq,
            settings=SETTINGS,
            now_mono=self.now,
            incarnation_id=f"r{self.incarnations}",
            resume=resume,
        )
        assert not self.table.marks and not self.table.claims
        for lease in self.table.holding():
            if lease.kind != "fence":
                # A restart never shortens a lease: it counts as renewed at restart.
                assert lease.expires_mono >= before.get(lease.lease_id).expires_mono
                self.model_expiry[lease.lease_id] = lease.expires_mono

    @rule(authority_in_s=st.sampled_from([None, 0.0, 5.0]))
    def new_term(self, authority_in_s: float | None) -> None:
        self.incarnations += 1
        self.table = self.table.set_term(
            self.table.term + 1,
            now_mono=self.now,
            incarnation_id=f"t{self.incarnations}",
            authority_from_mono=None if authority_in_s is None else self.now + authority_in_s,
        )

    @rule(data=st.data(), node=st.sampled_from(NODES))
    def report(self, data: st.DataObject, node: str) -> None:
        """``node`` reports in full what it holds by the table, some of it ended (a
        release whose answer was lost), maybe with a lease the table never heard of (one
        granted after the store it restored from, or by a previous leader)."""
        leases: list[ReportedLease] = []
        ended: dict[str, ReportedPhase] = {}
        for lease in held_by(self.table, node).leases:
            phase = data.draw(st.sampled_from(["started", "started", "completed", "stopped"]))
            leases.append(replace(lease, phase=phase))
            if phase != "started":
                ended[lease.lease_id] = phase
        unknown: ReportedLease | None = None
        if data.draw(st.booleans()):
            task_id = data.draw(st.sampled_from(TASKS))
            submitter = OWNER[task_id]
            term = data.draw(st.sampled_from([self.table.term - 1, self.table.term]))
            unknown = ReportedLease(
                lease_id=self._lease_id(),
                task_id=task_id,
                attempt=self._next_attempt(task_id),
                work_class="agent",
                submitter=submitter,
                gpus=(data.draw(st.sampled_from(NODE_GPUS[node])),) if submitter != node else (),
                token=FencingToken(max(term, 0), data.draw(st.integers(1, 40))),
                ttl_s=10.0 if submitter != node else 0.0,
                kind="remote" if submitter != node else "fence",
                phase=data.draw(st.sampled_from(["accepted", "started", "completed"])),
            )
            leases.append(unknown)
        self.reports += 1
        message = FullReport(
            node, self.table.incarnation, 1, self.reports, NodeHoldings(tuple(leases))
        )
        before = self.table
        self.table, result = self.table.receive(message, now_mono=self.now, now_wall_ms=self.wall)
        assert result.answer.status == "applied" and self.table.reported(node)
        for lease_id, phase in ended.items():
            now_state = self.table.get(lease_id).state
            was = before.get(lease_id).state
            # A release whose answer was lost: completed / released — never expired.
            expected = {"completed": "completed", "stopped": "released"}[phase]
            if was == "revoking" and phase == "stopped":
                expected = "revoked"
            assert now_state == expected
        if unknown is not None and unknown.lease_id in self.table.leases:
            learned = self.table.get(unknown.lease_id)
            if learned.holding:
                self.model_expiry[learned.lease_id] = self.now + learned.ttl_s
        for lease in result.records:
            if lease.lease_id == getattr(unknown, "lease_id", None):
                # A learned token keeps every later issued token above it.
                self.max_token = max(self.max_token or lease.token, lease.token)
        self._persist(result.records)

    @rule(data=st.data(), auto_revoke=st.booleans())
    def reconcile(self, data: st.DataObject, auto_revoke: bool) -> None:
        statuses: tuple[HolderStatus, ...] = ("ok", "stale", "quarantined")
        status = {n: data.draw(st.sampled_from(statuses)) for n in NODES}
        self.table, result = self.table.reconcile(
            status,
            auto_revoke=auto_revoke,
            now_mono=self.now,
            now_wall_ms=self.wall,
        )
        assert auto_revoke or result.records == ()
        self._persist(result.records)

    # invariants ---------------------------------------------------------------------------

    @invariant()
    def no_gpu_in_two_holding_leases(self) -> None:
        seen: set[tuple[str, str]] = set()
        for lease in self.table.leases.values():
            if lease.state in ("live", "revoking"):
                for gpu in lease.gpus:
                    assert (lease.holder, gpu) not in seen
                    seen.add((lease.holder, gpu))

    @invariant()
    def one_key_taker_per_task(self) -> None:
        for task_id in TASKS:
            takers = [
                x
                for x in self.table.by_task(task_id)
                if x.state in ("live", "revoking", "completed")
            ]
            assert len(takers) <= 1

    @invariant()
    def dead_stays_dead_and_nothing_is_forgotten(self) -> None:
        for lease_id, state in self.seen_state.items():
            now_state = self.table.get(lease_id).state
            if state in TERMINAL_STATES:
                assert now_state == state
            if state == "revoking":
                assert now_state != "live"
        self.seen_state = {k: v.state for k, v in self.table.leases.items()}

    @invariant()
    def tokens_are_unique_and_below_the_next(self) -> None:
        tokens = [x.token for x in self.table.leases.values()]
        assert len(set(tokens)) == len(tokens)
        ceiling = FencingToken(self.table.term, self.table.next_seq)
        assert all(t < ceiling for t in tokens)
        if self.max_token is not None:
            assert self.max_token < ceiling

    @invariant()
    def records_cover_every_durable_change(self) -> None:
        assert self.store == {k: v.to_json() for k, v in self.table.leases.items()}

    @invariant()
    def the_table_agrees_with_itself(self) -> None:
        assert self.table.invariant_violation() is None


TestLeaseTableMachine = LeaseTableMachine.TestCase
TestLeaseTableMachine.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
