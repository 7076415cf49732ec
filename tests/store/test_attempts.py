"""Attempts (worker and local) and the worker's fences."""

from __future__ import annotations

from typing import Any

import pytest

from populi_peer.core.fencing import FencingToken
from populi_peer.store import Store
from populi_peer.store.attempts import AttemptIdentity, AttemptRecord, Attempts

T0 = 1_700_000_000_000


def save(
    attempts: Attempts,
    task_id: str,
    state: str,
    *,
    attempt: int = 1,
    role: str = "worker",
    token: str = "1.1",
    fence: bool = False,
    result: dict[str, Any] | None = None,
    now_ms: int = T0,
    **body: Any,
) -> None:
    attempts.save(
        AttemptIdentity(task_id, attempt, role, "n-submitter", FencingToken.parse(token), "l-1"),
        state=state,
        body={"task_id": task_id, **body},
        result=result,
        now_ms=now_ms,
        fence=fence,
    )


def test_an_attempt_reads_back_typed_and_keeps_its_result(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "accepted")
    save(attempts, "t-1", "finished", result={"outcome": "exited"}, now_ms=T0 + 1)
    save(attempts, "t-1", "finished", now_ms=T0 + 2, started_wall_ms=5)  # no result: kept
    assert attempts.get("t-1", 1, "worker") == AttemptRecord(
        task_id="t-1",
        attempt=1,
        role="worker",
        submitter="n-submitter",
        token=FencingToken(1, 1),
        lease_id="l-1",
        state="finished",
        body={"task_id": "t-1", "started_wall_ms": 5},
        result={"outcome": "exited"},
        delivered_ms=None,
        updated_ms=T0 + 2,
    )
    assert attempts.get("t-1", 1, "local") is None


def test_unfinished_attempts_of_a_role(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "accepted")
    save(attempts, "t-2", "running")
    save(attempts, "t-3", "finished", result={})
    save(attempts, "t-4", "running", role="local")
    assert sorted(a.task_id for a in attempts.unfinished("worker")) == ["t-1", "t-2"]
    assert [a.task_id for a in attempts.unfinished("local")] == ["t-4"]


def test_results_wait_for_delivery_then_age_out(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "finished", result={"n": 1}, now_ms=T0)
    save(attempts, "t-2", "finished", result={"n": 2}, now_ms=T0)
    save(attempts, "t-3", "running", now_ms=T0)
    save(attempts, "t-4", "finished", role="local", result={"n": 4}, now_ms=T0)
    assert sorted(a.task_id for a in attempts.undelivered()) == ["t-1", "t-2"]
    attempts.mark_delivered("t-1", 1, now_ms=T0 + 7)
    assert [a.task_id for a in attempts.undelivered()] == ["t-2"]
    record = attempts.get("t-1", 1, "worker")
    assert record is not None and record.delivered_ms == T0 + 7
    # Old enough to prune: local ones, and a worker's once delivered — and only once a
    # control plane acknowledged their end (until then the node's reports carry it).
    assert attempts.finished_before(T0 + 1) == []
    assert sorted(a.task_id for a in attempts.held()) == ["t-1", "t-2", "t-3", "t-4"]
    attempts.mark_released("t-1", 1, "worker", now_ms=T0 + 8)
    attempts.mark_released("t-4", 1, "local", now_ms=T0 + 8)
    attempts.mark_released("t-3", 1, "worker", now_ms=T0 + 8)  # running: not released
    assert sorted(a.task_id for a in attempts.finished_before(T0 + 1)) == ["t-1", "t-4"]
    assert attempts.finished_before(T0) == []
    assert sorted(a.task_id for a in attempts.held()) == ["t-2", "t-3"]


def test_the_attempts_of_a_task_by_role(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "finished", attempt=1, token="1.5", result={})
    save(attempts, "t-1", "running", attempt=2, token="1.9")
    save(attempts, "t-1", "finished", token="1.5", role="local", result={})
    found = attempts.of_task("t-1", "worker")
    assert [(a.attempt, a.token, a.state) for a in found] == [
        (1, FencingToken(1, 5), "finished"),
        (2, FencingToken(1, 9), "running"),
    ]
    assert attempts.of_task("t-2", "worker") == []


def test_the_fence_is_the_last_token_written(store: Store) -> None:
    attempts = Attempts(store)
    assert attempts.fences() == []
    attempts.set_fence("t-1", FencingToken(1, 5), now_ms=T0)
    attempts.set_fence("t-1", FencingToken(2, 1), now_ms=T0 + 1)
    attempts.set_fence("t-2", FencingToken(1, 1), now_ms=T0 + 1)
    assert sorted(attempts.fences()) == [("t-1", FencingToken(2, 1)), ("t-2", FencingToken(1, 1))]
    assert store.execute("SELECT token FROM fences WHERE task_id = 't-1'").fetchone()[0] == "2.1"


def test_an_admitted_attempt_raises_its_fence_in_the_same_write(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "accepted", token="3.4", fence=True)
    assert attempts.fences() == [("t-1", FencingToken(3, 4))]


def test_a_fence_commits_with_its_attempt_or_not_at_all(store: Store) -> None:
    attempts = Attempts(store)
    with pytest.raises(RuntimeError), store.transaction():
        save(attempts, "t-1", "accepted", fence=True)
        raise RuntimeError("the handoff failed before its commit")
    assert attempts.fences() == [] and attempts.get("t-1", 1, "worker") is None
