"""The lease table after a restart or a new term (safety rule 5, ADR 0015): it learns
what the nodes hold from their full reports and resumes grants per node."""

from __future__ import annotations

from dataclasses import replace

import pytest
from core.test_leases import req

from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import (
    RESUMPTION_REASONS,
    GrantRequest,
    GrantWait,
    Lease,
    LeaseNotFound,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    ReportNeeded,
    TargetView,
)
from populi_peer.core.reports import (
    Claim,
    FullReport,
    NodeHoldings,
    RefusedLease,
    ReportChange,
    ReportChanges,
    ReportedLease,
)
from populi_peer.errors import BadRequest
from support.reports import as_reported

SETTINGS = LeaseSettings(max_lease_ttl_s=30.0, expiry_margin_s=5.0)
W = 1_700_000_000_000
T0 = 1000.0  # the restarted control plane's clock at its start


def view(node: str = "w1", gpus: tuple[str, ...] = ("G0", "G1")) -> TargetView:
    return TargetView(node, eligible=True, allocatable_gpus=gpus)


def grant(
    table: LeaseTable, task_id: str, lease_id: str, *, now: float, **kwargs: object
) -> tuple[LeaseTable, Lease]:
    node = str(kwargs.get("node", "w1"))
    table, change = table.grant(
        req(task_id, **kwargs),  # type: ignore[arg-type]
        now_mono=now,
        now_wall_ms=W,
        lease_id=lease_id,
        target=view(node),
    )
    return table, change.lease


def reasons_of(table: LeaseTable, request: GrantRequest, now: float) -> tuple[str, ...]:
    with pytest.raises(LeaseRefused) as info:
        table.grant(request, now_mono=now, now_wall_ms=W, lease_id="X", target=view(request.target))
    return info.value.reasons


def restarted(*leases: Lease, next_seq: int = 1, **kwargs: object) -> LeaseTable:
    """The control plane restarts at ``T0`` from these persisted leases."""
    return LeaseTable.restore(
        [Lease.from_json(x.to_json()) for x in leases],
        term=1,
        next_seq=next_seq,
        settings=SETTINGS,
        now_mono=T0,
        incarnation_id="after",
        **kwargs,  # type: ignore[arg-type]
    )


def full(
    table: LeaseTable,
    node: str,
    *leases: ReportedLease,
    claims: tuple[Claim, ...] = (),
    now: float = T0 + 1,
    seq: int = 1,
) -> tuple[LeaseTable, RefusedLease | None, tuple[Lease, ...]]:
    message = FullReport(node, table.incarnation, 1, seq, NodeHoldings(leases, claims))
    table, result = table.receive(message, now_mono=now, now_wall_ms=W)
    assert result.answer.status == "applied"
    assert result.answer.incarnation == table.incarnation
    refused = result.answer.refused[0] if result.answer.refused else None
    return table, refused, result.records


def before_restart() -> tuple[LeaseTable, Lease, Lease]:
    table = LeaseTable.new(SETTINGS)
    table, l1 = grant(table, "t1", "L1", now=0.0)
    table, l2 = grant(table, "t2", "L2", now=0.0, node="w2")
    return table, l1, l2


# -- per-node resumption ------------------------------------------------------------------


def test_after_a_restart_a_node_is_granted_on_as_soon_as_it_reports() -> None:
    """Issue 12: a GPU task submitted right after a restart starts once its worker has
    reported, not after the longest TTL."""
    _, l1, l2 = before_restart()
    table = restarted(l1, l2, next_seq=3)
    assert reasons_of(table, req("t3", gpus=1), T0) == ("node_not_reported",)
    assert table.grant_wait("w1", T0) == GrantWait("node_not_reported", T0 + 35.0)
    table, refused, records = full(table, "w1", as_reported(l1))
    assert refused is None and records == ()
    assert table.reported("w1") and table.grants_open_for("w1", T0 + 1)
    table, lease = grant(table, "t3", "L3", now=T0 + 1)
    assert lease.gpus == ("G1",)  # G0 stays with the running attempt it reported
    # w2 has not reported: its GPUs wait, and so does a task whose last node it was.
    assert reasons_of(table, req("t4", "w2"), T0 + 1) == ("node_not_reported",)
    assert reasons_of(table, req("t4", gpus=0, previous="w2"), T0 + 1) == (
        "previous_node_not_reported",
    )
    assert set(RESUMPTION_REASONS) >= {"node_not_reported", "previous_node_not_reported"}


