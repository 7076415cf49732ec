"""``populi init``: create a cluster and its first node."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    add_new_node_flags,
    data_dir_of,
    new_node_name,
    print_json,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init", help="create a cluster: root key, this node, an operator credential"
    )
    parser.add_argument("--cluster-name", required=True, help="a name for the cluster")
    add_data_dir(parser)
    add_new_node_flags(parser, listen_help="HOST:PORT the API binds (default 127.0.0.1:7431)")
    parser.add_argument(
        "--root-signs",
        action="store_true",
        help="sign with the root key, as versions before issuers did, so that nodes of an "
        "older version can join; give this node an issuer later (runbooks/offline-root.md)",
    )
    add_json(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    name = new_node_name(args)
    from populi_peer.cluster import init_cluster

    result = init_cluster(
        data_dir,
        cluster_name=args.cluster_name,
        node_name=name,
        listen=args.listen,
        advertise=list(args.advertise),
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
