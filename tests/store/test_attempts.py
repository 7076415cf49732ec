"""Attempts (worker and local) and the worker's fences."""

from __future__ import annotations

from typing import Any

import pytest

from populi_peer.core.fencing import FencingToken
from populi_peer.store import Store
from populi_peer.store.attempts import AttemptRecord, Attempts

T0 = 1_700_000_000_000


def save(
    attempts: Attempts,
    task_id: str,
    state: str,
    *,
    attempt: int = 1,
    role: str = "worker",
    token: str = "1.1",
    result: dict[str, Any] | None = None,
    now_ms: int = T0,
    **body: Any,
) -> None:
    attempts.save(
        task_id=task_id,
        attempt=attempt,
        role=role,
        submitter="n-submitter",
        token=token,
        lease_id="l-1",
        state=state,
        body={"task_id": task_id, **body},
        result=result,
        now_ms=now_ms,
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
        token="1.1",
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
    # Old enough to prune: local ones, and a worker's once delivered.
    assert sorted(a.task_id for a in attempts.finished_before(T0 + 1)) == ["t-1", "t-4"]
    assert attempts.finished_before(T0) == []


def test_worker_state_by_token(store: Store) -> None:
    attempts = Attempts(store)
    save(attempts, "t-1", "running", token="1.5")
    save(attempts, "t-1", "finished", token="1.5", role="local", result={})
    assert attempts.worker_state("t-1", "1.5") == "running"
    assert attempts.worker_state("t-1", "1.6") is None


def test_the_fence_is_the_last_token_written(store: Store) -> None:
    attempts = Attempts(store)
    assert attempts.fence("t-1") is None
    attempts.set_fence("t-1", FencingToken(1, 5), now_ms=T0)
    attempts.set_fence("t-1", FencingToken(2, 1), now_ms=T0 + 1)
    assert attempts.fence("t-1") == FencingToken(2, 1)
    assert attempts.fence("t-2") is None
    assert store.execute("SELECT token FROM fences").fetchone()[0] == "2.1"


def test_a_fence_commits_with_its_attempt_or_not_at_all(store: Store) -> None:
    attempts = Attempts(store)
    with pytest.raises(RuntimeError), store.transaction():
        attempts.set_fence("t-1", FencingToken(1, 1), now_ms=T0)
        save(attempts, "t-1", "accepted")
        raise RuntimeError("the handoff failed before its commit")
    assert attempts.fence("t-1") is None and attempts.get("t-1", 1, "worker") is None
