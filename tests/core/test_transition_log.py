"""The fields of one transition's log line (``core.transition_log``)."""

from __future__ import annotations

from dataclasses import replace

from populi_peer.core.fencing import FencingToken
from populi_peer.core.tasks import PlacedRemote, PlacementStarted, Result, Task, event_key
from populi_peer.core.transition_log import lease_transition_fields, task_transition_fields
from support.reports import sample_lease

T0 = 1_700_000_000_000


def placed() -> tuple[Task, Task, PlacedRemote]:
    task = Task.new(
        "t-1", command=("true",), env={}, gpus_wanted=1, work_class="agent", created_wall_ms=T0
    ).apply(PlacementStarted(), now_wall_ms=T0)
    event = PlacedRemote(
        node="n-w", lease_id="l-1", token=FencingToken(1, 1), reasons=("nearest_scope",)
    )
    return task, task.apply(event, now_wall_ms=T0 + 1), event


def test_a_task_line_names_its_attempt_lease_token_and_the_codes_the_record_keeps() -> None:
    before, after, event = placed()
    fields = task_transition_fields(before, after, event_key(before, event))
    assert fields is not None
    assert (fields["attempt"], fields["lease_id"], fields["token"]) == (1, "l-1", "1.1")
    assert (fields["decision"], fields["reason"], fields["reasons"]) == (
        "placed_remote",
        "nearest_scope",
        ["nearest_scope"],
    )
    assert (fields["from_state"], fields["state"]) == ("placing", "running_remote")
    added = [entry.code for entry in after.reasons[len(before.reasons) :]]
    assert [fields["decision"], *fields["reasons"]] == added


def test_a_late_result_changes_nothing_and_logs_nothing() -> None:
    _, task, _ = placed()
    done = task.apply(Result(attempt=1, token=FencingToken(1, 1), exit_code=0), now_wall_ms=T0)
    late = Result(attempt=1, token=FencingToken(1, 1), exit_code=0)
    assert task_transition_fields(done, done.apply(late, now_wall_ms=T0), "result_late") is None


def test_a_lease_line_only_when_its_state_changes() -> None:
    lease = sample_lease()
    granted = lease_transition_fields(None, lease)
    assert granted is not None and (granted["reason"], granted["state"]) == ("granted", "live")
    assert lease_transition_fields(lease, replace(lease, expires_mono=5.0)) is None
    expired = lease_transition_fields(lease, replace(lease, state="expired", reason="expired"))
    assert expired is not None
    assert (expired["from_state"], expired["state"], expired["reason"]) == (
        "live",
        "expired",
        "expired",
    )
    assert (expired["task_id"], expired["attempt"], expired["token"]) == ("t-1", 1, "1.1")
