"""Records that survive the leader: a record set that merges in any order, its digest, and
the leader's majority-write rule (docs/design.md "Cluster state without a replicated log").

There is no replicated log. What must outlive a leader is a set of *items*, each of which
merges with any other copy of itself by a total order, so a new leader gets one answer
whatever order the majority's copies arrive in:

- **register writes** — one last-writer-wins value per ``(node, attribute)``, exactly
  :class:`~populi_peer.core.registers.RegisterSet` (reused, not copied);
- **set elements** — grow-only sets (:data:`SET_NAMES`): consumed join tokens, revoked
  nodes, revoked certificates, issued and revoked join tokens, released names of revoked
  nodes (``core.cluster_state`` says what each element holds). An element never leaves its set; two copies of one element
  (same set and key) are ordered by their :class:`~populi_peer.core.registers.Stamp`, so
  the write of the newest term wins. ``consumed_tokens`` is *exclusive*: the leader
  refuses a second consumer for a key (:func:`check_proposal`);
- **cluster records** — one per kind (``settings``, ``voters``), ordered by
  ``(term, serial, settled, text)``. ``term`` is the term of the leader that stored the
  record (replication metadata beside the signed ``text``, not inside it): ordering by
  term first makes a record written by a later, properly merged leader beat anything an
  older leader left half-written on a minority, whatever its serial.

Every item travels in an :class:`Entry` that names the write that created it, a
:class:`WriteId` ``(term, seq)`` the leader of ``term`` assigns (``seq`` from 1, one leader
per term, so ids are unique). A :class:`RecordSet` keeps the winning item per key and a
:class:`Digest` of every write id it has *seen* — stored, or merged and beaten — as
ranges per term, which stays small because a leader numbers its writes consecutively. A
peer that sends its digest gets exactly the winners it has not seen
(:meth:`RecordSet.missing_for`); a beaten write is never resent because the receiver's
digest names the winner's id once it has it.

The leader's write rule (:class:`PendingWrite`): a write is applied — acknowledged to its
caller — once the voters whose reported digest covers it form a majority of every quorum
set it names. A voter-set write also requires those voters to hold everything the leader
held when it proposed it (``required`` is the leader's whole winner digest then), so that
a majority of the *new* set holds every write acknowledged before the change. ADR 0011
says why that makes "a new leader merges the records of the majority that elected it"
enough.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, get_args

from populi_peer import PROTOCOL_VERSION
from populi_peer.core.fencing import _bool, _get, _int, _obj, _str, _str_tuple, one_of
from populi_peer.core.hlc import ClockSkewError, check_clock_skew
from populi_peer.core.registers import RegisterSet, RegisterWrite, Stamp
from populi_peer.core.wire import FieldsRecord
from populi_peer.errors import BadRequest, Conflict

SetName = Literal[
    "consumed_tokens",
    "revoked_nodes",
    "revoked_certs",
    "issued_tokens",
    "revoked_tokens",
    "released_names",
]
ClusterKind = Literal["settings", "voters"]

SET_NAMES: Final[tuple[SetName, ...]] = get_args(SetName)
CLUSTER_KINDS: Final[tuple[ClusterKind, ...]] = get_args(ClusterKind)

#: Sets in which a key may be taken by one value only ("checking and adding in one
#: majority write", docs/design.md "Identity": a single-use token is accepted once).
EXCLUSIVE_SETS: Final[frozenset[SetName]] = frozenset({"consumed_tokens"})


class RecordRefused(Conflict):
    """The leader refuses a proposed write; nothing was stored. ``code`` says why:
    ``token_already_consumed``, ``stale_serial``, ``stale_stamp``, ``not_one_voter_change``,
    ``voter_change_pending``, ``clock_skew``."""

    code = "record_refused"


# -- write ids and digests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class WriteId:
    """The write that created an item: the leader's term and its sequence number in it."""

    term: int
    seq: int

    def __post_init__(self) -> None:
        for name in ("term", "seq"):
            value = getattr(self, name)
            if not _nonneg(value):
                raise BadRequest(
                    f"write id: {name} must be a non-negative integer, got {value!r}",
                    code="bad_record",
                    field=name,
                )

    def to_json(self) -> list[int]:
        return [self.term, self.seq]

    @classmethod
    def from_json(cls, data: object) -> WriteId:
        if (
            not isinstance(data, list)
            or len(data) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in data)
        ):
            raise BadRequest(
                f"write id must be [term, seq], got {data!r}", code="bad_record", field="id"
            )
        return cls(data[0], data[1])

    def __str__(self) -> str:
        return f"{self.term}.{self.seq}"


