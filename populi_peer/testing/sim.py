"""Simulated task execution on virtual time, for the virtual cluster (a test helper, like
``trio.testing``).

:class:`SimExecutor` implements the agent's executor seam
(:class:`populi_peer.agent.executor.Executor`) without processes: a simulated task
"runs" for a number of seconds of trio's clock read from its argv, writes what it does
into a shared :class:`Ledger`, and is stopped by a simulated *supervisor* that enforces
the lease deadline on the node's ``boot()`` clock by itself, exactly as the real one does
on ``CLOCK_BOOTTIME`` (safety rule 3): it starts stopping at ``deadline -
spec.stop_margin_s``, a cancel stops it too, renewals only move the deadline later. Its
timeline is the real supervisor's, :mod:`populi_peer.exec._timing`: a task whose deadline
is already too close is never started, and a stop's SIGKILL and end come from
:func:`~populi_peer.exec._timing.plan_stop`.

The argv of a simulated task::

    sim DURATION_S [EXIT_CODE [TERM_DELAY_S]]

``DURATION_S``: seconds of virtual time the task runs when nothing stops it; ``EXIT_CODE``
(default 0) what it exits with then; ``TERM_DELAY_S`` (default 0) how long it takes to
exit after SIGTERM — the supervisor "SIGKILLs" it ``spec.kill_grace_s`` after SIGTERM
(less when the stop began late), so a task slower than the grace is killed then, and is
gone ``kill_latency_s`` later: the node's ``exec.kill_latency_s``, the most the
configuration allows, so that the simulation plays the worst case the stop margin must
cover. An argv that does not start with ``sim`` cannot be started
(:class:`~populi_peer.exec.SpawnFailed`, exit 127).

Supervisors run in a nursery owned by :class:`SimHost` (the test), not by the agent, so
they survive the agent's crash (``VirtualCluster.crash``), and :meth:`SimExecutor.adopt`
on the restarted agent finds them again by task directory. A finished supervisor leaves a
final ``state.json`` in the task directory (the real record, :class:`SupervisorState`), so
an agent that restarts after its task ended recovers the outcome through the same code as
with real processes. :meth:`SimHost.power_off` plays a machine that loses power: every
supervisor of the node dies with its task and leaves no final state;
:meth:`SimHost.suspend` plays a suspend (boot and wall time jump, the supervisors look at
their deadlines at once).

    async with open_sim_host() as host:
        async with open_virtual_cluster(tmp_path, workers=2,
                                        agent_factory=host.agent_factory) as cluster:
            ...
        for run in host.ledger.runs: ...
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from populi_peer.agent.agent import Agent
from populi_peer.clock import Clock
from populi_peer.config import Config
from populi_peer.exec import (
    SpawnFailed,
    StreamTotals,
    SupervisorLost,
    SupervisorState,
    TaskDirInUse,
    TaskOutcome,
    TaskSpec,
    _files,
    _timing,
)
from populi_peer.testing.clock import VirtualClock, require_mock_clock
from populi_peer.testing.waiting import Changes

#: How often a running simulated task writes a tick into the ledger.
DEFAULT_TICK_S = 0.25
TOKEN_VARIABLE = "POPULI_FENCING_TOKEN"
SIGTERM = 15
SIGKILL = 9


@dataclass
class Run:
    """One execution of one attempt, as the simulated task itself saw it.

    Times without suffix are trio's clock (the same for every node: the simulation's
    "real" time); ``_boot`` are the node's ``boot()`` readings.
    """

    task_id: str
    attempt: int
    node: str
    role: str
    token: str
    task_dir: str
    started: float
    started_boot: float
    deadline_boot: float
    stop_margin_s: float
    stopped: float | None = None
    stopped_boot: float | None = None
    stop_reason: str | None = None
    stop_requested: float | None = None
    #: When the supervisor sent SIGKILL (trio's clock), if it had to.
    sigkill: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    ticks: list[float] = field(default_factory=list)
    #: Every deadline the supervisor was given (start, then each extension).
    deadlines_boot: list[float] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.stopped is None

    def end(self) -> float:
        return math.inf if self.stopped is None else self.stopped

    def describe(self) -> str:
        stop = "running" if self.stopped is None else f"{self.stopped:.3f} ({self.stop_reason})"
        return (
            f"{self.task_id} attempt {self.attempt} token {self.token} on {self.node} "
            f"[{self.role}] {self.started:.3f} -> {stop}"
        )


@dataclass
class Ledger:
    """What every simulated task did, in order of start. Shared by all nodes."""

    runs: list[Run] = field(default_factory=list)

    def running(self) -> list[Run]:
        return [run for run in self.runs if run.running]

    def for_task(self, task_id: str) -> list[Run]:
        return [run for run in self.runs if run.task_id == task_id]

    def task_ids(self) -> list[str]:
        return list(dict.fromkeys(run.task_id for run in self.runs))


def parse_sim_argv(argv: tuple[str, ...] | list[str]) -> tuple[float, int, float] | None:
    """``(duration_s, exit_code, term_delay_s)`` of a simulated task, or None."""
    if not argv or argv[0] != "sim" or len(argv) < 2 or len(argv) > 4:
        return None
    try:
        duration = float(argv[1])
        exit_code = int(argv[2]) if len(argv) > 2 else 0
        term_delay = float(argv[3]) if len(argv) > 3 else 0.0
    except ValueError:
        return None
    if not (math.isfinite(duration) and duration >= 0 and 0 <= exit_code <= 255):
        return None
    if not (math.isfinite(term_delay) and term_delay >= 0):
        return None
    return duration, exit_code, term_delay


class SimExecution:
    """The handle on one simulated supervisor (``Execution`` of the executor seam)."""

    def __init__(
        self,
        executor: SimExecutor,
        task_dir: Path,
        spec: TaskSpec,
        deadline_boot: float,
        run: Run,
        *,
        duration_s: float,
        exit_code: int,
        term_delay_s: float,
    ) -> None:
        self.executor = executor
        self.task_dir = task_dir
        self.spec = spec
        self.deadline_boot = deadline_boot
        self.run = run
        self.duration_s = duration_s
        self.exit_code = exit_code
        self.term_delay_s = term_delay_s
        self.cancel_requested = False
        self.outcome: TaskOutcome | None = None
        #: The supervisor is gone (finished, killed, or its machine lost power).
        self.gone = trio.Event()
        self._poke = trio.Event()
        self._started_wall = executor.clock.wall()
        self._output = bytearray()

    def __repr__(self) -> str:
        return f"<SimExecution {self.run.describe()}>"

    # -- the Execution protocol ------------------------------------------------------------

    def extend_deadline(self, deadline_boot: float) -> None:
        """Later only: a late answer to an older renewal must not cut the lease short."""
        if not math.isfinite(deadline_boot):
            raise ValueError(f"deadline must be finite, not {deadline_boot!r}")
        if deadline_boot > self.deadline_boot:
            self.deadline_boot = deadline_boot
            self.run.deadlines_boot.append(deadline_boot)
            self._poke.set()

    def cancel(self) -> None:
        self.cancel_requested = True
        self._poke.set()

    def alive(self) -> bool:
        return not self.gone.is_set()

    async def wait(self, poll_s: float = 0.05) -> TaskOutcome:
        await self.gone.wait()
        if self.outcome is None:
            raise SupervisorLost(
                f"simulated supervisor of {self.task_dir} died without a final state; "
                "clean up with kill_orphan",
                task_dir=str(self.task_dir),
            )
        return self.outcome

    def read_output(
        self, stream: str, offset: int = 0, limit: int = 1 << 20
    ) -> tuple[bytes, int, int]:
        data = bytes(self._output) if stream == "stdout" else b""
        start = min(max(0, offset), len(data))
        piece = data[start : start + limit]
        return piece, start + len(piece), len(data)

    def tail(self, stream: str, max_bytes: int) -> bytes:
        data = bytes(self._output) if stream == "stdout" else b""
        return data[-max_bytes:] if max_bytes > 0 else b""

    # -- the simulated supervisor -----------------------------------------------------------

    def _state(self, status: str, **changes: Any) -> SupervisorState:
        return SupervisorState(
            task_id=self.spec.task_id,
            attempt=self.spec.attempt,
            supervisor_pid=0,
            supervisor_starttime_ticks=0,
            status=status,  # type: ignore[arg-type]
            started_at_boot=self.run.started_boot,
            started_at_wall=self._started_wall,
            deadline_boot=self.deadline_boot,
            updated_at_wall=self.executor.clock.wall(),
            **changes,
        )

    def _write_state(self, state: SupervisorState) -> None:
        _files.write_json(self.task_dir / _files.STATE, state.to_json())

    async def supervise(self) -> None:
        clock = self.executor.clock
        run = self.run
        natural_end = run.started + self.duration_s
        next_tick = run.started + self.executor.tick_s
        stop_reason: str | None = None
        while True:
            now = trio.current_time()
            while next_tick <= now and next_tick < natural_end:
                run.ticks.append(next_tick)
                self._output += f"tick {next_tick:.3f} token {run.token}\n".encode()
                next_tick += self.executor.tick_s
            if now >= natural_end:
                break
            if self.cancel_requested:
                stop_reason = "cancelled"
                break
            stop_at_boot = _timing.stop_at(self.deadline_boot, self.spec.stop_margin_s)
            if clock.boot() >= stop_at_boot:
                stop_reason = "deadline"
                break
            # Wake at the stop time as the boot clock says now; a suspend that moves the
            # boot clock pokes (SimHost.suspend), else it is seen at the next tick.
            stop_at = now + (stop_at_boot - clock.boot())
            self._poke = trio.Event()
            with trio.move_on_at(max(min(stop_at, natural_end, next_tick), now + 1e-6)):
                await self._poke.wait()
            if self.gone.is_set():  # killed meanwhile
                return
        if stop_reason is None:
            self._finish("exited", exit_code=self.exit_code, signal=None)
            return
        # SIGTERM now; the task exits after its own delay (or by itself, if it ends
        # first), or is SIGKILLed when the plan says and gone a kill latency later.
        now = run.stop_requested = trio.current_time()
        stop_boot = clock.boot()
        plan = _timing.plan_stop(
            stop_boot,
            self.deadline_boot,
            stop_margin_s=self.spec.stop_margin_s,
            kill_grace_s=self.spec.kill_grace_s,
            kill_latency_s=self.executor.kill_latency_s,
        )
        end_boot, killed = plan.ended(self.term_delay_s)
        # Boot-clock instants of the plan on trio's clock (a suspend meanwhile is ignored).
        kill_at = now + (plan.kill_at - stop_boot)
        until = now + (end_boot - stop_boot)
        ended_by_itself = natural_end <= (kill_at if killed else until)
        if ended_by_itself:
            until = natural_end
        # The task ticks until it exits or is SIGKILLed (a killed task is dead, though
        # not yet gone).
        ticks_until = min(until, kill_at)
        while trio.current_time() < until:
            now = trio.current_time()
            while next_tick <= now and next_tick < ticks_until:
                run.ticks.append(next_tick)
                next_tick += self.executor.tick_s
            await trio.sleep_until(min(next_tick, until) if next_tick < ticks_until else until)
            if self.gone.is_set():
                return
        if killed and not ended_by_itself:
            run.sigkill = kill_at
        self._finish(
            stop_reason,
            exit_code=self.exit_code if ended_by_itself else None,
            signal=None if ended_by_itself else (SIGKILL if killed else SIGTERM),
            stop_requested_at_boot=stop_boot,
            sigkill_at_boot=plan.kill_at if killed and not ended_by_itself else None,
        )

    def _finish(
        self,
        stop_reason: str,
        *,
        exit_code: int | None,
        signal: int | None,
        stop_requested_at_boot: float | None = None,
        sigkill_at_boot: float | None = None,
    ) -> None:
        clock = self.executor.clock
        run = self.run
        run.stopped = trio.current_time()
        run.stopped_boot = clock.boot()
        run.stop_reason = stop_reason
        run.exit_code = exit_code
        run.signal = signal
        total = len(self._output)
        state = self._state(
            "exited",
            isolation="process_group",
            stop_reason=stop_reason,
            stop_requested_at_boot=stop_requested_at_boot,
            sigkill_at_boot=sigkill_at_boot,
            stopped_at_boot=run.stopped_boot,
            stopped_at_wall=clock.wall(),
            exit_code=exit_code,
            signal=signal,
        )
        state = replace(state, stdout=StreamTotals(total, total))
        self._write_state(state)
        self.outcome = TaskOutcome.from_state(state)
        self.gone.set()
        self.executor.host.changes.notify()

    def _never_started(self) -> None:
        """As the real supervisor when the deadline is already too close: the command is
        not started at all (safety rule 3), the final state says why."""
        clock = self.executor.clock
        run = self.run
        run.stopped, run.stopped_boot, run.stop_reason = run.started, run.started_boot, "deadline"
        state = replace(
            self._state(
                "exited",
                stop_reason="deadline",
                stop_requested_at_boot=run.started_boot,
                stopped_at_boot=run.started_boot,
                stopped_at_wall=clock.wall(),
            ),
            started_at_boot=None,
            started_at_wall=None,
        )
        self._write_state(state)
        self.outcome = TaskOutcome.from_state(state)
        self.gone.set()
        self.executor.host.changes.notify()

    def kill(self, reason: str) -> bool:
        """The supervisor dies at once and its task with it (SIGKILL, power loss); no final
        state is written. Returns whether it was alive."""
        if self.gone.is_set():
            return False
        run = self.run
        run.stopped = trio.current_time()
        run.stopped_boot = self.executor.clock.boot()
        run.stop_reason = reason
        run.signal = SIGKILL
        self.gone.set()
        self._poke.set()
        self.executor.host.changes.notify()
        return True


class SimExecutor:
    """One node's executor: simulated supervisors in ``host``'s nursery, deadlines on
    ``clock.boot()``, runs recorded in ``host.ledger``."""

    def __init__(
        self, host: SimHost, node: str, clock: Clock, *, kill_latency_s: float = 0.0
    ) -> None:
        self.host = host
        self.node = node
        self.clock = clock
        self.tick_s = host.tick_s
        #: How long a SIGKILLed task takes to be gone (the worst case the node allows).
        self.kill_latency_s = kill_latency_s
        #: Every supervisor this node ever started, by absolute task directory.
        self.executions: dict[Path, SimExecution] = {}

    async def start(self, task_dir: Path, spec: TaskSpec, deadline_boot: float) -> SimExecution:
        if not math.isfinite(deadline_boot):
            raise ValueError(f"deadline must be finite, not {deadline_boot!r}")
        task_dir = self._prepare(task_dir)
        await trio.lowlevel.checkpoint()
        parsed = parse_sim_argv(spec.argv)
        if parsed is None:
            raise SpawnFailed(
                f"task {spec.task_id} attempt {spec.attempt} did not start: "
                f"{spec.argv[0]!r} is not a simulated command (sim DURATION [EXIT [TERM_DELAY]])",
                exit_code=127,
                task_dir=str(task_dir),
            )
        duration, exit_code, term_delay = parsed
        run = Run(
            task_id=spec.task_id,
            attempt=spec.attempt,
            node=self.node,
            role=task_dir.parent.parent.name,
            token=str(spec.env.get(TOKEN_VARIABLE, "")),
            task_dir=str(task_dir),
            started=trio.current_time(),
            started_boot=self.clock.boot(),
            deadline_boot=deadline_boot,
            stop_margin_s=spec.stop_margin_s,
            deadlines_boot=[deadline_boot],
        )
        execution = SimExecution(
            self,
            task_dir,
            spec,
            deadline_boot,
            run,
            duration_s=duration,
            exit_code=exit_code,
            term_delay_s=term_delay,
        )
        self.executions[task_dir] = execution
        if not _timing.may_start(run.started_boot, deadline_boot, spec.stop_margin_s):
            execution._never_started()  # not in the ledger: the task did not run
            return execution
        self.host.ledger.runs.append(run)
        self.host.changes.notify()
        execution._write_state(execution._state("running", isolation="process_group"))
        self.host.nursery.start_soon(execution.supervise)
        return execution

    def _prepare(self, task_dir: Path) -> Path:
        task_dir = task_dir.absolute()
        task_dir.mkdir(parents=True, exist_ok=True)
        if task_dir in self.executions or (task_dir / _files.STATE).exists():
            raise TaskDirInUse(
                f"{task_dir} already holds a task: use a fresh directory per attempt",
                task_dir=str(task_dir),
            )
        return task_dir

    def _find(self, task_dir: Path) -> SimExecution | None:
        return self.executions.get(task_dir.absolute())

    def adopt(self, task_dir: Path) -> SimExecution | None:
        """The supervisor of ``task_dir`` if it still runs (like the real ``adopt``)."""
        execution = self._find(task_dir)
        if execution is None or not execution.alive():
            return None
        return execution

    async def kill_orphan(self, task_dir: Path) -> bool:
        await trio.lowlevel.checkpoint()
        execution = self._find(task_dir)
        return execution is not None and execution.kill("killed_orphan")

    def leftovers(self, task_dir: Path) -> bool:
        execution = self._find(task_dir)
        return execution is not None and execution.alive()

    def tail(self, task_dir: Path, stream: str, max_bytes: int) -> bytes:
        execution = self._find(task_dir)
        return b"" if execution is None else execution.tail(stream, max_bytes)

    def power_off(self) -> int:
        """The machine lost power: every supervisor dies with its task, no final state."""
        return sum(execution.kill("power_off") for execution in self.executions.values())


class SimHost:
    """The simulated machines' side of a virtual cluster: one :class:`SimExecutor` per
    node (kept across agent restarts), one :class:`Ledger`, and the nursery in which the
    supervisors run."""

    def __init__(self, nursery: trio.Nursery, *, tick_s: float = DEFAULT_TICK_S) -> None:
        require_mock_clock("a SimHost")
        self.nursery = nursery
        self.tick_s = tick_s
        self.ledger = Ledger()
        #: Fires whenever a simulated task starts or ends (give it to the virtual
        #: cluster, ``open_virtual_cluster(changes=host.changes)``, to wait on both).
        self.changes = Changes()
        self.executors: dict[str, SimExecutor] = {}

    def executor(self, node: str, clock: Clock, *, kill_latency_s: float = 0.0) -> SimExecutor:
        """The executor of ``node`` (created on first use, bound to ``clock``; a SIGKILLed
        task is gone ``kill_latency_s`` later)."""
        executor = self.executors.get(node)
        if executor is None:
            executor = self.executors[node] = SimExecutor(self, node, clock)
        executor.clock = clock
        executor.kill_latency_s = kill_latency_s
        return executor

    def agent_factory(self, **kwargs: Any) -> Agent:
        """For ``open_virtual_cluster(agent_factory=...)``: an :class:`Agent` whose
        executor is its node's :class:`SimExecutor` (the node is named by its data
        directory, as in the virtual cluster), killing with the node's own
        ``exec.kill_latency_s``."""
        data_dir: Path = kwargs["data_dir"]
        config: Config = kwargs["config"]
        executor = self.executor(
            data_dir.name, kwargs["clock"], kill_latency_s=config.exec.kill_latency_s
        )
        return Agent(**kwargs, executor=executor)

    def power_off(self, node: str) -> int:
        executor = self.executors.get(node)
        return 0 if executor is None else executor.power_off()

    def suspend(self, node: str, clock: VirtualClock, seconds: float) -> None:
        """``node``'s machine slept ``seconds`` (:meth:`VirtualClock.suspend`); its
        supervisors look at their deadlines at once, as the real ones would on their next
        50 ms tick."""
        clock.suspend(seconds)
        executor = self.executors.get(node)
        for execution in [] if executor is None else executor.executions.values():
            execution._poke.set()


@contextlib.asynccontextmanager
async def open_sim_host(*, tick_s: float = DEFAULT_TICK_S) -> AsyncIterator[SimHost]:
    """A :class:`SimHost` whose supervisors are cancelled when the block ends."""
    require_mock_clock("a SimHost")
    async with trio.open_nursery() as nursery:
        host = SimHost(nursery, tick_s=tick_s)
        try:
            yield host
        finally:
            nursery.cancel_scope.cancel()


__all__ = [
    "DEFAULT_TICK_S",
    "Ledger",
    "Run",
    "SimExecution",
    "SimExecutor",
    "SimHost",
    "open_sim_host",
    "parse_sim_argv",
]
