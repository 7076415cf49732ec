"""The one error tree of Populi.

Every error a user can meet is a :class:`PopuliError`; adapters translate library errors
(httpx, sqlite3, pynvml, cryptography) at the boundary with ``raise ... from exc``. The CLI
prints ``str(error)`` as one line and exits with ``error.exit_code``; the API answers with
``error.http_status`` and ``{"error": {"code": error.code, "message": str(error)}}``.

The tree is split by whose fault it is::

    PopuliError                       base; .code, .exit_code (125), .http_status (500)
    ├── UsageError                    the command line is wrong (exit 2)
    ├── ConfigError                   a config file, variable or flag is wrong (exit 4)
    ├── RefusedError                  a request was refused (exit 4, HTTP 400)
    │   ├── BadRequest                malformed or invalid input (HTTP 400)
    │   ├── PayloadTooLarge           body over the size limit (HTTP 413)
    │   ├── Unauthenticated           no valid signature / unknown signer (HTTP 401)
    │   ├── Forbidden                 signer lacks the role (HTTP 403)
    │   ├── NotFound                  no such node, task, lease... (HTTP 404)
    │   ├── Conflict                  illegal transition, already exists (HTTP 409)
    │   ├── AlreadyRunning            an agent already runs on this data directory
    │   └── RateLimited               too many requests (HTTP 429)
    ├── AgentUnavailable              no agent answers (exit 3, HTTP 503)
    ├── PeerError                     a peer failed or could not be reached (HTTP 502)
    │   └── PeerIdentityError         the TLS peer is not the node the caller meant to
    │                                 reach, or it is revoked (exit 4)
    ├── StoreError                    the data directory or database failed
    │   ├── StorageUnavailable        disk full, I/O error, read-only: retry later (HTTP 503)
    │   ├── DatabaseTooNew            the database was written by a newer Populi
    │   └── NoDataDir                 the data directory holds no node (exit 4)
    └── (domain subtrees in their packages: populi_peer.gpu.errors.ProbeError, ...)

``enrollment`` is a standalone package with its own tree (``enrollment.errors``): each
error there carries a ``code``, ``details`` and a ``kind`` but no HTTP status or exit code.
This module is the one place that translates it (:func:`translate_enrollment`, applied
with :func:`enrollment_boundary` where Populi calls into enrollment, and by the API app
and the CLI for whatever reaches them untranslated). Each kind answers as one branch of
this tree::

    ErrorKind.REFUSED          RefusedError      exit 4, HTTP 400
    ErrorKind.BAD_INPUT        BadRequest        exit 4, HTTP 400
    ErrorKind.UNAUTHENTICATED  Unauthenticated   exit 4, HTTP 401
    ErrorKind.FORBIDDEN        Forbidden         exit 4, HTTP 403
    ErrorKind.NOT_FOUND        NotFound          exit 4, HTTP 404
    ErrorKind.CONFLICT         Conflict          exit 4, HTTP 409

The translated error keeps the code, the message and the details, and stays an instance of
its enrollment class: a ``TokenFieldError`` becomes an error that is both a
``TokenFieldError`` and a ``BadRequest``, so ``except TokenError`` and ``except
BadRequest`` both still catch it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from enrollment.errors import EnrollmentError, ErrorKind


class PopuliError(Exception):
    """Base of every Populi error. ``code`` is a stable machine-readable reason code."""

    code: str = "internal_error"
    exit_code: int = 125
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": one_line(str(self))}
        if self.details:
            body["details"] = self.details
        return body


#: The longest error message an answer carries: messages may quote input (an id, a path),
#: and input is not ours to size.
MAX_MESSAGE_CHARS = 1000


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one bounded line: control characters (a CR LF smuggled into a path, a
    NUL) are shown escaped, and anything past ``limit`` characters is cut with a mark."""
    shown = "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


class UsageError(PopuliError):
    code = "usage"
    exit_code = 2
    http_status = 400


class ConfigError(PopuliError):
    code = "bad_config"
    exit_code = 4
    http_status = 400


class RefusedError(PopuliError):
    code = "refused"
    exit_code = 4
    http_status = 400


class BadRequest(RefusedError):
    code = "bad_request"
    http_status = 400


class PayloadTooLarge(RefusedError):
    code = "payload_too_large"
    http_status = 413


class Unauthenticated(RefusedError):
    code = "unauthenticated"
    http_status = 401


class Forbidden(RefusedError):
    code = "forbidden"
    http_status = 403


class NotFound(RefusedError):
    code = "not_found"
    http_status = 404


