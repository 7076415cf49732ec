"""The submitter: owns the tasks submitted on this node, places them, and is the only
party that may decide to run one locally (safety rules 1, 4, 7).

A task is recorded durably before anything else happens, and every decision is an event
of the pure task machine (``core.tasks``) persisted before it is acted on. One driver per
task loops over its state:

- ``placing``: remote execution off -> local (``remote_disabled``): a GPU task takes a
  ``local`` lease on this node's GPUs (``no_local_gpu`` and a CPU run when it has too
  few), a task without GPUs runs with no lease traffic at all. Otherwise placement v1
  (``core.placement``) proposes a node from the control plane's node list; a grant makes
  it ``running_remote``; a refusal is recorded and the placement retried (until
  ``--queue-timeout`` when no GPU is free) or the task runs here.
  A local attempt gets its token from the control plane: a ``local`` lease on this node's
  GPUs, or a ``fence`` when it needs none.
- ``running_remote``: hand the task to the worker's inbox, then wait for its result while
  watching the lease. Only when the control plane says the lease is dead does the task
  fall back (``/exec/fallback`` returns the higher token with that confirmation); if the
  control plane cannot be reached the task waits in ``fallback_pending`` — never on a
  timer of ours.
- ``running_local``: run under the same attempt runner as a worker (supervisor, lease
  renewals when there is a local GPU lease).

Results arrive in the inbox (``result``), are accepted only for the current attempt's
token, and answered (the answer is the acknowledgement the worker waits for).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from populi_peer.agent.attempts import AttemptPlan, definitive
from populi_peer.agent.health import RETRIED, retried_failure
from populi_peer.agent.heartbeat import scope_of
from populi_peer.api.app import Request, Route
from populi_peer.api.auth import Principal
from populi_peer.config import parse_host_port
from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import RESUMPTION_REASONS
from populi_peer.core.placement import CandidateView, TaskView, propose
from populi_peer.core.policy import check_work_class
from populi_peer.core.tasks import (
    Cancel,
    ControlPlaneUnreachable,
    FallbackRefused,
    GrantRefused,
    HandoffFailed,
    IllegalTaskTransition,
    LeaseDeadConfirmed,
    LeaseLost,
    PlacedLocal,
    PlacedRemote,
    PlacementFailed,
    PlacementStarted,
    PopuliFailure,
    Result,
    Task,
    TaskEvent,
    TaskOptions,
    Timeout,
)
from populi_peer.core.wire import check_command, check_env, task_attempt
from populi_peer.errors import BadRequest, Forbidden, NotFound, PopuliError
from populi_peer.log import get_logger, log

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

SUBMIT = frozenset({"submit"})
READERS = frozenset({"submit", "operator"})
#: Token of a local attempt when remote execution is off (no control plane involved).
LOCAL_ONLY_TOKEN = "0.0"
DEFAULT_TTL_S = 30.0
LOCAL_EXIT_CANCELLED = 130


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


@dataclass
class Control:
    wake: trio.Event = field(default_factory=trio.Event)
    cancel_actor: str | None = None
    handed_off: set[int] = field(default_factory=set)
    tried: set[str] = field(default_factory=set)
    changed: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        self.wake.set()

    def reset(self) -> None:
        self.wake = trio.Event()


class Submitter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.logger = get_logger("submitter")
        self.controls: dict[str, Control] = {}
        self._nursery: trio.Nursery | None = None
        agent.inbox.on("result", self.on_result)

    # -- records --------------------------------------------------------------------------

    def _row(self, task_id: str) -> dict[str, Any]:
        row = self.agent.store.execute(
            "SELECT body FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id} on this node", code="unknown_task")
        return dict(json.loads(row["body"]))

    def load(self, task_id: str) -> Task:
        return Task.from_json(self._row(task_id)["task"])

    def extras(self, task_id: str) -> dict[str, Any]:
        return self._row(task_id)

    def _save(
        self, task: Task, extras: dict[str, Any] | None = None, *, create: bool = False
    ) -> None:
        now_ms = int(self.agent.clock.wall() * 1000)
        body = {
            **(extras if extras is not None else self._row(task.task_id)),
            "task": task.to_json(),
        }
        with self.agent.store.transaction():
            if create:
                self.agent.store.execute(
                    "INSERT INTO tasks (task_id, state, body, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
                    (
                        task.task_id,
                        task.state,
                        json.dumps(body, sort_keys=True),
                        task.created_wall_ms,
                        now_ms,
                    ),
                )
            else:
                self.agent.store.execute(
                    "UPDATE tasks SET state = ?, body = ?, updated_ms = ? WHERE task_id = ?",
                    (task.state, json.dumps(body, sort_keys=True), now_ms, task.task_id),
                )

    def apply(self, task_id: str, event: TaskEvent, **extra_updates: Any) -> Task:
        """Apply ``event`` and persist the new record (and extras) before anyone acts."""
        extras = self._row(task_id)
        task = Task.from_json(extras["task"])
        new = task.apply(event, now_wall_ms=int(self.agent.clock.wall() * 1000))
        for key, value in extra_updates.items():
            if isinstance(value, dict) and isinstance(extras.get(key), dict):
                extras[key] = {**extras[key], **value}
            else:
                extras[key] = value
        self._save(new, extras)
        control = self.controls.get(task_id)
        if control is not None:
            control.changed.set()
            control.changed = trio.Event()
        if new.state != task.state:
            log(
                self.logger,
                logging.INFO,
                "task state",
                task_id=task_id,
                state=new.state,
                via=type(event).__name__,
            )
        return new

    def update_extras(self, task_id: str, **updates: Any) -> None:
        extras = self._row(task_id)
        extras.update(updates)
        self._save(Task.from_json(extras["task"]), extras)

    def request_number(self, task: Task, kind: str) -> int:
        """The attempt number for a lease request of ``kind`` (grant, local, fallback).

        A request whose answer was lost is sent again with the *same* number, so the
        control plane answers it as a replay (the lease it may have created comes back);
        any other request takes a number above every one used so far, so that after a
        lost grant the control plane's next word is for a later attempt. The number is
        durable before the request leaves."""
        extras = self._row(task.task_id)
        pending = extras.get("pending_request") or {}
        if pending.get("kind") == kind:
            return int(pending["attempt"])
        n = max(len(task.attempts), int(extras.get("max_requested_attempt", 0))) + 1
        self.update_extras(
            task.task_id, pending_request={"kind": kind, "attempt": n}, max_requested_attempt=n
        )
        return n

    def request_settled(self, task_id: str) -> None:
        """A lease was obtained, or the number was refused as stale: the next request
        takes a new number."""
        self.update_extras(task_id, pending_request=None)

    # -- gates ----------------------------------------------------------------------------

    def ttl_s(self) -> float:
        return float(min(self.agent.records.settings["max_lease_ttl_s"], DEFAULT_TTL_S))

    # -- submission -----------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> Task:
        command = list(check_command(body.get("command")))
        env = check_env(body.get("env", {}))
        gpus = body.get("gpus", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= 64:
            raise BadRequest("'gpus' must be an integer 0..64", code="bad_request")
        work_class = body.get("work_class", "inference" if gpus else "agent")
        check_work_class(work_class)
        node = body.get("node")
        if node is not None:
            if not isinstance(node, str):
                raise BadRequest("'node' must be a node id or name", code="bad_request")
            node = self.agent.membership.resolve_node(node).id
        options = TaskOptions(
            no_fallback=_flag(body, "no_fallback"),
            queue_timeout_s=body.get("queue_timeout_s"),
            timeout_s=body.get("timeout_s"),
            node=node,
        )
        task = Task.new(
            new_task_id(),
            command=tuple(command),
            env=env,
            gpus_wanted=gpus,
            work_class=work_class,
            created_wall_ms=int(self.agent.clock.wall() * 1000),
            options=options,
        )
        self._save(
            task, {"results": {}, "leases": {}, "submitted_by": body.get("_caller")}, create=True
        )
        log(
            self.logger,
            logging.INFO,
            "task submitted",
            task_id=task.task_id,
            gpus=gpus,
            work_class=work_class,
        )
        self._start_driver(task.task_id)
        return task

    def _start_driver(self, task_id: str) -> None:
        if task_id in self.controls:
            return
        self.controls[task_id] = Control()
        assert self._nursery is not None
        self._nursery.start_soon(self._drive, task_id)

    # -- the driver -----------------------------------------------------------------------

    async def _drive(self, task_id: str) -> None:
        control = self.controls[task_id]
        health = self.agent.health
        try:
            while True:
                try:
                    if not await self._drive_once(task_id, control):
                        return
                except (*RETRIED, BaseExceptionGroup) as exc:
                    # A step whose record could not be written (disk full...) changed
                    # nothing durable: the task waits, and the step is decided again from
                    # its record. A storage problem never fails a task.
                    failure = retried_failure(exc)
                    if failure is None:
                        raise
                    await self._pause(control, health.failed("submitter", failure))
        finally:
            self.controls.pop(task_id, None)
            control.changed.set()

    async def _drive_once(self, task_id: str, control: Control) -> bool:
        """One step of the task's driver; False once the task is terminal."""
        task = self.load(task_id)
        if task.terminal:
            return False
        if control.cancel_actor is not None:
            await self._stop_current(task, "cancelled")
            self.apply(task_id, Cancel(actor=control.cancel_actor))
            return True
        if self._run_timed_out(task):
            await self._stop_current(task, "timeout")
            self.apply(task_id, Timeout(which="run"))
            return True
        control.reset()
        try:
            await self._step(task, control)
        except IllegalTaskTransition as exc:
            # Decided on a record that changed meanwhile (a result arrived during
            # an await): the record is untouched; look at it again.
            log(
                self.logger,
                logging.INFO,
                "task moved on while a step was deciding",
                task_id=task_id,
                detail=str(exc),
            )
        except RETRIED:
            raise
        except PopuliError as exc:
            log(
                self.logger,
                logging.ERROR,
                "task failed inside Populi",
                task_id=task_id,
                error=str(exc),
                code=exc.code,
            )
            current = self.load(task_id)
            try:
                # Fails only where no attempt may be running (the table refuses
                # it in running_remote: only the lease's death frees the task).
                self.apply(task_id, PopuliFailure(code=exc.code, detail=str(exc)[:200]))
            except IllegalTaskTransition:
                await self._pause(control, 2.0)
                return True
            if current.state == "running_local":
                await self._stop_current(current, "populi_failure")
        else:
            self.agent.health.ok("submitter")
        return True

    def _run_timed_out(self, task: Task) -> bool:
        timeout = task.options.timeout_s
        return (
            timeout is not None
            and self.agent.clock.wall() * 1000 >= task.created_wall_ms + timeout * 1000
        )

    def _queue_deadline_passed(self, task: Task) -> bool:
        queue = task.options.queue_timeout_s
        return (
            queue is None or self.agent.clock.wall() * 1000 >= task.created_wall_ms + queue * 1000
        )

    async def _pause(self, control: Control, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await control.wake.wait()

    async def _step(self, task: Task, control: Control) -> None:
        if task.state == "queued":
            self.apply(task.task_id, PlacementStarted())
        elif task.state == "placing":
            await self._place(task, control)
        elif task.state == "running_remote":
            await self._remote(task, control)
        elif task.state == "fallback_pending":
            await self._await_word(task, control)
        elif task.state == "running_local":
            await self._local(task, control)

    # -- control plane calls --------------------------------------------------------------

    async def _cp(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        agent = self.agent
        return await agent.peers.call(
            url=agent.control_plane_url,
            node_id=agent.control_plane_id,
            method=method,
            path=path,
            payload=payload,
            params=params,
        )

    async def candidates(self) -> list[CandidateView]:
        nodes = await self._cp("GET", "/v1/populi/nodes")
        free = {
            n["id"]: int((n.get("gpu_summary") or {}).get("allocatable", 0)) for n in nodes["nodes"]
        }
        out = []
        for node in nodes["nodes"]:
            if node["id"] == self.agent.node_id:
                continue
            address = node.get("address")
            host = None
            if address:
                try:
                    host = parse_host_port(address)[0]
                except ValueError:
                    host = None
            out.append(
                CandidateView(
                    node_id=node["id"],
                    eligible=bool(node["eligible"])
                    and "worker" in node["roles"]
                    and node.get("accepts_remote_work") is not False,
                    free_gpus=int(free.get(node["id"], 0)),
                    scope=scope_of(self.agent, host),
                    reasons=tuple(node["ineligible_reasons"])
                    or (() if "worker" in node["roles"] else ("not_a_worker",))
                    or (
                        ("remote_off_on_node",) if node.get("accepts_remote_work") is False else ()
                    ),
                )
            )
        return out

    # -- placing --------------------------------------------------------------------------

    async def _place(self, task: Task, control: Control) -> None:
        task_id = task.task_id
        if not self.agent.remote_enabled():
            if 0 < task.gpus_wanted <= len(self.agent.verified_gpu_uuids()):
                # Nothing leaves this node, but its GPUs are still taken under a `local`
                # lease: two tasks never share one, and the lease names which to use.
                await self._place_local(task, control, ("remote_disabled",))
                return
            reasons: tuple[str, ...] = ("remote_disabled",)
            if task.gpus_wanted:
                reasons += ("no_local_gpu",)
            self.apply(
                task_id,
                PlacedLocal(node=self.agent.node_id, reasons=reasons, lease_id=None, token=None),
            )
            return
        try:
            candidates = await self.candidates()
        except PopuliError as exc:
            if definitive(exc):
                raise
            if not self._queue_deadline_passed(task):
                await self._pause(control, 2.0)
                return
            if task.gpus_wanted == 0 and not task.options.no_fallback:
                # Nothing was ever granted: running here cannot be running twice.
                self.apply(
                    task_id,
                    PlacedLocal(
                        node=self.agent.node_id,
                        reasons=("control_plane_unreachable",),
                        lease_id=None,
                        token=None,
                    ),
                )
            else:
                self.apply(
                    task_id,
                    PlacementFailed(reasons=("control_plane_unreachable",), detail=str(exc)[:200]),
                )
            return
        placement = propose(
            TaskView(
                work_class=task.work_class, gpus_wanted=task.gpus_wanted, node=task.options.node
            ),
            candidates,
            remote_enabled=True,
            local_node=self.agent.node_id,
            gates_enabled=self.agent.policy_gates(),
            avoid=frozenset(control.tried),
        )
        if placement.where == "remote":
            await self._grant_remote(task, control, placement.node, placement.reasons)
            return
        reasons = placement.reasons
        waiting = task.gpus_wanted > 0 and not self._queue_deadline_passed(task)
        if waiting:
            # --queue-timeout: keep trying for a free GPU before falling back.
            control.tried.clear()
            await self._pause(control, 1.0)
            return
        if task.options.no_fallback:
            self.apply(
                task_id,
                PlacedLocal(node=self.agent.node_id, reasons=reasons, lease_id=None, token=None),
            )
            return
        await self._place_local(task, control, reasons)

    async def _grant_remote(
        self, task: Task, control: Control, node: str, reasons: tuple[str, ...]
    ) -> None:
        task_id = task.task_id
        attempt = self.request_number(task, "grant")
        try:
            answer = await self._cp(
                "POST",
                "/v1/populi/exec/leases",
                {
                    "task_id": task_id,
                    "attempt": attempt,
                    "work_class": task.work_class,
                    "target": node,
                    "gpus_wanted": task.gpus_wanted,
                    "ttl_s": self.ttl_s(),
                },
            )
        except PopuliError as exc:
            if definitive(exc):
                refusal = tuple(exc.details.get("reasons") or [exc.code])
                self.request_settled(task_id)
                if RESUMPTION_REASONS & set(refusal):
                    # The control plane just restarted: it grants on a node once that node
                    # reported to it. Not the node's fault, nor the task's: wait, place again.
                    log(
                        self.logger,
                        logging.INFO,
                        "the control plane resumes grants per node; waiting",
                        task_id=task_id,
                        reasons=list(refusal),
                    )
                    await self._pause(control, 1.0)
                    return
                if "no_free_gpu" in refusal and not self._queue_deadline_passed(task):
                    # --queue-timeout: the GPU is busy for now; keep trying (even with
                    # --no-fallback, which only decides what happens when time is up).
                    log(
                        self.logger,
                        logging.INFO,
                        "no free GPU yet; waiting",
                        task_id=task_id,
                        node=node,
                    )
                    await self._pause(control, 0.5)
                    return
                control.tried.add(node)
                self.apply(task_id, GrantRefused(node=node, reasons=refusal))
                return
            # The answer was lost: the grant may have happened. Wait for the word.
            self.apply(task_id, ControlPlaneUnreachable(detail=f"grant: {exc}"[:200]))
            return
        lease = answer["lease"]
        self.request_settled(task_id)
        self.apply(
            task_id,
            PlacedRemote(
                node=node,
                lease_id=lease["lease_id"],
                token=FencingToken.parse(lease["token"]),
                reasons=reasons,
            ),
            leases={
                lease["lease_id"]: {
                    "gpus": lease["gpus"],
                    "ttl_s": lease["ttl_s"],
                    "kind": lease["kind"],
                }
            },
        )

    async def _place_local(self, task: Task, control: Control, reasons: tuple[str, ...]) -> None:
        """A first local attempt (remote execution on, or off for a GPU task): take its
        token (and its GPUs, if any) from the control plane, so this node's GPUs are never
        leased out too, nor given to two local tasks."""
        task_id = task.task_id
        try:
            lease = await self._local_token(task, control)
        except PopuliError as exc:
            if definitive(exc):
                refusal = tuple(exc.details.get("reasons") or [exc.code])
                if "stale_attempt" in refusal:
                    self.request_settled(task_id)
                    return
                if RESUMPTION_REASONS & set(refusal) or (
                    "no_free_gpu" in refusal and not self._queue_deadline_passed(task)
                ):
                    await self._pause(control, 1.0)
                    return
                self.apply(task_id, PlacementFailed(reasons=refusal, detail=str(exc)[:200]))
                return
            if task.gpus_wanted == 0:
                self.apply(
                    task_id,
                    PlacedLocal(
                        node=self.agent.node_id,
                        reasons=(*reasons, "control_plane_unreachable"),
                        lease_id=None,
                        token=None,
                    ),
                )
            else:
                await self._pause(control, 2.0)
            return
        self.apply(
            task_id,
            PlacedLocal(
                node=self.agent.node_id,
                reasons=reasons,
                lease_id=lease["lease_id"],
                token=FencingToken.parse(lease["token"]),
            ),
            leases={
                lease["lease_id"]: {
                    "gpus": lease["gpus"],
                    "ttl_s": lease["ttl_s"],
                    "kind": lease["kind"],
                }
            },
        )

    async def _local_token(self, task: Task, control: Control) -> dict[str, Any]:
        attempt = self.request_number(task, "local")
        if task.gpus_wanted > 0:
            answer = await self._cp(
                "POST",
                "/v1/populi/exec/leases",
                {
                    "task_id": task.task_id,
                    "attempt": attempt,
                    "work_class": task.work_class,
                    "target": self.agent.node_id,
                    "gpus_wanted": task.gpus_wanted,
                    "ttl_s": self.ttl_s(),
                },
            )
        else:
            answer = await self._cp(
                "POST",
                "/v1/populi/exec/fallback",
                {
                    "task_id": task.task_id,
                    "attempt": attempt,
                    "gpus_wanted": 0,
                    "ttl_s": self.ttl_s(),
                    "work_class": task.work_class,
                },
            )
        self.request_settled(task.task_id)
        return dict(answer["lease"])

    # -- remote ---------------------------------------------------------------------------

    def handoff_message(self, task: Task) -> dict[str, Any]:
        attempt = task.current_attempt
        assert attempt is not None and attempt.token is not None and attempt.lease_id is not None
        lease = self.extras(task.task_id)["leases"].get(attempt.lease_id, {})
        return {
            "message_id": f"handoff-{task.task_id}-{attempt.n}",
            "type": "handoff",
            "task_id": task.task_id,
            "attempt": attempt.n,
            "lease_id": attempt.lease_id,
            "token": str(attempt.token),
            "command": list(task.command),
            "env": task.env_dict,
            "gpus": lease.get("gpus", []),
            "ttl_s": lease.get("ttl_s", self.ttl_s()),
            "work_class": task.work_class,
        }

    async def _remote(self, task: Task, control: Control) -> None:
        attempt = task.current_attempt
        assert attempt is not None
        if attempt.n not in control.handed_off:
            worker = await self.agent.peer_member(attempt.node)
            if worker is None:
                self.apply(
                    task.task_id, HandoffFailed(reason="worker_unknown", detail=attempt.node)
                )
                return
            try:
                message = {
                    **self.handoff_message(task),
                    # The settings record this was placed under: a worker holding an
                    # older one fetches the signed record before it decides.
                    "settings_serial": self.agent.records.settings_serial,
                }
                await self.agent.call_member(worker, "POST", "/v1/populi/inbox", message)
            except PopuliError as exc:
                # Refused or unreachable, the lease may be live and (if unreachable) the
                # worker may even have started: only the lease's death frees the task.
                self.apply(
                    task.task_id,
                    HandoffFailed(
                        reason=exc.code if definitive(exc) else "worker_unreachable",
                        detail=str(exc)[:200],
                    ),
                )
                return
            control.handed_off.add(attempt.n)
            log(
                self.logger,
                logging.INFO,
                "task handed off",
                task_id=task.task_id,
                attempt=attempt.n,
                node=attempt.node,
            )
        await self._pause(control, self._check_interval(task))
        if self.load(task.task_id).state != "running_remote":
            return
        await self._check_lease(task, control)

    def _check_interval(self, task: Task) -> float:
        attempt = task.current_attempt
        ttl = self.ttl_s()
        if attempt is not None and attempt.lease_id:
            ttl = float(
                self.extras(task.task_id)["leases"].get(attempt.lease_id, {}).get("ttl_s", ttl)
            )
        return max(0.5, min(ttl / 3, 5.0))

    async def _check_lease(self, task: Task, control: Control) -> None:
        attempt = task.current_attempt
        assert attempt is not None and attempt.lease_id is not None
        try:
            answer = await self._cp("GET", f"/v1/populi/exec/leases/{attempt.lease_id}")
        except PopuliError as exc:
            if not definitive(exc):
                self.apply(
                    task.task_id, ControlPlaneUnreachable(detail=f"lease check: {exc}"[:200])
                )
            return
        state = answer["lease"]["state"]
        if state in ("released", "revoked", "expired"):
            await self._fallback(self.load(task.task_id), control, reason=f"lease_{state}")

    async def _await_word(self, task: Task, control: Control) -> None:
        await self._pause(control, self._check_interval(task))
        task = self.load(task.task_id)
        if task.state != "fallback_pending":
            return
        await self._fallback(task, control, reason="")

    async def _fallback(self, task: Task, control: Control, *, reason: str) -> None:
        """Ask the control plane for its word that the lease is dead, with a higher token.

        The local attempt takes this node's GPUs when it has enough (a ``local`` lease).
        A node with fewer GPUs than the task wants (a CPU-only laptop) runs it without
        any, reason ``no_local_gpu``: the task finishes here instead, as a CPU run.
        With ``--no-fallback`` only the word is wanted: no GPU is taken, and the fence
        that records the token is released at once."""
        current = task.current_attempt
        if (
            task.options.no_fallback
            and current is not None
            and current.lease_id
            and current.token is not None
        ):
            # --no-fallback: the control plane's word that the lease is dead is all that
            # is wanted; nothing new is leased.
            try:
                state = (await self._cp("GET", f"/v1/populi/exec/leases/{current.lease_id}"))[
                    "lease"
                ]["state"]
            except PopuliError as exc:
                if not definitive(exc) and task.state != "fallback_pending":
                    self.apply(
                        task.task_id, ControlPlaneUnreachable(detail=f"lease check: {exc}"[:200])
                    )
                return
            if state in ("released", "revoked", "expired"):
                self.apply(
                    task.task_id,
                    LeaseDeadConfirmed(
                        node=self.agent.node_id,
                        token=current.token,
                        lease_id=None,
                        reasons=(f"lease_{state}",),
                    ),
                )
            return
        attempt = self.request_number(task, "fallback")
        local_gpus = task.gpus_wanted
        extra_reasons: tuple[str, ...] = ()
        if task.options.no_fallback:
            local_gpus = 0
        elif task.gpus_wanted > len(self.agent.verified_gpu_uuids()):
            local_gpus = 0
            extra_reasons = ("no_local_gpu",)
        try:
            answer = await self._cp(
                "POST",
                "/v1/populi/exec/fallback",
                {
                    "task_id": task.task_id,
                    "attempt": attempt,
                    "gpus_wanted": local_gpus,
                    "ttl_s": self.ttl_s(),
                    "work_class": task.work_class,
                },
            )
        except PopuliError as exc:
            if definitive(exc):
                refusal = tuple(exc.details.get("reasons") or [exc.code])
                if "stale_attempt" in refusal:
                    self.request_settled(task.task_id)
                if task.state in {"fallback_pending", "running_remote"}:
                    self.apply(task.task_id, FallbackRefused(reasons=refusal))
                return
            if task.state != "fallback_pending":
                self.apply(task.task_id, ControlPlaneUnreachable(detail=f"fallback: {exc}"[:200]))
            return
        lease = answer["lease"]
        self.request_settled(task.task_id)
        prior = answer.get("prior") or {}
        why = (
            tuple(
                r
                for r in (reason or (f"lease_{prior['state']}" if prior.get("state") else ""),)
                if r
            )
            + extra_reasons
        )
        if task.options.no_fallback:
            plan = AttemptPlan(
                task.task_id,
                attempt,
                "local",
                self.agent.node_id,
                str(lease["token"]),
                str(lease["lease_id"]),
                None,
                False,
                task.command,
                {},
                (),
                task.work_class,
            )
            await self.agent.runner.release(plan, "stopped")
        self.apply(
            task.task_id,
            LeaseDeadConfirmed(
                node=self.agent.node_id,
                token=FencingToken.parse(lease["token"]),
                lease_id=lease["lease_id"],
                reasons=why,
            ),
            leases={
                lease["lease_id"]: {
                    "gpus": lease["gpus"],
                    "ttl_s": lease["ttl_s"],
                    "kind": lease["kind"],
                }
            },
        )

    # -- local ----------------------------------------------------------------------------

    def local_plan(self, task: Task) -> AttemptPlan:
        attempt = task.current_attempt
        assert attempt is not None
        lease = self.extras(task.task_id)["leases"].get(attempt.lease_id or "", {})
        return AttemptPlan(
            task_id=task.task_id,
            attempt=attempt.n,
            role="local",
            submitter=self.agent.node_id,
            token=str(attempt.token) if attempt.token is not None else LOCAL_ONLY_TOKEN,
            lease_id=attempt.lease_id,
            ttl_s=float(lease["ttl_s"]) if lease.get("ttl_s") else None,
            renewable=lease.get("kind") == "local",
            argv=task.command,
            env=task.env_dict,
            gpus=tuple(lease.get("gpus", [])),
            work_class=task.work_class,
        )

    async def _local(self, task: Task, control: Control) -> None:
        runner = self.agent.runner
        plan = self.local_plan(task)
        key = (plan.task_id, plan.attempt, "local")
        row = runner.row(plan.task_id, plan.attempt, "local")
        if row is not None and row["state"] == "finished":
            result = json.loads(row["result"])
        else:
            result_box: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    running = runner.running.get(key)
                    if running is not None:  # re-adopted after a restart
                        await running.done.wait()
                        done_row = runner.row(plan.task_id, plan.attempt, "local")
                        result_box.append(json.loads(done_row["result"]))
                    else:
                        await runner.save_durably(plan, "accepted")
                        result_box.append(await runner.run(plan))
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    while True:
                        await control.wake.wait()
                        control.reset()
                        if control.cancel_actor is not None:
                            runner.request_cancel(plan.task_id, plan.attempt, "local", "cancelled")
                        elif self._run_timed_out(self.load(plan.task_id)):
                            runner.request_cancel(plan.task_id, plan.attempt, "local", "timeout")

                nursery.start_soon(run)
                nursery.start_soon(watch)
            result = result_box[0]
        self._record_result(plan.task_id, result)
        await self._apply_result(self.load(plan.task_id), result)

    def _record_result(self, task_id: str, result: dict[str, Any]) -> None:
        extras = self._row(task_id)
        results = dict(extras.get("results", {}))
        results[str(result["attempt"])] = result
        extras["results"] = results
        self._save(Task.from_json(extras["task"]), extras)

    async def _apply_result(self, task: Task, result: dict[str, Any]) -> None:
        outcome = result.get("outcome")
        token = (
            FencingToken.parse(result["token"])
            if result.get("token") and result["token"] != LOCAL_ONLY_TOKEN
            else None
        )
        attempt = int(result["attempt"])
        if task.terminal:
            return
        if outcome == "cancelled":
            control = self.controls.get(task.task_id)
            actor = (
                control.cancel_actor
                if control and control.cancel_actor
                else result.get("detail") or "cancelled"
            )
            if task.current_attempt is not None and task.current_attempt.n == attempt:
                if result.get("detail") == "timeout" or self._run_timed_out(task):
                    self.apply(task.task_id, Timeout(which="run"))
                else:
                    self.apply(task.task_id, Cancel(actor=str(actor)))
            return
        if outcome in ("lease_lost", "lost"):
            if (
                task.current_attempt is not None
                and task.current_attempt.n == attempt
                and task.state in ("running_remote", "running_local")
            ):
                self.apply(
                    task.task_id,
                    LeaseLost(reason=str(result.get("detail") or outcome), detail=str(outcome)),
                )
            return
        if outcome == "populi_failure":
            if task.current_attempt is not None and task.current_attempt.n == attempt:
                self.apply(
                    task.task_id,
                    PopuliFailure(
                        code="populi_failure", detail=str(result.get("detail") or "")[:200]
                    ),
                )
            return
        exit_code = result.get("exit_code")
        signal = result.get("signal")
        current = task.current_attempt
        if current is not None and current.token is None:
            token = None
        self.apply(
            task.task_id, Result(attempt=attempt, token=token, exit_code=exit_code, signal=signal)
        )

    async def _stop_current(self, task: Task, why: str) -> None:
        attempt = task.current_attempt
        if attempt is None:
            return
        if attempt.where == "local":
            self.agent.runner.request_cancel(task.task_id, attempt.n, "local", why)
            return
        worker = await self.agent.peer_member(attempt.node)
        if worker is None:
            return
        try:
            await self.agent.call_member(
                worker,
                "POST",
                "/v1/populi/inbox",
                {
                    "message_id": f"cancel-{task.task_id}-{attempt.n}",
                    "type": "cancel",
                    "task_id": task.task_id,
                    "attempt": attempt.n,
                    "token": str(attempt.token),
                    "reason": why,
                },
            )
        except PopuliError as exc:
            log(
                self.logger,
                logging.WARNING,
                "could not tell the worker to stop; its lease will run out",
                task_id=task.task_id,
                error=str(exc),
            )

    # -- inbox: results -------------------------------------------------------------------

    async def on_result(self, caller: Principal, message: dict[str, Any]) -> dict[str, Any]:
        task_id, attempt = task_attempt(message, "result")
        task = self.load(task_id)
        match = next((a for a in task.attempts if a.n == attempt), None)
        if match is None or match.where != "remote" or match.node != caller.id:
            raise Forbidden(
                f"{caller.id} ran no attempt {attempt} of task {task_id}", code="not_attempt_holder"
            )
        result = {k: message[k] for k in message if k not in ("message_id", "type", "v")}
        result["node"] = caller.id
        if task.terminal or str(result.get("token")) != str(match.token):
            # Late or for an older token: kept apart, never over the accepted record.
            extras = self._row(task_id)
            ignored = [*extras.get("ignored_results", []), result][-20:]
            self.update_extras(task_id, ignored_results=ignored)
            try:
                await self._apply_result(self.load(task_id), result)
            except IllegalTaskTransition:
                pass
            return {"accepted": False, "state": self.load(task_id).state}
        self._record_result(task_id, result)
        before = self.load(task_id).state
        try:
            await self._apply_result(self.load(task_id), result)
        except IllegalTaskTransition:
            # Recorded above; it no longer applies to the task as it stands (stale or
            # late): acknowledged, so the worker stops retrying, and ignored.
            pass
        after = self.load(task_id)
        control = self.controls.get(task_id)
        if control is not None:
            control.poke()
        return {"accepted": after.state != before, "state": after.state}

    # -- API ------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/populi/tasks", self._submit, roles=SUBMIT, name="task_submit"),
            Route("GET", "/v1/populi/tasks", self._list, roles=READERS, name="task_list"),
            Route("GET", "/v1/populi/tasks/{task_id}", self._show, roles=READERS, name="task_show"),
            Route(
                "POST",
                "/v1/populi/tasks/{task_id}/cancel",
                self._cancel,
                roles=READERS,
                name="task_cancel",
            ),
            Route(
                "GET",
                "/v1/populi/tasks/{task_id}/output",
                self._output,
                roles=READERS,
                name="task_output",
            ),
        ]

    def task_json(self, task_id: str) -> dict[str, Any]:
        extras = self._row(task_id)
        task = Task.from_json(extras["task"])
        data = task.to_json()
        # Environment values are the task's secrets: names only in answers.
        data["env"] = [[name, "…"] for name, _ in task.env]
        results = extras.get("results", {})
        data["results"] = {
            n: {k: v for k, v in r.items() if not k.endswith("_b64")} for n, r in results.items()
        }
        data["exit_status"] = exit_status(task, results)
        data["leases"] = extras.get("leases", {})
        data["active"] = task_id in self.controls
        return data

    async def _submit(self, request: Request) -> dict[str, Any]:
        self._local_only(request)
        body = request.json()
        body["_caller"] = request.caller.id
        task = self.submit(body)
        return {"task": self.task_json(task.task_id)}

    def _local_only(self, request: Request) -> None:
        caller = request.caller
        if caller.id != self.agent.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "tasks are submitted to and read from the node's own agent", code="role_required"
            )

    async def _list(self, request: Request) -> dict[str, Any]:
        self._local_only(request)
        limit = request.query_int("limit", 100, minimum=1, maximum=1000)
        state = request.query_one("state")
        if state:
            rows = self.agent.store.execute(
                "SELECT task_id FROM tasks WHERE state = ? ORDER BY created_ms DESC LIMIT ?",
                (state, limit),
            ).fetchall()
        else:
            rows = self.agent.store.execute(
                "SELECT task_id FROM tasks ORDER BY created_ms DESC LIMIT ?", (limit,)
            ).fetchall()
        return {"tasks": [self.task_json(row["task_id"]) for row in rows]}

    async def _show(self, request: Request) -> dict[str, Any]:
        self._local_only(request)
        task_id = request.path_params["task_id"]
        wait_s = request.query_int("wait_s", 0, minimum=0, maximum=600)
        if wait_s:
            with trio.move_on_after(wait_s):
                while True:
                    if self.load(task_id).terminal:
                        break
                    control = self.controls.get(task_id)
                    if control is None:
                        await trio.sleep(0.2)
                    else:
                        await control.changed.wait()
        return {"task": self.task_json(task_id)}

    async def _cancel(self, request: Request) -> dict[str, Any]:
        self._local_only(request)
        task_id = request.path_params["task_id"]
        task = self.load(task_id)
        if task.terminal:
            return {"task": self.task_json(task_id), "cancelled": False}
        control = self.controls.get(task_id)
        if control is None:
            self.apply(task_id, Cancel(actor=request.caller.id))
        else:
            control.cancel_actor = request.caller.id
            control.poke()
            self.agent.runner.request_cancel(task_id, len(task.attempts), "local", "cancelled")
            with trio.move_on_after(30):
                while not self.load(task_id).terminal:
                    await control.changed.wait()
        return {"task": self.task_json(task_id), "cancelled": True}

    async def _output(self, request: Request) -> dict[str, Any]:
        self._local_only(request)
        task_id = request.path_params["task_id"]
        task = self.load(task_id)
        stream = request.query_one("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise BadRequest("stream must be stdout or stderr", code="bad_request")
        offset = request.query_int("offset", 0, minimum=0)
        limit = request.query_int("limit", 256 * 1024, minimum=1, maximum=1 << 20)
        asked = request.query_int("attempt", 0, minimum=0, maximum=1_000_000)
        if asked > len(task.attempts):
            raise BadRequest(
                f"task {task_id} has {len(task.attempts)} attempt(s)", code="bad_request"
            )
        if not task.attempts:
            return {
                "attempt": 0,
                "where": None,
                "data_b64": "",
                "next_offset": 0,
                "total": 0,
                "done": task.terminal,
                "task_state": task.state,
                "latest_attempt": 0,
            }
        n = asked or len(task.attempts)
        attempt = task.attempts[n - 1]
        results = self._row(task_id).get("results", {})
        chunk: dict[str, Any]
        if str(n) in results:
            chunk = _from_tail(results[str(n)], stream, offset, limit)
        elif attempt.where == "local":
            from populi_peer.agent.worker import read_output

            row = self.agent.runner.row(task_id, n, "local")
            chunk = (
                read_output(self.agent.runner, row, stream, offset, limit)
                if row is not None
                else {"data_b64": "", "next_offset": offset, "total": 0, "done": False}
            )
        else:
            worker = self.agent.membership.get(attempt.node)
            try:
                assert worker is not None and worker.addresses
                chunk = await self.agent.peers.call(
                    url=f"https://{worker.addresses[0]}",
                    node_id=worker.id,
                    method="GET",
                    path=f"/v1/populi/exec/attempts/{task_id}/{n}/output",
                    params={"stream": stream, "offset": offset, "limit": limit},
                    timeout_s=5.0,
                )
                chunk = {k: chunk[k] for k in ("data_b64", "next_offset", "total", "done")}
            except (PopuliError, AssertionError):
                chunk = {"data_b64": "", "next_offset": offset, "total": 0, "done": False}
        return {
            "attempt": n,
            "where": attempt.where,
            "node": attempt.node,
            **chunk,
            "task_state": task.state,
            "latest_attempt": len(task.attempts),
        }

    # -- service --------------------------------------------------------------------------

    async def stop_all(self, reason: str) -> int:
        count = 0
        for _task_id, control in list(self.controls.items()):
            control.cancel_actor = reason
            control.poke()
            count += 1
        return count

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            runner = self.agent.runner

            async def on_result(plan: AttemptPlan, result: dict[str, Any]) -> None:
                await trio.lowlevel.checkpoint()

            to_resume, _to_start = await runner.recover("local", on_result)
            for plan, execution in to_resume:
                row = runner.row(plan.task_id, plan.attempt, "local")
                started = json.loads(row["body"]).get("started_wall_ms", 0) if row else 0
                nursery.start_soon(runner.resume, plan, execution, int(started))
            # Local attempts accepted but never launched are started again by their task's
            # driver (running_local with no finished row), after it renews their lease.
            for row in self.agent.store.execute(
                "SELECT task_id FROM tasks WHERE state NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')"
            ).fetchall():
                self._start_driver(row["task_id"])
            task_status.started()
            await trio.sleep_forever()


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name!r} must be true or false", code="bad_request")
    return value


def _from_tail(result: dict[str, Any], stream: str, offset: int, limit: int) -> dict[str, Any]:
    data = base64.b64decode(result.get(f"{stream}_tail_b64") or "")
    total = int(result.get(f"{stream}_total") or len(data))
    first = total - len(data)
    start = max(offset, first)
    piece = data[start - first : start - first + limit]
    return {
        "data_b64": base64.b64encode(piece).decode("ascii"),
        "next_offset": start + len(piece),
        "total": total,
        "done": True,
    }


def exit_status(task: Task, results: dict[str, Any]) -> int | None:
    """What ``populi run`` exits with: the task's own code, 124 on --timeout, 128+N for a
    signal, 126/127 when the command could not be run, 125 when Populi failed it."""
    if not task.terminal:
        return None
    if task.state == "timed_out":
        return 124
    if task.state == "cancelled":
        return LOCAL_EXIT_CANCELLED
    if task.state == "succeeded":
        return 0
    if task.signal is not None:
        return 128 + int(task.signal)
    if task.exit_code is not None:
        return int(task.exit_code)
    return 125


__all__ = ["Submitter", "exit_status", "new_task_id"]
