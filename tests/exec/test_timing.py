"""When a task is stopped (``populi_peer/exec/_timing.py``): the timeline itself, and the
simulated supervisor (``populi_peer/testing/sim.py``) following it as the real one does
(``tests/exec/test_supervisor.py`` shows the real one: ``test_late_stop_skips_the_grace``,
the deadline tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from populi_peer.core.leases import validate_stop_margin
from populi_peer.errors import ConfigError
from populi_peer.exec import TaskSpec, read_state
from populi_peer.exec._timing import StopPlan, may_start, plan_stop, stop_at
from populi_peer.testing import VirtualClock
from populi_peer.testing.sim import SimExecutor, SimHost, open_sim_host

MARGIN_S, GRACE_S, LATENCY_S = 2.0, 1.0, 0.5


def test_stop_begins_at_deadline_minus_margin_and_a_missing_deadline_is_expired() -> None:
    assert stop_at(100.0, 2.0) == 98.0
    assert stop_at(None, 2.0) == -math.inf
    assert stop_at(math.nan, 2.0) == -math.inf
    assert may_start(97.9, 100.0, 2.0)
    assert not may_start(98.0, 100.0, 2.0)
    assert not may_start(0.0, None, 2.0)


def test_an_on_time_stop_kills_after_the_grace_and_is_gone_a_latency_later() -> None:
    plan = plan_stop(98.0, 100.0, stop_margin_s=2.0, kill_grace_s=1.0, kill_latency_s=0.5)
    assert plan == StopPlan(term_at=98.0, kill_at=99.0, gone_by=99.5)
    # A cancel long before the deadline gets the whole grace too.
    assert plan_stop(10.0, 100.0, stop_margin_s=2.0, kill_grace_s=1.0).kill_at == 11.0
    # So does a stop without a deadline (the command exited, or the file is garbled).
    assert plan_stop(10.0, None, stop_margin_s=2.0, kill_grace_s=1.0).kill_at == 11.0


def test_a_late_stop_gets_only_what_is_left_of_the_grace() -> None:
    late = plan_stop(98.6, 100.0, stop_margin_s=2.0, kill_grace_s=1.0, kill_latency_s=0.5)
    assert late == StopPlan(term_at=98.6, kill_at=99.0, gone_by=99.5)
    very_late = plan_stop(99.7, 100.0, stop_margin_s=2.0, kill_grace_s=1.0, kill_latency_s=0.5)
    assert very_late == StopPlan(term_at=99.7, kill_at=99.7, gone_by=100.2)


def test_a_task_exits_on_sigterm_within_the_grace_or_is_killed() -> None:
    plan = StopPlan(term_at=10.0, kill_at=11.0, gone_by=11.5)
    assert plan.ended(0.0) == (10.0, False)
    assert plan.ended(1.0) == (11.0, False)
    assert plan.ended(1.01) == (11.5, True)


@given(
    grace=st.floats(0, 30),
    latency=st.floats(0, 5),
    drift_ppm=st.floats(0, 1000),
    ttl=st.floats(10, 600),
    late_by=st.floats(0, 1000),
    slack=st.floats(0, 5),
)
def test_a_margin_the_configuration_accepts_has_the_task_gone_before_the_deadline(
    grace: float, latency: float, drift_ppm: float, ttl: float, late_by: float, slack: float
) -> None:
    """Safety rule 3: with any stop margin ``validate_stop_margin`` accepts, a stop that
    begins on time or late leaves the task gone by ``deadline - drift`` (or, past that,
    kills it at once)."""
    margin = grace + latency + ttl * drift_ppm / 1e6 + slack
    try:
        validate_stop_margin(
            margin, kill_grace_s=grace, kill_latency_s=latency, drift_ppm=drift_ppm, ttl_s=ttl
        )
    except ConfigError:
        return  # no room to renew such a lease: refused before any task runs
    deadline = 1000.0 + ttl
    now = stop_at(deadline, margin) + late_by
    plan = plan_stop(
        now, deadline, stop_margin_s=margin, kill_grace_s=grace, kill_latency_s=latency
    )
    assert plan.term_at == now
    assert plan.kill_at == max(now, stop_at(deadline, margin) + grace)
    if plan.kill_at > now:
        assert plan.gone_by <= deadline - ttl * drift_ppm / 1e6 + 1e-9


# -- the simulated supervisor follows the same timeline -------------------------------------


def _spec(tmp_path: Path, argv: list[str]) -> TaskSpec:
    return TaskSpec(
        task_id="t-1",
        attempt=1,
        argv=tuple(argv),
        env={"POPULI_FENCING_TOKEN": "1.7"},
        cwd=str(tmp_path),
        stop_margin_s=MARGIN_S,
        kill_grace_s=GRACE_S,
    )


def _executor(host: SimHost) -> tuple[SimExecutor, VirtualClock]:
    clock = VirtualClock(boot_start_s=500.0)
    return host.executor("n1", clock, kill_latency_s=LATENCY_S), clock


async def test_sim_kills_after_the_grace_and_the_task_is_gone_a_kill_latency_later(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with open_sim_host() as host:
        executor, clock = _executor(host)
        task_dir = tmp_path / "1"
        execution = await executor.start(
            task_dir, _spec(tmp_path, ["sim", "60", "0", "5"]), clock.boot() + 100
        )
        await trio.sleep(2)
        execution.cancel()
        cancelled, cancelled_boot = trio.current_time(), clock.boot()
        outcome = await execution.wait()
        assert trio.current_time() == cancelled + GRACE_S + LATENCY_S
        assert (outcome.stop_reason, outcome.signal) == ("cancelled", 9)
        state = read_state(task_dir)
        assert state is not None
        assert state.stop_requested_at_boot == cancelled_boot
        assert state.sigkill_at_boot == cancelled_boot + GRACE_S
        assert state.stopped_at_boot == cancelled_boot + GRACE_S + LATENCY_S
        (run,) = host.ledger.runs
        assert run.sigkill == cancelled + GRACE_S
        # It ticked until the SIGKILL, not while the kernel took it apart.
        assert max(run.ticks) < run.sigkill


async def test_sim_late_stop_after_a_suspend_gets_only_what_is_left_of_the_grace(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """The machine sleeps through the stop point: the stop begins when it wakes, 0.6 s
    late, and SIGKILL comes when it would have on time (0.4 s later, not a whole grace)."""
    async with open_sim_host() as host:
        executor, clock = _executor(host)
        deadline = clock.boot() + 10
        execution = await executor.start(
            tmp_path / "1", _spec(tmp_path, ["sim", "60", "0", "5"]), deadline
        )
        await trio.sleep(7)  # boot: deadline - 3, one second before the stop point
        host.suspend("n1", clock, 1.6)  # boot: deadline - 1.4, 0.6 s past it
        woke = trio.current_time()
        outcome = await execution.wait()
        assert trio.current_time() == pytest.approx(woke + 0.4 + LATENCY_S)
        assert (outcome.stop_reason, outcome.signal) == ("deadline", 9)
        state = read_state(tmp_path / "1")
        assert state is not None and state.sigkill_at_boot == pytest.approx(
            deadline - MARGIN_S + GRACE_S
        )
        assert state.stopped_at_boot is not None and state.stopped_at_boot <= deadline


async def test_sim_never_starts_a_task_whose_deadline_is_too_close(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """As the real supervisor (exit 124): nothing runs, the final state says why."""
    async with open_sim_host() as host:
        executor, clock = _executor(host)
        execution = await executor.start(
            tmp_path / "1", _spec(tmp_path, ["sim", "60"]), clock.boot() + MARGIN_S
        )
        outcome = await execution.wait()
        assert (outcome.stop_reason, outcome.exit_code, outcome.signal) == ("deadline", None, None)
        assert outcome.started_at_boot is None
        assert host.ledger.runs == []
        assert not execution.alive()
