"""``populi probe``: the local GPU probe, no agent needed.

It replays a real H100 capture (``--fixture`` or ``POPULI_GPU_FIXTURE``), and without one
it asks this machine's NVML, which on a machine without a driver is a CPU-only answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from populi_peer.cli.main import main
from support.nvml import nvml_present
from support.procs import populi

LOAD = "h100-80gb-hbm3-load.json"
LOAD_UUID = "GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae2d"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the caller's environment chooses the fixture or the config."""
    for name in ("POPULI_GPU_FIXTURE", "POPULI_GPU__FIXTURE", "POPULI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POPULI_DATA_DIR", str(tmp_path / "data"))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _check_load_capture(answer: dict[str, Any]) -> None:
    assert answer["backend"] == "replay"
    assert answer["cpu_only_reason"] is None
    (device,) = answer["devices"]
    assert device["uuid"] == LOAD_UUID  # a capture is shown as it is, without a node id
    assert device["name"] == "NVIDIA H100 80GB HBM3"
    assert device["memory_total_bytes"] == 85520809984
    assert device["utilization_gpu_pct"] == 99
    assert device["health"] == "healthy" and device["health_reasons"] == []
    # What a real H100 in a VM refuses is unknown, not an error and not unhealthy.
    for key in ("fan_speed_pct", "numa_node", "nvlinks"):
        assert device[key] is None
        assert device["unknown"][key] == "not_supported"
    assert not any(reason.startswith("error") for reason in device["unknown"].values())


def test_probe_json_replays_the_load_capture_by_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json", "--fixture", LOAD]) == 0
    captured = capsys.readouterr()
    _check_load_capture(json.loads(captured.out))
    assert captured.err == ""


def test_probe_json_replays_the_load_capture_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POPULI_GPU_FIXTURE", LOAD)
    assert main(["probe", "--json"]) == 0
    _check_load_capture(json.loads(capsys.readouterr().out))


def test_probe_json_from_the_environment_in_a_real_process(tmp_path: Path) -> None:
    result = populi("probe", "--json", env={"POPULI_GPU_FIXTURE": LOAD}, timeout=60)
    assert result.returncode == 0, result.stderr
    _check_load_capture(json.loads(result.stdout))


def test_probe_table_says_unknown_not_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--fixture", LOAD]) == 0
    text = capsys.readouterr().out
    assert LOAD_UUID in text and "99%" in text and "healthy" in text
    assert "not_supported" in text


def test_probe_without_fixture_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["backend"] == "nvml"
    if nvml_present():
        # A machine with a GPU: its real devices, each named by its own UUID.
        assert answer["devices"], answer
        assert answer["cpu_only_reason"] is None
        assert all(d["uuid"].startswith("GPU-") for d in answer["devices"])
        assert all(
            d["health"] in ("healthy", "degraded", "unknown", "unhealthy")
            for d in answer["devices"]
        )
    else:
        # No driver: a valid CPU-only node, not an error.
        assert answer["devices"] == []
        assert answer["cpu_only_reason"]


def test_probe_bad_fixture_path_is_one_line_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.json"
    assert main(["probe", "--json", "--fixture", str(missing)]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(_lines(captured.err)) == 1 and "Traceback" not in captured.err
    assert str(missing) in captured.err


def test_probe_bad_fixture_from_the_environment_is_one_line_exit_4(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", "utf-8")
    result = populi("probe", env={"POPULI_GPU_FIXTURE": str(broken)}, timeout=60)
    assert result.returncode == 4
    assert result.stdout == ""
    assert len(_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert "broken.json" in result.stderr
