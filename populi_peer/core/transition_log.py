"""What one log line says about one task or lease transition (issue 15: logs a person can
follow).

Every accepted task event (a placement, a refusal, a handoff failure, a fallback, a result)
and every change of a lease's state is logged once, as one JSON line carrying ``task_id``,
``attempt``, ``lease_id``, ``token`` and ``reason``, so that a task's placement, its lease
and its fallback can be joined in the log by ``task_id`` and ``lease_id``. The reason codes
are the ones the task record keeps (:class:`~populi_peer.core.tasks.ReasonEntry`): ``populi
task show`` and the log tell the same story. Pure: the shell logs what these return.
"""

from __future__ import annotations

from typing import Any

from populi_peer.core.leases import Lease
from populi_peer.core.tasks import EventKey, Task

#: The ``event`` of a task transition's log line, and of a lease's.
TASK_TRANSITION = "task transition"
LEASE_TRANSITION = "lease transition"


def task_transition_fields(before: Task, after: Task, key: EventKey) -> dict[str, Any] | None:
    """The fields of the log line for ``before`` -> ``after`` on an event of ``key``;
    ``None`` when the event changed nothing (a late result).

    ``decision`` is the first row the event added to the task's decision log, ``reasons``
    the codes after it, and ``reason`` the first of those (the decision itself when it
    has none). ``attempt``, ``lease_id`` and ``token`` are the current attempt's after the
    event (``None`` before the first)."""
    added = after.reasons[len(before.reasons) :]
    if after is before or not added:
        return None
    decision, *codes = (entry.code for entry in added)
    attempt = after.current_attempt
    return {
        "task_id": after.task_id,
        "transition": key,
        "from_state": before.state,
        "state": after.state,
        "attempt": None if attempt is None else attempt.n,
        "where": None if attempt is None else attempt.where,
        "node": None if attempt is None else attempt.node,
        "lease_id": None if attempt is None else attempt.lease_id,
        "token": None if attempt is None or attempt.token is None else str(attempt.token),
        "decision": decision,
        "reason": codes[0] if codes else decision,
        "reasons": codes,
        "detail": added[0].detail,
    }


def lease_transition_fields(before: Lease | None, after: Lease) -> dict[str, Any] | None:
    """The fields of the log line for a lease record ``after`` the control plane persists
    (``before``: the same lease as its table held it, ``None`` for a new one); ``None``
    when its state did not change. ``reason``: ``granted`` for a new lease, else the
    lease's own reason (an operator's, ``holder_stale``, ``expired``...) or its state."""
    if before is not None and before.state == after.state:
        return None
    if before is None:
        reason = "granted" if after.kind != "fence" else "fenced"
    else:
        reason = after.reason or after.state
    return {
        "task_id": after.task_id,
        "attempt": after.attempt,
        "lease_id": after.lease_id,
        "token": str(after.token),
        "kind": after.kind,
        "from_state": None if before is None else before.state,
        "state": after.state,
        "reason": reason,
        "holder": after.holder,
        "submitter": after.submitter,
        "gpus": list(after.gpus),
        "revoked_by": after.revoked_by,
    }


__all__ = [
    "LEASE_TRANSITION",
    "TASK_TRANSITION",
    "lease_transition_fields",
    "task_transition_fields",
]
