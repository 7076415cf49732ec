"""The worker: runs tasks handed to it under leases, and delivers their results.

A handoff (inbox message ``handoff``, a :class:`~populi_peer.core.messages.HandoffMessage`)
is accepted only when remote execution is on (the cluster settings and this node's
``exec.remote``; a handoff names the settings serial it was placed under, and a worker
holding an older record fetches the signed record from the control plane before it
decides), by a node that is not retired, from a node with the ``submit`` role that
``exec.accept_from`` allows, and only as the worker's fence book says (safety rule 2:
:class:`~populi_peer.core.fencing.FenceBook`, the one fence check): a higher token starts
the attempt, an equal one is acknowledged and never started twice, a lower one is refused.
The fence and the attempt are durable before the answer, in one write. The attempt then
runs under :class:`~populi_peer.agent.attempts.AttemptRunner` (renew before start,
supervisor, renew every TTL/3, release), and its result is stored and delivered to the
submitter's inbox until the submitter acknowledges it (a submitter may be asleep: delivery
retries with backoff, forever). An answer to a delivery that is malformed, or that is not
the acknowledgement of that result, is not an acknowledgement: the result is sent again.

The worker is given what it uses: the runner, the attempt repository, the clock, the
``[exec]`` config section, the control-plane and peer links, the node's health, and
:class:`WorkerGates` — what the rest of the node says before a handoff is taken.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import trio

from populi_peer.agent.attempts import AttemptPlan, AttemptRunner, stored_result
from populi_peer.agent.executor import Execution
from populi_peer.agent.health import RETRIED, Health, retried_failure
from populi_peer.agent.links import ControlPlaneLink, PeerLink
from populi_peer.api.app import TASK_READERS, Request, Route
from populi_peer.api.auth import Principal
from populi_peer.clock import Clock
from populi_peer.config import ExecConfig
from populi_peer.core.claims import Decision
from populi_peer.core.fencing import FenceBook
from populi_peer.core.leases import WORKER_LEFT
from populi_peer.core.messages import (
    CancelAnswer,
    CancelMessage,
    HandoffAnswer,
    HandoffMessage,
    HeartbeatReport,
    HeldLease,
    InboxDeliverAnswer,
    InboxMessage,
    LeaseAnswer,
    OutputChunk,
    OutputChunkAnswer,
    ResultMessage,
)
from populi_peer.errors import BadRequest, Conflict, Forbidden, NotFound, PeerError, PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store.attempts import AttemptRecord, Attempts

DELIVERY_MAX_BACKOFF_S = 30.0
#: How long the worker waits for the control plane's view of a refused handoff's lease.
LEASE_LOOKUP_TIMEOUT_S = 5.0
#: How long a leaving worker tries to deliver the results of the attempts it stopped.
LEAVE_DELIVERY_S = 5.0


class WorkerGates(Protocol):
    """What the rest of the node says before the worker takes a handoff (the composition
    root builds it from standing, settings, the leave sequence and the GPU service)."""

    def retired(self) -> bool:
        """This node was retired from the cluster: it takes no work."""
        ...

    def leaving(self) -> bool: ...

    def remote_enabled(self) -> bool:
        """Remote execution is on here and cluster-wide, and the kill switch is off."""
        ...

    def verified_gpu_uuids(self) -> Collection[str]: ...

    async def catch_up_settings(self, serial: int | None) -> None:
        """Hold the cluster settings record ``serial`` or newer, fetching it if need be."""
        ...


@dataclass(kw_only=True, eq=False, repr=False)
class Worker:
    """``accept_check``: the node's book on a handoff (``NodeLedger.accepts``):
    refused when a node-local claim holds one of its GPUs (ADR 0015)."""

    node_id: str
    runner: AttemptRunner
    attempts: Attempts
    clock: Clock
    config: ExecConfig
    control_plane: ControlPlaneLink
    peers: PeerLink
    gates: WorkerGates
    health: Health
    rng: random.Random = field(default_factory=random.Random)
    accept_check: Callable[[AttemptPlan], Decision] | None = None
    logger: ClassVar[logging.Logger] = get_logger("worker")

    def __post_init__(self) -> None:
        #: The highest token accepted per task, as durable in the fences table.
        self.fences = FenceBook.from_entries(self.attempts.fences())
        self._nursery: trio.Nursery | None = None
        self._deliver_kick = trio.Event()

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/exec/attempts/{task_id}/{attempt}/output",
                self._output,
                roles=TASK_READERS,
                name="attempt_output",
            )
        ]

    # -- gates ----------------------------------------------------------------------------

    def margin_problem(self, ttl_s: float) -> str | None:
        """Why a lease of ``ttl_s`` cannot be held safely here (safety rule 3), if so."""
        try:
            self.config.check_stop_margin(ttl_s)
        except PopuliError as exc:
            return f"a {ttl_s:g} s lease is too short for this worker: {exc}"
        return None

    def _allowed(self, caller: Principal) -> bool:
        allowed = self.config.accept_from
        if not allowed:
            return "submit" in caller.roles
        return "submit" in caller.roles and (caller.id in allowed or caller.name in allowed)

    def _refusal(self, plan: AttemptPlan) -> PopuliError | None:
        gates = self.gates
        if gates.retired():
            return Conflict(
                "this node was retired from the cluster; it takes no work", code="node_retired"
            )
        if not gates.remote_enabled():
            return Conflict("remote execution is off on this node", code="remote_disabled")
        if gates.leaving():
            return Conflict("this node is leaving the cluster", code="node_leaving")
        margin_problem = self.margin_problem(plan.ttl_s or 0.0)
        if margin_problem is not None:
            return Conflict(margin_problem, code="ttl_too_short")
        if plan.cwd is not None and not os.path.isdir(plan.cwd):
            return Conflict(f"--cwd {plan.cwd}: no such directory on this node", code="cwd_missing")
        verified = set(gates.verified_gpu_uuids())
        missing = [g for g in plan.gpus if g not in verified]
        if missing:
            return BadRequest(f"GPUs {', '.join(missing)} are not on this node", code="unknown_gpu")
        return None

    def _claimed(self, plan: AttemptPlan) -> PopuliError | None:
        """A node-local claim holds one of the handoff's GPUs: this node ran local work on
        them while no control plane could hear it (ADR 0015); the lease simply ends."""
        if self.accept_check is None:
            return None
        decision = self.accept_check(plan)
        if decision.ok:
            return None
        return Conflict(
            f"GPUs of this handoff are in use on this node ({', '.join(decision.reasons)})",
            code=decision.reasons[0],
            reasons=list(decision.reasons),
        )

    # -- inbox ----------------------------------------------------------------------------

    async def on_handoff(self, caller: Principal, message: HandoffMessage) -> HandoffAnswer:
        if not self._allowed(caller):
            raise Forbidden(
                f"this worker does not take tasks from {caller.name} ({caller.id})",
                code="submitter_not_allowed",
            )
        plan = plan_of(caller, message)
        # The submitter placed this under a settings record at least this new: never trust
        # the stamp itself, fetch the signed record if this node holds an older one. Before
        # the fence is read: from there to the fence's write nothing may await, or two
        # copies of one handoff could both pass the check (safety rule 2).
        await self.gates.catch_up_settings(message.settings_serial)
        book, verdict = self.fences.check_handoff(plan.task_id, plan.token)
        if verdict == "stale":
            highest = self.fences.highest(plan.task_id)
            raise Conflict(
                f"token {plan.token} is older than {highest} for task {plan.task_id}",
                code="stale_token",
                highest=str(highest),
            )
        if verdict == "duplicate":
            existing = next(
                (
                    row.state
                    for row in self.attempts.of_task(plan.task_id, "worker")
                    if row.token == plan.token
                ),
                "unknown",
            )
            return HandoffAnswer(verdict="duplicate", state=existing)
        refusal = self._refusal(plan) or self._claimed(plan)
        if refusal is not None:
            # If it is really this task's lease, held by us for this submitter, give it back
            # at once so the fallback need not wait for it to expire. Check first: a
            # message could name any lease this worker holds.
            await self._release_if_ours(plan)
            raise refusal
        # Durable before the answer: the fence and the accepted attempt, in one write; the
        # book is adopted only once it is on disk (a failed write leaves the old one, and a
        # retried handoff starts normally).
        self.runner.save(plan, "accepted", fence=True)
        self.fences = book
        log(
            self.logger,
            logging.INFO,
            "handoff accepted",
            task_id=plan.task_id,
            attempt=plan.attempt,
            token=str(plan.token),
            submitter=caller.id,
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._drive, plan)
        return HandoffAnswer(verdict="start", state=None)

    async def _release_if_ours(self, plan: AttemptPlan) -> None:
        try:
            answer = await self.control_plane.call(
                method="GET",
                path=f"/v1/populi/exec/leases/{plan.lease_id}",
                timeout_s=LEASE_LOOKUP_TIMEOUT_S,
                answer=LeaseAnswer,
            )
        except PopuliError:
            return
        lease = answer.lease.lease
        running = any(key[0] == plan.task_id and key[2] == "worker" for key in self.runner.running)
        if (
            lease.task_id == plan.task_id
            and lease.submitter == plan.submitter
            and lease.holder == self.node_id
            and lease.token == plan.token
            and not running
        ):
            await self.runner.release(plan, "stopped")

    async def on_cancel(self, caller: Principal, message: CancelMessage) -> CancelAnswer:
        row = self.runner.row(message.task_id, message.attempt, "worker")
        if row is None:
            raise NotFound(
                f"no attempt {message.attempt} of task {message.task_id} here",
                code="unknown_attempt",
            )
        if row.submitter != caller.id and "operator" not in caller.roles:
            raise Forbidden(
                "only the task's submitter or an operator cancels it", code="not_task_owner"
            )
        found = self.runner.request_cancel(
            message.task_id, message.attempt, "worker", message.reason_or("cancelled")
        )
        return CancelAnswer(cancelled=found, state=row.state)

    # -- running --------------------------------------------------------------------------

    async def _drive(self, plan: AttemptPlan) -> None:
        with self._contained(plan):
            await self.runner.run(plan)
        self._deliver_kick.set()  # result stored: deliver it now

    async def _resume(self, plan: AttemptPlan, execution: Execution, started_ms: int) -> None:
        with self._contained(plan):
            await self.runner.resume(plan, execution, started_ms)
        self._deliver_kick.set()  # result stored: deliver it now

    @contextlib.contextmanager
    def _contained(self, plan: AttemptPlan) -> Iterator[None]:
        """A store or file error that escapes one attempt ends that attempt's driver, not
        the worker: the supervisor keeps to its lease deadline on its own, and the
        attempt's record (accepted or running) is re-adopted by the next start."""
        try:
            yield
        except (*RETRIED, BaseExceptionGroup) as exc:
            failure = retried_failure(exc)
            if failure is None:
                raise
            self.health.failed("worker", failure)
            log(
                self.logger,
                logging.ERROR,
                "attempt left to its supervisor after a storage error",
                task_id=plan.task_id,
                attempt=plan.attempt,
                error=str(failure),
            )

    def held_leases(self) -> tuple[HeldLease, ...]:
        """The attempts this node runs as a worker, with their leases (its heartbeat)."""
        return tuple(
            HeldLease(
                task_id=r.task_id,
                attempt=r.attempt,
                token=r.token,
                lease_id=r.lease_id,
                state="accepted" if r.state == "accepted" else "running",
            )
            for r in self.attempts.unfinished("worker")
        )

    def report_part(self, report: HeartbeatReport) -> HeartbeatReport:
        """The leases this node holds as a worker, in its heartbeat."""
        return replace(report, leases=self.held_leases())

    async def stop_all(self, reason: str) -> int:
        """This node leaves (``reason``): stop every attempt it runs for others, release
        their leases, and tell their submitters, who fall back (``worker_left``) rather
        than count the task cancelled. Results that cannot be delivered within
        :data:`LEAVE_DELIVERY_S` stay stored, and their leases are already released."""
        keys = [key for key in self.runner.running if key[2] == "worker"]
        log(self.logger, logging.INFO, "stopping attempts", reason=reason, count=len(keys))
        for task_id, attempt, role in keys:
            self.runner.request_cancel(task_id, attempt, role, WORKER_LEFT)
        for key in keys:
            running = self.runner.running.get(key)
            if running is not None:
                await running.done.wait()
        if keys:
            with trio.move_on_after(LEAVE_DELIVERY_S):
                await self.deliver_pending()
        return len(keys)

    # -- result delivery ------------------------------------------------------------------

    async def deliver(self, row: AttemptRecord) -> bool:
        """Deliver one stored result; True once the submitter acknowledged it (then it is
        marked delivered). Any failure — unreachable, refused, or an answer that is not
        the acknowledgement of this result — leaves it to be sent again."""
        submitter = await self.peers.member(row.submitter)
        if submitter is None:
            return False
        message = InboxMessage(
            message_id=f"result-{row.task_id}-{row.attempt}", payload=stored_result(row)
        )
        try:
            answer = await self.peers.call(
                submitter,
                method="POST",
                path="/v1/populi/inbox",
                payload=message,
                attempts=2,
                answer=InboxDeliverAnswer,
            )
            if answer.type != "result" or answer.message_id != message.message_id:
                raise PeerError(
                    f"{submitter.id} answered result {message.message_id} with "
                    f"{answer.type} {answer.message_id[:64]!r}",
                    code="bad_peer_answer",
                    peer=submitter.id,
                )
        except PopuliError as exc:
            level = logging.INFO
            if exc.details.get("http_status") in (400, 403, 404) or exc.code == "bad_peer_answer":
                level = logging.WARNING
            log(
                self.logger,
                level,
                "result not delivered; keeping it",
                task_id=row.task_id,
                attempt=row.attempt,
                error=str(exc),
                code=exc.code,
            )
            return False
        self.attempts.mark_delivered(row.task_id, row.attempt, now_ms=int(self.clock.wall() * 1000))
        log(
            self.logger,
            logging.INFO,
            "result delivered",
            task_id=row.task_id,
            attempt=row.attempt,
            submitter=submitter.id,
        )
        return True

    async def deliver_pending(self) -> bool:
        """Try to deliver every stored, undelivered result; returns True if all went."""
        ok = True
        for row in self.attempts.undelivered():
            ok = await self.deliver(row) and ok
        return ok

    async def _delivery_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                ok = await self.deliver_pending()
            except RETRIED as exc:
                # An acknowledged delivery could not be recorded: it is sent again (the
                # submitter's inbox answers a duplicate as such).
                self.health.failed("result_delivery", exc)
                ok = False
            else:
                self.health.ok("result_delivery")
            backoff = 0.5 if ok else min(backoff * 2, DELIVERY_MAX_BACKOFF_S)
            with trio.move_on_after(backoff * self.rng.uniform(0.8, 1.2) if not ok else 5.0):
                await self._deliver_kick.wait()
            self._deliver_kick = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            async def on_result(plan: AttemptPlan, result: ResultMessage) -> None:
                self._deliver_kick.set()
                await trio.lowlevel.checkpoint()

            to_resume, to_start = await self.runner.recover("worker", on_result)
            for plan, execution in to_resume:
                row = self.runner.row(plan.task_id, plan.attempt, "worker")
                started = row.body.get("started_wall_ms", 0) if row else 0
                nursery.start_soon(self._resume, plan, execution, int(started))
            for plan in to_start:
                nursery.start_soon(self._drive, plan)
            nursery.start_soon(self._delivery_loop)
            task_status.started()

    # -- output ---------------------------------------------------------------------------

    async def _output(self, request: Request) -> OutputChunkAnswer:
        task_id = request.path_params["task_id"]
        try:
            attempt = int(request.path_params["attempt"])
        except ValueError as exc:
            raise BadRequest("attempt must be a number", code="bad_request") from exc
        if not 1 <= attempt <= 1_000_000:
            raise NotFound(
                f"no attempt {attempt} of task {task_id[:64]} here", code="unknown_attempt"
            )
        row = self.runner.row(task_id, attempt, "worker")
        if row is None:
            raise NotFound(f"no attempt {attempt} of task {task_id} here", code="unknown_attempt")
        caller = request.caller
        if row.submitter != caller.id and "operator" not in caller.roles:
            raise Forbidden(
                "only the task's submitter or an operator reads its output", code="not_task_owner"
            )
        stream = request.query_one("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise BadRequest("stream must be stdout or stderr", code="bad_request")
        offset = request.query_int("offset", 0, minimum=0)
        limit = request.query_int("limit", 256 * 1024, minimum=1, maximum=1 << 20)
        return OutputChunkAnswer(chunk=read_output(self.runner, row, stream, offset, limit))


def plan_of(caller: Principal, message: HandoffMessage) -> AttemptPlan:
    """The attempt a handoff asks this worker to run (for its signer, ``caller``)."""
    return AttemptPlan(
        task_id=message.task_id,
        attempt=message.attempt,
        role="worker",
        submitter=caller.id,
        token=message.token,
        lease_id=message.lease_id,
        ttl_s=message.ttl_s,
        renewable=True,
        argv=message.command,
        env=dict(message.env),
        gpus=message.gpus,
        work_class=message.work_class,
        cwd=message.cwd,
        lease_attempt=message.lease_attempt,
    )


def read_output(
    runner: AttemptRunner, row: AttemptRecord, stream: str, offset: int, limit: int
) -> OutputChunk:
    plan = AttemptPlan.from_json(row.body)
    task_dir = runner.task_dir(plan)
    data, next_offset, total = b"", offset, 0
    running = runner.running.get((plan.task_id, plan.attempt, plan.role))
    if running is not None and running.execution is not None:
        data, next_offset, total = running.execution.read_output(stream, offset, limit)
    elif (task_dir / stream).exists():
        from populi_peer.exec._files import read_tail

        data, next_offset, total = read_tail(task_dir / stream, offset, limit)
    return OutputChunk(
        data_b64=base64.b64encode(data).decode("ascii"),
        next_offset=next_offset,
        total=total,
        done=row.state == "finished",
    )


__all__ = ["Worker", "WorkerGates", "plan_of", "read_output"]