def test_a_silent_node_is_held_until_any_lease_on_it_could_have_expired() -> None:
    _, l1, _ = before_restart()
    table = restarted(l1, next_seq=3, longest_ttl_s=60.0)  # the TTL was lowered since
    until = T0 + 60.0 + SETTINGS.expiry_margin_s
    assert table.window is not None and table.window.silent_until_mono == until
    with pytest.raises(LeaseRefused) as info:
        table.grant(
            req("t3", "w2"),
            now_mono=T0 + 5,
            now_wall_ms=W,
            lease_id="X",
            target=view("w2"),
        )
    assert info.value.details["wait_s"] == pytest.approx(until - T0 - 5)
    assert reasons_of(table, req("t3", "w2"), until - 0.001) == ("node_not_reported",)
    _, lease = grant(table, "t3", "L3", now=until, node="w2")
    assert lease.holder == "w2"
    # longest_ttl_s never shortens the window below the current max_lease_ttl_s.
    short = restarted(l1, next_seq=3, longest_ttl_s=1.0)
    assert short.window is not None and short.window.silent_until_mono == T0 + 35.0


def test_a_cluster_that_never_granted_has_nothing_to_wait_for() -> None:
    table = restarted(resume=False)
    assert table.window is None and table.grants_open_for("w1", T0)
    grant(table, "t1", "L1", now=T0)


def test_grants_wait_for_the_previous_authority_to_end() -> None:
    table, _, _ = before_restart()
    table = table.set_term(2, now_mono=T0, incarnation_id="t2", authority_from_mono=T0 + 4)
    table, _, _ = full(table, "w1", now=T0 + 1)
    assert reasons_of(table, req("t3"), T0 + 1) == ("previous_authority_live",)
    assert table.grant_wait("w1", T0 + 1) == GrantWait("previous_authority_live", T0 + 4)
    # The silent window counts from the end of the previous authority, not from now.
    assert table.window is not None and table.window.silent_until_mono == T0 + 4 + 35.0
    grant(table, "t3", "L3", now=T0 + 4)


def test_a_fallback_waits_for_the_tasks_previous_node() -> None:
    table, _, _ = before_restart()
    table, _ = table.release("L1", "w1", outcome="stopped", now_mono=1.0, now_wall_ms=W)
    table = restarted(*table.leases.values(), next_seq=3)

    def fall_back(t: LeaseTable, gpus: tuple[str, ...] = ()) -> Lease:
        _, change = t.confirm_dead_for_fallback(
            "t1",
            submitter="sub",
            attempt=2,
            gpus=gpus,
            local_node="sub",
            ttl_s=10.0,
            lease_id="F",
            now_mono=T0 + 1,
            now_wall_ms=W,
            previous_node="w1",
        )
        return change.lease

    with pytest.raises(LeaseRefused) as info:
        fall_back(table)
    assert info.value.reasons == ("previous_node_not_reported",)
    table, _, _ = full(table, "w1")
    assert fall_back(table).kind == "fence"
    with pytest.raises(LeaseRefused) as info:
        fall_back(table, ("S0",))  # its own GPUs wait for its own report
    assert info.value.reasons == ("node_not_reported",)
    table, _, _ = full(table, "sub")
    assert fall_back(table, ("S0",)).kind == "local"


# -- what a report teaches ------------------------------------------------------------------


