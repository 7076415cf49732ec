"""``populi``: everyday verbs at the top, administration as noun + verb.

Exit codes: 0 success, 2 usage, 3 no agent running, 4 refused (bad input, illegal
transition, not allowed), 125 Populi itself failed. ``populi run`` passes the task's exit
code through instead (see its help). Errors are one line on stderr, never a traceback
(``POPULI_DEBUG=1`` adds the traceback for bug reports).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from enrollment.errors import EnrollmentError
from populi_peer.cli import (
    cmd_agent,
    cmd_ca,
    cmd_demo,
    cmd_discover,
    cmd_gpu,
    cmd_init,
    cmd_join,
    cmd_lease,
    cmd_node,
    cmd_run,
    cmd_service,
    cmd_settings,
    cmd_status,
    cmd_token,
    cmd_voter,
)
from populi_peer.cli.common import ArgParser
from populi_peer.errors import PopuliError, translate_enrollment
from populi_peer.selfexec import SUPERVISOR_VERB


class _VersionAction(argparse.Action):
    """``--version``: the release and the commit, worked out only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and commit, exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from populi_peer.version import version_text

        sys.stdout.write(version_text() + "\n")
        parser.exit()


COMMAND_MODULES = [
    cmd_init,
    cmd_join,
    cmd_agent,
    cmd_status,
    cmd_run,
    cmd_demo,
    cmd_discover,
    cmd_gpu,
    cmd_node,
    cmd_lease,
    cmd_token,
    cmd_voter,
    cmd_settings,
    cmd_ca,
    cmd_service,
]


def build_parser() -> ArgParser:
    parser = ArgParser(
        prog="populi",
        description="Populi: the machines you own as one GPU mesh.",
        epilog="Exit codes: 0 ok, 2 usage, 3 no agent running, 4 refused, 125 Populi failed.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [SUPERVISOR_VERB]:
        # Hidden: a task's supervisor, for the single-file build (populi_peer.selfexec).
        from populi_peer.exec.supervisor import main as supervise

        return supervise(words[1:])
    parser = build_parser()
    args = parser.parse_args(words)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = handler(args)
    except (PopuliError, EnrollmentError) as caught:
        _debug_trace()
        exc = translate_enrollment(caught)
        sys.stderr.write(f"populi: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("populi: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        _debug_trace()
        sys.stderr.write(
            f"populi: internal error: {type(exc).__name__}: {exc} (set POPULI_DEBUG=1 for details)\n"
        )
        return 125
    return int(code or 0)


def _debug_trace() -> None:
    if os.environ.get("POPULI_DEBUG"):
        traceback.print_exc()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
