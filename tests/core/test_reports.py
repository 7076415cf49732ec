"""Full reports and their numbering (populi_peer/core/reports.py): the wire types, the
control plane's verdict on each message, and the node's reporter."""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import LEASE_KINDS, ReleaseOutcome
from populi_peer.core.reports import (
    ENDED_PHASES,
    REPORTED_KINDS,
    Claim,
    FullReport,
    Incarnation,
    NodeHoldings,
    NodeReporter,
    RefusedLease,
    ReportAnswer,
    ReportChange,
    ReportChanges,
    ReportedLease,
    ReportMark,
    diff_holdings,
    grant_terms,
    grant_terms_of,
    judge,
    report_from_json,
)
from populi_peer.errors import BadRequest
from support.reports import as_reported, sample_lease

I1 = Incarnation(1, "a1")
I2 = Incarnation(1, "b2")


def lease(lease_id: str = "L1", phase: str = "started", **changes: object) -> ReportedLease:
    base = sample_lease(
        lease_id=lease_id,
        task_id="t1",
        submitter="sub",
        gpus=("G0",),
        token=FencingToken(1, 3),
        ttl_s=10.0,
    )
    return replace(as_reported(base), phase=phase, **changes)  # type: ignore[arg-type]


def claim(claim_id: str = "C1", node: str = "w1", gpus: tuple[str, ...] = ("G1",)) -> Claim:
    return Claim(claim_id, node, "t9", 1, FencingToken(0, 0), gpus, 1_700_000_000_000)


def test_the_kinds_and_ends_are_the_lease_tables() -> None:
    assert REPORTED_KINDS == LEASE_KINDS
    assert frozenset(get_args(ReleaseOutcome)) == ENDED_PHASES


def test_a_lease_and_its_report_carry_the_same_grant_terms() -> None:
    record = sample_lease(ttl_s=12.5, token=FencingToken(2, 7))
    reported = as_reported(record)
    terms = grant_terms_of(record)
    # The same keys and values as the lease's JSON gives (the parser both records use).
    assert grant_terms_of(reported) == terms == grant_terms(record.to_json(), "lease")


def test_messages_round_trip_through_json() -> None:
    holdings = NodeHoldings((lease("L2", "accepted"), lease()), (claim(),))
    full = FullReport("w1", I1, 3, 7, holdings)
    assert report_from_json(full.to_json()) == full
    assert [x.lease_id for x in full.holdings.leases] == ["L1", "L2"]  # sorted, one order
    changes = ReportChanges(
        "w1",
        I1,
        3,
        7,
        (
            ReportChange(8, leases=(lease(phase="completed"),), dropped_claims=("C1",)),
            ReportChange(9, dropped_leases=("L2",), claims=(claim("C2"),)),
        ),
    )
    assert report_from_json(changes.to_json()) == changes
    assert changes.last_seq == 9
    answer = ReportAnswer(I1, "applied", 3, 9, (RefusedLease("L2", "task_key_taken"),))
    assert ReportAnswer.from_json(answer.to_json()) == answer
    assert Incarnation.from_json(I1.to_json()) == I1 and str(I1) == "1/a1"


def test_a_name_outside_its_list_is_refused_naming_the_field() -> None:
    with pytest.raises(
        BadRequest, match=r"^report answer: status 'lost' is not one of applied, "
    ) as refused:
        ReportAnswer.from_json({**ReportAnswer(I1, "applied").to_json(), "status": "lost"})
    assert (refused.value.code, refused.value.details) == ("bad_report", {"field": "status"})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: {**b, "type": "delta"},
        lambda b: {**b, "incarnation": {"term": 1, "id": "../x"}},
        lambda b: {**b, "epoch": -1},
        lambda b: {**b, "leases": [{**b["leases"][0], "phase": "running"}]},
        lambda b: {**b, "leases": [{**b["leases"][0], "token": "01.2"}]},
        lambda b: {**b, "leases": [{**b["leases"][0], "kind": "fence"}]},
        lambda b: {**b, "leases": [b["leases"][0], b["leases"][0]]},
        lambda b: {**b, "claims": [{**b["claims"][0], "node": "w2"}]},
        lambda b: {**b, "claims": [{**b["claims"][0], "gpus": []}]},
        lambda b: {**b, "leases": "L1"},
    ],
)
def test_a_malformed_report_is_refused_once_at_parse(mutate: object) -> None:
    body = FullReport("w1", I1, 1, 1, NodeHoldings((lease(),), (claim(),))).to_json()
    with pytest.raises(BadRequest):
        report_from_json(mutate(body))  # type: ignore[operator]


def test_changes_must_be_numbered_consecutively_above_their_base() -> None:
    with pytest.raises(BadRequest):
        ReportChanges("w1", I1, 1, 5, (ReportChange(5),))
    with pytest.raises(BadRequest):
        ReportChanges("w1", I1, 1, 5, (ReportChange(6), ReportChange(8)))
    with pytest.raises(BadRequest):
        ReportChange(6, leases=(lease(),), dropped_leases=("L1",))


