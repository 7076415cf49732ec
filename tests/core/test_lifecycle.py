from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from populi_peer.core.lifecycle import (
    COMMAND_WRITERS,
    COMMANDS,
    DELETED,
    MAINTENANCE_ENDED,
    STATES,
    TRANSITIONS,
    Command,
    IllegalTransition,
    NodeLifecycle,
    State,
    allowed_commands,
    apply_command,
    check_command_writer,
    effective,
    initial_lifecycle,
)
from populi_peer.errors import BadRequest, Conflict, Forbidden

NOW = 1_700_000_000_000

# The table as the ADR documents it; a change to TRANSITIONS must change this too.
EXPECTED_TABLE: dict[str, dict[str, str | None]] = {
    "active": {
        "resume": "active",
        "cordon": "cordoned",
        "drain": "draining",
        "maintenance": "maintenance",
        "quarantine": "quarantined",
        "retire": "retired",
        "leave": "left",
    },
    "cordoned": {
        "cordon": "cordoned",
        "resume": "active",
        "drain": "draining",
        "maintenance": "maintenance",
        "quarantine": "quarantined",
        "retire": "retired",
        "leave": "left",
    },
    "draining": {
        "drain": "draining",
        "resume": "active",
        "cordon": "cordoned",
        "maintenance": "maintenance",
        "quarantine": "quarantined",
        "retire": "retired",
        "leave": "left",
    },
    "maintenance": {
        "maintenance": "maintenance",
        "resume": "active",
        "quarantine": "quarantined",
        "retire": "retired",
        "leave": "left",
    },
    "quarantined": {"quarantine": "quarantined", "resume": "active", "retire": "retired"},
    "retired": {"retire": "retired", "delete": None},
    "left": {"leave": "left", "resume": "active", "retire": "retired", "delete": None},
}

# The command that names each state: re-issuing it in that state is a no-op.
NAMING_COMMAND: dict[str, str] = {
    "active": "resume",
    "cordoned": "cordon",
    "draining": "drain",
    "maintenance": "maintenance",
    "quarantined": "quarantine",
    "retired": "retire",
    "left": "leave",
}


def record(state: State, **kwargs: Any) -> NodeLifecycle:
    fields: dict[str, Any] = {"since_wall_ms": NOW - 1000, "actor": "op:alice", "reason": "r"}
    fields.update(kwargs)
    return NodeLifecycle(state=state, **fields)


def apply(current: NodeLifecycle, command: str, **kwargs: Any) -> NodeLifecycle | None:
    fields: dict[str, Any] = {"now_wall_ms": NOW, "actor": "op:bob", "reason": "why"}
    fields.update(kwargs)
    return apply_command(current, cast(Command, command), **fields)


def test_table_is_the_documented_one() -> None:
    assert {s: dict(row) for s, row in TRANSITIONS.items()} == EXPECTED_TABLE


def test_table_covers_every_state_and_leads_only_to_declared_states() -> None:
    assert set(TRANSITIONS) == set(STATES)
    for row in TRANSITIONS.values():
        assert set(row) <= set(COMMANDS)
        for target in row.values():
            assert target is DELETED or target in STATES


def test_every_state_is_named_by_one_command_that_is_legal_in_it() -> None:
    for state, command in NAMING_COMMAND.items():
        assert TRANSITIONS[cast(State, state)][cast(Command, command)] == state
    assert sorted(NAMING_COMMAND.values()) == sorted(c for c in COMMANDS if c != "delete")


def test_every_state_is_reachable_from_active() -> None:
    seen = {"active"}
    frontier = ["active"]
    while frontier:
        for target in TRANSITIONS[cast(State, frontier.pop())].values():
            if target is not None and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(STATES)


def test_only_retired_and_left_can_be_deleted() -> None:
    assert {s for s, row in TRANSITIONS.items() if "delete" in row} == {"retired", "left"}


