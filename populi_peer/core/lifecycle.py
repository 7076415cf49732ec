"""Node lifecycle: one transition table, as data (docs/design.md "Node lifecycle").

States::

    active       takes new work
    cordoned     keeps running work, takes no new work
    draining     takes no new work; running work should be gone by the optional deadline
    maintenance  out of service, optionally until a wall-clock time
    quarantined  out of service until an explicit ``resume`` (or ``retire``)
    retired      certificate revoked; terminal except ``delete``
    left         the node said goodbye (``populi leave``)

:data:`TRANSITIONS` maps ``state -> {command: next state}``; a command missing from a
state's row is illegal there and raises :class:`IllegalTransition` with the state
unchanged (the caller's record is immutable, so nothing can be half-applied). ``delete``
leads to :data:`DELETED` (``None``): the record is forgotten.

Two rules that are not visible in the table alone:

- **Re-issue.** Each state is named by exactly one command (``resume`` -> active,
  ``cordon`` -> cordoned, ..., ``leave`` -> left), and that command is always accepted in
  its own state. A re-issue with the same deadline / until is a no-op that returns the
  record unchanged (first actor and reason kept), so a retried request is harmless. A
  re-issue of ``drain`` or ``maintenance`` with a different deadline / until replaces it
  (and records the new actor and reason); ``since_wall_ms`` keeps counting from when the
  node entered the state.
- **Derived expiry.** Maintenance with ``until_wall_ms`` ends by itself, but nothing
  writes that: :func:`effective` derives ``active`` (reason ``maintenance_ended``) once
  ``now_wall_ms >= until_wall_ms``, and commands apply to the effective state. A drain
  deadline does not change the state; it tells the control plane when to stop waiting
  for running work.

Who may issue what is data too (:data:`COMMAND_WRITERS`): ``leave`` only by the node
itself, every other command by an operator or the leader. ``docs/adr/0003`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, cast, get_args, overload

from populi_peer.core.wire import FieldsRecord, json_record
from populi_peer.errors import BadRequest, Conflict, Forbidden

State = Literal["active", "cordoned", "draining", "maintenance", "quarantined", "retired", "left"]
Command = Literal[
    "cordon", "drain", "maintenance", "quarantine", "resume", "retire", "leave", "delete"
]
#: Every command except ``delete``: those that lead to a state.
StateCommand = Literal["cordon", "drain", "maintenance", "quarantine", "resume", "retire", "leave"]
#: Who writes a record: an operator, the elected leader, or the node about itself.
WriterClass = Literal["operator", "leader", "self"]

STATES: Final[tuple[State, ...]] = get_args(State)
COMMANDS: Final[tuple[Command, ...]] = get_args(Command)
WRITER_CLASSES: Final[tuple[WriterClass, ...]] = get_args(WriterClass)

#: What ``delete`` leads to: no record at all.
DELETED: Final = None

#: The reason of the ``active`` record that :func:`effective` derives when maintenance ends.
MAINTENANCE_ENDED: Final = "maintenance_ended"

# The one transition table. Rows are the current (effective) state; a command absent from
# a row is illegal in that state. Each row lists its re-issue first (see the docstring).
TRANSITIONS: Final[Mapping[State, Mapping[Command, State | None]]] = MappingProxyType(
    {
        "active": MappingProxyType(
            {
                "resume": "active",
                "cordon": "cordoned",
                "drain": "draining",
                "maintenance": "maintenance",
                "quarantine": "quarantined",
                "retire": "retired",
                "leave": "left",
            }
        ),
        "cordoned": MappingProxyType(
            {
                "cordon": "cordoned",
                "resume": "active",
                "drain": "draining",
                "maintenance": "maintenance",
                "quarantine": "quarantined",
                "retire": "retired",
                "leave": "left",
            }
        ),
        "draining": MappingProxyType(
            {
                "drain": "draining",
                "resume": "active",
                "cordon": "cordoned",
                "maintenance": "maintenance",
                "quarantine": "quarantined",
                "retire": "retired",
                "leave": "left",
            }
        ),
        # Maintenance is already out of service: cordon / drain would only weaken it
        # silently. Resume first.
        "maintenance": MappingProxyType(
            {
                "maintenance": "maintenance",
                "resume": "active",
                "quarantine": "quarantined",
                "retire": "retired",
                "leave": "left",
            }
        ),
        # Quarantine is a health verdict that only an explicit resume clears. Leaving is
        # refused too: left -> resume would bring the node back active without anyone
        # having decided about the quarantine.
        "quarantined": MappingProxyType(
            {
                "quarantine": "quarantined",
                "resume": "active",
                "retire": "retired",
            }
        ),
        # Terminal: the certificate is revoked; the only step left is to forget the node.
        "retired": MappingProxyType(
            {
                "retire": "retired",
                "delete": DELETED,
            }
        ),
        "left": MappingProxyType(
            {
                "leave": "left",
                "resume": "active",
                "retire": "retired",
                "delete": DELETED,
            }
        ),
    }
)

#: Which writer class may issue each command. ``leave`` is the node's own word (docs/design.md: #: "the node itself, e.g. ... ``left``"); the node may not lift its own cordon or quarantine.
COMMAND_WRITERS: Final[Mapping[Command, frozenset[WriterClass]]] = MappingProxyType(
    {
        "cordon": frozenset({"operator", "leader"}),
        "drain": frozenset({"operator", "leader"}),
        "maintenance": frozenset({"operator", "leader"}),
        "quarantine": frozenset({"operator", "leader"}),
        "resume": frozenset({"operator", "leader"}),
        "retire": frozenset({"operator", "leader"}),
        "delete": frozenset({"operator", "leader"}),
        "leave": frozenset({"self"}),
    }
)

# How the one-line refusal names a node in each state.
_STATE_PHRASE: Final[Mapping[State, str]] = MappingProxyType(
    {
        "active": "an active node",
        "cordoned": "a cordoned node",
        "draining": "a draining node",
        "maintenance": "a node in maintenance",
        "quarantined": "a quarantined node",
        "retired": "a retired node",
        "left": "a node that has left",
    }
)


class IllegalTransition(Conflict):
    """A command that the transition table does not allow in the node's current state.

    ``details`` carries ``state``, ``command`` and ``allowed`` (sorted command names).
    """

    code = "illegal_transition"

    def __init__(self, *, state: State, command: Command, allowed: tuple[Command, ...]) -> None:
        phrase = _STATE_PHRASE[state]
        if command == "leave":
            what = f"{phrase[0].upper()}{phrase[1:]} cannot leave"
        elif command == "maintenance":
            what = f"cannot put {phrase} into maintenance"
        else:
            what = f"cannot {command} {phrase}"
        super().__init__(
            f"{what}; allowed: {', '.join(allowed) if allowed else 'none'}",
            state=state,
            command=command,
            allowed=list(allowed),
        )

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(self.details["allowed"])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ms(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or cast(int, value) < 0:
        raise BadRequest(
            f"{name} must be a non-negative integer (UTC milliseconds), got {value!r}",
            field=name,
        )


@dataclass(frozen=True, slots=True)
class NodeLifecycle(FieldsRecord):
    """A node's lifecycle record: the state and who put it there, when and why."""

    state: State
    since_wall_ms: int
    actor: str
    reason: str
    #: Only while draining: when running work should be gone (optional).
    deadline_wall_ms: int | None = None
    #: Only in maintenance: when it ends by itself (optional; see :func:`effective`).
    until_wall_ms: int | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise BadRequest(
                f"lifecycle: unknown state {self.state!r}; known: {', '.join(STATES)}",
                field="state",
            )
        _check_ms(self.since_wall_ms, "since_wall_ms")
        if not isinstance(self.actor, str) or not self.actor:
            raise BadRequest(
                f"lifecycle: actor must be a non-empty string, got {self.actor!r}",
                field="actor",
            )
        if not isinstance(self.reason, str):
            raise BadRequest(
                f"lifecycle: reason must be a string, got {self.reason!r}", field="reason"
            )
        _check_ms(self.deadline_wall_ms, "deadline_wall_ms", optional=True)
        _check_ms(self.until_wall_ms, "until_wall_ms", optional=True)
        if self.deadline_wall_ms is not None and self.state != "draining":
            raise BadRequest(
                f"lifecycle: deadline_wall_ms belongs to draining, not {self.state}",
                field="deadline_wall_ms",
            )
        if self.until_wall_ms is not None and self.state != "maintenance":
            raise BadRequest(
                f"lifecycle: until_wall_ms belongs to maintenance, not {self.state}",
                field="until_wall_ms",
            )

    @classmethod
    def from_json(cls, data: Any) -> NodeLifecycle:
        """Parse what :meth:`to_json` wrote; unknown fields are ignored."""
        obj = json_record(data, "lifecycle", ("state", "since_wall_ms", "actor", "reason"))
        return cls(
            state=obj["state"],
            since_wall_ms=obj["since_wall_ms"],
            actor=obj["actor"],
            reason=obj["reason"],
            deadline_wall_ms=obj.get("deadline_wall_ms"),
            until_wall_ms=obj.get("until_wall_ms"),
        )


