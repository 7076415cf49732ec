"""How a wire body becomes a typed message and back: field codecs and the ``@message`` form.

A message is a frozen dataclass whose fields each name a :class:`Codec` with :func:`wire`.
:meth:`Message.from_json` checks a JSON object once, field by field, and raises
:class:`~populi_peer.errors.BadRequest` naming the field (``field 'control_plane.url' must
be a string, got int``); :meth:`Message.to_json` writes the same shape back. The protocol
rules live here once for every body:

- unknown fields are ignored (version N talks to N-1), so a newer peer's extra field is
  not an error, and :meth:`Message.to_json` writes only the fields the type knows;
- a field with a default may be absent (it reads as the default); a field declared with
  ``omit_none`` is left out of :meth:`Message.to_json` while it is ``None`` (the contract
  says "absent", not ``null``);
- ``v`` (the protocol version) and ``server_time_ms`` are the envelope, added and read by
  the API layer, never message fields.

Records the core already types (a :class:`~populi_peer.core.leases.Lease`, a
:class:`~populi_peer.core.fencing.FencingToken`, a
:class:`~populi_peer.core.registers.RegisterWrite`...) are fields through :class:`Core`,
which calls their own ``from_json``/``to_json``: one parser per record. An error they raise
keeps its class and code (a bad token is still ``bad_fencing_token``, a register write
by the wrong writer still ``writer_not_allowed``), with the field's path put in front.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Literal, TypeVar, dataclass_transform, overload

from enrollment.canonical import json_type
from populi_peer.core.wire import ID_RE
from populi_peer.errors import BadRequest, PopuliError

T = TypeVar("T")
S = TypeVar("S", bound=str)
M = TypeVar("M", bound="Message")
C = TypeVar("C", bound=type)

#: The deepest nesting a free-form JSON object may have (an event's ``detail``, a GPU
#: metrics section): JSON parsers stop far deeper, this keeps recursion short.
MAX_JSON_DEPTH = 32

_MISSING: Any = dataclasses.MISSING


def bad_field(path: str, expected: str, value: object, code: str = "bad_request") -> BadRequest:
    """The one error for a field of the wrong type or range (``bad_request`` unless the
    route has its own reason code for that field, e.g. ``token_bad_field``)."""
    return BadRequest(
        f"field {path!r} must be {expected}, got {json_type(value)}", code=code, field=path
    )


def at_field(exc: PopuliError, path: str) -> PopuliError:
    """``exc`` (raised by a core record's own parser, or by a rule across a message's
    fields) with the field's path in front; its class and code stay, and a field it named
    (relative to the record) is put under ``path``."""
    if path:
        inner = exc.details.get("field")
        exc.args = (f"field {path!r}: {exc}",)
        exc.details["field"] = f"{path}.{inner}" if isinstance(inner, str) and inner else path
    return exc


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _outside(value: float, minimum: float | None, maximum: float | None) -> bool:
    """``value`` is below ``minimum`` or above ``maximum`` (``None``: no bound)."""
    return (minimum is not None and value < minimum) or (maximum is not None and value > maximum)


class Codec(ABC, Generic[T]):
    """Parses one JSON value into ``T`` (:meth:`parse`) and writes it back (:meth:`dump`).
    ``code`` is the reason code of its refusals. Each kind of value says how it parses."""

    code: str = "bad_request"

    @abstractmethod
    def parse(self, value: object, path: str) -> T:
        """``value`` as ``T``, or a :class:`BadRequest` naming ``path``."""

    def dump(self, value: T) -> Any:
        return value


class Int(Codec[int]):
    """An integer (``true`` is not one), optionally within ``minimum..maximum``."""

    def __init__(
        self, minimum: int | None = None, maximum: int | None = None, *, code: str = "bad_request"
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.code = code

    def _expected(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"an integer from {self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"an integer >= {self.minimum}"
        if self.maximum is not None:
            return f"an integer <= {self.maximum}"
        return "an integer"

    def parse(self, value: object, path: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or _outside(value, self.minimum, self.maximum)
        ):
            raise bad_field(path, self._expected(), value, self.code)
        return value


class Num(Codec[float]):
    """A finite number, read as a float; ``above`` is an exclusive lower bound."""

    def __init__(
        self,
        minimum: float | None = None,
        maximum: float | None = None,
        *,
        above: float | None = None,
        code: str = "bad_request",
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.above = above
        self.code = code

    def _expected(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(self, value: object, path: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (self.above is not None and value <= self.above)
            or _outside(value, self.minimum, self.maximum)
        ):
            raise bad_field(path, self._expected(), value, self.code)
        return float(value)


class Bool(Codec[bool]):
    def __init__(self, *, code: str = "bad_request") -> None:
        self.code = code

    def parse(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise bad_field(path, "true or false", value, self.code)
        return value


class Text(Codec[str]):
    """A string of ``min_len..max_len`` characters; ``one_line`` refuses CR and LF;
    ``pattern`` must match the whole string."""

    def __init__(
        self,
        *,
        min_len: int = 0,
        max_len: int | None = None,
        pattern: str | None = None,
        one_line: bool = False,
        what: str | None = None,
        code: str = "bad_request",
    ) -> None:
        self.code = code
        self.min_len = min_len
        self.max_len = max_len
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.one_line = one_line
        self.what = what

    def _expected(self) -> str:
        if self.what is not None:
            return self.what
        if self.min_len and self.max_len is not None:
            size = f" of {self.min_len}-{self.max_len} characters"
        elif self.max_len is not None:
            size = f" of at most {self.max_len} characters"
        elif self.min_len:
            size = (
                " (not empty)" if self.min_len == 1 else f" of at least {self.min_len} characters"
            )
        else:
            size = ""
        return ("one line" if self.one_line else "a string") + size

    def parse(self, value: object, path: str) -> str:
        if (
            not isinstance(value, str)
            or _outside(len(value), self.min_len, self.max_len)
            or (self.one_line and ("\n" in value or "\r" in value))
            or (self.pattern is not None and self.pattern.fullmatch(value) is None)
        ):
            raise bad_field(path, self._expected(), value, self.code)
        return value


class Ident(Codec[str]):
    """A task, lease, node, message or GPU id (:data:`populi_peer.core.wire.ID_RE`: they
    become path components)."""

    def parse(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not ID_RE.match(value):
            raise bad_field(
                path,
                "an id: 1-128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit",
                value,
            )
        return value


class Choice(Codec[S]):
    """One of a closed set of strings (a ``Literal`` type)."""

    def __init__(self, choices: tuple[S, ...], *, code: str = "bad_request") -> None:
        self.choices = choices
        self.code = code

    def parse(self, value: object, path: str) -> S:
        for choice in self.choices:
            if value == choice:
                return choice
        raise bad_field(path, "one of " + ", ".join(self.choices), value, self.code)


class Const(Codec[T]):
    """Exactly ``value`` (``"deleted": true``, ``"status": "ok"``)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def parse(self, value: object, path: str) -> T:
        if type(value) is not type(self.value) or value != self.value:
            raise bad_field(path, json.dumps(self.value), value)
        return self.value