@pytest.mark.parametrize(
    ("state", "command", "target"),
    [
        (s, c, t)
        for s, row in EXPECTED_TABLE.items()
        for c, t in row.items()
        if t is not None and t != s
    ],
)
def test_each_state_change_records_who_why_and_when(state: str, command: str, target: str) -> None:
    current = record(cast(State, state))
    got = apply(current, command)
    assert got is not None
    assert got.state == target
    assert got.since_wall_ms == NOW
    assert (got.actor, got.reason) == ("op:bob", "why")
    assert got.deadline_wall_ms is None
    assert got.until_wall_ms is None


@pytest.mark.parametrize("state", ["retired", "left"])
def test_delete_forgets_the_record(state: str) -> None:
    assert apply(record(cast(State, state)), "delete") is DELETED


@pytest.mark.parametrize(
    ("state", "command"),
    [(s, c) for s in EXPECTED_TABLE for c in COMMANDS if c not in EXPECTED_TABLE[s]],
)
def test_illegal_commands_raise_409_naming_the_allowed_ones(state: str, command: str) -> None:
    current = record(cast(State, state))
    with pytest.raises(IllegalTransition) as info:
        apply(current, command)
    err = info.value
    assert isinstance(err, Conflict)
    assert err.http_status == 409
    assert err.code == "illegal_transition"
    allowed = sorted(EXPECTED_TABLE[state])
    assert err.details == {"state": state, "command": command, "allowed": allowed}
    assert err.allowed == tuple(allowed)
    assert str(err).endswith("; allowed: " + ", ".join(allowed))
    assert "\n" not in str(err)


def test_refusal_messages_read_as_sentences() -> None:
    with pytest.raises(
        IllegalTransition,
        match=r"^cannot drain a quarantined node; allowed: "
        r"quarantine, resume, retire$",
    ):
        apply(record("quarantined"), "drain")
    with pytest.raises(IllegalTransition, match=r"^A quarantined node cannot leave; allowed: "):
        apply(record("quarantined"), "leave")
    with pytest.raises(IllegalTransition, match=r"^cannot put a retired node into maintenance"):
        apply(record("retired"), "maintenance")
    with pytest.raises(IllegalTransition, match=r"^cannot cordon a node that has left"):
        apply(record("left"), "cordon")
    with pytest.raises(IllegalTransition, match=r"^cannot delete an active node; allowed: "):
        apply(record("active"), "delete")


@pytest.mark.parametrize("state", list(NAMING_COMMAND))
def test_reissuing_the_naming_command_is_a_no_op(state: str) -> None:
    current = record(cast(State, state))
    assert apply(current, NAMING_COMMAND[state]) is current


def test_reissued_drain_replaces_the_deadline_and_keeps_since() -> None:
    current = record("draining", deadline_wall_ms=NOW + 10)
    got = apply(current, "drain", deadline_wall_ms=NOW + 99)
    assert got == NodeLifecycle("draining", NOW - 1000, "op:bob", "why", deadline_wall_ms=NOW + 99)
    assert apply(current, "drain", deadline_wall_ms=NOW + 10) is current
    # Without a deadline the re-issue removes it.
    removed = apply(current, "drain")
    assert removed is not None
    assert removed.deadline_wall_ms is None


def test_reissued_maintenance_extends_until() -> None:
    current = record("maintenance", until_wall_ms=NOW + 10)
    got = apply(current, "maintenance", until_wall_ms=NOW + 5000)
    assert got == NodeLifecycle(
        "maintenance", NOW - 1000, "op:bob", "why", until_wall_ms=NOW + 5000
    )


def test_maintenance_ends_exactly_at_until() -> None:
    lc = apply(record("active"), "maintenance", until_wall_ms=NOW + 60_000)
    assert lc is not None
    assert effective(lc, NOW + 59_999) is lc
    ended = effective(lc, NOW + 60_000)
    assert ended == NodeLifecycle("active", NOW + 60_000, "op:bob", MAINTENANCE_ENDED)
    assert effective(lc, NOW + 10**9) == ended


def test_maintenance_without_until_lasts_until_resumed() -> None:
    lc = apply(record("active"), "maintenance")
    assert lc is not None
    assert effective(lc, NOW + 10**12) is lc
    assert allowed_commands(lc, NOW + 10**12) == (
        "leave",
        "maintenance",
        "quarantine",
        "resume",
        "retire",
    )


