from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from populi_peer.core.fencing import FencingToken
from populi_peer.core.tasks import (
    EVENT_KEYS,
    EXIT_POPULI_FAILED,
    EXIT_REFUSED,
    RUNNING_STATES,
    TASK_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Attempt,
    Cancel,
    ControlPlaneUnreachable,
    FallbackRefused,
    GrantRefused,
    HandoffFailed,
    IllegalTaskTransition,
    LeaseDeadConfirmed,
    LeaseLost,
    LeaseRequests,
    PlacedLocal,
    PlacedRemote,
    PlacementFailed,
    PlacementStarted,
    PopuliFailure,
    ReasonEntry,
    Replanned,
    Result,
    Task,
    TaskEvent,
    TaskOptions,
    Timeout,
    exit_status,
)
from populi_peer.errors import BadRequest

T0 = 1_700_000_000_000
TOK1 = FencingToken(1, 10)
TOK2 = FencingToken(1, 11)


def new_task(**options: object) -> Task:
    return Task.new(
        "task-1",
        command=("python", "train.py"),
        env={"B": "2", "A": "1"},
        gpus_wanted=1,
        work_class="training",
        created_wall_ms=T0,
        options=TaskOptions(**options),  # type: ignore[arg-type]
    )


def run(task: Task, *events: TaskEvent) -> Task:
    for i, event in enumerate(events, start=1):
        task = task.apply(event, now_wall_ms=T0 + i)
    return task


def placed_remote(**options: object) -> Task:
    return run(
        new_task(**options), PlacementStarted(), PlacedRemote("w1", "L1", TOK1, ("most_free_gpus",))
    )


def codes(task: Task) -> list[str]:
    return [entry.code for entry in task.reasons]


# -- the table as data --------------------------------------------------------------------


def test_table_covers_every_state_and_terminal_rows_only_ack_late_results() -> None:
    assert set(TRANSITIONS) == set(TASK_STATES)
    for state, row in TRANSITIONS.items():
        assert set(row) <= set(EVENT_KEYS)
        if state in TERMINAL_STATES:
            assert dict(row) == {"result_late": state}
        else:
            # Every live task can always be ended: nothing is stuck forever (rule 7).
            assert row["cancel"] == "cancelled" and row["timeout"] == "timed_out"


def test_only_the_control_planes_word_leads_from_remote_to_local() -> None:
    for state in ("placing", "running_remote", "fallback_pending"):
        for key, after in TRANSITIONS[state].items():
            if after == "running_local" and state != "placing":
                assert key == "lease_dead_confirmed"
    # From placing the only way to run locally is a placement decision, never a timeout.
    assert [k for k, v in TRANSITIONS["placing"].items() if v == "running_local"] == [
        "placed_local"
    ]


# -- happy paths --------------------------------------------------------------------------


def test_new_task_is_queued_with_sorted_env() -> None:
    task = new_task()
    assert task.state == "queued" and task.attempts == ()
    assert task.env == (("A", "1"), ("B", "2")) and task.env_dict == {"A": "1", "B": "2"}
    assert codes(task) == ["submitted"]


def test_remote_success() -> None:
    task = placed_remote()
    assert task.state == "running_remote"
    attempt = task.current_attempt
    assert attempt is not None
    assert (attempt.n, attempt.where, attempt.node, attempt.token) == (1, "remote", "w1", TOK1)
    assert attempt.placement_reasons == ("most_free_gpus",)
    task = task.apply(Result(1, TOK1, 0), now_wall_ms=T0 + 50)
    assert task.state == "succeeded" and task.terminal
    assert (task.exit_code, task.signal, task.terminal_reason) == (0, None, "exit_zero")
    assert task.finished_wall_ms == T0 + 50
    assert task.attempts[0].outcome == "succeeded"
    assert codes(task) == [
        "submitted",
        "placing",
        "placed_remote",
        "most_free_gpus",
        "result",
    ]


