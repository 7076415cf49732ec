"""Tasks: the record with the submitter's bookkeeping, listed newest first."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from populi_peer.core.messages import TaskLeaseGrant
from populi_peer.core.tasks import TERMINAL_STATES, Cancel, LeaseRequests, Task
from populi_peer.errors import StoreError
from populi_peer.store import Store
from populi_peer.store.tasks import TaskRecord, Tasks

T0 = 1_700_000_000_000


def new_task(task_id: str, created_ms: int) -> Task:
    return Task.new(
        task_id,
        command=("python", "train.py"),
        env={},
        gpus_wanted=0,
        work_class="training",
        created_wall_ms=created_ms,
    )


def test_a_task_record_reads_back_and_updates(store: Store) -> None:
    tasks = Tasks(store)
    task = new_task("t-1", T0)
    tasks.insert(TaskRecord(task, submitted_by="o-x"), now_ms=T0)
    record = tasks.get("t-1")
    assert record == TaskRecord(task, submitted_by="o-x")
    cancelled = task.apply(Cancel(actor="o-x"), now_wall_ms=T0 + 1)
    grant = TaskLeaseGrant(gpus=("GPU-1",), ttl_s=30.0, kind="remote")
    tasks.update(replace(record, task=cancelled).with_lease("l-1", grant), now_ms=T0 + 1)
    record = tasks.get("t-1")
    assert record is not None and record.task.state == "cancelled"
    assert dict(record.leases) == {"l-1": grant}
    assert tasks.get("t-9") is None


def test_a_record_written_before_request_numbers_were_typed_keeps_them(store: Store) -> None:
    """A task row of an earlier version kept its lease request numbers beside the task:
    read back, the task record has them (an upgrade mid-request replays the same number)."""
    task = new_task("t-1", T0)
    legacy = {
        "task": {k: v for k, v in task.to_json().items() if k != "requests"},
        "results": {},
        "leases": {},
        "pending_request": {"kind": "grant", "attempt": 3},
        "max_requested_attempt": 3,
    }
    store.execute(
        "INSERT INTO tasks (task_id, state, body, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
        ("t-1", task.state, json.dumps(legacy), T0, T0),
    )
    record = Tasks(store).get("t-1")
    assert record is not None
    assert record.task.requests == LeaseRequests(pending="grant", pending_attempt=3, highest=3)
    assert record.task.request_number("grant") == (record.task, 3)


def test_insert_refuses_a_known_task_id(store: Store) -> None:
    tasks = Tasks(store)
    task = new_task("t-1", T0)
    tasks.insert(TaskRecord(task), now_ms=T0)
    with pytest.raises(StoreError):
        tasks.insert(TaskRecord(task, submitted_by="other"), now_ms=T0)
    assert tasks.get("t-1") == TaskRecord(task)


def test_newest_and_unfinished(store: Store) -> None:
    tasks = Tasks(store)
    for n in range(1, 5):
        task = new_task(f"t-{n}", T0 + n)
        if n % 2 == 0:
            task = task.apply(Cancel(actor="o-x"), now_wall_ms=T0 + 10)
        tasks.insert(TaskRecord(task), now_ms=T0 + n)
    assert tasks.newest(limit=3) == ["t-4", "t-3", "t-2"]
    assert tasks.newest(limit=10, state="cancelled") == ["t-4", "t-2"]
    assert tasks.newest(limit=10, state="") == ["t-4", "t-3", "t-2", "t-1"]  # no filter
    assert sorted(tasks.unfinished()) == ["t-1", "t-3"]


def test_unfinished_leaves_out_every_terminal_state(store: Store) -> None:
    tasks = Tasks(store)
    states = sorted(TERMINAL_STATES | {"queued"})
    for n, state in enumerate(states):
        task = new_task(f"t-{state}", T0 + n)
        if state in TERMINAL_STATES:
            task = replace(task, state=state, finished_wall_ms=T0 + 100)  # type: ignore[arg-type]
        tasks.insert(TaskRecord(task), now_ms=T0)
    assert tasks.unfinished() == ["t-queued"]
