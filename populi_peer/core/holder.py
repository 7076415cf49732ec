"""The lease holder's machine: one attempt's side of its lease (safety rules 1 and 3).

The holder — a worker for a remote attempt, the submitter for a local one — proves its
lease before it starts, renews it every TTL/3 while the attempt runs, and stops when the
control plane refuses. :class:`HolderMachine` makes those decisions; the shell sends the
renewals, starts and stops the supervisor, and tells the machine what happened::

    machine, actions = HolderMachine.begin(config, now)
    machine, actions = machine.handle(RenewAnswered(sent_at, ttl_s), now)
    ... trio.move_on_at(machine.next_deadline()) -> machine.handle(TimerFired(), now)

``now`` is the holder's ``CLOCK_BOOTTIME`` reading (it keeps counting through suspend).

Rules, each with where it comes from:

- **Renew before start** (rule 3): the first action is a renewal marked ``before_start``;
  only its success starts the attempt (:class:`StartAttempt`), with the deadline counted
  from when that renewal was *sent* (:func:`~populi_peer.core.leases.worker_deadline_boot`).
  A refusal means the attempt never starts (:class:`NotStarted`).
- **Renew every TTL/3** from the last renewal sent (:func:`renew_interval_s`); each success
  moves the deadline later (:class:`ExtendDeadline`), never earlier.
- **Stop on a definitive refusal** (:class:`RenewRefused`: revoked, not live, unknown):
  :class:`StopAttempt` at once.
- **Keep going on an unanswered renewal** (:class:`RenewUnanswered`: no answer in time,
  unreachable, a 503, ``report_needed``): nothing changes; the supervisor's deadline stands
  and stops the attempt by itself if no renewal lands before it.
- **Local work never waits for an unreachable control plane** (rule 1): a local attempt
  with a claim basis (``may_claim``: remote execution off, pinned to this node, or a
  fallback with its dead confirmation) whose renewals go unanswered becomes a node-local
  claim *before* its deadline (:class:`BecomeClaim`, ``claim_lead_s`` before the supervisor
  would start stopping it) instead of being stopped; one whose proof before start goes
  unanswered starts under a claim instead of waiting. A refusal still stops it.
- **Release at the end** (:class:`SendRelease`): ``completed`` if the command ran to its
  end, ``stopped`` otherwise (also for an attempt that never started). The release is
  best effort: the node's reports carry the end until a control plane acknowledges it.

Phases and the one table (:data:`PHASE_EVENTS`): ``proving -> running | claimed | ended``,
``running -> stopping | claimed | ended``, ``claimed -> stopping | ended``,
``stopping -> ended``. An event a phase lacks raises :class:`IllegalHolderEvent` and
changes nothing; a renewal answer for a renewal the machine no longer waits for is stale
and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, Literal, get_args

from populi_peer.core.leases import renew_interval_s, worker_deadline_boot
from populi_peer.errors import BadRequest, Conflict

HolderPhase = Literal["proving", "running", "claimed", "stopping", "ended"]
HOLDER_PHASES: Final[tuple[HolderPhase, ...]] = get_args(HolderPhase)
EndOutcome = Literal["completed", "stopped"]
EventName = Literal[
    "renew_answered", "renew_refused", "renew_unanswered", "timer", "ended", "cancel"
]

_RENEWALS: Final[frozenset[EventName]] = frozenset(
    {"renew_answered", "renew_refused", "renew_unanswered", "timer", "cancel"}
)
#: The one table: which events each phase takes. Only a started attempt can end; late
#: renewal answers, timers and a cancel after the end are taken (and change nothing).
PHASE_EVENTS: Final[Mapping[HolderPhase, frozenset[EventName]]] = MappingProxyType(
    {
        "proving": _RENEWALS,
        "running": _RENEWALS | {"ended"},
        "claimed": _RENEWALS | {"ended"},
        "stopping": _RENEWALS | {"ended"},
        "ended": _RENEWALS,
    }
)

#: Before start, an unanswered proof is retried this often at most (a node that was asked
#: to report first does so within a heartbeat).
PROOF_RETRY_S: Final = 1.0


class IllegalHolderEvent(Conflict):
    """An event the machine's phase does not take; the machine is unchanged."""

    code = "illegal_holder_event"


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HolderConfig:
    """One attempt's lease timings. ``ttl_s``: the lease's TTL (the handoff's; an answer
    may only shorten it). ``stop_margin_s``: how long before its deadline the supervisor
    starts stopping the task. ``may_claim``: a local attempt with a claim basis
    (:data:`~populi_peer.core.claims.CLAIM_BASES`). ``claim_lead_s``: how long before the
    supervisor would start stopping it such an attempt becomes a claim (the time to record
    the claim and lift the supervisor's deadline)."""

    ttl_s: float
    stop_margin_s: float
    may_claim: bool = False
    claim_lead_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ttl_s", "stop_margin_s", "claim_lead_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"holder {name} must be a number", code="bad_request")
            if not math.isfinite(value) or value < 0 or (name == "ttl_s" and value == 0):
                raise BadRequest(f"holder {name} must be finite and >= 0", code="bad_request")
        # Like validate_stop_margin's ceiling: a renewal must be able to land before the
        # attempt would become a claim (or be stopped), or it would never renew.
        ceiling = self.ttl_s - renew_interval_s(self.ttl_s)
        if self.stop_margin_s + self.claim_lead_s >= ceiling:
            raise BadRequest(
                f"holder stop_margin_s + claim_lead_s must stay below {ceiling:.3f} s "
                f"(two thirds of a {self.ttl_s:g} s TTL)",
                code="bad_request",
            )


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenewAnswered:
    """The control plane renewed: the renewal sent at ``sent_at`` (its ``ttl_s``)."""

    sent_at: float
    ttl_s: float