class Nullable(Codec[T | None]):
    """``null`` or what ``inner`` takes."""

    def __init__(self, inner: Codec[T]) -> None:
        self.inner = inner

    def parse(self, value: object, path: str) -> T | None:
        return None if value is None else self.inner.parse(value, path)

    def dump(self, value: T | None) -> Any:
        return None if value is None else self.inner.dump(value)


class Seq(Codec[tuple[T, ...]]):
    """A list of ``item``, read as a tuple."""

    def __init__(
        self,
        item: Codec[T],
        *,
        min_items: int = 0,
        max_items: int | None = None,
        code: str = "bad_request",
    ) -> None:
        self.code = code
        self.item = item
        self.min_items = min_items
        self.max_items = max_items

    def parse(self, value: object, path: str) -> tuple[T, ...]:
        if not isinstance(value, list) or _outside(len(value), self.min_items, self.max_items):
            size = ""
            if self.max_items is not None:
                size = f" of at most {self.max_items} items"
            elif self.min_items:
                size = f" of at least {self.min_items} items"
            raise bad_field(path, "a list" + size, value, self.code)
        return tuple(self.item.parse(item, f"{path}[{index}]") for index, item in enumerate(value))

    def dump(self, value: tuple[T, ...]) -> Any:
        return [self.item.dump(item) for item in value]


class Dict(Codec[Mapping[str, T]]):
    """An object of ``key -> value``, read as a read-only mapping."""

    def __init__(
        self, value: Codec[T], *, max_items: int | None = None, code: str = "bad_request"
    ) -> None:
        self.code = code
        self.value = value
        self.max_items = max_items

    def parse(self, value: object, path: str) -> Mapping[str, T]:
        if not isinstance(value, Mapping) or _outside(len(value), None, self.max_items):
            size = f" of at most {self.max_items} entries" if self.max_items is not None else ""
            raise bad_field(path, "an object" + size, value, self.code)
        out: dict[str, T] = {}
        for key, item in value.items():
            if not isinstance(key, str):  # pragma: no cover - JSON keys are strings
                raise bad_field(path, "an object with string keys", value)
            out[key] = self.value.parse(item, _join(path, key))
        return MappingProxyType(out)

    def dump(self, value: Mapping[str, T]) -> Any:
        return {key: self.value.dump(item) for key, item in value.items()}


