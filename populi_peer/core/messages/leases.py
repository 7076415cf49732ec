"""Execution leases (``agent/leases.py``): grant, renew, release, fallback, revoke, list and
get. Every answer carries :class:`~populi_peer.core.messages.records.LeaseView`: the core's
:class:`~populi_peer.core.leases.Lease`, parsed by its own ``from_json``, with its token a
:class:`~populi_peer.core.fencing.FencingToken` (compare tokens, never their text).

A grant request on the wire has no submitter: the control plane takes it from the
request's signature. :meth:`LeaseGrantRequest.grant` makes the core's
:class:`~populi_peer.core.leases.GrantRequest` from the two, so that the core's own checks
run on it.
"""

from __future__ import annotations

from typing import Final, get_args

from populi_peer.core.leases import GrantRequest, ReleaseOutcome, ReleaseReason
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Ident,
    Int,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import REASON, WORK_CLASS, LeaseView
from populi_peer.core.policy import WorkClass

#: The largest GPU count taken (JSON's safe integers; beyond any machine anyway).
MAX_GPUS_WANTED: Final = 2**53 - 1
_ID = Ident()
_GPUS = Int(minimum=0, maximum=MAX_GPUS_WANTED)


@message
class LeaseGrantRequest(Message):
    """``LeaseGrantRequest``. The TTL's bounds are the lease table's rule at grant time
    (409 ``lease_refused``: ``ttl_too_short`` / ``ttl_too_long``); here it is a positive
    number."""

    task_id: str = wire(_ID)
    attempt: int = wire(Int(minimum=1))
    work_class: WorkClass = wire(WORK_CLASS)
    #: The node to run on (the submitter itself for a local attempt with GPUs).
    target: str = wire(_ID)
    gpus_wanted: int = wire(_GPUS)
    ttl_s: float = wire(Num(above=0))
    #: Where the task's last attempt was placed, if anywhere (ADR 0015): its task key
    #: stays held until that node reported to this control plane.
    previous_node: str | None = wire(_ID, omit_none=True)
    #: What each GPU must offer (placement v2); the control plane re-checks it on its
    #: own view of the target's GPUs (``gpu_misfit``).
    gpu_mem_bytes: int | None = wire(Nullable(Int(minimum=1)), default=None)
    gpu_model: str | None = wire(Nullable(Text(min_len=1)), default=None)

    def grant(self, submitter: str) -> GrantRequest:
        """The core's request, for ``submitter`` (the signer of this request)."""
        return GrantRequest(
            task_id=self.task_id,
            attempt=self.attempt,
            work_class=self.work_class,
            target=self.target,
            gpus_wanted=self.gpus_wanted,
            ttl_s=self.ttl_s,
            submitter=submitter,
            previous_node=self.previous_node,
            gpu_mem_bytes=self.gpu_mem_bytes,
            gpu_model=self.gpu_model,
        )


@message
class RenewRequest(Message):
    """``RenewRequest`` (the body is optional)."""

    #: The holder's renewal before it starts the task (safety rule 3): the cluster
    #: settings are checked again for a remote lease.
    before_start: bool = wire(Bool(), default=False)


@message
class LeaseReleaseRequest(Message):
    outcome: ReleaseOutcome = wire(Choice(get_args(ReleaseOutcome)))
    #: With ``stopped``: the released lease's reason (else ``released``), so that a
    #: submitter which looks at the lease before the result reaches it learns the same.
    reason: ReleaseReason | None = wire(Choice(get_args(ReleaseReason)), omit_none=True)


@message
class LeaseFallbackRequest(Message):
    """``LeaseFallbackRequest``: the control plane's word that the task's lease is dead,
    with a higher token for a local attempt. ``work_class`` is needed only when the task
    has no lease yet."""

    task_id: str = wire(_ID)
    attempt: int = wire(Int(minimum=1))
    gpus_wanted: int = wire(_GPUS)
    ttl_s: float = wire(Num(above=0))
    work_class: WorkClass | None = wire(WORK_CLASS, omit_none=True)
    #: Where the task's last attempt was placed (ADR 0015): a lease of the task unknown
    #: to a restarted control plane may still run there until that node reported.
    previous_node: str | None = wire(_ID, omit_none=True)


@message
class LeaseRevokeRequest(Message):
    lease_id: str = wire(_ID)
    reason: str | None = wire(REASON, default=None)


@message
class LeaseAnswer(Message):
    """``LeaseAnswer``: lease get and renew."""

    lease: LeaseView = wire(Nested(LeaseView))


@message
class LeaseReplayAnswer(Message):
    """``LeaseReplayAnswer``: grant, release and revoke; ``replay`` when the same request
    was answered before and nothing changed."""

    lease: LeaseView = wire(Nested(LeaseView))
    replay: bool = wire(Bool())


@message
class LeaseFallbackAnswer(Message):
    lease: LeaseView = wire(Nested(LeaseView))
    #: The dead lease this one follows.
    prior: LeaseView | None = wire(Nullable(Nested(LeaseView)))
    replay: bool = wire(Bool())


@message
class LeaseListAnswer(Message):
    term: int = wire(Int(minimum=1))
    leases: tuple[LeaseView, ...] = wire(Seq(Nested(LeaseView)))


__all__ = [
    "LeaseAnswer",
    "LeaseFallbackAnswer",
    "LeaseFallbackRequest",
    "LeaseGrantRequest",
    "LeaseListAnswer",
    "LeaseReleaseRequest",
    "LeaseReplayAnswer",
    "LeaseRevokeRequest",
    "RenewRequest",
]
