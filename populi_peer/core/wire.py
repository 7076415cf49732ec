"""Checks shared by every route that takes identifiers, counts, commands or environments,
and by the core records that parse their own JSON.

One definition, so that what a submitter accepts is exactly what a worker accepts: a task
refused at the worker for something the submitter let through would only ever fail late.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, cast

from enrollment.canonical import json_type
from populi_peer.errors import BadRequest

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: Task, lease, node, message ids and work classes: a letter or digit first (never ``.``
#: or ``..``: ids become path components), then letters, digits, ``.``, ``_``, ``:``, ``-``.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_ARGS = 4096
MAX_ARG_CHARS = 128 * 1024
MAX_ENV = 256
MAX_ATTEMPT = 1_000_000
#: The longest ``--cwd`` (PATH_MAX on Linux).
MAX_CWD_CHARS = 4096
#: Names Populi sets for every task; nobody may pass them.
RESERVED_ENV = frozenset(
    {"POPULI_TASK_ID", "POPULI_ATTEMPT", "POPULI_FENCING_TOKEN", "CUDA_VISIBLE_DEVICES"}
)


def check_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise BadRequest(
            f"{name!r} must be 1-128 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit",
            code="bad_request",
        )
    return value


def record_json(
    record: DataclassInstance, omit: Iterable[str] = (), *, nulls: bool = False
) -> dict[str, Any]:
    """The JSON object of a record whose wire form is its fields in their order, under
    their names: a tuple as a list, a record (a fencing token, a stamp: anything with a
    ``to_json``) as what its ``to_json`` writes; each of ``omit`` is left out, and so is
    a field that is ``None`` (written as ``null`` with ``nulls``)."""
    body: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name not in omit and (value is not None or nulls):
            body[f.name] = _json_value(value)
    return body


class FieldsRecord:
    """A record (a dataclass) whose wire form is :func:`record_json` of it: its fields in
    their order, ``None`` ones left out."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return record_json(cast("DataclassInstance", self))


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, Mapping):  # a copy: the caller may change what it is given
        return {key: _json_value(item) for key, item in value.items()}
    to_json = getattr(value, "to_json", None)
    return value if to_json is None else to_json()


def json_record(data: object, what: str, fields: Iterable[str] = ()) -> dict[str, Any]:
    """``data`` as the JSON object of a ``what`` record that has each of ``fields`` (others
    are ignored); 400 ``bad_request`` naming the first one missing."""
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object, got {json_type(data)}")
    for name in fields:
        if name not in data:
            raise BadRequest(f"{what}: missing field {name!r}", field=name)
    return data


def check_count(value: object, name: str, minimum: int = 0) -> int:
    """A count or size: an integer from ``minimum`` (``True`` is not one); 400
    ``bad_request`` naming the field ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(
            f"{name} must be an integer >= {minimum}, got {value!r}",
            code="bad_request",
            field=name,
        )
    return value


def check_attempt(value: Any, what: str) -> int:
    """An attempt number: an integer from 1 (``True`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPT:
        raise BadRequest(
            f"{what} 'attempt' must be an integer from 1 to {MAX_ATTEMPT}", code="bad_request"
        )
    return value


def task_attempt(message: Mapping[str, Any], what: str) -> tuple[str, int]:
    """The ``task_id`` and ``attempt`` every inbox message about an attempt carries."""
    return check_id(message.get("task_id"), "task_id"), check_attempt(message.get("attempt"), what)


def check_command(command: Any) -> tuple[str, ...]:
    """An argv: a non-empty list of strings without NUL, the first one non-empty."""
    if (
        not isinstance(command, list)
        or not command
        or len(command) > MAX_ARGS
        or not all(
            isinstance(arg, str) and "\0" not in arg and len(arg) <= MAX_ARG_CHARS
            for arg in command
        )
        or not command[0]
    ):
        raise BadRequest(
            "'command' must be a non-empty list of strings (argv) without NUL bytes",
            code="bad_request",
        )
    return tuple(command)


def check_env(env: Any) -> dict[str, str]:
    """Variables passed to a task: names without ``=`` or NUL, not reserved (no
    ``POPULI_*``, no ``CUDA_VISIBLE_DEVICES``), values without NUL."""
    if not isinstance(env, Mapping) or len(env) > MAX_ENV:
        raise BadRequest(
            f"'env' must be an object of at most {MAX_ENV} strings", code="bad_request"
        )
    out: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise BadRequest("'env' must be an object of strings", code="bad_request")
        if name in RESERVED_ENV or name.startswith("POPULI_"):
            raise BadRequest(f"--env {name}: reserved; Populi sets it for the task", code="bad_env")
        if not name or "=" in name or "\0" in name:
            raise BadRequest(f"--env {name[:64]!r}: not a valid variable name", code="bad_env")
        if "\0" in value:
            raise BadRequest(f"--env {name}: a value cannot contain a NUL byte", code="bad_env")
        out[name] = value
    return out


def check_cwd(value: Any) -> str | None:
    """``--cwd``: where the task runs on the node that runs it; an absolute path without
    NUL (the CLI makes a relative one absolute against the caller's directory). Whether
    it exists is for the node that runs the task to say (``cwd_missing``)."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or "\0" in value
        or len(value) > MAX_CWD_CHARS
    ):
        raise BadRequest(
            f"'cwd' must be an absolute path of at most {MAX_CWD_CHARS} characters without "
            f"NUL, got {str(value)[:64]!r}",
            code="bad_cwd",
        )
    return value


__all__ = [
    "ID_RE",
    "MAX_ARGS",
    "MAX_CWD_CHARS",
    "MAX_ENV",
    "RESERVED_ENV",
    "check_command",
    "check_cwd",
    "check_env",
    "check_id",
]
