"""Fencing tokens and the worker's book of the highest token per task (safety rule 2).

A lease carries a :class:`FencingToken` ``(term, seq)``: the control plane's term and a
sequence number it never reuses within that term, so tokens are totally ordered and every
token the control plane issues is higher than every token it issued before (a new term
restarts ``seq`` but outranks the whole old term). The string form ``"<term>.<seq>"`` is
what a task sees in ``POPULI_FENCING_TOKEN``; :meth:`FencingToken.parse` accepts nothing
but that canonical form, so one token has exactly one spelling and storage that fences on
it can compare strings it parsed back.

:class:`FenceBook` is the worker's durable view: the highest token it has accepted per
task id. :meth:`FenceBook.check_handoff` answers a handoff:

=========================  ==============  =============================================
token vs highest recorded  verdict         what the worker does
=========================  ==============  =============================================
higher (or none recorded)  ``start``       persist the new book entry, then start
equal                      ``duplicate``   acknowledge; never start a second time
lower                      ``stale``       refuse: a newer attempt exists
=========================  ==============  =============================================

The book is immutable: ``check_handoff`` returns the new book beside the verdict, so the
shell writes the entry durably first and adopts the new book only once the write
succeeded. A failed write leaves the old book in place and a retried handoff starts
normally — had the book been updated in memory first, the retry would be taken for a
duplicate and the task would never run.

:func:`accept_result` is the submitter's side: a result counts only for the current token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from populi_peer.errors import BadRequest

#: What :meth:`FenceBook.check_handoff` answers.
HandoffVerdict = Literal["start", "duplicate", "stale"]

#: Tokens are stored as SQLite INTEGERs: both parts fit a signed 64-bit integer.
TOKEN_PART_MAX: Final = 2**63 - 1

_TOKEN_RE: Final = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")

_C = TypeVar("_C", bound=str)


# -- JSON field helpers shared by the core's records (leases, tasks, policy, placement) --
# One place for the tolerant-but-strict parsing rule: unknown keys are ignored, a known
# key with the wrong type is refused with the field named.


def _bad(what: str, key: str, expected: str, value: object) -> BadRequest:
    return BadRequest(
        f"{what}: field {key!r} must be {expected}, got {type(value).__name__}",
        code="bad_record",
        field=key,
    )


def _obj(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise BadRequest(
            f"{what}: expected a JSON object, got {type(data).__name__}", code="bad_record"
        )
    return data


def _get(data: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in data:
        raise BadRequest(f"{what}: missing field {key!r}", code="bad_record", field=key)
    return data[key]


def _str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = _get(data, key, what)
    if not isinstance(value, str):
        raise _bad(what, key, "a string", value)
    return value


def one_of(value: object, choices: tuple[_C, ...]) -> _C | None:
    """The one of ``choices`` (names: a ``Literal``'s values) that ``value`` is, or ``None``
    for the caller to refuse with its own error."""
    for choice in choices:
        if value == choice:
            return choice
    return None


def _opt_str(data: Mapping[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(what, key, "a string or null", value)
    return value


def _int(data: Mapping[str, Any], key: str, what: str) -> int:
    value = _get(data, key, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(what, key, "an integer", value)
    return value


def _opt_int(data: Mapping[str, Any], key: str, what: str) -> int | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(what, key, "an integer or null", value)
    return value


def _float(data: Mapping[str, Any], key: str, what: str) -> float:
    value = _get(data, key, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(what, key, "a number", value)
    if not math.isfinite(value):
        raise _bad(what, key, "a finite number", value)
    return float(value)


def _opt_float(data: Mapping[str, Any], key: str, what: str) -> float | None:
    if data.get(key) is None:
        return None
    return _float(data, key, what)


def _bool(data: Mapping[str, Any], key: str, what: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _bad(what, key, "true or false", value)
    return value


def _str_tuple(data: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = _get(data, key, what)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(what, key, "a list of strings", value)
    return tuple(value)


# -- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class FencingToken:
    """``(term, seq)``, ordered by term first, then seq (safety rule 2)."""

    term: int
    seq: int

    def __post_init__(self) -> None:
        for name in ("term", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(
                    f"fencing token {name} must be an integer, got {type(value).__name__}",
                    code="bad_fencing_token",
                )
            if not 0 <= value <= TOKEN_PART_MAX:
                raise BadRequest(
                    f"fencing token {name} {value} is outside 0..2^63-1",
                    code="bad_fencing_token",
                )

    def __str__(self) -> str:
        return f"{self.term}.{self.seq}"

    @classmethod
    def parse(cls, text: object) -> FencingToken:
        """Parse the canonical ``"<term>.<seq>"``: ASCII digits, no sign, no leading zero,
        no whitespace. Anything else raises :class:`BadRequest` (``bad_fencing_token``)."""
        if not isinstance(text, str):
            raise BadRequest(
                f"fencing token must be a string, got {type(text).__name__}",
                code="bad_fencing_token",
            )
        match = _TOKEN_RE.fullmatch(text)
        if match is None:
            raise BadRequest(
                f"fencing token {text[:40]!r} is not '<term>.<seq>' (decimal, no leading zeros)",
                code="bad_fencing_token",
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def to_json(self) -> str:
        return str(self)

    @classmethod
    def from_json(cls, data: object) -> FencingToken:
        return cls.parse(data)


def accept_result(current_token: FencingToken | None, result_token: FencingToken | None) -> bool:
    """Whether the submitter accepts a result: only one carrying the current token
    (safety rule 2). With no current token nothing is accepted."""
    return current_token is not None and result_token == current_token


# -- the worker's book --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FenceBook:
    """The highest token a worker has accepted, per task id. Never goes backwards.

    The shell persists one row per task (:meth:`highest` after a ``start``) and rebuilds
    the book with :meth:`from_entries` at start-up.
    """

    _highest: Mapping[str, FencingToken] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, FencingToken]]) -> FenceBook:
        """Rebuild from persisted rows; a task listed twice keeps its highest token."""
        highest: dict[str, FencingToken] = {}
        for task_id, token in entries:
            _check_task_id(task_id)
            if not isinstance(token, FencingToken):
                raise BadRequest(
                    f"fence book entry for task {task_id!r} is not a FencingToken",
                    code="bad_record",
                )
            if task_id not in highest or token > highest[task_id]:
                highest[task_id] = token
        return cls(MappingProxyType(highest))

    def highest(self, task_id: str) -> FencingToken | None:
        return self._highest.get(task_id)

    def entries(self) -> tuple[tuple[str, FencingToken], ...]:
        """Every ``(task_id, highest token)``, sorted by task id."""
        return tuple(sorted(self._highest.items()))

    def __len__(self) -> int:
        return len(self._highest)

    def verdict(self, task_id: str, token: FencingToken) -> HandoffVerdict:
        """What a handoff of ``token`` for ``task_id`` would get; changes nothing."""
        _check_task_id(task_id)
        known = self._highest.get(task_id)
        if known is None or token > known:
            return "start"
        if token == known:
            return "duplicate"
        return "stale"

    def check_handoff(self, task_id: str, token: FencingToken) -> tuple[FenceBook, HandoffVerdict]:
        """Answer a handoff. On ``start`` the returned book records ``token``: persist
        ``(task_id, token)`` durably, then adopt the book, then start the task. On
        ``duplicate`` / ``stale`` the book is returned unchanged."""
        verdict = self.verdict(task_id, token)
        if verdict != "start":
            return self, verdict
        highest = dict(self._highest)
        highest[task_id] = token
        return FenceBook(MappingProxyType(highest)), verdict

    def to_json(self) -> dict[str, Any]:
        return {"highest": {task_id: str(token) for task_id, token in self.entries()}}

    @classmethod
    def from_json(cls, data: object) -> FenceBook:
        obj = _obj(data, "fence book")
        table = _get(obj, "highest", "fence book")
        if not isinstance(table, Mapping):
            raise _bad("fence book", "highest", "an object", table)
        return cls.from_entries(
            (task_id, FencingToken.parse(token)) for task_id, token in table.items()
        )


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest(f"task id must be a non-empty string, got {task_id!r}", code="bad_record")


__all__ = [
    "TOKEN_PART_MAX",
    "FenceBook",
    "FencingToken",
    "HandoffVerdict",
    "accept_result",
    "one_of",
]
