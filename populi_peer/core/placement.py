"""Placement v1: where should a task run? Pure and deterministic.

The submitter proposes; the control plane decides at grant time from its own view
(safety rule 6), so a proposal may rest on hints. A remote node fits when it is
eligible (lifecycle, staleness, health, worker policy — judged by the caller), has at
least ``gpus_wanted`` free, healthy, verified GPUs, and the work-class policy allows the
path's scope. Among fits the one with the most free GPUs wins, then the smallest node id:
the same inputs always give the same answer, and spreading by free GPUs keeps big holes
for big tasks on other nodes.

Otherwise the task runs locally, and the placement says why:

======================== ===============================================================
``remote_disabled``      remote execution is off on this node (the local-first default)
``node_pinned_local``    ``--node`` names this node
``node_pinned_unavailable`` ``--node`` names a node that does not fit (with its reasons)
``no_remote_candidate``  no remote node fits (followed by the distinct reasons below)
``node_ineligible``      a candidate's lifecycle, staleness or health rules it out
``no_free_gpu``          a candidate has fewer free GPUs than wanted
``policy_blocked``       the policy matrix blocks the work class over that scope
``policy_gated_off``     the cell is gated and its gate is off
======================== ===============================================================

Per-node verdicts are in :attr:`Placement.rejected` for the task's decision log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from populi_peer.core.policy import (
    DEFAULT_MATRIX,
    Matrix,
    Scope,
    WorkClass,
    check_scope,
    check_work_class,
    decide,
)
from populi_peer.errors import BadRequest

Where = Literal["remote", "local"]

#: The order in which aggregated rejection codes are listed.
REJECTION_ORDER: Final[tuple[str, ...]] = (
    "node_ineligible",
    "no_free_gpu",
    "policy_blocked",
    "policy_gated_off",
)


@dataclass(frozen=True, slots=True)
class TaskView:
    """What placement needs to know about the task."""

    work_class: WorkClass
    gpus_wanted: int
    #: ``--node``: the only node the task may be placed on.
    node: str | None = None

    def __post_init__(self) -> None:
        check_work_class(self.work_class)
        if (
            isinstance(self.gpus_wanted, bool)
            or not isinstance(self.gpus_wanted, int)
            or self.gpus_wanted < 0
        ):
            raise BadRequest(
                f"gpus_wanted must be an integer >= 0, got {self.gpus_wanted!r}",
                code="bad_request",
                field="gpus_wanted",
            )


@dataclass(frozen=True, slots=True)
class CandidateView:
    """A remote node as the caller sees it: ``eligible`` (+ ``reasons`` when not),
    ``free_gpus`` (free, healthy, verified GPUs) and the ``scope`` of the path to it."""

    node_id: str
    eligible: bool
    free_gpus: int
    scope: Scope
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise BadRequest("candidate node_id must be a non-empty string", code="bad_request")
        if (
            isinstance(self.free_gpus, bool)
            or not isinstance(self.free_gpus, int)
            or (self.free_gpus < 0)
        ):
            raise BadRequest(
                f"free_gpus must be an integer >= 0, got {self.free_gpus!r}",
                code="bad_request",
                field="free_gpus",
            )
        check_scope(self.scope)


@dataclass(frozen=True, slots=True)
class Placement:
    where: Where
    node: str
    reasons: tuple[str, ...]
    #: ``(node_id, rejection codes)`` for every candidate that was considered and refused.
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "node": self.node,
            "reasons": list(self.reasons),
            "rejected": {node: list(codes) for node, codes in self.rejected},
        }


def _rejections(
    task: TaskView,
    candidate: CandidateView,
    gates_enabled: frozenset[tuple[str, str]],
    matrix: Matrix,
) -> tuple[str, ...]:
    codes: list[str] = []
    if not candidate.eligible:
        codes.append("node_ineligible")
        codes.extend(r for r in candidate.reasons if r not in REJECTION_ORDER)
    if candidate.free_gpus < task.gpus_wanted:
        codes.append("no_free_gpu")
    decision = decide(task.work_class, candidate.scope, gates_enabled=gates_enabled, matrix=matrix)
    if not decision.allowed:
        codes.append(decision.reason)
    return tuple(codes)


def propose(
    task: TaskView,
    candidates: Sequence[CandidateView],
    *,
    remote_enabled: bool,
    local_node: str,
    gates_enabled: frozenset[tuple[str, str]] = frozenset(),
    matrix: Matrix = DEFAULT_MATRIX,
    avoid: frozenset[str] = frozenset(),
) -> Placement:
    """Propose where ``task`` runs. ``avoid`` lists nodes already tried for this task
    (a refused grant): they are skipped. Deterministic given its inputs."""
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.node_id in seen:
            raise BadRequest(f"candidate {candidate.node_id!r} is listed twice", code="bad_request")
        seen.add(candidate.node_id)
    if task.node == local_node:
        return Placement("local", local_node, ("node_pinned_local",))
    if not remote_enabled:
        return Placement("local", local_node, ("remote_disabled",))
    pool = [c for c in candidates if c.node_id != local_node and c.node_id not in avoid]
    if task.node is not None:
        pool = [c for c in pool if c.node_id == task.node]
    rejected: list[tuple[str, tuple[str, ...]]] = []
    fits: list[CandidateView] = []
    for candidate in sorted(pool, key=lambda c: c.node_id):
        codes = _rejections(task, candidate, gates_enabled, matrix)
        if codes:
            rejected.append((candidate.node_id, codes))
        else:
            fits.append(candidate)
    if fits:
        best = min(fits, key=lambda c: (-c.free_gpus, c.node_id))
        why = "node_pinned" if task.node is not None else "most_free_gpus"
        return Placement("remote", best.node_id, (why,), tuple(rejected))
    seen_codes = {code for _, codes in rejected for code in codes}
    aggregated = tuple(code for code in REJECTION_ORDER if code in seen_codes)
    if task.node is not None:
        pinned_codes = rejected[0][1] if rejected else ("no_remote_candidate",)
        return Placement(
            "local", local_node, ("node_pinned_unavailable", *pinned_codes), tuple(rejected)
        )
    return Placement("local", local_node, ("no_remote_candidate", *aggregated), tuple(rejected))


__all__ = [
    "REJECTION_ORDER",
    "CandidateView",
    "Placement",
    "TaskView",
    "Where",
    "propose",
]
