"""Records that survive the leader (populi_peer/core/replication.py): digests, the record
set's merge, and the leader's write checks."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from populi_peer.core.hlc import Hlc
from populi_peer.core.registers import RegisterWrite, Stamp
from populi_peer.core.replication import (
    EMPTY_DIGEST,
    ClusterRecord,
    Digest,
    Entry,
    PendingWrite,
    RecordRefused,
    RecordSet,
    SetElement,
    VoterSet,
    WriteId,
    bootstrap_voters,
    check_proposal,
    entries_from_json,
    entries_to_json,
    is_majority,
    majority,
    voters_body,
)
from populi_peer.errors import BadRequest


def label(node: str, n: int, term: int, wall: int, writer: str = "a") -> RegisterWrite:
    return RegisterWrite(
        node_id=node,
        attribute="labels",
        value={"n": n},
        stamp=Stamp(term, Hlc(wall, 0), writer),
        writer_class="operator",
        actor="op",
        reason="",
        at_wall_ms=wall,
    )


def token(key: str, consumer: str, term: int, wall: int = 1000) -> SetElement:
    return SetElement(
        "consumed_tokens", key, {"consumer": consumer}, Stamp(term, Hlc(wall, 0), "a")
    )


def settings_record(serial: int, term: int, n: int = 0) -> ClusterRecord:
    return ClusterRecord("settings", serial, term, {"n": n}, f"settings/{serial}/{term}/{n}")


def records_of(*entries: Entry) -> RecordSet:
    records, _ = RecordSet().merge(entries)
    return records


# -- digests ------------------------------------------------------------------------------


def test_digest_holds_ranges_per_term() -> None:
    digest = Digest([WriteId(1, s) for s in (1, 2, 3, 5)] + [WriteId(2, 1)])
    assert WriteId(1, 2) in digest
    assert WriteId(1, 4) not in digest
    assert WriteId(3, 1) not in digest
    assert len(digest) == 5
    assert repr(digest) == "Digest(1:1-3,5 2:1)"
    assert digest.add([WriteId(1, 4)]) == Digest(
        [WriteId(1, s) for s in range(1, 6)] + [WriteId(2, 1)]
    )


def test_digest_covers_and_union() -> None:
    small = Digest([WriteId(1, 1), WriteId(1, 2)])
    big = small.add([WriteId(1, 3), WriteId(2, 7)])
    assert big.covers(small)
    assert not small.covers(big)
    assert small.union(big) == big == big.union(small)
    assert EMPTY_DIGEST.covers(EMPTY_DIGEST)
    assert big.covers(EMPTY_DIGEST)


def test_digest_json_round_trip_and_refusals() -> None:
    digest = Digest([WriteId(1, 1), WriteId(1, 2), WriteId(4, 9)])
    assert Digest.from_json(digest.to_json()) == digest
    for bad in ({"terms": [[1, [[3, 2]]]]}, {"terms": [[-1, [[1, 1]]]]}, {"terms": "x"}, []):
        with pytest.raises(BadRequest):
            Digest.from_json(bad)


ids = st.builds(WriteId, st.integers(0, 4), st.integers(0, 12))


@given(st.lists(ids), st.lists(ids), st.lists(ids))
def test_digest_behaves_like_a_set_of_ids(
    a: list[WriteId], b: list[WriteId], c: list[WriteId]
) -> None:
    da, db = Digest(a), Digest(b)
    union = da.union(db)
    assert {w for w in a + b + c if w in union} == set(a) | set(b)
    assert union == db.union(da)
    assert union.covers(da) and union.covers(db)
    assert Digest(c).covers(da) == set(a).issubset(set(c))
    assert len(union) == len(set(a) | set(b))


# -- the record set -----------------------------------------------------------------------


def test_register_last_writer_by_term_first() -> None:
    old = Entry(WriteId(1, 1), label("n1", 1, term=1, wall=9000))
    new = Entry(WriteId(2, 1), label("n1", 2, term=2, wall=1000))
    for order in ((old, new), (new, old)):
        records = records_of(*order)
        assert records.registers.value("n1", "labels") == {"n": 2}
        assert records.entries() == (new,)
        assert WriteId(1, 1) in records.digest  # seen, though beaten
        assert records.covers(old) and records.covers(new)


def test_set_element_is_never_removed_and_newest_stamp_wins() -> None:
    first = Entry(WriteId(1, 1), token("t1", "x", term=1))
    second = Entry(WriteId(3, 2), token("t1", "y", term=3))
    records = records_of(second, first)
    element = records.set_element("consumed_tokens", "t1")
    assert element is not None and element.value == {"consumer": "y"}
    assert records.members("consumed_tokens") == ("t1",)
    assert records.covers(first)


def test_cluster_record_order_is_term_before_serial() -> None:
    # A record an old leader left half-written with a high serial loses to the record a
    # later (merged) leader wrote, whatever the serials.
    stale = Entry(WriteId(1, 9), settings_record(serial=7, term=1, n=1))
    later = Entry(WriteId(2, 1), settings_record(serial=3, term=2, n=2))
    for order in itertools.permutations((stale, later)):
        records = records_of(*order)
        assert records.cluster_record("settings") == later.item
    assert records.next_serial("settings") == 4


def test_merge_reports_what_won_and_is_a_no_op_twice() -> None:
    a = Entry(WriteId(1, 1), label("n1", 1, 1, 1000))
    b = Entry(WriteId(1, 2), token("t", "x", 1))
    records, won = RecordSet().merge([a, b])
    assert set(e.write_id for e in won) == {a.write_id, b.write_id}
    again, won_again = records.merge([a, b])
    assert again is records and won_again == ()


def test_missing_for_sends_only_unseen_winners() -> None:
    a = Entry(WriteId(1, 1), label("n1", 1, 1, 1000))
    b = Entry(WriteId(1, 2), label("n1", 2, 1, 2000))  # beats a
    c = Entry(WriteId(1, 3), token("t", "x", 1))
    leader = records_of(a, b, c)
    follower = records_of(a)
    missing = leader.missing_for(follower.digest)
    assert [e.write_id for e in missing] == [b.write_id, c.write_id]
    caught_up, _ = follower.merge(missing)
    assert caught_up.missing_for(caught_up.digest) == ()
    assert leader.missing_for(caught_up.digest) == ()
    assert caught_up.entries() == leader.entries()


def test_restore_and_json_round_trip() -> None:
    records = records_of(
        bootstrap_voters(["a", "b", "c"], "signed"),
        Entry(WriteId(1, 1), label("n1", 1, 1, 1000)),
        Entry(WriteId(1, 2), token("t", "x", 1)),
        Entry(WriteId(2, 1), settings_record(1, 2)),
    )
    again = RecordSet.from_json(records.to_json())
    assert again == records
    assert again.digest == records.digest
    assert entries_from_json(entries_to_json(records.entries())) == records.entries()
    with pytest.raises(BadRequest, match="does not cover"):
        RecordSet.restore(records.entries(), EMPTY_DIGEST)


def _entry_strategy() -> st.SearchStrategy[Entry]:
    reg = st.builds(
        label,
        st.sampled_from(["n1", "n2"]),
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(1000, 1003),
        st.sampled_from(["a", "b"]),
    )
    tok = st.builds(
        token,
        st.sampled_from(["t1", "t2"]),
        st.sampled_from(["x", "y"]),
        st.integers(0, 3),
    )
    rec = st.builds(settings_record, st.integers(1, 3), st.integers(0, 3), st.integers(0, 2))
    return st.builds(Entry, ids, st.one_of(reg, tok, rec))


def _unique_ids(entries: list[Entry]) -> list[Entry]:
    # One write id names one write: the leader of a term never reuses a sequence number.
    seen: dict[WriteId, Entry] = {}
    for entry in entries:
        seen.setdefault(entry.write_id, entry)
    return list(seen.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(_entry_strategy(), max_size=12), st.randoms(use_true_random=False))
def test_merge_is_order_and_grouping_free(entries: list[Entry], rnd: object) -> None:
    entries = _unique_ids(entries)
    whole = records_of(*entries)
    shuffled = list(entries)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one_by_one = RecordSet()
    for entry in shuffled + shuffled[:3]:  # duplicates too
        one_by_one, _ = one_by_one.merge([entry])
    assert one_by_one.entries() == whole.entries()
    assert one_by_one.digest == whole.digest
    # Any split into two replicas, each merged into the other, agrees as well.
    half = len(shuffled) // 2
    left, right = records_of(*shuffled[:half]), records_of(*shuffled[half:])
    joined, _ = left.merge(right.missing_for(left.digest))
    assert joined.entries() == whole.entries()
    for entry in entries:
        assert whole.covers(entry)


# -- voter sets and quorums ---------------------------------------------------------------


def test_majorities() -> None:
    assert [majority(n) for n in range(1, 6)] == [1, 2, 2, 3, 3]
    assert is_majority({"a"}, frozenset({"a"}))
    assert not is_majority({"a"}, frozenset({"a", "b"}))
    assert is_majority({"a", "b"}, frozenset({"a", "b"}))
    assert is_majority({"a", "b", "z"}, frozenset({"a", "b", "c"}))
    assert not is_majority({"z"}, frozenset())


def test_voter_set_change_is_one_voter() -> None:
    ok = ClusterRecord("voters", 2, 1, voters_body("abcd", "abc"), "t")
    assert VoterSet.from_record(ok).members == frozenset("abcd")
    with pytest.raises(BadRequest, match="exactly one voter"):
        ClusterRecord("voters", 2, 1, voters_body("abde", "abc"), "t")
    with pytest.raises(BadRequest, match="at least one voter"):
        ClusterRecord("voters", 2, 1, voters_body([], "a"), "t")


def test_pending_write_needs_every_quorum() -> None:
    entry = Entry(WriteId(2, 1), token("t", "x", 2))
    pending = PendingWrite(
        "r1", entry, Digest([entry.write_id]), (frozenset("abcd"), frozenset("abc")), 10.0
    )
    holds = Digest([entry.write_id])
    assert not pending.is_applied("a", {"d": holds})  # a, d: half of abcd, 1 of abc
    assert not pending.is_applied("a", {"b": holds})  # a, b: 2 of abc, but 2 of abcd
    assert pending.is_applied("a", {"b": holds, "d": holds})
    assert pending.holders("a", {"b": EMPTY_DIGEST}) == frozenset({"a"})


# -- the leader's checks ------------------------------------------------------------------


def test_check_proposal_single_use_token() -> None:
    records = records_of(Entry(WriteId(1, 1), token("t", "x", 1)))
    with pytest.raises(RecordRefused) as info:
        check_proposal(records, token("t", "y", 2), term=2, now_wall_ms=1000, max_skew_ms=0)
    assert info.value.code == "token_already_consumed"
    # The same consumer again (a retry) is accepted: the leader stores it under its term.
    check_proposal(records, token("t", "x", 2), term=2, now_wall_ms=1000, max_skew_ms=0)
    with pytest.raises(RecordRefused) as info:
        check_proposal(records, token("u", "x", 1), term=2, now_wall_ms=1000, max_skew_ms=0)
    assert info.value.code == "stale_stamp"


def test_check_proposal_serials_and_voter_changes() -> None:
    records = records_of(bootstrap_voters("abc", "v1"), Entry(WriteId(1, 1), settings_record(1, 1)))

    def refused(item: object) -> str:
        with pytest.raises(RecordRefused) as info:
            check_proposal(records, item, term=2, now_wall_ms=0, max_skew_ms=0)  # type: ignore[arg-type]
        return info.value.code

    assert refused(settings_record(1, 2)) == "stale_serial"
    assert refused(settings_record(2, 1)) == "stale_stamp"
    check_proposal(records, settings_record(2, 2), term=2, now_wall_ms=0, max_skew_ms=0)
    add_d = ClusterRecord("voters", 2, 2, voters_body("abcd", "abc"), "v2")
    check_proposal(records, add_d, term=2, now_wall_ms=0, max_skew_ms=0)
    wrong_previous = ClusterRecord("voters", 2, 2, voters_body("abd", "ab"), "v2")
    assert refused(wrong_previous) == "not_one_voter_change"
    unsettled, _ = records.merge([Entry(WriteId(2, 1), add_d)])
    with pytest.raises(RecordRefused) as info:
        check_proposal(
            unsettled,
            ClusterRecord("voters", 3, 2, voters_body("abcde", "abcd"), "v3"),
            term=2,
            now_wall_ms=0,
            max_skew_ms=0,
        )
    assert info.value.code == "voter_change_pending"


def test_check_proposal_refuses_a_register_clock_from_the_future() -> None:
    with pytest.raises(RecordRefused) as info:
        check_proposal(
            RecordSet(), label("n1", 1, 1, wall=10_000), term=1, now_wall_ms=1000, max_skew_ms=500
        )
    assert info.value.code == "clock_skew"
    with pytest.raises(RecordRefused) as info:
        check_proposal(
            RecordSet(), label("n1", 1, 3, 1000), term=2, now_wall_ms=1000, max_skew_ms=0
        )
    assert info.value.code == "stale_stamp"


@pytest.mark.parametrize(
    ("parse", "body", "message"),
    [
        (
            SetElement.from_json,
            {"set_name": "tokens", "key": "t1", "value": {}, "stamp": {}},
            "set element: unknown set 'tokens'",
        ),
        (
            ClusterRecord.from_json,
            {"kind": "policy", "serial": 1, "term": 1, "body": {}, "text": ""},
            "cluster record: unknown kind 'policy'",
        ),
    ],
)
def test_an_unknown_set_or_kind_on_the_wire_is_a_bad_record(
    parse: Callable[[object], object], body: dict[str, object], message: str
) -> None:
    with pytest.raises(BadRequest, match=f"^{message}$") as caught:
        parse(body)
    assert caught.value.code == "bad_record"