@dataclass(frozen=True, slots=True)
class RenewRefused:
    """The control plane refused the renewal sent at ``sent_at`` — a definitive answer
    (revoked, not live, unknown, not the holder, remote execution off before start)."""

    sent_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class RenewUnanswered:
    """No usable answer to the renewal sent at ``sent_at``: none in time, unreachable,
    answered by someone who is not the control plane, 503, ``report_needed``."""

    sent_at: float


@dataclass(frozen=True, slots=True)
class TimerFired:
    """``next_deadline()`` came."""


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    """The attempt is gone: ``completed`` (its command ran to its end) or ``stopped``."""

    outcome: EndOutcome


@dataclass(frozen=True, slots=True)
class Cancel:
    """The submitter cancelled the task."""


HolderEvent = RenewAnswered | RenewRefused | RenewUnanswered | TimerFired | AttemptEnded | Cancel


#: The name of each event in :data:`PHASE_EVENTS`.
_EVENT_NAMES: Final[Mapping[type, EventName]] = MappingProxyType(
    {
        RenewAnswered: "renew_answered",
        RenewRefused: "renew_refused",
        RenewUnanswered: "renew_unanswered",
        TimerFired: "timer",
        AttemptEnded: "ended",
        Cancel: "cancel",
    }
)


def _name_of(event: HolderEvent) -> EventName:
    name = _EVENT_NAMES.get(type(event))
    if name is None:
        raise BadRequest(f"not a holder event: {event!r}", code="bad_request")
    return name


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRenewal:
    """Renew now; report the answer with ``sent_at`` (the deadline counts from it)."""

    sent_at: float
    before_start: bool


@dataclass(frozen=True, slots=True)
class StartAttempt:
    """Start the attempt (the node's start transaction, then the supervisor) with this
    deadline; ``None``: under a claim, with no lease deadline."""

    deadline: float | None


@dataclass(frozen=True, slots=True)
class ExtendDeadline:
    deadline: float


@dataclass(frozen=True, slots=True)
class BecomeClaim:
    """Claim the GPUs the attempt uses, locally, and lift the supervisor's lease deadline."""


@dataclass(frozen=True, slots=True)
class StopAttempt:
    reason: str


