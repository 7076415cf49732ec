"""Control-plane election for one voter: Raft's election (§5.2) with pre-vote, leader
stickiness, check-quorum and a leader lease, over records that merge instead of a log.

:class:`ElectionMachine` is one voter. It is immutable: :meth:`ElectionMachine.handle`
takes an event, the voter's clock reading ``now_mono`` and an ``rng``, and returns the
next machine and the actions the shell must carry out, **in order**::

    machine, actions = machine.handle(event, now_mono, rng)

Roles and the one transition table (:data:`ROLE_TRANSITIONS`)::

    stopped      --started-->          follower
    follower     --election_timeout--> precandidate   (no leader heard for a random
                                                       timeout in [min, max])
    precandidate --prevote_won-->      candidate      (a majority would vote: term + 1)
    candidate    --vote_won-->         leader         (a majority voted, their records
                                                       merged)
    leader       --lease_lost-->       follower       (check-quorum)
    any running  --higher_term / leader_seen / removed--> follower

An event the machine cannot take in its role (anything before ``Started``, ``Started``
twice) raises :class:`IllegalElectionEvent` and changes nothing. Peer messages are never
illegal: a stale or misdirected one is ignored.

Rules, each with where it comes from:

- **Persistent term and vote** (Raft §5.2): every change of ``(term, voted_for)`` comes
  out as :class:`PersistVote` first in the action list. The shell writes it with
  ``synchronous=FULL`` before any later action (a vote answer depends on it); a failed
  write means the machine must be dropped and restarted from storage.
- **Randomized timeouts**: each wait is ``rng.uniform(min, max)``.
- **Pre-vote** (Ongaro's thesis §9.6): a voter whose timeout fires asks first whether a
  majority *would* vote for ``term + 1``; only then does it bump its term. A partitioned
  voter therefore never inflates terms.
- **Leader stickiness** (thesis §4.2.3): a voter that heard a live leader — a heartbeat,
  or its own vote granted — within ``hold`` refuses pre-votes and votes without even
  looking at their term. ``hold`` is ``max(its own election_timeout_min_s, the hold the
  leader asked for)``; after a restart it is the minimum election timeout (it may have
  acknowledged a heartbeat just before it crashed), except for a lone voter.
- **Check-quorum and the leader lease** (thesis §6.4.1): the leader numbers its heartbeat
  rounds and notes when each was *sent* on its own clock; an acknowledgement of round r
  counts from that send time, and a granted vote counts from when the vote request was
  sent. The lease runs until the majority-th latest of those times (the leader itself
  counts as "now") plus ``leader_lease_s``. The leader steps down the moment the lease
  runs out — the shell learns it through :meth:`next_deadline` — and checks it first on
  every event, so it never acts on a lease it no longer holds.
  :func:`check_election_settings` refuses settings under which a lease could outlive
  the stickiness of the voters that granted it.
- **Merge before acting** (docs/design.md "Cluster state without a replicated log"): a
  vote request carries the candidate's record digest and each granted vote carries the
  entries the candidate has not seen; a candidate wins only when the voters whose
  entries it merged form a majority of the voter set *after* merging. A leader is
  therefore ready the moment it wins (:class:`RoleChanged` to ``leader``).
- **Records**: the leader stores a write itself, then sends it with the next heartbeat
  to every member; a write is applied once a majority holds it
  (:class:`~populi_peer.core.replication.PendingWrite`), reported as
  :class:`WriteApplied`; a write the leader stops tracking (it stepped down, or
  ``write_timeout_s`` passed) is :class:`WriteOutcomeUnknown`. Voters refuse heartbeats
  (and the writes they carry) from a lower term.
- **Voter set**: the latest ``voters`` cluster record in the replica; a change adds or
  removes one voter and starts only when the previous one is settled (ADR 0011). Answers
  from non-voters are ignored; a voter that is not in its own voter set never campaigns.

The clock: ``now_mono`` must keep counting through suspend (``CLOCK_BOOTTIME``): a leader
whose clock stopped while it slept would wake up believing in a lease that ended.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, get_args

from populi_peer import PROTOCOL_VERSION
from populi_peer.core.fencing import _bool, _float, _get, _int, _obj, _opt_str, _str
from populi_peer.core.replication import (
    EMPTY_DIGEST,
    ClusterRecord,
    Digest,
    Entry,
    Item,
    PendingWrite,
    RecordSet,
    VoterSet,
    WriteId,
    check_proposal,
    entries_from_json,
    entries_to_json,
    is_majority,
)
from populi_peer.core.wire import FieldsRecord
from populi_peer.errors import BadRequest, ConfigError, Conflict, RefusedError

Role = Literal["stopped", "follower", "precandidate", "candidate", "leader"]
Cause = Literal[
    "started",
    "election_timeout",
    "prevote_won",
    "vote_won",
    "higher_term",
    "leader_seen",
    "lease_lost",
    "removed",
]

ROLES: Final[tuple[Role, ...]] = get_args(Role)
CAUSES: Final[tuple[Cause, ...]] = get_args(Cause)

_TO_FOLLOWER: Final[Mapping[Cause, Role]] = {
    "higher_term": "follower",
    "leader_seen": "follower",
    "removed": "follower",
}

#: The one role table: ``role -> {cause: next role}``. A missing pair is a bug.
ROLE_TRANSITIONS: Final[Mapping[Role, Mapping[Cause, Role]]] = MappingProxyType(
    {
        "stopped": MappingProxyType({"started": "follower"}),
        "follower": MappingProxyType({"election_timeout": "precandidate", **_TO_FOLLOWER}),
        "precandidate": MappingProxyType(
            {"election_timeout": "precandidate", "prevote_won": "candidate", **_TO_FOLLOWER}
        ),
        "candidate": MappingProxyType(
            {"election_timeout": "precandidate", "vote_won": "leader", **_TO_FOLLOWER}
        ),
        "leader": MappingProxyType(
            {"lease_lost": "follower", "higher_term": "follower", "removed": "follower"}
        ),
    }
)


class IllegalElectionEvent(Conflict):
    """An event the machine cannot take in its role; the machine is unchanged."""

    code = "illegal_election_event"


class Rng(Protocol):
    """What the machine needs of a random generator (``random.Random`` fits)."""

    def uniform(self, a: float, b: float) -> float: ...


# -- settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ElectionSettings(FieldsRecord):
    """Election timings (cluster-wide, part of the signed settings record; seconds).

    - ``election_timeout_min_s`` / ``election_timeout_max_s``: a follower that hears no
      leader for a random time in this range starts a pre-vote; a voter that heard one
      within the minimum refuses votes (stickiness).
    - ``heartbeat_interval_s``: how often the leader sends heartbeats (and writes).
    - ``leader_lease_s``: how long a majority's acknowledgements keep the leader acting,
      counted from when the acknowledged message was sent.
    - ``lease_margin_s``: the time between the shell checking :meth:`ElectionMachine.can_act`
      and the effect of what it does (a grant leaving the process).
    - ``max_clock_drift_ppm``: bound on how far any voter's clock rate strays from real
      time (10 000 ppm = 1 %).
    - ``write_timeout_s``: a write not stored by a majority by then is reported
      "outcome unknown".
    - ``max_skew_ms``: how far a register write's clock may be ahead of the leader's.

    Defaults: the LAN timings of ADR 0019 (the settings' defaults); voters that reach each
    other over an overlay need ADR 0016's (1 s, 5 s, 8-16 s: ``docs/wan.md``).
    """

    election_timeout_min_s: float = 2.0
    election_timeout_max_s: float = 3.0
    heartbeat_interval_s: float = 0.25
    leader_lease_s: float = 1.0
    lease_margin_s: float = 0.5
    max_clock_drift_ppm: int = 10_000
    write_timeout_s: float = 10.0
    max_skew_ms: int = 300_000

    @property
    def drift(self) -> float:
        return self.max_clock_drift_ppm / 1_000_000

    @classmethod
    def from_json(cls, data: object) -> ElectionSettings:
        obj = _obj(data, "election settings")
        values: dict[str, Any] = {}
        for name in (
            "election_timeout_min_s",
            "election_timeout_max_s",
            "heartbeat_interval_s",
            "leader_lease_s",
            "lease_margin_s",
            "write_timeout_s",
        ):
            if name in obj:
                values[name] = _float(obj, name, "election settings")
        for name in ("max_clock_drift_ppm", "max_skew_ms"):
            if name in obj:
                values[name] = _int(obj, name, "election settings")
        return cls(**values)


def _unsafe(reason: str, key: str, message: str) -> ConfigError:
    return ConfigError(message, code="unsafe_election_timing", key=key, reason=reason)


def lease_outlives_hold_s(settings: ElectionSettings) -> float:
    """The real time a lease may last (its length on the slowest allowed clock) plus the
    margin: what the voters' shortest stickiness in real time must exceed."""
    return settings.leader_lease_s / (1 - settings.drift) + settings.lease_margin_s


def check_election_settings(settings: ElectionSettings) -> None:
    """Refuse election timings that are unsafe or cannot work, with a reason code in
    ``details["reason"]`` (:class:`~populi_peer.errors.ConfigError`, code
    ``unsafe_election_timing``):

    - ``not_positive``: a timing is not a finite number > 0 (the margin may be 0);
    - ``drift_too_large``: ``max_clock_drift_ppm`` not in [0, 100 000) (10 %);
    - ``timeouts_not_randomized``: ``election_timeout_max_s <= election_timeout_min_s``
      (equal timeouts make split votes repeat);
    - ``heartbeat_too_slow``: fewer than three heartbeats per lease: one lost heartbeat
      would end the lease;
    - ``lease_too_long``: the lease, measured on the slowest clock the drift bound allows,
      plus the margin, must end before the minimum election timeout measured on the
      fastest one: ``lease / (1 - drift) + margin < min_timeout / (1 + drift)``. A voter
      that acknowledged a heartbeat sent at ``s`` refuses every vote until at least
      ``s + min_timeout / (1 + drift)`` real seconds, so no other leader can be elected
      before the old lease is over (ADR 0011).
    """
    for name in (
        "election_timeout_min_s",
        "election_timeout_max_s",
        "heartbeat_interval_s",
        "leader_lease_s",
        "write_timeout_s",
    ):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _unsafe("not_positive", name, f"{name} must be a number of seconds")
        if not math.isfinite(value) or value <= 0:
            raise _unsafe("not_positive", name, f"{name} must be > 0 s, got {value}")
    margin = settings.lease_margin_s
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise _unsafe("not_positive", "lease_margin_s", "lease_margin_s must be a number")
    if not math.isfinite(margin) or margin < 0:
        raise _unsafe(
            "not_positive", "lease_margin_s", f"lease_margin_s must be >= 0, got {margin}"
        )
    ppm = settings.max_clock_drift_ppm
    if isinstance(ppm, bool) or not isinstance(ppm, int) or not 0 <= ppm < 100_000:
        raise _unsafe(
            "drift_too_large",
            "max_clock_drift_ppm",
            f"max_clock_drift_ppm must be an integer in [0, 100000), got {ppm!r}",
        )
    if settings.election_timeout_max_s <= settings.election_timeout_min_s:
        raise _unsafe(
            "timeouts_not_randomized",
            "election_timeout_max_s",
            f"election_timeout_max_s ({settings.election_timeout_max_s} s) must be above "
            f"election_timeout_min_s ({settings.election_timeout_min_s} s)",
        )
    if settings.heartbeat_interval_s * 3 > settings.leader_lease_s:
        raise _unsafe(
            "heartbeat_too_slow",
            "heartbeat_interval_s",
            f"heartbeat_interval_s ({settings.heartbeat_interval_s} s) must be at most a "
            f"third of leader_lease_s ({settings.leader_lease_s} s)",
        )
    outlives = lease_outlives_hold_s(settings)
    hold = settings.election_timeout_min_s / (1 + settings.drift)
    if outlives >= hold:
        raise _unsafe(
            "lease_too_long",
            "leader_lease_s",
            f"leader_lease_s {settings.leader_lease_s} s can last {outlives:.3f} s with "
            f"{ppm} ppm drift and a {margin} s margin, not below the minimum election "
            f"timeout's {hold:.3f} s: lower leader_lease_s or raise election_timeout_min_s",
        )


def check_election_settings_change(old: ElectionSettings, new: ElectionSettings) -> None:
    """Refuse a change of timings under which a voter still on one of the two and a
    leader on the other could overlap (reason ``unsafe_timing_change``): both must be
    safe on their own and with each other's lease."""
    check_election_settings(new)
    for lease_side, hold_side in ((old, new), (new, old)):
        mixed = replace(
            hold_side,
            leader_lease_s=lease_side.leader_lease_s,
            lease_margin_s=max(old.lease_margin_s, new.lease_margin_s),
            max_clock_drift_ppm=max(old.max_clock_drift_ppm, new.max_clock_drift_ppm),
            heartbeat_interval_s=min(hold_side.heartbeat_interval_s, lease_side.leader_lease_s / 3),
        )
        try:
            check_election_settings(mixed)
        except ConfigError as exc:
            raise _unsafe(
                "unsafe_timing_change",
                "leader_lease_s",
                f"changing election timings this way is unsafe while voters switch: {exc}",
            ) from None


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreVoteRequest:
    """Would you vote for me at ``term``? (``term`` = the asker's term + 1; nothing
    changes at either side.)"""

    sender: str
    term: int


@dataclass(frozen=True, slots=True)
class PreVoteAnswer:
    sender: str
    term: int
    granted: bool
    voter_term: int


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Vote for me at ``term``. ``digest``: what the candidate's replica has seen, so a
    granted vote carries what it misses. ``hold_s``: how long a granting voter must
    refuse other candidates (the candidate's minimum election timeout)."""

    sender: str
    term: int
    digest: Digest
    hold_s: float


@dataclass(frozen=True, slots=True)
class VoteAnswer:
    """A vote (or a refusal) with, when granted, the entries the candidate has not seen
    and the voter's digest."""

    sender: str
    term: int
    granted: bool
    entries: tuple[Entry, ...] = ()
    digest: Digest = EMPTY_DIGEST


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """ "I am the leader for ``term``": round number (for the lease), the leader's digest,
    the entries this voter has not reported, and the stickiness the leader asks for."""

    sender: str
    term: int
    round: int
    digest: Digest
    entries: tuple[Entry, ...]
    hold_s: float


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """The answer to a heartbeat: ``success`` false means the voter's term is higher
    (``term``) and it stored nothing. ``digest``: everything the voter has seen."""

    sender: str
    term: int
    round: int
    success: bool
    digest: Digest


Message = PreVoteRequest | PreVoteAnswer | VoteRequest | VoteAnswer | Heartbeat | HeartbeatAck

_MESSAGE_TYPES: Final[Mapping[str, type[Any]]] = MappingProxyType(
    {
        "prevote_request": PreVoteRequest,
        "prevote_answer": PreVoteAnswer,
        "vote_request": VoteRequest,
        "vote_answer": VoteAnswer,
        "heartbeat": Heartbeat,
        "heartbeat_ack": HeartbeatAck,
    }
)
_TYPE_NAMES: Final[Mapping[type[Any], str]] = MappingProxyType(
    {cls: name for name, cls in _MESSAGE_TYPES.items()}
)


def message_to_json(message: Message) -> dict[str, Any]:
    """The wire form of a message: ``{"v", "type", "sender", "term", ...}``."""
    data: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": _TYPE_NAMES[type(message)],
        "sender": message.sender,
        "term": message.term,
    }
    if isinstance(message, PreVoteAnswer):
        data.update(granted=message.granted, voter_term=message.voter_term)
    elif isinstance(message, VoteRequest):
        data.update(digest=message.digest.to_json(), hold_ms=round(message.hold_s * 1000))
    elif isinstance(message, VoteAnswer):
        data.update(
            granted=message.granted,
            entries=entries_to_json(message.entries),
            digest=message.digest.to_json(),
        )
    elif isinstance(message, Heartbeat):
        data.update(
            round=message.round,
            digest=message.digest.to_json(),
            entries=entries_to_json(message.entries),
            hold_ms=round(message.hold_s * 1000),
        )
    elif isinstance(message, HeartbeatAck):
        data.update(round=message.round, success=message.success, digest=message.digest.to_json())
    return data


def message_from_json(data: object) -> Message:
    """Parse :func:`message_to_json`'s output; unknown fields are ignored. A malformed
    message raises :class:`~populi_peer.errors.BadRequest`."""
    what = "election message"
    obj = _obj(data, what)
    kind = _str(obj, "type", what)
    if kind not in _MESSAGE_TYPES:
        raise BadRequest(f"{what}: unknown type {kind!r}", code="bad_record", field="type")
    sender = _str(obj, "sender", what)
    term = _int(obj, "term", what)
    if not sender or term < 0:
        raise BadRequest(f"{what}: empty sender or negative term", code="bad_record")
    if kind == "prevote_request":
        return PreVoteRequest(sender, term)
    if kind == "prevote_answer":
        return PreVoteAnswer(
            sender, term, _bool(obj, "granted", what, False), _int(obj, "voter_term", what)
        )
    if kind == "vote_request":
        return VoteRequest(
            sender,
            term,
            Digest.from_json(_get(obj, "digest", what)),
            _hold_s(obj, what),
        )
    if kind == "vote_answer":
        return VoteAnswer(
            sender,
            term,
            _bool(obj, "granted", what, False),
            entries_from_json(obj.get("entries", [])),
            Digest.from_json(obj.get("digest", {"terms": []})),
        )
    if kind == "heartbeat":
        return Heartbeat(
            sender,
            term,
            _int(obj, "round", what),
            Digest.from_json(_get(obj, "digest", what)),
            entries_from_json(obj.get("entries", [])),
            _hold_s(obj, what),
        )
    return HeartbeatAck(
        sender,
        term,
        _int(obj, "round", what),
        _bool(obj, "success", what, False),
        Digest.from_json(_get(obj, "digest", what)),
    )


def _hold_s(obj: Mapping[str, Any], what: str) -> float:
    hold_ms = _int(obj, "hold_ms", what)
    if hold_ms < 0 or hold_ms > 3_600_000:
        raise BadRequest(f"{what}: hold_ms out of range", code="bad_record", field="hold_ms")
    return hold_ms / 1000


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistedVote:
    """What the shell keeps of the election across restarts."""

    term: int = 0
    voted_for: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"term": self.term, "voted_for": self.voted_for}

    @classmethod
    def from_json(cls, data: object) -> PersistedVote:
        obj = _obj(data, "persisted vote")
        return cls(
            _int(obj, "term", "persisted vote"), _opt_str(obj, "voted_for", "persisted vote")
        )