# -- the control plane's verdict ------------------------------------------------------------


def full(epoch: int = 1, seq: int = 1, incarnation: Incarnation = I1) -> FullReport:
    return FullReport("w1", incarnation, epoch, seq, NodeHoldings())


def changes(epoch: int, base: int, *seqs: int) -> ReportChanges:
    return ReportChanges("w1", I1, epoch, base, tuple(ReportChange(s) for s in seqs))


@pytest.mark.parametrize(
    ("mark", "message", "verdict", "after"),
    [
        (None, full(), "apply_full", ReportMark(1, 1, 1)),
        (None, changes(1, 1, 2), "gap", None),  # the full report was lost
        (ReportMark(1, 1, 3), full(1, 1), "duplicate", ReportMark(1, 1, 3)),
        (ReportMark(1, 4, 6), full(1, 2), "stale", ReportMark(1, 4, 6)),
        (ReportMark(1, 4, 4), full(1, 4), "duplicate", ReportMark(1, 4, 4)),
        (ReportMark(1, 4, 6), full(1, 7), "apply_full", ReportMark(1, 7, 7)),
        (ReportMark(2, 1, 1), full(1, 9), "stale", ReportMark(2, 1, 1)),
        (ReportMark(1, 1, 9), full(2, 1), "apply_full", ReportMark(2, 1, 1)),  # node restarted
        (ReportMark(1, 1, 3), changes(1, 1, 2, 3, 4, 5), "apply_changes", ReportMark(1, 1, 5)),
        (ReportMark(1, 1, 3), changes(1, 1, 2, 3), "duplicate", ReportMark(1, 1, 3)),
        (ReportMark(1, 1, 3), changes(1, 1), "duplicate", ReportMark(1, 1, 3)),
        (ReportMark(1, 1, 3), changes(1, 1, 5, 6), "gap", ReportMark(1, 1, 3)),
        (ReportMark(1, 5, 5), changes(1, 1, 2), "stale", ReportMark(1, 5, 5)),
        (ReportMark(1, 1, 3), changes(1, 5, 6), "gap", ReportMark(1, 1, 3)),
        (ReportMark(1, 1, 3), changes(2, 5, 6), "gap", ReportMark(1, 1, 3)),
        (ReportMark(2, 1, 3), changes(1, 1, 2), "stale", ReportMark(2, 1, 3)),
        (ReportMark(1, 1, 1), full(1, 2, I2), "wrong_incarnation", ReportMark(1, 1, 1)),
    ],
)
def test_judge(
    mark: ReportMark | None, message: FullReport | ReportChanges, verdict: str, after: object
) -> None:
    judgement = judge(mark, message, I1)
    assert (judgement.verdict, judgement.mark) == (verdict, after)
    if verdict == "apply_changes":
        assert [c.seq for c in judgement.changes] == [4, 5]


# -- the node's side ------------------------------------------------------------------------


def ack(reporter: NodeReporter, seq: int, incarnation: Incarnation = I1) -> ReportAnswer:
    return ReportAnswer(incarnation, "applied", reporter.epoch, seq)


def test_a_node_reports_in_full_then_numbered_changes_until_acknowledged() -> None:
    reporter = NodeReporter("w1", epoch=4)
    assert reporter.outgoing(NodeHoldings()) == (reporter, None)  # nobody answered yet
    reporter, accepted = reporter.observe(I1)
    assert accepted
    holdings = NodeHoldings((lease(),))
    reporter, message = reporter.outgoing(holdings)
    assert message == FullReport("w1", I1, 4, 1, holdings)
    # Nothing changed: the heartbeat still names the full report it builds on.
    reporter, message = reporter.outgoing(holdings)
    assert message == ReportChanges("w1", I1, 4, 1, ())
    reporter, effect = reporter.answer(ack(reporter, 1))
    assert reporter.reported and effect.ended_acknowledged == ()
    # The attempt ended; its release answer was lost: the change rides every heartbeat.
    ended = NodeHoldings((lease(phase="completed"),), (claim(),))
    reporter, message = reporter.outgoing(ended)
    assert isinstance(message, ReportChanges) and [c.seq for c in message.changes] == [2]
    reporter, message = reporter.outgoing(ended)
    assert isinstance(message, ReportChanges) and [c.seq for c in message.changes] == [2]
    reporter, effect = reporter.answer(ack(reporter, 2))
    assert effect.ended_acknowledged == ("L1",) and effect.claims_acknowledged == ("C1",)
    reporter, message = reporter.outgoing(NodeHoldings((), (claim(),)))
    assert isinstance(message, ReportChanges)
    assert message.changes == (ReportChange(3, dropped_leases=("L1",)),)


