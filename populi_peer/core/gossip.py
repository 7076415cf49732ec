"""Push-pull gossip of hint records: the records a node holds, and how rounds go. Pure.

Every node holds at most one hint record per node (:mod:`populi_peer.core.hints`), the
highest version it has seen. Each round (every ``round_interval_s``) a node picks
``fanout`` random peers (:func:`plan_round`) and runs one exchange with each, over the
signed HTTP API:

1. A → B: :class:`DigestRequest` — A's digest, node id → version of every record A holds;
2. B → A: :class:`DigestReply` — the records B holds newer than A's digest
   (:meth:`GossipState.answer`), and ``want``: the ids whose records A has newer than B;
3. A merges the records; if B wants some, A → B: :class:`HintPush` with them
   (:meth:`GossipState.push_for`), and B merges.

Why this shape (after hashicorp/memberlist, adapted). memberlist spreads changes by
*gossip* (every 200 ms to 3 random nodes, deltas piggybacked in 1400-byte UDP packets,
the least-retransmitted first, each retransmitted ``4·log10(N+1)`` times) and repairs
what gossip missed by a rare full-state *push/pull* with one node (every 30 s). Here each
node owns one record that replaces its predecessor and the digest of versions is small
(~40 bytes a node), so every exchange can be an anti-entropy exchange: it spreads news
like gossip and repairs like push/pull, with no broadcast queue or retransmit budget to
tune, and a lost message costs nothing but that exchange. Like memberlist, the shell
staggers the first round randomly (:func:`first_round_delay_s`) so that nodes do not
fire in step, and picks peers at random each round.

A message carries at most ``max_message_bytes`` of records; what does not fit waits for a
later round, **oldest-missing first**: records the peer lacks entirely come first, then
those whose copy at the peer is oldest. A record left behind rises in that order until it
is sent, so none starves however small the bound.

Merging (:meth:`GossipState.merge`) verifies each record's signature through the
``verify`` callable (the shell binds it to ``enrollment.hints.verify_hint`` and this
cluster's membership), keeps the highest version per node (an equal version with other
text — a node that signed twice at one clock value — is settled by the larger text, so
that merging is commutative, associative and idempotent), and refuses, one reason code
each, never raising:

==========================  =============================================================
``hint_malformed``          the text or its body does not parse
``hint_bad_signature``      the signature does not verify
``hint_forged``             signed by another node than the one it is about
``hint_unknown_node``       not a member with that key (unknown, revoked or retired)
``hint_node_departed``      the node left or was retired by this node's signed records
``hint_clock_skew``         issued further in the future than the skew budget allows
==========================  =============================================================

Records of nodes that left or were retired are refused *by identity*
(:meth:`GossipState.depart`): merely dropping one would not do, since any peer that
still holds it would push it back in the next exchange. A node that restarts keeps its
node id (it is derived from its key), and its persisted version floor makes its new
record replace the old one everywhere: a restart leaves no ghost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

from populi_peer.core.fencing import _obj
from populi_peer.core.hints import HintRecord, HintView, hint_age_s
from populi_peer.core.hlc import Hlc
from populi_peer.errors import BadRequest, ConfigError, PopuliError

T = TypeVar("T")

#: A digest lists every node a peer holds a record of; more is not a personal mesh.
MAX_DIGEST_ENTRIES: Final = 10_000
#: Bytes a record costs in a message beyond its text (quotes and a comma in JSON).
RECORD_OVERHEAD_BYTES: Final = 3
_MAX_ID_CHARS: Final = 128
#: The request-signature skew budget (docs/design.md: one budget, default ±5 min).
DEFAULT_MAX_SKEW_MS: Final = 300_000

#: Every code :class:`MergeResult` refusals carry, in the table's order.
REFUSAL_CODES: Final[tuple[str, ...]] = (
    "hint_malformed",
    "hint_bad_signature",
    "hint_forged",
    "hint_unknown_node",
    "hint_node_departed",
    "hint_clock_skew",
)

#: Checks a signed hint and returns it parsed; raises a PopuliError with a code otherwise.
Verify = Callable[[str], HintRecord]


class Rng(Protocol):
    """What the planner needs of a random source (``random.Random`` has it)."""

    def random(self) -> float: ...

    def sample(self, population: Sequence[T], k: int) -> list[T]: ...


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """Gossip timing and sizes. The defaults meet the convergence target of issue 15:
    99 % of 100 nodes hold a new hint within 2 s over a lossy network
    (``populi_peer/testing/gossip_sim.py`` measures it)."""

    #: Seconds between two rounds of one node.
    round_interval_s: float = 0.3
    #: Peers contacted per round.
    fanout: int = 3
    #: Records per message, in bytes of signed text; more waits for the next round.
    max_message_bytes: int = 64 * 1024
    #: A record issued further ahead of this node's clock is refused (docs/design.md).
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS

    def __post_init__(self) -> None:
        interval = self.round_interval_s
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not math.isfinite(interval)
            or interval <= 0
        ):
            raise ConfigError(f"gossip round_interval_s must be > 0 seconds, got {interval!r}")
        for name, low in (("fanout", 1), ("max_message_bytes", 1024), ("max_skew_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"gossip {name} must be an integer >= {low}, got {value!r}")


def _check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_CHARS:
        raise BadRequest(
            f"{where}: node ids must be strings of 1-{_MAX_ID_CHARS} chars", code="bad_gossip"
        )
    return value


def _check_records(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise BadRequest(f"{where}: 'records' must be a list of strings", code="bad_gossip")
    return tuple(value)


def _check_ids(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIGEST_ENTRIES:
        raise BadRequest(f"{where}: 'want' must be a list of node ids", code="bad_gossip")
    return tuple(_check_id(v, where) for v in value)


def _check_more(obj: Mapping[str, Any], where: str) -> bool:
    """A page's ``more`` flag (absent: ``False``)."""
    more = obj.get("more", False)
    if not isinstance(more, bool):
        raise BadRequest(f"{where}: 'more' must be true or false", code="bad_gossip")
    return more


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Step 1: the initiator's digest (``{"digest": {node: [wall_ms, counter]}}``)."""

    digest: Mapping[str, Hlc]

    def to_json(self) -> dict[str, Any]:
        return {"digest": {node: [v.wall_ms, v.counter] for node, v in sorted(self.digest.items())}}

    @classmethod
    def from_json(cls, data: object) -> DigestRequest:
        obj = _obj(data, "gossip digest")
        raw = _obj(obj.get("digest"), "gossip digest")
        if len(raw) > MAX_DIGEST_ENTRIES:
            raise BadRequest(
                f"gossip digest: more than {MAX_DIGEST_ENTRIES} entries", code="bad_gossip"
            )
        digest: dict[str, Hlc] = {}
        for node, stamp in raw.items():
            _check_id(node, "gossip digest")
            if not isinstance(stamp, list) or len(stamp) != 2:
                raise BadRequest(
                    "gossip digest: a version is [wall_ms, counter]", code="bad_gossip"
                )
            digest[node] = Hlc(stamp[0], stamp[1])
        return cls(MappingProxyType(digest))