@pytest.mark.parametrize(
    ("exit_code", "signal", "reason"), [(3, None, "exit_nonzero"), (None, 9, "signalled")]
)
def test_remote_failure(exit_code: int | None, signal: int | None, reason: str) -> None:
    task = placed_remote().apply(Result(1, TOK1, exit_code, signal), now_wall_ms=T0 + 9)
    assert task.state == "failed" and task.terminal_reason == reason
    assert task.attempts[0].outcome == "failed"


def test_handoff_failure_waits_for_the_lease_then_runs_locally_with_a_higher_token() -> None:
    task = run(placed_remote(), HandoffFailed("peer_unreachable", "connect timeout"))
    assert task.state == "fallback_pending"
    assert task.attempts[0].outcome is None  # it may be running over there
    task = run(task, ControlPlaneUnreachable("no quorum"), FallbackRefused(("lease_live",)))
    assert task.state == "fallback_pending"
    task = run(task, LeaseDeadConfirmed("sub", TOK2, "F1", ("lease_expired",)))
    assert task.state == "running_local"
    first, second = task.attempts
    assert first.outcome == "lease_dead" and first.finished_wall_ms is not None
    assert (second.where, second.token, second.lease_id) == ("local", TOK2, "F1")
    assert second.placement_reasons == ("lease_dead_confirmed", "lease_expired")
    # The old remote attempt's result is now stale: recorded, not accepted.
    task = task.apply(Result(1, TOK1, 0), now_wall_ms=T0 + 100)
    assert task.state == "running_local" and codes(task)[-1] == "stale_result"
    task = task.apply(Result(2, TOK2, 0), now_wall_ms=T0 + 101)
    assert task.state == "succeeded"
    assert "handoff_failed" in codes(task) and "peer_unreachable" in codes(task)


def test_a_remote_result_still_counts_while_fallback_is_pending() -> None:
    task = run(placed_remote(), ControlPlaneUnreachable())
    task = task.apply(Result(1, TOK1, 0), now_wall_ms=T0 + 50)
    assert task.state == "succeeded"


def test_unanswered_grant_request_waits_for_the_control_plane() -> None:
    task = run(new_task(), PlacementStarted(), ControlPlaneUnreachable("timeout"))
    assert task.state == "fallback_pending" and task.attempts == ()
    task = run(task, LeaseDeadConfirmed("sub", TOK1, "F1"))
    assert task.state == "running_local" and task.current_token == TOK1


def test_placement_local_and_grant_refusals_are_recorded() -> None:
    task = run(
        new_task(),
        PlacementStarted(),
        GrantRefused("w1", ("no_free_gpu",)),
        PlacedLocal("sub", ("no_remote_candidate", "policy_blocked")),
    )
    assert task.state == "running_local"
    assert task.current_attempt is not None and task.current_attempt.token is None
    assert codes(task)[2:] == [
        "grant_refused",
        "no_free_gpu",
        "placed_local",
        "no_remote_candidate",
        "policy_blocked",
    ]
    # A local attempt without a lease: its own executor reports by attempt number.
    assert task.apply(Result(1, TOK1, 0), now_wall_ms=T0 + 9).state == "running_local"
    assert task.apply(Result(1, None, 0), now_wall_ms=T0 + 9).state == "succeeded"


def test_local_lease_lost_waits_for_the_word_then_reruns() -> None:
    task = run(new_task(), PlacementStarted(), PlacedLocal("sub", ("remote_disabled",), "LL", TOK1))
    task = run(task, LeaseLost("renew_refused"))
    assert task.state == "fallback_pending" and task.attempts[0].outcome == "lease_lost"
    # The stopped attempt's exit arrives: stale, it no longer counts.
    task = task.apply(Result(1, TOK1, 143), now_wall_ms=T0 + 20)
    assert task.state == "fallback_pending"
    task = run(task, LeaseDeadConfirmed("sub", TOK2, "LL2"))
    assert task.state == "running_local" and len(task.attempts) == 2


# -- --no-fallback ------------------------------------------------------------------------