_Ranges = tuple[tuple[int, int], ...]


def _coalesce(ranges: Iterable[tuple[int, int]]) -> _Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def _range_holds(ranges: _Ranges, lo: int, hi: int) -> bool:
    index = bisect_right(ranges, (lo, math.inf)) - 1
    return index >= 0 and ranges[index][0] <= lo and hi <= ranges[index][1]


class Digest:
    """The write ids a replica has seen, as coalesced ``[lo, hi]`` ranges per term.

    Immutable; :meth:`add` and :meth:`union` return new digests. Small in practice: a
    leader numbers its writes 1, 2, 3... in its term, so a replica that saw them all holds
    one range per term.
    """

    __slots__ = ("_ranges",)

    _ranges: Mapping[int, _Ranges]

    def __init__(self, ids: Iterable[WriteId] = ()) -> None:
        by_term: dict[int, list[tuple[int, int]]] = {}
        for wid in ids:
            by_term.setdefault(wid.term, []).append((wid.seq, wid.seq))
        object.__setattr__(
            self, "_ranges", MappingProxyType({t: _coalesce(r) for t, r in by_term.items()})
        )

    @classmethod
    def _of(cls, ranges: Mapping[int, _Ranges]) -> Digest:
        digest = cls()
        object.__setattr__(digest, "_ranges", MappingProxyType(dict(ranges)))
        return digest

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Digest is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return dict(self._ranges) == dict(other._ranges)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._ranges.items())))

    def __len__(self) -> int:
        return sum(hi - lo + 1 for ranges in self._ranges.values() for lo, hi in ranges)

    def __contains__(self, wid: object) -> bool:
        if not isinstance(wid, WriteId):
            return False
        ranges = self._ranges.get(wid.term)
        return ranges is not None and _range_holds(ranges, wid.seq, wid.seq)

    def __repr__(self) -> str:
        parts = [
            f"{t}:" + ",".join(f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in r)
            for t, r in sorted(self._ranges.items())
        ]
        return f"Digest({' '.join(parts)})"

    @property
    def terms(self) -> tuple[int, ...]:
        return tuple(sorted(self._ranges))

    def add(self, ids: Iterable[WriteId]) -> Digest:
        """This digest with ``ids`` added."""
        extra = Digest(ids)
        return self.union(extra) if extra._ranges else self

    def union(self, other: Digest) -> Digest:
        if not other._ranges or other._ranges is self._ranges:
            return self
        if not self._ranges:
            return other
        merged = dict(self._ranges)
        changed = False
        for term, ranges in other._ranges.items():
            mine = merged.get(term)
            if mine is None:
                merged[term] = ranges
                changed = True
            elif not all(_range_holds(mine, lo, hi) for lo, hi in ranges):
                merged[term] = _coalesce(mine + ranges)
                changed = True
        return Digest._of(merged) if changed else self

    def covers(self, other: Digest) -> bool:
        """Whether every id in ``other`` is in this digest."""
        for term, ranges in other._ranges.items():
            mine = self._ranges.get(term)
            if mine is None:
                return False
            if not all(_range_holds(mine, lo, hi) for lo, hi in ranges):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "terms": [
                [term, [[lo, hi] for lo, hi in ranges]]
                for term, ranges in sorted(self._ranges.items())
            ]
        }

    @classmethod
    def from_json(cls, data: object) -> Digest:
        obj = _obj(data, "digest")
        terms = _get(obj, "terms", "digest")
        bad = BadRequest(
            "digest: field 'terms' must be a list of [term, [[lo, hi], ...]] with "
            "non-negative integers and lo <= hi",
            code="bad_record",
            field="terms",
        )
        if not isinstance(terms, list):
            raise bad
        by_term: dict[int, list[tuple[int, int]]] = {}
        for item in terms:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
                raise bad
            term, ranges = item
            if not _nonneg(term):
                raise bad
            for pair in ranges:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise bad
                lo, hi = pair
                if not (_nonneg(lo) and _nonneg(hi)) or lo > hi:
                    raise bad
                by_term.setdefault(term, []).append((lo, hi))
        return cls._of({t: _coalesce(r) for t, r in by_term.items()})