def test_an_attempt_that_ended_with_its_release_lost_is_recorded_never_expired() -> None:
    """A control-plane restart with tasks finished and results undelivered: the report
    records them completed / released, so the finished task is never run again."""
    _, l1, l2 = before_restart()
    table = restarted(l1, l2, next_seq=3)
    table, _, records = full(table, "w1", as_reported(l1, "completed"))
    assert [x.state for x in records] == ["completed"] and table.get("L1").reason == "completed"
    table, _, records = full(table, "w2", as_reported(l2, "stopped"))
    assert [x.state for x in records] == ["released"]
    table, expired = table.expire_due(now_mono=T0 + 1e6, now_wall_ms=W)
    assert expired == ()
    with pytest.raises(LeaseRefused) as info:
        table.confirm_dead_for_fallback(
            "t1", submitter="sub", attempt=2, gpus=(), local_node="sub", ttl_s=10.0,
            lease_id="F", now_mono=T0 + 2, now_wall_ms=W, previous_node="w1",
        )  # fmt: skip
    assert info.value.reasons == ("task_completed",)


def test_a_dead_lease_stays_dead_whatever_its_holder_reports() -> None:
    _, l1, _ = before_restart()
    table = restarted(l1, next_seq=3)
    table, expired = table.expire_due(now_mono=T0 + 20, now_wall_ms=W)
    assert [x.state for x in expired] == ["expired"]
    table, refused, records = full(table, "w1", as_reported(l1), now=T0 + 21)
    assert refused == RefusedLease("L1", "lease_expired") and records == ()
    table, refused, records = full(table, "w1", as_reported(l1, "completed"), now=T0 + 22, seq=2)
    assert refused is None and records == () and table.get("L1").state == "expired"


def test_a_lease_the_table_never_heard_of_is_learned_and_renewed() -> None:
    """Granted after the store this table restored from (or, later, by a previous
    leader): adopted from the holder's report, persisted, and renewable."""
    table, l1, _ = before_restart()
    table = restarted(next_seq=1)  # an older store: it holds nothing
    with pytest.raises(ReportNeeded):
        table.renew("L1", "w1", now_mono=T0 + 0.5, now_wall_ms=W)
    table, refused, records = full(table, "w1", as_reported(l1, "accepted"), now=T0 + 1)
    assert refused is None and [x.lease_id for x in records] == ["L1"]
    learned = table.get("L1")
    assert learned.state == "live" and learned.expires_mono == T0 + 1 + 10.0
    assert table.next_seq == 2  # above the learned token (1.1): never issued again
    table, change = table.renew("L1", "w1", now_mono=T0 + 2, now_wall_ms=W, before_start=True)
    assert change.lease.expires_mono == T0 + 12
    # Its GPU is busy, its task key taken.
    assert reasons_of(table, req("t1", attempt=2), T0 + 2) == ("task_key_taken",)
    table, lease = grant(table, "t5", "L5", now=T0 + 2)
    assert lease.gpus == ("G1",) and lease.token == FencingToken(1, 2)


