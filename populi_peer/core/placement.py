"""Placement: where should a task run, and where should a queued task wait? Pure.

The submitter proposes; the control plane decides at grant time from its own view
(safety rule 6), so a proposal may rest on hints (:func:`candidate_from_hint`).

**What a task needs** (:class:`TaskView`): ``gpus_wanted`` GPUs, each with at least
``gpu_mem_bytes`` of *free* memory and a name matching ``gpu_model``
(:func:`gpu_model_matches`), on a node that advertises every operator label in
``labels``. Verified facts first (docs/adr/0004): memory and model are matched against
the node's verified NVML facts only; a pseudo-device made from trusted advertised labels
has neither, so it never satisfies a memory or model constraint. Labels add constraints
and never capacity: the GPUs counted are the ones the node itself found allocatable.

**Which node fits**: eligible (lifecycle, staleness, health, worker policy — judged by
the caller, or by :func:`candidate_from_hint`), the labels match, at least ``gpus_wanted``
allocatable GPUs pass :func:`gpu_misfits`, and the work-class policy allows the path's
scope. **Which fit wins**, in this order (the first difference decides, and names the
reason):

=================== ====================================================================
``nearest_scope``   path scope: ``local``, then ``lan``, then ``overlay``
``healthiest_gpus`` fewer ``degraded`` GPUs among those it would use
``least_loaded``    fewer running tasks on the node
``least_utilized``  lower summed utilisation of the GPUs it would use
``most_free_gpus``  more fitting GPUs (spreading keeps big holes for big tasks)
``node_id_order``   the smallest node id: the same inputs always give the same answer
=================== ====================================================================

``only_fit`` when one node fits, ``node_pinned`` for ``--node``; a remote placement's
reasons are ``(that code, "scope_<scope>")``. Otherwise the task runs locally (or waits,
the caller's choice), and the placement says why:

=========================== ===========================================================
``remote_disabled``         remote execution is off on this node (the local-first default)
``node_pinned_local``       ``--node`` names this node
``node_pinned_unavailable`` ``--node`` names a node that does not fit (with its reasons)
``no_remote_candidate``     no remote node fits (followed by the distinct reasons below)
=========================== ===========================================================

Every refused candidate is in :attr:`Placement.rejected` with its codes, in this order
(then the caller's own eligibility reasons after ``node_ineligible``):

========================== ==============================================================
``node_ineligible``        lifecycle, staleness, role or remote-off rules it out
``label_mismatch``         the node does not advertise a label the task requires
``gpu_facts_unknown``      the task constrains memory or model, and the candidate came
                           without per-GPU facts
``no_free_gpu``            fewer allocatable GPUs than wanted
``gpu_model_mismatch``     an allocatable GPU's verified name does not match ``gpu_model``
``gpu_model_unverified``   an allocatable GPU has no verified name (advertised only)
``gpu_mem_insufficient``   an allocatable GPU has less free memory than ``gpu_mem_bytes``
``gpu_mem_unknown``        an allocatable GPU's free memory is unknown
``policy_blocked``         the policy matrix blocks the work class over that scope
``policy_gated_off``       the cell is gated and its gate is off
========================== ==============================================================

**Queued work follows capacity** (:func:`replan_queued`). When no node fits now,
:attr:`Placement.waiting_for` names the best node that *would* fit once GPUs leased to
other tasks are released (``gpu_leased`` only). A queued task waits for that node and,
each time hints change, asks :func:`replan_queued` whether to re-place
(:data:`REPLAN_REASONS`). Running tasks are never migrated: this is for queued ones only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal

from populi_peer.core.hints import GpuHint, HintRecord, hint_age_s
from populi_peer.core.policy import (
    DEFAULT_MATRIX,
    Matrix,
    Scope,
    WorkClass,
    check_scope,
    check_work_class,
    decide,
)
from populi_peer.core.wire import check_count, record_json
from populi_peer.errors import BadRequest

Where = Literal["remote", "local"]

#: The capacity codes (:data:`CAPACITY_CODES`), in their rejection order.
_CAPACITY_ORDER: Final = (
    "gpu_facts_unknown",
    "no_free_gpu",
    "gpu_model_mismatch",
    "gpu_model_unverified",
    "gpu_mem_insufficient",
    "gpu_mem_unknown",
)
#: The order in which rejection codes are listed, per node and aggregated: the node's
#: own state and labels, then its GPUs, then the policy.
REJECTION_ORDER: Final[tuple[str, ...]] = (
    "node_ineligible",
    "label_mismatch",
    *_CAPACITY_ORDER,
    "policy_blocked",
    "policy_gated_off",
)
_REJECTION_RANK: Final = {code: rank for rank, code in enumerate(REJECTION_ORDER)}
#: Codes that say the node lacks the GPUs, not that it may not be used.
CAPACITY_CODES: Final = frozenset(_CAPACITY_ORDER)

#: Why the winner won: the first component of the ranking key that differs.
WIN_REASONS: Final[tuple[str, ...]] = (
    "nearest_scope",
    "healthiest_gpus",
    "least_loaded",
    "least_utilized",
    "most_free_gpus",
    "node_id_order",
)

#: Why a queued task is re-placed (:func:`replan_queued`).
REPLAN_REASONS: Final[tuple[str, ...]] = (
    "replan_node_ineligible",
    "replan_capacity_dropped",
    "replan_better_node",
    "replan_capacity_freed",
)

SCOPE_RANK: Final[Mapping[Scope, int]] = MappingProxyType({"local": 0, "lan": 1, "overlay": 2})
#: Allocation reasons that a queued task may wait out: the GPU is busy, not gone.
_WAITABLE: Final = frozenset({"gpu_leased"})
_MAX_PATTERN_CHARS: Final = 128
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})

# -- GPU model patterns and sizes -------------------------------------------------------


def check_gpu_model(pattern: object) -> str:
    """Validate a ``--gpu-model`` pattern; :class:`BadRequest` (``bad_gpu_model``)."""
    if not isinstance(pattern, str) or not 0 < len(pattern.strip()) <= _MAX_PATTERN_CHARS:
        raise BadRequest(
            f"gpu model pattern must be 1-{_MAX_PATTERN_CHARS} characters, got {pattern!r}",
            code="bad_gpu_model",
            field="gpu_model",
        )
    if not pattern.isascii() or not pattern.isprintable():
        raise BadRequest(
            f"gpu model pattern {pattern!r} must be printable ASCII",
            code="bad_gpu_model",
            field="gpu_model",
        )
    if any(not alt.strip() for alt in pattern.split(",")):
        raise BadRequest(
            f"gpu model pattern {pattern!r} has an empty alternative", code="bad_gpu_model"
        )
    return pattern


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def gpu_model_matches(pattern: str, name: str) -> bool:
    """Whether the NVML device name ``name`` matches ``pattern``.

    Syntax: comma-separated alternatives, any of which may match. Matching ignores case
    and runs of white space. An alternative with a wildcard (``*``, ``?``, ``[...]``,
    as in shell globs) must match the whole name; one without is a substring:
    ``H100`` matches ``NVIDIA H100 80GB HBM3``, ``*4090`` matches ``NVIDIA GeForce RTX
    4090`` but not ``NVIDIA GeForce RTX 4090 D``, ``A100,H100`` matches either.
    """
    target = _norm(name)
    for alt in pattern.split(","):
        needle = _norm(alt)
        if not needle:
            continue
        if any(c in needle for c in "*?["):
            if fnmatch.fnmatchcase(target, needle):
                return True
        elif needle in target:
            return True
    return False


_SIZE_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "": 1,
        "b": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
)


def parse_size(text: str) -> int:
    """``--gpu-mem SIZE`` in bytes: a number with an optional unit, ``K``/``M``/``G``/``T``
    (powers of 1000, ``B`` optional) or ``Ki``/``Mi``/``Gi``/``Ti`` (powers of 1024):
    ``40G`` = 40·10⁹, ``40GiB`` = 40·2³⁰, ``1.5T``, ``16000MiB``, ``1024``.

    Decimal units are the default reading because a card sold as "40 GB" has 40 GiB of
    memory and somewhat less of it free: ``--gpu-mem 40G`` fits an idle A100 40GB,
    ``--gpu-mem 40GiB`` would not.
    """
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise BadRequest(
            f"size {text!r}: expected a number and a unit, like 40G, 24GiB or 16000MiB",
            code="bad_size",
            field="gpu_mem",
        )
    unit = (match.group(2) or "").lower()
    unit = unit[:-1] if unit.endswith("b") and unit != "b" else unit
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value < 1 or value >= 2**63:
        raise BadRequest(f"size {text!r} is out of range", code="bad_size", field="gpu_mem")
    return int(value)


# -- inputs -------------------------------------------------------------------------------


def _check_labels(value: object, name: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name} must map strings to strings", code="bad_request", field=name)
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True)
class TaskView:
    """What placement needs to know about the task (the module docstring says how each
    field is matched)."""

    work_class: WorkClass
    gpus_wanted: int
    #: ``--node``: the only node the task may be placed on.
    node: str | None = None
    #: ``--gpu-mem``: free memory each GPU must have, in bytes.
    gpu_mem_bytes: int | None = None
    #: ``--gpu-model``: a pattern on the verified NVML name (:func:`gpu_model_matches`).
    gpu_model: str | None = None
    #: Operator labels the node must advertise, exactly (a constraint, never capacity).
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)

    def __post_init__(self) -> None:
        check_work_class(self.work_class)
        check_count(self.gpus_wanted, "gpus_wanted")
        if self.gpu_mem_bytes is not None:
            check_count(self.gpu_mem_bytes, "gpu_mem_bytes", 1)
        if self.gpu_model is not None:
            check_gpu_model(self.gpu_model)
        if self.gpus_wanted == 0 and (self.gpu_mem_bytes or self.gpu_model):
            raise BadRequest(
                "--gpu-mem and --gpu-model need --gpus N (N >= 1)",
                code="bad_request",
                field="gpus_wanted",
            )
        object.__setattr__(self, "labels", _check_labels(self.labels, "labels"))

    @property
    def constrains_gpus(self) -> bool:
        return self.gpu_mem_bytes is not None or self.gpu_model is not None


@dataclass(frozen=True, slots=True)
class CandidateView:
    """A remote node as the caller sees it: ``eligible`` (+ ``reasons`` when not),
    ``free_gpus`` (allocatable GPUs) and the ``scope`` of the path to it.

    ``gpus`` (per-GPU facts, :class:`~populi_peer.core.hints.GpuHint`) lets placement
    check memory and model; without them only the count is known. ``labels`` are the
    node's advertised operator labels, ``running_tasks`` its load.
    """

    node_id: str
    eligible: bool
    free_gpus: int
    scope: Scope
    reasons: tuple[str, ...] = ()
    gpus: tuple[GpuHint, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    running_tasks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise BadRequest("candidate node_id must be a non-empty string", code="bad_request")
        check_count(self.free_gpus, "free_gpus")
        check_count(self.running_tasks, "running_tasks")
        check_scope(self.scope)
        if self.gpus is not None:
            allocatable = sum(1 for g in self.gpus if g.allocatable)
            if allocatable != self.free_gpus:
                raise BadRequest(
                    f"candidate {self.node_id}: free_gpus={self.free_gpus} but "
                    f"{allocatable} of its GPUs are allocatable",
                    code="bad_request",
                    field="free_gpus",
                )
        object.__setattr__(self, "labels", _check_labels(self.labels, "labels"))


# -- judging one candidate ----------------------------------------------------------------


def gpu_misfits(task: TaskView, gpu: GpuHint) -> tuple[str, ...]:
    """Why ``gpu`` cannot serve ``task`` on memory or model (empty: it can). Allocatability
    is not looked at: the caller counts allocatable GPUs. The control plane calls this
    too at grant time, on its own view (one rule, safety rule 6)."""
    codes: list[str] = []
    if task.gpu_model is not None:
        if not gpu.verified or gpu.name is None:
            codes.append("gpu_model_unverified")
        elif not gpu_model_matches(task.gpu_model, gpu.name):
            codes.append("gpu_model_mismatch")
    if task.gpu_mem_bytes is not None:
        if not gpu.verified or gpu.memory_free_bytes is None:
            codes.append("gpu_mem_unknown")
        elif gpu.memory_free_bytes < task.gpu_mem_bytes:
            codes.append("gpu_mem_insufficient")
    return tuple(codes)


#: Allocation reasons that make a GPU unusable whatever happens to leases (from
#: ``populi_peer.gpu.ALLOCATION_REASONS``, the blocking ones but ``gpu_leased``).
_BLOCKING: Final = frozenset(
    {
        "gpu_uuid_unknown",
        "gpu_unhealthy",
        "gpu_unknown_health",
        "gpu_quarantined",
        "mig_enabled",
        "gpu_in_use_foreign",
        "gpu_processes_unknown",
    }
)


def _gpu_preference(gpu: GpuHint) -> tuple[int, int, int, int]:
    # Healthy before degraded, idle before busy, roomy before tight; then by index.
    return (
        0 if gpu.health == "healthy" else 1,
        gpu.utilization_gpu_pct or 0,
        -(gpu.memory_free_bytes or 0),
        gpu.index,
    )


@dataclass(frozen=True, slots=True)
class _Assessment:
    candidate: CandidateView
    codes: tuple[str, ...]
    #: Fits once GPUs leased to other tasks are released (for queued tasks).
    could_fit: bool
    chosen: tuple[GpuHint, ...]
    fitting: int

    def key(self) -> tuple[int, int, int, int, int, str]:
        """The ranking key (:data:`WIN_REASONS` names its components)."""
        c = self.candidate
        return (
            SCOPE_RANK[c.scope],
            sum(1 for g in self.chosen if g.health != "healthy"),
            c.running_tasks,
            sum(g.utilization_gpu_pct or 0 for g in self.chosen),
            -self.fitting,
            c.node_id,
        )


def _ordered(codes: list[str]) -> tuple[str, ...]:
    known = sorted({c for c in codes if c in _REJECTION_RANK}, key=_REJECTION_RANK.__getitem__)
    return tuple(known)


def _waitable(task: TaskView, gpu: GpuHint) -> bool:
    """Busy only with leases of other tasks, and right for the task once free."""
    reasons = set(gpu.allocation_reasons)
    return (
        not gpu.allocatable
        and "gpu_leased" in reasons
        and not reasons & _BLOCKING
        and not gpu_misfits(task, gpu)
    )


def _assess(
    task: TaskView,
    candidate: CandidateView,
    gates_enabled: frozenset[tuple[str, str]],
    matrix: Matrix,
) -> _Assessment:
    codes: list[str] = []
    if task.labels and any(candidate.labels.get(k) != v for k, v in task.labels.items()):
        codes.append("label_mismatch")
    wanted = task.gpus_wanted
    chosen: tuple[GpuHint, ...] = ()
    fitting = candidate.free_gpus
    could_fit = True
    if wanted and candidate.gpus is None:
        # Only a count is known: no memory or model check, no waiting for leased GPUs.
        if task.constrains_gpus:
            codes.append("gpu_facts_unknown")
        elif candidate.free_gpus < wanted:
            codes.append("no_free_gpu")
        could_fit = not codes
    elif wanted and candidate.gpus is not None:
        allocatable = [g for g in candidate.gpus if g.allocatable]
        fit = [g for g in allocatable if not gpu_misfits(task, g)]
        fitting = len(fit)
        if fitting < wanted:
            if len(allocatable) < wanted:
                codes.append("no_free_gpu")
            for gpu in allocatable:
                codes.extend(gpu_misfits(task, gpu))
        waiting = sum(1 for g in candidate.gpus if _waitable(task, g))
        could_fit = fitting + waiting >= wanted
        chosen = tuple(sorted(fit, key=_gpu_preference)[:wanted])
    decision = decide(task.work_class, candidate.scope, gates_enabled=gates_enabled, matrix=matrix)
    if not decision.allowed:
        codes.append(decision.reason)
    ordered = list(_ordered(codes))
    if not candidate.eligible:
        ordered.insert(0, "node_ineligible")
        ordered[1:1] = [r for r in candidate.reasons if r not in _REJECTION_RANK]
    if not set(ordered) <= CAPACITY_CODES:
        could_fit = False  # waiting would not help: the node may not be used
    return _Assessment(candidate, tuple(ordered), could_fit, chosen, fitting)


# -- the decision -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    where: Where
    node: str
    reasons: tuple[str, ...]
    #: ``(node_id, rejection codes)`` for every candidate that was considered and refused.
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    #: UUIDs of the GPUs the proposal would use on ``node`` (when known), best first.
    gpus: tuple[str, ...] = ()
    #: When no node fits now: the best node that would once leased GPUs are released.
    waiting_for: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = record_json(self, nulls=True)
        body["rejected"] = {node: list(codes) for node, codes in self.rejected}
        return body


def _win_reason(best: _Assessment, runner_up: _Assessment | None) -> str:
    if runner_up is None:
        return "only_fit"
    for reason, mine, theirs in zip(WIN_REASONS, best.key(), runner_up.key(), strict=True):
        if mine != theirs:
            return reason
    return "node_id_order"  # pragma: no cover - node ids are unique


def _pool(
    task: TaskView,
    candidates: Sequence[CandidateView],
    local_node: str,
    avoid: frozenset[str],
) -> list[CandidateView]:
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.node_id in seen:
            raise BadRequest(f"candidate {candidate.node_id!r} is listed twice", code="bad_request")
        seen.add(candidate.node_id)
    pool = [c for c in candidates if c.node_id != local_node and c.node_id not in avoid]
    if task.node is not None:
        pool = [c for c in pool if c.node_id == task.node]
    return sorted(pool, key=lambda c: c.node_id)


def _decide(
    task: TaskView,
    assessments: list[_Assessment],
    local_node: str,
) -> Placement:
    rejected = tuple((a.candidate.node_id, a.codes) for a in assessments if a.codes)
    fits = sorted((a for a in assessments if not a.codes), key=_Assessment.key)
    if fits:
        best = fits[0]
        runner_up = fits[1] if len(fits) > 1 else None
        why = "node_pinned" if task.node is not None else _win_reason(best, runner_up)
        return Placement(
            "remote",
            best.candidate.node_id,
            (why, f"scope_{best.candidate.scope}"),
            rejected,
            tuple(g.uuid for g in best.chosen if g.uuid is not None),
        )
    waiting = sorted((a for a in assessments if a.could_fit), key=_Assessment.key)
    waiting_for = waiting[0].candidate.node_id if waiting else None
    if task.node is not None:
        pinned_codes = rejected[0][1] if rejected else ("no_remote_candidate",)
        return Placement(
            "local",
            local_node,
            ("node_pinned_unavailable", *pinned_codes),
            rejected,
            waiting_for=waiting_for,
        )
    seen_codes = {code for _, codes in rejected for code in codes}
    aggregated = tuple(code for code in REJECTION_ORDER if code in seen_codes)
    return Placement(
        "local", local_node, ("no_remote_candidate", *aggregated), rejected, waiting_for=waiting_for
    )


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
    pool = _pool(task, candidates, local_node, avoid)
    if task.node == local_node:
        return Placement("local", local_node, ("node_pinned_local",))
    if not remote_enabled:
        return Placement("local", local_node, ("remote_disabled",))
    assessments = [_assess(task, c, gates_enabled, matrix) for c in pool]
    return _decide(task, assessments, local_node)


# -- hints as candidates ------------------------------------------------------------------

#: A hint older than this is not placed on (``hint_stale``): its node may be gone.
DEFAULT_HINT_STALE_AFTER_S: Final = 30.0

_LIFECYCLE_REASON: Final[Mapping[str, str]] = MappingProxyType(
    {
        "cordoned": "cordoned",
        "draining": "draining",
        "maintenance": "maintenance",
        "quarantined": "quarantined",
        "retired": "retired",
        "left": "left",
    }
)


def candidate_from_hint(
    record: HintRecord,
    *,
    scope: Scope,
    now_wall_ms: int,
    stale_after_s: float = DEFAULT_HINT_STALE_AFTER_S,
) -> CandidateView:
    """A candidate from a node's hint (``scope``: of the path to the address the caller
    would use, :func:`~populi_peer.core.scope.best_path`).

    Ineligible, with reasons, when its lifecycle is not ``active`` (the lifecycle codes
    of :mod:`populi_peer.core.eligibility`), it lacks the ``worker`` role
    (``not_a_worker``), has remote execution off (``remote_off_on_node``) or the hint is
    older than ``stale_after_s`` (``hint_stale``).
    """
    body = record.body
    reasons: list[str] = []
    state_reason = _LIFECYCLE_REASON.get(body.lifecycle)
    if state_reason is not None:
        reasons.append(state_reason)
    if "worker" not in body.roles:
        reasons.append("not_a_worker")
    if not body.accepts_remote_work:
        reasons.append("remote_off_on_node")
    if hint_age_s(record, now_wall_ms) > stale_after_s:
        reasons.append("hint_stale")
    return CandidateView(
        node_id=record.node_id,
        eligible=not reasons,
        free_gpus=sum(1 for g in body.gpus if g.allocatable),
        scope=scope,
        reasons=tuple(reasons),
        gpus=body.gpus,
        labels=body.labels,
        running_tasks=body.running_tasks,
    )


def candidates_from_hints(
    records: Iterable[HintRecord],
    *,
    scope_of: Callable[[HintRecord], Scope],
    now_wall_ms: int,
    stale_after_s: float = DEFAULT_HINT_STALE_AFTER_S,
) -> list[CandidateView]:
    """:func:`candidate_from_hint` for each record (e.g. ``GossipState.records.values()``;
    this node's own record is skipped by :func:`propose`), by node id."""
    return [
        candidate_from_hint(
            r, scope=scope_of(r), now_wall_ms=now_wall_ms, stale_after_s=stale_after_s
        )
        for r in sorted(records, key=lambda r: r.node_id)
    ]


# -- queued tasks -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replan:
    """What a queued task should do now: ``replan`` with one of :data:`REPLAN_REASONS`
    (then act on ``placement``: grant on its node, or wait for its ``waiting_for``), or
    keep waiting (``reason`` ``None``)."""

    replan: bool
    reason: str | None
    placement: Placement

    def to_json(self) -> dict[str, Any]:
        return {"replan": self.replan, "reason": self.reason, "placement": self.placement.to_json()}


def replan_queued(
    task: TaskView,
    waiting_for: str | None,
    candidates: Sequence[CandidateView],
    *,
    local_node: str,
    gates_enabled: frozenset[tuple[str, str]] = frozenset(),
    matrix: Matrix = DEFAULT_MATRIX,
    avoid: frozenset[str] = frozenset(),
) -> Replan:
    """Decide whether a queued task waiting for ``waiting_for`` (``None``: for any node)
    is re-placed, given fresh candidates (from hints). In order:

    - ``replan_node_ineligible``: the node it waits for is gone from the candidates, is
      ineligible, fails the labels or the policy;
    - ``replan_capacity_dropped``: it no longer has the GPUs even once leases end (a GPU
      lost, unhealthy, quarantined, busy with foreign work, or short of memory);
    - ``replan_capacity_freed``: the node it waits for fits now;
    - ``replan_better_node``: another node fits now (while it waits), or waits for none
      and one fits.

    Remote execution is on (a task is queued only then). Pure and deterministic.
    """
    pool = _pool(task, candidates, local_node, avoid)
    assessments = {c.node_id: _assess(task, c, gates_enabled, matrix) for c in pool}
    placement = _decide(task, list(assessments.values()), local_node)
    current = assessments.get(waiting_for) if waiting_for is not None else None
    if waiting_for is not None:
        if current is None or not set(current.codes) <= CAPACITY_CODES:
            return Replan(True, "replan_node_ineligible", placement)
        if not current.could_fit:
            return Replan(True, "replan_capacity_dropped", placement)
    if placement.where == "remote":
        freed = placement.node == waiting_for
        return Replan(True, "replan_capacity_freed" if freed else "replan_better_node", placement)
    target = placement.waiting_for
    if target is not None and target != waiting_for:
        if current is None or assessments[target].key()[:3] < current.key()[:3]:
            return Replan(True, "replan_better_node", placement)
        # Not better where it counts (scope, health, load): keep the node it waits for.
        return Replan(False, None, replace(placement, waiting_for=waiting_for))
    return Replan(False, None, placement)


__all__ = [
    "CAPACITY_CODES",
    "DEFAULT_HINT_STALE_AFTER_S",
    "REJECTION_ORDER",
    "REPLAN_REASONS",
    "SCOPE_RANK",
    "WIN_REASONS",
    "CandidateView",
    "Placement",
    "Replan",
    "TaskView",
    "Where",
    "candidate_from_hint",
    "candidates_from_hints",
    "check_gpu_model",
    "gpu_misfits",
    "gpu_model_matches",
    "parse_size",
    "propose",
    "replan_queued",
]