@dataclass(frozen=True, slots=True)
class NotStarted:
    """Never start the attempt (its lease was refused, or could not be proved)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SendRelease:
    outcome: EndOutcome


HolderAction = (
    SendRenewal
    | StartAttempt
    | ExtendDeadline
    | BecomeClaim
    | StopAttempt
    | NotStarted
    | SendRelease
)


# -- the machine --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HolderMachine:
    """One attempt's lease, from the holder's side. Immutable."""

    config: HolderConfig
    phase: HolderPhase
    begun_at: float
    #: The supervisor's deadline (``None`` before the proof, and under a claim).
    deadline: float | None = None
    #: When the renewal waiting for its answer was sent (``None``: none in flight).
    in_flight: float | None = None
    next_renew_at: float = -math.inf

    @classmethod
    def begin(
        cls, config: HolderConfig, now: float
    ) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        """A new attempt: prove the lease first (rule 3)."""
        _check_now(now)
        machine = cls(config, "proving", begun_at=now, in_flight=now)
        return machine, (SendRenewal(now, before_start=True),)

    @property
    def interval_s(self) -> float:
        return renew_interval_s(self.config.ttl_s)

    @property
    def give_up_at(self) -> float:
        """Before start: past this the lease cannot still be live (the control plane counts
        its TTL from the grant, before the handoff); the proof is given up."""
        return self.begun_at + self.config.ttl_s

    @property
    def claim_at(self) -> float | None:
        """When a running claim-eligible attempt becomes a claim if no renewal moved its
        deadline: ``claim_lead_s`` before the supervisor would start stopping it."""
        if not self.config.may_claim or self.phase != "running" or self.deadline is None:
            return None
        return self.deadline - self.config.stop_margin_s - self.config.claim_lead_s

    def next_deadline(self) -> float | None:
        """When :class:`TimerFired` is due next, or ``None``."""
        if self.phase not in ("proving", "running"):
            return None
        due: list[float] = []
        if self.in_flight is None:
            due.append(self.next_renew_at)
        if self.phase == "proving":
            due.append(self.give_up_at)
        claim_at = self.claim_at
        if claim_at is not None:
            due.append(claim_at)
        return min(due) if due else None

    def handle(
        self, event: HolderEvent, now: float
    ) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        _check_now(now)
        name = _name_of(event)
        if name not in PHASE_EVENTS[self.phase]:
            raise IllegalHolderEvent(
                f"holder in phase {self.phase} cannot take {name}",
                phase=self.phase,
                event=name,
            )
        if isinstance(event, (RenewAnswered, RenewRefused, RenewUnanswered)):
            if self.in_flight is None or event.sent_at != self.in_flight:
                return self, ()  # stale: not the renewal this machine waits for
            machine = replace(self, in_flight=None)
            if machine.phase in ("claimed", "stopping", "ended"):
                return machine, ()
            if isinstance(event, RenewAnswered):
                return machine._answered(event)
            if isinstance(event, RenewRefused):
                return machine._stop(event.reason)
            return machine._unanswered(event.sent_at, now)
        if isinstance(event, TimerFired):
            return self._timer(now)
        if isinstance(event, AttemptEnded):
            return replace(self, phase="ended", in_flight=None), (SendRelease(event.outcome),)
        return self._stop("cancelled")  # Cancel

    # -- steps ------------------------------------------------------------------------------

    def _not_started(self, reason: str) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        # Nothing ran: give the lease back at once (its end also rides the reports).
        return replace(self, phase="ended", in_flight=None), (
            NotStarted(reason),
            SendRelease("stopped"),
        )

    def _answered(self, event: RenewAnswered) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        ttl = min(self.config.ttl_s, event.ttl_s) if event.ttl_s > 0 else self.config.ttl_s
        deadline = worker_deadline_boot(event.sent_at, ttl)
        next_at = event.sent_at + self.interval_s
        if self.phase == "proving":
            return replace(self, phase="running", deadline=deadline, next_renew_at=next_at), (
                StartAttempt(deadline),
            )
        assert self.deadline is not None
        if deadline <= self.deadline:
            return replace(self, next_renew_at=next_at), ()
        return replace(self, deadline=deadline, next_renew_at=next_at), (ExtendDeadline(deadline),)

    def _stop(self, reason: str) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        """A refusal or a cancel: an attempt not started never starts, a running one (or a
        claim) is stopped; one already stopping or ended stays as it is."""
        if self.phase == "proving":
            return self._not_started(reason)
        if self.phase in ("running", "claimed"):
            return replace(self, phase="stopping"), (StopAttempt(reason),)
        return self, ()

    def _unanswered(
        self, sent_at: float, now: float
    ) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        if self.phase == "proving":
            if self.config.may_claim:
                # Local work never waits for an unreachable control plane (rule 1).
                return replace(self, phase="claimed"), (BecomeClaim(), StartAttempt(None))
            retry = min(self.interval_s, PROOF_RETRY_S)
            return replace(self, next_renew_at=max(now, sent_at + retry)), ()
        return replace(self, next_renew_at=sent_at + self.interval_s), ()

    def _timer(self, now: float) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        if self.phase == "proving":
            if now >= self.give_up_at:
                return self._not_started("lease_not_proved")
            return self._renew_if_due(now)
        if self.phase != "running":
            return self, ()
        claim_at = self.claim_at
        if claim_at is not None and now >= claim_at:
            return replace(self, phase="claimed", in_flight=None, deadline=None), (BecomeClaim(),)
        return self._renew_if_due(now)

    def _renew_if_due(self, now: float) -> tuple[HolderMachine, tuple[HolderAction, ...]]:
        """Send the next renewal if it is due and none is waiting for its answer; the one
        sent while proving is the proof before the start (rule 3)."""
        if self.in_flight is None and now >= self.next_renew_at:
            before_start = self.phase == "proving"
            return replace(self, in_flight=now), (SendRenewal(now, before_start=before_start),)
        return self, ()


def _check_now(now: float) -> None:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise BadRequest(f"now must be a finite number, got {now!r}", code="bad_request")


__all__ = [
    "HOLDER_PHASES",
    "PHASE_EVENTS",
    "PROOF_RETRY_S",
    "AttemptEnded",
    "BecomeClaim",
    "Cancel",
    "EndOutcome",
    "ExtendDeadline",
    "HolderAction",
    "HolderConfig",
    "HolderEvent",
    "HolderMachine",
    "HolderPhase",
    "IllegalHolderEvent",
    "NotStarted",
    "RenewAnswered",
    "RenewRefused",
    "RenewUnanswered",
    "SendRelease",
    "SendRenewal",
    "StartAttempt",
    "StopAttempt",
    "TimerFired",
]
