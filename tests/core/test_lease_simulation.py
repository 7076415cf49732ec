"""The seeded lease simulation (populi_peer/testing/lease_sim.py): control-plane restarts
with tasks running and results undelivered, claims racing grants, lost full reports — the
seeds that fit in about 30 s, exact replay, and scripted scenarios asserted in simulation
time. ``scripts/simulate-leases --seeds N`` runs more."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pytest

from populi_peer.core import claims, leases
from populi_peer.testing.lease_sim import (
    LeaseSimulation,
    LeaseSimulationFailure,
    SimConfig,
    run_seed,
)
from support.seeds import first_failure_twice, seed_totals

#: Seeds the suite runs (about 20-30 s here); override with POPULI_LEASE_SEEDS.
SUITE_SEEDS = int(os.environ.get("POPULI_LEASE_SEEDS", "240"))

QUIET = SimConfig(
    nodes=3,
    tasks=0,
    run_s=40.0,
    drop=0.0,
    duplicate=0.0,
    delay_s=(0.005, 0.01),
    long_delay=0.0,
    crash_every_s=math.inf,
    cut_every_s=math.inf,
    sleep_every_s=math.inf,
    lose_full_report=0.0,
    forget=0.0,
    failover=0.0,
    rate=(1.0, 1.0),
)


def test_the_suite_seeds_are_clean() -> None:
    totals = seed_totals(run_seed, range(SUITE_SEEDS))
    # Not vacuous: restarts, lost full reports and gaps, ends recorded from reports,
    # leases learned, claims made and converted, fallbacks — and the work gets done.
    assert totals["cp_crashes"] > SUITE_SEEDS and totals["gaps"] > SUITE_SEEDS
    assert totals["failovers"] > SUITE_SEEDS // 2
    assert totals["full_reports_lost"] > SUITE_SEEDS // 2
    assert totals["ends_recorded"] > SUITE_SEEDS and totals["learned"] > 0
    assert totals["claims"] > SUITE_SEEDS // 2 and totals["claims_converted"] > SUITE_SEEDS // 2
    assert totals["fallbacks"] > SUITE_SEEDS
    assert totals["tasks_done"] >= 0.99 * totals["tasks"]


def _blind_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the node's start transaction on purpose: it checks nothing."""
    original = claims.NodeBook._gpu_reasons

    def blind(self: claims.NodeBook, gpus: object, *, own_attempt: object, own_claim: object):  # type: ignore[no-untyped-def]
        if own_attempt is not None and own_claim is None:
            return ()
        return original(self, gpus, own_attempt=own_attempt, own_claim=own_claim)  # type: ignore[arg-type]

    monkeypatch.setattr(claims.NodeBook, "_gpu_reasons", blind)


