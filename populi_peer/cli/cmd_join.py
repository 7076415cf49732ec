"""``populi join TOKEN``: enroll this machine with a token from ``populi token create``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    add_new_node_flags,
    config_of,
    data_dir_of,
    new_node_name,
    print_json,
)

if TYPE_CHECKING:
    from enrollment.tokens import JoinToken


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "join", help="enroll this machine into a cluster with a join token"
    )
    parser.add_argument(
        "token", help="the token printed by 'populi token create' (or '-' to read it from stdin)"
    )
    add_data_dir(parser)
    add_new_node_flags(
        parser, listen_help="HOST:PORT this node's API binds (default 127.0.0.1:7431)"
    )
    add_json(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from populi_peer.clock import SystemClock
    from populi_peer.joining import join_cluster

    token_text = sys.stdin.read().strip() if args.token == "-" else args.token
    name = new_node_name(args)
    data_dir = data_dir_of(args)
    # Addresses by scope and LAN hints (populi_peer.discovery; docs/wan.md).
    from populi_peer.core.addresses import rank_addresses
    from populi_peer.discovery.browse import join_hints
    from populi_peer.discovery.site import Site, advertise_plan, with_site

    site = Site.detect()
    config = with_site(config_of(args, {"node.listen": args.listen}), site)
    cidrs = site.cidrs(config)
    advertise: list[str] | Callable[[list[str]], list[str]] = list(args.advertise)
    if not advertise:

        def advertise(contacts: list[str]) -> list[str]:
            plan = advertise_plan(config, site, control_plane_addresses=contacts)
            return list(plan.addresses)

    async def find_contacts(token: JoinToken) -> list[str]:
        if not config.discovery.enabled:
            return []
        return await join_hints(token, site=site, static_peers=config.discovery.static_peers)

    result = trio.run(
        lambda: join_cluster(
            token_text,
            data_dir=data_dir,
            name=name,
            listen=args.listen,
            advertise=advertise,
            clock=SystemClock(),
            force=args.force,
            rank=lambda contacts: [
                a for _, a in rank_addresses(contacts, local=site.local, cidrs=cidrs)
            ],
            find_contacts=find_contacts,
        )
    )
    if args.json:
        print_json(
            {
                "node": {"id": result.node_id, "name": result.name, "roles": list(result.roles)},
                "cluster": {"id": result.cluster_id, "name": result.cluster_name},
                "control_plane_url": result.control_plane_url,
                "data_dir": str(data_dir),
            }
        )
    else:
        sys.stdout.write(
            f"joined cluster {result.cluster_name} ({result.cluster_id}) as {result.name} ({result.node_id})\n"
            f"  roles     {', '.join(result.roles)}\n"
            f"  contact   {result.contact}; control plane {result.control_plane_url}\n"
            f"next: populi agent --data-dir {data_dir}\n"
        )
    return 0
