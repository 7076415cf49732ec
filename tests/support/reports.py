"""The control plane's lease records and a node's reports of them, as the tests write them."""

from __future__ import annotations

from dataclasses import replace

from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import Lease
from populi_peer.core.reports import ReportedLease, ReportedPhase, grant_terms_of

#: When :func:`sample_lease` is granted (wall clock, ms).
GRANTED_MS = 1_700_000_000_000


def sample_lease(**changes: object) -> Lease:
    """A live remote lease ``l-1`` of task ``t-1``'s first attempt, held by ``n-worker`` on
    one GPU for ``n-submitter`` under token 1.1, granted at :data:`GRANTED_MS`; ``changes``
    replace any of its fields."""
    base = Lease(
        lease_id="l-1",
        task_id="t-1",
        attempt=1,
        work_class="training",
        holder="n-worker",
        submitter="n-submitter",
        gpus=("GPU-1",),
        token=FencingToken(1, 1),
        ttl_s=30.0,
        state="live",
        kind="remote",
        granted_wall_ms=GRANTED_MS,
        state_changed_wall_ms=GRANTED_MS,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def as_reported(lease: Lease, phase: ReportedPhase = "started") -> ReportedLease:
    """``lease`` (the control plane's record of it) as its holder reports it, in ``phase``."""
    return ReportedLease(
        **grant_terms_of(lease), kind=lease.kind, phase=phase, granted_wall_ms=lease.granted_wall_ms
    )


__all__ = ["GRANTED_MS", "as_reported", "sample_lease"]
