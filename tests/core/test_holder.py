"""The lease holder's machine (populi_peer/core/holder.py): renew before start, every TTL/3,
stop on a refusal, keep going on silence — and local work becomes a claim instead of
waiting for an unreachable control plane."""

from __future__ import annotations

import pytest

from populi_peer.core.holder import (
    PHASE_EVENTS,
    AttemptEnded,
    BecomeClaim,
    Cancel,
    ExtendDeadline,
    HolderConfig,
    HolderMachine,
    IllegalHolderEvent,
    NotStarted,
    RenewAnswered,
    RenewRefused,
    RenewUnanswered,
    SendRelease,
    SendRenewal,
    StartAttempt,
    StopAttempt,
    TimerFired,
)
from populi_peer.errors import BadRequest

REMOTE = HolderConfig(ttl_s=30.0, stop_margin_s=7.0)
LOCAL = HolderConfig(ttl_s=30.0, stop_margin_s=7.0, may_claim=True, claim_lead_s=1.0)


def running(config: HolderConfig = REMOTE, at: float = 100.0) -> HolderMachine:
    machine, actions = HolderMachine.begin(config, at)
    assert actions == (SendRenewal(at, before_start=True),)
    machine, actions = machine.handle(RenewAnswered(at, 30.0), at + 0.2)
    assert actions == (StartAttempt(at + 30.0),) and machine.phase == "running"
    return machine


def test_the_lease_is_proved_before_the_attempt_starts() -> None:
    machine, _ = HolderMachine.begin(REMOTE, 100.0)
    assert machine.phase == "proving" and machine.next_deadline() == 130.0  # gives up then
    refused, actions = machine.handle(RenewRefused(100.0, "lease_unknown"), 100.5)
    assert actions == (NotStarted("lease_unknown"), SendRelease("stopped"))
    assert refused.phase == "ended" and refused.next_deadline() is None
    # A shorter TTL in the answer bounds the deadline; counted from the send.
    machine, actions = machine.handle(RenewAnswered(100.0, 12.0), 101.0)
    assert actions == (StartAttempt(112.0),)


def test_an_unanswered_proof_is_retried_then_given_up() -> None:
    machine, _ = HolderMachine.begin(REMOTE, 100.0)
    machine, actions = machine.handle(RenewUnanswered(100.0), 102.0)
    assert actions == () and machine.next_deadline() == 102.0  # report first, ask again
    machine, actions = machine.handle(TimerFired(), 102.0)
    assert actions == (SendRenewal(102.0, before_start=True),)
    machine, _ = machine.handle(RenewUnanswered(102.0), 104.0)
    machine, actions = machine.handle(TimerFired(), 130.0)
    assert actions == (NotStarted("lease_not_proved"), SendRelease("stopped"))


def test_renewals_every_third_of_the_ttl_move_the_deadline() -> None:
    machine = running()
    assert machine.next_deadline() == 110.0
    machine, actions = machine.handle(TimerFired(), 110.0)
    assert actions == (SendRenewal(110.0, before_start=False),)
    assert machine.next_deadline() is None  # waiting for the answer
    machine, actions = machine.handle(RenewAnswered(110.0, 30.0), 110.4)
    assert actions == (ExtendDeadline(140.0),) and machine.next_deadline() == 120.0
    # A late answer to an older renewal is stale: ignored.
    same, actions = machine.handle(RenewAnswered(100.0, 30.0), 111.0)
    assert same is machine and actions == ()


def test_a_refused_renewal_stops_the_attempt_an_unanswered_one_does_not() -> None:
    machine = running()
    machine, _ = machine.handle(TimerFired(), 110.0)
    machine, actions = machine.handle(RenewUnanswered(110.0), 112.0)
    assert actions == () and machine.phase == "running" and machine.deadline == 130.0
    machine, actions = machine.handle(TimerFired(), 120.0)
    assert actions == (SendRenewal(120.0, before_start=False),)
    machine, actions = machine.handle(RenewRefused(120.0, "lease_revoked"), 120.1)
    assert actions == (StopAttempt("lease_revoked"),) and machine.phase == "stopping"
    machine, actions = machine.handle(AttemptEnded("stopped"), 121.0)
    assert actions == (SendRelease("stopped"),) and machine.phase == "ended"


