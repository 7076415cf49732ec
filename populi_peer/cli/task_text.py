"""How the CLI words a task: its exit, why it failed, and what ``populi run`` is waiting
for. One place for these rules: ``populi run``, ``tasks``, ``task show`` and ``task wait``
all render through it. Pure: a :class:`~populi_peer.core.messages.TaskView` and the time
in, text out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from populi_peer.core.durations import format_duration

if TYPE_CHECKING:
    from populi_peer.core.messages import TaskView
    from populi_peer.core.tasks import ReasonEntry

#: Decision-log rows that say nothing about why a task ended or waits.
_PLAIN_ROWS = frozenset({"submitted", "placing"})
#: Reason codes of a grant that waits for a node's report or the control plane's hold.
_REPORT_WAITS = frozenset(
    {"node_not_reported", "previous_node_not_reported", "previous_authority_live"}
)
_GPU_WAITS = frozenset({"no_free_gpu", "gpu_leased"})


def exit_text(task: TaskView) -> str:
    """``exit N`` once the task ended, else its state (never ``exit None``)."""
    return task.state if task.exit_status is None else f"exit {task.exit_status}"


def _last_decision(task: TaskView) -> tuple[ReasonEntry, ...]:
    """The rows of the last decision that says something (same time, plain rows out)."""
    rows = [r for r in task.reasons if r.code not in _PLAIN_ROWS]
    if not rows:
        return ()
    at = rows[-1].at_wall_ms
    return tuple(r for r in rows if r.at_wall_ms == at)


def _codes_and_detail(rows: tuple[ReasonEntry, ...]) -> str:
    codes: list[str] = []
    details: list[str] = []
    for row in rows:
        if row.code not in codes:
            codes.append(row.code)
        if row.detail and row.detail not in details and not row.detail.startswith("node="):
            details.append(row.detail)
    text = ", ".join(codes)
    return text + (f" ({'; '.join(details)})" if details else "")


def failure_text(task: TaskView) -> str | None:
    """Why a finished task did not succeed, in one line; None while it runs or when it
    succeeded. A command that could not be started says so (``exit 127: command not
    found: foo``); a task that never ran says the decision that ended it."""
    status = task.exit_status
    if status is None or status == 0:
        return None
    result = task.results.get(str(len(task.attempts))) if task.attempts else None
    if result is not None and result.outcome == "spawn_failed" and result.detail:
        return f"exit {status}: {result.detail}"
    if task.state == "cancelled":
        rows = [r for r in task.reasons if r.code == "cancelled"]
        who = rows[-1].detail.removeprefix("by=") if rows and rows[-1].detail else ""
        return f"exit {status}: cancelled" + (f" by {who}" if who else "")
    if task.state == "timed_out":
        return f"exit {status}: {task.terminal_reason or 'timed out'}"
    if task.signal is not None:
        return f"exit {status}: killed by signal {task.signal}"
    if task.exit_code is not None:
        return f"exit {status}: the command exited with {task.exit_code}"
    return f"exit {status}: {_codes_and_detail(_last_decision(task)) or task.terminal_reason}"


def _left(deadline_ms: float, now_ms: int) -> str:
    """Whole seconds left, rounded up (a line redrawn a few times a second)."""
    seconds = max(0, math.ceil((deadline_ms - now_ms) / 1000))
    return format_duration(seconds) if seconds else "0s"


def waiting_text(task: TaskView, now_ms: int, *, output_seen: bool = False) -> str | None:
    """What ``populi run`` shows on its one updating line while nothing else is said:
    queued for a GPU, waiting for a node's report or for the control plane, a remote start,
    ``fallback_pending``; with the time left where there is a deadline. None when there is
    nothing to wait for (the task runs and speaks for itself, or it ended)."""
    options = task.options
    if task.exit_status is not None:
        return None
    parts: list[str] = []
    state = task.state
    rows = _last_decision(task)
    codes = {r.code for r in rows}
    current = task.attempts[-1] if task.attempts else None
    waiting = task.waiting
    if state in ("queued", "placing") and waiting is not None:
        # What the driver waits for right now (not yet in the decision log).
        if waiting.reason == "control_plane_unreachable":
            parts.append("no control plane: waiting for it to answer")
        elif waiting.reason in _REPORT_WAITS:
            parts.append(f"waiting for a node's report ({waiting.reason})")
        elif waiting.reason == "no_free_gpu":
            parts.append(f"queued for {task.gpus_wanted} GPU(s)")
        else:
            parts.append(f"waiting ({waiting.reason})")
        if waiting.until_wall_ms is not None:
            parts.append(f"{_left(waiting.until_wall_ms, now_ms)} left")
        elif waiting.reason == "no_free_gpu" and options.queue_timeout_s:
            deadline = task.created_wall_ms + options.queue_timeout_s * 1000
            parts.append(f"{_left(deadline, now_ms)} left of --queue-timeout")
    elif state in ("queued", "placing"):
        if "control_plane_unreachable" in codes:
            parts.append("no control plane: waiting for it to answer")
        elif codes & _REPORT_WAITS:
            node = next((r.detail for r in rows if r.detail.startswith("node=")), "")
            which = f"{node.removeprefix('node=')}'s" if node else "the node's"
            parts.append(f"waiting for {which} report ({', '.join(sorted(codes & _REPORT_WAITS))})")
        elif task.gpus_wanted and (codes & _GPU_WAITS or options.queue_timeout_s):
            parts.append(f"queued for {task.gpus_wanted} GPU(s)")
            if options.queue_timeout_s:
                deadline = task.created_wall_ms + options.queue_timeout_s * 1000
                parts.append(f"{_left(deadline, now_ms)} left of --queue-timeout")
        else:
            parts.append("placing")
    elif state == "fallback_pending":
        why = _codes_and_detail(rows) if rows else ""
        what = (
            f"attempt {current.n} on {current.node}"
            if current is not None
            else "a grant whose answer was lost"
        )
        no_cp = "control_plane_unreachable" in codes
        parts.append(
            ("no control plane: " if no_cp else "")
            + f"fallback_pending: waiting for the control plane's word on {what}"
            + (f" ({why})" if why else "")
        )
    elif state == "running_remote" and current is not None and not output_seen:
        parts.append(f"starting on {current.node} (remote, token {current.token})")
    else:
        return None
    if options.timeout_s:
        deadline = task.created_wall_ms + options.timeout_s * 1000
        parts.append(f"{_left(deadline, now_ms)} left of --timeout")
    return f"populi: {task.task_id} " + "; ".join(parts)


__all__ = ["exit_text", "failure_text", "waiting_text"]