def test_a_lease_neither_persisted_nor_reported_is_unknown() -> None:
    table = restarted(next_seq=5)
    table, _, _ = full(table, "w1")
    with pytest.raises(LeaseNotFound) as info:
        table.renew("L9", "w1", now_mono=T0 + 2, now_wall_ms=W, before_start=True)
    assert info.value.details["reasons"] == ["lease_unknown"]
    # A silent holder is told to report first (not definitive) until its window ends.
    with pytest.raises(ReportNeeded) as needed:
        table.renew("L9", "w2", now_mono=T0 + 2, now_wall_ms=W)
    assert needed.value.http_status == 503
    with pytest.raises(LeaseNotFound):
        table.renew("L9", "w2", now_mono=T0 + 35, now_wall_ms=W)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(task_id="t2"), "lease_mismatch"),  # L1 is t1's
        (dict(lease_id="L7", task_id="t2", token=FencingToken(1, 1)), "lease_mismatch"),
        (dict(lease_id="L7", attempt=2, token=FencingToken(1, 1)), "lease_mismatch"),
        (dict(lease_id="L7", attempt=0 + 3, token=FencingToken(1, 9)), "task_key_taken"),
        (dict(lease_id="L7", task_id="t7", token=FencingToken(1, 9)), "gpu_taken"),
        (dict(lease_id="L7", task_id="t7", token=FencingToken(2, 1)), "token_from_later_term"),
        (dict(lease_id="L7", task_id="t1", token=FencingToken(0, 5), attempt=9), "superseded"),
        (
            dict(lease_id="L7", submitter="other", attempt=3, token=FencingToken(1, 9)),
            "not_task_owner",
        ),
        (
            dict(lease_id="L7", task_id="t7", submitter="w1", token=FencingToken(1, 9)),
            "lease_mismatch",
        ),
    ],
)
def test_a_reported_lease_that_conflicts_is_refused(change: dict[str, object], reason: str) -> None:
    _, l1, _ = before_restart()
    table = restarted(l1, next_seq=3)
    table, _, _ = full(table, "w1")
    reported = replace(as_reported(l1), **change)  # type: ignore[arg-type]
    after, refused, records = full(table, "w1", reported, seq=2)
    assert refused == RefusedLease(reported.lease_id, reason) and records == ()
    assert after.leases == table.leases and after.invariant_violation() is None


def test_claims_count_their_gpus_busy_and_follow_the_reports() -> None:
    table = restarted(next_seq=1)
    c1 = Claim("C1", "w1", "t8", 1, FencingToken(0, 0), ("G0",), W)
    table, _, _ = full(table, "w1", claims=(c1,))
    assert table.busy_gpus() == {("w1", "G0")} and table.claims_of("w1") == (c1,)
    table, lease = grant(table, "t1", "L1", now=T0 + 2)
    assert lease.gpus == ("G1",)
    assert reasons_of(table, req("t2"), T0 + 2) == ("no_free_gpu",)
    # A numbered change ends the claim: the GPU is free again.
    message = ReportChanges(
        "w1", table.incarnation, 1, 1, (ReportChange(2, dropped_claims=("C1",)),)
    )
    table, result = table.receive(message, now_mono=T0 + 3, now_wall_ms=W)
    assert result.answer.acked_seq == 2 and table.claims_of("w1") == ()
    grant(table, "t2", "L2", now=T0 + 3)
    # A report that claims one GPU twice is refused whole.
    twice = replace(c1, claim_id="C2")
    with pytest.raises(BadRequest):
        full(table, "w1", claims=(c1, twice), seq=3)


def test_a_report_for_another_incarnation_a_gap_and_a_duplicate() -> None:
    _, l1, _ = before_restart()
    table = restarted(l1, next_seq=3)
    old = FullReport(
        "w1", replace(table.incarnation, incarnation_id="before"), 1, 1, NodeHoldings()
    )
    same, result = table.receive(old, now_mono=T0, now_wall_ms=W)
    assert result.answer.status == "wrong_incarnation" and not same.reported("w1")
    gap = ReportChanges("w1", table.incarnation, 1, 1, (ReportChange(2),))
    same, result = table.receive(gap, now_mono=T0, now_wall_ms=W)
    assert result.answer.status == "full_report_needed" and not same.reported("w1")
    table, _, _ = full(table, "w1", as_reported(l1, "completed"))
    again, result = table.receive(
        FullReport("w1", table.incarnation, 1, 1, NodeHoldings((as_reported(l1, "completed"),))),
        now_mono=T0 + 2,
        now_wall_ms=W,
    )
    assert result.answer.status == "duplicate" and result.records == () and again is table


def test_marks_and_claims_belong_to_one_incarnation() -> None:
    table = restarted(next_seq=1)
    c1 = Claim("C1", "w1", "t8", 1, FencingToken(0, 0), ("G0",), W)
    table, _, _ = full(table, "w1", claims=(c1,))
    table = table.set_term(2, now_mono=T0 + 5, incarnation_id="t2")
    assert not table.reported("w1") and table.claims == {}
    assert table.incarnation.term == 2
