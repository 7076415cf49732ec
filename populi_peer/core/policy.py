"""The work-class x network-scope policy matrix (docs/design.md "Network scope").

Each cell says whether work of a class may run over a path of a scope:

- ``allowed`` — always;
- ``gated`` — only where the cluster settings switch the gate on for that
  ``(work_class, scope)``;
- ``blocked`` — never; no gate opens it.

Default matrix (``docs/adr/0006`` says why)::

                local     lan       overlay
    agent       allowed   allowed   allowed
    inference   allowed   allowed   gated
    training    allowed   allowed   gated
    collective  allowed   gated     blocked

The matrix and the set of open gates live in the cluster settings record (signed by the
operator or the leader), so :class:`PolicySettings` serialises to canonical-JSON-safe
values (strings and lists only). A matrix read back fills any missing cell from
:data:`DEFAULT_MATRIX` and ignores work classes and scopes it does not know (a newer
version may add some); a known cell with an unknown verdict is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from populi_peer.core.fencing import _bad, _obj
from populi_peer.errors import BadRequest

WorkClass = Literal["agent", "inference", "training", "collective"]
Scope = Literal["local", "lan", "overlay"]
Verdict = Literal["allowed", "gated", "blocked"]
#: Why a decision refused: the cell is ``blocked``, or ``gated`` with its gate off.
PolicyReason = Literal["policy_allowed", "policy_gated_on", "policy_blocked", "policy_gated_off"]

WORK_CLASSES: Final[tuple[WorkClass, ...]] = get_args(WorkClass)
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
VERDICTS: Final[tuple[Verdict, ...]] = get_args(Verdict)

Matrix = Mapping[tuple[WorkClass, Scope], Verdict]

DEFAULT_MATRIX: Final[Matrix] = MappingProxyType(
    {
        # An agent task is a CPU-light tool run: it moves a command and its output only.
        ("agent", "local"): "allowed",
        ("agent", "lan"): "allowed",
        ("agent", "overlay"): "allowed",
        # Inference and training move prompts, weights paths and results across the path;
        # over an overlay (other networks, other sites) that is the operator's call.
        ("inference", "local"): "allowed",
        ("inference", "lan"): "allowed",
        ("inference", "overlay"): "gated",
        ("training", "local"): "allowed",
        ("training", "lan"): "allowed",
        ("training", "overlay"): "gated",
        # Collectives (NCCL all-reduce) need low latency and high bandwidth between the
        # ranks: a LAN may do, an overlay (~300 Mbit/s, tunnelled) never does.
        ("collective", "local"): "allowed",
        ("collective", "lan"): "gated",
        ("collective", "overlay"): "blocked",
    }
)


def check_work_class(value: object) -> WorkClass:
    """``value`` as a :data:`WorkClass`, or :class:`BadRequest` (``unknown_work_class``)."""
    for work_class in WORK_CLASSES:
        if value == work_class:
            return work_class
    raise BadRequest(
        f"unknown work class {value!r}; known: {', '.join(WORK_CLASSES)}",
        code="unknown_work_class",
    )


def check_scope(value: object) -> Scope:
    """``value`` as a :data:`Scope`, or :class:`BadRequest` (``unknown_scope``)."""
    for scope in SCOPES:
        if value == scope:
            return scope
    raise BadRequest(
        f"unknown network scope {value!r}; known: {', '.join(SCOPES)}", code="unknown_scope"
    )


def _check_verdict(value: object, where: str) -> Verdict:
    for verdict in VERDICTS:
        if value == verdict:
            return verdict
    raise BadRequest(
        f"policy cell {where}: unknown verdict {value!r}; known: {', '.join(VERDICTS)}",
        code="bad_policy",
    )


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    allowed: bool
    reason: PolicyReason


def decide(
    work_class: str,
    scope: str,
    *,
    gates_enabled: frozenset[tuple[str, str]],
    matrix: Matrix = DEFAULT_MATRIX,
) -> PolicyDecision:
    """May ``work_class`` run over a path of ``scope``? ``gates_enabled`` lists the
    ``(work_class, scope)`` gates the cluster settings switch on; it opens ``gated`` cells
    only, never ``blocked`` ones."""
    cell = (check_work_class(work_class), check_scope(scope))
    verdict = matrix.get(cell, DEFAULT_MATRIX[cell])
    if verdict == "allowed":
        return PolicyDecision(True, "policy_allowed")
    if verdict == "blocked":
        return PolicyDecision(False, "policy_blocked")
    if cell in gates_enabled:
        return PolicyDecision(True, "policy_gated_on")
    return PolicyDecision(False, "policy_gated_off")


def _normalise_gates(gates: Iterable[tuple[str, str]]) -> frozenset[tuple[WorkClass, Scope]]:
    return frozenset((check_work_class(wc), check_scope(sc)) for wc, sc in gates)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The policy part of the cluster settings: the matrix and the gates switched on."""

    matrix: Matrix = field(default_factory=lambda: DEFAULT_MATRIX)
    gates_enabled: frozenset[tuple[WorkClass, Scope]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        cells: dict[tuple[WorkClass, Scope], Verdict] = dict(DEFAULT_MATRIX)
        for (wc, sc), verdict in self.matrix.items():
            cell = (check_work_class(wc), check_scope(sc))
            cells[cell] = _check_verdict(verdict, f"{wc}/{sc}")
        object.__setattr__(self, "matrix", MappingProxyType(cells))
        object.__setattr__(self, "gates_enabled", _normalise_gates(self.gates_enabled))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.matrix.items())), self.gates_enabled))

    def decide(self, work_class: str, scope: str) -> PolicyDecision:
        return decide(work_class, scope, gates_enabled=self.gates_enabled, matrix=self.matrix)

    def to_json(self) -> dict[str, Any]:
        return {
            "matrix": {wc: {sc: self.matrix[(wc, sc)] for sc in SCOPES} for wc in WORK_CLASSES},
            "gates_enabled": [list(gate) for gate in sorted(self.gates_enabled)],
        }

    @classmethod
    def from_json(cls, data: object) -> PolicySettings:
        what = "policy settings"
        obj = _obj(data, what)
        cells: dict[tuple[WorkClass, Scope], Verdict] = {}
        raw_matrix = obj.get("matrix", {})
        if not isinstance(raw_matrix, Mapping):
            raise _bad(what, "matrix", "an object", raw_matrix)
        for wc, row in raw_matrix.items():
            if wc not in WORK_CLASSES:
                continue  # a newer version's work class: ignored here
            if not isinstance(row, Mapping):
                raise _bad(what, f"matrix.{wc}", "an object", row)
            for sc, verdict in row.items():
                if sc in SCOPES:
                    cells[(check_work_class(wc), check_scope(sc))] = _check_verdict(
                        verdict, f"{wc}/{sc}"
                    )
        raw_gates = obj.get("gates_enabled", [])
        if not isinstance(raw_gates, list):
            raise _bad(what, "gates_enabled", "a list", raw_gates)
        gates: set[tuple[WorkClass, Scope]] = set()
        for gate in raw_gates:
            if (
                not isinstance(gate, list)
                or len(gate) != 2
                or not all(isinstance(part, str) for part in gate)
            ):
                raise _bad(what, "gates_enabled", "a list of [work_class, scope]", gate)
            if gate[0] in WORK_CLASSES and gate[1] in SCOPES:
                gates.add((check_work_class(gate[0]), check_scope(gate[1])))
        return cls(MappingProxyType(cells), frozenset(gates))


__all__ = [
    "DEFAULT_MATRIX",
    "SCOPES",
    "VERDICTS",
    "WORK_CLASSES",
    "Matrix",
    "PolicyDecision",
    "PolicyReason",
    "PolicySettings",
    "Scope",
    "Verdict",
    "WorkClass",
    "check_scope",
    "check_work_class",
    "decide",
]
