"""Routing eligibility: may new work be placed on a node, and if not, why not.

One pure function, :func:`routing_eligibility`, used both by placement (on hints) and by
the control plane at grant time (on its own view; safety rule 6: hints never authorize).
It reports every reason that applies, not only the first, in the fixed order of
:data:`REASON_ORDER`: the most lasting cause first, so that the first reason is the one an
operator should act on::

    unknown_node      no lifecycle record (never joined, or deleted)
    retired           certificate revoked
    left              the node left
    quarantined       out of service until an explicit resume
    maintenance       out of service (until a time, or until resumed)
    draining          takes no new work
    cordoned          takes no new work
    heartbeat_never   no heartbeat seen since this process started
    heartbeat_stale   the last heartbeat is older than the stale bound
    unhealthy_gpu     not enough allocatable GPUs, and some GPUs are unhealthy
    no_free_gpu       not enough allocatable GPUs even if the unhealthy ones were healed

Heartbeat staleness is derived, never stored (docs/design.md "Node lifecycle"): the caller keeps
the monotonic time it last heard from a node (never persisted) and asks
:func:`heartbeat_age_ms`; :func:`is_stale` says whether that age is past the bound. The
boundary: an age *equal* to ``stale_after_ms`` is still fresh; one millisecond more is
stale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from populi_peer.core.lifecycle import NodeLifecycle, State, effective
from populi_peer.core.wire import json_record
from populi_peer.errors import BadRequest

REASON_UNKNOWN_NODE: Final = "unknown_node"
REASON_RETIRED: Final = "retired"
REASON_LEFT: Final = "left"
REASON_QUARANTINED: Final = "quarantined"
REASON_MAINTENANCE: Final = "maintenance"
REASON_DRAINING: Final = "draining"
REASON_CORDONED: Final = "cordoned"
REASON_HEARTBEAT_NEVER: Final = "heartbeat_never"
REASON_HEARTBEAT_STALE: Final = "heartbeat_stale"
REASON_UNHEALTHY_GPU: Final = "unhealthy_gpu"
REASON_NO_FREE_GPU: Final = "no_free_gpu"

#: Every reason code, in the order :attr:`Eligibility.reasons` lists them.
REASON_ORDER: Final[tuple[str, ...]] = (
    REASON_UNKNOWN_NODE,
    REASON_RETIRED,
    REASON_LEFT,
    REASON_QUARANTINED,
    REASON_MAINTENANCE,
    REASON_DRAINING,
    REASON_CORDONED,
    REASON_HEARTBEAT_NEVER,
    REASON_HEARTBEAT_STALE,
    REASON_UNHEALTHY_GPU,
    REASON_NO_FREE_GPU,
)
_RANK: Final = {reason: rank for rank, reason in enumerate(REASON_ORDER)}

# The reason each lifecycle state gives; "active" gives none.
_STATE_REASON: Final[dict[State, str]] = {
    "cordoned": REASON_CORDONED,
    "draining": REASON_DRAINING,
    "maintenance": REASON_MAINTENANCE,
    "quarantined": REASON_QUARANTINED,
    "retired": REASON_RETIRED,
    "left": REASON_LEFT,
}


@dataclass(frozen=True, slots=True)
class Eligibility:
    """The verdict: ``eligible`` exactly when ``reasons`` is empty."""

    eligible: bool
    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.reasons, tuple) or any(r not in _RANK for r in self.reasons):
            raise BadRequest(
                f"eligibility: unknown reasons in {self.reasons!r}; "
                f"known: {', '.join(REASON_ORDER)}",
                field="reasons",
            )
        if self.eligible != (not self.reasons):
            raise BadRequest(
                f"eligibility: eligible={self.eligible} contradicts reasons {self.reasons!r}",
                field="eligible",
            )
        if list(self.reasons) != sorted(set(self.reasons), key=_RANK.__getitem__):
            raise BadRequest(
                f"eligibility: reasons {self.reasons!r} are not in REASON_ORDER or repeat",
                field="reasons",
            )

    def to_json(self) -> dict[str, Any]:
        return {"eligible": self.eligible, "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, data: Any) -> Eligibility:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        obj = json_record(data, "eligibility")
        eligible = obj.get("eligible")
        reasons = obj.get("reasons")
        if not isinstance(eligible, bool):
            raise BadRequest("eligibility: field 'eligible' must be true or false")
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise BadRequest("eligibility: field 'reasons' must be a list of strings")
        return cls(eligible=eligible, reasons=tuple(reasons))


def _check_count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer, got {value!r}", field=name)
    return value


def heartbeat_age_ms(last_seen_mono: float | None, now_mono: float) -> int | None:
    """Milliseconds since ``last_seen_mono`` (``None`` if never seen), rounded to nearest.

    Rounding to nearest rather than down keeps float noise out of the boundary: a reading
    5.001 s after the last one is 5001 ms, not 5000. A last-seen time after ``now_mono``
    (which a monotonic clock never gives) counts as age 0.
    """
    if not isinstance(now_mono, (int, float)) or not math.isfinite(now_mono):
        raise BadRequest(f"now_mono must be a finite number, got {now_mono!r}", field="now_mono")
    if last_seen_mono is None:
        return None
    if not isinstance(last_seen_mono, (int, float)) or not math.isfinite(last_seen_mono):
        raise BadRequest(
            f"last_seen_mono must be a finite number, got {last_seen_mono!r}",
            field="last_seen_mono",
        )
    return max(0, math.floor((now_mono - last_seen_mono) * 1000 + 0.5))


def is_stale(age_ms: int | None, stale_after_ms: int) -> bool:
    """Whether a heartbeat of ``age_ms`` is stale: never seen, or strictly older than the bound.

    ``age_ms == stale_after_ms`` is fresh; ``stale_after_ms + 1`` is stale.
    """
    _check_count(stale_after_ms, "stale_after_ms")
    if age_ms is None:
        return True
    return _check_count(age_ms, "heartbeat_age_ms") > stale_after_ms


def routing_eligibility(
    *,
    lifecycle: NodeLifecycle | None,
    heartbeat_age_ms: int | None,
    stale_after_ms: int,
    now_wall_ms: int,
    gpus_wanted: int = 0,
    allocatable_gpus: int = 0,
    unhealthy_gpus: int = 0,
) -> Eligibility:
    """Whether new work wanting ``gpus_wanted`` GPUs may go to a node, with every reason not.

    ``lifecycle`` is read at ``now_wall_ms`` (maintenance past its ``until`` is active).
    ``heartbeat_age_ms`` is ``None`` when no heartbeat was ever seen. ``allocatable_gpus``
    counts verified, healthy GPUs free for this work; ``unhealthy_gpus`` counts GPUs
    excluded for health (the two do not overlap). With ``gpus_wanted=0`` GPUs are not
    looked at.
    """
    _check_count(stale_after_ms, "stale_after_ms")
    gpus_wanted = _check_count(gpus_wanted, "gpus_wanted")
    allocatable_gpus = _check_count(allocatable_gpus, "allocatable_gpus")
    unhealthy_gpus = _check_count(unhealthy_gpus, "unhealthy_gpus")
    reasons: list[str] = []

    if lifecycle is None:
        reasons.append(REASON_UNKNOWN_NODE)
    else:
        state_reason = _STATE_REASON.get(effective(lifecycle, now_wall_ms).state)
        if state_reason is not None:
            reasons.append(state_reason)

    if heartbeat_age_ms is None:
        reasons.append(REASON_HEARTBEAT_NEVER)
    elif is_stale(heartbeat_age_ms, stale_after_ms):
        reasons.append(REASON_HEARTBEAT_STALE)

    if allocatable_gpus < gpus_wanted:
        if unhealthy_gpus > 0:
            reasons.append(REASON_UNHEALTHY_GPU)
        if allocatable_gpus + unhealthy_gpus < gpus_wanted:
            reasons.append(REASON_NO_FREE_GPU)

    ordered = tuple(sorted(reasons, key=_RANK.__getitem__))
    return Eligibility(eligible=not ordered, reasons=ordered)


__all__ = [
    "REASON_CORDONED",
    "REASON_DRAINING",
    "REASON_HEARTBEAT_NEVER",
    "REASON_HEARTBEAT_STALE",
    "REASON_LEFT",
    "REASON_MAINTENANCE",
    "REASON_NO_FREE_GPU",
    "REASON_ORDER",
    "REASON_QUARANTINED",
    "REASON_RETIRED",
    "REASON_UNHEALTHY_GPU",
    "REASON_UNKNOWN_NODE",
    "Eligibility",
    "heartbeat_age_ms",
    "is_stale",
    "routing_eligibility",
]