EMPTY_DIGEST: Final = Digest()


def _nonneg(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- items --------------------------------------------------------------------------------


_N = TypeVar("_N", bound=str)


def _known(obj: Mapping[str, Any], key: str, known: tuple[_N, ...], what: str, noun: str) -> _N:
    """``obj[key]``, one of ``known``; an unknown one is a ``bad_record`` naming the ``noun``."""
    value = _str(obj, key, what)
    name = one_of(value, known)
    if name is None:
        raise BadRequest(f"{what}: unknown {noun} {value!r}", code="bad_record")
    return name


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_body(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what}: must be a JSON object", code="bad_record")
    try:
        # A private deep copy, and a check that it is plain JSON without NaN/inf.
        copied: dict[str, Any] = json.loads(_canonical(value))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what}: not plain JSON ({exc})", code="bad_record") from None
    return copied


@dataclass(frozen=True, slots=True)
class SetElement(FieldsRecord):
    """One element of a grow-only set: ``key`` (a token id, node id, certificate serial)
    and what is recorded about it. For ``consumed_tokens`` the ``value`` names the
    consumer and nothing that changes on a retry (no times): a retry by the same joiner
    compares equal and is accepted again, another consumer is refused."""

    set_name: SetName
    key: str
    value: dict[str, Any]
    stamp: Stamp

    def __post_init__(self) -> None:
        if self.set_name not in SET_NAMES:
            raise BadRequest(
                f"set element: unknown set {self.set_name!r}; known: {', '.join(SET_NAMES)}",
                code="bad_record",
                field="set_name",
            )
        if not isinstance(self.key, str) or not self.key:
            raise BadRequest(
                f"set element: key must be a non-empty string, got {self.key!r}",
                code="bad_record",
                field="key",
            )
        if not isinstance(self.stamp, Stamp):
            raise BadRequest("set element: stamp must be a Stamp", code="bad_record")
        object.__setattr__(self, "value", _check_body(self.value, "set element value"))

    @classmethod
    def from_json(cls, data: object) -> SetElement:
        obj = _obj(data, "set element")
        return cls(
            set_name=_known(obj, "set_name", SET_NAMES, "set element", "set"),
            key=_str(obj, "key", "set element"),
            value=_get(obj, "value", "set element"),
            stamp=Stamp.from_json(_get(obj, "stamp", "set element")),
        )


def _set_beats(new: SetElement, old: SetElement) -> bool:
    if new.stamp != old.stamp:
        return new.stamp > old.stamp
    return _canonical(new.to_json()) > _canonical(old.to_json())


