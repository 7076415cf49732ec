"""``populi settings show|set``: the cluster settings record."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    control_plane_call,
    print_json,
    print_table,
)
from populi_peer.core.settings import SETTINGS, parse_setting

if TYPE_CHECKING:
    from populi_peer.core.messages import PushReport, SettingsAnswer, SettingsSetAnswer


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("settings", help="show or change the cluster settings")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="show the cluster settings record")
    add_data_dir(show)
    add_json(show)
    show.set_defaults(handler=run_show)
    set_ = verbs.add_parser("set", help="change one cluster setting (operator)")
    set_.add_argument("key", choices=[spec.key for spec in SETTINGS], metavar="KEY")
    set_.add_argument("value", metavar="VALUE")
    add_data_dir(set_)
    add_json(set_)
    set_.set_defaults(handler=run_set)


def _print(answer: SettingsAnswer | SettingsSetAnswer, as_json: bool) -> None:
    from populi_peer.core.messages import SettingsSetAnswer

    if as_json:
        print_json(answer)
        return
    settings = answer.settings
    values = settings.values
    rows = [
        (spec.key, format_value(values.get(spec.key)), spec.unit or "-", spec.doc)
        for spec in SETTINGS
    ]
    print_table(rows, ["key", "value", "unit", "meaning"])
    sys.stdout.write(
        f"serial {settings.serial}, signed by {settings.signer} for {settings.actor}\n"
    )
    if isinstance(answer, SettingsSetAnswer):
        if answer.changed:
            sys.stdout.write(push_summary(answer.push) + "\n")
        else:
            sys.stdout.write("(no change: every value was already so; nothing signed or pushed)\n")


def push_summary(push: PushReport) -> str:
    """Which nodes confirmed the new record; the others get it with their next heartbeat."""
    confirmed = len(push.confirmed)
    missing = push.unconfirmed
    if not missing:
        return f"pushed to every node ({confirmed} confirmed)"
    names = ", ".join(f"{u.name} ({u.reason})" for u in missing)
    return (
        f"pushed: {confirmed} confirmed; NOT confirmed by {names} — "
        "they get it with their next heartbeat"
    )


def format_value(value: Any) -> str:
    """A setting as an operator writes it: ``2592000``, not ``2.592e+06``; ``0.5``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(value) or "(none)"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def run_show(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import SettingsAnswer

    answer = control_plane_call(args, "GET", "/v1/populi/settings", answer=SettingsAnswer)
    _print(answer, args.json)
    return 0


def run_set(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import SettingsChangeRequest, SettingsSetAnswer

    value = parse_setting(args.key, args.value)
    answer = control_plane_call(
        args,
        "POST",
        "/v1/populi/admin/settings",
        SettingsChangeRequest(changes={args.key: value}),
        answer=SettingsSetAnswer,
    )
    _print(answer, args.json)
    return 0
