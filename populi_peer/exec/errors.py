"""Errors of task execution.

::

    PopuliError
    └── ExecError                 a task could not be run or supervised (HTTP 500)
        ├── SpawnFailed           the command could not be started: not found (exit 127),
        │                         not executable or bad working directory (exit 126)
        ├── SupervisorFailed      the supervisor did not start or did not report in time
        ├── SupervisorLost        the supervisor died without writing a final state
        └── TaskDirInUse          the task directory already belongs to a supervisor

Malformed specs and environments are the submitter's fault and raise
:class:`populi_peer.errors.BadRequest` instead.
"""

from __future__ import annotations

from populi_peer.errors import PopuliError


class ExecError(PopuliError):
    """A task could not be run or supervised on this machine."""

    code = "exec_error"


class SpawnFailed(ExecError):
    """The supervisor could not start the command.

    ``details["exit_code"]`` follows the shell: 127 when the command is not found, 126 when
    it cannot be executed (permission, format, working directory), 125 when the supervisor
    could not even try (unreadable spec).
    """

    code = "spawn_failed"


class SupervisorFailed(ExecError):
    """The supervisor process did not start, or did not report its state in time."""

    code = "supervisor_failed"


class SupervisorLost(ExecError):
    """The supervisor died without a final state: the task must be treated as orphaned."""

    code = "supervisor_lost"


class TaskDirInUse(ExecError):
    """The task directory already holds a spec or state: one directory per attempt."""

    code = "task_dir_in_use"


__all__ = ["ExecError", "SpawnFailed", "SupervisorFailed", "SupervisorLost", "TaskDirInUse"]
