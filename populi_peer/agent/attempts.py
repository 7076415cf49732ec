"""Running one attempt of a task under its lease: shared by the worker (remote attempts)
and the submitter (local attempts).

safety rule 3, step by step:

1. A holder with a renewable lease renews it itself before it starts the task; its local
   deadline counts from when that renewal was *sent*, on ``CLOCK_BOOTTIME``
   (``core.leases.worker_deadline_boot``). A refused renewal means the task never starts.
2. The task runs under its own supervisor process, which stops the whole tree by
   ``deadline - stop_margin`` by itself; a paused or dead agent cannot keep it alive.
3. The agent renews every TTL/3 and extends the supervisor's deadline after each renewal
   (again from when it was sent). A renewal refused (revoked, no longer live) stops the
   task at once; an unreachable control plane changes nothing: the supervisor's deadline
   runs out on its own.
4. When the task ends, the outcome is stored durably, then the lease is released:
   ``completed`` if the command ran to its end (whatever its exit code), ``stopped``
   otherwise.

Attempt rows (table ``attempts``) record every step, so an agent restarted within the
lease re-adopts its supervisors (``resume``) and one that cannot kills what it recorded.

The runner is given what it uses: this node's id, the directory its tasks run in, the
attempt repository, the clock, the control-plane link (renew and release, typed: a
malformed answer is an error for that call), the executor, the ``[exec]`` config section
and the node's health. A finished attempt's result is a
:class:`~populi_peer.core.messages.ResultMessage`: what a worker delivers, and what a
local attempt's submitter records.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import trio

from populi_peer.agent.executor import Execution, Executor
from populi_peer.agent.health import RETRIED, Health, retrying
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.clock import Clock
from populi_peer.config import ExecConfig
from populi_peer.core.claims import Decision
from populi_peer.core.fencing import FencingToken
from populi_peer.core.holder import (
    BecomeClaim,
    ExtendDeadline,
    HolderAction,
    HolderConfig,
    HolderEvent,
    HolderMachine,
    NotStarted,
    RenewAnswered,
    RenewRefused,
    RenewUnanswered,
    SendRenewal,
    StartAttempt,
    StopAttempt,
    TimerFired,
)
from populi_peer.core.leases import (
    WORKER_LEFT,
    ReleaseOutcome,
    ReleaseReason,
    renew_interval_s,
    renew_timeout_s,
    worker_deadline_boot,
)
from populi_peer.core.messages import (
    AttemptResult,
    LeaseAnswer,
    LeaseReleaseRequest,
    LeaseReplayAnswer,
    RenewRequest,
    ResultMessage,
)
from populi_peer.core.refusals import Refusal
from populi_peer.core.reports import Claim
from populi_peer.core.wire import record_json
from populi_peer.errors import BadRequest, PopuliError
from populi_peer.exec import ExecError, SpawnFailed, TaskSpec, build_task_env
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import file_error
from populi_peer.store.attempts import AttemptIdentity, AttemptRecord, Attempts

#: Kept of each stream in a result message (the rest stays on the worker).
RESULT_TAIL_BYTES = 64 * 1024
#: How long a holder waits for the answer to a release (nothing depends on it: an
#: unanswered release lets the lease expire by itself).
RELEASE_TIMEOUT_S = renew_timeout_s(6.0)
#: Deadline of an attempt with no lease to renew (a local run without GPUs): effectively
#: none; ``--timeout`` and cancel stop it.
NO_LEASE_DEADLINE_S = 10 * 365 * 86400.0


@dataclass(frozen=True)
class AttemptPlan(AttemptIdentity):
    ttl_s: float | None
    renewable: bool
    argv: tuple[str, ...]
    env: dict[str, str]
    gpus: tuple[str, ...]
    work_class: str
    #: ``--cwd``: where the task runs (None: a fresh ``work`` directory of its own).
    cwd: str | None = None
    #: The node-local claim the attempt runs under (no lease to renew), if any.
    claim_id: str | None = None
    #: A local attempt with a claim basis (ADR 0015): when its lease renewals go
    #: unanswered it becomes a claim before its deadline instead of being stopped.
    may_claim: bool = False
    #: The lease's own attempt number, where it differs from the task's (a local lease's
    #: request number): the node's book and reports name the lease by it.
    lease_attempt: int | None = None

    @property
    def book_attempt(self) -> int:
        """The attempt number the node's book and reports use (the lease's)."""
        return self.lease_attempt or self.attempt

    def to_json(self) -> dict[str, Any]:
        return {
            **record_json(self, omit=("claim_id", "may_claim", "lease_attempt"), nulls=True),
            **({} if self.claim_id is None else {"claim_id": self.claim_id}),
            **({"may_claim": True} if self.may_claim else {}),
            **({} if self.lease_attempt is None else {"lease_attempt": self.lease_attempt}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttemptPlan:
        return cls(
            task_id=str(data["task_id"]),
            attempt=int(data["attempt"]),
            role=str(data["role"]),
            submitter=str(data["submitter"]),
            token=FencingToken.parse(data["token"]),
            lease_id=data.get("lease_id"),
            ttl_s=data.get("ttl_s"),
            renewable=bool(data.get("renewable", False)),
            argv=tuple(data["argv"]),
            env=dict(data.get("env", {})),
            gpus=tuple(data.get("gpus", [])),
            work_class=str(data.get("work_class", "agent")),
            cwd=data.get("cwd"),
            claim_id=data.get("claim_id"),
            may_claim=bool(data.get("may_claim", False)),
            lease_attempt=data.get("lease_attempt"),
        )


@dataclass
class Running:
    plan: AttemptPlan
    execution: Execution | None = None
    cancel_requested: bool = False
    cancel_reason: str = ""
    #: Stopped because its lease is lost (a control plane refused it), not cancelled.
    lost_reason: str = ""
    cancel_event: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def release_reason(self) -> ReleaseReason | None:
        """What its lease's release says of a stop asked for here: ``worker_left`` (this
        node leaves), which its submitter may read on the lease before the result."""
        return WORKER_LEFT if self.cancel_reason == WORKER_LEFT else None


#: Told of every attempt :meth:`AttemptRunner.recover` finished at start.
OnRecovered = Callable[[AttemptPlan, ResultMessage], Awaitable[None]]
#: The node's start transaction: (role, task, attempt, record the start) -> the decision.
StartCheck = Callable[[str, str, int, Callable[[], None]], Decision]
#: The node's claim transaction for a local attempt whose renewals go unanswered:
#: (plan, before its start?, record the claimed plan and its claim) -> the claim or None.
ClaimConvert = Callable[["AttemptPlan", bool, Callable[["AttemptPlan", Claim], None]], Claim | None]


def stored_result(row: AttemptRecord) -> ResultMessage:
    """The result a finished attempt was saved with."""
    assert row.result is not None, "a finished attempt is saved with its result"
    return ResultMessage.from_json(row.result)


@dataclass(kw_only=True, eq=False, repr=False)
class AttemptRunner:
    """``start_check``: the node's start transaction (``NodeLedger.start``): whether
    the attempt may start on its GPUs, recording the start if so."""

    node_id: str
    tasks_dir: Path
    attempts: Attempts
    clock: Clock
    control_plane: ControlPlaneLink
    executor: Executor
    config: ExecConfig
    health: Health
    start_check: StartCheck | None = None
    claim_convert: ClaimConvert | None = None
    logger: ClassVar[logging.Logger] = get_logger("attempts")

    def __post_init__(self) -> None:
        self.running: dict[tuple[str, int, str], Running] = {}
        #: Told when a renewal answers ``report_needed`` (the heartbeat then goes at once).
        self.report_needed: Callable[[], None] = lambda: None

    # -- paths and rows -------------------------------------------------------------------

    def task_dir(self, plan: AttemptPlan) -> Path:
        return self.tasks_dir / plan.role / plan.task_id / str(plan.attempt)

    def stored_task_dir(self, body: Mapping[str, Any]) -> Path:
        """The directory of the attempt stored as ``body`` (an attempt row's)."""
        return self.task_dir(AttemptPlan.from_json(dict(body)))

    # -- what runs now --------------------------------------------------------------------

    def held_gpus(self) -> frozenset[str]:
        """The GPUs the attempts running on this node hold."""
        return frozenset(g for running in self.running.values() for g in running.plan.gpus)

    def own_pids(self) -> set[int]:
        """Processes this node started for tasks (not foreign GPU users)."""
        pids: set[int] = set()
        for running in self.running.values():
            execution = running.execution
            state = getattr(execution, "state", None)
            if callable(state):
                try:
                    current = state()
                except (OSError, ValueError, PopuliError):
                    continue
                for pid in (
                    getattr(current, "child_pid", None),
                    getattr(current, "supervisor_pid", None),
                ):
                    if pid:
                        pids.add(int(pid))
        return pids

    def save(
        self,
        plan: AttemptPlan,
        state: str,
        *,
        result: ResultMessage | None = None,
        extra: dict[str, Any] | None = None,
        fence: bool = False,
        claim: Claim | None = None,
    ) -> None:
        """Record ``plan``'s new state. ``fence``: a worker admits it — the task's fence
        becomes its token in the same write (safety rule 2). ``claim``: the node-local
        claim it starts under, recorded with it; a finished attempt gives its claim back
        in the same write."""
        self.attempts.save(
            plan,
            state=state,
            body={**plan.to_json(), **(extra or {})},
            result=None if result is None else result.to_json(),
            now_ms=int(self.clock.wall() * 1000),
            fence=fence,
            claim=claim,
            drop_claim=plan.claim_id if state == "finished" else None,
        )

    async def save_durably(
        self,
        plan: AttemptPlan,
        state: str,
        *,
        result: ResultMessage | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """:meth:`save`, tried again until the storage takes it (disk full, read-only...):
        a running attempt's record is what lets a restarted agent re-adopt it, and its
        result must be durable before its lease is released. The task itself is not
        held up: its supervisor keeps to the lease deadline on its own meanwhile."""

        async def step() -> None:
            self.save(plan, state, result=result, extra=extra)
            await trio.lowlevel.checkpoint()

        await retrying(self.health, _component(plan), step)

    def row(self, task_id: str, attempt: int, role: str) -> AttemptRecord | None:
        return self.attempts.get(task_id, attempt, role)

    # -- control plane calls --------------------------------------------------------------

    async def renew(self, plan: AttemptPlan, *, before_start: bool = False) -> float:
        """Renew; returns the new local deadline (boot clock, from when the request was sent).
        ``before_start``: the renewal that proves the lease before the task starts (the
        control plane checks the cluster settings again for it). A malformed answer is
        ``bad_peer_answer``, not a renewal."""
        sent_boot = self.clock.boot()
        return worker_deadline_boot(sent_boot, await self._renewed_ttl(plan, before_start))

    async def _renewed_ttl(self, plan: AttemptPlan, before_start: bool) -> float:
        """One renewal; the TTL it counts (the handoff's, or the control plane's if shorter).
        ``report_needed`` (503: a restarted control plane waits for this node's report)
        makes the heartbeat go at once."""
        assert plan.lease_id is not None and plan.ttl_s is not None
        try:
            answer = await self.control_plane.call(
                method="POST",
                path=f"/v1/populi/exec/leases/{plan.lease_id}/renew",
                payload=RenewRequest(before_start=before_start),
                # A renewal answered later than TTL/3 is as good as lost.
                timeout_s=renew_timeout_s(plan.ttl_s),
                answer=LeaseAnswer,
            )
        except PopuliError as exc:
            if exc.code == "report_needed":
                self.report_needed()
            raise
        lease = answer.lease.lease
        # The control plane's lease is the authority: it must be the one this attempt was
        # handed, and its TTL — not the handoff's — bounds the local deadline.
        if (
            lease.task_id != plan.task_id
            or lease.token != plan.token
            or lease.holder != self.node_id
        ):
            raise PopuliError(
                f"lease {plan.lease_id} is not the lease of this attempt", code="lease_mismatch"
            )
        return min(plan.ttl_s, lease.ttl_s or plan.ttl_s)

    async def release(
        self, plan: AttemptPlan, outcome: ReleaseOutcome, *, why: ReleaseReason | None = None
    ) -> str | None:
        """Release the lease (``why``: the reason the released lease then carries); returns
        its final state, or None if the control plane could not be told, or its answer not
        read (the lease then expires by itself: nothing depends on the release)."""
        if plan.lease_id is None:
            return None
        try:
            answer = await self.control_plane.call(
                method="POST",
                path=f"/v1/populi/exec/leases/{plan.lease_id}/release",
                payload=LeaseReleaseRequest(outcome=outcome, reason=why),
                timeout_s=RELEASE_TIMEOUT_S,
                answer=LeaseReplayAnswer,
            )
        except PopuliError as exc:
            log(
                self.logger,
                logging.INFO,
                "lease release not accepted",
                lease_id=plan.lease_id,
                outcome=outcome,
                error=str(exc),
                code=exc.code,
            )
            return None
        # The control plane recorded the end: the node's reports need not carry it (if
        # this cannot be written, the reports carry it until a report answer does).
        with contextlib.suppress(*RETRIED):
            self.attempts.mark_released(
                plan.task_id, plan.attempt, plan.role, now_ms=int(self.clock.wall() * 1000)
            )
        return answer.lease.lease.state

    # -- running --------------------------------------------------------------------------

    def spec(self, plan: AttemptPlan) -> TaskSpec:
        cfg = self.config
        work = self.task_dir(plan) / "work"
        work.mkdir(parents=True, exist_ok=True)
        env = build_task_env(
            # PATH, HOME and LANG of the agent (nothing else of its environment).
            base=os.environ,
            passed=plan.env,
            task_id=plan.task_id,
            attempt=plan.attempt,
            fencing_token=str(plan.token),
            cuda_visible_devices=",".join(cuda_id(g) for g in plan.gpus),
        )
        return TaskSpec(
            task_id=plan.task_id,
            attempt=plan.attempt,
            argv=plan.argv,
            env=env,
            # --cwd when given (the supervisor refuses to start in a missing one: 126).
            cwd=plan.cwd or str(work),
            stop_margin_s=cfg.stop_margin_s,
            kill_grace_s=cfg.kill_grace_s,
            output_cap_bytes=cfg.output_cap_bytes,
        )

    async def run(self, plan: AttemptPlan) -> ResultMessage:
        """Run ``plan`` to its end; returns the stored result."""
        key = (plan.task_id, plan.attempt, plan.role)
        running = self.running.setdefault(key, Running(plan))
        try:
            return await self._run(running)
        finally:
            running.done.set()
            self.running.pop(key, None)

    async def _run(self, running: Running) -> ResultMessage:
        plan = running.plan
        started_ms = int(self.clock.wall() * 1000)
        if running.cancel_requested:
            result = await self._finish(
                plan, outcome="cancelled", started_ms=started_ms, detail=running.cancel_reason
            )
            await self.release(plan, "stopped", why=running.release_reason)  # nothing ran
            return result
        deadline = self.clock.boot() + NO_LEASE_DEADLINE_S
        holder: HolderMachine | None = None
        if plan.renewable and plan.claim_id is None:
            proved, holder = await self._prove(plan)
            if proved is None:
                # Not proved, but a local attempt with a claim basis: it claimed its GPUs
                # and starts under the claim (local work never waits, rule 1).
                claimed = self._claim(plan, before_start=True)
                if claimed is None:
                    proved = PopuliError(
                        f"lease {plan.lease_id} not proved and its GPUs could not be claimed",
                        code="lease_not_proved",
                    )
                else:
                    plan = running.plan = claimed
                    holder = None
            if isinstance(proved, PopuliError):
                # Not proved: never start (safety rule 3); nothing ran, give the lease back
                # (its end also rides this node's reports).
                self._log(
                    logging.WARNING,
                    "lease not renewable before start; task not started",
                    plan,
                    error=str(proved),
                )
                result = await self._finish(
                    plan, outcome="lease_lost", started_ms=started_ms, detail=proved.code
                )
                await self.release(plan, "stopped")
                return result
            if proved is not None:
                deadline = proved
        if plan.claim_id is None and self.start_check is not None:
            # The node's start transaction (ADR 0015): refused when a node-local claim or
            # another started attempt holds one of its GPUs; recorded started otherwise.
            decision = self.start_check(
                plan.role, plan.task_id, plan.book_attempt, lambda: self.save(plan, "running")
            )
            if not decision.ok:
                self._log(
                    logging.WARNING,
                    "attempt refused at its start: its GPUs are claimed or busy on this node",
                    plan,
                    reasons=list(decision.reasons),
                )
                result = await self._finish(
                    plan,
                    outcome="lease_lost",
                    started_ms=started_ms,
                    detail=",".join(decision.reasons),
                )
                await self.release(plan, "stopped")
                return result
        task_dir = self.task_dir(plan)
        try:
            try:
                execution = await self.executor.start(task_dir, self.spec(plan), deadline)
            except OSError as exc:
                # The task directory could not be written (disk full...): nothing started.
                failure = file_error(exc, f"cannot prepare {task_dir}")
                self.health.failed(_component(plan), failure)
                raise failure from exc
        except PopuliError as exc:
            if isinstance(exc, SpawnFailed):
                code = int(exc.details.get("exit_code", 127))
                result = await self._finish(
                    plan,
                    outcome="spawn_failed",
                    started_ms=started_ms,
                    exit_code=code,
                    detail=str(exc.details.get("error") or exc),
                )
                await self.release(plan, "completed")
                return result
            # The supervisor did not come up properly (or the spec was refused). Release
            # only if nothing it recorded can still run; otherwise the lease expires.
            result = await self._finish(
                plan, outcome="populi_failure", started_ms=started_ms, detail=str(exc)
            )
            if not self.executor.leftovers(task_dir):
                await self.release(plan, "stopped")
            return result
        running.execution = execution
        await self.save_durably(
            plan, "running", extra={"started_wall_ms": started_ms, "task_dir": str(task_dir)}
        )
        self._log(
            logging.INFO,
            "attempt started",
            plan,
            role=plan.role,
            token=str(plan.token),
            gpus=list(plan.gpus),
        )
        return await self._supervise(running, execution, started_ms, holder=holder)

    def _claim(self, plan: AttemptPlan, *, before_start: bool) -> AttemptPlan | None:
        """Claim the GPUs of a local attempt whose renewals go unanswered (the node's
        claim transaction, recorded with the attempt); the claimed plan, or ``None``."""
        if self.claim_convert is None or not plan.may_claim:
            return None
        box: list[AttemptPlan] = []

        def record(claimed: AttemptPlan, claim: Claim) -> None:
            self.save(claimed, "running", claim=claim)
            box.append(claimed)

        claim = self.claim_convert(plan, before_start, record)
        if claim is None or not box:
            return None
        self._log(
            NOTICE,
            "no control plane answers: the local attempt runs on under a node-local claim",
            plan,
            gpus=list(claim.gpus),
        )
        return box[0]

    async def _prove(self, plan: AttemptPlan) -> tuple[float | PopuliError | None, HolderMachine]:
        """Prove the lease before the start (safety rule 3), as the holder's machine
        decides (:class:`~populi_peer.core.holder.HolderMachine`): a refusal is final; an
        unanswered renewal (unreachable, ``report_needed`` from a control plane waiting for
        this node's report) is tried again until the lease could no longer be live — or,
        for a local attempt with a claim basis, answered by a claim at once. Returns the
        supervisor's deadline (``None``: start under a claim) or why the attempt must not
        start, with the machine (which goes on renewing the started attempt)."""
        assert plan.ttl_s is not None
        machine, pending = HolderMachine.begin(self.holder_config(plan), self.clock.boot())
        actions = list(pending)
        last: PopuliError | None = None
        while True:
            while actions:
                action = actions.pop(0)
                if isinstance(action, StartAttempt):
                    return action.deadline, machine
                if isinstance(action, NotStarted):
                    return last or PopuliError(
                        f"lease {plan.lease_id} not proved: {action.reason}", code=action.reason
                    ), machine
                if isinstance(action, SendRenewal):
                    event, error = await self._renewal(plan, action.sent_at, before_start=True)
                    last = error or last
                    machine, more = machine.handle(event, self.clock.boot())
                    actions.extend(more)
            due = machine.next_deadline()
            if due is None:
                return last or PopuliError("lease not proved", code="lease_not_proved"), machine
            await trio.sleep(max(0.0, due - self.clock.boot()))
            machine, more = machine.handle(TimerFired(), self.clock.boot())
            actions.extend(more)

    def _log(self, level: int, event: str, plan: AttemptPlan, **fields: Any) -> None:
        """Log ``event`` about ``plan``'s attempt: its task and attempt number, then
        ``fields``."""
        log(self.logger, level, event, task_id=plan.task_id, attempt=plan.attempt, **fields)

    def holder_config(self, plan: AttemptPlan) -> HolderConfig:
        assert plan.ttl_s is not None
        try:
            return HolderConfig(
                ttl_s=plan.ttl_s,
                stop_margin_s=self.config.stop_margin_s,
                may_claim=plan.may_claim and self.claim_convert is not None,
            )
        except BadRequest:
            # A margin the TTL has no room for (the worker refuses such leases): no claims.
            return HolderConfig(ttl_s=plan.ttl_s, stop_margin_s=0.0, claim_lead_s=0.0)

    async def _renewal(
        self, plan: AttemptPlan, sent_at: float, *, before_start: bool
    ) -> tuple[RenewAnswered | RenewRefused | RenewUnanswered, PopuliError | None]:
        """One renewal, as the holder's machine takes its answer: refused (401/403/404/409,
        or an answer about another lease) or unanswered (anything else); and the error."""
        try:
            return RenewAnswered(sent_at, await self._renewed_ttl(plan, before_start)), None
        except PopuliError as exc:
            if definitive(exc) or exc.code == "lease_mismatch":
                return RenewRefused(sent_at, lease_reason(exc)), exc
            return RenewUnanswered(sent_at), exc

    async def resume(
        self, plan: AttemptPlan, execution: Execution, started_ms: int
    ) -> ResultMessage:
        """Carry on with an attempt whose supervisor survived an agent restart."""
        key = (plan.task_id, plan.attempt, plan.role)
        running = self.running.setdefault(key, Running(plan, execution=execution))
        try:
            self._log(
                logging.INFO,
                "attempt re-adopted",
                plan,
                role=plan.role,
            )
            return await self._supervise(running, execution, started_ms, renew_now=True)
        finally:
            running.done.set()
            self.running.pop(key, None)

    def _holder_acts(
        self,
        actions: tuple[HolderAction, ...],
        *,
        running: Running,
        execution: Execution,
        lost: list[str],
        renewals: trio.Nursery,
        renew: Callable[[float], Awaitable[None]],
    ) -> bool:
        """Carry out the holder's actions for a running attempt; ``False`` once the
        machine is done with it (stopped, or claimed)."""
        plan = running.plan
        for action in actions:
            if isinstance(action, SendRenewal):
                renewals.start_soon(renew, action.sent_at)
            elif isinstance(action, ExtendDeadline):
                try:
                    execution.extend_deadline(action.deadline)
                except OSError as exc:
                    # The supervisor keeps the old deadline and stops the task by it.
                    self.health.failed(_component(plan), exc)
            elif isinstance(action, StopAttempt):
                lost.append(action.reason)
                self._log(
                    logging.WARNING,
                    "lease lost; stopping the task",
                    plan,
                    reason=action.reason,
                )
                self._cancel(plan, execution)
                return False
            elif isinstance(action, BecomeClaim):
                claimed = self._claim(plan, before_start=False)
                if claimed is not None:
                    running.plan = claimed
                    # The claim holds the GPUs now: lift the lease deadline (if that
                    # cannot be written, the old one stops the task).
                    try:
                        execution.extend_deadline(self.clock.boot() + NO_LEASE_DEADLINE_S)
                    except OSError as exc:
                        self.health.failed(_component(plan), exc)
                return False
        return True

    async def _supervise(
        self,
        running: Running,
        execution: Execution,
        started_ms: int,
        *,
        renew_now: bool = False,
        holder: HolderMachine | None = None,
    ) -> ResultMessage:
        """Wait for the task, renewing its lease every TTL/3. ``renew_now``: an attempt
        re-adopted after a restart renews at once — the agent was away for an unknown
        part of the interval, and the supervisor's deadline did not wait for it.
        ``holder``: the machine that proved the lease of a local attempt with a claim
        basis; it drives the renewals, and turns the attempt into a claim before its
        deadline when they go unanswered (ADR 0015)."""
        plan = running.plan
        lost: list[str] = []
        outcome_box: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def holder_loop(machine: HolderMachine) -> None:
                # Renewals run beside the machine's timers: one that hangs until its
                # timeout must not hold back the claim due before the deadline.
                answers_in, answers = trio.open_memory_channel[HolderEvent](16)
                async with trio.open_nursery() as renewals:

                    async def renew(sent_at: float) -> None:
                        event, _ = await self._renewal(running.plan, sent_at, before_start=False)
                        answers_in.send_nowait(event)

                    while machine.phase == "running":
                        due = machine.next_deadline()
                        event: HolderEvent = TimerFired()
                        wait_s = math.inf if due is None else max(0.0, due - self.clock.boot())
                        with trio.move_on_after(wait_s):
                            event = await answers.receive()
                        machine, actions = machine.handle(event, self.clock.boot())
                        going = self._holder_acts(
                            actions,
                            running=running,
                            execution=execution,
                            lost=lost,
                            renewals=renewals,
                            renew=renew,
                        )
                        if not going:
                            break
                    renewals.cancel_scope.cancel()

            async def renew_loop() -> None:
                assert plan.ttl_s is not None
                first = renew_now
                unwritten = False
                while True:
                    if not first:
                        await trio.sleep(renew_interval_s(plan.ttl_s))
                    first = False
                    try:
                        execution.extend_deadline(await self.renew(plan))
                        if unwritten:
                            unwritten = False
                            self.health.ok(_component(plan))
                    except OSError as exc:
                        # The longer deadline could not be written (disk full...): the
                        # supervisor keeps the old one and stops the task by it (safety
                        # rule 3); the next renewal tries again.
                        unwritten = True
                        self.health.failed(_component(plan), exc)
                    except PopuliError as exc:
                        if definitive(exc):
                            lost.append(lease_reason(exc))
                            self._log(
                                logging.WARNING,
                                "lease lost; stopping the task",
                                plan,
                                reason=lost[-1],
                            )
                            # If the cancel cannot be written, the deadline it no longer
                            # extends stops the task.
                            self._cancel(plan, execution)
                            return
                        # Unreachable, or answered by a node that is not the control
                        # plane (peer_identity_mismatch: a node in the middle): keep
                        # trying; the supervisor's deadline stands.
                        log(
                            self.logger,
                            logging.INFO,
                            "lease renewal failed; retrying",
                            task_id=plan.task_id,
                            error=str(exc),
                            code=exc.code,
                        )

            if holder is not None and holder.config.may_claim:
                nursery.start_soon(holder_loop, holder)
            elif plan.renewable and plan.claim_id is None:
                nursery.start_soon(renew_loop)

            async def watch_cancel() -> None:
                await running.cancel_event.wait()
                health = self.health
                retried = False
                while (delay := self._cancel(plan, execution)) is not None:
                    retried = True
                    await health.retry_after(delay)
                if retried:
                    health.ok(_component(plan))

            nursery.start_soon(watch_cancel)
            try:
                outcome_box.append(await execution.wait())
            except ExecError as exc:
                outcome_box.append(exc)
            nursery.cancel_scope.cancel()
        plan = running.plan  # claimed meanwhile: its end gives the claim back
        outcome = outcome_box[0]
        if isinstance(outcome, Exception):
            await self.executor.kill_orphan(self.task_dir(plan))
            result = await self._finish(
                plan, outcome="lost", started_ms=started_ms, detail=str(outcome)
            )
            if not self.executor.leftovers(self.task_dir(plan)):
                await self.release(plan, "stopped")
            return result
        stop_reason = outcome.stop_reason
        if running.lost_reason and not lost:
            lost.append(running.lost_reason)
        kind = "lease_lost" if lost else _OUTCOME_OF_STOP.get(stop_reason, "populi_failure")
        result = await self._finish(
            plan,
            outcome=kind,
            started_ms=int((outcome.started_at_wall or started_ms / 1000) * 1000),
            stopped_ms=int(outcome.stopped_at_wall * 1000) if outcome.stopped_at_wall else None,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            stop_reason=stop_reason,
            detail=lost[0] if lost else (running.cancel_reason if kind == "cancelled" else ""),
            totals=(outcome.stdout_total_bytes, outcome.stderr_total_bytes),
        )
        await self.release(
            plan,
            "completed" if kind in ("exited", "spawn_failed") else "stopped",
            why=running.release_reason,
        )
        return result

    async def _finish(
        self,
        plan: AttemptPlan,
        *,
        outcome: str,
        started_ms: int,
        stopped_ms: int | None = None,
        exit_code: int | None = None,
        signal: int | None = None,
        stop_reason: str | None = None,
        detail: str = "",
        totals: tuple[int, int] = (0, 0),
    ) -> ResultMessage:
        task_dir = self.task_dir(plan)
        tails = {}
        for stream in ("stdout", "stderr"):
            try:
                data = (
                    self.executor.tail(task_dir, stream, RESULT_TAIL_BYTES)
                    if task_dir.exists()
                    else b""
                )
            except (OSError, ValueError, PopuliError):
                data = b""
            tails[stream] = base64.b64encode(data).decode("ascii")
        result = ResultMessage(
            result=AttemptResult(
                task_id=plan.task_id,
                attempt=plan.attempt,
                node=self.node_id,
                token=plan.token,
                lease_id=plan.lease_id,
                role="worker" if plan.role == "worker" else "local",
                outcome=outcome,
                exit_code=exit_code,
                signal=signal,
                stop_reason=stop_reason,
                detail=detail,
                gpus=plan.gpus,
                started_wall_ms=started_ms,
                stopped_wall_ms=stopped_ms
                if stopped_ms is not None
                else int(self.clock.wall() * 1000),
                stdout_total=totals[0],
                stderr_total=totals[1],
            ),
            stdout_tail_b64=tails["stdout"],
            stderr_tail_b64=tails["stderr"],
        )
        # Durable before the lease is released and the result delivered (safety rule 7).
        await self.save_durably(plan, "finished", result=result)
        self._log(
            logging.INFO,
            "attempt finished",
            plan,
            role=plan.role,
            outcome=outcome,
            exit_code=exit_code,
            signal=signal,
        )
        return result

    def _cancel(self, plan: AttemptPlan, execution: Execution) -> float | None:
        """Ask the supervisor to stop the task. None once asked; when the request could
        not be written (disk full...), how long to wait before asking again."""
        try:
            execution.cancel()
        except OSError as exc:
            return self.health.failed(_component(plan), exc)
        return None

    def stop_lost(self, task_id: str, attempt: int, role: str, reason: str) -> bool:
        """Stop an attempt whose lease a control plane refused: it ends ``lease_lost``
        (the submitter then asks for the control plane's word), never ``cancelled``."""
        for (t, n, r), running in self.running.items():
            if (t, r) == (task_id, role) and attempt in (n, running.plan.book_attempt):
                running.lost_reason = reason
                running.cancel_event.set()
                return True
        return False

    def request_cancel(self, task_id: str, attempt: int, role: str, reason: str) -> bool:
        running = self.running.get((task_id, attempt, role))
        if running is None:
            return False
        running.cancel_requested = True
        running.cancel_reason = reason
        running.cancel_event.set()
        return True

    async def recover(
        self, role: str, on_result: OnRecovered
    ) -> tuple[list[tuple[AttemptPlan, Execution]], list[AttemptPlan]]:
        """At start, for every attempt this node recorded as accepted or running:

        - its supervisor still runs: re-adopt it (returned to resume);
        - it was accepted but nothing was launched yet: start it (returned to start; it
          renews its lease first, so a lease that died meanwhile is never used);
        - a launch was begun but never reported: make sure that supervisor can never start
          the task (cancel, no deadline), and let the lease expire;
        - otherwise: kill whatever is left, record the outcome the supervisor wrote (or
          ``lost``), and release the lease only if nothing can still run.
        """
        from populi_peer.exec import read_state

        to_resume: list[tuple[AttemptPlan, Execution]] = []
        to_start: list[AttemptPlan] = []
        executor = self.executor
        for row in self.attempts.unfinished(role):
            body = row.body
            plan = AttemptPlan.from_json(body)
            task_dir = self.task_dir(plan)
            execution = executor.adopt(task_dir) if task_dir.exists() else None
            if execution is not None:
                to_resume.append((plan, execution))
                continue
            state = read_state(task_dir) if task_dir.exists() else None
            launched = (task_dir / "spec.json").exists()
            if row.state == "accepted" and not launched:
                to_start.append(plan)
                continue
            if state is None and launched:
                (task_dir / "cancel").write_text("agent restarted before the supervisor reported\n")
                (task_dir / "deadline").unlink(missing_ok=True)
            killed = await executor.kill_orphan(task_dir) if task_dir.exists() else False
            state = read_state(task_dir) if task_dir.exists() else None
            if state is not None and state.status == "exited":
                finished_ok = state.stop_reason == "exited"
                result = await self._finish(
                    plan,
                    outcome="exited"
                    if finished_ok
                    else ("cancelled" if state.stop_reason == "cancelled" else "lease_lost"),
                    started_ms=int((state.started_at_wall or 0) * 1000),
                    stopped_ms=int(state.stopped_at_wall * 1000) if state.stopped_at_wall else None,
                    exit_code=state.exit_code,
                    signal=state.signal,
                    stop_reason=state.stop_reason,
                    totals=(state.stdout.total_bytes, state.stderr.total_bytes),
                )
                await self.release(plan, "completed" if finished_ok else "stopped")
            else:
                result = await self._finish(
                    plan,
                    outcome="lost",
                    started_ms=int(body.get("started_wall_ms", 0)),
                    detail="agent restarted and could not re-adopt the task"
                    + (" (killed its leftovers)" if killed else ""),
                )
                if not executor.leftovers(task_dir):
                    await self.release(plan, "stopped")
            await on_result(plan, result)
        return to_resume, to_start


def _component(plan: AttemptPlan) -> str:
    """Where a failed attempt record shows in the node's health."""
    return "worker" if plan.role == "worker" else "submitter"


def cuda_id(gpu: str) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` names for a leased GPU: its UUID, or for an advertised
    pseudo-device (``advertised-N``, trusted operator labels) its index N."""
    prefix = "advertised-"
    return gpu[len(prefix) :] if gpu.startswith(prefix) else gpu


def definitive(exc: PopuliError) -> bool:
    """Did the control plane answer (refused, unknown, not allowed), as opposed to not
    being reachable (or answering something that could not be read)?"""
    return exc.details.get("http_status") in (401, 403, 404, 409)


def refusal_of(exc: PopuliError) -> Refusal:
    """A failed request as the core's decisions take it: refused with the peer's reason
    codes (only strings are taken from its error; none: its code), or not reached."""
    detail = str(exc)
    if not definitive(exc):
        return Refusal.unreached(detail)
    raw = exc.details.get("reasons")
    reasons = [r for r in raw if isinstance(r, str) and r] if isinstance(raw, list) else []
    return Refusal.refused(reasons or [exc.code or "refused"], detail)


#: An attempt's outcome by how its supervisor says it stopped (any other way:
#: ``populi_failure``); a lost lease makes it ``lease_lost`` whatever the stop.
_OUTCOME_OF_STOP: Final[Mapping[str, str]] = {
    "exited": "exited",
    "cancelled": "cancelled",
    "deadline": "lease_lost",
    "spawn_failed": "spawn_failed",
}


def lease_reason(exc: PopuliError) -> str:
    return refusal_of(exc).reasons[0] if definitive(exc) else exc.code


__all__ = [
    "NO_LEASE_DEADLINE_S",
    "RESULT_TAIL_BYTES",
    "AttemptPlan",
    "AttemptRunner",
    "OnRecovered",
    "definitive",
    "lease_reason",
    "refusal_of",
    "stored_result",
]