@dataclass(frozen=True, slots=True)
class DigestReply:
    """Step 2: records the initiator lacks, the ids the responder wants, and whether
    records were left for a later round because of the size bound."""

    records: tuple[str, ...]
    want: tuple[str, ...]
    more: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"records": list(self.records), "want": list(self.want), "more": self.more}

    @classmethod
    def from_json(cls, data: object) -> DigestReply:
        obj = _obj(data, "gossip reply")
        more = _check_more(obj, "gossip reply")
        return cls(
            _check_records(obj.get("records", []), "gossip reply"),
            _check_ids(obj.get("want", []), "gossip reply"),
            more,
        )


@dataclass(frozen=True, slots=True)
class HintPush:
    """Step 3: the records the responder asked for."""

    records: tuple[str, ...]
    more: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"records": list(self.records), "more": self.more}

    @classmethod
    def from_json(cls, data: object) -> HintPush:
        obj = _obj(data, "gossip push")
        more = _check_more(obj, "gossip push")
        return cls(_check_records(obj.get("records", []), "gossip push"), more)


@dataclass(frozen=True, slots=True)
class Refusal:
    """One record merge refused: about which node (when known), a code, one line why."""

    node_id: str | None
    code: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node_id, "code": self.code, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge did.

    ``changed``: node ids whose held record is new or newer (in the order merged);
    ``refused``: one entry per refused record; ``stale``: records not newer than the one
    held (the common case in a converged cluster); ``own_newer``: the highest version of a
    record about this node that is newer than the one it publishes — the shell raises its
    version floor above it and republishes (:func:`~populi_peer.core.hints.next_hint_version`).
    """

    changed: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()
    stale: int = 0
    own_newer: Hlc | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Records for one message, within the size bound; ``more``: some were left over."""

    records: tuple[str, ...] = ()
    more: bool = False
    size_bytes: int = 0