def _check_json(value: object, path: str, depth: int) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise bad_field(path, f"JSON nested at most {MAX_JSON_DEPTH} deep", value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad_field(path, "a finite number", value)
        return value
    if isinstance(value, list):
        return [_check_json(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise bad_field(path, "an object with string keys", value)
            out[key] = _check_json(item, _join(path, key), depth + 1)
        return out
    raise bad_field(path, "JSON", value)


class JsonObject(Codec[Mapping[str, Any]]):
    """A free-form JSON object (an event's ``detail``, a GPU metrics section): checked to
    be JSON, copied, and read-only at the top level."""

    def parse(self, value: object, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise bad_field(path, "an object", value)
        checked: dict[str, Any] = _check_json(value, path, 0)
        return MappingProxyType(checked)

    def dump(self, value: Mapping[str, Any]) -> Any:
        return _check_json(value, "", 0)


class Core(Codec[T]):
    """A record the core already types, parsed and written by its own functions
    (``Core(Lease.from_json, Lease.to_json)``)."""

    def __init__(self, parse: Callable[[Any], T], dump: Callable[[T], Any]) -> None:
        self._parse = parse
        self._dump = dump

    def parse(self, value: object, path: str) -> T:
        try:
            return self._parse(value)
        except PopuliError as exc:
            raise at_field(exc, path) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # A record parser that trusted a shape it should have checked: still the
            # caller's bad input, never a crash.
            raise bad_field(path, f"a valid record ({type(exc).__name__}: {exc})", value) from None

    def dump(self, value: T) -> Any:
        return self._dump(value)


class Nested(Codec[M]):
    """Another message, nested as an object."""

    def __init__(self, cls: type[M]) -> None:
        self.cls = cls

    def parse(self, value: object, path: str) -> M:
        return self.cls.parse_at(value, path)

    def dump(self, value: M) -> Any:
        return value.to_json()


# -- messages -----------------------------------------------------------------------------


@overload
def wire(codec: Codec[T], *, omit_none: Literal[True]) -> T | None: ...


@overload
def wire(
    codec: Codec[T],
    *,
    default: T = ...,
    default_factory: Callable[[], T] = ...,
    flatten: bool = False,
) -> T: ...


def wire(
    codec: Codec[Any],
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    omit_none: bool = False,
    flatten: bool = False,
) -> Any:
    """Declare a message field: its codec, its default (a field without one is required;
    ``default_factory`` for a mapping), whether ``None`` is written as an absent key
    (``omit_none``; the default is then ``None``), and whether the codec reads the
    enclosing object itself (``flatten``: a record whose fields sit beside the message's
    own, as a lease's do in a lease view)."""
    if omit_none:
        default = None
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"codec": codec, "omit_none": omit_none, "flatten": flatten},
    )


def _words(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(wire,))
def message(cls: C) -> C:
    """Make ``cls`` (a :class:`Message` subclass) a frozen, keyword-only dataclass whose
    fields are declared with :func:`wire`."""
    made: Any = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
    fields = []
    for field in dataclasses.fields(made):
        if "codec" not in field.metadata:
            raise TypeError(f"{cls.__name__}.{field.name} is not declared with wire()")
        fields.append(field)
    made._fields = tuple(fields)
    if "WHAT" not in cls.__dict__:
        made.WHAT = _words(cls.__name__)
    built: C = made
    return built


class Message:
    """Base of every wire body (see the module docstring)."""

    __slots__ = ()
    #: How errors name the body ("heartbeat answer"); from the class name unless set.
    WHAT: ClassVar[str] = "message"
    _fields: ClassVar[tuple[dataclasses.Field[Any], ...]] = ()

    @classmethod
    def requires_body(cls) -> bool:
        """Whether some field has no default (an empty request body cannot be this)."""
        return any(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in cls._fields
        )

    @classmethod
    def parse_at(cls: type[M], data: object, path: str) -> M:
        """Parse ``data`` found at ``path`` of an enclosing body (``""`` at the top)."""
        if not isinstance(data, Mapping):
            if not path:
                raise BadRequest(
                    f"expected a JSON object, got {json_type(data)}", code="bad_request"
                )
            raise bad_field(path, "an object", data)
        values: dict[str, Any] = {}
        for field in cls._fields:
            where = _join(path, field.name)
            codec: Codec[Any] = field.metadata["codec"]
            if field.metadata["flatten"]:
                values[field.name] = codec.parse(data, path)
            elif field.name in data:
                values[field.name] = codec.parse(data[field.name], where)
            elif (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise BadRequest(f"missing field {where!r}", code=codec.code, field=where)
        try:
            return cls(**values)
        except PopuliError as exc:
            # A rule across fields (a fence holds no GPUs...), checked by __post_init__.
            raise at_field(exc, path) if path else exc from None

    @classmethod
    def from_json(cls: type[M], data: object) -> M:
        """Parse a JSON body, or raise :class:`BadRequest` (or the class a core record's
        parser raised) with one line naming the body and the field."""
        try:
            return cls.parse_at(data, "")
        except PopuliError as exc:
            exc.args = (f"{cls.WHAT}: {exc}",)
            raise

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in self._fields:
            value = getattr(self, field.name)
            if value is None and field.metadata["omit_none"]:
                continue
            codec: Codec[Any] = field.metadata["codec"]
            if field.metadata["flatten"]:
                out.update(codec.dump(value))
            else:
                out[field.name] = codec.dump(value)
        return out


__all__ = [
    "MAX_JSON_DEPTH",
    "Bool",
    "Choice",
    "Codec",
    "Const",
    "Core",
    "Dict",
    "Ident",
    "Int",
    "JsonObject",
    "Message",
    "Nested",
    "Nullable",
    "Num",
    "Seq",
    "Text",
    "at_field",
    "bad_field",
    "message",
    "wire",
]
