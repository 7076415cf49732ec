"""``populi run``, ``populi tasks``, ``populi task show|wait|logs|cancel``.

``populi run`` passes the task's exit code through; the others are the README's table
(:data:`RUN_EPILOG`): 2 usage, 3 no agent, 4 refused (bad input, an unknown or unavailable
``--node``, a task that could not be placed where it may run), 124 ``--timeout``, 125
Populi failed, 126/127 the command could not be run, 128+N signal N, 130 cancelled.
How a task is worded (exit, failure, the waiting line) is :mod:`populi_peer.cli.task_text`.

The agent's answers are read as their typed messages (``TaskAnswer``,
``TaskOutputAnswer``...): an answer this CLI cannot read is one clear error line
(``bad_peer_answer``), never a trace.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    agent_call,
    open_local,
    print_answer,
    print_json,
    print_listing,
    print_table,
    utc_text,
)
from populi_peer.cli.placement_flags import (
    add_need_flags,
    need_payload,
    needs_line,
    rejected_lines,
)
from populi_peer.cli.task_text import exit_text, failure_text, waiting_text
from populi_peer.core.durations import parse_duration
from populi_peer.core.tasks import EXIT_POPULI_FAILED
from populi_peer.errors import PopuliError, UsageError

if TYPE_CHECKING:
    from populi_peer.cli.common import Local
    from populi_peer.core.messages import TaskView

WORK_CLASSES = ("agent", "inference", "training", "collective")
RUN_FAILED = EXIT_POPULI_FAILED
RUN_EPILOG = (
    "Exit codes: the task's own; 2 usage; 3 no agent running; 4 refused (bad input, unknown "
    "or unavailable --node, no GPU where the task may run); 124 --timeout; 125 Populi "
    "failed; 126/127 the command could not be run; 128+N killed by signal N; 130 cancelled."
)
#: How often ``populi run`` and ``task logs --follow`` look for new output.
POLL_S = 0.3
#: How long the last output may lag a finished attempt's result (a worker delivering).
OUTPUT_LAG_S = 3.0


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a command on a remote GPU under a lease, or locally",
        description="Run CMD on the best node (remote under a fenced lease, or here), stream its output, exit with its code.",
        epilog=RUN_EPILOG,
    )
    run.add_argument("--gpus", type=int, default=0, help="GPUs the task needs (default 0)")
    run.add_argument(
        "--class",
        dest="work_class",
        choices=WORK_CLASSES,
        default=None,
        help="work class for the policy matrix (default: inference with GPUs, agent without)",
    )
    run.add_argument(
        "--node",
        default=None,
        help="run only on this node (id or name); refused (exit 4) when it cannot take it",
    )
    run.add_argument(
        "--node-fallback",
        action="store_true",
        help="with --node: run here instead when that node cannot take the task",
    )
    run.add_argument(
        "--cwd",
        default=None,
        metavar="DIR",
        help="run in DIR on the node that runs it (default: a fresh directory); "
        "a node without DIR refuses the task (cwd_missing)",
    )
    add_need_flags(run)
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="pass this variable to the task (repeatable); nothing else of your environment is passed",
    )
    run.add_argument(
        "--no-fallback", action="store_true", help="fail (exit 4) instead of running locally"
    )
    run.add_argument(
        "--queue-timeout",
        default=None,
        metavar="DUR",
        help="keep retrying placement this long when no GPU is free (e.g. 10m)",
    )
    run.add_argument(
        "--timeout", default=None, metavar="DUR", help="stop the task after this long (exit 124)"
    )
    run.add_argument("--detach", action="store_true", help="print the task id and return")
    add_data_dir(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(handler=run_run)

    tasks = subparsers.add_parser("tasks", help="tasks submitted on this node, newest first")
    tasks.add_argument("--state", default=None, help="only tasks in this state")
    tasks.add_argument("--limit", type=int, default=50)
    add_data_dir(tasks)
    add_json(tasks)
    tasks.set_defaults(handler=run_tasks)

    task = subparsers.add_parser("task", help="show, wait for or cancel a task")
    verbs = task.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="attempts, placement and fallback reasons, lease history")
    show.add_argument("task_id")
    add_data_dir(show)
    add_json(show)
    show.set_defaults(handler=run_show)
    wait = verbs.add_parser(
        "wait", help="wait until the tasks end; exit with the first failure's status"
    )
    wait.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    wait.add_argument(
        "--timeout", default=None, metavar="DUR", help="give up after this long (exit 124)"
    )
    add_data_dir(wait)
    add_json(wait)
    wait.set_defaults(handler=run_wait)
    logs = verbs.add_parser(
        "logs", help="stdout and stderr of a task, from wherever it ran (--follow: until it ends)"
    )
    logs.add_argument("task_id")
    logs.add_argument(
        "--attempt", type=int, default=0, metavar="N", help="this attempt (default: every one)"
    )
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the task ends"
    )
    add_data_dir(logs)
    logs.set_defaults(handler=run_logs)
    cancel = verbs.add_parser(
        "cancel", help="cancel a task (remote and local attempts are stopped)"
    )
    cancel.add_argument("task_id")
    add_data_dir(cancel)
    add_json(cancel)
    cancel.set_defaults(handler=run_cancel)


def _env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {pair!r}: use K=V")
        env[name] = value
    return env


def run_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        sys.stderr.write(
            "populi run: error: give the command after --, e.g. populi run -- python infer.py\n"
        )
        return 2
    try:
        payload: dict[str, Any] = {
            "command": command,
            "env": _env(args.env),
            "gpus": args.gpus,
            "no_fallback": args.no_fallback,
        }
        if args.gpus < 0:
            raise UsageError("--gpus must be 0 or more")
        if args.work_class:
            payload["work_class"] = args.work_class
        if args.node:
            payload["node"] = args.node
        if args.node_fallback:
            if not args.node:
                raise UsageError("--node-fallback needs --node")
            payload["node_fallback"] = True
        if args.cwd is not None:
            # Relative to where you type it; the node that runs the task must have it.
            payload["cwd"] = os.path.abspath(os.path.expanduser(args.cwd))
        payload.update(need_payload(args))
        if args.queue_timeout:
            payload["queue_timeout_s"] = parse_duration(args.queue_timeout, flag="--queue-timeout")
        if args.timeout:
            payload["timeout_s"] = parse_duration(args.timeout, flag="--timeout")
    except UsageError as exc:
        sys.stderr.write(f"populi run: error: {exc}\n")
        return 2
    try:
        local = open_local(args)
    except PopuliError as exc:
        sys.stderr.write(f"populi run: error: {exc}\n")
        return exc.exit_code
    from populi_peer.core.messages import TaskAnswer

    try:
        try:
            task = local.call_agent("POST", "/v1/populi/tasks", payload, answer=TaskAnswer).task
        except PopuliError as exc:
            # No agent: 3; refused (an unknown --node, bad input): 4; else 125.
            sys.stderr.write(f"populi run: error: {exc}\n")
            return exc.exit_code
        task_id = task.task_id
        if args.detach:
            sys.stdout.write(task_id + "\n")
            return 0
        return _follow(local, task_id)
    finally:
        local.close()


class StatusLine:
    """The one updating line ``populi run`` keeps on a terminal (``\\r``, cleared before
    any output); nothing at all when stderr is not a terminal."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.active = bool(getattr(stream, "isatty", lambda: False)())
        self.shown = ""

    def show(self, text: str | None) -> None:
        if not self.active or text == self.shown:
            return
        if not text:
            self.clear()
            return
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = text

    def clear(self) -> None:
        if self.active and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = ""


