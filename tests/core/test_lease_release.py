"""A holder's release of its lease (``LeaseTable.release``): the reason the ended lease
carries, which a submitter reading the lease learns before any result."""

from __future__ import annotations

import pytest

from populi_peer.core.leases import GrantRequest, LeaseSettings, LeaseTable, TargetView
from populi_peer.core.messages import LeaseReleaseRequest
from populi_peer.errors import BadRequest

GPU = "GPU-1"


def granted() -> tuple[LeaseTable, str]:
    table = LeaseTable.new(
        LeaseSettings(max_lease_ttl_s=30.0, expiry_margin_s=5.0, leader_lease_s=10.0)
    )
    request = GrantRequest(
        task_id="t-1",
        attempt=1,
        work_class="training",
        target="w",
        gpus_wanted=1,
        ttl_s=30.0,
        submitter="s",
    )
    table, change = table.grant(
        request,
        target=TargetView("w", eligible=True, allocatable_gpus=(GPU,)),
        lease_id="l-1",
        now_mono=100.0,
        now_wall_ms=0,
    )
    return table, change.lease.lease_id


@pytest.mark.parametrize(
    ("outcome", "why", "state", "reason"),
    [
        ("stopped", None, "released", "released"),
        ("stopped", "worker_left", "released", "worker_left"),
        ("completed", "worker_left", "completed", "completed"),  # it finished: no stop
    ],
)
def test_a_release_says_why(outcome: str, why: str | None, state: str, reason: str) -> None:
    table, lease_id = granted()
    table, change = table.release(
        lease_id,
        "w",
        outcome=outcome,
        now_mono=1.0,
        now_wall_ms=1000,
        why=why,  # type: ignore[arg-type]
    )
    assert (change.lease.state, change.lease.reason) == (state, reason)
    assert table.busy_gpus() == frozenset()


def test_a_revoking_lease_keeps_the_revocation_as_its_reason() -> None:
    table, lease_id = granted()
    table, _ = table.revoke(
        lease_id, actor="op", reason="operator", now_mono=101.0, now_wall_ms=1000
    )
    _, change = table.release(
        lease_id, "w", outcome="stopped", now_mono=102.0, now_wall_ms=2000, why="worker_left"
    )
    assert (change.lease.state, change.lease.reason) == ("revoked", "operator")


def test_the_wire_takes_only_a_known_reason() -> None:
    assert LeaseReleaseRequest.from_json({"outcome": "stopped"}).reason is None
    body = LeaseReleaseRequest(outcome="stopped", reason="worker_left").to_json()
    assert body == {"outcome": "stopped", "reason": "worker_left"}
    with pytest.raises(BadRequest) as refused:
        LeaseReleaseRequest.from_json({"outcome": "stopped", "reason": "tired"})
    assert "reason" in str(refused.value)
