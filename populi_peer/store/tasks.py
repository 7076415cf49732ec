"""The submitter's tasks (table ``tasks``).

A row's body is the task record (``core.tasks.Task``, under ``"task"``) together with the
submitter's bookkeeping beside it (results received, attempts handed off...). Every
change of a task is written here before anyone acts on it.
"""

from __future__ import annotations

import json
from typing import Any

from populi_peer.core.tasks import TERMINAL_STATES, Task
from populi_peer.store.db import Store


class Tasks:
    def __init__(self, store: Store) -> None:
        self.store = store

    def body(self, task_id: str) -> dict[str, Any] | None:
        """The stored body of ``task_id``: ``{"task": <Task JSON>, ...}``."""
        row = self.store.execute("SELECT body FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else dict(json.loads(row["body"]))

    def insert(self, task: Task, body: dict[str, Any], *, now_ms: int) -> None:
        """Record a new task (a task id already there is a StoreError)."""
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO tasks (task_id, state, body, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
                (
                    task.task_id,
                    task.state,
                    json.dumps(body, sort_keys=True),
                    task.created_wall_ms,
                    now_ms,
                ),
            )

    def update(self, task: Task, body: dict[str, Any], *, now_ms: int) -> None:
        with self.store.transaction():
            self.store.execute(
                "UPDATE tasks SET state = ?, body = ?, updated_ms = ? WHERE task_id = ?",
                (task.state, json.dumps(body, sort_keys=True), now_ms, task.task_id),
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


__all__ = ["Tasks"]