def test_commands_apply_to_the_effective_state() -> None:
    lc = record("maintenance", until_wall_ms=NOW - 1)
    # Maintenance is over, so cordon (illegal in maintenance) is legal now.
    got = apply(lc, "cordon")
    assert got is not None
    assert got.state == "cordoned"
    assert allowed_commands(lc, NOW) == tuple(sorted(EXPECTED_TABLE["active"]))
    # Resume on the ended maintenance is a re-issue on active: the derived record.
    assert apply(lc, "resume") == NodeLifecycle("active", NOW - 1, "op:alice", MAINTENANCE_ENDED)
    # A new maintenance starts now, not at the old since.
    again = apply(lc, "maintenance", until_wall_ms=NOW + 5)
    assert again == NodeLifecycle("maintenance", NOW, "op:bob", "why", until_wall_ms=NOW + 5)


def test_drain_deadline_does_not_change_the_state() -> None:
    lc = record("draining", deadline_wall_ms=NOW - 5)
    assert effective(lc, NOW) is lc


@pytest.mark.parametrize(
    ("command", "kwargs", "field"),
    [
        ("maintenance", {"until_wall_ms": NOW}, "until_wall_ms"),
        ("maintenance", {"until_wall_ms": NOW - 1}, "until_wall_ms"),
        ("drain", {"deadline_wall_ms": NOW}, "deadline_wall_ms"),
        ("cordon", {"deadline_wall_ms": NOW + 5}, "deadline_wall_ms"),
        ("cordon", {"until_wall_ms": NOW + 5}, "until_wall_ms"),
        ("drain", {"until_wall_ms": NOW + 5}, "until_wall_ms"),
        ("maintenance", {"deadline_wall_ms": NOW + 5}, "deadline_wall_ms"),
        ("maintenance", {"until_wall_ms": 1.5e12}, "until_wall_ms"),
        ("cordon", {"actor": ""}, "actor"),
        ("cordon", {"reason": None}, "reason"),
        ("cordon", {"now_wall_ms": -1}, "now_wall_ms"),
    ],
)
def test_bad_arguments_are_bad_requests_naming_the_field(
    command: str, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadRequest) as info:
        apply(record("active"), command, **kwargs)
    assert info.value.details["field"] == field
    assert field in str(info.value)


def test_future_deadline_and_until_are_accepted() -> None:
    assert apply(record("active"), "drain", deadline_wall_ms=NOW + 1) == NodeLifecycle(
        "draining", NOW, "op:bob", "why", deadline_wall_ms=NOW + 1
    )
    assert apply(record("active"), "maintenance", until_wall_ms=NOW + 1) == NodeLifecycle(
        "maintenance", NOW, "op:bob", "why", until_wall_ms=NOW + 1
    )


def test_unknown_command_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="unknown lifecycle command 'reboot'") as info:
        apply(record("active"), "reboot")
    assert info.value.code == "unknown_command"


def test_retired_is_terminal_except_delete() -> None:
    retired = record("retired")
    for command in COMMANDS:
        if command in ("retire", "delete"):
            continue
        with pytest.raises(IllegalTransition):
            apply(retired, command)
    assert allowed_commands(retired, NOW) == ("delete", "retire")


def test_quarantine_has_one_way_out_besides_retire() -> None:
    assert allowed_commands(record("quarantined"), NOW) == ("quarantine", "resume", "retire")


def test_command_writers() -> None:
    assert set(COMMAND_WRITERS) == set(COMMANDS)
    check_command_writer("leave", "self")
    check_command_writer("quarantine", "operator")
    check_command_writer("resume", "leader")
    for command in COMMANDS:
        if command == "leave":
            continue
        with pytest.raises(Forbidden, match=f"'self' may not issue '{command}'"):
            check_command_writer(command, "self")
    with pytest.raises(Forbidden, match="allowed: self"):
        check_command_writer("leave", "operator")
    with pytest.raises(BadRequest):
        check_command_writer("leave", "root")  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        check_command_writer("reboot", "operator")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "sleeping"},
        {"state": "active", "deadline_wall_ms": NOW},
        {"state": "active", "until_wall_ms": NOW},
        {"state": "draining", "until_wall_ms": NOW},
        {"state": "maintenance", "deadline_wall_ms": NOW},
        {"state": "active", "since_wall_ms": -1},
        {"state": "active", "since_wall_ms": True},
        {"state": "active", "actor": ""},
        {"state": "active", "reason": 3},
    ],
)
def test_record_refuses_inconsistent_fields(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"since_wall_ms": NOW, "actor": "a", "reason": ""}
    fields.update(kwargs)
    with pytest.raises(BadRequest):
        NodeLifecycle(**fields)