@dataclass(frozen=True, slots=True)
class Started:
    """The machine starts (first boot or restart) from what was persisted: the term and
    vote, and the replica of the records (entries and digest)."""

    vote: PersistedVote
    records: RecordSet


@dataclass(frozen=True, slots=True)
class TimerFired:
    """``now_mono`` reached :meth:`ElectionMachine.next_deadline` (early calls are harmless)."""


@dataclass(frozen=True, slots=True)
class ClientWrite:
    """A write proposed to this voter (meaningful on the leader). The shell builds the
    item with the machine's term (:attr:`ElectionMachine.term`) and, for a cluster
    record, :meth:`RecordSet.next_serial`; ``now_wall_ms`` is for the skew check."""

    request_id: str
    item: Item
    now_wall_ms: int


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """New election timings (from a settings record the shell verified)."""

    settings: ElectionSettings


Event = Started | TimerFired | ClientWrite | SettingsChanged | Message


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistVote:
    """Write ``(term, voted_for)`` durably (``synchronous=FULL``) before any later action."""

    term: int
    voted_for: str | None


@dataclass(frozen=True, slots=True)
class PersistRecords:
    """Store these winning entries (upsert by :attr:`Entry.key`) and the replica's digest,
    in one transaction, durably, before any later action."""

    entries: tuple[Entry, ...]
    digest: Digest


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """The voter's role, term or known leader changed (for ``populi events``). ``role ==
    "leader"`` means elected *and* merged from a majority: ready to act while
    :meth:`ElectionMachine.can_act`. ``previous == "leader"`` is a step-down: stop
    granting and renewing at once."""

    role: Role
    previous: Role
    term: int
    leader: str | None
    cause: Cause


