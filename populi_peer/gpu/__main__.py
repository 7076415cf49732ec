"""``python -m populi_peer.gpu [--json] [--fixture PATH] [--node-id ID]``: probe once, print.

The same output as ``populi probe``: a table, or with ``--json`` the probe JSON (the
inventory with each device's health). Exit 0 after a probe (a CPU-only node included);
a bad fixture prints one line and exits with the error's exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import trio

from populi_peer.clock import SystemClock
from populi_peer.errors import PopuliError
from populi_peer.gpu._format import format_probe, probe_json
from populi_peer.gpu._health import health_verdicts
from populi_peer.gpu._probe import open_probe
from populi_peer.gpu._records import GpuInventory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m populi_peer.gpu", description="Probe this node's GPUs once and print them."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--fixture",
        metavar="PATH",
        help="replay a capture or sequence instead of NVML (a path, or a shipped capture name)",
    )
    parser.add_argument(
        "--node-id",
        metavar="ID",
        help="derive per-node UUIDs for a replay, as an agent with this node id would",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=2.0, metavar="S", help="bound on each NVML call"
    )
    return parser


async def _probe_once(fixture: str | None, node_id: str | None, timeout_s: float) -> GpuInventory:
    async with open_probe(
        fixture=fixture, node_id=node_id, clock=SystemClock(), call_timeout_s=timeout_s
    ) as probe:
        return await probe.probe()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.timeout_s > 0:
        print("error: --timeout-s must be positive", file=sys.stderr)
        return 2
    try:
        inventory = trio.run(_probe_once, args.fixture, args.node_id, args.timeout_s)
    except PopuliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    verdicts = health_verdicts(inventory)
    if args.json:
        print(json.dumps(probe_json(inventory, verdicts), indent=2))
    else:
        print(format_probe(inventory, verdicts), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