def _newer(candidate: HintRecord, held: HintRecord | None) -> bool:
    """The one order of records about a node: version, then text (see the module doc)."""
    if held is None:
        return True
    return (candidate.version, candidate.text) > (held.version, held.text)


class GossipState:
    """The hint records one node holds: at most one per node, the highest version.

    ``self_id`` is this node; its own record is set by :meth:`publish` only. ``departed``
    are the node ids that left or were retired by the signed records this node holds.
    """

    def __init__(
        self,
        self_id: str,
        *,
        departed: Iterable[str] = (),
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    ) -> None:
        self.self_id = _check_id(self_id, "gossip state")
        self.max_skew_ms = max_skew_ms
        self._departed: set[str] = set(departed)
        self._records: dict[str, HintRecord] = {}

    # -- what is held ---------------------------------------------------------------------

    @property
    def records(self) -> Mapping[str, HintRecord]:
        return MappingProxyType(self._records)

    @property
    def departed(self) -> frozenset[str]:
        return frozenset(self._departed)

    def get(self, node_id: str) -> HintRecord | None:
        return self._records.get(node_id)

    def digest(self) -> dict[str, Hlc]:
        """Node id → version of every record held."""
        return {node: record.version for node, record in self._records.items()}

    def digest_request(self) -> DigestRequest:
        return DigestRequest(MappingProxyType(self.digest()))

    def peers(self) -> tuple[str, ...]:
        """Nodes this node holds a hint of, but itself: candidates for :func:`plan_round`
        (with the shell's own list of members and seed addresses)."""
        return tuple(sorted(n for n in self._records if n != self.self_id))

    def hint(self, node_id: str, *, now_wall_ms: int) -> HintView | None:
        """The hint of ``node_id`` and its age, or ``None``. Hints never authorize."""
        record = self._records.get(node_id)
        if record is None:
            return None
        return HintView(record, hint_age_s(record, now_wall_ms))

    def view(self, *, now_wall_ms: int) -> tuple[HintView, ...]:
        """Every held hint with its age, by node id (``populi gpus`` without a control
        plane)."""
        return tuple(
            HintView(self._records[n], hint_age_s(self._records[n], now_wall_ms))
            for n in sorted(self._records)
        )

    # -- changes --------------------------------------------------------------------------

    def publish(self, record: HintRecord) -> None:
        """Hold this node's own new record. Its version must be above the one held:
        stamp it with :func:`~populi_peer.core.hints.next_hint_version`."""
        if record.node_id != self.self_id:
            raise BadRequest(
                f"publish: record is about {record.node_id}, not this node ({self.self_id})",
                code="bad_request",
            )
        held = self._records.get(self.self_id)
        if held is not None and record.version <= held.version:
            raise BadRequest(
                f"publish: version {record.version} is not above {held.version}; stamp "
                "it with next_hint_version",
                code="hint_version_not_newer",
            )
        self._records[self.self_id] = record

    def depart(self, node_ids: Iterable[str]) -> tuple[str, ...]:
        """Refuse from now on every record about ``node_ids`` (they left or were retired)
        and drop the ones held; returns the ids whose record was dropped."""
        dropped = []
        for node in node_ids:
            if node == self.self_id:
                continue  # a node does not refuse itself; it stops gossiping instead
            self._departed.add(node)
            if self._records.pop(node, None) is not None:
                dropped.append(node)
        return tuple(sorted(dropped))

    def merge(self, texts: Iterable[str], *, now_wall_ms: int, verify: Verify) -> MergeResult:
        """Merge signed records received from a peer; never raises for a bad record."""
        changed: list[str] = []
        refused: list[Refusal] = []
        stale = 0
        own_newer: Hlc | None = None
        for text in texts:
            try:
                record = verify(text)
            except PopuliError as exc:
                code = exc.code if exc.code in REFUSAL_CODES else "hint_malformed"
                refused.append(Refusal(None, code, str(exc)[:200]))
                continue
            node = record.node_id
            if node in self._departed:
                refused.append(
                    Refusal(node, "hint_node_departed", f"node {node} left or was retired")
                )
                continue
            ahead_ms = record.issued_ms - now_wall_ms
            if ahead_ms > self.max_skew_ms:
                refused.append(
                    Refusal(
                        node,
                        "hint_clock_skew",
                        f"issued {ahead_ms / 1000:.3f} s ahead of this node's clock",
                    )
                )
                continue
            held = self._records.get(node)
            if node == self.self_id:
                # This node is the authority on itself: a newer record about it (signed by
                # its own key before a restore from backup) raises its floor instead.
                if held is None or record.version > held.version:
                    if own_newer is None or record.version > own_newer:
                        own_newer = record.version
                else:
                    stale += 1
                continue
            if _newer(record, held):
                self._records[node] = record
                if node not in changed:
                    changed.append(node)
            else:
                stale += 1
        return MergeResult(tuple(changed), tuple(refused), stale, own_newer)

    # -- what to send ---------------------------------------------------------------------

    def _batch(self, ordered: Iterable[HintRecord], max_bytes: int) -> Batch:
        chosen: list[str] = []
        used = 0
        more = False
        for record in ordered:
            cost = record.size + RECORD_OVERHEAD_BYTES
            if chosen and used + cost > max_bytes:
                more = True
                continue  # a smaller one further on may still fit
            chosen.append(record.text)
            used += cost
        return Batch(tuple(chosen), more, used)

    def missing(self, their_digest: Mapping[str, Hlc], *, max_bytes: int) -> Batch:
        """Records held newer than ``their_digest`` says they have, oldest-missing first,
        within ``max_bytes`` (always at least one, if any is missing)."""
        lacking: list[tuple[tuple[int, Hlc, str], HintRecord]] = []
        for node, record in self._records.items():
            theirs = their_digest.get(node)
            if theirs is None:
                lacking.append(((0, Hlc(0, 0), node), record))
            elif record.version > theirs:
                lacking.append(((1, theirs, node), record))
        lacking.sort(key=lambda item: item[0])
        return self._batch((record for _, record in lacking), max_bytes)

    def wanted(self, their_digest: Mapping[str, Hlc]) -> tuple[str, ...]:
        """Ids ``their_digest`` shows newer than held (or not held), not departed,
        oldest-missing first: what to ask them for."""
        want: list[tuple[tuple[int, Hlc, str], str]] = []
        for node, theirs in their_digest.items():
            if node in self._departed:
                continue
            held = self._records.get(node)
            if held is None:
                want.append(((0, Hlc(0, 0), node), node))
            elif theirs > held.version:
                want.append(((1, held.version, node), node))
        want.sort(key=lambda item: item[0])
        return tuple(node for _, node in want)

    def answer(self, request: DigestRequest, *, max_bytes: int) -> DigestReply:
        """Step 2: what a responder sends back for ``request``."""
        batch = self.missing(request.digest, max_bytes=max_bytes)
        return DigestReply(batch.records, self.wanted(request.digest), batch.more)

    def push_for(self, reply: DigestReply, *, max_bytes: int) -> HintPush | None:
        """Step 3: the records ``reply`` asks for, in its order, within ``max_bytes``;
        ``None`` when there is nothing to push."""
        held = [self._records[n] for n in dict.fromkeys(reply.want) if n in self._records]
        if not held:
            return None
        batch = self._batch(held, max_bytes)
        return HintPush(batch.records, batch.more)


