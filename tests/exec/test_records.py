"""Pure parts of populi_peer.exec: environment, specs, margins, output tails, exports."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import populi_peer.exec as exec_pkg
from populi_peer.errors import BadRequest
from populi_peer.exec import StreamTotals, SupervisorState, TaskSpec, build_task_env
from populi_peer.exec._files import HEADER_LEN, TailWriter, read_deadline, read_tail, write_atomic
from populi_peer.exec._proc import parse_stat


def test_a_name_it_does_not_export_is_an_attribute_error() -> None:
    """The package imports its exports lazily (see tests/test_exports.py for the list)."""
    with pytest.raises(AttributeError):
        exec_pkg.no_such_name  # noqa: B018


def _env(**kw: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "base": None,
        "passed": {},
        "task_id": "t-1",
        "attempt": 2,
        "fencing_token": "7.42",
        "cuda_visible_devices": None,
    }
    args.update(kw)
    return build_task_env(**args)


def test_env_is_passed_plus_populi_plus_baseline() -> None:
    env = _env(
        base={"PATH": "/opt/bin:/usr/bin", "HOME": "/home/w", "SECRET": "x", "LANG": ""},
        passed={"FOO": "1", "HOME": "/scratch"},
        cuda_visible_devices="GPU-aaa, GPU-bbb",
    )
    assert env == {
        "PATH": "/opt/bin:/usr/bin",
        "HOME": "/scratch",
        "LANG": "C.UTF-8",
        "FOO": "1",
        "CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
        "POPULI_TASK_ID": "t-1",
        "POPULI_ATTEMPT": "2",
        "POPULI_FENCING_TOKEN": "7.42",
    }


def test_env_without_base_or_gpus() -> None:
    env = _env()
    assert env["PATH"].endswith("/usr/bin:/sbin:/bin")
    assert env["HOME"] == "/"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert _env(cuda_visible_devices="")["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    "name", ["POPULI_TASK_ID", "POPULI_FENCING_TOKEN", "POPULI_ANYTHING", "CUDA_VISIBLE_DEVICES"]
)
def test_env_refuses_reserved_names(name: str) -> None:
    with pytest.raises(BadRequest, match=name) as info:
        _env(passed={name: "x"})
    assert info.value.details["variable"] == name


@pytest.mark.parametrize("passed", [{"": "x"}, {"A=B": "x"}, {"A": "nul\0"}])
def test_env_refuses_invalid_variables(passed: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        _env(passed=passed)


def test_env_refuses_bad_gpu_list() -> None:
    with pytest.raises(BadRequest, match="CUDA_VISIBLE_DEVICES"):
        _env(cuda_visible_devices="GPU-a,,GPU-b")


def _spec(**kw: Any) -> TaskSpec:
    args: dict[str, Any] = {
        "task_id": "t",
        "attempt": 1,
        "argv": ("true",),
        "env": {},
        "cwd": "/",
        "stop_margin_s": 1.0,
        "kill_grace_s": 0.5,
    }
    args.update(kw)
    return TaskSpec(**args)


def test_spec_round_trips_and_validates() -> None:
    spec = _spec(argv=["echo", "hi"], env={"A": "1"}, isolation="process_group")
    assert TaskSpec.from_json(spec.to_json()) == spec
    for bad in (
        {"argv": ()},
        {"argv": "echo hi"},
        {"cwd": "relative"},
        {"stop_margin_s": 0.1},  # below the grace
        {"kill_grace_s": -1},
        {"output_cap_bytes": -1},
        {"isolation": "vm"},
        {"attempt": -1},
        {"env": {"A=": "1"}},
    ):
        with pytest.raises(BadRequest):
            _spec(**bad)
    with pytest.raises(BadRequest, match="lacks the field"):
        TaskSpec.from_json({"task_id": "t"})


def test_spec_json_keeps_its_keys_in_order() -> None:
    """``spec.json``: ``v`` first, then every field in order, ``null`` where unset."""
    spec = _spec(
        task_id="t-1",
        attempt=2,
        argv=["echo", "hi"],
        env={"A": "1"},
        output_cap_bytes=4096,
        isolation="cgroup",
        cgroup_parent="/sys/fs/cgroup/populi",
    )
    assert list(spec.to_json().items()) == [
        ("v", 1),
        ("task_id", "t-1"),
        ("attempt", 2),
        ("argv", ["echo", "hi"]),
        ("env", {"A": "1"}),
        ("cwd", "/"),
        ("stop_margin_s", 1.0),
        ("kill_grace_s", 0.5),
        ("output_cap_bytes", 4096),
        ("isolation", "cgroup"),
        ("cgroup_parent", "/sys/fs/cgroup/populi"),
    ]
    plain = _spec().to_json()
    assert (plain["isolation"], plain["cgroup_parent"]) == ("auto", None)
    assert list(plain) == [key for key, _ in spec.to_json().items()]


def test_state_json_keeps_its_keys_in_order() -> None:
    """``state.json``: every field in order, the two streams under ``output``."""
    state = SupervisorState(
        task_id="t-1",
        attempt=2,
        supervisor_pid=10,
        supervisor_starttime_ticks=11,
        status="exited",
        isolation="cgroup",
        cgroup="/sys/fs/cgroup/populi/t-1",
        child_pid=12,
        child_starttime_ticks=13,
        pgid=12,
        started_at_boot=1.5,
        started_at_wall=2.5,
        deadline_boot=3.5,
        stop_reason="deadline",
        stop_requested_at_boot=4.5,
        sigkill_at_boot=5.5,
        stopped_at_boot=6.5,
        stopped_at_wall=7.5,
        exit_code=None,
        signal=9,
        error="killed",
        stdout=StreamTotals(100, 50),
        stderr=StreamTotals(7, 7),
        updated_at_wall=8.5,
    )
    assert list(state.to_json().items()) == [
        ("v", 1),
        ("task_id", "t-1"),
        ("attempt", 2),
        ("supervisor_pid", 10),
        ("supervisor_starttime_ticks", 11),
        ("status", "exited"),
        ("isolation", "cgroup"),
        ("cgroup", "/sys/fs/cgroup/populi/t-1"),
        ("child_pid", 12),
        ("child_starttime_ticks", 13),
        ("pgid", 12),
        ("started_at_boot", 1.5),
        ("started_at_wall", 2.5),
        ("deadline_boot", 3.5),
        ("stop_reason", "deadline"),
        ("stop_requested_at_boot", 4.5),
        ("sigkill_at_boot", 5.5),
        ("stopped_at_boot", 6.5),
        ("stopped_at_wall", 7.5),
        ("exit_code", None),
        ("signal", 9),
        ("error", "killed"),
        (
            "output",
            {
                "stdout": {"total_bytes": 100, "kept_bytes": 50},
                "stderr": {"total_bytes": 7, "kept_bytes": 7},
            },
        ),
        ("updated_at_wall", 8.5),
    ]
    assert SupervisorState.from_json(state.to_json()) == state
    starting = SupervisorState("t-1", 2, 10, 11, "starting").to_json()
    assert list(starting) == [key for key, _ in state.to_json().items()]
    assert [value for key, value in starting.items() if key not in _SET_AT_START] == [None] * 17
    assert starting["output"] == {
        "stdout": {"total_bytes": 0, "kept_bytes": 0},
        "stderr": {"total_bytes": 0, "kept_bytes": 0},
    }


_SET_AT_START = frozenset(
    ("v", "task_id", "attempt", "supervisor_pid", "supervisor_starttime_ticks", "status", "output")
)


def test_deadline_file(tmp_path: Path) -> None:
    path = tmp_path / "deadline"
    assert read_deadline(path) is None
    write_atomic(path, b"123.5\n")
    assert read_deadline(path) == 123.5
    for garbage in (b"", b"soon", b"nan", b"-inf", b"\xff"):
        write_atomic(path, garbage)
        assert read_deadline(path) is None


def test_parse_stat_with_awkward_command_name() -> None:
    line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0"
    stat = parse_stat(line)
    assert (stat.pid, stat.state, stat.ppid, stat.pgrp, stat.session) == (4242, "S", 1, 4242, 4242)
    assert stat.starttime_ticks == 987654


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(min_value=0, max_value=3000),
    chunks=st.lists(st.integers(min_value=1, max_value=40_000), max_size=12),
    offset=st.integers(min_value=0, max_value=200_000),
    limit=st.integers(min_value=0, max_value=5000),
)
def test_tail_keeps_exactly_the_last_cap_bytes(
    tmp_path_factory: pytest.TempPathFactory, cap: int, chunks: list[int], offset: int, limit: int
) -> None:
    path = tmp_path_factory.mktemp("tail") / "out"
    writer = TailWriter(path, cap)
    stream = bytearray()
    for n in chunks:
        chunk = bytes((len(stream) + i) % 256 for i in range(n))
        writer.write(chunk)
        stream += chunk
        # While running: what is readable is the last cap bytes, whatever the file holds.
        assert read_tail(path, 0, 1 << 30) == (
            bytes(stream[-cap:] if cap else b""),
            len(stream),
            len(stream),
        )
    writer.close()
    total = len(stream)
    kept_from = total - min(cap, total)
    data, next_offset, seen_total = read_tail(path, offset, limit)
    start = min(max(offset, kept_from), total)
    assert seen_total == total == writer.total_bytes
    assert data == bytes(stream[start : start + limit])
    assert next_offset == start + len(data)
    assert path.stat().st_size - HEADER_LEN == min(cap, total)


def test_tail_counts_on_when_the_disk_is_full(tmp_path: Path) -> None:
    writer = TailWriter(tmp_path / "out", 10)
    writer.write(b"abc")
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, writer._fd)  # the file now answers every write with ENOSPC
    os.close(full)
    writer.write(b"defg")
    writer.write(b"hi")
    assert writer.error is not None and writer.error.errno == errno.ENOSPC
    assert writer.total_bytes == 9
    writer.close()
    assert read_tail(tmp_path / "out", 0, 100) == (b"abc", 3, 3)
