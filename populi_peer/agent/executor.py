"""How an agent runs task processes: a seam between the worker/submitter and the
per-task supervisor (``populi_peer.exec``), so the virtual cluster can run simulated tasks
on virtual time while the agent code stays the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from populi_peer.exec import (
    Supervised,
    TaskOutcome,
    TaskSpec,
    adopt,
    kill_orphan,
    leftovers,
    start_supervised,
    tail,
)


class Execution(Protocol):
    """A running (or finished) supervised task."""

    def extend_deadline(self, deadline_boot: float) -> None: ...

    def cancel(self) -> None: ...

    def alive(self) -> bool: ...

    async def wait(self, poll_s: float = 0.05) -> TaskOutcome: ...

    def read_output(
        self, stream: Any, offset: int = 0, limit: int = 1 << 20
    ) -> tuple[bytes, int, int]: ...


class Executor(Protocol):
    async def start(self, task_dir: Path, spec: TaskSpec, deadline_boot: float) -> Execution: ...

    def adopt(self, task_dir: Path) -> Execution | None: ...

    async def kill_orphan(self, task_dir: Path) -> bool: ...

    def leftovers(self, task_dir: Path) -> bool: ...

    def tail(self, task_dir: Path, stream: str, max_bytes: int) -> bytes: ...


class ProcessExecutor:
    """Real processes under a supervisor that enforces the deadline by itself."""

    async def start(self, task_dir: Path, spec: TaskSpec, deadline_boot: float) -> Supervised:
        return await start_supervised(task_dir, spec, deadline_boot)

    def adopt(self, task_dir: Path) -> Supervised | None:
        return adopt(task_dir)

    async def kill_orphan(self, task_dir: Path) -> bool:
        return await kill_orphan(task_dir)

    def leftovers(self, task_dir: Path) -> bool:
        return bool(leftovers(task_dir))

    def tail(self, task_dir: Path, stream: str, max_bytes: int) -> bytes:
        return tail(task_dir, stream, max_bytes)  # type: ignore[arg-type]


__all__ = ["Execution", "Executor", "ProcessExecutor"]
