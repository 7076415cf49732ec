"""``populi init``: create a cluster and its first node."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from populi_peer.cli.common import add_data_dir, add_json, data_dir_of, print_json
from populi_peer.config import default_node_name, parse_host_port
from populi_peer.errors import UsageError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init", help="create a cluster: root key, this node, an operator credential"
    )
    parser.add_argument("--cluster-name", required=True, help="a name for the cluster")
    add_data_dir(parser)
    parser.add_argument(
        "--listen",
        default="127.0.0.1:7431",
        help="HOST:PORT the API binds (default 127.0.0.1:7431)",
    )
    parser.add_argument(
        "--advertise",
        action="append",
        default=[],
        metavar="ADDR",
        help="HOST:PORT other nodes use to reach this one (repeatable)",
    )
    parser.add_argument("--name", default=None, help="this node's name (default: host name)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing node in the data directory"
    )
    parser.add_argument(
        "--root-signs",
        action="store_true",
        help="sign with the root key, as versions before issuers did, so that nodes of an "
        "older version can join; give this node an issuer later (runbooks/offline-root.md)",
    )
    add_json(parser)
    parser.set_defaults(handler=run)


def _check_address(flag: str, value: str) -> str:
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    return value


def run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    listen = _check_address("--listen", args.listen)
    advertise = [_check_address("--advertise", a) for a in args.advertise]
    name = args.name or default_node_name()
    from populi_peer.config import _node_name

    problem = _node_name(name)
    if problem:
        raise UsageError(f"--name {name!r}: {problem}")
    from populi_peer.cluster import init_cluster

    result = init_cluster(
        data_dir,
        cluster_name=args.cluster_name,
        node_name=name,
        listen=listen,
        advertise=advertise,
        force=args.force,
        now_wall_s=time.time(),
        root_signs=args.root_signs,
    )
    if args.json:
        print_json(
            {
                "cluster": {
                    "id": result.cluster_id,
                    "name": result.cluster_name,
                    "ca_pin": result.ca_pin,
                },
                "node": {"id": result.node_id, "name": result.node_name},
                "operator_id": result.operator_id,
                "data_dir": str(data_dir),
            }
        )
    else:
        sys.stdout.write(
            f"created cluster {result.cluster_name} ({result.cluster_id})\n"
            f"  node      {result.node_name} ({result.node_id}), control plane at term 1\n"
            f"  operator  {result.operator_id}\n"
            f"  CA pin    {result.ca_pin}\n"
            f"  data dir  {data_dir}\n"
            f"next: populi agent --data-dir {data_dir}\n"
        )
    return 0