@dataclass(frozen=True, slots=True)
class ClusterRecord(FieldsRecord):
    """One cluster record: ``text`` is the signed record (checked by the shell, opaque
    here), ``body`` its parsed content, ``serial`` its serial. ``term`` is the term of the
    leader that stored it and ``settled`` says that a voter-set change is known to be
    stored by a majority of both sets (ADR 0011); both are replication metadata: a leader
    may store the same signed record again under its own term."""

    kind: ClusterKind
    serial: int
    term: int
    body: dict[str, Any]
    text: str
    settled: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CLUSTER_KINDS:
            raise BadRequest(
                f"cluster record: unknown kind {self.kind!r}; known: {', '.join(CLUSTER_KINDS)}",
                code="bad_record",
                field="kind",
            )
        for name in ("serial", "term"):
            if not _nonneg(getattr(self, name)):
                raise BadRequest(
                    f"cluster record: {name} must be a non-negative integer",
                    code="bad_record",
                    field=name,
                )
        if not isinstance(self.text, str):
            raise BadRequest("cluster record: text must be a string", code="bad_record")
        if not isinstance(self.settled, bool):
            raise BadRequest("cluster record: settled must be a boolean", code="bad_record")
        object.__setattr__(self, "body", _check_body(self.body, "cluster record body"))
        if self.kind == "voters":
            VoterSet.from_record(self)  # refuses a malformed voter set

    @property
    def order(self) -> tuple[int, int, bool, str]:
        return (self.term, self.serial, self.settled, self.text)

    @classmethod
    def from_json(cls, data: object) -> ClusterRecord:
        obj = _obj(data, "cluster record")
        return cls(
            kind=_known(obj, "kind", CLUSTER_KINDS, "cluster record", "kind"),
            serial=_int(obj, "serial", "cluster record"),
            term=_int(obj, "term", "cluster record"),
            body=_get(obj, "body", "cluster record"),
            text=_str(obj, "text", "cluster record"),
            settled=_bool(obj, "settled", "cluster record", False),
        )


def _cluster_beats(new: ClusterRecord, old: ClusterRecord) -> bool:
    if new.order != old.order:
        return new.order > old.order
    return _canonical(new.to_json()) > _canonical(old.to_json())


def majority(size: int) -> int:
    """How many of ``size`` voters make a majority (one voter: itself; two: both)."""
    return size // 2 + 1


def is_majority(members: Iterable[str], group: frozenset[str]) -> bool:
    """Whether ``members`` include a majority of ``group`` (an empty group has none)."""
    if not group:
        return False
    return len(group.intersection(members)) >= majority(len(group))


@dataclass(frozen=True, slots=True)
class VoterSet:
    """The voter set as a cluster record states it.

    ``previous`` is the set this one replaced (empty for the first record); a change
    adds or removes exactly one voter. ``settled`` means the change is known to be stored
    by a majority of both sets; until a leader knows that, it counts its lease and its
    writes against a majority of both (ADR 0011).
    """

    voters: frozenset[str]
    previous: frozenset[str]
    serial: int
    term: int
    settled: bool

    @classmethod
    def from_record(cls, record: ClusterRecord) -> VoterSet:
        what = "voter set"
        voters = frozenset(_str_tuple(record.body, "voters", what))
        previous = frozenset(_str_tuple(record.body, "previous", what))
        if not voters or not all(voters):
            raise BadRequest("voter set: 'voters' must name at least one voter", code="bad_record")
        if previous and len(voters ^ previous) != 1:
            raise BadRequest(
                "voter set: a change adds or removes exactly one voter "
                f"(voters {sorted(voters)}, previous {sorted(previous)})",
                code="not_one_voter_change",
            )
        return cls(voters, previous, record.serial, record.term, record.settled)

    @property
    def members(self) -> frozenset[str]:
        """Everyone whose answer may count: the voters and the previous set."""
        return self.voters | self.previous


def voters_body(voters: Iterable[str], previous: Iterable[str]) -> dict[str, Any]:
    """The body of a ``voters`` record (sorted lists)."""
    return {"voters": sorted(set(voters)), "previous": sorted(set(previous))}


Item = RegisterWrite | SetElement | ClusterRecord
#: What an entry's key looks like: ("register", node, attribute), ("set", name, key),
#: ("cluster", kind, "").
EntryKey = tuple[str, str, str]
_K = TypeVar("_K")