def test_no_fallback_never_runs_locally() -> None:
    task = run(new_task(no_fallback=True), PlacementStarted())
    local = task.apply(PlacedLocal("sub", ("no_remote_candidate",)), now_wall_ms=T0 + 5)
    assert local.state == "failed" and local.terminal_reason == "no_remote_candidate"
    assert local.attempts == () and codes(local)[-1] == "no_fallback"
    refused = task.apply(GrantRefused("w1", ("node_ineligible",)), now_wall_ms=T0 + 5)
    assert refused.state == "failed" and refused.terminal_reason == "grant_refused"
    dead = run(placed_remote(no_fallback=True), HandoffFailed("peer_unreachable"))
    dead = dead.apply(LeaseDeadConfirmed("sub", TOK2, "F1"), now_wall_ms=T0 + 50)
    assert dead.state == "failed" and dead.terminal_reason == "lease_dead"
    assert [a.where for a in dead.attempts] == ["remote"]
    assert dead.attempts[0].outcome == "lease_dead"


def test_placement_failed() -> None:
    task = run(new_task(), PlacementStarted(), PlacementFailed(("remote_disabled",), "x"))
    assert task.state == "failed" and task.terminal_reason == "remote_disabled"


# -- endings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "state", "reason"),
    [
        (Cancel("alice"), "cancelled", "cancelled"),
        (Timeout("run"), "timed_out", "run_timeout"),
        (Timeout("queue"), "timed_out", "queue_timeout"),
    ],
)
def test_cancel_and_timeout_end_the_running_attempt(
    event: TaskEvent, state: str, reason: str
) -> None:
    task = placed_remote().apply(event, now_wall_ms=T0 + 7)
    assert task.state == state and task.terminal_reason == reason
    assert task.attempts[0].outcome == ("cancelled" if state == "cancelled" else "timed_out")
    assert task.attempts[0].finished_wall_ms == T0 + 7


def test_populi_failure() -> None:
    task = run(
        new_task(),
        PlacementStarted(),
        PlacedLocal("sub", ("remote_disabled",)),
        PopuliFailure("spawn_failed", "ENOENT"),
    )
    assert task.state == "failed" and task.terminal_reason == "spawn_failed"
    assert task.attempts[0].outcome == "populi_failure"


def test_a_late_result_after_the_end_is_acknowledged_and_changes_nothing() -> None:
    task = placed_remote().apply(Cancel("alice"), now_wall_ms=T0 + 7)
    assert task.apply(Result(1, TOK1, 0), now_wall_ms=T0 + 8) is task


@pytest.mark.parametrize(
    "event",
    [
        Cancel("bob"),
        Timeout("run"),
        PlacementStarted(),
        PlacedRemote("w1", "L", TOK1),
        LeaseDeadConfirmed("sub", TOK2),
    ],
)
def test_terminal_states_are_never_left(event: TaskEvent) -> None:
    task = placed_remote().apply(Result(1, TOK1, 0), now_wall_ms=T0 + 7)
    with pytest.raises(IllegalTaskTransition) as info:
        task.apply(event, now_wall_ms=T0 + 8)
    assert info.value.code == "illegal_task_transition"


# -- illegal events -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "bad"),
    [
        ((), PlacedRemote("w1", "L1", TOK1)),  # not placing yet
        ((), LeaseDeadConfirmed("sub", TOK1)),
        ((PlacementStarted(),), HandoffFailed("x")),
        ((PlacementStarted(),), LeaseLost("x")),
        ((PlacementStarted(), PlacedRemote("w1", "L1", TOK1)), PlacedLocal("sub", ("x",))),
        ((PlacementStarted(), PlacedRemote("w1", "L1", TOK1)), PlacementStarted()),
    ],
)
def test_illegal_events_raise_and_change_nothing(
    events: tuple[TaskEvent, ...], bad: TaskEvent
) -> None:
    task = run(new_task(), *events)
    before = task.to_json()
    with pytest.raises(IllegalTaskTransition):
        task.apply(bad, now_wall_ms=T0 + 99)
    assert task.to_json() == before


def test_a_fallback_token_must_outrank_every_earlier_token() -> None:
    task = run(placed_remote(), HandoffFailed("x"))
    for token in (TOK1, FencingToken(1, 9)):
        with pytest.raises(IllegalTaskTransition):
            task.apply(LeaseDeadConfirmed("sub", token), now_wall_ms=T0 + 9)


