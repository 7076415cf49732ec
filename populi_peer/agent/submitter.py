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

Decisions live in the core: the task machine (``core.tasks``, with its request numbers:
a request whose answer was lost is sent again with the same number), placement
(``core.placement``) and what follows a refused or unanswered request
(``core.refusals.decide_refusal``). Every call to another node is typed: a malformed
answer, or one about another lease than the one asked for, is an error for that call —
for a lease request, one that may have happened (the task waits for the control plane's
word), never an exception that stops the submitter.

The submitter is given what it uses: the task repository, the attempt runner (local
attempts), the clock, the control-plane and peer links, the cluster settings, the node's
health, and :class:`SubmitterNode` — what the rest of the node tells it.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import trio

from populi_peer.agent.attempts import (
    AttemptPlan,
    AttemptRunner,
    definitive,
    refusal_of,
    stored_result,
)
from populi_peer.agent.health import RETRIED, Health, retried_failure
from populi_peer.agent.holdings import NodeLedger
from populi_peer.agent.links import ControlPlaneLink, PeerLink
from populi_peer.api.app import SUBMIT, TASK_READERS, Request, Route
from populi_peer.api.auth import Principal
from populi_peer.clock import Clock
from populi_peer.config import parse_host_port
from populi_peer.core.claims import NO_LEASE_TOKEN, ClaimBasis, claim_basis
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import DEAD_STATES, STOPPING_REFUSALS, Lease
from populi_peer.core.membership import Member
from populi_peer.core.messages import (
    CancelMessage,
    GpusAnswer,
    HandoffMessage,
    InboxDeliverAnswer,
    InboxMessage,
    LeaseAnswer,
    LeaseFallbackAnswer,
    LeaseFallbackRequest,
    LeaseGrantRequest,
    LeaseReplayAnswer,
    LeaseView,
    NodesAnswer,
    OutputChunk,
    OutputChunkAnswer,
    Payload,
    ResultAnswer,
    ResultMessage,
    TaskAnswer,
    TaskCancelAnswer,
    TaskLeaseGrant,
    TaskListAnswer,
    TaskOutputAnswer,
    TaskSubmitRequest,
    TaskView,
    TaskWaiting,
)
from populi_peer.core.messages.inbox import MessageType
from populi_peer.core.placement import CandidateView, Placement, propose, replan_queued
from populi_peer.core.placement import TaskView as PlacementTask
from populi_peer.core.refusals import (
    CONTROL_PLANE_UNREACHABLE,
    NO_FREE_GPU,
    WAIT_FOR_LOCAL_GPU_S,
    Ask,
    Decision,
    decide_refusal,
)
from populi_peer.core.reports import Claim
from populi_peer.core.scope import Scope, parse_address
from populi_peer.core.settings import gates_enabled, remote_refusal
from populi_peer.core.tasks import (
    TASK_STATES,
    WORKER_LEFT,
    Cancel,
    HandoffFailed,
    IllegalTaskTransition,
    LeaseDeadConfirmed,
    LeaseLost,
    PlacedLocal,
    PlacedRemote,
    PlacementStarted,
    PopuliFailure,
    Rejected,
    Replanned,
    RequestKind,
    Result,
    Task,
    TaskEvent,
    TaskOptions,
    Timeout,
    event_key,
    exit_status,
)
from populi_peer.core.transition_log import TASK_TRANSITION, task_transition_fields
from populi_peer.errors import BadRequest, Forbidden, NotFound, PeerError, PopuliError
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store.tasks import TaskRecord, Tasks

DEFAULT_TTL_S = 30.0
#: How long the submitter waits for a worker's output of a running attempt.
OUTPUT_TIMEOUT_S = 5.0
#: How often a task queued for a free GPU looks again when no hint change wakes it.
QUEUE_RETRY_S = 1.0
#: What a task holds under no lease (a local attempt without one).
NO_GRANT = TaskLeaseGrant(gpus=(), ttl_s=None, kind=None, attempt=None)


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


class SubmitterSettings(Protocol):
    """The cluster settings this node holds (``agent.records.ClusterRecords``)."""

    @property
    def settings(self) -> Mapping[str, Any]: ...

    @property
    def settings_serial(self) -> int: ...


class SubmitterNode(Protocol):
    """What the rest of the node tells the submitter (built by the composition root from
    the config, the settings, standing, membership and the GPU service)."""

    def remote_enabled(self) -> bool:
        """Remote execution is on here and cluster-wide, and the kill switch is off."""
        ...

    def verified_gpu_uuids(self) -> Collection[str]: ...

    def resolve_node(self, ref: str) -> str:
        """The id of the node ``ref`` names (id or unique name); 404 ``unknown_node``."""
        ...

    def scope_of(self, host: str | None) -> Scope:
        """The scope of the path to ``host`` by this node's CIDR config."""
        ...


@dataclass
class Control:
    wake: trio.Event = field(default_factory=trio.Event)
    cancel_actor: str | None = None
    handed_off: set[int] = field(default_factory=set)
    tried: set[str] = field(default_factory=set)
    changed: trio.Event = field(default_factory=trio.Event)
    #: What the task waits for now (``task show``'s ``waiting``; memory only).
    waiting: TaskWaiting | None = None
    #: Why each remote node was refused by the last placement that ran the task here.
    rejected: Rejected = ()
    #: The task waits for a free GPU (``--queue-timeout``): later placements ask
    #: :func:`~populi_peer.core.placement.replan_queued` instead of starting afresh.
    queued: bool = False
    #: The node it waits for (:attr:`~populi_peer.core.placement.Placement.waiting_for`).
    queued_for: str | None = None

    def poke(self) -> None:
        self.wake.set()

    def reset(self) -> None:
        self.wake = trio.Event()


def placement_task(task: Task) -> PlacementTask:
    """What placement needs to know of ``task`` (its ``--gpus``, ``--gpu-mem``,
    ``--gpu-model``, ``--node``)."""
    return PlacementTask(
        work_class=task.work_class,
        gpus_wanted=task.gpus_wanted,
        node=task.options.node,
        gpu_mem_bytes=task.options.gpu_mem_bytes,
        gpu_model=task.options.gpu_model,
    )


