"""Fixture files (captures, sequences) and ``python -m populi_peer.gpu``."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from trio.testing import MockClock

from gpu import gpu_variants as v
from populi_peer.errors import ConfigError
from populi_peer.gpu import FixtureError, open_probe, package_capture_names
from populi_peer.gpu.__main__ import main
from populi_peer.testing import VirtualClock

#: sha256 of the real H100 readings as captured (nvml-idle.json, nvml-load.json): the
#: shipped copies must stay byte-identical to what the hardware said.
CAPTURE_SHA256 = {
    "h100-80gb-hbm3-idle.json": "e2ea2eade2d8cc710b192f3a0aabd1dadb9edd8a3dc43f301cc6622182bc7867",
    "h100-80gb-hbm3-load.json": "b841537d38b46afef290b506f8da4f3e24dcdd27b3e603a70ebf415cabcd5789",
}


def test_shipped_captures_are_the_real_readings() -> None:
    assert package_capture_names() == tuple(sorted(CAPTURE_SHA256))
    folder = resources.files("populi_peer.gpu").joinpath("captures")
    for name, digest in CAPTURE_SHA256.items():
        assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest


async def test_relative_captures_resolve_next_to_the_sequence(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    sub = tmp_path / "fixtures"
    sub.mkdir()
    v.write(sub, v.ecc_uncorrected(), "ecc.json")
    seq = v.sequence({"at_s": 0, "capture": "ecc.json"})
    async with open_probe(
        fixture=v.write(sub, seq, "seq.json"), node_id=None, clock=clock
    ) as probe:
        inventory = await probe.probe()
    assert inventory.source == "seq.json"
    assert inventory.devices[0].ecc_uncorrected_volatile == 2
    # A name that is not next to the sequence falls back to the shipped captures.
    seq = v.sequence({"at_s": 0, "capture": v.LOAD})
    async with open_probe(
        fixture=v.write(sub, seq, "seq2.json"), node_id=None, clock=clock
    ) as probe:
        assert (await probe.probe()).devices[0].utilization_gpu_pct == 99


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"populi_replay": 2, "steps": []}, "populi_replay 2 is not supported"),
        ({"populi_replay": 1, "steps": []}, "'steps' must be a non-empty list"),
        (v.sequence({"at_s": 1, "capture": v.IDLE}), "first capture step must be at at_s 0"),
        (v.sequence({"at_s": 0, "capture": v.IDLE}, {"at_s": -1, "lost": [0]}), "steps[1].at_s"),
        (v.sequence({"at_s": 0, "capture": v.IDLE, "lost": [0]}), "exactly one of"),
        (v.sequence({"at_s": 0, "capture": "nope.json"}), "capture 'nope.json' not found"),
        (
            v.sequence({"at_s": 0, "capture": v.IDLE}, {"at_s": 2, "xid": {"index": 0}}),
            "steps[1].xid.code",
        ),
        (v.sequence({"at_s": 0, "capture": v.IDLE}, {"at_s": 2, "lost": 0}), "steps[1].lost"),
        ({"label": "x"}, "not a capture"),
        ([1, 2], "not a capture"),
    ],
)
def test_bad_fixtures_name_the_problem(tmp_path: Path, data: Any, message: str) -> None:
    path = v.write(tmp_path, data)
    with pytest.raises(FixtureError) as info:
        open_probe(fixture=path, node_id=None, clock=VirtualClock())
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)
    assert info.value.exit_code == 4


def test_missing_and_broken_fixture_files(tmp_path: Path) -> None:
    with pytest.raises(FixtureError, match="no such file"):
        open_probe(fixture=tmp_path / "absent.json", node_id=None, clock=VirtualClock())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", "utf-8")
    with pytest.raises(FixtureError, match="not valid JSON"):
        open_probe(fixture=broken, node_id=None, clock=VirtualClock())


def test_cli_json_replays_the_load_capture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--fixture", v.LOAD]) == 0
    out = json.loads(capsys.readouterr().out)
    (dev,) = out["devices"]
    assert dev["uuid"] == v.LOAD_UUID
    assert dev["memory_total_bytes"] == 85520809984
    assert dev["utilization_gpu_pct"] == 99
    assert dev["health"] == "healthy"
    assert dev["unknown"]["fan_speed_pct"] == "not_supported"


def test_cli_table_and_node_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fixture", v.LOAD, "--node-id", "node-a"]) == 0
    text = capsys.readouterr().out
    assert "GPU-f1e7c5a4-0036-6787-cb54-341f544e4fa2" in text
    assert "NVIDIA H100 80GB HBM3" in text
    assert "22098/81559 MiB" in text
    assert "99%" in text
    assert "not_supported (fan_speed_pct, numa_node, nvlinks)" in text
    assert "healthy" in text


def test_cli_bad_fixture_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fixture", str(tmp_path / "absent.json")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: GPU fixture")