def initial_lifecycle(*, now_wall_ms: int, actor: str, reason: str = "joined") -> NodeLifecycle:
    """The record of a node that has just joined: active."""
    return NodeLifecycle("active", now_wall_ms, actor, reason)


def effective(lc: NodeLifecycle, now_wall_ms: int) -> NodeLifecycle:
    """``lc`` as it stands at ``now_wall_ms``: maintenance is over once ``until`` is reached.

    The boundary is inclusive: at ``now_wall_ms == until_wall_ms`` the node is active again
    (``since_wall_ms = until_wall_ms``, same actor, reason ``maintenance_ended``). Nothing
    else changes by itself.
    """
    _check_ms(now_wall_ms, "now_wall_ms")
    until = lc.until_wall_ms
    if lc.state == "maintenance" and until is not None and now_wall_ms >= until:
        return NodeLifecycle("active", until, lc.actor, MAINTENANCE_ENDED)
    return lc


def allowed_commands(lc: NodeLifecycle, now_wall_ms: int) -> tuple[Command, ...]:
    """The commands legal on ``lc`` at ``now_wall_ms``, sorted by name."""
    return tuple(sorted(TRANSITIONS[effective(lc, now_wall_ms).state]))


def check_command_writer(command: Command, writer_class: WriterClass) -> None:
    """Raise :class:`~populi_peer.errors.Forbidden` unless ``writer_class`` may issue it."""
    if command not in COMMANDS:
        raise _unknown_command(command)
    if writer_class not in WRITER_CLASSES:
        raise BadRequest(
            f"unknown writer class {writer_class!r}; known: {', '.join(WRITER_CLASSES)}",
            field="writer_class",
        )
    writers = COMMAND_WRITERS[command]
    if writer_class not in writers:
        raise Forbidden(
            f"writer class {writer_class!r} may not issue {command!r}; "
            f"allowed: {', '.join(sorted(writers))}",
            code="writer_not_allowed",
            command=command,
            writer_class=writer_class,
        )


