"""The election machine (populi_peer/core/election.py), one rule at a time.

Settings: election timeout 1..2 s, heartbeat 0.1 s, lease 0.5 s, no drift (so the times
below are exact); ``Rng`` always picks the low end unless a test says otherwise."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from populi_peer.core.election import (
    ROLE_TRANSITIONS,
    ROLES,
    Action,
    ClientWrite,
    ElectionMachine,
    ElectionSettings,
    Event,
    Heartbeat,
    HeartbeatAck,
    IllegalElectionEvent,
    PersistedVote,
    PersistRecords,
    PersistVote,
    PreVoteAnswer,
    PreVoteRequest,
    RoleChanged,
    Send,
    SettingsChanged,
    Started,
    TimerFired,
    VoteAnswer,
    VoteRequest,
    WriteApplied,
    WriteOutcomeUnknown,
    WriteRefused,
    check_election_settings,
    check_election_settings_change,
    message_from_json,
    message_to_json,
)
from populi_peer.core.hlc import Hlc
from populi_peer.core.registers import Stamp
from populi_peer.core.replication import (
    ClusterRecord,
    Digest,
    Entry,
    RecordSet,
    SetElement,
    WriteId,
    bootstrap_voters,
    voters_body,
)
from populi_peer.errors import BadRequest, ConfigError

SETTINGS = ElectionSettings(
    election_timeout_min_s=1.0,
    election_timeout_max_s=2.0,
    heartbeat_interval_s=0.1,
    leader_lease_s=0.5,
    lease_margin_s=0.05,
    max_clock_drift_ppm=0,
    write_timeout_s=1.0,
    max_skew_ms=1000,
)


class LowRng:
    """Always the shortest timeout."""

    def uniform(self, a: float, b: float) -> float:
        return a


RNG = LowRng()


def boot_records(voters: str) -> RecordSet:
    records, _ = RecordSet().merge([bootstrap_voters(voters, "voters/1")])
    return records


def started(node: str, voters: str = "abc", now: float = 0.0, **kw: object) -> ElectionMachine:
    machine = ElectionMachine(node, SETTINGS)
    machine, _ = machine.handle(
        Started(PersistedVote(**kw), boot_records(voters)),  # type: ignore[arg-type]
        now,
        RNG,
    )
    return machine


def sends(actions: tuple[Action, ...], kind: type | None = None) -> list[Send]:
    return [
        a for a in actions if isinstance(a, Send) and (kind is None or isinstance(a.message, kind))
    ]


def roles(actions: tuple[Action, ...]) -> list[str]:
    return [a.role for a in actions if isinstance(a, RoleChanged)]


def token(key: str, consumer: str, term: int) -> SetElement:
    return SetElement(
        "consumed_tokens", key, {"consumer": consumer}, Stamp(term, Hlc(1000, 0), "a")
    )


class Net:
    """Machines by id and a helper to deliver what one sent to the others at once."""

    def __init__(self, machines: dict[str, ElectionMachine]) -> None:
        self.m = machines

    def step(self, node: str, event: Event, now: float) -> tuple[Action, ...]:
        self.m[node], actions = self.m[node].handle(event, now, RNG)
        return actions

    def deliver(
        self, actions: tuple[Action, ...], now: float, only: set[str] | None = None
    ) -> list[Action]:
        """Deliver every send (and the answers, recursively) at ``now``; ``only``: the
        first hop reaches only these."""
        out: list[Action] = []
        queue = [s for s in sends(actions) if only is None or s.to in only]
        while queue:
            send = queue.pop(0)
            got = self.step(send.to, send.message, now)
            out += got
            queue += sends(got)
        return out


def elect_a(voters: str = "abc") -> Net:
    """``a`` times out first at t=1.0 and wins term 1."""
    net = Net({v: started(v, voters) for v in voters})
    actions = net.step("a", TimerFired(), 1.0)
    net.deliver(actions, 1.0)
    assert net.m["a"].role == "leader"
    return net


# -- one voter, two voters ----------------------------------------------------------------


def test_a_lone_voter_elects_itself_at_once() -> None:
    machine = ElectionMachine("a", SETTINGS)
    machine, actions = machine.handle(Started(PersistedVote(), boot_records("a")), 5.0, RNG)
    assert machine.role == "leader" and machine.term == 1 and machine.leader == "a"
    assert actions[0] == PersistVote(1, "a")
    assert roles(actions) == ["follower", "precandidate", "candidate", "leader"]
    assert machine.can_act(1e9) and machine.lease_expiry == math.inf
    # ... and it stays leader through a restart, at the next term.
    again = ElectionMachine("a", SETTINGS)
    again, _ = again.handle(Started(PersistedVote(1, "a"), machine.records), 9.0, RNG)
    assert again.role == "leader" and again.term == 2


def test_two_voters_need_both() -> None:
    net = Net({v: started(v, "ab") for v in "ab"})
    actions = net.step("a", TimerFired(), 1.0)
    assert net.m["a"].role == "precandidate"  # its own pre-vote is not a majority of two
    assert [s.to for s in sends(actions, PreVoteRequest)] == ["b"]
    net.deliver(actions, 1.0)
    assert net.m["a"].role == "leader" and net.m["b"].leader == "a"
    # Without b, a never wins: it asks and asks.
    lonely = Net({"a": started("a", "ab")})
    actions = lonely.step("a", TimerFired(), 1.0)
    for t in (2.0, 3.0, 4.0):
        actions = lonely.step("a", TimerFired(), t)
        assert lonely.m["a"].role == "precandidate" and lonely.m["a"].term == 0


# -- pre-vote and stickiness --------------------------------------------------------------


def test_prevote_does_not_bump_the_term() -> None:
    machine = started("a")
    assert machine.next_deadline() == 1.0
    machine, actions = machine.handle(TimerFired(), 1.0, RNG)
    assert machine.role == "precandidate" and machine.term == 0
    assert not any(isinstance(a, PersistVote) for a in actions)
    assert {s.to for s in sends(actions)} == {"b", "c"}
    assert all(s.message == PreVoteRequest("a", 1) for s in sends(actions))
    # A refusal leaves it a pre-candidate at term 0; the next timeout asks again.
    machine, _ = machine.handle(PreVoteAnswer("b", 1, False, 0), 1.1, RNG)
    assert machine.role == "precandidate" and machine.term == 0


def test_prevote_refused_by_a_higher_term_catches_up() -> None:
    machine = started("a")
    machine, _ = machine.handle(TimerFired(), 1.0, RNG)
    machine, actions = machine.handle(PreVoteAnswer("b", 1, False, 7), 1.1, RNG)
    assert machine.term == 7 and machine.role == "follower"
    assert actions[0] == PersistVote(7, None)


def test_a_voter_that_heard_a_leader_refuses_prevotes_and_votes() -> None:
    net = elect_a()
    assert net.m["b"].leader == "a"
    # c asks b at t=1.5, within b's hold (heard a at t=1.0, hold 1.0 s): refused, and b
    # does not even adopt the higher term.
    got = net.step("b", PreVoteRequest("c", 2), 1.5)
    assert sends(got)[0].message == PreVoteAnswer("b", 2, False, 1)
    got = net.step("b", VoteRequest("c", 5, Digest(), 1.0), 1.5)
    assert sends(got)[0].message == VoteAnswer("b", 1, False)
    assert net.m["b"].term == 1 and net.m["b"].voted_for == "a"
    # After the hold, the same pre-vote is granted.
    got = net.step("b", PreVoteRequest("c", 2), 2.01)
    assert sends(got)[0].message == PreVoteAnswer("b", 2, True, 1)


def test_the_leader_refuses_votes() -> None:
    net = elect_a()
    got = net.step("a", VoteRequest("b", 9, Digest(), 1.0), 1.2)
    assert sends(got)[0].message.granted is False  # type: ignore[union-attr]
    assert net.m["a"].role == "leader" and net.m["a"].term == 1


def test_a_restarted_voter_holds_its_vote_for_the_minimum_timeout() -> None:
    # It may have acknowledged a heartbeat just before it crashed.
    machine = started("b", now=100.0)
    machine, actions = machine.handle(VoteRequest("c", 1, Digest(), 1.0), 100.5, RNG)
    assert sends(actions)[0].message.granted is False  # type: ignore[union-attr]
    machine, actions = machine.handle(VoteRequest("c", 1, Digest(), 1.0), 101.0, RNG)
    assert sends(actions)[0].message.granted is True  # type: ignore[union-attr]


def test_a_voter_votes_once_per_term_and_persists_before_answering() -> None:
    machine = started("b")
    machine, actions = machine.handle(VoteRequest("a", 1, Digest(), 1.0), 2.0, RNG)
    assert actions[0] == PersistVote(1, "a")
    assert isinstance(actions[-1], Send) and actions[-1].message.granted  # type: ignore[union-attr]
    assert actions.index(PersistVote(1, "a")) < actions.index(actions[-1])
    machine, actions = machine.handle(VoteRequest("c", 1, Digest(), 1.0), 4.0, RNG)
    assert sends(actions)[0].message.granted is False  # type: ignore[union-attr]
    # The same candidate asking again (a lost answer) gets the vote again.
    machine, actions = machine.handle(VoteRequest("a", 1, Digest(), 1.0), 4.0, RNG)
    assert sends(actions)[0].message.granted is True  # type: ignore[union-attr]
    assert not any(isinstance(a, PersistVote) for a in actions)


def test_candidate_persists_its_term_and_vote_before_asking() -> None:
    machine = started("a")
    machine, _ = machine.handle(TimerFired(), 1.0, RNG)
    machine, actions = machine.handle(PreVoteAnswer("b", 1, True, 0), 1.1, RNG)
    assert machine.role == "candidate" and machine.term == 1
    assert actions[0] == PersistVote(1, "a")
    assert all(isinstance(a, (RoleChanged, Send)) for a in actions[1:])


def test_non_voters_are_ignored() -> None:
    machine = started("a")
    machine, _ = machine.handle(TimerFired(), 1.0, RNG)
    machine, _ = machine.handle(PreVoteAnswer("z", 1, True, 0), 1.1, RNG)
    assert machine.role == "precandidate"
    machine, actions = started("b").handle(VoteRequest("z", 1, Digest(), 1.0), 5.0, RNG)
    assert sends(actions)[0].message.granted is False  # type: ignore[union-attr]
    assert machine.term == 0


def test_a_node_outside_the_voter_set_never_campaigns() -> None:
    machine = started("z")
    assert machine.next_deadline() is not None
    machine, actions = machine.handle(TimerFired(), 5.0, RNG)
    assert machine.role == "follower" and sends(actions) == []
    assert machine.next_deadline() is None


# -- merge before acting ------------------------------------------------------------------


def test_the_candidate_merges_the_voters_records_before_it_leads() -> None:
    written = Entry(WriteId(3, 1), token("t1", "x", 3))
    net = Net({v: started(v, term=3) for v in "abc"})
    net.m["b"] = ElectionMachine("b", SETTINGS).handle(
        Started(PersistedVote(3), boot_records("abc").merge([written])[0]), 0.0, RNG
    )[0]
    actions = net.step("a", TimerFired(), 1.0)
    actions = net.step("a", sends(actions)[0].message and PreVoteAnswer("b", 4, True, 3), 1.0)
    request = sends(actions, VoteRequest)[0].message
    got = net.step("b", request, 1.0)
    answer = sends(got)[0].message
    assert isinstance(answer, VoteAnswer) and answer.entries == (written,)
    actions = net.step("a", answer, 1.0)
    assert net.m["a"].role == "leader"
    assert isinstance(actions[0], PersistRecords) and actions[0].entries == (written,)
    assert net.m["a"].records.covers(written)


# -- the leader lease (check-quorum) ------------------------------------------------------


def test_the_lease_counts_from_when_the_acknowledged_heartbeat_was_sent() -> None:
    net = elect_a()  # won at 1.0; votes count from the vote requests sent at 1.0
    a = net.m["a"]
    assert a.lease_expiry == pytest.approx(1.5)
    actions = net.step("a", TimerFired(), 1.1)  # heartbeat round sent at 1.1
    hb = next(s for s in sends(actions, Heartbeat) if s.to == "b").message
    got = net.step("b", hb, 1.2)
    ack = sends(got)[0].message
    net.step("a", ack, 1.45)  # the ack arrives late: it still counts from 1.1
    assert net.m["a"].lease_expiry == pytest.approx(1.6)
    assert net.m["a"].can_act(1.59) and not net.m["a"].can_act(1.6)


def test_a_leader_that_loses_its_majority_steps_down_at_once() -> None:
    net = elect_a()
    net.step("a", ClientWrite("w1", token("t1", "x", 1), 1000), 1.2)
    # Nobody answers: heartbeats go out until the lease (from the votes, 1.0 + 0.5) ends.
    actions: tuple[Action, ...] = ()
    while net.m["a"].role == "leader":
        deadline = net.m["a"].next_deadline()
        assert deadline is not None and deadline <= 1.5
        actions = net.step("a", TimerFired(), deadline)
    assert deadline == pytest.approx(1.5) and not net.m["a"].can_act(1.5)
    assert RoleChanged("follower", "leader", 1, None, "lease_lost") in actions
    assert WriteOutcomeUnknown("w1", WriteId(1, 1), "lease_lost") in actions
    # Any event past the lease finds it stepped down first.
    net2 = elect_a()
    got = net2.step("a", ClientWrite("w2", token("t2", "x", 1), 1000), 1.7)
    assert net2.m["a"].role == "follower"
    assert next(a for a in got if isinstance(a, WriteRefused)).code == "not_leader"


def test_votes_that_come_back_after_a_lease_would_have_ended_do_not_make_a_leader() -> None:
    machine = started("a")
    machine, _ = machine.handle(TimerFired(), 1.0, RNG)
    machine, _ = machine.handle(PreVoteAnswer("b", 1, True, 0), 1.0, RNG)
    machine, actions = machine.handle(VoteAnswer("b", 1, True, (), Digest()), 1.6, RNG)
    assert machine.role == "follower" and machine.term == 1
    assert roles(actions) == ["leader", "follower"]


# -- heartbeats and terms -----------------------------------------------------------------


def test_a_lower_term_heartbeat_is_refused_and_its_entries_not_stored() -> None:
    machine = started("b", term=5)
    entry = Entry(WriteId(4, 1), token("t1", "x", 4))
    machine, actions = machine.handle(Heartbeat("a", 4, 1, Digest(), (entry,), 1.0), 2.0, RNG)
    assert sends(actions)[0].message == HeartbeatAck("b", 5, 1, False, machine.records.digest)
    assert not machine.records.covers(entry)
    assert not any(isinstance(a, PersistRecords) for a in actions)


def test_a_higher_term_heartbeat_makes_a_follower_and_stores_before_acking() -> None:
    machine = started("b")
    entry = Entry(WriteId(2, 1), token("t1", "x", 2))
    machine, actions = machine.handle(Heartbeat("a", 2, 1, Digest(), (entry,), 1.0), 0.5, RNG)
    assert machine.term == 2 and machine.leader == "a"
    kinds = [type(a).__name__ for a in actions]
    assert kinds == ["PersistVote", "PersistRecords", "RoleChanged", "Send"]
    assert machine.records.covers(entry)


def test_a_leader_steps_down_on_a_higher_term() -> None:
    net = elect_a()
    actions = net.step("a", HeartbeatAck("b", 4, 1, False, Digest()), 1.2)
    assert net.m["a"].role == "follower" and net.m["a"].term == 4
    assert actions[0] == PersistVote(4, None)


# -- writes -------------------------------------------------------------------------------


def test_a_write_is_applied_once_a_majority_stored_it() -> None:
    net = elect_a()
    actions = net.step("a", ClientWrite("w1", token("t1", "x", 1), 1000), 1.2)
    assert isinstance(actions[0], PersistRecords)  # the leader stores it first
    assert not any(isinstance(a, WriteApplied) for a in actions)
    hb = next(s for s in sends(actions, Heartbeat) if s.to == "b").message
    got = net.deliver((Send("b", hb),), 1.21)
    assert WriteApplied("w1", WriteId(1, 1)) in got
    assert net.m["b"].records.covers(Entry(WriteId(1, 1), token("t1", "x", 1)))


def test_a_follower_refuses_writes_and_names_the_leader() -> None:
    net = elect_a()
    actions = net.step("b", ClientWrite("w1", token("t1", "x", 1), 1000), 1.2)
    assert actions == (WriteRefused("w1", "not_leader", "b is not the leader of term 1", "a", 1),)


def test_a_single_use_token_is_accepted_once() -> None:
    net = elect_a()
    net.deliver(net.step("a", ClientWrite("w1", token("t1", "x", 1), 1000), 1.2), 1.2)
    got = net.step("a", ClientWrite("w2", token("t1", "y", 1), 1000), 1.25)
    assert [a.code for a in got if isinstance(a, WriteRefused)] == ["token_already_consumed"]
    got = net.deliver(net.step("a", ClientWrite("w3", token("t1", "x", 1), 1000), 1.25), 1.25)
    assert WriteApplied("w3", WriteId(1, 2)) in got  # the same joiner's retry


def test_outcome_unknown_after_the_write_timeout() -> None:
    # A lone voter with a second, silent voter added later is simplest: build two voters
    # where b acknowledges heartbeats but never reports the write.
    net = elect_a("ab")
    net.step("a", ClientWrite("w1", token("t1", "x", 1), 1000), 1.05)
    actions: tuple[Action, ...] = ()
    t = 1.1
    while t < 2.2:
        actions = net.step("a", TimerFired(), t)
        rounds = [s.message.round for s in sends(actions, Heartbeat)]  # type: ignore[union-attr]
        for r in rounds:
            net.m["a"], more = net.m["a"].handle(
                HeartbeatAck("b", 1, r, True, boot_records("ab").digest), t, RNG
            )
            actions += more
        if any(isinstance(a, WriteOutcomeUnknown) for a in actions):
            break
        t = round(t + 0.05, 2)
    assert WriteOutcomeUnknown("w1", WriteId(1, 1), "write_timeout") in actions
    assert net.m["a"].role == "leader"


# -- the voter set ------------------------------------------------------------------------


def voters_change(machine: ElectionMachine, voters: str) -> ClusterRecord:
    current = machine.voter_set
    assert current is not None
    serial = machine.records.next_serial("voters")
    return ClusterRecord(
        "voters", serial, machine.term, voters_body(voters, current.voters), f"voters/{serial}"
    )


def test_voter_changes_go_one_at_a_time_and_need_both_majorities() -> None:
    net = elect_a("abc")
    # d joins with nothing: it learns the records from the leader.
    net.m["d"], _ = ElectionMachine("d", SETTINGS).handle(
        Started(PersistedVote(), RecordSet()), 0.0, RNG
    )
    change = voters_change(net.m["a"], "abcd")
    actions = net.step("a", ClientWrite("add-d", change, 1000), 1.1)
    pending = net.m["a"].pending_writes[0]
    assert pending.quorums == (frozenset("abcd"), frozenset("abc"))
    # A second change waits for the first.
    again = net.step("a", ClientWrite("add-e", voters_change(net.m["a"], "abcde"), 1000), 1.1)
    assert [a.code for a in again if isinstance(a, WriteRefused)] == ["voter_change_pending"]
    # b alone: a majority of abc, not of abcd.
    got = net.deliver(actions, 1.12, only={"b"})
    assert not any(isinstance(a, WriteApplied) for a in got)
    got = net.deliver(actions, 1.13, only={"d"})
    assert WriteApplied("add-d", WriteId(1, 1)) in got
    # The change is settled by the leader in the same term before the next one starts.
    record = net.m["a"].records.cluster_record("voters")
    assert record is not None and record.settled and record.term == 1
    assert net.m["d"].records.covers(Entry(WriteId(1, 1), change))


def test_a_leader_that_removes_itself_steps_down_once_stored() -> None:
    net = elect_a("abc")
    change = voters_change(net.m["a"], "bc")
    actions = net.step("a", ClientWrite("rm-a", change, 1000), 1.1)
    got = net.deliver(actions, 1.12)
    assert WriteApplied("rm-a", WriteId(1, 1)) in got
    assert net.m["a"].role == "follower"
    assert RoleChanged("follower", "leader", 1, None, "removed") in got
    assert net.m["a"].next_deadline() is None


def test_a_new_leader_settles_an_unsettled_voter_set_first() -> None:
    unsettled = ClusterRecord("voters", 2, 1, voters_body("abcd", "abc"), "voters/2")
    records, _ = boot_records("abc").merge([Entry(WriteId(1, 1), unsettled)])
    net = Net({})
    for v in "abcd":
        machine = ElectionMachine(v, SETTINGS)
        net.m[v], _ = machine.handle(Started(PersistedVote(1), records), 0.0, RNG)
    queue = sends(net.step("a", TimerFired(), 1.0))
    while net.m["a"].role != "leader":  # the election only, d cut off
        send = queue.pop(0)
        if send.to != "d":
            queue += sends(net.step(send.to, send.message, 1.0))
    settle = net.m["a"].pending_writes[0]
    assert settle.request_id is None and settle.quorums == (frozenset("abcd"), frozenset("abc"))
    record = settle.entry.item
    assert isinstance(record, ClusterRecord) and record.settled and record.term == 2
    assert record.text == unsettled.text  # the same signed record, stored again
    # While unsettled, the lease counts the previous set (a, b, c), and a new change waits.
    assert net.m["a"].lease_expiry == pytest.approx(1.5)
    refused = net.step("a", ClientWrite("x", voters_change(net.m["a"], "abcde"), 1000), 1.01)
    assert [a.code for a in refused if isinstance(a, WriteRefused)] == ["voter_change_pending"]
    heartbeats = [s for s in queue if isinstance(s.message, Heartbeat) and s.to in "bc"]
    got = net.deliver(tuple(heartbeats), 1.02)
    assert net.m["a"].pending_writes == ()
    assert not any(isinstance(a, WriteApplied) for a in got)  # the leader's own write


# -- settings, events, wire ---------------------------------------------------------------


def test_the_defaults_are_safe() -> None:
    check_election_settings(ElectionSettings())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"leader_lease_s": 0.95}, "lease_too_long"),
        ({"leader_lease_s": 0.85, "max_clock_drift_ppm": 60_000}, "lease_too_long"),
        ({"lease_margin_s": 0.5}, "lease_too_long"),
        ({"election_timeout_max_s": 1.0}, "timeouts_not_randomized"),
        ({"heartbeat_interval_s": 0.2}, "heartbeat_too_slow"),
        ({"max_clock_drift_ppm": 100_000}, "drift_too_large"),
        ({"write_timeout_s": 0.0}, "not_positive"),
        ({"leader_lease_s": math.nan}, "not_positive"),
    ],
)
def test_unsafe_settings_are_refused_with_a_reason(change: dict[str, float], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_election_settings(replace(SETTINGS, **change))  # type: ignore[arg-type]
    assert info.value.code == "unsafe_election_timing"
    assert info.value.details["reason"] == reason
    with pytest.raises(ConfigError):
        ElectionMachine("a", replace(SETTINGS, **change))  # type: ignore[arg-type]


def test_the_lease_limit_accounts_for_drift() -> None:
    # 0.5 / (1 - 1 %) + 0.05 = 0.555 s < 1.0 / 1.01 = 0.990 s
    check_election_settings(replace(SETTINGS, max_clock_drift_ppm=10_000))
    # The same lease is unsafe once drift is large enough: 0.5/0.7 + 0.05 > 1/1.3.
    with pytest.raises(ConfigError):
        check_election_settings(replace(SETTINGS, max_clock_drift_ppm=99_999, leader_lease_s=0.85))


def test_a_timing_change_must_be_safe_while_voters_switch() -> None:
    longer_lease = replace(
        SETTINGS, leader_lease_s=0.99, election_timeout_min_s=2.0, election_timeout_max_s=3.0
    )
    check_election_settings(longer_lease)
    with pytest.raises(ConfigError) as info:
        check_election_settings_change(SETTINGS, longer_lease)
    assert info.value.details["reason"] == "unsafe_timing_change"
    check_election_settings_change(
        SETTINGS, replace(SETTINGS, election_timeout_min_s=1.5, election_timeout_max_s=3.0)
    )


def test_settings_changed_is_checked() -> None:
    machine = started("a")
    with pytest.raises(ConfigError):
        machine.handle(SettingsChanged(replace(SETTINGS, leader_lease_s=5.0)), 1.0, RNG)
    machine, _ = machine.handle(SettingsChanged(replace(SETTINGS, leader_lease_s=0.4)), 1.0, RNG)
    assert machine.settings.leader_lease_s == 0.4


def test_illegal_events_are_refused_and_change_nothing() -> None:
    stopped = ElectionMachine("a", SETTINGS)
    with pytest.raises(IllegalElectionEvent):
        stopped.handle(TimerFired(), 0.0, RNG)
    assert stopped.role == "stopped" and stopped.next_deadline() is None
    running = started("a")
    with pytest.raises(IllegalElectionEvent):
        running.handle(Started(PersistedVote(), RecordSet()), 0.0, RNG)
    with pytest.raises(BadRequest):
        running.handle(TimerFired(), math.nan, RNG)
    assert running.role == "follower" and running.term == 0


def test_the_role_table_covers_every_role() -> None:
    assert set(ROLE_TRANSITIONS) == set(ROLES)
    targets = {role for row in ROLE_TRANSITIONS.values() for role in row.values()}
    assert targets == set(ROLES) - {"stopped"}


def test_messages_round_trip_through_json() -> None:
    entry = Entry(WriteId(1, 1), token("t1", "x", 1))
    digest = Digest([WriteId(1, 1)])
    messages = [
        PreVoteRequest("a", 3),
        PreVoteAnswer("b", 3, True, 2),
        VoteRequest("a", 3, digest, 1.0),
        VoteAnswer("b", 3, True, (entry,), digest),
        VoteAnswer("b", 3, False),
        Heartbeat("a", 3, 7, digest, (entry,), 8.0),
        HeartbeatAck("b", 3, 7, True, digest),
    ]
    for message in messages:
        assert message_from_json(message_to_json(message)) == message
    with pytest.raises(BadRequest):
        message_from_json({"type": "heartbeat", "sender": "a", "term": 1})
    with pytest.raises(BadRequest):
        message_from_json({"type": "gossip", "sender": "a", "term": 1})


def test_a_voter_change_counts_only_voters_that_hold_everything_the_leader_held() -> None:
    net = elect_a("abc")
    net.m["d"], _ = ElectionMachine("d", SETTINGS).handle(
        Started(PersistedVote(), RecordSet()), 0.0, RNG
    )
    written = net.step("a", ClientWrite("w1", token("t1", "x", 1), 1000), 1.1)
    assert WriteApplied("w1", WriteId(1, 1)) in net.deliver(written, 1.1, only={"b"})
    change = voters_change(net.m["a"], "abcd")
    net.step("a", ClientWrite("add-d", change, 1000), 1.2)
    boot = WriteId(0, 1)

    def ack(voter: str, *ids: WriteId) -> tuple[Action, ...]:
        net.m["a"], got = net.m["a"].handle(HeartbeatAck(voter, 1, 1, True, Digest(ids)), 1.25, RNG)
        return got

    assert ack("b", boot, WriteId(1, 1), WriteId(1, 2)) == ()
    # c and d hold the change but not the token write acknowledged before it: they do not
    # count, or a majority of the new set could lack an acknowledged write.
    assert ack("c", boot, WriteId(1, 2)) == ()
    assert ack("d", WriteId(1, 2)) == ()
    assert net.m["a"].pending_writes[0].request_id == "add-d"
    got = ack("d", WriteId(1, 1), WriteId(1, 2))
    assert WriteApplied("add-d", WriteId(1, 2)) in got


def test_while_a_change_is_pending_the_lease_counts_the_previous_set() -> None:
    # A lone voter adding a second one keeps its lease: the new voter's acknowledgement
    # is not needed for it (any rival must count votes under {a} or {a, b}: both need a).
    machine = started("a", voters="a")
    assert machine.role == "leader"
    change = voters_change(machine, "ab")
    machine, actions = machine.handle(ClientWrite("add-b", change, 1000), 1.0, RNG)
    assert machine.pending_writes and machine.lease_expiry == math.inf
    assert not any(isinstance(a, WriteApplied) for a in actions)  # b must store it too
    (to_b,) = sends(actions, Heartbeat)  # the write goes out at once, in a round sent at 1.0
    assert to_b.to == "b"
    round_sent = to_b.message.round  # type: ignore[union-attr]
    machine, actions = machine.handle(
        HeartbeatAck("b", 1, round_sent, True, machine.records.digest), 1.1, RNG
    )
    assert WriteApplied("add-b", WriteId(1, 1)) in actions
    # Applied: from now on the lease rests on {a, b}: b's acknowledgement of 1.0 counts.
    assert machine.lease_expiry == pytest.approx(1.5)
