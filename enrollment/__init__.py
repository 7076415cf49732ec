"""Identity for Populi: cluster CA, join tokens, node certificates, request signatures.

A standalone package: it imports nothing from ``populi_peer`` and has its own error tree
(:mod:`enrollment.errors`: a ``code``, ``details`` and an :class:`ErrorKind` per error, no
HTTP status or exit code; ``populi_peer.errors`` translates). The modules ``canonical``,
``tokens``, ``signing``, ``revocation``, ``records`` and ``hints`` are pure: they take
time and randomness as arguments and import no clock, socket or global random. ``keys``
and ``ca`` read and write key files.
"""

from enrollment.errors import EnrollmentError, ErrorKind

__all__ = ["EnrollmentError", "ErrorKind"]
