"""``populi demo`` refuses a bad ``--dir`` as the user's mistake: one line, exit 2, before it
starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from populi_peer.cli.main import main


def test_demo_into_a_missing_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-folder"
    assert main(["demo", "--dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err, err
    assert f"--dir {missing}: No such file or directory" in err
    assert not missing.exists()