def _follow(local: Local, task_id: str) -> int:
    """Stream the task's output until it ends; Ctrl-C cancels it (remote and local). A
    task that ends without any attempt (refused, not placed) returns at once."""
    from populi_peer.core.messages import TaskCancelAnswer

    offsets = {"stdout": 0, "stderr": 0}
    seen = 0
    cancelled = False
    ended_at: float | None = None
    output_seen = False
    line = StatusLine(sys.stderr)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            try:
                done, latest, state, wrote = _pump(local, task_id, offsets, seen, line)
                output_seen = output_seen or wrote
                if latest > seen:
                    # A new attempt (placement, or the fallback after a dead lease).
                    line.clear()
                    _announce(local, task_id, latest)
                    seen = latest
                    output_seen = False
                    offsets.update(stdout=0, stderr=0)
                    continue
                if state in TERMINAL:
                    if not seen:
                        break  # it never started: nothing more will come
                    ended_at = ended_at or time.monotonic()
                    # The last output may lag its result a moment (a worker still delivering).
                    if done or time.monotonic() - ended_at > OUTPUT_LAG_S:
                        break
                elif line.active:
                    view = _task(local, task_id)
                    line.show(waiting_text(view, _now_ms(), output_seen=output_seen))
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                line.clear()
                if cancelled:
                    raise
                cancelled = True
                sys.stderr.write(f"populi: cancelling {task_id}...\n")
                try:
                    local.call_agent(
                        "POST",
                        f"/v1/populi/tasks/{task_id}/cancel",
                        {},
                        timeout_s=60.0,
                        answer=TaskCancelAnswer,
                    )
                except PopuliError as exc:
                    sys.stderr.write(f"populi run: error: could not cancel: {exc}\n")
                    return RUN_FAILED
            except PopuliError as exc:
                line.clear()
                sys.stderr.write(
                    f"populi run: error: lost the agent while following {task_id}: {exc}\n"
                )
                return RUN_FAILED
    finally:
        line.clear()
        signal.signal(signal.SIGINT, previous)
    task = _task(local, task_id)
    _summary(task)
    status = task.exit_status
    return RUN_FAILED if status is None else int(status)


TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _task(local: Local, task_id: str) -> TaskView:
    from populi_peer.core.messages import TaskAnswer

    return local.call_agent("GET", f"/v1/populi/tasks/{task_id}", answer=TaskAnswer).task


def _pump(
    local: Local,
    task_id: str,
    offsets: dict[str, int],
    seen: int,
    line: StatusLine | None = None,
) -> tuple[bool, int, str, bool]:
    """Print what attempt ``seen`` wrote since ``offsets``; returns (its output is
    complete, the latest attempt, the task's state, something was printed)."""
    from populi_peer.core.messages import TaskOutputAnswer

    done = True
    latest = 0
    state = ""
    wrote = False
    for stream, sink in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        params: dict[str, Any] = {"stream": stream, "offset": offsets[stream]}
        if seen:
            params["attempt"] = seen
        answer = local.call_agent(
            "GET", f"/v1/populi/tasks/{task_id}/output", params=params, answer=TaskOutputAnswer
        )
        latest, state = answer.latest_attempt, answer.task_state
        if not seen:
            return False, latest, state, False
        chunk = answer.chunk
        data = base64.b64decode(chunk.data_b64)
        if data:
            if line is not None:
                line.clear()
            sink.buffer.write(data)
            sink.flush()
            wrote = True
        offsets[stream] = chunk.next_offset
        done = done and chunk.done
    return done, latest, state, wrote


def _announce(local: Local, task_id: str, n: int) -> None:
    attempt = _task(local, task_id).attempts[n - 1]
    why = ", ".join(attempt.placement_reasons) or "-"
    sys.stderr.write(f"populi: {task_id} attempt {n}: {attempt.where} on {attempt.node} ({why})\n")
    sys.stderr.flush()


def _summary(task: TaskView) -> None:
    """One line on stderr once the task ended: why it failed (the reason, not just a
    code), and where each attempt ran. Nothing for a plain local success."""
    attempts = task.attempts
    if (
        task.state == "succeeded"
        and len(attempts) <= 1
        and (not attempts or attempts[0].where == "local")
    ):
        return
    parts = [f"attempt {a.n} {a.where} on {a.node} -> {a.outcome or 'running'}" for a in attempts]
    story = "; ".join(parts) or "no attempt started"
    failure = failure_text(task)
    why = f": {failure}" if failure else f" ({task.terminal_reason or task.state})"
    sys.stderr.write(f"populi: {task.task_id} {task.state}{why}; {story}\n")


