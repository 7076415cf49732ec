"""What keeps this node from being healthy: the ``health`` part of ``populi status``.

A long-running service never ends on a failure it cannot help — the disk is full, the
database turned read-only, a device I/O error (``StorageUnavailable``), or any other store
or file error. It reports the failure here under its own component name, waits
(:meth:`Health.retry_after`: exponential backoff, cut short as soon as a write succeeds
again), and tries the same iteration again; its first success clears the problem. The
store itself reports every write it could not take under ``storage``, and clears it with
the next commit, whoever made it. A node with any problem is ``degraded``; the status
says which component, why (the reason code and the error), since when and how often.

Nothing here decides anything: an iteration that failed changed nothing (the store rolled
it back and the caller adopts a change only after its commit), so trying it again is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import trio

from populi_peer.clock import Clock
from populi_peer.core.messages import HealthProblem, NodeHealth
from populi_peer.errors import PopuliError, StoreError
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import file_error

T = TypeVar("T")

#: The component under which the store reports writes it could not take.
STORAGE = "storage"
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
#: Failures that a service reports here and retries, instead of ending on them.
RETRIED = (StoreError, OSError)


@dataclass
class Problem:
    component: str
    code: str
    message: str
    since_wall_ms: int
    last_wall_ms: int
    failures: int = 1


def as_error(exc: BaseException) -> PopuliError:
    """The error tree's view of ``exc`` (an ``OSError`` of a data-directory file becomes
    a store error, ``storage_unavailable`` when the disk is full or failed)."""
    if isinstance(exc, PopuliError):
        return exc
    if isinstance(exc, OSError):
        return file_error(exc, "file write failed")
    return PopuliError(f"{type(exc).__name__}: {exc}")


@dataclass(eq=False, repr=False)
class Health:
    clock: Clock
    logger: ClassVar[logging.Logger] = get_logger("health")

    def __post_init__(self) -> None:
        self.problems: dict[str, Problem] = {}
        self._recovered = trio.Event()

    @property
    def degraded(self) -> bool:
        return bool(self.problems)

    def failed(self, component: str, exc: BaseException) -> float:
        """Record a failed iteration of ``component``; returns how long to wait before
        the next try (0.5 s doubling to 10 s). Logged on the first failure and then at
        every doubling of the count, so a long outage does not flood the log."""
        error = as_error(exc)
        now_ms = int(self.clock.wall() * 1000)
        problem = self.problems.get(component)
        if problem is None:
            problem = self.problems[component] = Problem(
                component, error.code, str(error), now_ms, now_ms
            )
        else:
            problem.failures += 1
            problem.code, problem.message, problem.last_wall_ms = error.code, str(error), now_ms
        if problem.failures & (problem.failures - 1) == 0:
            log(
                self.logger,
                logging.WARNING,
                "degraded; retrying",
                component=component,
                code=error.code,
                error=str(error),
                failures=problem.failures,
            )
        return float(min(BACKOFF_BASE_S * 2.0 ** (problem.failures - 1), BACKOFF_MAX_S))

    def ok(self, component: str) -> None:
        """``component`` succeeded: its problem, if any, is over."""
        problem = self.problems.pop(component, None)
        if problem is None:
            return
        log(
            self.logger,
            NOTICE,
            "recovered",
            component=component,
            failures=problem.failures,
            after_s=round((self.clock.wall() * 1000 - problem.since_wall_ms) / 1000, 3),
        )
        # Whoever waits to retry may go now: a write got through.
        self._recovered.set()
        self._recovered = trio.Event()

    def storage_result(self, error: StoreError | None) -> None:
        """The store's :attr:`~populi_peer.store.Store.write_listener`."""
        if error is None:
            if STORAGE in self.problems:
                self.ok(STORAGE)
        else:
            self.failed(STORAGE, error)

    async def retry_after(self, delay_s: float) -> None:
        """Wait ``delay_s``, or less if something recovered meanwhile (space came back)."""
        with trio.move_on_after(delay_s):
            await self._recovered.wait()

    def view(self) -> NodeHealth:
        """``status.health``: ok, or degraded with the problems, oldest first."""
        problems = sorted(self.problems.values(), key=_since)
        return NodeHealth(
            state="degraded" if problems else "ok",
            problems=tuple(
                HealthProblem(
                    component=p.component,
                    code=p.code,
                    message=p.message,
                    since_ms=p.since_wall_ms,
                    last_ms=p.last_wall_ms,
                    failures=p.failures,
                )
                for p in problems
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return self.view().to_json()


def retried_failure(exc: BaseException) -> BaseException | None:
    """``exc`` if it is a failure to report and retry (:data:`RETRIED`), or the first of
    an exception group made only of such failures (a step that ran a nursery); else None."""
    if isinstance(exc, RETRIED):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [retried_failure(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


async def retrying(health: Health, component: str, step: Callable[[], Awaitable[T]]) -> T:
    """Run ``step`` until it succeeds: each failure it cannot help (:data:`RETRIED`) is
    reported under ``component`` and tried again after the backoff; anything else
    propagates. For a step that must not be given up, such as recording a task's result
    before its lease is released."""
    while True:
        try:
            result = await step()
        except RETRIED as exc:
            await health.retry_after(health.failed(component, exc))
            continue
        health.ok(component)
        return result


def _since(problem: Problem) -> tuple[int, str]:
    return (problem.since_wall_ms, problem.component)


__all__ = [
    "BACKOFF_MAX_S",
    "RETRIED",
    "STORAGE",
    "Health",
    "Problem",
    "as_error",
    "retried_failure",
    "retrying",
]
