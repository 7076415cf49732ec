"""``populi agent``: run this node's agent in the foreground."""

from __future__ import annotations

import argparse
import errno
import signal
from pathlib import Path
from typing import Any

from enrollment.errors import EnrollmentError
from populi_peer.cli.common import add_data_dir, config_of, data_dir_of
from populi_peer.errors import ConfigError, PopuliError, translate_enrollment


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
        choices=["json", "text"],
        default=None,
        help="log lines as JSON (default) or text",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from populi_peer.agent import build_agent
    from populi_peer.log import setup_logging

    config = config_of(
        args,
        {"node.listen": args.listen, "log.format": args.log_format, "log.level": args.log_level},
    )
    setup_logging(fmt=config.log.format, level=config.log.level)
    data_dir = data_dir_of(args)

    async def main() -> None:
        agent = build_agent(data_dir=data_dir, config=config)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
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