def plan_round(
    peers: Iterable[str],
    *,
    self_id: str,
    fanout: int,
    rng: Rng,
    exclude: Iterable[str] = (),
) -> tuple[str, ...]:
    """``fanout`` distinct random peers for this round (fewer if fewer are known), never
    this node nor ``exclude`` (departed nodes, say). Deterministic given ``rng``'s state:
    the pool is sorted before sampling."""
    if isinstance(fanout, bool) or not isinstance(fanout, int) or fanout < 0:
        raise BadRequest(f"fanout must be an integer >= 0, got {fanout!r}")
    skip = set(exclude)
    skip.add(self_id)
    pool = sorted({p for p in peers if p not in skip})
    return tuple(rng.sample(pool, min(fanout, len(pool))))


def first_round_delay_s(round_interval_s: float, rng: Rng) -> float:
    """A random delay in ``[0, round_interval_s)`` before a node's first round, so that
    nodes started together do not gossip in step (memberlist's stagger)."""
    return rng.random() * round_interval_s


__all__ = [
    "MAX_DIGEST_ENTRIES",
    "REFUSAL_CODES",
    "Batch",
    "DigestReply",
    "DigestRequest",
    "GossipSettings",
    "GossipState",
    "HintPush",
    "MergeResult",
    "Refusal",
    "Rng",
    "Verify",
    "first_round_delay_s",
    "plan_round",
]
