"""``populi probe`` (local, no agent), ``populi gpus`` and ``populi gpu resume``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    agent_call,
    config_of,
    control_plane_call,
    print_answer,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from populi_peer.core.messages import GpuDevice


def register(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe", help="probe this machine's GPUs with NVML (no agent needed)"
    )
    probe.add_argument(
        "--fixture", default=None, help="replay this NVML capture instead (or POPULI_GPU_FIXTURE)"
    )
    add_data_dir(probe)
    probe.add_argument("--config", type=Path, default=None)
    add_json(probe)
    probe.set_defaults(handler=run_probe)
    gpus = subparsers.add_parser(
        "gpus",
        help="the cluster's GPUs: health, free memory, allocatable, reasons (from the "
        "control plane; from this node's gossip hints, with their age, while it is down)",
    )
    gpus.add_argument("--node", default=None, help="only this node")
    gpus.add_argument(
        "--hints",
        action="store_true",
        help="show the hints this node holds (gossip) even when the control plane answers",
    )
    add_data_dir(gpus)
    add_json(gpus)
    gpus.set_defaults(handler=run_gpus)
    gpu = subparsers.add_parser("gpu", help="operate on one GPU")
    verbs = gpu.add_subparsers(dest="verb", metavar="VERB", required=True)
    resume = verbs.add_parser("resume", help="clear a GPU's quarantine (after an XID)")
    resume.add_argument("node", metavar="NODE")
    resume.add_argument("uuid", metavar="UUID")
    resume.add_argument("--reason", default="", help="why (recorded)")
    add_data_dir(resume)
    add_json(resume)
    resume.set_defaults(handler=run_resume)


def run_probe(args: argparse.Namespace) -> int:
    import trio

    from populi_peer.clock import SystemClock
    from populi_peer.gpu import format_probe, health_verdicts, open_probe, probe_json

    config = config_of(args, {"gpu.fixture": args.fixture})
    fixture = config.gpu.fixture or None

    async def main() -> Any:
        async with open_probe(
            fixture=fixture,
            node_id=None,
            clock=SystemClock(),
            call_timeout_s=config.gpu.call_timeout_s,
        ) as probe:
            return await probe.probe()

    inventory = trio.run(main)
    verdicts = health_verdicts(inventory)
    if args.json:
        print_json(probe_json(inventory, verdicts))
    else:
        sys.stdout.write(format_probe(inventory, verdicts) + "\n")
    return 0


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


#: The columns of one GPU in ``populi gpus``, after its node's.
_GPU_HEADERS = ("idx", "uuid", "name", "free/total GiB", "health", "alloc", "reasons")


def _gpu_cells(d: GpuDevice) -> tuple[Any, ...]:
    reasons = ",".join([*d.health_reasons, *d.allocation_reasons]) or "-"
    return (
        d.index,
        d.uuid,
        d.name,
        f"{_gib(d.memory_free_bytes)}/{_gib(d.memory_total_bytes)}",
        d.health,
        "yes" if d.allocatable else "no",
        reasons,
    )


def _no_gpu_cells(reason: str) -> tuple[Any, ...]:
    """The GPU columns of a node without GPUs: only why."""
    return ("-",) * (len(_GPU_HEADERS) - 1) + (reason,)


#: Control-plane failures after which ``populi gpus`` shows this node's hints instead.
_CONTROL_PLANE_DOWN = frozenset({"peer_unreachable", "peer_timeout", "not_control_plane"})


def run_gpus(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import GpusAnswer
    from populi_peer.errors import AgentUnavailable, PeerError

    if args.hints:
        return _show_hints(args, reason="asked for (--hints)")
    try:
        answer = control_plane_call(
            args,
            "GET",
            "/v1/populi/gpus",
            params={"node": args.node} if args.node else None,
            answer=GpusAnswer,
        )
    except (PeerError, AgentUnavailable) as exc:
        if exc.code not in _CONTROL_PLANE_DOWN:
            raise
        return _show_hints(args, reason=f"control plane unreachable: {exc}")
    if args.json:
        print_json({"source": "control_plane", **answer.to_json()})
        return 0
    sys.stdout.write("source: control plane (heartbeats)\n")
    rows: list[tuple[Any, ...]] = []
    for node in answer.nodes:
        if not node.devices:
            reason = node.cpu_only_reason or (
                "no report yet" if node.facts_version is None else "cpu-only"
            )
            rows.append((node.name, *_no_gpu_cells(reason)))
        rows += [(node.name, *_gpu_cells(d)) for d in node.devices]
    print_table(rows, ["node", *_GPU_HEADERS])
    return 0


def _show_hints(args: argparse.Namespace, *, reason: str) -> int:
    """The GPUs of the hints this node holds: advisory, each with its age."""
    from populi_peer.core.messages import HintsAnswer

    answer = agent_call(args, "GET", "/v1/populi/hints", answer=HintsAnswer)
    nodes = [n for n in answer.nodes if args.node is None or args.node in (n.node_id, n.name)]
    if args.json:
        print_json({**answer.to_json(), "nodes": [n.to_json() for n in nodes], "why_hints": reason})
        return 0
    sys.stdout.write(
        f"source: hints held by this node ({reason}); advisory, the control plane "
        "re-checks at grant time\n"
    )
    rows: list[tuple[Any, ...]] = []
    for node in nodes:
        age = f"{node.age_s:.1f}s" + (" stale" if node.stale else "")
        if not node.devices:
            rows.append((node.name, age, *_no_gpu_cells(node.cpu_only_reason or "cpu-only")))
        rows += [(node.name, age, *_gpu_cells(d)) for d in node.devices]
    print_table(rows, ["node", "hint age", *_GPU_HEADERS])
    return 0


def run_resume(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import GpuResumeAnswer, ReasonRequest

    answer = control_plane_call(
        args,
        "POST",
        f"/v1/populi/admin/gpus/{args.node}/{args.uuid}/resume",
        ReasonRequest(reason=args.reason or None),
        answer=GpuResumeAnswer,
    )
    print_answer(args, answer, f"GPU {answer.uuid} of {answer.node_id} is no longer quarantined")
    return 0
