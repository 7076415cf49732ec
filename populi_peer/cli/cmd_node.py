"""``populi nodes``, ``populi events``, ``populi leave`` and ``populi node VERB NODE``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    agent_call,
    control_plane_call,
    print_json,
    print_table,
)
from populi_peer.core.durations import format_duration, parse_duration
from populi_peer.errors import UsageError

if TYPE_CHECKING:
    from populi_peer.core.messages import NodeView

LIFECYCLE_VERBS = ("cordon", "drain", "maintenance", "quarantine", "resume")


def register(subparsers: Any) -> None:
    nodes = subparsers.add_parser(
        "nodes", help="list the cluster's nodes (state, heartbeat, scope, GPUs)"
    )
    add_data_dir(nodes)
    add_json(nodes)
    nodes.set_defaults(handler=run_nodes)

    events = subparsers.add_parser("events", help="lifecycle and membership events, oldest first")
    events.add_argument("--node", default=None, help="only this node (id or name)")
    events.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
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
    verbs = node.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=type(node))
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


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def parse_utc(text: str) -> int:
    raw = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        raise UsageError(f"--until: {text!r} is not a UTC time such as 2026-12-01T18:00Z") from exc
    if value.tzinfo is None:
        raise UsageError(f"--until: {text!r} needs a time zone; use Z for UTC")
    return int(value.timestamp() * 1000)


def _state_text(node: NodeView) -> str:
    lc = node.lifecycle
    state = str(node.state)
    if lc is not None and lc.until_wall_ms:
        state += f" until {_when(lc.until_wall_ms)}"
    if lc is not None and lc.deadline_wall_ms:
        state += f" by {_when(lc.deadline_wall_ms)}"
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
    if args.json:
        print_json(answer)
        return 0
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
            _when(n.cert_not_after_ms),
        )
        for n in answer.nodes
    ]
    print_table(
        rows,
        ["name", "id", "address", "role", "state", "heartbeat", "scope", "gpus", "cert expires"],
    )
    return 0


def run_events(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import EventsAnswer

    params: dict[str, Any] = {"limit": args.limit}
    if args.node:
        params["node"] = args.node
    answer = control_plane_call(
        args, "GET", "/v1/populi/events", params=params, answer=EventsAnswer
    )
    if args.json:
        print_json(answer)
        return 0
    rows = []
    for e in answer.events:
        detail = e.detail
        what = e.kind
        if e.kind == "lifecycle":
            what = f"{detail.get('command')}: {detail.get('from')} -> {detail.get('to')}"
        rows.append((_when(e.at_ms), e.node_id, what, e.actor, e.reason or "-"))
    print_table(rows, ["when", "node", "event", "who", "why"])
    return 0


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
    if args.json:
        print_json(answer)
    else:
        ack = (
            "acknowledged by the control plane"
            if answer.acknowledged
            else "NOT acknowledged (control plane unreachable)"
        )
        sys.stdout.write(
            f"node {answer.node_id} left the cluster ({ack}); {answer.tasks_stopped} task(s) stopped; the agent exits\n"
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
        if args.json:
            print_json(retired)
        else:
            sys.stdout.write(
                f"node {retired.node_id} retired; revocation list serial {retired.revocation_serial}\n"
            )
        return 0
    if verb == "delete":
        deleted = control_plane_call(
            args, "POST", path, ReasonRequest(reason=reason), answer=NodeDeleteAnswer
        )
        if args.json:
            print_json(deleted)
        else:
            sys.stdout.write(
                f"node {deleted.node_id} deleted; its name stays blocked until 'populi node unretire'\n"
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
    if args.json:
        print_json(answer)
        return 0
    node = answer.node
    note = "" if answer.changed else " (no change)"
    sys.stdout.write(f"node {node.name} ({node.id}) is {_state_text(node)}{note}\n")
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
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(
            f"name {answer.name} may join again (revocation list serial {answer.revocation_serial})\n"
        )
    return 0
