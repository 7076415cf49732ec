"""Canonical JSON for everything that is signed.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Floats are refused:
signed values carry integers (milliseconds, bytes) so that every party serialises them
identically.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: How an error names the JSON type of a value it got, first match wins (a bool is an int).
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (type(None), "null"),
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (Mapping, "an object"),
)


def json_type(value: object) -> str:
    """The JSON type of ``value`` as an error names it (``"an integer"``); the Python type's
    name for a value JSON has no type for."""
    for cls, name in _JSON_TYPES:
        if isinstance(value, cls):
            return name
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Unsignable:
    """The first part of a value canonical JSON cannot carry, at ``path`` (``.key`` and
    ``[index]`` steps after the caller's root): a ``float`` (signed values carry integers),
    a non-string ``key`` of an object, or a value of another ``type`` (``value`` is the
    float, the key or the value)."""

    kind: Literal["float", "key", "type"]
    path: str
    value: object


def unsignable(value: Any, path: str = "") -> Unsignable | None:
    """What in ``value`` canonical JSON cannot carry (:class:`Unsignable`), or ``None``:
    only ``null``, booleans, integers, strings, lists (or tuples) and string-keyed
    objects, all the way down."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return None
    if isinstance(value, float):
        return Unsignable("float", path, value)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return Unsignable("key", path, key)
            problem = unsignable(item, f"{path}.{key}")
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = unsignable(item, f"{path}[{index}]")
            if problem is not None:
                return problem
        return None
    return Unsignable("type", path, value)


def _check(value: Any) -> None:
    problem = unsignable(value)
    if problem is None:
        return
    where = problem.path or "<root>"
    if problem.kind == "float":
        raise ValueError(f"float at {where} cannot be signed; use an integer")
    if problem.kind == "key":
        raise ValueError(f"non-string key at {where}")
    raise ValueError(f"{type(problem.value).__name__} at {where} is not JSON")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` canonically (sorted keys, compact, UTF-8)."""
    _check(value)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 4648 §5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; raises ``ValueError`` on anything else."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not ASCII")
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    if any(char not in allowed for char in text):
        raise ValueError("not base64url")
    if len(text) % 4 == 1:
        raise ValueError("truncated base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


__all__ = [
    "Unsignable",
    "b64url_decode",
    "b64url_encode",
    "canonical_json",
    "json_type",
    "unsignable",
]
