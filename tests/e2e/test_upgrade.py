"""Upgrades keep work, and a task's supervisor needs nothing of the agent that started it
(docs/adr/0013-single-file-executable.md).

A mesh on loopback: ``cp`` (control plane, CPU only) and ``w1`` run from this checkout;
``w2``, the worker, runs from the install under test: this checkout's package (``pip``)
or the single file (``file``, ``E2E_POPULI_BINARY``: ``scripts/build-binary`` makes it; the
tests that need it skip without it). ``w1`` submits ``populi run --gpus 1``, which runs on
``w2`` (the only other GPU node) under a lease from ``cp``.

- The upgrade: while the task runs, the file is replaced (a new file at the same path,
  as an install does) or the node switches between the package and the file, and the
  agent restarts as under systemd with ``KillMode=process`` (SIGTERM to the agent
  alone). The new agent re-adopts the supervisor and keeps renewing; the task finishes
  with its own exit code in its first attempt, its lease never lapsed (it ends
  ``completed``, no fallback).
- The agent's death: the single-file agent is SIGKILLed, its file replaced and its
  unpacked folder removed. The supervisor, which holds no file of it, still stops the
  task before the lease deadline (CLOCK_BOOTTIME, the clock it enforces), the task gets
  none of the bundle's variables, and the task falls back to the submitter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from e2e.exec_support import (
    MARK,
    MARK_NAME,
    STOP_MARGIN_S,
    Mesh,
    check_tick_order,
    deadline_boot_ns,
    kill_pids,
    leftovers,
    log_events,
    read_ticks,
    supervisor_state,
    tick_command,
    token_key,
    wait_for,
    wait_renewal,
)

from support.installs import Installs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BINARY = os.environ.get("E2E_POPULI_BINARY")
#: Long enough for a stop and a start of an agent between two renewals (every TTL/3): the
#: supervisor stops the task TTL - stop margin after the last renewal was sent.
UPGRADE_TTL_S = 15
EXIT_CODE = 3
#: A one-file build's unpacked folder, as its files appear in /proc/PID/maps.
BUNDLE_DIR = re.compile(r"(/\S*/_MEI\w+)/")
#: Attempt 1 ticks this many times (100 ms each): it outlasts the restart.
TICKS = 120


def needs_binary(*installs: str) -> None:
    if "file" in installs and not BINARY:
        pytest.skip("no single file: build it with scripts/build-binary, set E2E_POPULI_BINARY")


def install_file(bin_dir: Path) -> Path:
    """Put the single file at ``bin_dir/populi`` as an install does: a new file renamed
    over the old one (the running old file lives on, unnamed)."""
    assert BINARY is not None
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "populi"
    staged = bin_dir / ".populi.new"
    shutil.copyfile(BINARY, staged)
    staged.chmod(0o755)
    os.replace(staged, target)
    return target


def command_of(install: str, bin_dir: Path) -> list[str] | None:
    if install == "pip":
        return None  # this checkout's package
    return [str(install_file(bin_dir))]


def bundle_dirs(pid: int) -> set[str]:
    """The unpacked folders (``…/_MEIxxxx``) whose files process ``pid`` maps."""
    return set(BUNDLE_DIR.findall(Path(f"/proc/{pid}/maps").read_text()))


def agent_python_pid(mesh: Mesh, name: str) -> int:
    """The pid the agent records for itself (the single file's Python child)."""
    info = json.loads((mesh[name].data_dir / "run" / "agent.json").read_text())
    return int(info["pid"])


def live_files(pid: int) -> list[str]:
    """Files process ``pid`` maps that still exist under a name in an unpacked folder."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "/_MEI" in parts[5] and not parts[5].endswith("(deleted)"):
            out.append(parts[5])
    return out


def task_state(mesh: Mesh, task_id: str) -> dict[str, Any]:
    """``populi task show`` once ``populi task wait`` says the task ended."""
    mesh.wait_cli("w1", task_id)
    return mesh.show("w1", task_id)


@pytest.fixture
def mesh_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # The file unpacks itself under $TMPDIR; an agent killed with SIGKILL (the cleanup
    # does) leaves its folder behind: keep them all with the test's files.
    (tmp_path / "unpack").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "unpack"))
    built: list[Mesh] = []

    def make(install: str) -> Mesh:
        host = Installs({"w2": command_of(install, tmp_path / "bin")})
        mesh = Mesh.create(
            tmp_path / "mesh",
            ["w1", "w2"],
            host=host,
            settings={"max_lease_ttl_s": UPGRADE_TTL_S},
        )
        built.append(mesh)
        return mesh

    yield make
    for mesh in built:
        mesh.close()
    left = leftovers(tmp_path)
    kill_pids(left)
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize(
    ("before", "after"),
    [("pip", "file"), ("file", "file"), ("file", "pip")],
    ids=["pip-to-file", "file-replaced", "file-to-pip"],
)
def test_upgrade_while_a_task_runs_keeps_the_task_and_its_lease(
    before: str, after: str, mesh_for: Any, tmp_path: Path
) -> None:
    needs_binary(before, after)
    mesh: Mesh = mesh_for(before)
    w2 = mesh["w2"]
    ticks = tmp_path / "ticks"
    args = ["--gpus", "1", "--env", f"EXIT_CODE={EXIT_CODE}"]
    task_id = mesh.run_detached("w1", *args, *tick_command(ticks, n1=TICKS, n2=5))
    wait_for("the task ticks on w2", lambda: read_ticks(ticks), guard_s=60)
    task_dir = mesh.task_dir("w2", "worker", task_id, 1)
    supervisor = int(supervisor_state(task_dir)["supervisor_pid"])
    if before == "file":
        old_bundles = bundle_dirs(agent_python_pid(mesh, "w2"))
        assert old_bundles, "the single file's agent maps no unpacked folder"
        # The supervisor is an instance of its own: it maps nothing of the agent's folder,
        # and nothing of its own that still exists (that folder went as it detached).
        assert not bundle_dirs(supervisor) & old_bundles
        assert live_files(supervisor) == []
    wait_renewal(task_dir)
    renewed = time.monotonic()

    # The upgrade: the new install in place, then the restart (systemd, KillMode=process).
    assert isinstance(mesh.host, Installs)
    mesh.host.commands["w2"] = command_of(after, tmp_path / "bin")
    assert mesh.stop("w2", signal.SIGTERM, timeout=60) == 0
    assert supervisor_state(task_dir)["status"] == "running"
    deadline_before = deadline_boot_ns(task_dir)
    log_before = len(w2.log())
    took = mesh.start("w2")
    print(f"{before} -> {after}: agent back {time.monotonic() - renewed:.1f} s after a renewal")
    print(f"(its start took {took:.1f} s)")
    wait_for(
        "the new agent re-adopts the supervisor",
        lambda: log_events(w2.log()[log_before:], "attempt re-adopted", task_id=task_id),
        guard_s=60,
    )
    wait_for(
        "the new agent renews the lease",
        lambda: deadline_boot_ns(task_dir) > deadline_before,
        guard_s=60,
        every_s=0.05,
    )

    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == EXIT_CODE, waited.stderr
    task = task_state(mesh, task_id)
    assert task["exit_status"] == EXIT_CODE, task["reasons"]
    (attempt,) = task["attempts"]
    assert attempt["where"] == "remote" and attempt["node"] == w2.node_id
    final = supervisor_state(task_dir)
    assert (final["stop_reason"], final["exit_code"]) == ("exited", EXIT_CODE), final
    assert int(final["supervisor_pid"]) == supervisor
    by_attempt = check_tick_order(read_ticks(ticks))
    assert set(by_attempt) == {1} and len(by_attempt[1]) == TICKS
    # The lease never lapsed: it ended completed, its token the attempt's, no fallback.
    (lease,) = mesh.leases(task=task_id)
    assert lease["state"] == "completed" and lease["token"] == attempt["token"], lease
    assert not any(r[1] == "lease_dead_confirmed" for r in task["reasons"]), task["reasons"]


def test_supervisor_stops_on_time_with_its_agent_and_file_gone(
    mesh_for: Any, tmp_path: Path
) -> None:
    needs_binary("file")
    mesh: Mesh = mesh_for("file")
    ticks = tmp_path / "ticks"
    task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=600, n2=5))
    wait_for("the task ticks on w2", lambda: read_ticks(ticks), guard_s=60)
    task_dir = mesh.task_dir("w2", "worker", task_id, 1)
    state = supervisor_state(task_dir)
    supervisor, child = int(state["supervisor_pid"]), int(state["child_pid"])
    agent_pid = agent_python_pid(mesh, "w2")
    agent_bundles = bundle_dirs(agent_pid)

    # The task's environment holds nothing of the bundle: no loader variable, no path
    # into an unpacked folder.
    environ = Path(f"/proc/{child}/environ").read_bytes().decode().split("\0")
    names = {e.partition("=")[0] for e in environ if e}
    assert f"{MARK_NAME}={MARK}" in environ
    assert not {n for n in names if n.startswith("_PYI") or n.startswith("LD_LIBRARY_PATH")}
    assert not [e for e in environ if "/_MEI" in e], environ

    wait_renewal(task_dir)
    # The agent dies hard (its Python child dies with the file's loader), the file is
    # replaced and the agent's unpacked folder removed (SIGKILL leaves it behind).
    mesh.stop("w2", signal.SIGKILL, timeout=30)
    wait_for("the agent's Python process is gone", lambda: not Path(f"/proc/{agent_pid}").exists())
    install_file(tmp_path / "bin")
    for folder in agent_bundles:
        shutil.rmtree(folder, ignore_errors=True)

    stopped, took = wait_for(
        "the supervisor stops the task by itself",
        lambda: (s := supervisor_state(task_dir))["status"] == "exited" and s,
        guard_s=60,
        every_s=0.05,
    )
    assert stopped["stop_reason"] == "deadline", stopped
    deadline_ns = deadline_boot_ns(task_dir)
    attempt_ticks = [t for t in read_ticks(ticks) if t.attempt == 1]
    last_ns = max(t.boot_ns for t in attempt_ticks)
    assert last_ns < deadline_ns, f"ticked {(last_ns - deadline_ns) / 1e6:.0f} ms after deadline"
    assert float(stopped["stopped_at_boot"]) * 1e9 < deadline_ns
    print(
        f"stopped {took:.1f} s after the kill, last tick {(deadline_ns - last_ns) / 1e9:.2f} s "
        f"before the deadline (stop margin {STOP_MARGIN_S:g} s)"
    )
    wait_for("the supervisor is gone", lambda: not Path(f"/proc/{supervisor}").exists())

    # The replaced file starts; the task ends once, after its lease died: the fallback
    # ran on w1 with a higher token, and nothing of attempt 1 ticked after it began.
    mesh.start("w2")
    task = task_state(mesh, task_id)
    assert task["state"] == "succeeded", task["reasons"]
    first, second = task["attempts"]
    assert first["where"] == "remote" and first["outcome"] in ("lease_dead", "lease_lost"), first
    assert (second["where"], second["node"]) == ("local", mesh["w1"].node_id), second
    assert token_key(second["token"]) > token_key(first["token"])
    by_attempt = check_tick_order(read_ticks(ticks))
    assert set(by_attempt) == {1, 2} and {t.node for t in by_attempt[2]} == {"w1"}


def test_the_file_names_its_commit() -> None:
    needs_binary("file")
    assert BINARY is not None
    result = subprocess.run([BINARY, "--version"], capture_output=True, text=True, check=True)
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "single-file" in result.stdout, result.stdout
    if head.returncode == 0:
        assert f"commit {head.stdout.strip()}" in result.stdout, result.stdout