def test_a_failing_seed_replays_exactly_with_its_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the start transaction's check a GPU runs two attempts; the same seed fails
    the same way again, with its trace."""
    _blind_start(monkeypatch)
    first, again = first_failure_twice(run_seed, range(300), LeaseSimulationFailure)
    assert first.seed == again.seed and str(first) == str(again)
    assert re.search(r"GPU \S+ runs", str(first))
    assert "--- last events ---" in str(first) and first.trace.count("\n") > 20


# -- scripted scenarios ------------------------------------------------------------------------


def _starts(sim: LeaseSimulation, task_id: str) -> list[float]:
    return [p.started for p in sim.procs if p.task_id == task_id]


def restart_with_results_undelivered() -> LeaseSimulation:
    sim = LeaseSimulation(7, QUIET)
    sim.add_task("done", "n0", duration_s=5.0, local=False, at=1.0, target="n1")
    sim.add_task("long", "n0", duration_s=20.0, local=False, at=1.0, target="n2")
    sim.at(5.0, lambda: sim.sleep("n0", 20.0))  # the submitter hears no result until 25
    # The control plane dies just before "done" ends: its release is lost.
    sim.at(5.9, lambda: sim.crash_cp(2.0))
    sim.at(
        7.91, lambda: sim.add_task("after", "n0", duration_s=3.0, local=False, at=7.91, target="n1")
    )
    sim.run()
    return sim


def test_a_restart_with_tasks_running_and_results_undelivered() -> None:
    """Issue 12. The task that finished while the control plane was down is recorded
    completed from its worker's report — never expired, never run again; the one running
    across the restart keeps running; a GPU task submitted at once after the restart starts
    as soon as its worker has reported (a heartbeat), not after the longest TTL."""
    sim = restart_with_results_undelivered()
    (restart,) = sim.restarts
    assert restart == pytest.approx(7.9)
    assert len(_starts(sim, "done")) == 1 and len(_starts(sim, "long")) == 1
    (done,) = [body for body in sim.cp.store.values() if body["task_id"] == "done"]
    assert done["state"] == "completed"
    assert sim.stats["ends_recorded"] >= 1
    (started,) = _starts(sim, "after")
    window = restart + leases.LeaseSettings(6.0, 1.0).max_lease_ttl_s + 1.0
    print(f"a task submitted at the restart started {started - restart:.2f} s after it "
          f"(the window a silent worker is held for: {window - restart:.1f} s)")  # fmt: skip
    assert started - restart < 1.5 < window - restart
    assert all(task.state == "done" for task in sim.tasks.values())


def test_without_reported_ends_the_finished_task_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same scenario, with the control plane ignoring what reports say ended: the
    lease of the finished task expires, and its submitter — who never got the result —
    falls back and runs it a second time."""
    original = leases.LeaseTable._learn_lease

    def ignore_ends(self, node, reported, now_mono, now_wall_ms):  # type: ignore[no-untyped-def]
        if reported.ended:
            return self, None, ""
        return original(self, node, reported, now_mono, now_wall_ms)

    monkeypatch.setattr(leases.LeaseTable, "_learn_lease", ignore_ends)
    sim = restart_with_results_undelivered()
    assert len(_starts(sim, "done")) == 2


def test_a_claim_made_while_the_control_plane_is_unreachable_races_a_grant() -> None:
    """Issue 12. n1 is cut off from the control plane. A remote task is granted on its one
    GPU and handed over (accepted, its proof unanswered); meanwhile a local task on n1
    claims the GPU — local work does not wait. When the cut heals, the proof succeeds but
    the node's start refuses the remote attempt; it falls back to its submitter. The
    control plane hears of the claim, and a grant on that GPU waits until the claim ends."""
    sim = LeaseSimulation(3, replace_config(nodes=2, gpus_per_node=1, run_s=30.0))
    sim.at(0.9, lambda: sim.cut("n1", 3.0))
    sim.add_task("remote", "n0", duration_s=4.0, local=False, at=1.0, target="n1")
    sim.add_task("local", "n1", duration_s=10.0, local=True, at=1.5)
    sim.add_task("later", "n0", duration_s=2.0, local=False, at=6.0, target="n1")
    busy_at_6: list[object] = []
    sim.at(6.0, lambda: busy_at_6.append(sim.cp.table and sim.cp.table.claimed_gpus()))
    sim.run()
    assert sim.stats["claims"] == 1 and sim.stats["starts_refused"] == 1
    (local,) = [p for p in sim.procs if p.task_id == "local"]
    assert local.node == "n1" and local.started < 4.0 and local.outcome == "completed"
    (remote,) = [p for p in sim.procs if p.task_id == "remote"]
    assert remote.node == "n0" and remote.started > 3.9  # its fallback, with a higher token
    assert busy_at_6 == [frozenset({("n1", "n1-g0")})]
    (later,) = [p for p in sim.procs if p.task_id == "later"]
    assert later.node == "n1" and later.started > (local.ended_at or math.inf)


