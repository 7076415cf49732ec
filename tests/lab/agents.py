"""Real agents in the network-namespace lab: the :class:`support.mesh.Mesh` of the other
real-process tests, on a :class:`LabHost` that runs every ``populi`` process (agents and CLI
alike) inside its node's namespace (``tests/lab/netns.py``), each agent listening on its
lab address (``--listen 10.77.0.X:7431``); and the contract both lab scenarios check once a
worker has lost the control plane.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from e2e.exec_support import (
    Tick,
    accepted_results,
    check_tick_order,
    deadline_boot_ns,
    read_ticks,
    supervisor_state,
    token_key,
)
from lab.netns import Lab

from support.mesh import Host, Mesh
from support.procs import leftovers

PORT = 7431
GUARD_S = 60.0


class LabHost(Host):
    """Each node in its own namespace of the lab, listening on its lab address. Every
    ``populi`` process, agents and CLI alike, runs there (``ip netns exec`` execs it: the
    PID is the process's own); this process cannot reach the agents."""

    reachable = False

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def listen(self, name: str) -> str:
        return f"{self.lab.ip(name)}:{PORT}"

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        return list(self.lab.argv(name, *argv))


@contextmanager
def open_lab_mesh(lab: Lab, root: Path) -> Iterator[Mesh]:
    """An empty mesh on ``lab``'s hosts (build it with :meth:`Mesh.build`), closed
    afterwards; no process of it may be left behind."""
    mesh = Mesh(root, host=LabHost(lab))
    try:
        yield mesh
    finally:
        mesh.close()
    left = leftovers(root)
    assert not left, f"processes left behind: {left}"


def fell_back_on_the_control_planes_word(
    mesh: Mesh, task: dict[str, Any], ticks: Path, task_dir: Path, *, remote: str, local: str
) -> tuple[dict[int, list[Tick]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The contract once ``remote``, running attempt 1 of ``local``'s task, lost the control
    plane (safety rules 1-4, 7): never in two places at once; attempt 1 ran on ``remote``
    and its supervisor stopped it by itself, its last tick before the lease deadline on
    CLOCK_BOOTTIME; ``cp`` expired the lease on its own clock, after that last tick;
    ``local`` fell back on that word with a higher token and ran attempt 2, whose result is
    the one accepted. Returns the ticks by attempt, both attempts and the dead lease."""
    by_attempt = check_tick_order(read_ticks(ticks))
    assert set(by_attempt) == {1, 2}, sorted(by_attempt)
    assert {t.node for t in by_attempt[1]} == {remote}
    assert {t.node for t in by_attempt[2]} == {local}
    state = supervisor_state(task_dir)
    assert state["status"] == "exited" and state["stop_reason"] == "deadline", state
    deadline_ns = deadline_boot_ns(task_dir)
    last_boot_ns = max(t.boot_ns for t in by_attempt[1])
    assert last_boot_ns < deadline_ns, (
        f"attempt 1 ticked {(last_boot_ns - deadline_ns) / 1e6:.0f} ms past its lease deadline"
    )
    assert task["state"] == "succeeded", task["reasons"]
    first, second = task["attempts"]
    lease = mesh.lease_record(first["lease_id"])
    assert lease["state"] == "expired", lease
    last_tick_ms = max(t.time_ns for t in by_attempt[1]) / 1e6
    assert lease["state_changed_wall_ms"] > last_tick_ms, (lease, last_tick_ms)
    assert (second["where"], second["node"], second["outcome"]) == (
        "local",
        mesh[local].node_id,
        "succeeded",
    )
    assert second["placement_reasons"][0] == "lease_dead_confirmed", second
    assert token_key(second["token"]) > token_key(first["token"])
    accepted = accepted_results(task)
    assert len(accepted) == 1 and f"token={second['token']} " in accepted[0][2], accepted
    return by_attempt, first, second, lease


__all__ = ["GUARD_S", "PORT", "LabHost", "fell_back_on_the_control_planes_word", "open_lab_mesh"]
