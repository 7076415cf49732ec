from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from populi_peer.cli.common import print_answer, utc_text
from populi_peer.cli.main import main
from populi_peer.core.messages import GpuResumeAnswer


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["init"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and "--cluster-name" in err


def test_unknown_command_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert len(_lines(capsys.readouterr().err)) == 1


def test_status_without_agent_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "init",
                "--cluster-name",
                "lab",
                "--data-dir",
                str(tmp_path / "d"),
                "--listen",
                "127.0.0.1:0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--data-dir", str(tmp_path / "d")]) == 3
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and "no agent running" in err


def test_status_on_a_missing_data_dir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["status", "--data-dir", str(tmp_path / "none")])
    assert code == 4
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and "populi init" in err


@pytest.mark.parametrize("command", [["init", "--cluster-name", "lab"], ["join", "TOKEN"]])
@pytest.mark.parametrize(
    "args",
    [
        ["--listen", "host:notaport"],
        ["--advertise", "[::1"],
        ["--name", "Bad Name"],
        ["--name", "node-1\n"],
    ],
)
def test_new_node_bad_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], args: list[str]
) -> None:
    code = main([*command, "--data-dir", str(tmp_path / "d"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and args[0] in err
    assert not (tmp_path / "d").exists()


def test_settings_set_rejects_bad_value_before_contacting_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["settings", "set", "max_lease_ttl_s", "forever", "--data-dir", str(tmp_path / "none")]
    )
    assert code == 4
    assert "max_lease_ttl_s" in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [False, True])
def test_a_changing_command_prints_its_line_or_its_answer_as_json(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = GpuResumeAnswer(node_id="w1", uuid="GPU-1", quarantined=False)
    print_answer(
        argparse.Namespace(json=as_json), answer, "GPU GPU-1 of w1 is no longer quarantined"
    )
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out) == answer.to_json()
    else:
        assert out == "GPU GPU-1 of w1 is no longer quarantined\n"


def test_wall_times_print_as_utc_and_none_as_a_dash() -> None:
    assert utc_text(1_796_148_000_000) == "2026-12-01 18:00:00Z"
    assert utc_text(None) == "-"
    assert utc_text(0) == "-"  # no time (a token without an expiry), as for None
    # A time no calendar can show (past year 9999) prints as its number, not a crash:
    # a listing's table and its --json both still print.
    assert utc_text(10**17) == "100000000000000000 ms"
    assert utc_text(-(10**17)) == "-100000000000000000 ms"