@dataclass(frozen=True, slots=True)
class WriteApplied:
    """A majority of voters stored the write: acknowledge it to its caller."""

    request_id: str
    write_id: WriteId


@dataclass(frozen=True, slots=True)
class WriteRefused:
    """Nothing was stored. ``code``: ``not_leader`` (``leader``/``term`` name whom to
    ask), ``no_quorum``, ``voter_change_pending`` or a
    :class:`~populi_peer.core.replication.RecordRefused` code."""

    request_id: str
    code: str
    message: str
    leader: str | None
    term: int


@dataclass(frozen=True, slots=True)
class WriteOutcomeUnknown:
    """The leader stored the write but cannot tell whether a majority did: the caller
    hears "outcome unknown" (the write may or may not take effect)."""

    request_id: str
    write_id: WriteId
    reason: str


Action = (
    PersistVote
    | PersistRecords
    | Send
    | RoleChanged
    | WriteApplied
    | WriteRefused
    | WriteOutcomeUnknown
)


# -- the machine --------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    node_id: str
    settings: ElectionSettings
    role: Role = "stopped"
    term: int = 0
    voted_for: str | None = None
    leader: str | None = None
    records: RecordSet = field(default_factory=RecordSet)
    election_deadline: float | None = None
    hold_until: float = -math.inf
    # pre-vote and campaign
    prevote_term: int = 0
    prevotes: frozenset[str] = frozenset()
    votes: frozenset[str] = frozenset()
    asked: frozenset[str] = frozenset()
    campaign_sent_at: float = 0.0
    # leader (acked_sent and known are filled from votes already)
    round: int = 0
    sent_at: Mapping[int, float] = field(default_factory=dict)
    acked_sent: Mapping[str, float] = field(default_factory=dict)
    known: Mapping[str, Digest] = field(default_factory=dict)
    next_heartbeat: float | None = None
    next_seq: int = 1
    pending: tuple[PendingWrite, ...] = ()
    voters_acked: bool = False


