"""``populi agent``: run this node's agent in the foreground."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enrollment.errors import EnrollmentError
from populi_peer.cli.common import add_data_dir, config_of, data_dir_of
from populi_peer.errors import ConfigError, PopuliError, translate_enrollment
from populi_peer.log import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("agent", help="run this node's agent in the foreground")
    add_data_dir(parser)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (TOML) over the data directory's populi.toml",
    )
    parser.add_argument("--listen", default=None, help="HOST:PORT to bind (overrides node.listen)")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="auto (default): a short summary and text lines on a terminal, JSON lines otherwise",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="auto (default): notice on a terminal, info otherwise; debug adds every request",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from populi_peer.agent.agent import build_agent
    from populi_peer.log import resolve_logging, setup_logging

    config = config_of(
        args,
        {"node.listen": args.listen, "log.format": args.log_format, "log.level": args.log_level},
    )
    tty = sys.stderr.isatty()
    fmt, level = resolve_logging(config.log.format, config.log.level, tty=tty)
    setup_logging(fmt=fmt, level=level)
    data_dir = data_dir_of(args)

    async def main() -> None:
        agent = build_agent(data_dir=data_dir, config=config)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            if tty and fmt == "text":
                sys.stderr.write(startup_summary(agent, level=level))
                sys.stderr.flush()
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                stop_waiter = trio.CancelScope()

                async def wait_stopped() -> None:
                    await agent.stopped.wait()
                    stop_waiter.cancel()

                nursery.start_soon(wait_stopped)
                with stop_waiter:
                    async for _ in signals:
                        agent.request_stop()
                        break
            await agent.stopped.wait()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise one_error(group, config.node.listen) from group
    return 0


def startup_summary(agent: Agent, *, level: str) -> str:
    """What a person who typed ``populi agent`` on a terminal sees once it serves: which
    node of which cluster, where, its control plane and its GPUs."""
    identity = agent.certificates.identity
    cp = agent.control_plane
    if cp.is_self:
        control_plane = "this node"
    else:
        member = agent.membership.get(cp.id)
        control_plane = f"{member.name if member else cp.id} at {cp.url}"
    rows = [
        ("API", agent.address.url),
        ("control plane", control_plane),
        ("GPUs", gpu_line(agent)),
        ("data dir", str(agent.data_dir.absolute())),
        (
            "log",
            f"{level} and above from here on"
            + (" (--log-level info or debug for more)" if level == "notice" else ""),
        ),
    ]
    lines = [
        f"populi agent: node {identity.node_name} ({identity.node_id}) of cluster "
        f"{identity.cluster_name}, pid {os.getpid()}"
    ]
    lines += [f"  {key:<14} {value}" for key, value in rows]
    return "\n".join(lines) + "\n"


def gpu_line(agent: Agent) -> str:
    inventory = agent.gpu.inventory
    if inventory is None:
        return "not probed yet"
    if inventory.cpu_only:
        return f"none: a CPU-only node ({inventory.cpu_only_reason})"
    names: dict[str, int] = {}
    for device in inventory.devices:
        names[device.name or "unknown GPU"] = names.get(device.name or "unknown GPU", 0) + 1
    found = ", ".join(f"{count} x {name}" for name, count in names.items())
    if inventory.backend == "replay":
        return f"{found}, replayed from the capture {inventory.source}"
    return f"{found}, found by NVML"


def one_error(group: BaseExceptionGroup[BaseException], listen: str) -> BaseException:
    """The one line a user sees for an agent that failed inside its nurseries: the first
    Populi (or enrollment, translated) error in ``group``, a listen address that cannot be
    bound, else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, (PopuliError, EnrollmentError)):
            return translate_enrollment(leaf)
    for leaf in leaves:
        if isinstance(leaf, OSError) and leaf.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            return ConfigError(
                f"cannot listen on {listen}: {leaf.strerror or leaf}", key="node.listen"
            )
    return group
