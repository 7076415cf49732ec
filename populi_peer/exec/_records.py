"""The records a launcher and its supervisor exchange through the task directory.

``spec.json`` (written once by the launcher) is a :class:`TaskSpec`; ``state.json``
(rewritten atomically by the supervisor) is a :class:`SupervisorState`; a finished state
reads as a :class:`TaskOutcome`. Every record carries ``"v"``; unknown fields are ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from populi_peer.core.wire import FieldsRecord, record_json
from populi_peer.errors import BadRequest

RECORD_VERSION = 1

#: Largest ``output_cap_bytes`` a spec may ask for, per stream. Output lives on the worker
#: until it is delivered; the cap keeps a chatty task from filling the data directory.
MAX_OUTPUT_CAP_BYTES = 64 * 1024 * 1024
DEFAULT_OUTPUT_CAP_BYTES = 1024 * 1024

Isolation = Literal["cgroup", "process_group"]
IsolationPreference = Literal["auto", "cgroup", "process_group"]
Status = Literal["starting", "running", "stopping", "exited"]
StopReason = Literal["exited", "deadline", "cancelled", "spawn_failed", "supervisor_error"]
Stream = Literal["stdout", "stderr"]

ISOLATION_PREFERENCES = ("auto", "cgroup", "process_group")
STATUSES = ("starting", "running", "stopping", "exited")
STOP_REASONS = ("exited", "deadline", "cancelled", "spawn_failed", "supervisor_error")
STREAMS = ("stdout", "stderr")


def check_env_name(name: object) -> str:
    """An environment variable name a process can receive; raise BadRequest naming it."""
    if not isinstance(name, str) or not name or "=" in name or "\0" in name:
        raise BadRequest(
            f"environment variable name {name!r} is invalid: use a non-empty name "
            "without '=' or NUL",
            code="bad_env",
        )
    return name


def check_env_value(name: str, value: object) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise BadRequest(
            f"environment variable {name} must be a string without NUL bytes",
            code="bad_env",
        )
    return value


def _finite_nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number of seconds, not {value!r}", code="bad_spec")
    result = float(value)
    if not math.isfinite(result) or result < 0:
        raise BadRequest(f"{name} must be finite and >= 0, not {value!r}", code="bad_spec")
    return result


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What the supervisor runs, and how it stops it.

    ``env`` is the complete environment of the task (see :func:`build_task_env`); nothing
    of the agent's environment leaks in. ``stop_margin_s`` is how long before the lease
    deadline the stop begins; it must cover ``kill_grace_s`` (the config demands more:
    :func:`populi_peer.core.leases.validate_stop_margin`). ``isolation`` ``auto`` uses a cgroup when one is writable
    and a process group otherwise; ``cgroup`` refuses to run without one.
    """

    task_id: str
    attempt: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    stop_margin_s: float
    kill_grace_s: float
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES
    isolation: IsolationPreference = "auto"
    cgroup_parent: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id or "\0" in self.task_id:
            raise BadRequest(f"task_id {self.task_id!r} is invalid", code="bad_spec")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 0:
            raise BadRequest(
                f"attempt must be an integer >= 0, not {self.attempt!r}", code="bad_spec"
            )
        if isinstance(self.argv, str | bytes):
            raise BadRequest("argv must be a list of strings, not one string", code="bad_spec")
        argv = tuple(self.argv)
        if not argv:
            raise BadRequest("argv is empty: name the command to run", code="bad_spec")
        for arg in argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise BadRequest(f"argv item {arg!r} must be a string without NUL", code="bad_spec")
        object.__setattr__(self, "argv", argv)
        env = {check_env_name(k): check_env_value(k, v) for k, v in dict(self.env).items()}
        object.__setattr__(self, "env", env)
        if not isinstance(self.cwd, str) or not os.path.isabs(self.cwd):
            raise BadRequest(f"cwd must be an absolute path, not {self.cwd!r}", code="bad_spec")
        grace = _finite_nonneg("kill_grace_s", self.kill_grace_s)
        margin = _finite_nonneg("stop_margin_s", self.stop_margin_s)
        if margin < grace:
            raise BadRequest(
                f"stop_margin_s ({margin}) is below kill_grace_s ({grace}): the task could "
                "outlive its lease; raise the margin",
                code="bad_spec",
            )
        object.__setattr__(self, "kill_grace_s", grace)
        object.__setattr__(self, "stop_margin_s", margin)
        cap = self.output_cap_bytes
        if (
            isinstance(cap, bool)
            or not isinstance(cap, int)
            or not 0 <= cap <= MAX_OUTPUT_CAP_BYTES
        ):
            raise BadRequest(
                f"output_cap_bytes must be an integer in 0..{MAX_OUTPUT_CAP_BYTES}, not {cap!r}",
                code="bad_spec",
            )
        if self.isolation not in ISOLATION_PREFERENCES:
            raise BadRequest(
                f"isolation must be one of {', '.join(ISOLATION_PREFERENCES)}, "
                f"not {self.isolation!r}",
                code="bad_spec",
            )
        if self.cgroup_parent is not None and (
            not isinstance(self.cgroup_parent, str) or not os.path.isabs(self.cgroup_parent)
        ):
            raise BadRequest(
                f"cgroup_parent must be an absolute path, not {self.cgroup_parent!r}",
                code="bad_spec",
            )

    def to_json(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, **record_json(self, nulls=True)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskSpec:
        if not isinstance(data, Mapping):
            raise BadRequest("spec must be a JSON object", code="bad_spec")
        try:
            return cls(
                task_id=data["task_id"],
                attempt=data["attempt"],
                argv=tuple(data["argv"]),
                env=data["env"],
                cwd=data["cwd"],
                stop_margin_s=data["stop_margin_s"],
                kill_grace_s=data["kill_grace_s"],
                output_cap_bytes=data.get("output_cap_bytes", DEFAULT_OUTPUT_CAP_BYTES),
                isolation=data.get("isolation", "auto"),
                cgroup_parent=data.get("cgroup_parent"),
            )
        except KeyError as exc:
            raise BadRequest(f"spec lacks the field {exc.args[0]}", code="bad_spec") from exc
        except TypeError as exc:
            raise BadRequest(f"spec has a field of the wrong type: {exc}", code="bad_spec") from exc


@dataclass(frozen=True, slots=True)
class StreamTotals(FieldsRecord):
    """How much a stream produced, and how much of its tail is kept."""

    total_bytes: int = 0
    kept_bytes: int = 0

    @classmethod
    def from_json(cls, data: Any) -> StreamTotals:
        if not isinstance(data, Mapping):
            return cls()
        return cls(int(data.get("total_bytes", 0)), int(data.get("kept_bytes", 0)))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class SupervisorState:
    """``state.json``: what the supervisor did, rewritten atomically at each step.

    Times ending in ``_boot`` are ``CLOCK_BOOTTIME`` seconds (this boot only); ``_wall``
    are UTC seconds since the epoch. ``supervisor_starttime_ticks`` and
    ``child_starttime_ticks`` are field 22 of ``/proc/PID/stat``: with the pid they name
    one process for the life of the machine (pid reuse guard).
    """

    task_id: str
    attempt: int
    supervisor_pid: int
    supervisor_starttime_ticks: int
    status: Status
    isolation: Isolation | None = None
    cgroup: str | None = None
    child_pid: int | None = None
    child_starttime_ticks: int | None = None
    pgid: int | None = None
    started_at_boot: float | None = None
    started_at_wall: float | None = None
    deadline_boot: float | None = None
    stop_reason: StopReason | None = None
    stop_requested_at_boot: float | None = None
    sigkill_at_boot: float | None = None
    stopped_at_boot: float | None = None
    stopped_at_wall: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    stdout: StreamTotals = field(default_factory=StreamTotals)
    stderr: StreamTotals = field(default_factory=StreamTotals)
    updated_at_wall: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            **record_json(self, omit=("stdout", "stderr", "updated_at_wall"), nulls=True),
            "output": {"stdout": self.stdout.to_json(), "stderr": self.stderr.to_json()},
            "updated_at_wall": self.updated_at_wall,
        }

    @classmethod
    def from_json(cls, data: Any) -> SupervisorState:
        """Parse ``state.json``; raise ``ValueError`` when it is not a state."""
        if not isinstance(data, Mapping):
            raise ValueError("state is not a JSON object")
        status = data.get("status")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        stop_reason = data.get("stop_reason")
        if stop_reason is not None and stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {stop_reason!r}")
        isolation = data.get("isolation")
        if isolation not in (None, "cgroup", "process_group"):
            raise ValueError(f"unknown isolation {isolation!r}")
        output = data.get("output") or {}
        try:
            return cls(
                task_id=str(data["task_id"]),
                attempt=int(data["attempt"]),
                supervisor_pid=int(data["supervisor_pid"]),
                supervisor_starttime_ticks=int(data["supervisor_starttime_ticks"]),
                status=status,
                isolation=isolation,
                cgroup=data.get("cgroup"),
                child_pid=_opt_int(data.get("child_pid")),
                child_starttime_ticks=_opt_int(data.get("child_starttime_ticks")),
                pgid=_opt_int(data.get("pgid")),
                started_at_boot=_opt_float(data.get("started_at_boot")),
                started_at_wall=_opt_float(data.get("started_at_wall")),
                deadline_boot=_opt_float(data.get("deadline_boot")),
                stop_reason=stop_reason,
                stop_requested_at_boot=_opt_float(data.get("stop_requested_at_boot")),
                sigkill_at_boot=_opt_float(data.get("sigkill_at_boot")),
                stopped_at_boot=_opt_float(data.get("stopped_at_boot")),
                stopped_at_wall=_opt_float(data.get("stopped_at_wall")),
                exit_code=_opt_int(data.get("exit_code")),
                signal=_opt_int(data.get("signal")),
                error=data.get("error"),
                stdout=StreamTotals.from_json(output.get("stdout")),
                stderr=StreamTotals.from_json(output.get("stderr")),
                updated_at_wall=_opt_float(data.get("updated_at_wall")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state lacks or garbles a field: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How a supervised task ended.

    ``exit_code`` is set when the command exited (or could not be started: 127 not found,
    126 not executable); ``signal`` when a signal ended it. ``deadline_boot`` is the
    deadline in force when the supervisor decided to stop (None if it never did).
    """

    task_id: str
    attempt: int
    stop_reason: StopReason
    exit_code: int | None
    signal: int | None
    isolation: Isolation | None
    started_at_boot: float | None
    started_at_wall: float | None
    stopped_at_boot: float | None
    stopped_at_wall: float | None
    deadline_boot: float | None
    stdout_total_bytes: int
    stderr_total_bytes: int
    error: str | None = None

    @classmethod
    def from_state(cls, state: SupervisorState) -> TaskOutcome:
        if state.status != "exited" or state.stop_reason is None:
            raise ValueError("the task has not ended yet")
        return cls(
            task_id=state.task_id,
            attempt=state.attempt,
            stop_reason=state.stop_reason,
            exit_code=state.exit_code,
            signal=state.signal,
            isolation=state.isolation,
            started_at_boot=state.started_at_boot,
            started_at_wall=state.started_at_wall,
            stopped_at_boot=state.stopped_at_boot,
            stopped_at_wall=state.stopped_at_wall,
            deadline_boot=state.deadline_boot,
            stdout_total_bytes=state.stdout.total_bytes,
            stderr_total_bytes=state.stderr.total_bytes,
            error=state.error,
        )


__all__ = [
    "DEFAULT_OUTPUT_CAP_BYTES",
    "MAX_OUTPUT_CAP_BYTES",
    "RECORD_VERSION",
    "Isolation",
    "IsolationPreference",
    "Status",
    "StopReason",
    "Stream",
    "StreamTotals",
    "SupervisorState",
    "TaskOutcome",
    "TaskSpec",
]
