"""What the submitter does when a request to the control plane fails (safety rules 1, 4, 7).

The submitter asks the control plane five things for a task (:data:`Ask`): the node list
to place it, a remote ``grant``, the ``local`` token of a first local attempt, the
``fallback`` word after a remote attempt, and the state of the current lease
(``lease_check``). A request either gets an answer, or fails in one of two ways
(:class:`Refusal`): the control plane *refused* it (it answered 401/403/404/409, with its
reason codes), or it was *not reached* — unreachable, too slow, or an answer that could not
be read; the request may have happened. :func:`decide_refusal` is the one place that says
what follows, as a :class:`Decision` the shell carries out: an event for the task machine
(:mod:`populi_peer.core.tasks`), a pause before the next look, whether the request number
is settled (:meth:`~populi_peer.core.tasks.Task.request_settled`), and a node to avoid.

====================  ============================  ======================================
request               refused (reasons)             not reached
====================  ============================  ======================================
``nodes``             fail (``PopuliFailure``)      before ``--queue-timeout``: wait 2 s;
                                                    after: a task without GPUs runs here
                                                    (nothing was granted), else it fails
``grant``             wait reasons: wait 1 s;       ``ControlPlaneUnreachable``: the grant
                      ``no_free_gpu`` before        may have happened, wait for the word
                      ``--queue-timeout``: wait
                      0.5 s; else ``GrantRefused``
                      and avoid the node; always
                      settled
``local``             ``stale_attempt``: settle,    no GPUs: run here (nothing can hold a
                      ask again; wait reasons or    lease for it); with a claim basis:
                      ``no_free_gpu`` before        claim this node's GPUs locally (ADR
                      ``--queue-timeout``: wait     0015); else wait 2 s
                      1 s; else ``PlacementFailed``
``fallback``          ``FallbackRefused`` while a   ``ControlPlaneUnreachable`` (once: a
                      remote attempt may run;       task already waiting keeps waiting)
                      ``stale_attempt`` settles
``lease_check``       nothing (look again later)    ``ControlPlaneUnreachable`` (once)
====================  ============================  ======================================

Never a local run after a remote attempt without the control plane's word: an unreached
``grant``, ``fallback`` or ``lease_check`` only ever leads to ``fallback_pending``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from populi_peer.core.claims import ClaimBasis
from populi_peer.core.leases import RESUMPTION_REASONS
from populi_peer.core.tasks import (
    ControlPlaneUnreachable,
    FallbackRefused,
    GrantRefused,
    PlacedLocal,
    PlacementFailed,
    PopuliFailure,
    Task,
    TaskEvent,
)
from populi_peer.errors import BadRequest

#: What the submitter asks the control plane for a task.
Ask = Literal["nodes", "grant", "local", "fallback", "lease_check"]
ASKS: Final[tuple[Ask, ...]] = get_args(Ask)

#: Refusals that are nobody's fault, the node's nor the task's: the control plane just
#: restarted and grants on a node only once that node (or the task's previous node)
#: reported to it (safety rule 5, ADR 0015). Wait and ask again.
WAIT_REASONS: Final = RESUMPTION_REASONS
#: The attempt number was used already: take a new one and ask again.
STALE_ATTEMPT: Final = "stale_attempt"
NO_FREE_GPU: Final = "no_free_gpu"
CONTROL_PLANE_UNREACHABLE: Final = "control_plane_unreachable"
#: How long the submitter waits before it asks again, by why it waits.
WAIT_FOR_HOLD_S: Final = 1.0
WAIT_FOR_GPU_S: Final = 0.5
WAIT_FOR_LOCAL_GPU_S: Final = 1.0
WAIT_FOR_CONTROL_PLANE_S: Final = 2.0
#: The longest detail kept in a task's decision log.
MAX_DETAIL_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class Refusal:
    """How one request failed: ``reached`` — the control plane answered and refused, with
    ``reasons`` (never empty); otherwise it was not reached (or its answer could not be
    read) and ``reasons`` is empty. ``detail`` is one line for the decision log."""

    reached: bool
    reasons: tuple[str, ...] = ()
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reached != bool(self.reasons):
            raise BadRequest(
                "a refusal has reasons exactly when the control plane answered",
                code="bad_request",
            )
        if not all(isinstance(r, str) and r for r in self.reasons):
            raise BadRequest("refusal reasons are non-empty strings", code="bad_request")

    @classmethod
    def refused(cls, reasons: Iterable[str], detail: str = "") -> Refusal:
        return cls(True, tuple(reasons), detail[:MAX_DETAIL_CHARS])

    @classmethod
    def unreached(cls, detail: str = "") -> Refusal:
        return cls(False, (), detail[:MAX_DETAIL_CHARS])


@dataclass(frozen=True, slots=True)
class Decision:
    """What the submitter does after a failed request, in this order: settle the request
    number (``settle``), remember not to place on ``avoid`` again, apply ``event`` to the
    task, then pause ``wait_s`` before it looks again. ``claim``: claim this node's GPUs
    locally and run the task here (:mod:`populi_peer.core.claims`; a pause if they are
    not free)."""

    event: TaskEvent | None = None
    wait_s: float = 0.0
    settle: bool = False
    avoid: str | None = None
    claim: bool = False


def decide_refusal(
    task: Task,
    ask: Ask,
    refusal: Refusal,
    *,
    local_node: str,
    queue_deadline_passed: bool,
    node: str | None = None,
    placement_reasons: tuple[str, ...] = (),
    claim_basis: ClaimBasis | None = None,
) -> Decision:
    """What follows when ``ask`` for ``task`` failed with ``refusal`` (the table above).
    ``node``: the grant's target; ``placement_reasons``: why a local attempt was chosen;
    ``queue_deadline_passed``: ``--queue-timeout`` is over (or was never given);
    ``claim_basis``: why a local attempt may claim this node's GPUs without a control
    plane (:func:`~populi_peer.core.claims.claim_basis`), if it may."""
    if ask not in ASKS:
        raise BadRequest(f"unknown request {ask!r}", code="bad_request")
    reasons = set(refusal.reasons)
    waits_for_gpu = NO_FREE_GPU in reasons and not queue_deadline_passed
    if ask == "nodes":
        if refusal.reached:
            return Decision(PopuliFailure(code=refusal.reasons[0], detail=refusal.detail))
        if not queue_deadline_passed:
            return Decision(wait_s=WAIT_FOR_CONTROL_PLANE_S)
        if task.gpus_wanted == 0 and task.options.allows_local(local_node):
            # Nothing was ever granted: running here cannot be running twice.
            return Decision(
                PlacedLocal(node=local_node, reasons=(CONTROL_PLANE_UNREACHABLE,)),
            )
        return Decision(
            PlacementFailed(reasons=(CONTROL_PLANE_UNREACHABLE,), detail=refusal.detail)
        )
    if ask == "grant":
        if not refusal.reached:
            # The answer was lost: the grant may have happened. Wait for the word.
            return Decision(ControlPlaneUnreachable(detail=f"grant: {refusal.detail}"[:200]))
        if reasons & WAIT_REASONS:
            return Decision(wait_s=WAIT_FOR_HOLD_S, settle=True)
        if waits_for_gpu:
            # --queue-timeout: the GPU is busy for now; keep trying (even with
            # --no-fallback, which only decides what happens when time is up).
            return Decision(wait_s=WAIT_FOR_GPU_S, settle=True)
        if node is None:
            raise BadRequest("a grant's refusal names its target node", code="bad_request")
        return Decision(GrantRefused(node=node, reasons=refusal.reasons), settle=True, avoid=node)
    if ask == "local":
        if not refusal.reached:
            if task.gpus_wanted == 0:
                return Decision(
                    PlacedLocal(
                        node=local_node, reasons=(*placement_reasons, CONTROL_PLANE_UNREACHABLE)
                    )
                )
            if claim_basis is not None:
                # Local work never waits for an unreachable control plane (rule 1): the
                # task was never placed elsewhere, so only this node can run it.
                return Decision(claim=True, settle=True)
            return Decision(wait_s=WAIT_FOR_CONTROL_PLANE_S)
        if STALE_ATTEMPT in reasons:
            return Decision(settle=True)
        if reasons & WAIT_REASONS or waits_for_gpu:
            return Decision(wait_s=WAIT_FOR_LOCAL_GPU_S)
        return Decision(PlacementFailed(reasons=refusal.reasons, detail=refusal.detail))
    waiting = task.state == "fallback_pending"
    if ask == "fallback":
        if not refusal.reached:
            return Decision(
                None
                if waiting
                else ControlPlaneUnreachable(detail=f"fallback: {refusal.detail}"[:200])
            )
        remote_may_run = task.state in ("fallback_pending", "running_remote")
        return Decision(
            FallbackRefused(reasons=refusal.reasons) if remote_may_run else None,
            settle=STALE_ATTEMPT in reasons,
        )
    # lease_check
    if refusal.reached or waiting:
        return Decision()
    return Decision(ControlPlaneUnreachable(detail=f"lease check: {refusal.detail}"[:200]))


__all__ = [
    "ASKS",
    "CONTROL_PLANE_UNREACHABLE",
    "MAX_DETAIL_CHARS",
    "NO_FREE_GPU",
    "STALE_ATTEMPT",
    "WAIT_REASONS",
    "Ask",
    "Decision",
    "Refusal",
    "decide_refusal",
]
