"""``populi service install --user`` ends with the ``loginctl enable-linger`` line to paste:
it must name the user even where ``$USER`` is not set (a root shell from ``su``, a
container, cron), never a quoted ``'$USER'`` that the shell would pass on as it is."""

from __future__ import annotations

import os
import pwd
import shlex
from pathlib import Path

import pytest

from populi_peer.cli.main import main


@pytest.mark.parametrize("user_var", [None, "someone else"], ids=["unset", "set"])
def test_the_linger_line_names_the_user(
    user_var: str | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = tmp_path / "d"
    assert main(["init", "--cluster-name", "lab", "--data-dir", str(data_dir)]) == 0
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    if user_var is not None:
        monkeypatch.setenv("USER", user_var)
    capsys.readouterr()
    args = ["service", "install", "--user", "--data-dir", str(data_dir)]
    assert main([*args, "--unit-dir", str(tmp_path / "units")]) == 0
    line = next(
        line for line in capsys.readouterr().out.splitlines() if "loginctl enable-linger" in line
    )
    expected = user_var if user_var is not None else pwd.getpwuid(os.getuid()).pw_name
    assert shlex.split(line.split("loginctl enable-linger", 1)[1]) == [expected]
