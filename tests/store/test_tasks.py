"""Tasks: the record with the submitter's bookkeeping, listed newest first."""

from __future__ import annotations

from dataclasses import replace

import pytest

from populi_peer.core.tasks import TERMINAL_STATES, Cancel, Task
from populi_peer.errors import StoreError
from populi_peer.store import Store
from populi_peer.store.tasks import Tasks

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


def test_a_task_body_reads_back_and_updates(store: Store) -> None:
    tasks = Tasks(store)
    task = new_task("t-1", T0)
    tasks.insert(task, {"task": task.to_json(), "caller": "o-x"}, now_ms=T0)
    body = tasks.body("t-1")
    assert body is not None and Task.from_json(body["task"]) == task and body["caller"] == "o-x"
    cancelled = task.apply(Cancel(actor="o-x"), now_wall_ms=T0 + 1)
    tasks.update(cancelled, {**body, "task": cancelled.to_json()}, now_ms=T0 + 1)
    body = tasks.body("t-1")
    assert body is not None and Task.from_json(body["task"]).state == "cancelled"
    assert tasks.body("t-9") is None


def test_insert_refuses_a_known_task_id(store: Store) -> None:
    tasks = Tasks(store)
    task = new_task("t-1", T0)
    tasks.insert(task, {"task": task.to_json()}, now_ms=T0)
    with pytest.raises(StoreError):
        tasks.insert(task, {"task": task.to_json(), "other": 1}, now_ms=T0)
    assert tasks.body("t-1") == {"task": task.to_json()}


def test_newest_and_unfinished(store: Store) -> None:
    tasks = Tasks(store)
    for n in range(1, 5):
        task = new_task(f"t-{n}", T0 + n)
        if n % 2 == 0:
            task = task.apply(Cancel(actor="o-x"), now_wall_ms=T0 + 10)
        tasks.insert(task, {"task": task.to_json()}, now_ms=T0 + n)
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
        tasks.insert(task, {"task": task.to_json()}, now_ms=T0)
    assert tasks.unfinished() == ["t-queued"]
