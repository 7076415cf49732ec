"""The submitter's tasks (table ``tasks``).

A row's body is a :class:`TaskRecord`: the task record (``core.tasks.Task``, under
``"task"``) and the submitter's bookkeeping beside it — the results received per attempt,
what each lease granted, who submitted it, results kept apart as stale. Every change of
a task is written here before anyone acts on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from populi_peer.core.messages import ResultMessage, TaskLeaseGrant
from populi_peer.core.tasks import TERMINAL_STATES, LeaseRequests, Task
from populi_peer.store.db import Store

#: How many results a task keeps of those it did not accept (late, or for an older token).
MAX_IGNORED_RESULTS = 20


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as its submitter keeps it: the core's record, and beside it ``results``
    (attempt number as text -> the attempt's result with its output tails), ``leases``
    (lease id -> what the task was granted under it), who submitted it, and the last
    results it did not accept (``ignored_results``)."""

    task: Task
    results: Mapping[str, ResultMessage] = field(default_factory=dict)
    leases: Mapping[str, TaskLeaseGrant] = field(default_factory=dict)
    submitted_by: str | None = None
    ignored_results: tuple[ResultMessage, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "results", MappingProxyType(dict(self.results)))
        object.__setattr__(self, "leases", MappingProxyType(dict(self.leases)))

    def with_result(self, result: ResultMessage) -> TaskRecord:
        return replace(self, results={**self.results, str(result.result.attempt): result})

    def with_ignored(self, result: ResultMessage) -> TaskRecord:
        kept = (*self.ignored_results, result)[-MAX_IGNORED_RESULTS:]
        return replace(self, ignored_results=kept)

    def with_lease(self, lease_id: str, grant: TaskLeaseGrant) -> TaskRecord:
        return replace(self, leases={**self.leases, lease_id: grant})

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task.to_json(),
            "results": {n: r.to_json() for n, r in self.results.items()},
            "leases": {lease_id: g.to_json() for lease_id, g in self.leases.items()},
            "submitted_by": self.submitted_by,
            "ignored_results": [r.to_json() for r in self.ignored_results],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskRecord:
        task_json = data["task"]
        task = Task.from_json(task_json)
        if "requests" not in task_json and (
            data.get("pending_request") or data.get("max_requested_attempt")
        ):
            # Written before the task record kept its request numbers.
            pending = data.get("pending_request") or {}
            highest = int(data.get("max_requested_attempt") or 0)
            task = replace(
                task,
                requests=LeaseRequests(
                    pending=pending.get("kind"),
                    pending_attempt=pending.get("attempt"),
                    highest=max(highest, int(pending.get("attempt") or 0)),
                ),
            )
        submitted_by = data.get("submitted_by")
        return cls(
            task=task,
            results={
                str(n): ResultMessage.from_json(r) for n, r in (data.get("results") or {}).items()
            },
            leases={
                str(lease_id): TaskLeaseGrant.from_json(g)
                for lease_id, g in (data.get("leases") or {}).items()
            },
            submitted_by=submitted_by if isinstance(submitted_by, str) else None,
            ignored_results=tuple(
                ResultMessage.from_json(r) for r in data.get("ignored_results") or ()
            ),
        )


class Tasks:
    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, task_id: str) -> TaskRecord | None:
        row = self.store.execute("SELECT body FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else TaskRecord.from_json(json.loads(row["body"]))

    def insert(self, record: TaskRecord, *, now_ms: int) -> None:
        """Record a new task (a task id already there is a StoreError)."""
        task = record.task
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO tasks (task_id, state, body, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
                (
                    task.task_id,
                    task.state,
                    json.dumps(record.to_json(), sort_keys=True),
                    task.created_wall_ms,
                    now_ms,
                ),
            )

    def update(self, record: TaskRecord, *, now_ms: int) -> None:
        task = record.task
        with self.store.transaction():
            self.store.execute(
                "UPDATE tasks SET state = ?, body = ?, updated_ms = ? WHERE task_id = ?",
                (task.state, json.dumps(record.to_json(), sort_keys=True), now_ms, task.task_id),
            )

    def newest(self, *, limit: int, state: str | None = None) -> list[str]:
        """The ids of the ``limit`` most recently created tasks (in ``state``, if given)."""
        if state:
            rows = self.store.execute(
                "SELECT task_id FROM tasks WHERE state = ? ORDER BY created_ms DESC LIMIT ?",
                (state, limit),
            ).fetchall()
        else:
            rows = self.store.execute(
                "SELECT task_id FROM tasks ORDER BY created_ms DESC LIMIT ?", (limit,)
            ).fetchall()
        return [str(row["task_id"]) for row in rows]

    def unfinished(self) -> list[str]:
        """The ids of the tasks not in a terminal state."""
        rows = self.store.execute(
            "SELECT task_id FROM tasks WHERE state NOT IN (?, ?, ?, ?)", sorted(TERMINAL_STATES)
        ).fetchall()
        return [str(row["task_id"]) for row in rows]


__all__ = ["MAX_IGNORED_RESULTS", "TaskRecord", "Tasks"]
