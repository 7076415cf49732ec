"""Operator commands as typed twice: the repeat says ``(no change)``; settings print as
written (``2592000``, not ``2.592e+06``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.procs import Processes, populi

pytestmark = pytest.mark.e2e


def test_repeated_operator_commands_say_no_change(tmp_path: Path, procs: Processes) -> None:
    cp = tmp_path / "cp"
    procs.init_and_start(cp)
    d = ("--data-dir", str(cp))
    token = populi("token", "create", "--name", "w1", *d, check=True).stdout.strip()
    populi(
        "join", token, "--data-dir", str(tmp_path / "w1"), "--listen", "127.0.0.1:0",
        "--name", "w1", check=True,
    )  # fmt: skip

    first = populi("node", "retire", "w1", *d, check=True).stdout
    again = populi("node", "retire", "w1", *d, check=True).stdout
    assert "retired" in first and "(no change)" not in first
    assert "retired" in again and again.rstrip().endswith("(no change)")

    spare = populi("token", "create", *d, check=True)
    token_id = spare.stderr.split()[1].rstrip(":")
    first = populi("token", "revoke", token_id, *d, check=True).stdout
    again = populi("token", "revoke", token_id, *d, check=True).stdout
    assert first.strip() == f"token {token_id} is revoked"
    assert again.strip() == f"token {token_id} is revoked (no change)"

    first = populi("settings", "set", "max_lease_ttl_s", "40", *d, check=True).stdout
    again = populi("settings", "set", "max_lease_ttl_s", "40.0", *d, check=True).stdout
    assert "pushed" in first.splitlines()[-1]
    assert again.splitlines()[-1].startswith("(no change")
    assert "serial 2," in first and "serial 2," in again  # no new record the second time

    shown = populi("settings", "show", *d, check=True).stdout
    (lifetime,) = [line for line in shown.splitlines() if line.startswith("node_cert_lifetime_s")]
    assert lifetime.split()[1] == "2592000", lifetime
    assert "e+" not in shown
