"""Errors of enrollment and peer authentication.

    EnrollmentError (RefusedError)       base: exit 4, HTTP 400
    ├── TokenError                       a join token is unusable (code says why)
    ├── SignatureError (Unauthenticated)  a request signature is missing or invalid (HTTP 401)
    ├── CertificateError                 a certificate or chain is wrong or fails the CA pin
    └── RevocationError                  a revocation list is malformed or not from the cluster

Codes are stable reason strings, e.g. ``token_expired``, ``token_already_used``,
``signature_replayed``, ``clock_skew``, ``ca_pin_mismatch``.
"""

from __future__ import annotations

from populi_peer.errors import RefusedError, Unauthenticated


class EnrollmentError(RefusedError):
    code = "enrollment_error"


class TokenError(EnrollmentError):
    code = "token_invalid"


class SignatureError(EnrollmentError, Unauthenticated):
    code = "signature_invalid"
    http_status = 401


class CertificateError(EnrollmentError):
    code = "certificate_invalid"


class RevocationError(EnrollmentError):
    code = "revocation_invalid"


__all__ = [
    "CertificateError",
    "EnrollmentError",
    "RevocationError",
    "SignatureError",
    "TokenError",
]