class ElectionMachine:
    """One voter's election and record replica. Immutable; see the module docstring."""

    __slots__ = ("_s",)

    _s: _State

    def __init__(self, node_id: str, settings: ElectionSettings | None = None) -> None:
        """A stopped machine; feed it :class:`Started`. ``settings`` are checked."""
        if not isinstance(node_id, str) or not node_id:
            raise BadRequest("node_id must be a non-empty string", field="node_id")
        settings = settings if settings is not None else ElectionSettings()
        check_election_settings(settings)
        object.__setattr__(self, "_s", _State(node_id=node_id, settings=settings))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ElectionMachine is immutable")

    def __repr__(self) -> str:
        s = self._s
        return f"ElectionMachine({s.node_id} {s.role} term={s.term} leader={s.leader})"

    # -- reading ----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._s.node_id

    @property
    def settings(self) -> ElectionSettings:
        return self._s.settings

    @property
    def role(self) -> Role:
        return self._s.role

    @property
    def term(self) -> int:
        return self._s.term

    @property
    def voted_for(self) -> str | None:
        return self._s.voted_for

    @property
    def leader(self) -> str | None:
        """The leader this voter follows (itself when leader), or ``None``."""
        return self._s.leader

    @property
    def records(self) -> RecordSet:
        return self._s.records

    @property
    def voter_set(self) -> VoterSet | None:
        return self._s.records.voter_set()

    @property
    def pending_writes(self) -> tuple[PendingWrite, ...]:
        return self._s.pending

    @property
    def lease_expiry(self) -> float:
        """When the leader's lease ends on its clock (``-inf`` when not leader, ``inf`` for
        a lone voter)."""
        return _lease_expiry(self._s) if self._s.role == "leader" else -math.inf

    def can_act(self, now_mono: float) -> bool:
        """Whether this voter may act as control plane now: leader, merged, lease held."""
        return self._s.role == "leader" and now_mono < _lease_expiry(self._s)

    def next_deadline(self) -> float | None:
        """When to send :class:`TimerFired` (``None``: no timer)."""
        s = self._s
        if s.role == "stopped":
            return None
        if s.role != "leader":
            return s.election_deadline
        times = [t for t in (s.next_heartbeat, _lease_expiry(s)) if t is not None]
        times += [p.deadline_mono for p in s.pending]
        finite = [t for t in times if math.isfinite(t)]
        return min(finite) if finite else None

    # -- the one entry point ------------------------------------------------------------

    def handle(
        self, event: Event, now_mono: float, rng: Rng
    ) -> tuple[ElectionMachine, tuple[Action, ...]]:
        """The machine after ``event`` at ``now_mono``, and the actions to carry out in
        order. Raises :class:`IllegalElectionEvent` (and changes nothing) for an event
        the role does not take."""
        if not isinstance(now_mono, (int, float)) or isinstance(now_mono, bool):
            raise BadRequest("now_mono must be a number", field="now_mono")
        if not math.isfinite(now_mono):
            raise BadRequest("now_mono must be finite", field="now_mono")
        if self._s.role == "stopped" and not isinstance(event, Started):
            raise IllegalElectionEvent(
                f"{type(event).__name__} before Started; start the machine first",
                event=type(event).__name__,
            )
        if self._s.role != "stopped" and isinstance(event, Started):
            raise IllegalElectionEvent(
                "Started on a running machine; build a new machine to restart",
                event="Started",
            )
        step = _Step(replace(self._s), float(now_mono), rng)
        step.run(event)
        machine = ElectionMachine.__new__(ElectionMachine)
        object.__setattr__(machine, "_s", step.s)
        return machine, step.actions()