def test_a_lost_full_report_is_asked_for_again() -> None:
    reporter, _ = NodeReporter("w1", epoch=1).observe(I1)
    reporter, lost = reporter.outgoing(NodeHoldings((lease(),)))
    assert isinstance(lost, FullReport)
    reporter, message = reporter.outgoing(NodeHoldings((lease(),), (claim(),)))
    assert isinstance(message, ReportChanges)
    verdict = judge(None, message, I1)
    assert verdict.status == "full_report_needed"
    reporter, effect = reporter.answer(ReportAnswer(I1, verdict.status))
    assert effect.full_report_next
    reporter, again = reporter.outgoing(NodeHoldings((lease(),), (claim(),)))
    assert isinstance(again, FullReport) and again.seq > message.last_seq
    assert again.holdings.claims == (claim(),)


def test_a_new_incarnation_gets_a_full_report_and_a_lower_term_is_ignored() -> None:
    reporter, _ = NodeReporter("w1", epoch=1).observe(Incarnation(3, "x"))
    reporter, _ = reporter.outgoing(NodeHoldings())
    reporter, _ = reporter.answer(ReportAnswer(Incarnation(3, "x"), "applied", 1, 1))
    assert reporter.reported
    same, accepted = reporter.observe(Incarnation(2, "old"))
    assert not accepted and same is reporter  # a deposed control plane
    reporter, accepted = reporter.observe(Incarnation(3, "restarted"))
    assert accepted and not reporter.reported
    reporter, message = reporter.outgoing(NodeHoldings())
    assert isinstance(message, FullReport) and message.incarnation == Incarnation(3, "restarted")
    # An answer from the incarnation before is ignored.
    after, _ = reporter.answer(ReportAnswer(Incarnation(3, "x"), "applied", 1, 9))
    assert after is reporter and not after.reported


def test_an_acknowledgement_of_another_epoch_or_an_unsent_seq_is_ignored() -> None:
    reporter, _ = NodeReporter("w1", epoch=2).observe(I1)
    reporter, _ = reporter.outgoing(NodeHoldings())
    for answer in (
        ReportAnswer(I1, "applied", 1, 1),
        ReportAnswer(I1, "applied", 2, 5),
        ReportAnswer(I1, "duplicate", 2, 0),
    ):
        after, _ = reporter.answer(answer)
        assert not after.reported


@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from(["L1", "L2", "L3"])),
            st.sets(st.sampled_from(["C1", "C2"])),
            st.sampled_from(["started", "completed"]),
        ),
        max_size=6,
    ),
    st.data(),
)
def test_the_control_plane_ends_up_with_what_the_node_holds(
    steps: list[tuple[set[str], set[str], str]], data: st.DataObject
) -> None:
    """Whatever is lost on the way (reports, answers), once messages and answers get
    through again, the control plane's copy is exactly what the node holds."""
    reporter, _ = NodeReporter("w1", epoch=1).observe(I1)
    mark: ReportMark | None = None
    copy = NodeHoldings()
    holdings = NodeHoldings()

    def exchange(*, lossy: bool) -> None:
        nonlocal reporter, mark, copy
        reporter, message = reporter.outgoing(holdings)
        assert message is not None
        if lossy and data.draw(st.booleans()):
            return  # the report is lost
        judgement = judge(mark, message, I1)
        if judgement.verdict == "apply_full":
            assert isinstance(message, FullReport)
            copy = message.holdings
        for change in judgement.changes:
            copy = change.apply_to(copy)
        mark = judgement.mark
        answer = ReportAnswer(
            I1, judgement.status, mark.epoch if mark else 0, mark.last_seq if mark else 0
        )
        if lossy and data.draw(st.booleans()):
            return  # the answer is lost
        reporter, _ = reporter.answer(answer)

    for lease_ids, claim_ids, phase in steps:
        holdings = NodeHoldings(
            tuple(lease(x, phase, gpus=(x,)) for x in sorted(lease_ids)),
            tuple(claim(x, gpus=(x,)) for x in sorted(claim_ids)),
        )
        for _ in range(data.draw(st.integers(0, 2))):
            exchange(lossy=True)
    for _ in range(3):  # the network heals
        exchange(lossy=False)
    assert copy == holdings
    assert reporter.acked == holdings and reporter.unacked == ()


def test_diff_names_what_changed() -> None:
    before = NodeHoldings((lease("L1"), lease("L2", gpus=("G2",))), (claim("C1"),))
    after = NodeHoldings((lease("L1", "completed"), lease("L3", gpus=("G3",))), (claim("C2"),))
    change = diff_holdings(before, after, seq=4)
    assert [x.lease_id for x in change.leases] == ["L1", "L3"]
    assert change.dropped_leases == ("L2",) and change.dropped_claims == ("C1",)
    assert change.apply_to(before) == after
    assert diff_holdings(after, after, seq=5).empty