def test_a_remote_attempt_never_becomes_a_claim() -> None:
    machine = running()
    for at in (110.0, 120.0):
        machine, _ = machine.handle(TimerFired(), at)
        machine, _ = machine.handle(RenewUnanswered(at), at + 2)
    assert machine.next_deadline() == 130.0  # keeps asking; the supervisor stops it by 123
    machine, actions = machine.handle(TimerFired(), 130.0)
    assert actions == (SendRenewal(130.0, before_start=False),)


def test_a_local_attempt_becomes_a_claim_before_its_deadline() -> None:
    """Issue 12: a local attempt whose renewals go unanswered becomes a claim before
    its deadline instead of being killed."""
    machine = running(LOCAL)
    claim_at = 130.0 - 7.0 - 1.0
    assert machine.claim_at == claim_at
    for at in (110.0, 120.0):
        machine, _ = machine.handle(TimerFired(), at)
        machine, _ = machine.handle(RenewUnanswered(at), at + 2)
    assert machine.next_deadline() == claim_at
    machine, actions = machine.handle(TimerFired(), claim_at)
    assert actions == (BecomeClaim(),) and machine.phase == "claimed"
    assert machine.next_deadline() is None and machine.deadline is None
    # A late answer changes nothing now; the end releases the lease.
    same, actions = machine.handle(RenewAnswered(120.0, 30.0), 123.0)
    assert actions == ()
    _, actions = same.handle(AttemptEnded("completed"), 500.0)
    assert actions == (SendRelease("completed"),)


def test_a_local_attempt_whose_renewal_is_refused_stops() -> None:
    machine = running(LOCAL)
    machine, _ = machine.handle(TimerFired(), 110.0)
    machine, actions = machine.handle(RenewRefused(110.0, "lease_revoked"), 110.1)
    assert actions == (StopAttempt("lease_revoked"),)


def test_an_unanswered_proof_of_local_work_starts_it_under_a_claim() -> None:
    """Local work never waits for an unreachable control plane."""
    machine, _ = HolderMachine.begin(LOCAL, 100.0)
    machine, actions = machine.handle(RenewUnanswered(100.0), 102.0)
    assert actions == (BecomeClaim(), StartAttempt(None)) and machine.phase == "claimed"
    # Refused (not unanswered): it never starts, claim or not.
    machine, _ = HolderMachine.begin(LOCAL, 100.0)
    _, actions = machine.handle(RenewRefused(100.0, "task_completed"), 100.1)
    assert actions == (NotStarted("task_completed"), SendRelease("stopped"))


def test_cancel_and_illegal_events() -> None:
    machine, _ = HolderMachine.begin(REMOTE, 100.0)
    with pytest.raises(IllegalHolderEvent):
        machine.handle(AttemptEnded("completed"), 101.0)  # it never started
    _, actions = machine.handle(Cancel(), 101.0)
    assert actions == (NotStarted("cancelled"), SendRelease("stopped"))
    machine, actions = running().handle(Cancel(), 105.0)
    assert actions == (StopAttempt("cancelled"),)
    machine, _ = machine.handle(AttemptEnded("stopped"), 106.0)
    assert machine.handle(Cancel(), 107.0) == (machine, ())
    with pytest.raises(IllegalHolderEvent):
        machine.handle(AttemptEnded("stopped"), 108.0)
    assert "ended" not in PHASE_EVENTS["proving"] and "ended" not in PHASE_EVENTS["ended"]


def test_what_is_not_a_holder_event_is_refused_not_taken_as_a_cancel() -> None:
    machine = running()
    with pytest.raises(BadRequest, match="not a holder event"):
        machine.handle(StopAttempt("cancelled"), 105.0)  # type: ignore[arg-type]


def test_a_config_that_leaves_no_room_to_renew_is_refused() -> None:
    with pytest.raises(BadRequest):
        HolderConfig(ttl_s=30.0, stop_margin_s=19.5, claim_lead_s=1.0)
    with pytest.raises(BadRequest):
        HolderConfig(ttl_s=0.0, stop_margin_s=0.0)


def test_a_cancel_stops_a_claim_once_and_a_stopping_attempt_stays_as_it_is() -> None:
    machine, _ = HolderMachine.begin(LOCAL, 100.0)
    machine, _ = machine.handle(RenewUnanswered(100.0), 102.0)
    assert machine.phase == "claimed"
    machine, actions = machine.handle(Cancel(), 103.0)
    assert actions == (StopAttempt("cancelled"),) and machine.phase == "stopping"
    assert machine.handle(Cancel(), 104.0) == (machine, ())
