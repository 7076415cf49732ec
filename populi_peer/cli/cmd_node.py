"""``populi nodes``, ``populi events``, ``populi leave`` and ``populi node VERB NODE``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    agent_call,
    control_plane_call,
    open_local,
    print_answer,
    print_json,
    print_listing,
    print_table,
    utc_text,
)
from populi_peer.core.durations import format_duration, parse_duration
from populi_peer.errors import UsageError

if TYPE_CHECKING:
    from populi_peer.core.messages import EventsAnswer, EventView, NodeView

LIFECYCLE_VERBS = ("cordon", "drain", "maintenance", "quarantine", "resume")
#: The most events one page holds (the route's ``limit``).
MAX_EVENTS_PAGE = 1000
#: How long one ``--follow`` request waits at the agent for the next event.
FOLLOW_WAIT_S = 30
EVENT_HEADERS = ["when", "node", "id", "event", "who", "why"]


def register(subparsers: Any) -> None:
    nodes = subparsers.add_parser(
        "nodes", help="list the cluster's nodes (state, heartbeat, scope, GPUs)"
    )
    add_data_dir(nodes)
    add_json(nodes)
    nodes.set_defaults(handler=run_nodes)

    events = subparsers.add_parser(
        "events", help="who did what to which node, when and why (newest last)"
    )
    events.add_argument("--node", default=None, help="only this node (id or name)")
    events.add_argument(
        "--kind", default=None, help="only this kind, e.g. lifecycle, node_joined, settings_changed"
    )
    events.add_argument(
        "--since",
        default=None,
        help="only events since this UTC time (2026-12-01T18:00Z) or for this long (30m, 2d)",
    )
    events.add_argument(
        "--limit",
        type=int,
        default=200,
        help=f"the newest this many (default 200, at most {MAX_EVENTS_PAGE})",
    )
    events.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print new events as they happen (Ctrl-C ends)",
    )
    add_data_dir(events)
    add_json(events)
    events.set_defaults(handler=run_events)

    leave = subparsers.add_parser(
        "leave", help="this node leaves the cluster: stops its tasks, releases leases, says goodbye"
    )
    leave.add_argument("--reason", default="", help="why (recorded in events)")
    add_data_dir(leave)
    add_json(leave)
    leave.set_defaults(handler=run_leave)

    node = subparsers.add_parser(
        "node",
        help="operate on one node: cordon, drain, maintenance, quarantine, resume, retire, unretire, delete",
    )
    verbs = node.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in LIFECYCLE_VERBS + ("retire", "delete"):
        p = verbs.add_parser(verb, help=_HELP[verb])
        p.add_argument("node", metavar="NODE", help="node id or unique name")
        p.add_argument("--reason", default="", help="why (recorded with who and when)")
        if verb == "drain":
            p.add_argument(
                "--deadline", default=None, help="running work should be gone within this, e.g. 30m"
            )
        if verb == "maintenance":
            group = p.add_mutually_exclusive_group()
            group.add_argument(
                "--until", default=None, help="end at this UTC time, e.g. 2026-12-01T18:00Z"
            )
            group.add_argument(
                "--for-minutes", type=float, default=None, help="end after this many minutes"
            )
        add_data_dir(p)
        add_json(p)
        p.set_defaults(handler=run_node_verb, verb=verb)
    unretire = verbs.add_parser(
        "unretire", help="allow a retired node's name again (its old identity stays revoked)"
    )
    unretire.add_argument("name", metavar="NAME")
    add_data_dir(unretire)
    add_json(unretire)
    unretire.set_defaults(handler=run_unretire)


_HELP = {
    "cordon": "take no new work; running work continues",
    "drain": "take no new work; running work should end (optionally by --deadline)",
    "maintenance": "out of service, optionally --until T or --for-minutes M (ends by itself)",
    "quarantine": "out of service until an explicit resume",
    "resume": "back to active",
    "retire": "revoke the node's certificate for good",
    "delete": "forget a retired (or left) node; its revocation and consumed tokens stay",
}


def parse_utc(text: str, *, flag: str = "--until") -> int:
    raw = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        raise UsageError(f"{flag}: {text!r} is not a UTC time such as 2026-12-01T18:00Z") from exc
    if value.tzinfo is None:
        raise UsageError(f"{flag}: {text!r} needs a time zone; use Z for UTC")
    return int(value.timestamp() * 1000)


def parse_since(text: str, *, now_ms: int) -> int:
    """``--since``: a UTC time, or a duration back from ``now_ms``; wall ms."""
    if any(c in text for c in "-:T"):
        return parse_utc(text, flag="--since")
    try:
        seconds = parse_duration(text, flag="--since")
    except UsageError:
        raise UsageError(
            f"--since: {text!r} is neither a duration (30m, 2d) nor a UTC time (2026-12-01T18:00Z)"
        ) from None
    return max(0, now_ms - int(seconds * 1000))


def _state_text(node: NodeView) -> str:
    lc = node.lifecycle
    state = str(node.state)
    if lc is not None and lc.until_wall_ms:
        state += f" until {utc_text(lc.until_wall_ms)}"
    if lc is not None and lc.deadline_wall_ms:
        state += f" by {utc_text(lc.deadline_wall_ms)}"
    return state


def _age(node: NodeView) -> str:
    age = node.heartbeat_age_ms
    if age is None:
        return "never"
    text = format_duration(age / 1000)
    return text + (" (stale)" if node.heartbeat_stale else "")


def _gpus(node: NodeView) -> str:
    gpu = node.gpu_summary
    if gpu is None:
        return "-"
    return f"{gpu.allocatable}/{gpu.count}"


def run_nodes(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import NodesAnswer

    answer = control_plane_call(args, "GET", "/v1/populi/nodes", answer=NodesAnswer)
    rows = [
        (
            n.name,
            n.id,
            n.address,
            n.role,
            _state_text(n),
            _age(n),
            n.scope,
            _gpus(n),
            utc_text(n.cert_not_after_ms),
        )
        for n in answer.nodes
    ]
    print_listing(
        args,
        answer,
        rows,
        ["name", "id", "address", "role", "state", "heartbeat", "scope", "gpus", "cert expires"],
    )
    return 0


def _event_cells(event: EventView) -> list[str]:
    detail = event.detail
    what = event.kind
    if event.kind == "lifecycle":
        what = f"{detail.get('command')}: {detail.get('from')} -> {detail.get('to')}"
    elif event.kind == "election":
        leader = detail.get("leader") or "none"
        what = (
            f"election: {detail.get('previous')} -> {detail.get('role')}, "
            f"term {detail.get('term')}, leader {leader}"
        )
    elif event.kind == "voters_changed":
        what = f"voters {detail.get('action')}: {', '.join(detail.get('voters') or [])}"
    return [
        utc_text(event.at_ms),
        event.node_name or "-",
        event.node_id,
        what,
        event.actor_name or event.actor,
        event.reason or "-",
    ]


def _event_line(cells: Sequence[str], widths: list[int]) -> str:
    for index, cell in enumerate(cells):
        widths[index] = max(widths[index], len(cell))
    return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells)).rstrip()


def run_events(args: argparse.Namespace) -> int:
    import time

    from populi_peer.core.messages import EventsAnswer

    if not 1 <= args.limit <= MAX_EVENTS_PAGE:
        raise UsageError(f"--limit must be from 1 to {MAX_EVENTS_PAGE}")
    filters: dict[str, Any] = {}
    if args.node:
        filters["node"] = args.node
    if args.kind:
        filters["kind"] = args.kind
    params: dict[str, Any] = {**filters, "limit": args.limit}
    if args.since:
        params["since_ms"] = parse_since(args.since, now_ms=int(time.time() * 1000))
    local = open_local(args)
    try:
        answer = local.call_control_plane(
            "GET", "/v1/populi/events", params=params, answer=EventsAnswer
        )
        if args.json and not args.follow:
            print_json(answer)
            return 0
        widths = [len(h) for h in EVENT_HEADERS]
        if args.json:
            _print_json_lines(answer)
        else:
            rows = [_event_cells(e) for e in answer.events]
            print_table(rows, EVENT_HEADERS)
            for row in rows:
                _event_line(row, widths)
            if answer.earlier:
                sys.stderr.write(
                    f"(older events left out: this is the newest {args.limit}; "
                    "--limit or --since for others)\n"
                )
        if not args.follow:
            return 0
        cursor = answer.next_after
        while True:
            sys.stdout.flush()
            answer = local.call_control_plane(
                "GET",
                "/v1/populi/events",
                params={
                    **filters,
                    "after": cursor,
                    "limit": MAX_EVENTS_PAGE,
                    "wait_s": FOLLOW_WAIT_S,
                },
                timeout_s=FOLLOW_WAIT_S + 15.0,
                answer=EventsAnswer,
            )
            if args.json:
                _print_json_lines(answer)
            else:
                for event in answer.events:
                    sys.stdout.write(_event_line(_event_cells(event), widths) + "\n")
            cursor = answer.next_after
    except KeyboardInterrupt:
        return 0  # the way to end --follow
    finally:
        local.close()


def _print_json_lines(answer: EventsAnswer) -> None:
    for event in answer.events:
        sys.stdout.write(json.dumps(event.to_json(), sort_keys=True) + "\n")


def run_leave(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import LeaveAnswer, ReasonRequest

    answer = agent_call(
        args,
        "POST",
        "/v1/populi/leave",
        ReasonRequest(reason=args.reason or None),
        timeout_s=60.0,
        answer=LeaveAnswer,
    )
    ack = (
        "acknowledged by the control plane"
        if answer.acknowledged
        else "NOT acknowledged (control plane unreachable)"
    )
    print_answer(
        args,
        answer,
        f"node {answer.node_id} left the cluster ({ack}); {answer.tasks_stopped} task(s) stopped; the agent exits",
    )
    return 0


def run_node_verb(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import (
        LifecycleCommandAnswer,
        LifecycleCommandRequest,
        NodeDeleteAnswer,
        NodeRetireAnswer,
        ReasonRequest,
    )

    verb = args.verb
    path = f"/v1/populi/admin/nodes/{args.node}/{verb}"
    reason = args.reason or None
    if verb == "retire":
        retired = control_plane_call(
            args, "POST", path, ReasonRequest(reason=reason), answer=NodeRetireAnswer
        )
        note = "" if retired.changed else " (no change)"
        print_answer(
            args,
            retired,
            f"node {retired.node_id} retired; revocation list serial "
            f"{retired.revocation_serial}{note}",
        )
        return 0
    if verb == "delete":
        deleted = control_plane_call(
            args, "POST", path, ReasonRequest(reason=reason), answer=NodeDeleteAnswer
        )
        print_answer(
            args,
            deleted,
            f"node {deleted.node_id} deleted; its name stays blocked until 'populi node unretire'",
        )
        return 0
    deadline_in_s = until_in_s = None
    until_wall_ms = None
    if verb == "drain" and args.deadline:
        deadline_in_s = parse_duration(args.deadline, flag="--deadline")
    if verb == "maintenance":
        if args.until:
            until_wall_ms = parse_utc(args.until)
        elif args.for_minutes is not None:
            if args.for_minutes <= 0:
                raise UsageError("--for-minutes must be more than 0")
            until_in_s = args.for_minutes * 60
    command = LifecycleCommandRequest(
        reason=reason,
        deadline_in_s=deadline_in_s,
        deadline_wall_ms=None,
        until_in_s=until_in_s,
        until_wall_ms=until_wall_ms,
    )
    answer = control_plane_call(args, "POST", path, command, answer=LifecycleCommandAnswer)
    node = answer.node
    note = "" if answer.changed else " (no change)"
    print_answer(args, answer, f"node {node.name} ({node.id}) is {_state_text(node)}{note}")
    return 0


def run_unretire(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import NameUnretireAnswer

    answer = control_plane_call(
        args,
        "POST",
        f"/v1/populi/admin/names/{args.name}/unretire",
        {},
        answer=NameUnretireAnswer,
    )
    print_answer(
        args,
        answer,
        f"name {answer.name} may join again (revocation list serial {answer.revocation_serial})",
    )
    return 0
