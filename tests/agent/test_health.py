"""The node's health: backoff, recovery, and which failures a service retries."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from populi_peer.agent.health import BACKOFF_MAX_S, STORAGE, Health, retried_failure, retrying
from populi_peer.clock import SystemClock
from populi_peer.errors import BadRequest, StorageUnavailable, StoreError
from populi_peer.testing import VirtualClock

FULL = StorageUnavailable("database or disk is full", condition="disk_full")


def test_backoff_doubles_to_its_ceiling_and_success_clears() -> None:
    health = Health(SystemClock())
    delays = [health.failed("leases", FULL) for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, BACKOFF_MAX_S, BACKOFF_MAX_S]
    status = health.to_json()
    assert status["state"] == "degraded"
    (problem,) = status["problems"]
    assert (problem["component"], problem["code"], problem["failures"]) == (
        "leases",
        "storage_unavailable",
        7,
    )
    health.ok("leases")
    assert health.to_json() == {"state": "ok", "problems": []}
    assert health.failed("leases", FULL) == 0.5  # a new episode starts over


def test_a_file_error_is_reported_as_the_store_reports_it() -> None:
    health = Health(SystemClock())
    health.failed("cert_renewal", OSError(errno.ENOSPC, "No space left on device"))
    (problem,) = health.to_json()["problems"]
    assert problem["code"] == "storage_unavailable" and "No space left" in problem["message"]


def test_the_store_listener_clears_storage_on_the_next_commit() -> None:
    health = Health(SystemClock())
    health.storage_result(FULL)
    assert health.degraded and STORAGE in health.problems
    health.storage_result(None)
    assert not health.degraded


def test_which_failures_are_retried() -> None:
    assert retried_failure(FULL) is FULL
    assert retried_failure(OSError(errno.EIO, "I/O error")) is not None
    assert retried_failure(StoreError("constraint failed")) is not None
    assert retried_failure(BadRequest("no")) is None
    group = BaseExceptionGroup("step", [ExceptionGroup("inner", [FULL])])
    assert retried_failure(group) is FULL
    assert retried_failure(BaseExceptionGroup("step", [FULL, BadRequest("no")])) is None


async def test_a_retry_waits_its_backoff_or_less_when_something_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = Health(VirtualClock())
    attempts: list[float] = []

    async def step() -> str:
        attempts.append(trio.current_time())
        if len(attempts) < 4:
            raise FULL
        return "done"

    started = trio.current_time()
    assert await retrying(health, "janitor", step) == "done"
    assert [round(t - started, 3) for t in attempts] == [0.0, 0.5, 1.5, 3.5]
    assert not health.degraded

    health.failed("leases", FULL)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.retry_after, 10.0)
        await trio.sleep(1.0)
        health.storage_result(FULL)
        health.storage_result(None)  # a write got through: whoever waits may go now
    assert trio.current_time() - started == pytest.approx(3.5 + 1.0)