def _unknown_command(command: object) -> BadRequest:
    return BadRequest(
        f"unknown lifecycle command {command!r}; known: {', '.join(sorted(COMMANDS))}",
        code="unknown_command",
        field="command",
    )


@overload
def apply_command(
    current: NodeLifecycle,
    command: Literal["delete"],
    *,
    now_wall_ms: int,
    actor: str,
    reason: str,
    deadline_wall_ms: None = None,
    until_wall_ms: None = None,
) -> None: ...


@overload
def apply_command(
    current: NodeLifecycle,
    command: StateCommand,
    *,
    now_wall_ms: int,
    actor: str,
    reason: str,
    deadline_wall_ms: int | None = None,
    until_wall_ms: int | None = None,
) -> NodeLifecycle: ...


@overload
def apply_command(
    current: NodeLifecycle,
    command: Command,
    *,
    now_wall_ms: int,
    actor: str,
    reason: str,
    deadline_wall_ms: int | None = None,
    until_wall_ms: int | None = None,
) -> NodeLifecycle | None: ...


def apply_command(
    current: NodeLifecycle,
    command: Command,
    *,
    now_wall_ms: int,
    actor: str,
    reason: str,
    deadline_wall_ms: int | None = None,
    until_wall_ms: int | None = None,
) -> NodeLifecycle | None:
    """The record after ``command``, or :data:`DELETED` (``None``) for ``delete``.

    Raises :class:`IllegalTransition` if the table does not allow ``command`` in the
    effective state, and :class:`~populi_peer.errors.BadRequest` for an unknown command, a
    ``deadline_wall_ms`` on anything but ``drain``, an ``until_wall_ms`` on anything but
    ``maintenance``, or either one not strictly after ``now_wall_ms``. ``current`` is never
    modified (records are immutable); on error the caller still holds it.
    """
    if command not in COMMANDS:
        raise _unknown_command(command)
    _check_ms(now_wall_ms, "now_wall_ms")
    if not isinstance(actor, str) or not actor:
        raise BadRequest(f"actor must be a non-empty string, got {actor!r}", field="actor")
    if not isinstance(reason, str):
        raise BadRequest(f"reason must be a string, got {reason!r}", field="reason")
    for name, value, owner in (
        ("deadline_wall_ms", deadline_wall_ms, "drain"),
        ("until_wall_ms", until_wall_ms, "maintenance"),
    ):
        if value is None:
            continue
        if command != owner:
            raise BadRequest(f"{name} is only for {owner}, not {command}", field=name)
        _check_ms(value, name)
        if value <= now_wall_ms:
            raise BadRequest(
                f"{name}={value} is not in the future (now is {now_wall_ms}); give a later time",
                field=name,
            )

    now = effective(current, now_wall_ms)
    row = TRANSITIONS[now.state]
    if command not in row:
        raise IllegalTransition(state=now.state, command=command, allowed=tuple(sorted(row)))
    target = row[command]
    if target is None:
        return DELETED
    if target == now.state:
        if (now.deadline_wall_ms, now.until_wall_ms) == (deadline_wall_ms, until_wall_ms):
            return now
        return NodeLifecycle(
            target, now.since_wall_ms, actor, reason, deadline_wall_ms, until_wall_ms
        )
    return NodeLifecycle(target, now_wall_ms, actor, reason, deadline_wall_ms, until_wall_ms)


__all__ = [
    "COMMANDS",
    "COMMAND_WRITERS",
    "DELETED",
    "MAINTENANCE_ENDED",
    "STATES",
    "TRANSITIONS",
    "WRITER_CLASSES",
    "Command",
    "IllegalTransition",
    "NodeLifecycle",
    "State",
    "StateCommand",
    "WriterClass",
    "allowed_commands",
    "apply_command",
    "check_command_writer",
    "effective",
    "initial_lifecycle",
]
