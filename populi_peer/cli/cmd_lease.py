"""``populi leases`` and ``populi lease revoke`` (answers read as their typed messages)."""

from __future__ import annotations

import argparse
from typing import Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    control_plane_call,
    print_answer,
    print_listing,
)


def register(subparsers: Any) -> None:
    leases = subparsers.add_parser("leases", help="execution leases held by the control plane")
    leases.add_argument("--node", default=None, help="held by or submitted from this node")
    leases.add_argument("--task", default=None, help="of this task")
    leases.add_argument(
        "--state",
        default=None,
        help="live, revoking, completed, released, revoked, expired, or holding",
    )
    add_data_dir(leases)
    add_json(leases)
    leases.set_defaults(handler=run_leases)
    lease = subparsers.add_parser("lease", help="revoke a lease (operator)")
    verbs = lease.add_subparsers(dest="verb", metavar="VERB", required=True)
    revoke = verbs.add_parser(
        "revoke",
        help="ask the holder to stop; the GPUs stay taken until it confirms or the lease expires",
    )
    revoke.add_argument("lease_id")
    revoke.add_argument("--reason", default="", help="why (recorded)")
    add_data_dir(revoke)
    add_json(revoke)
    revoke.set_defaults(handler=run_revoke)


def run_leases(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import LeaseListAnswer

    params = {
        k: v for k, v in (("node", args.node), ("task", args.task), ("state", args.state)) if v
    }
    answer = control_plane_call(
        args, "GET", "/v1/populi/exec/leases", params=params, answer=LeaseListAnswer
    )
    rows = []
    for view in answer.leases:
        lease = view.lease
        rows.append(
            (
                lease.lease_id,
                lease.state,
                lease.kind,
                lease.task_id,
                lease.attempt,
                lease.holder,
                str(lease.token),
                ",".join(lease.gpus) or "-",
                view.expires_in_s,
                view.flag or "-",
            )
        )
    print_listing(
        args,
        answer,
        rows,
        [
            "lease",
            "state",
            "kind",
            "task",
            "attempt",
            "holder",
            "token",
            "gpus",
            "expires in s",
            "flag",
        ],
    )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import LeaseReplayAnswer

    answer = control_plane_call(
        args,
        "POST",
        "/v1/populi/admin/exec-lease-revoke",
        {"lease_id": args.lease_id, "reason": args.reason},
        answer=LeaseReplayAnswer,
    )
    lease = answer.lease.lease
    print_answer(
        args,
        answer,
        f"lease {lease.lease_id} is {lease.state}; the holder stops the task and releases it",
    )
    return 0