def test_json_round_trip_ignores_unknown_fields() -> None:
    for lc in (
        initial_lifecycle(now_wall_ms=NOW, actor="node:n1"),
        record("draining", deadline_wall_ms=NOW + 5),
        record("maintenance", until_wall_ms=NOW + 5),
        record("quarantined", reason="xid 79 on GPU-1"),
    ):
        assert NodeLifecycle.from_json(lc.to_json()) == lc
        assert NodeLifecycle.from_json({**lc.to_json(), "added_in_v2": {"x": 1}}) == lc
    assert "deadline_wall_ms" not in record("active").to_json()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"state": "active", "since_wall_ms": 1, "actor": "a"},
        {"state": "active", "since_wall_ms": "1", "actor": "a", "reason": ""},
        {"state": "gone", "since_wall_ms": 1, "actor": "a", "reason": ""},
    ],
)
def test_from_json_refuses_malformed(bad: object) -> None:
    with pytest.raises(BadRequest):
        NodeLifecycle.from_json(bad)


def test_initial_lifecycle_is_active() -> None:
    assert initial_lifecycle(now_wall_ms=NOW, actor="node:n1") == NodeLifecycle(
        "active", NOW, "node:n1", "joined"
    )


class LifecycleMachine(RuleBasedStateMachine):
    """Random command sequences against the table, with time moving forward."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.lc: NodeLifecycle | None = initial_lifecycle(now_wall_ms=NOW, actor="node:n1")

    @rule(ms=st.integers(0, 120_000))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule(
        command=st.sampled_from(COMMANDS),
        ahead_ms=st.one_of(st.none(), st.integers(-5, 100_000)),
    )
    def command(self, command: Command, ahead_ms: int | None) -> None:
        if self.lc is None:
            return
        kwargs: dict[str, Any] = {}
        if ahead_ms is not None and command == "drain":
            kwargs["deadline_wall_ms"] = self.now + ahead_ms
        if ahead_ms is not None and command == "maintenance":
            kwargs["until_wall_ms"] = self.now + ahead_ms
        before = self.lc
        before_json = before.to_json()
        legal = allowed_commands(before, self.now)
        try:
            after = apply_command(
                before, command, now_wall_ms=self.now, actor="op:x", reason="fuzz", **kwargs
            )
        except IllegalTransition as err:
            assert command not in legal
            assert err.allowed == legal
            assert self.lc is before and before.to_json() == before_json
            return
        except BadRequest:
            assert ahead_ms is not None and ahead_ms <= 0
            assert self.lc is before and before.to_json() == before_json
            return
        assert command in legal
        if after is None:
            assert command == "delete"
            assert effective(before, self.now).state in ("retired", "left")
        else:
            assert after.state == TRANSITIONS[effective(before, self.now).state][command]
            assert after.since_wall_ms <= self.now
        self.lc = after

    @invariant()
    def state_is_declared(self) -> None:
        if self.lc is not None:
            assert self.lc.state in STATES
            assert effective(self.lc, self.now).state in STATES

    @invariant()
    def maintenance_ends_exactly_at_until(self) -> None:
        lc = self.lc
        if lc is None or lc.state != "maintenance" or lc.until_wall_ms is None:
            return
        until = lc.until_wall_ms
        assert effective(lc, until - 1) is lc
        assert effective(lc, until).state == "active"
        assert effective(lc, until).since_wall_ms == until
        assert (effective(lc, self.now).state == "active") == (self.now >= until)

    @invariant()
    def record_survives_json(self) -> None:
        if self.lc is not None:
            assert NodeLifecycle.from_json(self.lc.to_json()) == self.lc


LifecycleMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestLifecycleMachine = LifecycleMachine.TestCase