def _lease_expiry(s: _State) -> float:
    """The majority-th latest acknowledgement (send times; the leader itself is "now")
    plus the lease. The majority is of the voter set, or — while the leader does not
    know its voter set to be stored by both majorities — of the previous set: every voter
    set a rival could count votes under is one change from that one, so a majority of it
    meets every rival's majority (ADR 0011)."""
    voters = s.records.voter_set()
    if voters is None:
        return -math.inf
    quorum = voters.previous if voters.previous and not s.voters_acked else voters.voters
    times = sorted(
        (math.inf if v == s.node_id else s.acked_sent.get(v, -math.inf) for v in quorum),
        reverse=True,
    )
    return times[len(quorum) // 2] + s.settings.leader_lease_s


class _Step:
    """One call of :meth:`ElectionMachine.handle`: a private mutable copy of the state,
    the clock reading, the rng, and the actions collected so far."""

    def __init__(self, s: _State, now: float, rng: Rng) -> None:
        self.s = s
        self.now = now
        self.rng = rng
        self.persist_vote = False
        self.records_changed: dict[tuple[str, str, str], Entry] = {}
        self.records_dirty = False
        self.roles: list[RoleChanged] = []
        self.sends: list[Send] = []
        self.results: list[WriteApplied | WriteRefused | WriteOutcomeUnknown] = []

    def actions(self) -> tuple[Action, ...]:
        # Every persist comes first: every send and answer may depend on it.
        out: list[Action] = []
        if self.persist_vote:
            out.append(PersistVote(self.s.term, self.s.voted_for))
        if self.records_dirty:
            out.append(PersistRecords(tuple(self.records_changed.values()), self.s.records.digest))
        out += self.roles
        out += self.sends
        out += self.results
        return tuple(out)

    # -- helpers --------------------------------------------------------------------

    def voters(self) -> VoterSet | None:
        return self.s.records.voter_set()

    def timeout(self) -> float:
        st = self.s.settings
        return self.now + self.rng.uniform(st.election_timeout_min_s, st.election_timeout_max_s)

    def holding(self) -> bool:
        return self.s.role == "leader" or self.now < self.s.hold_until

    def hold(self, asked_s: float) -> None:
        hold_s = max(self.s.settings.election_timeout_min_s, asked_s)
        self.s.hold_until = max(self.s.hold_until, self.now + hold_s)

    def send(self, to: str, message: Message) -> None:
        self.sends.append(Send(to, message))

    def merge(self, entries: Iterable[Entry]) -> None:
        records, won = self.s.records.merge(entries)
        if records is not self.s.records:
            self.s.records = records
            self.records_dirty = True
            for entry in won:
                self.records_changed[entry.key] = entry

    def move(self, cause: Cause, leader: str | None) -> None:
        s = self.s
        previous = s.role
        role = ROLE_TRANSITIONS[previous].get(cause)
        if role is None:  # pragma: no cover - a bug in this module
            raise AssertionError(f"no transition from {previous} on {cause}")
        changed = (role, leader) != (previous, s.leader)
        s.role = role
        s.leader = leader
        if changed or cause in ("started", "higher_term"):
            self.roles.append(RoleChanged(role, previous, s.term, leader, cause))

    def adopt_term(self, term: int, cause: Cause, leader: str | None) -> None:
        s = self.s
        s.term = term
        s.voted_for = None
        self.persist_vote = True
        self.to_follower(cause, leader)

    def to_follower(self, cause: Cause, leader: str | None) -> None:
        s = self.s
        if s.role == "leader":
            for pending in s.pending:
                if pending.request_id is not None:
                    self.results.append(
                        WriteOutcomeUnknown(pending.request_id, pending.entry.write_id, cause)
                    )
            s.pending = ()
            s.next_heartbeat = None
            s.sent_at = {}
        s.prevotes = s.votes = s.asked = frozenset()
        self.move(cause, leader)
        s.election_deadline = self.timeout()

    # -- dispatch -------------------------------------------------------------------

    def run(self, event: Event) -> None:
        s = self.s
        if s.role == "leader" and self.now >= _lease_expiry(s):
            # Check-quorum first: a leader that lost its majority acts on nothing more.
            self.to_follower("lease_lost", None)
        if isinstance(event, Started):
            self.started(event)
        elif isinstance(event, TimerFired):
            self.timer()
        elif isinstance(event, ClientWrite):
            self.client_write(event)
        elif isinstance(event, SettingsChanged):
            check_election_settings(event.settings)
            s.settings = event.settings
        elif isinstance(
            event, (PreVoteRequest, PreVoteAnswer, VoteRequest, VoteAnswer, Heartbeat, HeartbeatAck)
        ):
            if event.sender != s.node_id:
                self.message(event)
        else:
            raise BadRequest(f"not an election event: {type(event).__name__}")

    def message(self, m: Message) -> None:
        if isinstance(m, PreVoteRequest):
            self.on_prevote_request(m)
        elif isinstance(m, PreVoteAnswer):
            self.on_prevote_answer(m)
        elif isinstance(m, VoteRequest):
            self.on_vote_request(m)
        elif isinstance(m, VoteAnswer):
            self.on_vote_answer(m)
        elif isinstance(m, Heartbeat):
            self.on_heartbeat(m)
        else:
            self.on_heartbeat_ack(m)

    # -- start and timers -----------------------------------------------------------

    def started(self, event: Started) -> None:
        s = self.s
        if not isinstance(event.vote, PersistedVote) or not isinstance(event.records, RecordSet):
            raise BadRequest("Started needs a PersistedVote and a RecordSet")
        if event.vote.term < 0:
            raise BadRequest("persisted term must be >= 0", field="term")
        s.term = event.vote.term
        s.voted_for = event.vote.voted_for
        s.records = event.records
        self.move("started", None)
        voters = self.voters()
        if voters is not None and voters.settled and voters.voters == {s.node_id}:
            # A lone voter (settled: no other voter of a previous set can still hold a
            # lease): nobody else can lead, so nobody's lease needs waiting out.
            s.hold_until = self.now
            self.start_prevote()
            return
        # It may have acknowledged a heartbeat or granted a vote just before it stopped:
        # honour that promise as if it was made now.
        self.hold(0.0)
        s.election_deadline = max(s.hold_until, self.timeout())

    def timer(self) -> None:
        s = self.s
        if s.role != "leader":
            if s.election_deadline is not None and self.now >= s.election_deadline:
                self.start_prevote()
            return
        kept: list[PendingWrite] = []
        for pending in s.pending:
            if self.now >= pending.deadline_mono:
                if pending.request_id is not None:
                    self.results.append(
                        WriteOutcomeUnknown(
                            pending.request_id, pending.entry.write_id, "write_timeout"
                        )
                    )
            else:
                kept.append(pending)
        s.pending = tuple(kept)
        self.settle_if_needed()
        if s.next_heartbeat is not None and self.now >= s.next_heartbeat:
            self.broadcast()

    # -- campaigning ----------------------------------------------------------------

    def start_prevote(self) -> None:
        s = self.s
        voters = self.voters()
        if voters is None or s.node_id not in voters.voters:
            # Not a voter (yet, or any more): it never campaigns.
            if s.role in ("precandidate", "candidate"):
                self.to_follower("removed", None)
            s.election_deadline = None
            return
        if self.now < s.hold_until:
            s.election_deadline = s.hold_until
            return
        self.move("election_timeout", None)
        s.prevote_term = s.term + 1
        s.prevotes = frozenset({s.node_id})
        s.votes = s.asked = frozenset()
        s.election_deadline = self.timeout()
        if is_majority(s.prevotes, voters.voters):
            self.start_campaign()
            return
        for peer in sorted(voters.members - {s.node_id}):
            self.send(peer, PreVoteRequest(s.node_id, s.prevote_term))

    def start_campaign(self) -> None:
        s = self.s
        s.term += 1
        s.voted_for = s.node_id
        self.persist_vote = True
        self.move("prevote_won", None)
        s.votes = frozenset({s.node_id})
        s.campaign_sent_at = self.now
        s.acked_sent = {}
        s.known = {}
        s.election_deadline = self.timeout()
        voters = self.voters()
        assert voters is not None
        if is_majority(s.votes, voters.voters):
            self.become_leader()
            return
        s.asked = voters.members - {s.node_id}
        self.ask_votes(s.asked)

    def ask_votes(self, peers: Iterable[str]) -> None:
        s = self.s
        request = VoteRequest(
            s.node_id, s.term, s.records.digest, s.settings.election_timeout_min_s
        )
        for peer in sorted(peers):
            self.send(peer, request)

    def become_leader(self) -> None:
        s = self.s
        voters = self.voters()
        assert voters is not None
        self.move("vote_won", s.node_id)
        s.election_deadline = None
        s.round = 0
        s.sent_at = {0: s.campaign_sent_at}
        s.next_seq = 1
        s.pending = ()
        s.voters_acked = voters.settled
        if self.now >= _lease_expiry(s):
            # The votes came back after a lease would already have ended.
            self.to_follower("lease_lost", None)
            return
        self.settle_if_needed()
        self.broadcast()

    # -- pre-vote and vote ----------------------------------------------------------

    def on_prevote_request(self, m: PreVoteRequest) -> None:
        s = self.s
        voters = self.voters()
        granted = (
            voters is not None
            and m.sender in voters.voters
            and not self.holding()
            and m.term > s.term
        )
        self.send(m.sender, PreVoteAnswer(s.node_id, m.term, granted, s.term))

    def on_prevote_answer(self, m: PreVoteAnswer) -> None:
        s = self.s
        if s.role != "precandidate":
            return
        if not m.granted:
            if m.voter_term > s.term:
                # Our term is behind: catch up, or every later pre-vote is refused too.
                self.adopt_term(m.voter_term, "higher_term", None)
            return
        voters = self.voters()
        if m.term != s.prevote_term or voters is None or m.sender not in voters.voters:
            return
        s.prevotes = s.prevotes | {m.sender}
        if is_majority(s.prevotes, voters.voters):
            self.start_campaign()

    def on_vote_request(self, m: VoteRequest) -> None:
        s = self.s
        voters = self.voters()

        def refuse() -> None:
            self.send(m.sender, VoteAnswer(s.node_id, s.term, False))

        if voters is None or m.sender not in voters.voters:
            return refuse()
        if self.holding():
            # Stickiness: a live leader was heard; do not even look at the term.
            return refuse()
        if m.term < s.term:
            return refuse()
        if m.term > s.term:
            self.adopt_term(m.term, "higher_term", None)
        if s.voted_for not in (None, m.sender):
            return refuse()
        if s.voted_for is None:
            s.voted_for = m.sender
            self.persist_vote = True
        # A granted vote counts toward the candidate's lease: hold like after a heartbeat.
        self.hold(m.hold_s)
        s.election_deadline = max(s.hold_until, self.timeout())
        self.send(
            m.sender,
            VoteAnswer(
                s.node_id,
                s.term,
                True,
                s.records.missing_for(m.digest),
                s.records.digest,
            ),
        )
        return None

    def on_vote_answer(self, m: VoteAnswer) -> None:
        s = self.s
        if m.term > s.term:
            self.adopt_term(m.term, "higher_term", None)
            return
        if m.term != s.term or not m.granted or m.sender in s.votes:
            return
        if s.role == "leader":
            # A late vote: it acknowledges the campaign's request (lease), nothing more.
            # Its records are not needed: the leader merged a majority's already.
            s.votes = s.votes | {m.sender}
            s.acked_sent = {
                **s.acked_sent,
                m.sender: max(s.acked_sent.get(m.sender, -math.inf), s.campaign_sent_at),
            }
            s.known = {**s.known, m.sender: s.known.get(m.sender, EMPTY_DIGEST).union(m.digest)}
            self.apply_done()
            return
        if s.role != "candidate":
            return
        s.votes = s.votes | {m.sender}
        self.merge(m.entries)
        s.known = {**s.known, m.sender: m.digest}
        s.acked_sent = {**s.acked_sent, m.sender: s.campaign_sent_at}
        voters = self.voters()
        if voters is None or s.node_id not in voters.voters:
            self.to_follower("removed", None)
            s.election_deadline = None
            return
        new_peers = voters.members - {s.node_id} - s.asked
        if new_peers:
            # The merged voter set names voters this campaign has not asked yet.
            s.asked = s.asked | new_peers
            self.ask_votes(new_peers)
        if is_majority(s.votes, voters.voters):
            self.become_leader()

    # -- heartbeats -----------------------------------------------------------------

    def on_heartbeat(self, m: Heartbeat) -> None:
        s = self.s
        if m.term < s.term:
            # A deposed leader: tell it our term; store nothing it carries.
            self.send(m.sender, HeartbeatAck(s.node_id, s.term, m.round, False, s.records.digest))
            return
        if m.term > s.term:
            self.adopt_term(m.term, "higher_term", m.sender)
        elif s.role == "leader":  # pragma: no cover - two leaders in one term
            return
        elif s.role != "follower" or s.leader != m.sender:
            self.to_follower("leader_seen", m.sender)
        self.hold(m.hold_s)
        s.election_deadline = max(s.hold_until, self.timeout())
        self.merge(m.entries)
        self.send(m.sender, HeartbeatAck(s.node_id, s.term, m.round, True, s.records.digest))

    def on_heartbeat_ack(self, m: HeartbeatAck) -> None:
        s = self.s
        if m.term > s.term:
            self.adopt_term(m.term, "higher_term", None)
            return
        if s.role != "leader" or m.term != s.term or not m.success:
            return
        sent = s.sent_at.get(m.round)
        if sent is not None and sent > s.acked_sent.get(m.sender, -math.inf):
            s.acked_sent = {**s.acked_sent, m.sender: sent}
        s.known = {**s.known, m.sender: s.known.get(m.sender, EMPTY_DIGEST).union(m.digest)}
        self.apply_done()

    def broadcast(self) -> None:
        """A heartbeat round: to every member, with the entries it has not reported."""
        s = self.s
        voters = self.voters()
        s.round += 1
        oldest = self.now - s.settings.leader_lease_s
        s.sent_at = {r: t for r, t in s.sent_at.items() if t >= oldest} | {s.round: self.now}
        s.next_heartbeat = self.now + s.settings.heartbeat_interval_s
        if voters is None:
            return
        digest = s.records.digest
        for peer in sorted(voters.members - {s.node_id}):
            entries = s.records.missing_for(s.known.get(peer, EMPTY_DIGEST))
            self.send(
                peer,
                Heartbeat(
                    s.node_id,
                    s.term,
                    s.round,
                    digest,
                    entries,
                    s.settings.election_timeout_min_s,
                ),
            )

    # -- writes ---------------------------------------------------------------------

    def client_write(self, event: ClientWrite) -> None:
        s = self.s

        def refuse(code: str, message: str) -> None:
            self.results.append(WriteRefused(event.request_id, code, message, s.leader, s.term))

        if s.role != "leader":
            return refuse("not_leader", f"{s.node_id} is not the leader of term {s.term}")
        item = event.item
        if _is_voters(item) and (
            not s.voters_acked or any(_is_voters(p.entry.item) for p in s.pending)
        ):
            return refuse(
                "voter_change_pending",
                "the previous voter change is not stored by a majority yet; retry",
            )
        try:
            check_proposal(
                s.records,
                item,
                term=s.term,
                now_wall_ms=event.now_wall_ms,
                max_skew_ms=s.settings.max_skew_ms,
            )
        except RefusedError as exc:
            return refuse(exc.code, str(exc))
        self.propose(event.request_id, item)
        self.apply_done()
        if s.role == "leader":
            self.broadcast()
        return None

    def propose(self, request_id: str | None, item: Item) -> None:
        """Store ``item`` here under a new write id and track it until a majority holds it."""
        s = self.s
        write_id = WriteId(s.term, s.next_seq)
        s.next_seq += 1
        entry = Entry(write_id, item)
        self.merge([entry])
        voters = self.voters()
        assert voters is not None
        is_voters = _is_voters(item)
        settled = isinstance(item, ClusterRecord) and item.settled
        # Marking a change settled once the leader saw it stored by both majorities is a
        # fact already true: a majority of the voters is enough (ADR 0011).
        marker_only = is_voters and settled and s.voters_acked
        if is_voters and not settled:
            s.voters_acked = False  # a new change: count both sets until it is stored
        quorums: tuple[frozenset[str], ...] = (voters.voters,)
        if voters.previous and not marker_only and (is_voters or not s.voters_acked):
            quorums += (voters.previous,)
        # A change (or a new leader confirming one) needs every holder to hold everything
        # the leader holds now, so that a majority of the new set holds every write
        # acknowledged before it.
        if is_voters and not marker_only:
            required = s.records.winners_digest()
        else:
            required = Digest([write_id])
        s.pending = (
            *s.pending,
            PendingWrite(
                request_id, entry, required, quorums, self.now + s.settings.write_timeout_s
            ),
        )

    def settle_if_needed(self) -> None:
        """A leader whose voter set is not known to be settled stores it again under its
        own term, marked settled, with a majority of both sets — before any new change."""
        s = self.s
        entry = s.records.cluster_entry("voters")
        if entry is None or any(_is_voters(p.entry.item) for p in s.pending):
            return
        record = entry.item
        assert isinstance(record, ClusterRecord)
        if record.settled:
            return
        self.propose(None, replace(record, term=s.term, settled=True))

    def apply_done(self) -> None:
        """Report every pending write a majority now holds (a voter-set write applied may
        propose the next one, which a lone voter applies at once: loop)."""
        s = self.s
        while s.role == "leader":
            done = [p for p in s.pending if p.is_applied(s.node_id, s.known)]
            if not done:
                return
            s.pending = tuple(p for p in s.pending if p not in done)
            for pending in done:
                if pending.request_id is not None:
                    self.results.append(WriteApplied(pending.request_id, pending.entry.write_id))
            if any(_is_voters(p.entry.item) for p in done):
                self.voter_write_applied()

    def voter_write_applied(self) -> None:
        s = self.s
        voters = self.voters()
        assert voters is not None
        if any(_is_voters(p.entry.item) for p in s.pending):
            return
        s.voters_acked = True
        if s.node_id not in voters.voters:
            # This leader removed itself: the change is stored; hand over.
            self.to_follower("removed", None)
            s.election_deadline = None
            return
        self.settle_if_needed()


def _is_voters(item: Item) -> bool:
    return isinstance(item, ClusterRecord) and item.kind == "voters"


def is_message(event: object) -> bool:
    """Whether ``event`` is a peer message (as opposed to a local event)."""
    return isinstance(
        event, (PreVoteRequest, PreVoteAnswer, VoteRequest, VoteAnswer, Heartbeat, HeartbeatAck)
    )


__all__ = [
    "CAUSES",
    "ROLES",
    "ROLE_TRANSITIONS",
    "Action",
    "Cause",
    "ClientWrite",
    "ElectionMachine",
    "ElectionSettings",
    "Event",
    "Heartbeat",
    "HeartbeatAck",
    "IllegalElectionEvent",
    "Message",
    "PersistRecords",
    "PersistVote",
    "PersistedVote",
    "PreVoteAnswer",
    "PreVoteRequest",
    "Rng",
    "Role",
    "RoleChanged",
    "Send",
    "SettingsChanged",
    "Started",
    "TimerFired",
    "VoteAnswer",
    "VoteRequest",
    "WriteApplied",
    "WriteOutcomeUnknown",
    "WriteRefused",
    "check_election_settings",
    "check_election_settings_change",
    "is_message",
    "lease_outlives_hold_s",
    "message_from_json",
    "message_to_json",
]