class Conflict(RefusedError):
    code = "conflict"
    http_status = 409


class AlreadyRunning(RefusedError):
    """Another agent holds this data directory's lock (``details["pid"]``)."""

    code = "already_running"
    http_status = 409


class RateLimited(RefusedError):
    code = "rate_limited"
    http_status = 429


class AgentUnavailable(PopuliError):
    code = "agent_unavailable"
    exit_code = 3
    http_status = 503


class ServiceUnavailable(PopuliError):
    """A service cannot answer now, for a reason that may clear (the control plane is
    between leaders; a replicated write whose outcome is unknown: ``outcome_unknown``)."""

    code = "service_unavailable"
    http_status = 503


class PeerError(PopuliError):
    code = "peer_error"
    http_status = 502


class PeerIdentityError(PeerError):
    """The node that answered is not the one the caller meant to reach (its certificate
    names another node: ``peer_identity_mismatch``), or the caller's own revocation list
    revokes it (``peer_revoked``). Nothing was sent over that connection but the TLS
    handshake. For a caller's retry logic it is like an unanswered call: the genuine node
    did not answer (docs/adr/0009-peer-identity-of-answers.md)."""

    code = "peer_identity_mismatch"
    exit_code = 4


class StoreError(PopuliError):
    code = "store_error"


class StorageUnavailable(StoreError):
    """A write could not be made durable for a reason outside the request: the disk is
    full, the device failed (I/O error), the database became read-only or stayed locked.
    Nothing was acknowledged; the same write may succeed once the condition clears, so
    callers retry and the API answers 503 ``storage_unavailable``."""

    code = "storage_unavailable"
    http_status = 503


class DatabaseTooNew(StoreError):
    code = "database_too_new"


class NoDataDir(StoreError):
    """The data directory holds no node (bad input: exit 4)."""

    code = "no_data_dir"
    exit_code = 4
    http_status = 400


#: The branch of this tree each kind of enrollment error answers as.
ENROLLMENT_KINDS: Mapping[ErrorKind, type[RefusedError]] = {
    ErrorKind.REFUSED: RefusedError,
    ErrorKind.BAD_INPUT: BadRequest,
    ErrorKind.UNAUTHENTICATED: Unauthenticated,
    ErrorKind.FORBIDDEN: Forbidden,
    ErrorKind.NOT_FOUND: NotFound,
    ErrorKind.CONFLICT: Conflict,
}


_POPULI_CLASSES: dict[tuple[type[EnrollmentError], ErrorKind], type[PopuliError]] = {}


def _populi_class(cls: type[EnrollmentError], kind: ErrorKind) -> type[PopuliError]:
    """``cls`` as a member of this tree: a subclass of both ``cls`` and the branch of
    ``kind``, under the same name. One class per (class, kind), made on first use."""
    found = _POPULI_CLASSES.get((cls, kind))
    if found is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        made = cast(
            "type[PopuliError]", type(cls.__name__, (cls, ENROLLMENT_KINDS[kind]), namespace)
        )
        found = _POPULI_CLASSES.setdefault((cls, kind), made)
    return found


def translate_enrollment(error: EnrollmentError | PopuliError) -> PopuliError:
    """``error`` as a Populi error: same message, code and details (and fields such as
    ``field``), the HTTP status and exit code of its kind. An error that already is one (a
    class of Populi's that is also an enrollment error) is returned as it is."""
    if isinstance(error, PopuliError):
        return error
    cls = _populi_class(type(error), error.kind)
    translated = cls.__new__(cls, *error.args)
    translated.__dict__.update(error.__dict__)
    return translated


@contextmanager
def enrollment_boundary() -> Iterator[None]:
    """Where Populi calls into ``enrollment``: an enrollment error raised inside leaves
    as a Populi error (:func:`translate_enrollment`), so that every ``except PopuliError``
    beyond it handles it as it handles any refusal."""
    try:
        yield
    except EnrollmentError as exc:
        raise translate_enrollment(exc) from exc


__all__ = [
    "ENROLLMENT_KINDS",
    "MAX_MESSAGE_CHARS",
    "AgentUnavailable",
    "AlreadyRunning",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DatabaseTooNew",
    "Forbidden",
    "NoDataDir",
    "NotFound",
    "PayloadTooLarge",
    "PeerError",
    "PeerIdentityError",
    "PopuliError",
    "RateLimited",
    "RefusedError",
    "ServiceUnavailable",
    "StorageUnavailable",
    "StoreError",
    "Unauthenticated",
    "UsageError",
    "enrollment_boundary",
    "one_line",
    "translate_enrollment",
]
