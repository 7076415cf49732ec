"""``populi voter add NODE`` / ``populi voter remove NODE``: change the voter set by one
(operator; through the control plane, the leader). One or three voters are recommended:
two voters need both for every election and write (ADR 0011 Decision 6)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from populi_peer.cli.common import add_data_dir, add_json, control_plane_call, print_json

#: A voter change waits for a majority of both sets: longer than a plain call.
VOTER_CHANGE_TIMEOUT_S = 60.0


def register(subparsers: Any) -> None:
    voter = subparsers.add_parser(
        "voter", help="add or remove one control-plane voter (one change at a time)"
    )
    verbs = voter.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (
        ("add", "make a node that joined with the voter role a voter"),
        ("remove", "stop a node from voting (it keeps its other roles)"),
    ):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("node", help="the node's id or unique name")
        parser.add_argument("--reason", default=None, help="why (one line, for the event log)")
        add_data_dir(parser)
        add_json(parser)
        parser.set_defaults(handler=run_change, action=verb)


def run_change(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import VoterChangeAnswer, VoterChangeRequest

    answer = control_plane_call(
        args,
        "POST",
        "/v1/populi/admin/voters",
        VoterChangeRequest(action=args.action, node=args.node, reason=args.reason or None),
        timeout_s=VOTER_CHANGE_TIMEOUT_S,
        answer=VoterChangeAnswer,
    )
    if args.json:
        print_json(answer)
        return 0
    note = "" if answer.changed else " (no change)"
    sys.stdout.write(
        f"voters (term {answer.term}, record {answer.serial}): {', '.join(answer.voters)}{note}\n"
    )
    if len(answer.voters) == 2:
        sys.stdout.write("note: two voters need both for every election and write; add a third\n")
    return 0
