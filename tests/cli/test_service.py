"""``populi service install|uninstall``: the unit passes ``systemd-analyze verify`` and
keeps what restarts and upgrades promise (KillMode=process, Delegate=yes, a stop that
is not ``leave``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from populi_peer.cli.main import main

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def node_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    data_dir = tmp_path / "data dir"  # a space: the unit must quote it
    args = ["init", "--cluster-name", "lab", "--data-dir", str(data_dir)]
    assert main([*args, "--listen", "127.0.0.1:0"]) == 0
    capsys.readouterr()
    return data_dir


@pytest.fixture
def executable(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "populi"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def verify(unit: Path, *, user: bool, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ)
    if user:
        runtime = tmp_path / "runtime"
        runtime.mkdir(exist_ok=True, mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    return subprocess.run(
        [ANALYZE, *(["--user"] if user else []), "verify", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_installed_unit_passes_systemd_analyze_verify(
    user: bool, node_dir: Path, executable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    args = ["service", "install", "--data-dir", str(node_dir), "--executable", str(executable)]
    assert main([*args, "--unit-dir", str(units), *(["--user"] if user else [])]) == 0
    out = capsys.readouterr().out
    unit = units / "populi.service"
    assert f"wrote {unit}" in out and "enable --now populi.service" in out
    result = verify(unit, user=user, tmp_path=tmp_path)
    # verify exits 0 on settings it ignores: any word from it is a failure too.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    settings = unit_settings(unit.read_text())
    assert settings["KillMode"] == ["process"]
    assert settings["Delegate"] == ["yes"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["OOMPolicy"] == ["continue"]
    assert settings["ExecStart"] == [f'{executable} agent --data-dir "{node_dir}"']
    # A stop is a plain SIGTERM to the agent: nothing runs `leave` on the way down.
    assert "ExecStop" not in settings and "ExecStopPost" not in settings
    assert settings["KillSignal"] == ["SIGTERM"]
    assert {"LimitNOFILE", "TasksMax", "StartLimitBurst"} <= set(settings)
    assert settings["WantedBy"] == ["default.target" if user else "multi-user.target"]
    assert ("LimitMEMLOCK" in settings) is not user


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path, executable: Path) -> None:
    """The check above can fail: a bad setting and a missing file are reported."""
    unit = tmp_path / "populi.service"
    unit.write_text(f"[Service]\nExecStart={executable} agent\nKillMode=bogus\n")
    assert "kill mode" in verify(unit, user=False, tmp_path=tmp_path).stderr
    unit.write_text(f"[Service]\nExecStart={tmp_path}/missing agent\n")
    assert verify(unit, user=False, tmp_path=tmp_path).returncode != 0


def test_install_refuses_a_data_dir_without_a_node(
    tmp_path: Path, executable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    args = ["service", "install", "--data-dir", str(tmp_path / "empty")]
    code = main([*args, "--executable", str(executable), "--unit-dir", str(units)])
    assert code == 4
    assert "populi init" in capsys.readouterr().err
    assert not units.exists()


def test_install_refuses_to_overwrite_and_uninstall_removes_only_its_own(
    node_dir: Path, executable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    install = ["service", "install", "--data-dir", str(node_dir), "--executable", str(executable)]
    install += ["--unit-dir", str(units)]
    assert main(install) == 0
    assert main(install) == 4
    assert "--force" in capsys.readouterr().err
    assert main([*install, "--force"]) == 0
    # Still enabled: uninstall says to disable first and leaves the file.
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "populi.service").symlink_to(units / "populi.service")
    assert main(["service", "uninstall", "--unit-dir", str(units)]) == 4
    assert "disable --now populi.service" in capsys.readouterr().err
    (wants / "populi.service").unlink()
    assert main(["service", "uninstall", "--unit-dir", str(units)]) == 0
    assert not (units / "populi.service").exists()
    assert main(["service", "uninstall", "--unit-dir", str(units)]) == 4
    # A unit somebody else wrote under the same name is left alone.
    (units / "populi.service").write_text("[Service]\nExecStart=/bin/true\n")
    assert main(["service", "uninstall", "--unit-dir", str(units)]) == 4
    assert "not written by" in capsys.readouterr().err
    assert (units / "populi.service").exists()


def test_print_writes_nothing(
    node_dir: Path, executable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["service", "install", "--data-dir", str(node_dir), "--executable", str(executable)]
    assert main([*args, "--unit-dir", str(tmp_path / "units"), "--print"]) == 0
    assert "KillMode=process" in capsys.readouterr().out
    assert not (tmp_path / "units").exists()
