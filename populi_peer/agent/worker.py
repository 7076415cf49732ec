"""The worker: runs tasks handed to it under leases, and delivers their results.

A handoff (inbox message ``handoff``) is accepted only when remote execution is on (the
cluster settings and this node's ``exec.remote``; a handoff names the settings serial it
was placed under, and a worker holding an older record fetches the signed record from
the control plane before it decides), by a node that is not retired, from a node with the
``submit`` role that ``exec.accept_from`` allows, and only with a fencing token at least
the highest this node keeps for the task (safety rule 2): higher starts the attempt, equal
is acknowledged and never started twice, lower is refused. The fence and the attempt are durable before
the answer. The attempt then runs under :class:`~populi_peer.agent.attempts.AttemptRunner`
(renew before start, supervisor, renew every TTL/3, release), and its result is stored
and delivered to the submitter's inbox until the submitter acknowledges it (a submitter
may be asleep: delivery retries with backoff, forever).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from populi_peer.agent.attempts import AttemptPlan, AttemptRunner
from populi_peer.agent.health import RETRIED, retried_failure
from populi_peer.api.app import Request, Route
from populi_peer.api.auth import Principal
from populi_peer.core.fencing import FencingToken
from populi_peer.core.policy import check_work_class
from populi_peer.core.wire import ID_RE, check_command, check_env, check_id, task_attempt
from populi_peer.errors import BadRequest, Conflict, Forbidden, NotFound, PopuliError
from populi_peer.log import get_logger, log
from populi_peer.store.attempts import AttemptRecord, Attempts

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

DELIVERY_MAX_BACKOFF_S = 30.0


class Worker:
    def __init__(self, agent: Agent, runner: AttemptRunner) -> None:
        self.agent = agent
        self.runner = runner
        self.attempts = Attempts(agent.store)
        self.logger = get_logger("worker")
        self.rng = random.Random()
        self._nursery: trio.Nursery | None = None
        self._deliver_kick = trio.Event()
        agent.inbox.on("handoff", self.on_handoff)
        agent.inbox.on("cancel", self.on_cancel)

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/exec/attempts/{task_id}/{attempt}/output",
                self._output,
                roles=frozenset({"submit", "operator"}),
                name="attempt_output",
            )
        ]

    # -- gates ----------------------------------------------------------------------------

    def margin_problem(self, ttl_s: float) -> str | None:
        """Why a lease of ``ttl_s`` cannot be held safely here (safety rule 3), if so."""
        try:
            self.agent.config.exec.check_stop_margin(ttl_s)
        except PopuliError as exc:
            return f"a {ttl_s:g} s lease is too short for this worker: {exc}"
        return None

    def _allowed(self, caller: Principal) -> bool:
        allowed = self.agent.config.exec.accept_from
        if not allowed:
            return "submit" in caller.roles
        return "submit" in caller.roles and (caller.id in allowed or caller.name in allowed)

    # -- inbox ----------------------------------------------------------------------------

    async def on_handoff(self, caller: Principal, message: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        if not self._allowed(caller):
            raise Forbidden(
                f"this worker does not take tasks from {caller.name} ({caller.id})",
                code="submitter_not_allowed",
            )
        plan = self._parse(caller, message)
        # The submitter placed this under a settings record at least this new: never trust
        # the stamp itself, fetch the signed record if this node holds an older one. Before
        # the fence is read: from there to the fence's write nothing may await, or two
        # copies of one handoff could both pass the check (safety rule 2).
        await agent.settings_sync.catch_up(message.get("settings_serial"))
        token = FencingToken.parse(plan.token)
        highest = self.attempts.fence(plan.task_id)
        if highest is not None and token < highest:
            raise Conflict(
                f"token {token} is older than {highest} for task {plan.task_id}",
                code="stale_token",
                highest=str(highest),
            )
        if highest is not None and token == highest:
            existing = self.attempts.worker_state(plan.task_id, plan.token)
            return {"verdict": "duplicate", "state": "unknown" if existing is None else existing}
        refusal: PopuliError | None = None
        missing = [g for g in plan.gpus if g not in set(agent.verified_gpu_uuids())]
        if agent.standing.out:
            refusal = Conflict(
                "this node was retired from the cluster; it takes no work", code="node_retired"
            )
        elif not self.agent.remote_enabled():
            refusal = Conflict("remote execution is off on this node", code="remote_disabled")
        elif agent.leaving:
            refusal = Conflict("this node is leaving the cluster", code="node_leaving")
        elif (margin_problem := self.margin_problem(plan.ttl_s or 0.0)) is not None:
            refusal = Conflict(margin_problem, code="ttl_too_short")
        elif missing:
            refusal = BadRequest(
                f"GPUs {', '.join(missing)} are not on this node", code="unknown_gpu"
            )
        if refusal is not None:
            # If it is really this task's lease, held by us for this submitter, give it back
            # at once so the fallback need not wait for it to expire. Check first: a
            # message could name any lease this worker holds.
            await self._release_if_ours(plan)
            raise refusal
        # Durable before the answer: the fence and the accepted attempt, in one transaction.
        with agent.store.transaction():
            self.attempts.set_fence(plan.task_id, token, now_ms=int(agent.clock.wall() * 1000))
            self.runner.save(plan, "accepted")
        log(
            self.logger,
            logging.INFO,
            "handoff accepted",
            task_id=plan.task_id,
            attempt=plan.attempt,
            token=plan.token,
            submitter=caller.id,
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._drive, plan)
        return {"verdict": "start"}

    async def _release_if_ours(self, plan: AttemptPlan) -> None:
        agent = self.agent
        try:
            lease = (
                await agent.peers.call(
                    url=agent.control_plane_url,
                    node_id=agent.control_plane_id,
                    method="GET",
                    path=f"/v1/populi/exec/leases/{plan.lease_id}",
                    timeout_s=5.0,
                )
            )["lease"]
        except PopuliError:
            return
        running = any(key[0] == plan.task_id and key[2] == "worker" for key in self.runner.running)
        if (
            lease.get("task_id") == plan.task_id
            and lease.get("submitter") == plan.submitter
            and lease.get("holder") == agent.node_id
            and lease.get("token") == plan.token
            and not running
        ):
            await self.runner.release(plan, "stopped")

    def _parse(self, caller: Principal, message: dict[str, Any]) -> AttemptPlan:
        task_id, attempt = task_attempt(message, "handoff")
        lease_id = check_id(message.get("lease_id"), "lease_id")
        token = message.get("token")
        if not isinstance(token, str):
            raise BadRequest("handoff 'token' is missing", code="bad_request")
        FencingToken.parse(token)
        command = check_command(message.get("command"))
        env = check_env(message.get("env", {}))
        gpus = message.get("gpus", [])
        if not isinstance(gpus, list) or not all(
            isinstance(g, str) and ID_RE.match(g) for g in gpus
        ):
            raise BadRequest("handoff 'gpus' must be a list of GPU UUIDs", code="bad_request")
        ttl_s = message.get("ttl_s")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s <= 0:
            raise BadRequest("handoff 'ttl_s' must be a positive number", code="bad_request")
        work_class = message.get("work_class", "agent")
        check_work_class(work_class)
        return AttemptPlan(
            task_id=task_id,
            attempt=attempt,
            role="worker",
            submitter=caller.id,
            token=token,
            lease_id=lease_id,
            ttl_s=float(ttl_s),
            renewable=True,
            argv=tuple(command),
            env=dict(env),
            gpus=tuple(gpus),
            work_class=str(work_class),
        )

    async def on_cancel(self, caller: Principal, message: dict[str, Any]) -> dict[str, Any]:
        task_id, attempt = task_attempt(message, "cancel")
        row = self.runner.row(task_id, attempt, "worker")
        if row is None:
            raise NotFound(f"no attempt {attempt} of task {task_id} here", code="unknown_attempt")
        if row.submitter != caller.id and "operator" not in caller.roles:
            raise Forbidden(
                "only the task's submitter or an operator cancels it", code="not_task_owner"
            )
        reason = str(message.get("reason") or "cancelled")[:200]
        found = self.runner.request_cancel(task_id, attempt, "worker", reason)
        return {"cancelled": found, "state": row.state}

    # -- running --------------------------------------------------------------------------

    async def _drive(self, plan: AttemptPlan) -> None:
        with self._contained(plan):
            await self.runner.run(plan)
        self._deliver_kick.set()  # result stored: deliver it now

    async def _resume(self, plan: AttemptPlan, execution: Any, started_ms: int) -> None:
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
            self.agent.health.failed("worker", failure)
            log(
                self.logger,
                logging.ERROR,
                "attempt left to its supervisor after a storage error",
                task_id=plan.task_id,
                attempt=plan.attempt,
                error=str(failure),
            )

    def own_pids(self) -> set[int]:
        """Processes this node started for tasks (not foreign GPU users)."""
        pids: set[int] = set()
        for running in self.runner.running.values():
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

    def held_leases(self) -> list[dict[str, Any]]:
        return [
            {
                "task_id": r.task_id,
                "attempt": r.attempt,
                "token": r.token,
                "lease_id": r.lease_id,
                "state": r.state,
            }
            for r in self.attempts.unfinished("worker")
        ]

    async def stop_all(self, reason: str) -> int:
        keys = [key for key in self.runner.running if key[2] == "worker"]
        for task_id, attempt, role in keys:
            self.runner.request_cancel(task_id, attempt, role, reason)
        for key in keys:
            running = self.runner.running.get(key)
            if running is not None:
                await running.done.wait()
        return len(keys)

    # -- result delivery ------------------------------------------------------------------

    async def deliver_pending(self) -> bool:
        """Try to deliver every stored, undelivered result; returns True if all went."""
        agent = self.agent
        ok = True
        for row in self.attempts.undelivered():
            result = row.result
            assert result is not None  # a finished attempt is saved with its result
            submitter = await agent.peer_member(row.submitter)
            if submitter is None:
                ok = False
                continue
            message = {
                "message_id": f"result-{row.task_id}-{row.attempt}",
                "type": "result",
                **result,
            }
            try:
                await agent.call_member(submitter, "POST", "/v1/populi/inbox", message, attempts=2)
            except PopuliError as exc:
                ok = False
                if exc.details.get("http_status") in (400, 403, 404):
                    log(
                        self.logger,
                        logging.WARNING,
                        "result refused by the submitter; keeping it",
                        task_id=row.task_id,
                        error=str(exc),
                    )
                continue
            with agent.store.transaction():
                self.attempts.mark_delivered(
                    row.task_id, row.attempt, now_ms=int(agent.clock.wall() * 1000)
                )
            log(
                self.logger,
                logging.INFO,
                "result delivered",
                task_id=row.task_id,
                attempt=row.attempt,
                submitter=submitter.id,
            )
        return ok

    async def _delivery_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                ok = await self.deliver_pending()
            except RETRIED as exc:
                # An acknowledged delivery could not be recorded: it is sent again (the
                # submitter's inbox answers a duplicate as such).
                self.agent.health.failed("result_delivery", exc)
                ok = False
            else:
                self.agent.health.ok("result_delivery")
            backoff = 0.5 if ok else min(backoff * 2, DELIVERY_MAX_BACKOFF_S)
            with trio.move_on_after(backoff * self.rng.uniform(0.8, 1.2) if not ok else 5.0):
                await self._deliver_kick.wait()
            self._deliver_kick = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            async def on_result(plan: AttemptPlan, result: dict[str, Any]) -> None:
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

    async def _output(self, request: Request) -> dict[str, Any]:
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
        return read_output(self.runner, row, stream, offset, limit)


def read_output(
    runner: AttemptRunner, row: AttemptRecord, stream: str, offset: int, limit: int
) -> dict[str, Any]:
    plan = AttemptPlan.from_json(row.body)
    task_dir = runner.task_dir(plan)
    data, next_offset, total = b"", offset, 0
    running = runner.running.get((plan.task_id, plan.attempt, plan.role))
    if running is not None and running.execution is not None:
        data, next_offset, total = running.execution.read_output(stream, offset, limit)
    elif (task_dir / stream).exists():
        from populi_peer.exec._files import read_tail

        data, next_offset, total = read_tail(task_dir / stream, offset, limit)
    return {
        "data_b64": base64.b64encode(data).decode("ascii"),
        "next_offset": next_offset,
        "total": total,
        "done": row.state == "finished",
    }


__all__ = ["Worker", "read_output"]
