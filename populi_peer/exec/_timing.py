"""When a supervisor stops a task: the one timeline of the real supervisor
(:mod:`populi_peer.exec.supervisor`) and of the simulated one (:mod:`populi_peer.testing.sim`).

Pure functions of numbers: every time is seconds on the worker's boot clock
(``CLOCK_BOOTTIME``), the clock the lease deadline is written in (the worker computes it
with :func:`populi_peer.core.leases.worker_deadline_boot`)::

    the stop begins (SIGTERM)  at deadline - stop_margin_s   (earlier on cancel or exit)
    SIGKILL                    kill_grace_s after SIGTERM, never later than it would have
                               come on time: deadline - stop_margin_s + kill_grace_s
    the task is gone           by SIGKILL + kill_latency_s

Safety rule 3 asks that the task be gone before the control plane can consider its lease
dead: ``stop_margin_s`` must cover the grace, the kill latency and the clock drift over
one TTL (:func:`populi_peer.core.leases.validate_stop_margin` checks the configuration),
so that ``gone_by <= deadline - drift`` for any stop that begins on time or late.

This module imports nothing: the supervisor process starts in a few tens of milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def stop_at(deadline_boot: float | None, stop_margin_s: float) -> float:
    """When the stop must begin: ``deadline - stop_margin_s``. A missing (or garbled)
    deadline counts as expired: ``-inf``, at once."""
    if deadline_boot is None or not math.isfinite(deadline_boot):
        return -math.inf
    return deadline_boot - stop_margin_s


def may_start(now_boot: float, deadline_boot: float | None, stop_margin_s: float) -> bool:
    """Safety rule 3 before the start: never start what the lease no longer covers."""
    return now_boot < stop_at(deadline_boot, stop_margin_s)


@dataclass(frozen=True, slots=True)
class StopPlan:
    """One stop of a task, on the boot clock."""

    #: SIGTERM to the whole task: the stop begins.
    term_at: float
    #: SIGKILL to whatever of the task is left (repeated until nothing is).
    kill_at: float
    #: The last process of the task is gone, at the latest.
    gone_by: float

    def ended(self, exits_after_term_s: float) -> tuple[float, bool]:
        """For a task that exits ``exits_after_term_s`` after SIGTERM: when it is gone
        and whether SIGKILL ended it (it took longer than the grace)."""
        exits_at = self.term_at + exits_after_term_s
        if exits_at <= self.kill_at:
            return exits_at, False
        return self.gone_by, True


def plan_stop(
    now_boot: float,
    deadline_boot: float | None,
    *,
    stop_margin_s: float,
    kill_grace_s: float,
    kill_latency_s: float = 0.0,
) -> StopPlan:
    """The stop that begins at ``now_boot``. A late stop (the machine was suspended, or
    the supervisor starved past ``deadline - stop_margin_s``) gets only what is left of
    the grace: SIGKILL never comes later than it would have on time, and at once when
    that is already past."""
    kill_at = now_boot + kill_grace_s
    if deadline_boot is not None and math.isfinite(deadline_boot):
        kill_at = min(kill_at, stop_at(deadline_boot, stop_margin_s) + kill_grace_s)
    kill_at = max(kill_at, now_boot)
    return StopPlan(term_at=now_boot, kill_at=kill_at, gone_by=kill_at + kill_latency_s)


__all__ = ["StopPlan", "may_start", "plan_stop", "stop_at"]