def test_pinned_task_is_placed_only_on_its_node() -> None:
    task = run(new_task(node="w2"), PlacementStarted())
    with pytest.raises(IllegalTaskTransition):
        task.apply(PlacedRemote("w1", "L1", TOK1), now_wall_ms=T0 + 3)
    assert task.apply(PlacedRemote("w2", "L1", TOK1), now_wall_ms=T0 + 3).state == (
        "running_remote"
    )


# -- records ------------------------------------------------------------------------------


def test_json_round_trip_and_tolerance() -> None:
    task = run(
        placed_remote(no_fallback=False, timeout_s=60.0, node="w1"),
        HandoffFailed("x"),
        LeaseDeadConfirmed("sub", TOK2, "F1"),
        Result(2, TOK2, 1),
    )
    body = task.to_json()
    assert Task.from_json(body) == task
    assert Task.from_json({**body, "newer_field": [1]}) == task
    body["attempts"][0]["token"] = "1.010"
    with pytest.raises(BadRequest):
        Task.from_json(body)


def test_the_stored_record_keeps_its_keys_in_order() -> None:
    """The task row is stored as this JSON: its keys, their order and nulls are pinned."""
    done = replace(
        new_task(),
        state="failed",
        attempts=(
            Attempt(1, "remote", "w1", "L1", TOK1, ("most_free_gpus",), T0 + 1, T0 + 2, "failed"),
        ),
        reasons=(ReasonEntry(T0, "submitted"), ReasonEntry(T0 + 2, "exit_nonzero", "exit=3")),
        finished_wall_ms=T0 + 2,
        exit_code=3,
        signal=9,
        terminal_reason="exit_nonzero",
        options=TaskOptions(timeout_s=60.0, node="w1", gpu_mem_bytes=1024, gpu_model="H100*"),
        requests=LeaseRequests(pending="grant", pending_attempt=1, highest=1),
        ended_by="result_failed",
    )
    assert list(done.to_json().items()) == [
        ("task_id", "task-1"),
        ("command", ["python", "train.py"]),
        ("env", {"A": "1", "B": "2"}),
        ("gpus_wanted", 1),
        ("work_class", "training"),
        ("state", "failed"),
        (
            "attempts",
            [
                {
                    "n": 1,
                    "where": "remote",
                    "node": "w1",
                    "lease_id": "L1",
                    "token": "1.10",
                    "placement_reasons": ["most_free_gpus"],
                    "started_wall_ms": T0 + 1,
                    "finished_wall_ms": T0 + 2,
                    "outcome": "failed",
                    "rejected": {},
                }
            ],
        ),
        ("reasons", [[T0, "submitted", ""], [T0 + 2, "exit_nonzero", "exit=3"]]),
        ("created_wall_ms", T0),
        ("finished_wall_ms", T0 + 2),
        ("exit_code", 3),
        ("signal", 9),
        ("terminal_reason", "exit_nonzero"),
        (
            "options",
            {
                "no_fallback": False,
                "queue_timeout_s": None,
                "timeout_s": 60.0,
                "node": "w1",
                "node_fallback": False,
                "cwd": None,
                "gpu_mem_bytes": 1024,
                "gpu_model": "H100*",
            },
        ),
        ("requests", {"pending": "grant", "pending_attempt": 1, "highest": 1}),
        ("ended_by", "result_failed"),
    ]
    assert Task.from_json(done.to_json()) == done
    fresh = new_task().to_json()
    assert list(fresh) == [key for key, _ in done.to_json().items()]
    assert [fresh[key] for key in ("finished_wall_ms", "exit_code", "signal")] == [None] * 3
    assert (fresh["terminal_reason"], fresh["ended_by"], fresh["attempts"]) == (None, None, [])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": ()},
        {"command": ("ok", 3)},
        {"gpus_wanted": -1},
        {"work_class": "mining"},
        {"env": {"": "x"}},
    ],
)
def test_new_task_validation(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "command": ("true",),
        "env": {},
        "gpus_wanted": 0,
        "work_class": "agent",
        "created_wall_ms": T0,
    }
    args.update(kwargs)
    with pytest.raises(BadRequest):
        Task.new("t", **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"timeout_s": 0}, {"queue_timeout_s": -1.0}, {"node": ""}])