def grant_of(view: LeaseView) -> TaskLeaseGrant:
    lease = view.lease
    return TaskLeaseGrant(
        gpus=lease.gpus, ttl_s=lease.ttl_s, kind=lease.kind, attempt=lease.attempt
    )


@dataclass(kw_only=True, eq=False, repr=False)
class Submitter:
    """``ledger``: this node's book (its node-local claims, ADR 0015); without it a
    local GPU task waits for the control plane as before. ``capacity_changed``: the
    event set at the next change of the hints this node holds (hint gossip); a task
    queued for a free GPU wakes on it, not only on its retry."""

    node_id: str
    tasks: Tasks
    runner: AttemptRunner
    clock: Clock
    control_plane: ControlPlaneLink
    peers: PeerLink
    records: SubmitterSettings
    node: SubmitterNode
    health: Health
    ledger: NodeLedger | None = None
    capacity_changed: Callable[[], trio.Event] | None = None
    logger: ClassVar[logging.Logger] = get_logger("submitter")

    def __post_init__(self) -> None:
        #: Called with each task of this node as it ends (``/metrics``' task durations).
        self.finished_listeners: list[Callable[[Task], None]] = []
        self.controls: dict[str, Control] = {}
        self._nursery: trio.Nursery | None = None

    # -- records --------------------------------------------------------------------------

    def record(self, task_id: str) -> TaskRecord:
        found = self.tasks.get(task_id)
        if found is None:
            raise NotFound(f"no task {task_id} on this node", code="unknown_task")
        return found

    def load(self, task_id: str) -> Task:
        return self.record(task_id).task

    def _now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def _save(self, record: TaskRecord) -> None:
        self.tasks.update(record, now_ms=self._now_ms())

    def apply(self, task_id: str, event: TaskEvent, *, lease: LeaseView | None = None) -> Task:
        """Apply ``event`` and persist the new record (with what ``lease`` granted) before
        anyone acts."""
        record = self.record(task_id)
        task = record.task
        new = task.apply(event, now_wall_ms=self._now_ms())
        record = replace(record, task=new)
        if lease is not None:
            record = record.with_lease(lease.lease.lease_id, grant_of(lease))
        self._save(record)
        control = self.controls.get(task_id)
        if control is not None:
            if new.state != task.state or len(new.attempts) != len(task.attempts):
                control.waiting = None
            control.changed.set()
            control.changed = trio.Event()
        # One line per transition, with the codes the record keeps (issue 15).
        fields = task_transition_fields(task, new, event_key(task, event))
        if fields is not None:
            log(self.logger, logging.INFO, TASK_TRANSITION, **fields)
        if new.terminal and not task.terminal:
            for listener in self.finished_listeners:
                listener(new)
        return new

    def request_number(self, task_id: str, kind: RequestKind) -> int:
        """The attempt number for a lease request of ``kind``, durable before the request
        leaves (:meth:`~populi_peer.core.tasks.Task.request_number`)."""
        record = self.record(task_id)
        task, number = record.task.request_number(kind)
        if task is not record.task:
            self._save(replace(record, task=task))
        return number

    def request_settled(self, task_id: str) -> None:
        """A lease was obtained, or the number was refused: the next request takes a new
        number."""
        record = self.record(task_id)
        task = record.task.request_settled()
        if task is not record.task:
            self._save(replace(record, task=task))

    # -- gates ----------------------------------------------------------------------------

    def ttl_s(self) -> float:
        return float(min(self.records.settings["max_lease_ttl_s"], DEFAULT_TTL_S))

    # -- submission -----------------------------------------------------------------------

    def submit(self, body: TaskSubmitRequest, *, caller: str | None = None) -> Task:
        node = None if body.node is None else self.node.resolve_node(body.node)
        work_class = body.chosen_work_class()
        task = Task.new(
            new_task_id(),
            command=body.command,
            env=body.env,
            gpus_wanted=body.gpus,
            work_class=work_class,
            created_wall_ms=self._now_ms(),
            options=TaskOptions(
                no_fallback=body.no_fallback,
                queue_timeout_s=body.queue_timeout_s,
                timeout_s=body.timeout_s,
                node=node,
                node_fallback=body.node_fallback,
                cwd=body.cwd,
                gpu_mem_bytes=body.gpu_mem_bytes,
                gpu_model=body.gpu_model,
            ),
        )
        self.tasks.insert(TaskRecord(task, submitted_by=caller), now_ms=self._now_ms())
        log(
            self.logger,
            logging.INFO,
            "task submitted",
            task_id=task.task_id,
            gpus=body.gpus,
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
        health = self.health
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
            # The result may have come in while the attempt was being stopped.
            if not self.load(task_id).terminal:
                self.apply(task_id, Cancel(actor=control.cancel_actor))
            return True
        if self._run_timed_out(task):
            await self._stop_current(task, "timeout")
            if not self.load(task_id).terminal:
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
            self.health.ok("submitter")
        return True

    def _run_timed_out(self, task: Task) -> bool:
        timeout = task.options.timeout_s
        return timeout is not None and self._now_ms() >= task.created_wall_ms + timeout * 1000

    def _queue_deadline_passed(self, task: Task) -> bool:
        queue = task.options.queue_timeout_s
        return queue is None or self._now_ms() >= task.created_wall_ms + queue * 1000

    async def _pause(
        self, control: Control, seconds: float, *, also: trio.Event | None = None
    ) -> None:
        """Wait ``seconds``, or until the task is poked (or ``also`` is set)."""
        with trio.move_on_after(seconds):
            if also is None:
                await control.wake.wait()
                return
            async with trio.open_nursery() as nursery:

                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, control.wake)
                nursery.start_soon(until, also)

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

    async def _refused(
        self,
        task: Task,
        control: Control,
        ask: Ask,
        exc: PopuliError,
        *,
        node: str | None = None,
        placement_reasons: tuple[str, ...] = (),
    ) -> None:
        """Carry out what the core decides after ``ask`` failed with ``exc``
        (:func:`~populi_peer.core.refusals.decide_refusal`)."""
        refusal = refusal_of(exc)
        decision: Decision = decide_refusal(
            task,
            ask,
            refusal,
            local_node=self.node_id,
            queue_deadline_passed=self._queue_deadline_passed(task),
            node=node,
            placement_reasons=placement_reasons,
            claim_basis=self.claim_basis(task) if self.ledger is not None else None,
        )
        if decision.settle:
            self.request_settled(task.task_id)
        if decision.avoid is not None:
            control.tried.add(decision.avoid)
        if decision.event is not None:
            self.apply(task.task_id, decision.event)
        if decision.claim:
            await self._claim_local(task, control, placement_reasons)
            return
        if decision.wait_s or self.load(task.task_id).state == "fallback_pending":
            self._wait_for(control, refusal.reasons, exc)
        if decision.wait_s:
            log(
                self.logger,
                logging.INFO,
                "waiting before asking the control plane again",
                task_id=task.task_id,
                request=ask,
                reasons=list(refusal.reasons) or [exc.code],
                wait_s=decision.wait_s,
            )
            await self._pause(control, decision.wait_s)

    def claim_basis(self, task: Task, *, fallback: bool = False) -> ClaimBasis | None:
        """Why a local attempt of ``task`` may claim this node's GPUs without a control
        plane (the core's rule), if it may; ``fallback``: the attempt follows the control
        plane's confirmation that the remote lease is dead."""
        return claim_basis(
            remote_enabled=self.node.remote_enabled(),
            pinned_to=task.options.node,
            local_node=self.node_id,
            fallback_confirmed=fallback,
        )

    def _wait_for(self, control: Control, reasons: tuple[str, ...], exc: PopuliError) -> None:
        """Note what the task waits for (``task show``'s ``waiting``)."""
        reason = reasons[0] if reasons else CONTROL_PLANE_UNREACHABLE
        wait_s = exc.details.get("wait_s")
        now = self._now_ms()
        until = (
            now + int(float(wait_s) * 1000)
            if isinstance(wait_s, (int, float)) and not isinstance(wait_s, bool) and wait_s >= 0
            else None
        )
        since = control.waiting.since_wall_ms if control.waiting is not None else now
        if control.waiting is not None and control.waiting.reason != reason:
            since = now
        control.waiting = TaskWaiting(reason=reason, until_wall_ms=until, since_wall_ms=since)

    async def _claim_local(self, task: Task, control: Control, reasons: tuple[str, ...]) -> None:
        """No control plane answers and the task may run here without one (ADR 0015):
        claim this node's GPUs in one transaction with the attempt it starts, then place
        the task here. No free GPU: wait and look again."""
        assert self.ledger is not None
        attempt = len(task.attempts) + 1
        plan = AttemptPlan(
            task_id=task.task_id,
            attempt=attempt,
            role="local",
            submitter=self.node_id,
            token=NO_LEASE_TOKEN,
            lease_id=None,
            ttl_s=None,
            renewable=False,
            argv=task.command,
            env=task.env_dict,
            gpus=(),
            work_class=task.work_class,
        )

        def record(claim: Claim) -> None:
            claimed = replace(plan, gpus=claim.gpus, claim_id=claim.claim_id)
            self.runner.save(claimed, "running", claim=claim)

        claim = self.ledger.claim(
            task_id=task.task_id,
            attempt=attempt,
            gpus_wanted=task.gpus_wanted,
            verified=frozenset(self.node.verified_gpu_uuids()),
            now_ms=self._now_ms(),
            record=record,
        )
        if claim is None:
            control.waiting = TaskWaiting(
                reason=NO_FREE_GPU,
                until_wall_ms=None,
                since_wall_ms=self._now_ms(),
            )
            await self._pause(control, WAIT_FOR_LOCAL_GPU_S)
            return
        log(
            self.logger,
            NOTICE,
            "no control plane answers: this node's GPUs claimed locally",
            task_id=task.task_id,
            gpus=list(claim.gpus),
        )
        self.apply(
            task.task_id,
            PlacedLocal(
                node=self.node_id,
                reasons=(*reasons, CONTROL_PLANE_UNREACHABLE, "claimed_locally"),
            ),
        )

    # -- control plane calls --------------------------------------------------------------

    def _check_lease(
        self, view: LeaseView, *, task_id: str, attempt: int | None = None, holder: str
    ) -> Lease:
        """The lease an answer carries, if it is the one asked for (this task, this
        request's attempt, the holder named, submitted by this node); otherwise the answer
        is malformed (``bad_peer_answer``): the request may have happened, nothing more."""
        lease = view.lease
        if (
            lease.task_id != task_id
            or lease.holder != holder
            or lease.submitter != self.node_id
            or (attempt is not None and lease.attempt != attempt)
        ):
            raise PeerError(
                f"the control plane answered for lease {lease.lease_id} (task "
                f"{lease.task_id}, attempt {lease.attempt}, holder {lease.holder}), not the "
                f"one asked for (task {task_id}, attempt {attempt}, holder {holder})",
                code="bad_peer_answer",
                peer=self.control_plane.id,
            )
        return lease

    async def candidates(
        self, *, gpu_facts: bool = False, want_facts: bool = False
    ) -> list[CandidateView]:
        """The remote nodes as the control plane lists them; with ``gpu_facts`` each with
        its GPUs as the control plane holds them, so that placement can judge memory,
        model and health (:func:`~populi_peer.core.placement.gpu_misfits`). With
        ``want_facts`` only, the facts are used when they can be had, counts otherwise."""
        answer = await self.control_plane.call(
            method="GET", path="/v1/populi/nodes", answer=NodesAnswer
        )
        facts: dict[str, tuple[GpuHint, ...]] | None = None
        if gpu_facts or want_facts:
            try:
                gpus = await self.control_plane.call(
                    method="GET", path="/v1/populi/gpus", answer=GpusAnswer
                )
                facts = {n.node_id: tuple(d.hint() for d in n.devices) for n in gpus.nodes}
            except PopuliError:
                if gpu_facts:
                    raise
                # Ranking by health only: counts still place the task (placement v1).
        out = []
        for node in answer.nodes:
            if node.id == self.node_id:
                continue
            host = None
            if node.address:
                try:
                    host = parse_host_port(node.address)[0]
                except ValueError:
                    host = None
            works = "worker" in node.roles
            devices = None if facts is None else facts.get(node.id, ())
            free = node.gpu_summary.allocatable if node.gpu_summary else 0
            out.append(
                CandidateView(
                    node_id=node.id,
                    eligible=node.eligible and works and node.accepts_remote_work is not False,
                    free_gpus=free if devices is None else sum(g.allocatable for g in devices),
                    gpus=devices,
                    scope=self._scope(host, node.scope),
                    reasons=tuple(node.ineligible_reasons)
                    or (() if works else ("not_a_worker",))
                    or (("remote_off_on_node",) if node.accepts_remote_work is False else ()),
                )
            )
        return out

    def _scope(self, host: str | None, seen_by_control_plane: Scope | None) -> Scope:
        """The path's scope by this node's CIDR config when the node is listed by IP
        address; a node listed by name (DNS, mDNS) is as close as the control plane's
        heartbeats saw it (overlay when they did not say)."""
        try:
            parse_address(host or "")
        except PopuliError:
            return seen_by_control_plane or "overlay"
        return self.node.scope_of(host)

    # -- placing --------------------------------------------------------------------------

    async def _place(self, task: Task, control: Control) -> None:
        task_id = task.task_id
        if not self.node.remote_enabled():
            # kill_switch when that is why (it wins over everything), else remote_disabled.
            reasons: tuple[str, ...] = (remote_refusal(self.records.settings) or "remote_disabled",)
            if 0 < task.gpus_wanted <= len(self.node.verified_gpu_uuids()):
                # Nothing leaves this node, but its GPUs are still taken under a `local`
                # lease: two tasks never share one, and the lease names which to use.
                await self._place_local(task, control, reasons)
                return
            if task.gpus_wanted:
                reasons += ("no_local_gpu",)
            self.apply(task_id, PlacedLocal(node=self.node_id, reasons=reasons))
            return
        if task.options.node == self.node_id:
            # Pinned to this node: no node list to ask for (and no control plane needed
            # to run here: ADR 0015).
            await self._place_local(task, control, ("node_pinned_local",))
            return
        # Taken before the candidates are read: a change meanwhile still wakes the wait.
        changed = None if self.capacity_changed is None else self.capacity_changed()
        try:
            candidates = await self.candidates(
                gpu_facts=placement_task(task).constrains_gpus, want_facts=task.gpus_wanted > 0
            )
        except PopuliError as exc:
            await self._refused(task, control, "nodes", exc)
            return
        queueing = task.gpus_wanted > 0 and not self._queue_deadline_passed(task)
        placement = self._placement(task, control, candidates, queueing=queueing)
        if placement.where == "remote":
            assert placement.node is not None
            await self._grant_remote(
                task, control, placement.node, placement.reasons, placement.rejected
            )
            return
        reasons = placement.reasons
        control.rejected = placement.rejected
        if queueing:
            # --queue-timeout: wait for a free GPU before falling back; re-placed when
            # capacity changes (the hints wake the wait), else looked at again each second.
            control.tried.clear()
            control.queued, control.queued_for = True, placement.waiting_for
            if control.waiting is None or control.waiting.reason != NO_FREE_GPU:
                control.waiting = TaskWaiting(
                    reason=NO_FREE_GPU, until_wall_ms=None, since_wall_ms=self._now_ms()
                )
            await self._pause(control, QUEUE_RETRY_S, also=changed)
            return
        if not task.options.allows_local(self.node_id):
            # --no-fallback, or --node naming another node: it fails here, nothing taken.
            self.apply(
                task_id,
                PlacedLocal(node=self.node_id, reasons=reasons, rejected=placement.rejected),
            )
            return
        await self._place_local(task, control, reasons)

    def _placement(
        self,
        task: Task,
        control: Control,
        candidates: list[CandidateView],
        *,
        queueing: bool,
    ) -> Placement:
        """The core's placement of ``task``; for a task already queued, its re-placement
        (:func:`~populi_peer.core.placement.replan_queued`), recorded in the task's
        decision log (``replanned`` and the reason) when it goes to a node or waits on."""
        ptask = placement_task(task)
        gates = gates_enabled(self.records.settings)
        avoid = frozenset(control.tried)
        if not control.queued:
            return propose(
                ptask,
                candidates,
                remote_enabled=True,
                local_node=self.node_id,
                gates_enabled=gates,
                avoid=avoid,
            )
        decision = replan_queued(
            ptask,
            control.queued_for,
            candidates,
            local_node=self.node_id,
            gates_enabled=gates,
            avoid=avoid,
        )
        placement = decision.placement
        if decision.reason is not None and (placement.where == "remote" or queueing):
            remote = placement.where == "remote"
            self.apply(
                task.task_id,
                Replanned(
                    reason=decision.reason,
                    waited_for=control.queued_for,
                    waiting_for=None if remote else placement.waiting_for,
                    node=placement.node if remote else None,
                ),
            )
            control.queued_for = placement.node if remote else placement.waiting_for
        return placement

    async def _grant_remote(
        self,
        task: Task,
        control: Control,
        node: str,
        reasons: tuple[str, ...],
        rejected: Rejected = (),
    ) -> None:
        task_id = task.task_id
        attempt = self.request_number(task_id, "grant")
        request = LeaseGrantRequest(
            task_id=task_id,
            attempt=attempt,
            work_class=task.work_class,
            target=node,
            gpus_wanted=task.gpus_wanted,
            ttl_s=self.ttl_s(),
            previous_node=previous_node(task),
            gpu_mem_bytes=task.options.gpu_mem_bytes,
            gpu_model=task.options.gpu_model,
        )
        try:
            view = await self._grant(request)
            lease = self._check_lease(view, task_id=task_id, attempt=attempt, holder=node)
        except PopuliError as exc:
            await self._refused(task, control, "grant", exc, node=node)
            return
        self.request_settled(task_id)
        self.apply(
            task_id,
            PlacedRemote(
                node=node,
                lease_id=lease.lease_id,
                token=lease.token,
                reasons=reasons,
                rejected=rejected,
            ),
            lease=view,
        )

    async def _place_local(self, task: Task, control: Control, reasons: tuple[str, ...]) -> None:
        """A first local attempt (remote execution on, or off for a GPU task): take its
        token (and its GPUs, if any) from the control plane, so this node's GPUs are never
        leased out too, nor given to two local tasks."""
        try:
            view = await self._local_token(task)
        except PopuliError as exc:
            await self._refused(task, control, "local", exc, placement_reasons=reasons)
            return
        self.apply(
            task.task_id,
            PlacedLocal(
                node=self.node_id,
                reasons=reasons,
                lease_id=view.lease.lease_id,
                token=view.lease.token,
                rejected=control.rejected,
            ),
            lease=view,
        )

    async def _local_token(self, task: Task) -> LeaseView:
        attempt = self.request_number(task.task_id, "local")
        view: LeaseView
        if task.gpus_wanted > 0:
            view = await self._grant(
                LeaseGrantRequest(
                    task_id=task.task_id,
                    attempt=attempt,
                    work_class=task.work_class,
                    target=self.node_id,
                    gpus_wanted=task.gpus_wanted,
                    ttl_s=self.ttl_s(),
                    previous_node=previous_node(task),
                )
            )
        else:
            view = (await self._confirm_fallback(task, attempt, gpus_wanted=0)).lease
        self._check_lease(view, task_id=task.task_id, attempt=attempt, holder=self.node_id)
        self.request_settled(task.task_id)
        return view

    async def _grant(self, request: LeaseGrantRequest) -> LeaseView:
        """The lease the control plane grants for ``request`` (a replay of the same
        request number answers the same lease)."""
        answer = await self.control_plane.call(
            method="POST", path="/v1/populi/exec/leases", payload=request, answer=LeaseReplayAnswer
        )
        return answer.lease

    async def _confirm_fallback(
        self, task: Task, attempt: int, *, gpus_wanted: int
    ) -> LeaseFallbackAnswer:
        """The control plane's lease for a local attempt of ``task`` with
        ``gpus_wanted`` of this node's GPUs, once any lease before it is dead."""
        return await self.control_plane.call(
            method="POST",
            path="/v1/populi/exec/fallback",
            payload=LeaseFallbackRequest(
                task_id=task.task_id,
                attempt=attempt,
                gpus_wanted=gpus_wanted,
                ttl_s=self.ttl_s(),
                work_class=task.work_class,
                previous_node=previous_node(task),
            ),
            answer=LeaseFallbackAnswer,
        )

    # -- remote ---------------------------------------------------------------------------

    def handoff_message(self, task: Task) -> InboxMessage:
        attempt = task.current_attempt
        assert attempt is not None and attempt.lease_id is not None
        return handoff_message(
            task,
            self.record(task.task_id).leases.get(attempt.lease_id) or NO_GRANT,
            default_ttl_s=self.ttl_s(),
            settings_serial=self.records.settings_serial,
        )

    async def _deliver(
        self, member: Member, message_id: str, payload: Payload, *, expect: MessageType
    ) -> InboxDeliverAnswer:
        """Deliver ``payload`` to ``member``'s inbox; its answer must be for this message
        (``bad_peer_answer`` otherwise)."""
        node_id = member.id
        answer = await self.peers.call(
            member,
            method="POST",
            path="/v1/populi/inbox",
            payload=InboxMessage(message_id=message_id, payload=payload),
            answer=InboxDeliverAnswer,
        )
        if answer.type != expect or answer.message_id != message_id:
            raise PeerError(
                f"{node_id} answered {expect} {message_id} with {answer.type} "
                f"{answer.message_id[:64]!r}",
                code="bad_peer_answer",
                peer=node_id,
            )
        return answer

    async def _remote(self, task: Task, control: Control) -> None:
        attempt = task.current_attempt
        assert attempt is not None
        if attempt.n not in control.handed_off:
            worker = await self.peers.member(attempt.node)
            if worker is None:
                self.apply(
                    task.task_id, HandoffFailed(reason="worker_unknown", detail=attempt.node)
                )
                return
            try:
                message = self.handoff_message(task)
                await self._deliver(worker, message.message_id, message.payload, expect="handoff")
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
        await self._check_current_lease(task, control)

    def _check_interval(self, task: Task) -> float:
        attempt = task.current_attempt
        ttl = self.ttl_s()
        if attempt is not None and attempt.lease_id:
            grant = self.record(task.task_id).leases.get(attempt.lease_id)
            if grant is not None and grant.ttl_s:
                ttl = grant.ttl_s
        return max(0.5, min(ttl / 3, 5.0))

    async def _lease(
        self, task: Task, control: Control, lease_id: str, holder: str
    ) -> Lease | None:
        """``lease_id`` as the control plane holds it (the answer must be about that
        lease, of this task); ``None`` when it could not be learnt (the failure carried
        out as a ``lease_check`` refusal)."""
        try:
            answer = await self.control_plane.call(
                method="GET", path=f"/v1/populi/exec/leases/{lease_id}", answer=LeaseAnswer
            )
            lease = self._check_lease(answer.lease, task_id=task.task_id, holder=holder)
            if lease.lease_id != lease_id:
                raise PeerError(
                    f"the control plane answered for lease {lease.lease_id}, not {lease_id}",
                    code="bad_peer_answer",
                    peer=self.control_plane.id,
                )
        except PopuliError as exc:
            await self._refused(task, control, "lease_check", exc)
            return None
        return lease

    async def _check_current_lease(self, task: Task, control: Control) -> None:
        attempt = task.current_attempt
        assert attempt is not None and attempt.lease_id is not None
        lease = await self._lease(task, control, attempt.lease_id, attempt.node)
        if lease is not None and lease.state in DEAD_STATES:
            # The holder's own word on the lease (it left: the result may still be on its
            # way), else how the lease died.
            await self._fallback(self.load(task.task_id), control, reason=lease.fallback_reason)

    async def _await_word(self, task: Task, control: Control) -> None:
        await self._pause(control, self._check_interval(task))
        task = self.load(task.task_id)
        if task.state != "fallback_pending":
            return
        await self._fallback(task, control, reason=task.lost_reason() or "")

    async def _fallback(self, task: Task, control: Control, *, reason: str) -> None:
        """Ask the control plane for its word that the lease is dead, with a higher token.

        The local attempt takes this node's GPUs when it has enough (a ``local`` lease).
        A node with fewer GPUs than the task wants (a CPU-only laptop) runs it without
        any, reason ``no_local_gpu``: the task finishes here instead, as a CPU run.
        With ``--no-fallback`` (or ``--node`` naming another node, without
        ``--node-fallback``) only the word is wanted: no GPU is taken, and the fence that
        records the token is released at once."""
        current = task.current_attempt
        runs_here = task.options.allows_local(self.node_id)
        if not runs_here and current is not None and current.lease_id and current.token is not None:
            # --no-fallback: the control plane's word that the lease is dead is all that
            # is wanted; nothing new is leased.
            held = await self._lease(task, control, current.lease_id, current.node)
            if held is not None and held.state in DEAD_STATES:
                self.apply(
                    task.task_id,
                    LeaseDeadConfirmed(
                        node=self.node_id,
                        token=current.token,
                        lease_id=None,
                        reasons=(held.fallback_reason,),
                    ),
                )
            return
        attempt = self.request_number(task.task_id, "fallback")
        local_gpus = task.gpus_wanted
        extra_reasons: tuple[str, ...] = ()
        if not runs_here:
            local_gpus = 0
        elif task.gpus_wanted > len(self.node.verified_gpu_uuids()):
            local_gpus = 0
            extra_reasons = ("no_local_gpu",)
        try:
            answer = await self._confirm_fallback(task, attempt, gpus_wanted=local_gpus)
            lease = self._check_lease(
                answer.lease, task_id=task.task_id, attempt=attempt, holder=self.node_id
            )
        except PopuliError as exc:
            await self._refused(task, control, "fallback", exc)
            return
        self.request_settled(task.task_id)
        prior = answer.prior.lease if answer.prior is not None else None
        # The kill switch revoked the lease: say so beside how it died.
        stopped_by = (prior.reason,) if prior and prior.reason in STOPPING_REFUSALS else ()
        why = (
            tuple(r for r in (reason or (prior.fallback_reason if prior else ""),) if r)
            + stopped_by
            + extra_reasons
        )
        if not runs_here:
            plan = AttemptPlan(
                task_id=task.task_id,
                attempt=attempt,
                role="local",
                submitter=self.node_id,
                token=lease.token,
                lease_id=lease.lease_id,
                ttl_s=None,
                renewable=False,
                argv=task.command,
                env={},
                gpus=(),
                work_class=task.work_class,
            )
            await self.runner.release(plan, "stopped")
        self.apply(
            task.task_id,
            LeaseDeadConfirmed(
                node=self.node_id, token=lease.token, lease_id=lease.lease_id, reasons=why
            ),
            lease=answer.lease,
        )

    # -- local ----------------------------------------------------------------------------

    def local_plan(self, task: Task) -> AttemptPlan:
        attempt = task.current_attempt
        assert attempt is not None
        grant = self.record(task.task_id).leases.get(attempt.lease_id or "") or NO_GRANT
        return AttemptPlan(
            task_id=task.task_id,
            attempt=attempt.n,
            role="local",
            submitter=self.node_id,
            token=attempt.token if attempt.token is not None else NO_LEASE_TOKEN,
            lease_id=attempt.lease_id,
            ttl_s=grant.ttl_s or None,
            renewable=grant.kind == "local",
            argv=task.command,
            env=task.env_dict,
            gpus=grant.gpus,
            work_class=task.work_class,
            cwd=task.options.cwd,
            lease_attempt=grant.attempt,
            # ADR 0015: a local lease whose renewals go unanswered becomes a claim.
            may_claim=self.ledger is not None
            and grant.kind == "local"
            and self.claim_basis(task, fallback="lease_dead_confirmed" in attempt.placement_reasons)
            is not None,
        )

    async def _local(self, task: Task, control: Control) -> None:
        runner = self.runner
        plan = self.local_plan(task)
        key = (plan.task_id, plan.attempt, "local")
        row = runner.row(plan.task_id, plan.attempt, "local")
        claimed = row is not None and bool(row.body.get("claim_id"))
        if row is not None and claimed:
            # Started under a node-local claim (ADR 0015): its plan names the GPUs.
            plan = AttemptPlan.from_json(row.body)
        if row is not None and row.state == "finished":
            result = stored_result(row)
        else:
            result_box: list[ResultMessage] = []
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    running = runner.running.get(key)
                    if running is not None:  # re-adopted after a restart
                        await running.done.wait()
                        done_row = runner.row(plan.task_id, plan.attempt, "local")
                        assert done_row is not None
                        result_box.append(stored_result(done_row))
                    else:
                        if not claimed:
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

    def _record_result(self, task_id: str, result: ResultMessage) -> None:
        self._save(self.record(task_id).with_result(result))

    async def _apply_result(self, task: Task, message: ResultMessage) -> None:
        result = message.result
        outcome = result.outcome
        token = (
            result.token if result.token is not None and result.token != NO_LEASE_TOKEN else None
        )
        attempt = result.attempt
        if task.terminal:
            return
        current = task.current_attempt
        is_current = current is not None and current.n == attempt
        control = self.controls.get(task.task_id)
        cancelling = control is not None and control.cancel_actor is not None
        if (
            outcome == "cancelled"
            and result.detail == WORKER_LEFT
            and result.role != "local"
            and not cancelling
        ):
            # The worker left the cluster: it stopped the attempt and released the lease.
            # Not a cancel: the task falls back (fallback_pending, then the word).
            if is_current and task.state == "running_remote":
                self.apply(
                    task.task_id,
                    LeaseLost(reason=WORKER_LEFT, detail="the worker left the cluster"),
                )
            return
        if outcome == "cancelled":
            actor = (
                control.cancel_actor
                if control and control.cancel_actor
                else result.detail or "cancelled"
            )
            if is_current:
                if result.detail == "timeout" or self._run_timed_out(task):
                    self.apply(task.task_id, Timeout(which="run"))
                else:
                    self.apply(task.task_id, Cancel(actor=actor))
            return
        if outcome in ("lease_lost", "lost"):
            if is_current and task.state in ("running_remote", "running_local"):
                self.apply(task.task_id, LeaseLost(reason=result.detail or outcome, detail=outcome))
            return
        if outcome == "populi_failure":
            if is_current:
                self.apply(
                    task.task_id,
                    PopuliFailure(code="populi_failure", detail=(result.detail or "")[:200]),
                )
            return
        if current is not None and current.token is None:
            token = None
        self.apply(
            task.task_id,
            Result(attempt=attempt, token=token, exit_code=result.exit_code, signal=result.signal),
        )

    async def _stop_current(self, task: Task, why: str) -> None:
        attempt = task.current_attempt
        if attempt is None:
            return
        if attempt.where == "local":
            self.runner.request_cancel(task.task_id, attempt.n, "local", why)
            return
        worker = await self.peers.member(attempt.node)
        if worker is None:
            return
        try:
            await self._deliver(
                worker,
                f"cancel-{task.task_id}-{attempt.n}",
                CancelMessage(task_id=task.task_id, attempt=attempt.n, reason=why),
                expect="cancel",
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

    async def on_result(self, caller: Principal, message: ResultMessage) -> ResultAnswer:
        task_id, attempt = message.result.task_id, message.result.attempt
        task = self.load(task_id)
        match = next((a for a in task.attempts if a.n == attempt), None)
        if match is None or match.where != "remote" or match.node != caller.id:
            raise Forbidden(
                f"{caller.id} ran no attempt {attempt} of task {task_id}", code="not_attempt_holder"
            )
        # The node that ran it is the signer, whatever the message says.
        message = replace(message, result=replace(message.result, node=caller.id))
        if task.terminal or message.result.token != match.token:
            # Late or for an older token: kept apart, never over the accepted record.
            self._save(self.record(task_id).with_ignored(message))
            try:
                await self._apply_result(self.load(task_id), message)
            except IllegalTaskTransition:
                pass
            return ResultAnswer(accepted=False, state=self.load(task_id).state)
        self._record_result(task_id, message)
        before = self.load(task_id).state
        try:
            await self._apply_result(self.load(task_id), message)
        except IllegalTaskTransition:
            # Recorded above; it no longer applies to the task as it stands (stale or
            # late): acknowledged, so the worker stops retrying, and ignored.
            pass
        after = self.load(task_id)
        control = self.controls.get(task_id)
        if control is not None:
            control.poke()
        return ResultAnswer(accepted=after.state != before, state=after.state)

    # -- API ------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        route = Route
        return [
            route("POST", "/v1/populi/tasks", self._submit, SUBMIT, "task_submit"),
            route("GET", "/v1/populi/tasks", self._list, TASK_READERS, "task_list"),
            route("GET", "/v1/populi/tasks/{task_id}", self._show, TASK_READERS, "task_show"),
            route(
                "POST",
                "/v1/populi/tasks/{task_id}/cancel",
                self._cancel,
                TASK_READERS,
                "task_cancel",
            ),
            route(
                "GET",
                "/v1/populi/tasks/{task_id}/output",
                self._output,
                TASK_READERS,
                "task_output",
            ),
        ]

    def task_view(self, task_id: str) -> TaskView:
        record = self.record(task_id)
        control = self.controls.get(task_id)
        return TaskView.of(
            record.task,
            # Without the output tails (the output routes give those).
            results={n: r.result for n, r in record.results.items()},
            leases=record.leases,
            exit_status=exit_status(record.task),
            active=task_id in self.controls,
            waiting=None if control is None or record.task.terminal else control.waiting,
        )

    async def _submit(self, request: Request) -> TaskAnswer:
        self._local_only(request)
        task = self.submit(request.message(TaskSubmitRequest), caller=request.caller.id)
        return TaskAnswer(task=self.task_view(task.task_id))

    def _local_only(self, request: Request) -> None:
        caller = request.caller
        if caller.id != self.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "tasks are submitted to and read from the node's own agent", code="role_required"
            )

    async def _list(self, request: Request) -> TaskListAnswer:
        self._local_only(request)
        limit = request.query_int("limit", 100, minimum=1, maximum=1000)
        state = request.query_one("state")
        if state is not None and state not in TASK_STATES:
            raise BadRequest(
                f"unknown task state {state[:64]!r}; one of: {', '.join(TASK_STATES)}",
                code="unknown_task_state",
            )
        task_ids = self.tasks.newest(limit=limit, state=state)
        return TaskListAnswer(tasks=tuple(self.task_view(task_id) for task_id in task_ids))

    async def _show(self, request: Request) -> TaskAnswer:
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
        return TaskAnswer(task=self.task_view(task_id))

    async def _cancel(self, request: Request) -> TaskCancelAnswer:
        self._local_only(request)
        task_id = request.path_params["task_id"]
        task = self.load(task_id)
        if task.terminal:
            return TaskCancelAnswer(task=self.task_view(task_id), cancelled=False)
        control = self.controls.get(task_id)
        if control is None:
            self.apply(task_id, Cancel(actor=request.caller.id))
        else:
            control.cancel_actor = request.caller.id
            control.poke()
            self.runner.request_cancel(task_id, len(task.attempts), "local", "cancelled")
            with trio.move_on_after(30):
                while not self.load(task_id).terminal:
                    await control.changed.wait()
        return TaskCancelAnswer(task=self.task_view(task_id), cancelled=True)

    async def _output(self, request: Request) -> TaskOutputAnswer:
        self._local_only(request)
        task_id = request.path_params["task_id"]
        record = self.record(task_id)
        task = record.task
        stream = request.query_one("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise BadRequest("stream must be stdout or stderr", code="bad_request")
        offset = request.query_int("offset", 0, minimum=0)
        limit = request.query_int("limit", 256 * 1024, minimum=1, maximum=1 << 20)
        asked = request.query_int("attempt", 0, minimum=0, maximum=1_000_000)
        params = {"stream": stream, "offset": offset, "limit": limit}
        if asked > len(task.attempts):
            raise BadRequest(
                f"task {task_id} has {len(task.attempts)} attempt(s)", code="bad_request"
            )
        if not task.attempts:
            return TaskOutputAnswer(
                chunk=OutputChunk(data_b64="", next_offset=0, total=0, done=task.terminal),
                attempt=0,
                where=None,
                node=None,
                task_state=task.state,
                latest_attempt=0,
            )
        n = asked or len(task.attempts)
        attempt = task.attempts[n - 1]
        nothing = OutputChunk(data_b64="", next_offset=offset, total=0, done=False)
        chunk = nothing
        result = record.results.get(str(n))
        if result is not None:
            chunk = _from_tail(result, stream, offset, limit)
            if attempt.where == "remote" and _before_tail(result, stream, offset):
                # The result keeps the tail only: the worker keeps the whole output.
                chunk = await self._worker_output(attempt.node, task_id, n, params) or chunk
        elif attempt.where == "local":
            from populi_peer.agent.worker import read_output

            row = self.runner.row(task_id, n, "local")
            if row is not None:
                chunk = read_output(self.runner, row, stream, offset, limit)
        else:
            chunk = await self._worker_output(attempt.node, task_id, n, params) or nothing
        return TaskOutputAnswer(
            chunk=chunk,
            attempt=n,
            where=attempt.where,
            node=attempt.node,
            task_state=task.state,
            latest_attempt=len(task.attempts),
        )

    async def _worker_output(
        self, node: str, task_id: str, n: int, params: dict[str, Any]
    ) -> OutputChunk | None:
        """Attempt ``n``'s output as its worker keeps it (over the signed peer API: the
        answer must come from that node), or None when it cannot be had."""
        worker = await self.peers.member(node)
        if worker is None:
            return None
        try:
            answer = await self.peers.call(
                worker,
                method="GET",
                path=f"/v1/populi/exec/attempts/{task_id}/{n}/output",
                params=params,
                timeout_s=OUTPUT_TIMEOUT_S,
                attempts=1,
                answer=OutputChunkAnswer,
            )
        except PopuliError:
            return None
        return answer.chunk

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
            runner = self.runner

            async def on_result(plan: AttemptPlan, result: ResultMessage) -> None:
                await trio.lowlevel.checkpoint()

            to_resume, _to_start = await runner.recover("local", on_result)
            for plan, execution in to_resume:
                row = runner.row(plan.task_id, plan.attempt, "local")
                started = row.body.get("started_wall_ms", 0) if row else 0
                nursery.start_soon(runner.resume, plan, execution, int(started))
            # Local attempts accepted but never launched are started again by their task's
            # driver (running_local with no finished row), after it renews their lease.
            for task_id in self.tasks.unfinished():
                self._start_driver(task_id)
            task_status.started()
            await trio.sleep_forever()


def handoff_message(
    task: Task, grant: TaskLeaseGrant, *, default_ttl_s: float, settings_serial: int | None
) -> InboxMessage:
    """The handoff of ``task``'s current (remote) attempt, under the lease that granted
    ``grant``; ``settings_serial``: the settings record it was placed under (a worker
    holding an older one fetches the signed record before it decides)."""
    attempt = task.current_attempt
    assert attempt is not None and attempt.token is not None and attempt.lease_id is not None
    return InboxMessage(
        message_id=f"handoff-{task.task_id}-{attempt.n}",
        payload=HandoffMessage(
            task_id=task.task_id,
            lease_id=attempt.lease_id,
            attempt=attempt.n,
            token=attempt.token,
            command=task.command,
            env=task.env_dict,
            gpus=grant.gpus,
            ttl_s=grant.ttl_s or default_ttl_s,
            work_class=task.work_class,
            settings_serial=settings_serial,
            cwd=task.options.cwd,
            lease_attempt=grant.attempt,
        ),
    )


def _before_tail(result: ResultMessage, stream: str, offset: int) -> bool:
    """Does ``offset`` fall before the tail the result kept of ``stream``?"""
    tail = result.stdout_tail_b64 if stream == "stdout" else result.stderr_tail_b64
    kept = len(base64.b64decode(tail or ""))
    total = (result.result.stdout_total if stream == "stdout" else result.result.stderr_total) or 0
    return offset < total - kept


def _from_tail(result: ResultMessage, stream: str, offset: int, limit: int) -> OutputChunk:
    tail = result.stdout_tail_b64 if stream == "stdout" else result.stderr_tail_b64
    data = base64.b64decode(tail or "")
    total_of = result.result.stdout_total if stream == "stdout" else result.result.stderr_total
    total = total_of or len(data)
    first = total - len(data)
    start = max(offset, first)
    piece = data[start - first : start - first + limit]
    return OutputChunk(
        data_b64=base64.b64encode(piece).decode("ascii"),
        next_offset=start + len(piece),
        total=total,
        done=True,
    )


def previous_node(task: Task) -> str | None:
    """Where the task's last attempt was placed, if anywhere: a restarted control plane
    holds its task key until that node reported (ADR 0015)."""
    return task.attempts[-1].node if task.attempts else None


__all__ = [
    "Submitter",
    "SubmitterNode",
    "SubmitterSettings",
    "exit_status",
    "handoff_message",
    "new_task_id",
]