def test_a_lost_full_report_is_asked_for_again() -> None:
    """Issue 12. After a restart a worker's first full report is lost; its next heartbeat
    carries changes on top of it, the control plane answers that it needs a full report,
    and the next one resumes grants on the worker — a heartbeat later, not a window later."""
    sim = LeaseSimulation(5, QUIET)
    sim.add_task("before", "n0", duration_s=1.0, local=False, at=0.5, target="n2")
    sim.at(2.0, lambda: sim.crash_cp(1.0))
    sim.at(2.5, lambda: sim.lose_next_full_report("n1"))
    sim.add_task("t", "n0", duration_s=2.0, local=False, at=3.01, target="n1")
    sim.run()
    assert sim.stats["full_reports_lost"] == 1 and sim.stats["gaps"] >= 1
    (started,) = _starts(sim, "t")
    assert 3.0 + 0.5 < started < 3.0 + 2.5  # two heartbeats, not the 7 s window


def forgotten_lease_with_its_worker_cut_off() -> LeaseSimulation:
    sim = LeaseSimulation(11, QUIET)
    sim.add_task("t", "n0", duration_s=10.0, local=False, at=1.0, target="n1")
    sim.at(3.9, lambda: sim.cut("n1", 6.0))
    # A store restored from before the grant: the restarted control plane knows nothing
    # of the running attempt, and its worker cannot report it.
    sim.at(4.0, lambda: sim.crash_cp(0.5, forget=True))
    sim.run()
    return sim


def test_a_restarted_control_plane_holds_a_silent_nodes_task_keys() -> None:
    """The task's submitter asks for its fallback, naming the node its attempt ran on.
    That node is silent: the task waits until it reports (its attempt stopped by its
    deadline, reported ended) instead of running in two places."""
    sim = forgotten_lease_with_its_worker_cut_off()
    assert sim.stats["leases_forgotten"] == 1
    first, second = sorted((p for p in sim.procs if p.task_id == "t"), key=lambda p: p.started)
    assert first.node == "n1" and first.outcome == "stopped"
    assert second.node == "n0" and second.started > (first.ended_at or math.inf)


def test_without_per_node_resumption_the_task_runs_in_two_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(leases.LeaseTable, "_wait_reasons", lambda *_: ([], 0.0))
    with pytest.raises(LeaseSimulationFailure, match="rule 1: t runs on"):
        forgotten_lease_with_its_worker_cut_off()


def replace_config(**changes: object) -> SimConfig:
    from dataclasses import replace

    return replace(QUIET, **changes)  # type: ignore[arg-type]


def test_a_grant_of_the_old_leader_that_lands_after_the_report_to_the_new_one_never_runs() -> None:
    """Issue 13, item 4. The old leader grants at its last moment and is deposed; the
    handoff reaches the worker only after the worker's full report to the new leader
    (which therefore does not name it). The new leader does not know the lease: the
    worker's renewal before the start is refused, the attempt never runs, and the task
    falls back under a token of the new term."""
    sim = LeaseSimulation(21, QUIET)
    sim.add_task("t", "n0", duration_s=2.0, local=False, at=1.0, target="n1")
    handoff = sim.handoff
    landed: list[tuple[int, bool, int]] = []

    def late(task: Any, lease: leases.Lease) -> None:
        def land() -> None:
            worker = sim.nodes["n1"].reporter
            landed.append((worker.highest_term, worker.reported, lease.token.term))
            handoff(task, lease)

        sim.at(sim.now + 3.0, land)

    sim.handoff = late  # type: ignore[method-assign]
    sim.at(1.02, lambda: sim.crash_cp(0.5, failover=True))
    sim.run()
    assert sim.stats["failovers"] == 1 and sim.cp.term == 2
    # The old leader's grant (term 1) lands on a worker that already reported to term 2.
    assert landed[0] == (2, True, 1)
    runs = [p for p in sim.procs if p.task_id == "t"]
    assert [p.node for p in runs] == ["n0"], runs  # never on n1
    assert runs[0].token.term == 2 and runs[0].outcome == "completed"
    assert sim.tasks["t"].state == "done"
