"""``populi token create|list|revoke``: join tokens (operator)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from populi_peer.cli.common import (
    add_data_dir,
    add_json,
    control_plane_call,
    print_answer,
    print_json,
    print_listing,
    utc_text,
)
from populi_peer.core.durations import parse_duration
from populi_peer.errors import UsageError

ROLES = ("worker", "submit", "operator", "voter")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="create, list or revoke join tokens")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = verbs.add_parser("create", help="mint a join token (printed once; it is a secret)")
    create.add_argument(
        "--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 24h (default 1h, at most 24h)"
    )
    create.add_argument(
        "--uses", type=int, default=1, help="how many nodes may join with it (default 1)"
    )
    create.add_argument(
        "--roles",
        default="worker,submit",
        help="comma-separated: worker, submit, operator (default worker,submit)",
    )
    create.add_argument("--name", default=None, help="bind the token to this node name")
    add_data_dir(create)
    add_json(create)
    create.set_defaults(handler=run_create)
    listing = verbs.add_parser("list", help="list join tokens (no secrets)")
    add_data_dir(listing)
    add_json(listing)
    listing.set_defaults(handler=run_list)
    revoke = verbs.add_parser("revoke", help="revoke a join token by id")
    revoke.add_argument("token_id")
    add_data_dir(revoke)
    add_json(revoke)
    revoke.set_defaults(handler=run_revoke)


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise UsageError(f"--roles: {', '.join(unknown) or '(empty)'} not in {', '.join(ROLES)}")
    return roles


def run_create(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TokenCreateAnswer, TokenCreateRequest

    ttl_s = parse_duration(args.ttl, flag="--ttl")
    if ttl_s > 24 * 3600:
        raise UsageError(f"--ttl {args.ttl}: join tokens live at most 24h")
    if args.uses < 1:
        raise UsageError("--uses must be at least 1")
    request = TokenCreateRequest(
        ttl_s=ttl_s, uses=args.uses, roles=tuple(_roles(args.roles)), name=args.name
    )
    answer = control_plane_call(
        args, "POST", "/v1/populi/admin/tokens", request, answer=TokenCreateAnswer
    )
    if args.json:
        print_json(answer)
        return 0
    summary = answer.summary
    sys.stdout.write(answer.token + "\n")
    sys.stderr.write(
        f"token {summary.token_id}: roles {','.join(summary.roles)}, {summary.uses_total} use(s), "
        f"expires {utc_text(summary.expires_ms)}"
        + (f", bound to name {summary.name}" if summary.name else "")
        + "\non the new machine: populi join <token> --data-dir DIR --listen HOST:PORT\n"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TokenListAnswer

    answer = control_plane_call(args, "GET", "/v1/populi/admin/tokens", answer=TokenListAnswer)
    rows = [
        (
            t.token_id,
            t.state,
            ",".join(t.roles),
            t.name,
            f"{t.uses_total - t.uses_left}/{t.uses_total}",
            utc_text(t.expires_ms),
        )
        for t in answer.tokens
    ]
    print_listing(args, answer, rows, ["id", "state", "roles", "name", "used", "expires"])
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from populi_peer.core.messages import TokenRevokeAnswer

    answer = control_plane_call(
        args,
        "POST",
        f"/v1/populi/admin/tokens/{args.token_id}/revoke",
        {},
        answer=TokenRevokeAnswer,
    )
    note = "" if answer.changed else " (no change)"
    print_answer(args, answer, f"token {answer.summary.token_id} is {answer.summary.state}{note}")
    return 0
