"""Forget what is older than ``exec.retain_finished_s``, once an hour: inbox messages, and
the directories of finished attempts (whose results are stored and, on a worker,
delivered). Task and attempt rows stay: they are small and they are the record."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

from populi_peer.agent.health import RETRIED, Health
from populi_peer.clock import Clock
from populi_peer.log import get_logger, log
from populi_peer.store.attempts import Attempts
from populi_peer.store.inbox import InboxMessages

#: How often the janitor looks.
INTERVAL_S = 3600.0


@dataclass(frozen=True, kw_only=True, eq=False)
class Janitor:
    """``task_dir(body)`` is the directory of the attempt stored as ``body``;
    ``leftovers(dir)`` whether anything of its process may still run there (then the
    directory stays)."""

    clock: Clock
    retain_finished_s: float
    inbox: InboxMessages
    attempts: Attempts
    task_dir: Callable[[Mapping[str, Any]], Path]
    leftovers: Callable[[Path], bool]
    health: Health
    logger: ClassVar[logging.Logger] = get_logger("agent")

    def prune(self) -> dict[str, int]:
        cutoff_ms = int((self.clock.wall() - self.retain_finished_s) * 1000)
        messages = self.inbox.prune(before_ms=cutoff_ms)
        dirs = 0
        for row in self.attempts.finished_before(cutoff_ms):
            task_dir = self.task_dir(row.body)
            if task_dir.exists() and not self.leftovers(task_dir):
                shutil.rmtree(task_dir, ignore_errors=True)
                dirs += 1
        if messages or dirs:
            log(
                self.logger,
                logging.INFO,
                "pruned old records",
                inbox_messages=messages,
                task_dirs=dirs,
            )
        return {"inbox_messages": messages, "task_dirs": dirs}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                self.prune()
            except RETRIED as exc:
                await self.health.retry_after(self.health.failed("janitor", exc))
                continue
            self.health.ok("janitor")
            await trio.sleep(INTERVAL_S)


__all__ = ["Janitor"]
