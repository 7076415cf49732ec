"""Leases persist as the core's own records, written with the token counter."""

from __future__ import annotations

import pytest

from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import Lease
from populi_peer.store import Store
from populi_peer.store.leases import Leases
from support.reports import sample_lease

T0 = 1_700_000_000_000


def lease(lease_id: str, task_id: str, seq: int, **changes: object) -> Lease:
    return sample_lease(lease_id=lease_id, task_id=task_id, token=FencingToken(1, seq), **changes)


def test_leases_read_back_as_the_core_records(store: Store) -> None:
    leases = Leases(store)
    first, second = lease("l-1", "t-1", 1), lease("l-2", "t-2", 2, attempt=2)
    leases.save([first, second], next_seq=3, now_ms=T0)
    assert sorted(leases.all(), key=lambda x: x.lease_id) == [first, second]
    assert leases.of_task("t-2") == [second]
    assert leases.get("l-1") == first
    assert leases.get("l-9") is None and leases.of_task("t-9") == []


def test_a_saved_lease_replaces_its_row_and_the_counter_moves(store: Store) -> None:
    leases = Leases(store)
    assert leases.next_seq() == 1
    leases.save([lease("l-1", "t-1", 1)], next_seq=2, now_ms=T0)
    released = lease(
        "l-1", "t-1", 1, state="released", reason="released", state_changed_wall_ms=T0 + 5
    )
    leases.save([released], next_seq=2, now_ms=T0 + 5)
    assert leases.all() == [released]
    assert leases.next_seq() == 2
    row = store.execute("SELECT state, updated_ms FROM leases").fetchone()
    assert tuple(row) == ("released", T0 + 5)


def test_leases_and_counter_commit_together_or_not_at_all(store: Store) -> None:
    leases = Leases(store)
    with pytest.raises(RuntimeError), store.transaction():
        leases.save([lease("l-1", "t-1", 1)], next_seq=2, now_ms=T0)
        raise RuntimeError("the caller failed before its commit")
    assert leases.all() == [] and leases.next_seq() == 1
