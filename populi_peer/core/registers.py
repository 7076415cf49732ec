"""Registers: one last-writer-wins value per (node, attribute) that merges in any order.

the design (docs/design.md) "Cluster state without a replicated log": state that must outlive a leader is kept
in records that merge commutatively, associatively and idempotently, so a new leader can
merge what the majority that elected it holds, in whatever order it arrives. Registers
hold per-node facts: lifecycle, GPU quarantine, addresses, labels.

- Each write carries a :class:`Stamp` ``(term, hlc, writer)``; the register keeps the
  write with the greatest stamp. ``term`` comes first so that a deposed leader's late write
  never beats one accepted under a newer term; the hybrid logical clock orders writes
  within a term close to real time; the writer id breaks the remaining ties.
- Two different writes with the same stamp (a writer that reused a clock value) are
  ordered by their canonical JSON, so every replica still picks the same one.
- Each attribute declares which writer classes may write it (:data:`ATTRIBUTE_WRITERS`);
  a ``self`` write must be stamped by the node it is about.
- A stamp whose clock is beyond ``now + max skew`` is refused on :meth:`RegisterSet.apply`.
- Forgetting a node (lifecycle ``delete``) writes a tombstone: a ``lifecycle`` write whose
  ``value`` is ``None``. A tombstone beats every live lifecycle write whatever the stamps,
  and a deleted node's other registers are dropped and stay dropped: a late write about it
  (from a voter that had not seen the delete) cannot bring it back. Node ids are never
  reused (a re-joining machine gets a new id), so tombstones are final.

Values are JSON objects; floats are refused (exactness: integers in ms or bytes), which
also keeps NaN, which equals nothing, out of a structure whose merge relies on equality.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from enrollment.canonical import unsignable
from populi_peer import PROTOCOL_VERSION
from populi_peer.core.hlc import Hlc, check_clock_skew
from populi_peer.core.lifecycle import WRITER_CLASSES, NodeLifecycle, WriterClass
from populi_peer.core.wire import json_record, record_json
from populi_peer.errors import BadRequest, Forbidden

#: The attribute of the lifecycle register (value: ``NodeLifecycle.to_json()``).
LIFECYCLE: Final = "lifecycle"
#: Prefix of the per-GPU quarantine registers, ``gpu_quarantine/<uuid>``
#: (value: ``{"quarantined": bool, ...}``).
GPU_QUARANTINE_PREFIX: Final = "gpu_quarantine/"
#: The attribute of the node's own addresses.
ADDRESSES: Final = "addresses"
#: The attribute of operator labels (advertised, never verified).
LABELS: Final = "labels"
#: The attribute of a principal's member record (value: the member JSON of
#: ``populi_peer.core.cluster_state``, or ``{"removed": true}``): membership replicated
#: like any register, so a node's record leaves with its lifecycle tombstone.
MEMBER: Final = "member"

#: Declared attributes and the writer classes allowed for each. ``gpu_quarantine/<uuid>``
#: stands for every GPU UUID.
ATTRIBUTE_WRITERS: Final[Mapping[str, frozenset[WriterClass]]] = MappingProxyType(
    {
        LIFECYCLE: frozenset({"operator", "leader", "self"}),
        GPU_QUARANTINE_PREFIX + "<uuid>": frozenset({"self", "operator", "leader"}),
        ADDRESSES: frozenset({"self"}),
        LABELS: frozenset({"operator", "self"}),
        MEMBER: frozenset({"leader", "operator"}),
    }
)

# NVML UUIDs look like "GPU-8f6b2c1e-..." or "MIG-..."; no slash, bounded length.
_GPU_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_empty_str(value: object, name: str, record: str) -> None:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{record}: {name} must be a non-empty string, got {value!r}", field=name)


def attribute_writers(attribute: str) -> frozenset[WriterClass]:
    """The writer classes declared for ``attribute``; ``BadRequest`` if it is undeclared."""
    if isinstance(attribute, str):
        if attribute.startswith(GPU_QUARANTINE_PREFIX):
            if _GPU_UUID.fullmatch(attribute[len(GPU_QUARANTINE_PREFIX) :]):
                return ATTRIBUTE_WRITERS[GPU_QUARANTINE_PREFIX + "<uuid>"]
        elif attribute in ATTRIBUTE_WRITERS:
            return ATTRIBUTE_WRITERS[attribute]
    raise BadRequest(
        f"register attribute {attribute!r} is not declared; "
        f"declared: {', '.join(sorted(ATTRIBUTE_WRITERS))}",
        code="undeclared_attribute",
        attribute=attribute,
    )


def _check_json(value: Any, path: str) -> None:
    """A register value holds only what canonical JSON carries (no floats:
    :func:`enrollment.canonical.unsignable`)."""
    problem = unsignable(value, path)
    if problem is None:
        return
    if problem.kind == "float":
        raise BadRequest(f"register value: float at {problem.path}; use an integer (ms, bytes)")
    if problem.kind == "key":
        raise BadRequest(f"register value: non-string key {problem.value!r} at {problem.path}")
    raise BadRequest(
        f"register value: {type(problem.value).__name__} at {problem.path} is not JSON"
    )


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """The order of register writes: ``(term, hlc, writer)``, compared in that order."""

    term: int
    hlc: Hlc
    writer: str

    def __post_init__(self) -> None:
        if not _is_int(self.term) or self.term < 0:
            raise BadRequest(
                f"stamp: term must be a non-negative integer, got {self.term!r}", field="term"
            )
        if not isinstance(self.hlc, Hlc):
            raise BadRequest(f"stamp: hlc must be an Hlc, got {self.hlc!r}", field="hlc")
        _non_empty_str(self.writer, "writer", "stamp")

    def to_json(self) -> dict[str, Any]:
        return {"term": self.term, "hlc": self.hlc.to_json(), "writer": self.writer}

    @classmethod
    def from_json(cls, data: Any) -> Stamp:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        obj = json_record(data, "stamp", ("term", "hlc", "writer"))
        return cls(term=obj["term"], hlc=Hlc.from_json(obj["hlc"]), writer=obj["writer"])


@dataclass(frozen=True, slots=True)
class RegisterWrite:
    """One write of one register, with who wrote it and why.

    ``value`` is a JSON object, or ``None`` for the lifecycle tombstone (``delete``). It is
    copied on construction; treat it as read-only. Construction refuses an undeclared
    attribute, a writer class not declared for it, a ``self`` write stamped by another
    node, and a value that the attribute does not accept (see :func:`check_write_value`).
    """

    node_id: str
    attribute: str
    value: dict[str, Any] | None
    stamp: Stamp
    writer_class: WriterClass
    actor: str
    reason: str
    at_wall_ms: int

    def __post_init__(self) -> None:
        _non_empty_str(self.node_id, "node_id", "register write")
        writers = attribute_writers(self.attribute)
        if not isinstance(self.stamp, Stamp):
            raise BadRequest(f"register write: stamp must be a Stamp, got {self.stamp!r}")
        if self.writer_class not in WRITER_CLASSES:
            raise BadRequest(
                f"register write: unknown writer class {self.writer_class!r}; "
                f"known: {', '.join(WRITER_CLASSES)}",
                field="writer_class",
            )
        if self.writer_class not in writers:
            raise self._writer_not_allowed(
                f"writer class {self.writer_class!r} may not write register "
                f"{self.attribute!r}; allowed: {', '.join(sorted(writers))}"
            )
        if self.writer_class == "self" and self.stamp.writer != self.node_id:
            raise self._writer_not_allowed(
                f"a self write about node {self.node_id!r} must be stamped by that node, "
                f"not {self.stamp.writer!r}"
            )
        _non_empty_str(self.actor, "actor", "register write")
        if not isinstance(self.reason, str):
            raise BadRequest(
                f"register write: reason must be a string, got {self.reason!r}", field="reason"
            )
        if not _is_int(self.at_wall_ms) or self.at_wall_ms < 0:
            raise BadRequest(
                f"register write: at_wall_ms must be a non-negative integer, "
                f"got {self.at_wall_ms!r}",
                field="at_wall_ms",
            )
        if self.value is not None:
            if not isinstance(self.value, dict):
                raise BadRequest(
                    f"register write: value must be a JSON object, got {type(self.value).__name__}",
                    field="value",
                )
            _check_json(self.value, "value")
            # A private deep copy: the caller's dict may change later; ours may not.
            object.__setattr__(self, "value", json.loads(json.dumps(self.value)))
        check_write_value(self.attribute, self.writer_class, self.value)

    def _writer_not_allowed(self, message: str) -> Forbidden:
        """403 ``writer_not_allowed``: this write's writer may not make it."""
        return Forbidden(
            message,
            code="writer_not_allowed",
            attribute=self.attribute,
            writer_class=self.writer_class,
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.node_id, self.attribute)

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def to_json(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, **record_json(self, nulls=True)}

    @classmethod
    def from_json(cls, data: Any) -> RegisterWrite:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        obj = json_record(
            data,
            "register write",
            (
                "node_id",
                "attribute",
                "value",
                "stamp",
                "writer_class",
                "actor",
                "reason",
                "at_wall_ms",
            ),
        )
        return cls(
            node_id=obj["node_id"],
            attribute=obj["attribute"],
            value=obj["value"],
            stamp=Stamp.from_json(obj["stamp"]),
            writer_class=obj["writer_class"],
            actor=obj["actor"],
            reason=obj["reason"],
            at_wall_ms=obj["at_wall_ms"],
        )

    def _canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def check_write_value(
    attribute: str, writer_class: WriterClass, value: dict[str, Any] | None
) -> None:
    """Refuse a value that ``attribute`` does not accept from ``writer_class``.

    - ``lifecycle``: a :class:`NodeLifecycle` record, or ``None`` (tombstone) from an
      operator or the leader. A node may write only ``left`` about itself: it must not lift
      its own cordon, drain or quarantine.
    - ``gpu_quarantine/<uuid>``: ``{"quarantined": bool, ...}``. A node may quarantine its
      own GPU but not release it: like node quarantine, release is an explicit decision.
    - ``member``: ``{"removed": true}``, or a member record whose ``id`` is the node the
      register is about (checked in full by ``core.cluster_state.member_from_body``).
    - ``addresses``, ``labels``: any JSON object.
    """
    if attribute == LIFECYCLE:
        if value is None:
            if writer_class == "self":
                raise Forbidden(
                    "a node may not delete its own lifecycle record",
                    code="writer_not_allowed",
                    attribute=attribute,
                    writer_class=writer_class,
                )
            return
        record = NodeLifecycle.from_json(value)
        if writer_class == "self" and record.state != "left":
            raise Forbidden(
                f"a node may write only 'left' about its own lifecycle, not {record.state!r}",
                code="writer_not_allowed",
                attribute=attribute,
                writer_class=writer_class,
            )
        return
    if value is None:
        raise BadRequest(
            f"register {attribute!r}: value must be a JSON object (only lifecycle has tombstones)",
            field="value",
        )
    if attribute == MEMBER:
        if value.get("removed") is True:
            return
        if not isinstance(value.get("id"), str) or not isinstance(value.get("public_key"), str):
            raise BadRequest(
                "register 'member': value must be a member record (with 'id' and "
                "'public_key') or {\"removed\": true}",
                field="value",
            )
        return
    if attribute.startswith(GPU_QUARANTINE_PREFIX):
        quarantined = value.get("quarantined")
        if not isinstance(quarantined, bool):
            raise BadRequest(
                f"register {attribute!r}: field 'quarantined' must be true or false, "
                f"got {quarantined!r}",
                field="quarantined",
            )
        if writer_class == "self" and not quarantined:
            raise Forbidden(
                f"a node may not release its own GPU quarantine ({attribute!r}); "
                "an operator or the leader must",
                code="writer_not_allowed",
                attribute=attribute,
                writer_class=writer_class,
            )


