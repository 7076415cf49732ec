"""Identity for Populi: cluster CA, join tokens, node certificates, request signatures.

The modules ``canonical``, ``tokens``, ``signing`` and ``revocation`` are pure: they take
time and randomness as arguments and import no clock, socket or global random. ``keys``
and ``ca`` read and write key files.
"""

from enrollment.errors import EnrollmentError

__all__ = ["EnrollmentError"]
