"""Errors of enrollment and peer authentication.

``enrollment`` is standalone: it knows nothing of HTTP, exit codes or the program that
uses it. Each error says what went wrong (``code``, a stable reason string such as
``token_expired``, ``token_already_used``, ``signature_replayed``, ``clock_skew``,
``ca_pin_mismatch``), what it concerns (``details``, JSON-safe keyword values) and whose
fault it is (``kind``, an :class:`ErrorKind`), which is all a caller needs to translate
it into its own terms. Populi translates in one place: ``populi_peer.errors``
(``translate_enrollment`` / ``enrollment_boundary``), which maps each kind to an HTTP
status and an exit code.

    EnrollmentError                       base; .code, .details, .kind (REFUSED)
    ├── TokenError                        a join token is unusable (code says why)
    │   ├── tokens.TokenFieldError        a token field is invalid (BAD_INPUT)
    │   └── tokens.JoinProofError         a join's proofs or recipient do not hold (FORBIDDEN)
    ├── NodeNameError                     a node name is invalid (BAD_INPUT)
    ├── SignatureError                    a request signature is missing or invalid
    │                                     (UNAUTHENTICATED)
    ├── CertificateError                  a certificate, key or chain is wrong or fails the pin
    ├── RevocationError                   a revocation list is malformed or not the cluster's
    │   ├── revocation.RevocationFieldError  an invalid field (BAD_INPUT)
    │   ├── revocation.RevocationConflict    the change is already made (CONFLICT)
    │   └── revocation.RevocationNotFound    the change undoes nothing (NOT_FOUND)
    ├── records.RecordError               a signed cluster record is malformed or forged
    └── hints.HintError                   a signed address hint is malformed or forged
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorKind(enum.StrEnum):
    """Whose fault an error is, and so how a caller answers it. Not a status number:
    the caller owns its protocol (Populi maps these in ``populi_peer.errors``)."""

    #: What was presented does not hold (an expired token, a foreign certificate).
    REFUSED = "refused"
    #: The caller's input is malformed or out of range.
    BAD_INPUT = "bad_input"
    #: The request is not signed by a known key, or the signature does not verify.
    UNAUTHENTICATED = "unauthenticated"
    #: The sender is known but may not do this (a proof that fails, another recipient).
    FORBIDDEN = "forbidden"
    #: The thing to change is not there.
    NOT_FOUND = "not_found"
    #: The change is already made, or contradicts what is recorded.
    CONFLICT = "conflict"


class EnrollmentError(Exception):
    """Base of every enrollment error. ``str(error)`` is one line meant for a person."""

    code: str = "enrollment_error"
    kind: ErrorKind = ErrorKind.REFUSED

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details


class TokenError(EnrollmentError):
    code = "token_invalid"


class NodeNameError(EnrollmentError):
    """A node name that is not one lowercase DNS label (``bad_node_name``)."""

    code = "bad_node_name"
    kind = ErrorKind.BAD_INPUT


class SignatureError(EnrollmentError):
    code = "signature_invalid"
    kind = ErrorKind.UNAUTHENTICATED


class CertificateError(EnrollmentError):
    code = "certificate_invalid"


class RevocationError(EnrollmentError):
    code = "revocation_invalid"


__all__ = [
    "CertificateError",
    "EnrollmentError",
    "ErrorKind",
    "NodeNameError",
    "RevocationError",
    "SignatureError",
    "TokenError",
]
