"""How the CLI words a task (``cli/task_text.py``): pure, so every case is a record built
with the core's own task machine and a time."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping

import pytest

from populi_peer.cli.cmd_run import StatusLine
from populi_peer.cli.task_text import exit_text, failure_text, waiting_text
from populi_peer.core.fencing import FencingToken
from populi_peer.core.messages import AttemptResult, TaskLeaseGrant, TaskView, TaskWaiting
from populi_peer.core.tasks import (
    Cancel,
    ControlPlaneUnreachable,
    GrantRefused,
    LeaseLost,
    PlacedLocal,
    PlacedRemote,
    PlacementFailed,
    PlacementStarted,
    Result,
    Task,
    TaskEvent,
    TaskOptions,
    exit_status,
)

T0 = 1_700_000_000_000
TOKEN = FencingToken(1, 4)


def task_of(*events: TaskEvent, gpus: int = 1, **options: object) -> Task:
    task = Task.new(
        "t-1",
        command=("foo",),
        env={},
        gpus_wanted=gpus,
        work_class="inference",
        created_wall_ms=T0,
        options=TaskOptions(**options),  # type: ignore[arg-type]
    )
    for i, event in enumerate(events, start=1):
        task = task.apply(event, now_wall_ms=T0 + i * 1000)
    return task


def view(task: Task, results: Mapping[str, AttemptResult] | None = None) -> TaskView:
    grants: Mapping[str, TaskLeaseGrant] = {}
    return TaskView.of(
        task, results=results or {}, leases=grants, exit_status=exit_status(task), active=True
    )


def spawn_failed(detail: str, code: int) -> AttemptResult:
    return AttemptResult(
        task_id="t-1",
        attempt=1,
        node="n-here",
        role="local",
        outcome="spawn_failed",
        exit_code=code,
        detail=detail,
    )


def test_exit_text_never_says_none() -> None:
    running = view(task_of(PlacementStarted()))
    assert exit_text(running) == "placing"
    done = view(task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, 3)))
    assert exit_text(done) == "exit 3"


def test_a_command_that_could_not_start_says_why() -> None:
    task = task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, 127))
    shown = view(task, {"1": spawn_failed("command not found: foo", 127)})
    assert failure_text(shown) == "exit 127: command not found: foo"


def test_a_task_that_was_never_placed_says_the_decision() -> None:
    task = task_of(
        PlacementStarted(), PlacementFailed(("no_free_gpu",), "no GPU is free on n-here")
    )
    assert failure_text(view(task)) == (
        "exit 4: placement_failed, no_free_gpu (no GPU is free on n-here)"
    )
    pinned = task_of(
        PlacementStarted(),
        PlacedLocal("n-here", ("node_pinned_unavailable", "node_ineligible")),
        node="n-w1",
    )
    text = failure_text(view(pinned))
    assert text is not None and text.startswith("exit 4: placed_local, node_pinned_unavailable")
    assert "--node n-w1: the task runs only there" in text


def test_cancelled_signalled_and_plain_failures() -> None:
    cancelled = task_of(PlacementStarted(), Cancel(actor="op-1"))
    assert failure_text(view(cancelled)) == "exit 130: cancelled by op-1"
    killed = task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, None, 9))
    assert failure_text(view(killed)) == "exit 137: killed by signal 9"
    plain = task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, 2))
    assert failure_text(view(plain)) == "exit 2: the command exited with 2"
    ok = task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, 0))
    assert failure_text(view(ok)) is None


@pytest.mark.parametrize(
    ("events", "options", "now_s", "expected"),
    [
        (
            (PlacementStarted(),),
            {"queue_timeout_s": 600.0},
            60,
            "populi: t-1 queued for 1 GPU(s); 9m left of --queue-timeout",
        ),
        (
            (PlacementStarted(), GrantRefused("n-w1", ("no_free_gpu",))),
            {},
            5,
            "populi: t-1 queued for 1 GPU(s)",
        ),
        (
            (PlacementStarted(), GrantRefused("n-w1", ("node_not_reported",))),
            {"timeout_s": 3600.0},
            10,
            "populi: t-1 waiting for n-w1's report (node_not_reported); 59m50s left of --timeout",
        ),
        (
            (PlacementStarted(), PlacedRemote("n-w1", "L1", TOKEN), ControlPlaneUnreachable()),
            {},
            5,
            "populi: t-1 no control plane: fallback_pending: waiting for the control plane's "
            "word on attempt 1 on n-w1 (control_plane_unreachable)",
        ),
        (
            (
                PlacementStarted(),
                PlacedRemote("n-w1", "L1", TOKEN),
                LeaseLost("worker_left", "the worker left the cluster"),
            ),
            {},
            5,
            "populi: t-1 fallback_pending: waiting for the control plane's word on attempt 1 "
            "on n-w1 (lease_lost, worker_left (the worker left the cluster))",
        ),
        (
            (PlacementStarted(), PlacedRemote("n-w1", "L1", TOKEN)),
            {},
            5,
            "populi: t-1 starting on n-w1 (remote, token 1.4)",
        ),
        ((PlacementStarted(),), {}, 1, "populi: t-1 placing"),
        (
            (PlacementStarted(),),
            {"queue_timeout_s": 2.0},
            1.2,
            "populi: t-1 queued for 1 GPU(s); 1s left of --queue-timeout",
        ),
        (
            (PlacementStarted(),),
            {"queue_timeout_s": 2.0},
            3,
            "populi: t-1 queued for 1 GPU(s); 0s left of --queue-timeout",
        ),
    ],
)
def test_the_waiting_line(
    events: tuple[TaskEvent, ...], options: dict[str, object], now_s: float, expected: str
) -> None:
    assert waiting_text(view(task_of(*events, **options)), int(T0 + now_s * 1000)) == expected


def test_no_waiting_line_once_the_task_speaks_or_ended() -> None:
    remote = view(task_of(PlacementStarted(), PlacedRemote("n-w1", "L1", TOKEN)))
    assert waiting_text(remote, T0, output_seen=True) is None
    local = view(task_of(PlacementStarted(), PlacedLocal("n-here", ())))
    assert waiting_text(local, T0) is None
    done = view(task_of(PlacementStarted(), PlacedLocal("n-here", ()), Result(1, None, 0)))
    assert waiting_text(done, T0) is None


def test_no_control_plane() -> None:
    """A grant that went unanswered waits for the control plane's word (no attempt)."""
    task = task_of(PlacementStarted(), ControlPlaneUnreachable("grant: connect refused"))
    assert waiting_text(view(task), T0) == (
        "populi: t-1 no control plane: fallback_pending: waiting for the control plane's "
        "word on a grant whose answer was lost (control_plane_unreachable (grant: connect "
        "refused))"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_updates_in_place_on_a_terminal_and_is_silent_when_piped() -> None:
    terminal = Terminal()
    line = StatusLine(terminal)
    line.show("populi: t-1 placing")
    line.show("populi: t-1 placing")  # unchanged: nothing written
    line.show("populi: t-1 queued for 1 GPU(s)")
    line.clear()
    assert terminal.getvalue() == (
        "\r\x1b[Kpopuli: t-1 placing\r\x1b[Kpopuli: t-1 queued for 1 GPU(s)\r\x1b[K"
    )
    piped = io.StringIO()
    quiet = StatusLine(piped)
    quiet.show("populi: t-1 placing")
    quiet.clear()
    assert piped.getvalue() == ""


@pytest.mark.parametrize(
    ("reason", "until_s", "expected"),
    [
        ("control_plane_unreachable", None, "no control plane: waiting for it to answer"),
        ("node_not_reported", 12, "waiting for a node's report (node_not_reported); 12s left"),
        (
            "previous_node_not_reported",
            None,
            "waiting for a node's report (previous_node_not_reported)",
        ),
        ("no_free_gpu", None, "queued for 1 GPU(s)"),
    ],
)
def test_the_waiting_line_says_what_the_driver_waits_for_now(
    reason: str, until_s: float | None, expected: str
) -> None:
    """The submitter's ``waiting`` (task show) comes before the decision log: a restarted
    control plane's per-node resumption, no control plane at all, a busy GPU."""
    task = view(task_of(PlacementStarted()))
    until = None if until_s is None else int(T0 + until_s * 1000)
    waiting = TaskWaiting(reason=reason, until_wall_ms=until, since_wall_ms=T0)
    line = waiting_text(dataclasses.replace(task, waiting=waiting), T0)
    assert line == f"populi: t-1 {expected}"