def item_key(item: Item) -> EntryKey:
    if isinstance(item, RegisterWrite):
        return ("register", item.node_id, item.attribute)
    if isinstance(item, SetElement):
        return ("set", item.set_name, item.key)
    return ("cluster", item.kind, "")


@dataclass(frozen=True, slots=True)
class Entry:
    """One item and the write that created it."""

    write_id: WriteId
    item: Item

    @property
    def key(self) -> EntryKey:
        return item_key(self.item)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.write_id.to_json()}
        if isinstance(self.item, RegisterWrite):
            data["register"] = self.item.to_json()
        elif isinstance(self.item, SetElement):
            data["set"] = self.item.to_json()
        else:
            data["cluster"] = self.item.to_json()
        return data

    @classmethod
    def from_json(cls, data: object) -> Entry:
        obj = _obj(data, "entry")
        write_id = WriteId.from_json(_get(obj, "id", "entry"))
        item: Item
        if "register" in obj:
            item = RegisterWrite.from_json(obj["register"])
        elif "set" in obj:
            item = SetElement.from_json(obj["set"])
        elif "cluster" in obj:
            item = ClusterRecord.from_json(obj["cluster"])
        else:
            raise BadRequest("entry: needs one of 'register', 'set', 'cluster'", code="bad_record")
        return cls(write_id, item)


