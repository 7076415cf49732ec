"""Task execution: a supervisor process per task that enforces the lease deadline itself.

The agent starts a task with :func:`start_supervised`; a detached supervisor process
(:mod:`populi_peer.exec.supervisor`) runs the command in its own cgroup (or process
group), stops it before ``deadline - stop_margin_s`` unless :meth:`Supervised.extend_deadline`
moves the deadline, and records the outcome in the task directory. An agent that
restarts calls :func:`adopt` on each task directory, and :func:`kill_orphan` on those it
cannot adopt. docs/adr/0005-task-supervisor.md explains the design.

Names are loaded on first use, so that the supervisor process (which imports this
package) does not pay for trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from populi_peer.exec._env import build_task_env
    from populi_peer.exec._records import (
        StreamTotals,
        SupervisorState,
        TaskOutcome,
        TaskSpec,
    )
    from populi_peer.exec._runner import (
        Supervised,
        adopt,
        kill_orphan,
        read_state,
        start_supervised,
        tail,
    )
    from populi_peer.exec.errors import (
        ExecError,
        SpawnFailed,
        SupervisorFailed,
        SupervisorLost,
        TaskDirInUse,
    )

_EXPORTS = {
    "build_task_env": "populi_peer.exec._env",
    "StreamTotals": "populi_peer.exec._records",
    "SupervisorState": "populi_peer.exec._records",
    "TaskOutcome": "populi_peer.exec._records",
    "TaskSpec": "populi_peer.exec._records",
    "Supervised": "populi_peer.exec._runner",
    "adopt": "populi_peer.exec._runner",
    "kill_orphan": "populi_peer.exec._runner",
    "leftovers": "populi_peer.exec._runner",
    "read_state": "populi_peer.exec._runner",
    "start_supervised": "populi_peer.exec._runner",
    "tail": "populi_peer.exec._runner",
    "ExecError": "populi_peer.exec.errors",
    "SpawnFailed": "populi_peer.exec.errors",
    "SupervisorFailed": "populi_peer.exec.errors",
    "SupervisorLost": "populi_peer.exec.errors",
    "TaskDirInUse": "populi_peer.exec.errors",
}

__all__ = [
    "ExecError",
    "SpawnFailed",
    "StreamTotals",
    "Supervised",
    "SupervisorFailed",
    "SupervisorLost",
    "SupervisorState",
    "TaskDirInUse",
    "TaskOutcome",
    "TaskSpec",
    "adopt",
    "build_task_env",
    "kill_orphan",
    "leftovers",
    "read_state",
    "start_supervised",
    "tail",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