def run_tasks(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TaskListAnswer

    params: dict[str, Any] = {"limit": args.limit}
    if args.state:
        params["state"] = args.state
    answer = agent_call(args, "GET", "/v1/populi/tasks", params=params, answer=TaskListAnswer)
    rows = []
    for t in answer.tasks:
        last = t.attempts[-1] if t.attempts else None
        where = f"{last.where}:{last.node}" if last else "-"
        rows.append(
            (
                t.task_id,
                t.state,
                "-" if t.exit_status is None else t.exit_status,
                where,
                len(t.attempts),
                utc_text(t.created_wall_ms),
                " ".join(t.command)[:40],
            )
        )
    print_listing(
        args, answer, rows, ["id", "state", "exit", "where", "attempts", "submitted", "command"]
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TaskAnswer

    task = agent_call(args, "GET", f"/v1/populi/tasks/{args.task_id}", answer=TaskAnswer).task
    if args.json:
        print_json(task.to_json())
        return 0
    out = sys.stdout
    out.write(
        f"task      {task.task_id}  {task.state}"
        + (f" ({task.terminal_reason})" if task.terminal_reason else "")
        + "\n"
    )
    out.write(f"command   {' '.join(task.command)}\n")
    out.write(f"gpus      {task.gpus_wanted}   class {task.work_class}   {exit_text(task)}\n")
    if task.options.cwd:
        out.write(f"cwd       {task.options.cwd}\n")
    if task.options.node:
        fallback = "  (--node-fallback)" if task.options.node_fallback else ""
        out.write(f"node      {task.options.node}{fallback}\n")
    failure = failure_text(task)
    if failure:
        out.write(f"why       {failure}\n")
    needs = needs_line(task)
    if needs:
        out.write(f"needs     {needs}\n")
    rows = [
        (
            a.n,
            a.where,
            a.node,
            str(a.token) if a.token is not None else "-",
            a.lease_id or "-",
            ",".join(a.placement_reasons) or "-",
            a.outcome or "running",
            utc_text(a.started_wall_ms),
            utc_text(a.finished_wall_ms),
        )
        for a in task.attempts
    ]
    if rows:
        out.write("\n")
        print_table(
            rows,
            ["n", "where", "node", "token", "lease", "reasons", "outcome", "started", "finished"],
        )
    rejected = rejected_lines(task)
    if rejected:
        out.write("\nnodes refused:\n" + "\n".join(rejected) + "\n")
    out.write("\ndecisions:\n")
    for entry in task.reasons:
        detail = f"  {entry.detail}" if entry.detail else ""
        out.write(f"  {utc_text(entry.at_wall_ms)}  {entry.code}{detail}\n")
    return 0


def run_wait(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TaskAnswer

    deadline = (
        time.monotonic() + parse_duration(args.timeout, flag="--timeout") if args.timeout else None
    )
    local = open_local(args)
    results: list[TaskView] = []
    try:
        for task_id in args.task_ids:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    sys.stderr.write(f"populi: error: {task_id} did not end within --timeout\n")
                    return 124
                wait_s = 30 if remaining is None else max(1, min(30, int(remaining)))
                task = local.call_agent(
                    "GET",
                    f"/v1/populi/tasks/{task_id}",
                    params={"wait_s": wait_s},
                    timeout_s=wait_s + 15,
                    answer=TaskAnswer,
                ).task
                if task.exit_status is not None:
                    results.append(task)
                    break
    finally:
        local.close()
    if args.json:
        print_json({"tasks": [task.to_json() for task in results]})
    else:
        for task in results:
            sys.stdout.write(f"{task.task_id}  {task.state}  {exit_text(task)}\n")
            failure = failure_text(task)
            if failure:
                sys.stderr.write(f"populi: {task.task_id}: {failure}\n")
    failures = [t.exit_status for t in results if t.exit_status]
    return int(failures[0]) if failures else 0


def run_logs(args: argparse.Namespace) -> int:
    """``task logs``: each attempt's stdout and stderr (to stdout and stderr), from the
    submitter's agent, which asks the worker that ran a remote attempt; ``--follow`` keeps
    printing until the task ends."""
    if args.attempt < 0:
        raise UsageError("--attempt must be 1 or more")
    local = open_local(args)
    try:
        task = _task(local, args.task_id)
        if args.attempt > len(task.attempts) and not args.follow:
            raise UsageError(f"task {args.task_id} has {len(task.attempts)} attempt(s)")
        n = args.attempt or 1
        while True:
            if n > len(task.attempts):
                if not args.follow or task.state in TERMINAL:
                    break
                time.sleep(POLL_S)
                task = _task(local, args.task_id)
                continue
            if not args.attempt and (len(task.attempts) > 1 or args.follow):
                attempt = task.attempts[n - 1]
                sys.stderr.write(f"populi: attempt {n}: {attempt.where} on {attempt.node}\n")
                sys.stderr.flush()
            _drain(local, args.task_id, n, follow=args.follow)
            if args.attempt:
                break
            n += 1
            task = _task(local, args.task_id)
    finally:
        local.close()
    return 0


def _drain(local: Local, task_id: str, n: int, *, follow: bool) -> None:
    """Print attempt ``n``'s output: what there is now, or (``follow``) until it is
    complete (or, once it ended, the output stopped coming)."""
    offsets = {"stdout": 0, "stderr": 0}
    ended_at: float | None = None
    while True:
        done, latest, state, wrote = _pump(local, task_id, offsets, n)
        if done:
            return
        if wrote:
            continue
        if not follow:
            return
        if state in TERMINAL or latest > n:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > OUTPUT_LAG_S:
                return
        time.sleep(POLL_S)


def run_cancel(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TaskCancelAnswer

    answer = agent_call(
        args,
        "POST",
        f"/v1/populi/tasks/{args.task_id}/cancel",
        {},
        timeout_s=60.0,
        answer=TaskCancelAnswer,
    )
    task = answer.task
    note = "" if answer.cancelled else " (it had already ended)"
    print_answer(args, answer, f"{task.task_id} is {task.state}{note}")
    return 0