def entries_to_json(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [entry.to_json() for entry in entries]


def entries_from_json(data: object, what: str = "entries") -> tuple[Entry, ...]:
    if not isinstance(data, list):
        raise BadRequest(f"{what}: expected a list", code="bad_record", field=what)
    return tuple(Entry.from_json(item) for item in data)


# -- the record set -----------------------------------------------------------------------


def _entry_beats(new: Entry, old: Entry, beats: Any) -> bool:
    """Whether ``new`` replaces ``old`` (same key): the item's own order, and for one item
    stored under two write ids, the greater id."""
    if new.item == old.item:
        return new.write_id > old.write_id
    return bool(beats(new.item, old.item))


def _held(current: Entry | None, item: Item, beats: Any) -> bool:
    """Whether ``current`` (the entry a replica holds under ``item``'s key) is ``item``
    or beats it."""
    return current is not None and (current.item == item or bool(beats(current.item, item)))


def _fold_winners(
    held: Mapping[_K, Entry],
    batch: list[tuple[_K, Entry]],
    beats: Any,
    won: dict[EntryKey, Entry],
) -> Mapping[_K, Entry]:
    """``held`` with each ``(key, entry)`` of ``batch`` in its key's place where it beats
    what is there (:func:`_entry_beats`); each entry that does is also put in ``won``."""
    if not batch:
        return held
    out = dict(held)
    for key, entry in batch:
        current = out.get(key)
        if current is None or _entry_beats(entry, current, beats):
            out[key] = entry
            won[entry.key] = entry
    return MappingProxyType(out)


class RecordSet:
    """One replica of the records that survive the leader. Immutable.

    :meth:`merge` folds entries in (any order, any number of times: the result is the
    same); :meth:`missing_for` answers a peer's digest with the winners it has not seen.
    """

    __slots__ = ("_cluster", "_entries", "_reg_ids", "_registers", "_seen", "_sets")

    _registers: RegisterSet
    _reg_ids: Mapping[tuple[str, str], WriteId]
    _sets: Mapping[tuple[str, str], Entry]
    _cluster: Mapping[str, Entry]
    _seen: Digest
    _entries: tuple[Entry, ...] | None  # computed once, on first use

    def __init__(self) -> None:
        object.__setattr__(self, "_entries", None)
        object.__setattr__(self, "_registers", RegisterSet())
        object.__setattr__(self, "_reg_ids", MappingProxyType({}))
        object.__setattr__(self, "_sets", MappingProxyType({}))
        object.__setattr__(self, "_cluster", MappingProxyType({}))
        object.__setattr__(self, "_seen", EMPTY_DIGEST)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RecordSet is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordSet):
            return NotImplemented
        return self.entries() == other.entries() and self._seen == other._seen

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self._reg_ids) + len(self._sets) + len(self._cluster)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __repr__(self) -> str:
        return f"RecordSet({len(self)} items, seen {len(self._seen)})"

    @classmethod
    def restore(cls, entries: Iterable[Entry], seen: Digest) -> RecordSet:
        """A replica rebuilt from storage: the stored entries and the stored digest."""
        records, _ = cls().merge(entries)
        if not seen.covers(records._seen):
            raise BadRequest("stored digest does not cover the stored entries", code="bad_record")
        return records._replace(seen=seen)

    def _replace(self, **changes: Any) -> RecordSet:
        result = RecordSet.__new__(RecordSet)
        for name in RecordSet.__slots__:
            object.__setattr__(result, name, changes.get(name.lstrip("_"), getattr(self, name)))
        if changes.keys() - {"seen"}:
            object.__setattr__(result, "_entries", None)
        return result

    # -- reading ----------------------------------------------------------------------

    @property
    def digest(self) -> Digest:
        """Every write id this replica has seen (stored or beaten)."""
        return self._seen

    @property
    def registers(self) -> RegisterSet:
        return self._registers

    def entries(self) -> tuple[Entry, ...]:
        """Every winning entry, registers first, then sets, then cluster records."""
        if self._entries is None:
            out = [
                Entry(self._reg_ids[w.key], w)
                for w in self._registers.writes()
                if w.key in self._reg_ids
            ]
            out += [self._sets[k] for k in sorted(self._sets)]
            out += [self._cluster[k] for k in sorted(self._cluster)]
            object.__setattr__(self, "_entries", tuple(out))
        assert self._entries is not None
        return self._entries

    def winners_digest(self) -> Digest:
        """The ids of the winning entries only."""
        return Digest(e.write_id for e in self.entries())

    def set_element(self, set_name: SetName, key: str) -> SetElement | None:
        entry = self._sets.get((set_name, key))
        return None if entry is None else entry.item  # type: ignore[return-value]

    def members(self, set_name: SetName) -> tuple[str, ...]:
        """The keys of one grow-only set, sorted."""
        return tuple(sorted(k for (name, k) in self._sets if name == set_name))

    def cluster_record(self, kind: ClusterKind) -> ClusterRecord | None:
        entry = self._cluster.get(kind)
        return None if entry is None else entry.item  # type: ignore[return-value]

    def cluster_entry(self, kind: ClusterKind) -> Entry | None:
        return self._cluster.get(kind)

    def voter_set(self) -> VoterSet | None:
        record = self.cluster_record("voters")
        return None if record is None else VoterSet.from_record(record)

    def next_serial(self, kind: ClusterKind) -> int:
        """The serial a new record of ``kind`` takes (the current one's + 1)."""
        record = self.cluster_record(kind)
        return 1 if record is None else record.serial + 1

    def covers(self, entry: Entry) -> bool:
        """Whether this replica holds ``entry``'s item or something that beats it."""
        item = entry.item
        if isinstance(item, RegisterWrite):
            return self._registers.merge(RegisterSet([item])) is self._registers
        if isinstance(item, SetElement):
            return _held(self._sets.get((item.set_name, item.key)), item, _set_beats)
        return _held(self._cluster.get(item.kind), item, _cluster_beats)

    def missing_for(self, digest: Digest) -> tuple[Entry, ...]:
        """The winning entries whose write id ``digest`` does not name."""
        return tuple(e for e in self.entries() if e.write_id not in digest)

    # -- merging ----------------------------------------------------------------------

    def merge(self, entries: Iterable[Entry]) -> tuple[RecordSet, tuple[Entry, ...]]:
        """This replica with ``entries`` folded in, and the entries that became winners
        (what the shell must store, with the new :attr:`digest`). Commutative,
        associative, idempotent. Returns ``self`` when nothing changed at all."""
        batch = [e for e in entries if e.write_id not in self._seen]
        if not batch:
            return self, ()
        for entry in batch:
            if not isinstance(entry, Entry):
                raise BadRequest(f"expected an Entry, got {type(entry).__name__}")
        seen = self._seen.add(e.write_id for e in batch)
        won: dict[EntryKey, Entry] = {}

        registers = self._registers
        reg_ids = self._reg_ids
        reg_batch = [(e, e.item) for e in batch if isinstance(e.item, RegisterWrite)]
        if reg_batch:
            incoming = RegisterSet(w for _, w in reg_batch)
            merged = registers.merge(incoming)
            new_ids = (
                dict(reg_ids)
                if merged is registers
                else {k: v for k, v in reg_ids.items() if merged.get(*k) is not None}
            )
            for key in {w.key for _, w in reg_batch}:
                write = merged.get(*key)
                if write is None:  # about a deleted node
                    continue
                # One item stored under two write ids keeps the greater id, so every
                # replica names the same entry.
                old_id = reg_ids.get(key) if registers.get(*key) == write else None
                best = max(
                    (e for e, w in reg_batch if w == write),
                    key=lambda e: e.write_id,
                    default=None,
                )
                if best is None or (old_id is not None and old_id >= best.write_id):
                    continue
                new_ids[key] = best.write_id
                won[best.key] = best
            registers, reg_ids = merged, MappingProxyType(new_ids)

        set_batch: list[tuple[tuple[str, str], Entry]] = [
            ((e.item.set_name, e.item.key), e) for e in batch if isinstance(e.item, SetElement)
        ]
        sets = _fold_winners(self._sets, set_batch, _set_beats, won)
        cluster_batch: list[tuple[str, Entry]] = [
            (e.item.kind, e) for e in batch if isinstance(e.item, ClusterRecord)
        ]
        cluster = _fold_winners(self._cluster, cluster_batch, _cluster_beats, won)

        result = self._replace(
            registers=registers, reg_ids=reg_ids, sets=sets, cluster=cluster, seen=seen
        )
        return result, tuple(won.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "entries": entries_to_json(self.entries()),
            "seen": self._seen.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> RecordSet:
        obj = _obj(data, "record set")
        return cls.restore(
            entries_from_json(_get(obj, "entries", "record set")),
            Digest.from_json(_get(obj, "seen", "record set")),
        )


# -- the leader's side of a write ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A write the leader stored itself and sent out, not yet applied.

    ``required``: what a voter's reported digest must cover for it to count as holding
    the write (its own id; for a voter-set write, the leader's whole winner digest when
    it proposed it). ``quorums``: the voter sets of which a majority must hold it.
    ``request_id`` is ``None`` for the leader's own writes (settling the voter set).
    """

    request_id: str | None
    entry: Entry
    required: Digest
    quorums: tuple[frozenset[str], ...]
    deadline_mono: float

    def holders(self, leader_id: str, known: Mapping[str, Digest]) -> frozenset[str]:
        """The voters known to hold the write: the leader, and every voter whose last
        reported digest covers :attr:`required`."""
        held = {v for v, digest in known.items() if digest.covers(self.required)}
        held.add(leader_id)
        return frozenset(held)

    def is_applied(self, leader_id: str, known: Mapping[str, Digest]) -> bool:
        holders = self.holders(leader_id, known)
        return all(is_majority(holders, quorum) for quorum in self.quorums if quorum)


def check_proposal(
    records: RecordSet,
    item: Item,
    *,
    term: int,
    now_wall_ms: int,
    max_skew_ms: int,
) -> None:
    """Refuse (``RecordRefused`` or ``BadRequest``) a write the leader of ``term`` must not
    store on top of ``records``:

    - a register write stamped with a later term than the leader's, or with a clock value
      beyond ``now_wall_ms + max_skew_ms`` (``clock_skew``);
    - a set element not stamped with the leader's term (``stale_stamp``: an element is
      written under the term of the leader that checked it, so it beats anything an older
      leader left on a minority), or a second consumer of one key of an exclusive set
      (``token_already_consumed``): the leader checks against its merged set, which holds
      every acknowledged consumption, and its own unacknowledged ones;
    - a cluster record not of the leader's term, not the next serial, or ``settled``
      (``stale_serial``, ``stale_stamp``); a voter-set record that is not one change
      from the current set (``not_one_voter_change``) or that comes before the current
      one is settled (``voter_change_pending``).

    The machine checks the rest (who leads, the lease, a pending voter-set write).
    """
    if isinstance(item, RegisterWrite):
        if item.stamp.term > term:
            raise RecordRefused(
                f"register write stamped with term {item.stamp.term}, beyond the leader's "
                f"term {term}",
                code="stale_stamp",
            )
        try:
            check_clock_skew(item.stamp.hlc, now_wall_ms=now_wall_ms, max_skew_ms=max_skew_ms)
        except ClockSkewError as exc:
            raise RecordRefused(str(exc), code="clock_skew") from None
        return
    if isinstance(item, SetElement):
        if item.stamp.term != term:
            raise RecordRefused(
                f"set element stamped with term {item.stamp.term}; the leader's term is {term}",
                code="stale_stamp",
            )
        if item.set_name in EXCLUSIVE_SETS:
            current = records.set_element(item.set_name, item.key)
            if current is not None and current.value != item.value:
                raise RecordRefused(
                    f"{item.key} in {item.set_name} is already taken", code="token_already_consumed"
                )
        return
    if not isinstance(item, ClusterRecord):
        raise BadRequest(f"not a record item: {type(item).__name__}", code="bad_record")
    if item.term != term:
        raise RecordRefused(
            f"cluster record stamped with term {item.term}; the leader's term is {term}",
            code="stale_stamp",
        )
    if item.settled:
        raise RecordRefused("only the leader settles a voter set", code="stale_stamp")
    expected = records.next_serial(item.kind)
    if item.serial != expected:
        raise RecordRefused(
            f"{item.kind} record serial {item.serial}; the next serial is {expected}",
            code="stale_serial",
        )
    if item.kind == "voters":
        new = VoterSet.from_record(item)
        now_set = records.voter_set()
        if now_set is None:
            raise RecordRefused("no voter set to change", code="not_one_voter_change")
        if not now_set.settled:
            raise RecordRefused(
                "the previous voter change is not settled yet", code="voter_change_pending"
            )
        if new.previous != now_set.voters or len(new.voters ^ now_set.voters) != 1:
            raise RecordRefused(
                f"a voter change adds or removes one voter of {sorted(now_set.voters)} "
                f"and names them as 'previous'",
                code="not_one_voter_change",
            )


def bootstrap_voters(voters: Iterable[str], text: str) -> Entry:
    """The first voter-set record of a cluster (``populi init``): settled, serial 1, term
    0, write id ``0.1``. Every initial voter starts from this same entry."""
    record = ClusterRecord(
        kind="voters",
        serial=1,
        term=0,
        body=voters_body(voters, ()),
        text=text,
        settled=True,
    )
    return Entry(WriteId(0, 1), record)


__all__ = [
    "CLUSTER_KINDS",
    "EMPTY_DIGEST",
    "EXCLUSIVE_SETS",
    "SET_NAMES",
    "ClusterKind",
    "ClusterRecord",
    "Digest",
    "Entry",
    "EntryKey",
    "Item",
    "PendingWrite",
    "RecordRefused",
    "RecordSet",
    "SetElement",
    "SetName",
    "VoterSet",
    "WriteId",
    "bootstrap_voters",
    "check_proposal",
    "entries_from_json",
    "entries_to_json",
    "is_majority",
    "item_key",
    "majority",
    "voters_body",
]