def _beats(new: RegisterWrite, old: RegisterWrite) -> bool:
    """Whether ``new`` replaces ``old`` in the same register: a total order, so merge commutes.

    A tombstone beats any live write; then the greater stamp wins; equal stamps fall back
    to the canonical JSON of the whole write.
    """
    if new.is_tombstone != old.is_tombstone:
        return new.is_tombstone
    if new.stamp != old.stamp:
        return new.stamp > old.stamp
    return new._canonical() > old._canonical()


class RegisterSet:
    """An immutable set of registers. :meth:`apply` and :meth:`merge` return a new set.

    Invariant: a node whose lifecycle register is a tombstone has no other register.
    """

    __slots__ = ("_by_key",)

    _by_key: Mapping[tuple[str, str], RegisterWrite]

    def __init__(self, writes: Iterable[RegisterWrite] = ()) -> None:
        """A set holding the winners among ``writes``, merged without the skew check."""
        by_key: dict[tuple[str, str], RegisterWrite] = {}
        for write in writes:
            _insert(by_key, write)
        object.__setattr__(self, "_by_key", MappingProxyType(by_key))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RegisterSet is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegisterSet):
            return NotImplemented
        return dict(self._by_key) == dict(other._by_key)

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[RegisterWrite]:
        return iter(self.writes())

    def __repr__(self) -> str:
        return f"RegisterSet({len(self._by_key)} registers)"

    def writes(self) -> tuple[RegisterWrite, ...]:
        """Every winning write (tombstones included), sorted by (node_id, attribute)."""
        return tuple(self._by_key[key] for key in sorted(self._by_key))

    def get(self, node_id: str, attribute: str) -> RegisterWrite | None:
        """The winning write of one register (a tombstone included), or ``None``."""
        return self._by_key.get((node_id, attribute))

    def value(self, node_id: str, attribute: str) -> dict[str, Any] | None:
        """The value of one register; ``None`` if there is none or the node is deleted."""
        write = self._by_key.get((node_id, attribute))
        return None if write is None else write.value

    def is_deleted(self, node_id: str) -> bool:
        write = self._by_key.get((node_id, LIFECYCLE))
        return write is not None and write.is_tombstone

    def lifecycle(self, node_id: str) -> NodeLifecycle | None:
        """The stored lifecycle record of a node (apply ``effective()`` to read it)."""
        value = self.value(node_id, LIFECYCLE)
        return None if value is None else NodeLifecycle.from_json(value)

    def node_ids(self) -> tuple[str, ...]:
        """Nodes with at least one register, deleted nodes excluded, sorted."""
        nodes = {node for node, _ in self._by_key}
        return tuple(sorted(node for node in nodes if not self.is_deleted(node)))

    def node(self, node_id: str) -> Mapping[str, RegisterWrite]:
        """The winning writes about one node, by attribute (empty for a deleted node)."""
        if self.is_deleted(node_id):
            return MappingProxyType({})
        return MappingProxyType(
            {attr: write for (node, attr), write in self._by_key.items() if node == node_id}
        )

    def apply(
        self, write: RegisterWrite, *, now_wall_ms: int, max_skew_ms: int
    ) -> tuple[RegisterSet, bool]:
        """The set with ``write`` applied, and whether anything changed.

        Raises :class:`~populi_peer.core.hlc.ClockSkewError` if the stamp's clock is beyond
        ``now_wall_ms + max_skew_ms``. A write that loses to the current one (or is already
        there, or is about a deleted node) leaves the set as it is: ``(self, False)``.
        """
        if not isinstance(write, RegisterWrite):
            raise BadRequest(f"expected a RegisterWrite, got {type(write).__name__}")
        check_clock_skew(write.stamp.hlc, now_wall_ms=now_wall_ms, max_skew_ms=max_skew_ms)
        by_key = dict(self._by_key)
        if not _insert(by_key, write):
            return self, False
        return _from_map(by_key), True

    def merge(self, other: RegisterSet) -> RegisterSet:
        """The join of two sets: per register the winning write. Commutative, associative,
        idempotent. No skew check: every write in a set was checked when it was applied.
        """
        by_key = dict(self._by_key)
        changed = False
        for write in other._by_key.values():
            changed |= _insert(by_key, write)
        return _from_map(by_key) if changed else self

    def to_json(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "registers": [w.to_json() for w in self.writes()]}

    @classmethod
    def from_json(cls, data: Any) -> RegisterSet:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        registers = json_record(data, "register set").get("registers")
        if not isinstance(registers, list):
            raise BadRequest("register set: field 'registers' must be a list", field="registers")
        return cls(tuple(RegisterWrite.from_json(item) for item in registers))


def _insert(by_key: dict[tuple[str, str], RegisterWrite], write: RegisterWrite) -> bool:
    """Fold ``write`` into ``by_key`` in place; return whether it changed anything."""
    node_id, attribute = write.key
    if attribute != LIFECYCLE:
        tomb = by_key.get((node_id, LIFECYCLE))
        if tomb is not None and tomb.is_tombstone:
            return False
    current = by_key.get(write.key)
    if current is not None and (current == write or not _beats(write, current)):
        return False
    by_key[write.key] = write
    if write.is_tombstone:
        for key in [k for k in by_key if k[0] == node_id and k[1] != LIFECYCLE]:
            del by_key[key]
    return True


def _from_map(by_key: dict[tuple[str, str], RegisterWrite]) -> RegisterSet:
    result = RegisterSet()
    object.__setattr__(result, "_by_key", MappingProxyType(by_key))
    return result


__all__ = [
    "ADDRESSES",
    "ATTRIBUTE_WRITERS",
    "GPU_QUARANTINE_PREFIX",
    "LABELS",
    "LIFECYCLE",
    "MEMBER",
    "RegisterSet",
    "RegisterWrite",
    "Stamp",
    "WriterClass",
    "attribute_writers",
    "check_write_value",
]
