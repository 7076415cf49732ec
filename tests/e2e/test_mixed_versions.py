"""Version N talks to N-1: a mesh with both versions side by side (docs/design.md, "Time,
versions, storage"; docs/adr/0013-single-file-executable.md).

N is this checkout. N-1 is a build of the commit before the last protocol bump
(``PROTOCOL_VERSION`` in ``populi_peer/__init__.py``); while the protocol has never been
bumped, it is the previous commit on the first-parent line that changed the package, the
version a rolling upgrade replaces. ``E2E_POPULI_OLD_REF`` names another commit. N-1 is
checked out with ``git worktree add`` and pip-installed into a virtual environment of its
own, so that nothing of N leaks into it.

Both ways round: an N-1 control plane with an N node beside an N-1 node, and an N control
plane with the versions of the nodes swapped. In each, a GPU task goes from the node of
one version to the worker of the other, under a lease from the control plane, and back;
each finishes with its own exit code and a completed lease. Then the N-1 worker is
upgraded to N while a task runs on it (a rolling upgrade: its data directory migrates,
its supervisor is re-adopted). Takes a minute or two (the
install), so it is marked slow; it runs in the default suite and in CI.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.exec_support import (
    Mesh,
    check_tick_order,
    kill_pids,
    leftovers,
    log_events,
    read_ticks,
    tick_command,
    wait_for,
)

from support.installs import Installs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
INIT = "populi_peer/__init__.py"
PROTOCOL = re.compile(r"^PROTOCOL_VERSION = (\d+)$", re.MULTILINE)


def git(*args: str) -> str | None:
    result = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False, timeout=60
    )
    return result.stdout.strip() if result.returncode == 0 else None


def protocol_at(ref: str) -> int | None:
    text = git("show", f"{ref}:{INIT}")
    match = PROTOCOL.search(text or "")
    return int(match.group(1)) if match else None


def previous_version() -> tuple[str, str] | None:
    """``(commit, why)`` of N-1, or None when the history is not here (a shallow clone)."""
    if os.environ.get("E2E_POPULI_OLD_REF"):
        ref = git("rev-parse", "--verify", os.environ["E2E_POPULI_OLD_REF"] + "^{commit}")
        return (ref, "E2E_POPULI_OLD_REF") if ref else None
    current = protocol_at("HEAD")
    if current is None:
        return None
    bump = git("log", "-1", "--format=%H", f"-SPROTOCOL_VERSION = {current}", "--", INIT)
    if bump and protocol_at(f"{bump}^") == current - 1:
        return bump + "^", f"the commit before protocol {current}"
    ref = git("log", "-1", "--first-parent", "--format=%H", "HEAD^", "--", "populi_peer")
    if not ref:
        return None
    return ref, f"protocol {current} never bumped: the previous commit that changed the package"


@pytest.fixture(scope="module")
def old_populi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    found = previous_version()
    if found is None:
        pytest.skip("no git history to take version N-1 from (a shallow clone?)")
    ref, why = found
    base = tmp_path_factory.mktemp("n-minus-1")
    tree, venv = base / "tree", base / "venv"
    assert git("worktree", "add", "--detach", str(tree), ref) is not None
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        install = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(tree)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert install.returncode == 0, install.stderr[-2000:]
        # -P: not this checkout's package from the current directory.
        python = [str(venv / "bin" / "python"), "-P"]
        where = subprocess.run(
            [*python, "-c", "import populi_peer; print(populi_peer.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert where.stdout.startswith(str(venv)), where.stdout
        command = [*python, "-m", "populi_peer"]
        print(f"\nN-1 = {ref[:12]} ({why}), installed at {where.stdout.strip()}")
        yield command
    finally:
        git("worktree", "remove", "--force", str(tree))


def rolling_upgrade(mesh: Mesh, host: Installs, tmp_path: Path) -> None:
    """The N-1 worker w1 becomes N while a task from w2 runs on it: the N agent opens the
    N-1 data directory, re-adopts the N-1 supervisor and renews its lease; the task ends
    with its own exit code in its first attempt, its lease completed."""
    ticks = tmp_path / "ticks-upgrade"
    args = ["--gpus", "1", "--node", "w1", "--no-fallback", "--env", "EXIT_CODE=7"]
    task_id = mesh.run_detached("w2", *args, *tick_command(ticks, n1=60, n2=5))
    wait_for("the task ticks on w1", lambda: read_ticks(ticks), guard_s=60)
    host.commands["w1"] = None  # this checkout's package
    assert mesh.stop("w1", signal.SIGTERM, timeout=60) == 0
    log_before = len(mesh["w1"].log())
    mesh.start("w1")
    wait_for(
        "the N agent re-adopts the N-1 supervisor",
        lambda: log_events(mesh["w1"].log()[log_before:], "attempt re-adopted", task_id=task_id),
        guard_s=60,
    )
    waited = mesh.wait_cli("w2", task_id)
    assert waited.returncode == 7, f"{waited.stdout} {waited.stderr}"
    (attempt,) = mesh.show("w2", task_id)["attempts"]
    assert attempt["where"] == "remote" and attempt["node"] == mesh["w1"].node_id
    assert len(check_tick_order(read_ticks(ticks))[1]) == 60
    (lease,) = mesh.leases(task=task_id)
    assert lease["state"] == "completed", lease
    print("N-1 -> N upgrade of the worker mid-task: exit 7, lease completed")


@pytest.mark.parametrize("old_side", ["old-control-plane", "new-control-plane"])
def test_n_and_n_minus_1_run_each_others_tasks(
    old_side: str, old_populi: list[str], tmp_path: Path
) -> None:
    old = ["cp", "w2"] if old_side == "old-control-plane" else ["w1"]
    host = Installs(dict.fromkeys(old, old_populi), reachable="cp" not in old)
    # An N control plane whose nodes include N-1 ones keeps its root signing (ADR 0018,
    # Decision 3): an N-1 joiner reads neither version 3 tokens nor issuer chains.
    init_args = ("--root-signs",) if "cp" not in old else ()
    mesh = Mesh.create(tmp_path / "mesh", ["w1", "w2"], host=host, init_args=init_args)
    try:
        for submitter, worker, code in (("w1", "w2", 5), ("w2", "w1", 6)):
            ticks = tmp_path / f"ticks-{submitter}"
            args = ["--gpus", "1", "--node", worker, "--no-fallback", "--env", f"EXIT_CODE={code}"]
            task_id = mesh.run_detached(submitter, *args, *tick_command(ticks, n1=5, n2=5))
            waited = mesh.wait_cli(submitter, task_id)
            versions = f"{'N-1' if submitter in old else 'N'} -> {'N-1' if worker in old else 'N'}"
            assert waited.returncode == code, f"{versions}: {waited.stdout} {waited.stderr}"
            task = mesh.show(submitter, task_id)
            (attempt,) = task["attempts"]
            assert attempt["where"] == "remote" and attempt["node"] == mesh[worker].node_id
            assert task["exit_status"] == code
            by_attempt = check_tick_order(read_ticks(ticks))
            assert {t.node for t in by_attempt[1]} == {worker} and len(by_attempt[1]) == 5
            (lease,) = mesh.leases(task=task_id)
            assert lease["state"] == "completed", lease
            print(f"{versions}: exit {code}, lease {lease['state']}")
            mesh.wait_settled()
        if old_side == "new-control-plane":
            rolling_upgrade(mesh, host, tmp_path)
    finally:
        mesh.close()
        left = leftovers(tmp_path)
        kill_pids(left)
    assert not left, f"processes left behind: {left}"
