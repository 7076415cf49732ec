"""A node's reports as the tests write them."""

from __future__ import annotations

from populi_peer.core.leases import Lease
from populi_peer.core.reports import ReportedLease, ReportedPhase


def as_reported(lease: Lease, phase: ReportedPhase = "started") -> ReportedLease:
    """``lease`` (the control plane's record of it) as its holder reports it, in ``phase``."""
    return ReportedLease(
        lease_id=lease.lease_id,
        task_id=lease.task_id,
        attempt=lease.attempt,
        work_class=lease.work_class,
        submitter=lease.submitter,
        gpus=lease.gpus,
        token=lease.token,
        ttl_s=lease.ttl_s,
        kind=lease.kind,
        phase=phase,
        granted_wall_ms=lease.granted_wall_ms,
    )


__all__ = ["as_reported"]
