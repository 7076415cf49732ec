"""``populi status``: what the local agent says about itself."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import add_data_dir, add_json, agent_call, print_json, utc_text
from populi_peer.core.durations import parse_duration

if TYPE_CHECKING:
    from populi_peer.core.messages import (
        AdvertisePlanView,
        DiscoveryStatusView,
        NodeHealth,
        Standing,
        StatusAnswer,
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status", help="cluster, node, address, uptime, term, control plane"
    )
    add_data_dir(parser)
    add_json(parser)
    parser.add_argument(
        "--wait",
        default=None,
        metavar="DUR",
        help="an agent just started: wait this long for it to answer (e.g. 30s; exit 3 after)",
    )
    parser.set_defaults(handler=run)


#: How often ``status --wait`` asks again while no agent answers.
WAIT_EVERY_S = 0.2


def run(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import StatusAnswer

    status = _status(args, StatusAnswer)
    if args.json:
        print_json(status)
        return 0
    cp = status.control_plane
    lines = [
        f"cluster        {status.cluster.name} ({status.cluster.id})",
        f"node           {status.node.name} ({status.node.id})",
        f"roles          {', '.join(status.node.roles)}",
        f"listen         {status.listen}  (reach at {status.url})",
        f"uptime         {status.uptime_s:.0f} s",
        f"version        {status.version} (protocol {status.protocol_version})",
        f"term           {status.term}",
        f"control plane  {cp.node_id} at {cp.url}{'  (this node)' if cp.is_self else ''}",
        *election_lines(status),
        *address_lines(status.addresses, status.discovery),
        *health_lines(status.health),
        *standing_lines(status.standing),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _status(args: argparse.Namespace, answer: type[StatusAnswer]) -> StatusAnswer:
    """The agent's status; with ``--wait``, asked again while no agent answers (an agent
    started in the background a moment ago) until the time is up."""
    from populi_peer.errors import AgentUnavailable

    deadline = (
        None if args.wait is None else time.monotonic() + parse_duration(args.wait, flag="--wait")
    )
    while True:
        try:
            return agent_call(args, "GET", "/v1/populi/status", answer=answer)
        except AgentUnavailable:
            if deadline is None or time.monotonic() >= deadline:
                raise
        time.sleep(WAIT_EVERY_S)


def election_lines(status: StatusAnswer) -> list[str]:
    """The leader this node knows and the voters it holds, with when each was last heard
    (nothing from an older agent that says neither)."""
    lines = []
    role = f"  [this node: {status.election_role}]" if status.election_role else ""
    if status.leader is not None:
        name = status.leader.name or status.leader.id
        lines.append(f"leader         {name} ({status.leader.id}){role}")
    elif status.election_role is not None:
        lines.append(f"leader         none known: an election is under way{role}")
    if status.voters:
        now_ms = time.time() * 1000
        shown = []
        for voter in status.voters:
            seen = (
                "never heard"
                if voter.last_contact_ms is None
                else f"heard {max(0.0, (now_ms - voter.last_contact_ms) / 1000):.0f} s ago"
            )
            shown.append(f"{voter.name or voter.id} ({seen})")
        lines.append(f"voters         {', '.join(shown)}")
        if len(status.voters) == 2:
            lines.append("               two voters need both: add a third (populi voter add)")
    return lines


def address_lines(
    addresses: AdvertisePlanView | None, discovery: DiscoveryStatusView | None
) -> list[str]:
    """What this node advertises, by scope (overlay first in an overlay cluster), and
    whether it announces itself on the LAN (nothing from an older agent that says neither)."""
    lines = []
    if addresses is not None:
        shown = [
            f"{address} ({scope})"
            for address in addresses.addresses
            for scope, members in addresses.by_scope.items()
            if address in members
        ]
        kind = "overlay cluster" if addresses.overlay_cluster else "LAN cluster"
        lines.append(f"advertises     {', '.join(shown) or '-'}  [{kind}]")
    if discovery is not None:
        if discovery.mdns == "on":
            state = f"announced on the LAN ({', '.join(discovery.interfaces)})"
        else:
            state = f"{discovery.mdns}: {discovery.reason or '-'}"
        lines.append(f"discovery      {state}; {len(discovery.sightings)} node(s) seen")
    return lines


def health_lines(health: NodeHealth) -> list[str]:
    """``health  ok``, or ``health  degraded`` and one line per problem: which part of the
    node, the reason code, since when, how many failures, and the error itself."""
    if health.state == "ok":
        return ["health         ok"]
    lines = ["health         degraded"]
    for problem in health.problems:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(problem.since_ms / 1000))
        lines.append(
            f"  {problem.component}: {problem.code} since {since} "
            f"({problem.failures} failures): {problem.message}"
        )
    return lines


def standing_lines(standing: Standing) -> list[str]:
    """Nothing for a member; for a node out of the cluster, what happened and how back."""
    if standing.state == "member":
        return []
    if standing.state == "retired":
        parts = ["RETIRED"]
        if standing.since_ms:
            parts.append(f"since {utc_text(standing.since_ms)}")
        if standing.by:
            parts.append(f"by {standing.by}")
        if standing.reason:
            parts.append(f"({standing.reason})")
        head = " ".join(parts)
    else:
        head = "UNKNOWN to the control plane (deleted, or its certificate expired)"
    lines = [f"membership     {head}; this node takes no work"]
    for index, step in enumerate(standing.rejoin or ()):
        lines.append(f"{'to re-join' if index == 0 else '':<15}{index + 1}. {step}")
    return lines
