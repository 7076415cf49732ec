"""``populi discover``: the Populi nodes seen on this LAN (mDNS) and at the configured
static peers, and whose cluster each belongs to: ``ours``, ``foreign``, or ``unknown``
(this data directory holds no node). No agent is needed; nothing is joined or trusted:
a sighting is what someone announced (docs/wan.md, "Discovery").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from populi_peer.cli.common import add_data_dir, add_json, config_of, data_dir_of, print_json
from populi_peer.errors import UsageError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "discover", help="list the Populi nodes seen on the LAN and at static peers"
    )
    add_data_dir(parser)
    parser.add_argument(
        "--config", type=Path, default=None, help="config file (TOML) over populi.toml"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to listen on the LAN (default 3)",
    )
    add_json(parser)
    parser.set_defaults(handler=run)


def _ours(data_dir: Path) -> tuple[str | None, str | None]:
    """This data directory's cluster digest and CA pin, or ``(None, None)``."""
    from populi_peer.cluster import has_cluster
    from populi_peer.discovery import cluster_digest
    from populi_peer.store import Store

    if not has_cluster(data_dir):
        return None, None
    store = Store.open(data_dir, readonly=True)
    try:
        cluster_id = store.get_meta("cluster_id")
        pin = store.get_meta("ca_pin")
    finally:
        store.close()
    return (cluster_digest(cluster_id) if cluster_id else None), pin


def run(args: argparse.Namespace) -> int:
    import trio

    from populi_peer.discovery import Site
    from populi_peer.discovery.browse import look_around

    if not 0 < args.timeout <= 300:
        raise UsageError("--timeout must be between 0 and 300 seconds")
    config = config_of(args)
    digest, pin = _ours(data_dir_of(args))
    answer: dict[str, Any] = {
        "cluster_digest": digest,
        "enabled": config.discovery.enabled,
        "interfaces": [],
        "sightings": [],
        "problems": [],
    }
    if not config.discovery.enabled:
        answer["problems"].append("discovery is off here (discovery.enabled = false)")
    else:
        look = trio.run(
            lambda: look_around(
                site=Site.detect(),
                browse_s=args.timeout,
                static_peers=config.discovery.static_peers,
                our_pin=pin,
                timeout_s=min(config.api.request_timeout_s, 5.0),
            )
        )
        answer["interfaces"] = look.interfaces
        answer["problems"] = look.problems
        order = {"ours": 0, "unknown": 1, "foreign": 2}
        sightings = sorted(
            (s.to_json(digest) for s in look.sightings),
            key=lambda s: (order[s["cluster"]], s["node_id"], s["source"]),
        )
        answer["sightings"] = sightings
    if args.json:
        print_json(answer)
        return 0
    out = sys.stdout
    seen = answer["sightings"]
    where = ", ".join(answer["interfaces"]) or "no LAN interface"
    out.write(
        f"{len(seen)} Populi node(s) seen ({where}; static peers: "
        f"{len(config.discovery.static_peers)})\n"
    )
    if seen:
        out.write(
            f"{'NODE':<20} {'CLUSTER':<9} {'DIGEST':<12} {'SOURCE':<7} {'ROLES':<22} ADDRESSES\n"
        )
        for s in seen:
            out.write(
                f"{s['node_id']:<20} {s['cluster']:<9} {s['cluster_digest'][:10] + '..':<12} "
                f"{s['source']:<7} {','.join(s['roles']) or '-':<22} {' '.join(s['addresses'])}\n"
            )
    for problem in answer["problems"]:
        out.write(f"note: {problem}\n")
    if digest is None:
        out.write("(no node in this data directory: every cluster shows as 'unknown')\n")
    return 0