def test_option_validation(options: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        TaskOptions(**options)  # type: ignore[arg-type]


# -- stateful: every task ends once, and only the control plane's word moves it home -----

NODES = ("w1", "w2")


ENDINGS: list[TaskEvent] = [
    Cancel("op"),
    Timeout("run"),
    Timeout("queue"),
    PopuliFailure("spawn_failed"),
    PlacementFailed(("no_remote_candidate",)),
]
ANYTHING: list[TaskEvent] = [
    *ENDINGS,
    PlacementStarted(),
    PlacedRemote("w1", "L9", FencingToken(9, 9)),
    PlacedLocal("sub", ("x",)),
    GrantRefused("w1", ("x",)),
    HandoffFailed("x"),
    ControlPlaneUnreachable(),
    LeaseDeadConfirmed("sub", FencingToken(9, 9)),
    FallbackRefused(("lease_live",)),
    LeaseLost("x"),
]


def _live(machine: TaskMachine) -> bool:
    return machine.task is not None and not machine.task.terminal


def _ended(machine: TaskMachine) -> bool:
    return machine.task is not None and machine.task.terminal


class TaskMachine(RuleBasedStateMachine):
    """Runs tasks one after another through random events; each must end exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.task: Task | None = None
        self.clock = T0
        self.seq = 0
        self.tasks = 0
        self.entered_terminal = 0
        self.history: list[Task] = []

    def _token(self, fresh: bool) -> FencingToken:
        if fresh or self.seq == 0:
            self.seq += 1
        return FencingToken(1, self.seq)

    def _apply(self, event: TaskEvent) -> None:
        assert self.task is not None
        before = self.task
        snapshot = before.to_json()
        self.clock += 1
        try:
            after = before.apply(event, now_wall_ms=self.clock)
        except IllegalTaskTransition:
            assert before.to_json() == snapshot
            return
        if not before.terminal and after.terminal:
            self.entered_terminal += 1
        if before.terminal:
            assert after is before  # never left, never changed
        if isinstance(event, Result) and not before.terminal:
            # The oracle for fencing on the submitter's side (safety rule 2): a result
            # counts only for the open current attempt and its exact token.
            current = before.current_attempt
            counts = (
                current is not None
                and current.outcome is None
                and event.attempt == current.n
                and event.token == current.token
            )
            if counts:
                assert after.terminal and after.exit_code == event.exit_code
            else:
                assert after.state == before.state and after.attempts == before.attempts
                assert after.exit_code is None
        self.history.append(after)
        self.task = after

    @precondition(lambda self: self.task is None or self.task.terminal)
    @rule(no_fallback=st.sampled_from([False, False, True]), node=st.sampled_from([None, "w1"]))
    def submit(self, no_fallback: bool, node: str | None) -> None:
        self.tasks += 1
        self.entered_terminal = 0
        self.history = []
        self.task = Task.new(
            f"t{self.tasks}",
            command=("true",),
            env={},
            gpus_wanted=1,
            work_class="agent",
            created_wall_ms=self.clock,
            options=TaskOptions(no_fallback=no_fallback, node=node),
        )

    @precondition(_live)
    @rule()
    def placing(self) -> None:
        self._apply(PlacementStarted())

    @precondition(_live)
    @rule(node=st.sampled_from(NODES))
    def placed_remote(self, node: str) -> None:
        self._apply(PlacedRemote(node, f"L{self.seq + 1}", self._token(True), ("fit",)))

    @precondition(_live)
    @rule(with_lease=st.booleans())
    def placed_local(self, with_lease: bool) -> None:
        token = self._token(True) if with_lease else None
        self._apply(PlacedLocal("sub", ("no_remote_candidate",), "LL" if token else None, token))

    @precondition(_live)
    @rule()
    def grant_refused(self) -> None:
        self._apply(GrantRefused("w1", ("no_free_gpu",)))

    @precondition(_live)
    @rule()
    def handoff_failed(self) -> None:
        self._apply(HandoffFailed("peer_unreachable"))

    @precondition(_live)
    @rule()
    def control_plane_unreachable(self) -> None:
        self._apply(ControlPlaneUnreachable())

    @precondition(_live)
    @rule(reason=st.sampled_from(["lease_live", "task_completed"]))
    def fallback_refused(self, reason: str) -> None:
        self._apply(FallbackRefused((reason,)))

    @precondition(_live)
    @rule()
    def lease_lost(self) -> None:
        self._apply(LeaseLost("renew_refused"))

    @precondition(_live)
    @rule(event=st.sampled_from(ENDINGS))
    def end(self, event: TaskEvent) -> None:
        self._apply(event)

    @precondition(_ended)
    @rule(event=st.sampled_from(ANYTHING))
    def poke_an_ended_task(self, event: TaskEvent) -> None:
        self._apply(event)

    @precondition(_live)
    @rule(fresh=st.sampled_from([True, True, False]))
    def lease_dead(self, fresh: bool) -> None:
        self._apply(LeaseDeadConfirmed("sub", self._token(fresh), "F"))

    @precondition(lambda self: self.task is not None)
    @rule(
        current=st.sampled_from([True, True, False]),
        exit_code=st.sampled_from([0, 0, 0, 1, None]),
        signal=st.sampled_from([None, None, 9]),
        wrong=st.sampled_from(["attempt", "token", "none"]),
    )
    def result(self, current: bool, exit_code: int | None, signal: int | None, wrong: str) -> None:
        assert self.task is not None
        attempt = self.task.current_attempt
        if current and attempt is not None:
            self._apply(Result(attempt.n, attempt.token, exit_code, signal))
        elif attempt is not None and wrong == "attempt":
            self._apply(Result(attempt.n + 1, attempt.token, exit_code, signal))
        elif attempt is not None and wrong == "token":
            other = None if attempt.token is not None else FencingToken(1, self.seq)
            self._apply(Result(attempt.n, other, exit_code, signal))
        else:
            self._apply(Result(1, FencingToken(1, self.seq + 5), exit_code, signal))

    @invariant()
    def terminal_is_reached_at_most_once_and_is_consistent(self) -> None:
        assert self.entered_terminal <= 1
        task = self.task
        if task is None:
            return
        assert task.terminal == (task.finished_wall_ms is not None)
        assert task.terminal == (task.terminal_reason is not None)
        if task.state == "succeeded":
            assert task.exit_code == 0 and task.signal is None
            assert task.attempts[-1].outcome == "succeeded"
        if task.exit_code is not None or task.signal is not None:
            assert task.state in ("succeeded", "failed")

    @invariant()
    def at_most_one_attempt_may_be_running(self) -> None:
        task = self.task
        if task is None:
            return
        open_attempts = [a for a in task.attempts if a.outcome is None]
        assert len(open_attempts) <= 1
        if open_attempts:
            assert open_attempts[0] is task.attempts[-1]
            assert task.state in RUNNING_STATES
        if task.state in ("running_remote", "running_local"):
            current = task.current_attempt
            assert current is not None and current.outcome is None
            assert current.where == task.state.removeprefix("running_")
        if task.terminal:
            assert not open_attempts

    @invariant()
    def local_after_remote_only_on_the_control_planes_word(self) -> None:
        task = self.task
        if task is None:
            return
        tokens = [a.token for a in task.attempts if a.token is not None]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
        for i, attempt in enumerate(task.attempts):
            if attempt.where == "local" and i > 0:
                assert attempt.placement_reasons[0] == "lease_dead_confirmed"
                assert attempt.token is not None
            if task.options.no_fallback:
                assert attempt.where == "remote"

    @invariant()
    def the_record_survives_a_round_trip_and_only_grows(self) -> None:
        if self.task is None:
            return
        assert Task.from_json(self.task.to_json()) == self.task
        if len(self.history) >= 2:
            older, newer = self.history[-2], self.history[-1]
            assert newer.reasons[: len(older.reasons)] == older.reasons
            assert len(newer.attempts) >= len(older.attempts)

    @invariant()
    def a_live_task_can_always_be_ended(self) -> None:
        if self.task is not None and not self.task.terminal:
            assert self.task.apply(Cancel("probe"), now_wall_ms=self.clock).state == "cancelled"


TestTaskMachine = TaskMachine.TestCase
TestTaskMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- request numbers (request-number replay) ------------------------------------------------


def test_a_request_sent_again_keeps_its_number_and_any_other_takes_a_new_one() -> None:
    task = new_task()
    task, first = task.request_number("grant")
    assert first == 1 and task.requests == LeaseRequests(
        pending="grant", pending_attempt=1, highest=1
    )
    # Its answer was lost: sent again, the same number (the control plane replays it).
    same, again = task.request_number("grant")
    assert (same, again) == (task, 1)
    # Another kind of request: above every number used so far.
    task, fallback = task.request_number("fallback")
    assert fallback == 2 and task.requests.highest == 2
    # Settled: the next request of the same kind takes a new number.
    task = task.request_settled()
    assert task.requests == LeaseRequests(highest=2)
    assert task.request_settled() is task
    _, third = task.request_number("fallback")
    assert third == 3


def test_a_request_number_is_above_every_attempt_recorded() -> None:
    task = placed_remote()  # attempt 1 recorded
    assert task.request_number("fallback")[1] == 2


def test_request_numbers_live_in_the_task_record() -> None:
    task, _ = new_task().request_number("local")
    body = task.to_json()
    assert body["requests"] == {"pending": "local", "pending_attempt": 1, "highest": 1}
    assert Task.from_json(body) == task
    # A record written before the numbers were kept reads as none used.
    old = {k: v for k, v in body.items() if k != "requests"}
    assert Task.from_json(old).requests == LeaseRequests()


@pytest.mark.parametrize(
    "bad",
    [
        {"pending": "lottery", "pending_attempt": 1, "highest": 1},
        {"pending": "grant", "pending_attempt": None, "highest": 1},
        {"pending": None, "pending_attempt": 2, "highest": 2},
        {"pending": "grant", "pending_attempt": 3, "highest": 2},
        {"pending": None, "pending_attempt": None, "highest": -1},
        {"pending": None, "pending_attempt": None, "highest": "1"},
    ],
)
def test_malformed_request_numbers_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        LeaseRequests.from_json(bad)


def test_an_unknown_pending_request_kind_is_refused_naming_the_field() -> None:
    with pytest.raises(
        BadRequest, match=r"^pending 'lottery' is not one of grant, local, fallback$"
    ) as refused:
        LeaseRequests.from_json({"pending": "lottery", "pending_attempt": 1, "highest": 1})
    assert (refused.value.code, refused.value.details) == ("bad_record", {"field": "pending"})


# -- --node, --node-fallback, --cwd, worker_left, exit codes ------------------------------


def test_a_pinned_task_never_runs_on_its_submitter_unless_it_may() -> None:
    """``--node w1``: placed locally (w1 could not take it) means failed, with the reason;
    ``--node-fallback`` lets it run here; ``--node`` naming the submitter itself runs here."""
    strict = run(
        new_task(node="w1"),
        PlacementStarted(),
        PlacedLocal("sub", ("node_pinned_unavailable", "node_ineligible")),
    )
    assert (strict.state, strict.attempts, strict.ended_by) == (
        "failed",
        (),
        "placed_local_no_fallback",
    )
    assert strict.terminal_reason == "node_pinned_unavailable"
    assert "no_node_fallback" in codes(strict) and "no_fallback" not in codes(strict)
    assert exit_status(strict) == EXIT_REFUSED
    allowed = run(
        new_task(node="w1", node_fallback=True),
        PlacementStarted(),
        PlacedLocal("sub", ("node_pinned_unavailable",)),
    )
    assert allowed.state == "running_local"
    itself = run(
        new_task(node="sub"), PlacementStarted(), PlacedLocal("sub", ("node_pinned_local",))
    )
    assert itself.state == "running_local"


def test_a_pinned_task_whose_remote_attempt_died_does_not_run_here() -> None:
    task = run(
        placed_remote(node="w1"),
        LeaseLost("worker_left", "the worker left the cluster"),
        LeaseDeadConfirmed("sub", TOK2, None, ("lease_released",)),
    )
    assert (task.state, len(task.attempts)) == ("failed", 1)
    assert exit_status(task) == EXIT_POPULI_FAILED  # it started; Populi could not finish it


def test_the_reason_a_holder_stopped_is_kept_for_the_fallback() -> None:
    task = run(placed_remote(), LeaseLost("worker_left", "the worker left the cluster"))
    assert task.state == "fallback_pending" and task.lost_reason() == "worker_left"
    assert run(placed_remote(), ControlPlaneUnreachable()).lost_reason() is None
    assert placed_remote().lost_reason() is None


def test_options_and_the_ending_survive_the_record() -> None:
    task = run(
        new_task(node="w1", node_fallback=True, cwd="/srv/code"),
        PlacementStarted(),
        PlacementFailed(("no_free_gpu",), "busy"),
    )
    again = Task.from_json(task.to_json())
    assert again == task and again.ended_by == "placement_failed"
    assert again.options.cwd == "/srv/code" and again.options.node_fallback
    old = task.to_json()
    del old["ended_by"], old["options"]["cwd"], old["options"]["node_fallback"]
    assert Task.from_json(old).ended_by is None  # records written before these fields


@pytest.mark.parametrize("cwd", ["relative/dir", "", "/a\0b", "/" + "x" * 5000])
def test_a_cwd_must_be_an_absolute_path(cwd: str) -> None:
    with pytest.raises(BadRequest) as refused:
        TaskOptions(cwd=cwd)
    assert refused.value.code == "bad_cwd"


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ((PlacementFailed(("no_free_gpu",), "busy"),), EXIT_REFUSED),
        ((PlacementFailed(("control_plane_unreachable",), ""),), EXIT_POPULI_FAILED),
        ((PopuliFailure("store_error", "disk"),), EXIT_POPULI_FAILED),
        ((PlacedLocal("sub", ("no_remote_candidate",)), Result(1, None, 127)), 127),
        ((PlacedLocal("sub", ("no_remote_candidate",)), Result(1, None, None, 9)), 137),
        ((Cancel("op"),), 130),
        ((Timeout("run"),), 124),
    ],
)
def test_exit_status_follows_the_table(events: tuple[TaskEvent, ...], status: int) -> None:
    task = run(new_task(), PlacementStarted(), *events)
    assert exit_status(task) == status
    assert exit_status(new_task()) is None


def test_no_fallback_with_no_remote_node_is_refused_not_a_failure_of_populi() -> None:
    task = run(
        new_task(no_fallback=True), PlacementStarted(), PlacedLocal("sub", ("no_remote_candidate",))
    )
    assert exit_status(task) == EXIT_REFUSED and "no_fallback" in codes(task)


# -- queued work follows capacity -----------------------------------------------------------


def test_a_replanned_queued_task_keeps_placing_and_logs_why() -> None:
    task = run(
        new_task(queue_timeout_s=600),
        PlacementStarted(),
        Replanned("replan_node_ineligible", waited_for="w1"),
        Replanned("replan_capacity_freed", waited_for="w2", node="w2"),
    )
    assert task.state == "placing" and task.attempts == ()
    assert [(r.code, r.detail) for r in task.reasons[2:]] == [
        ("replanned", "waited_for=w1 waiting_for=None"),
        ("replan_node_ineligible", "waited_for=w1 waiting_for=None"),
        ("replanned", "waited_for=w2 node=w2"),
        ("replan_capacity_freed", "waited_for=w2 node=w2"),
    ]
    assert Task.from_json(task.to_json()) == task


def test_running_work_is_never_replanned() -> None:
    for state in TASK_STATES:
        if state != "placing":
            assert "replanned" not in TRANSITIONS[state], state
    task = placed_remote()
    with pytest.raises(IllegalTaskTransition):
        task.apply(Replanned("replan_better_node", node="w2"), now_wall_ms=T0 + 9)
