"""The shared checks for ids, attempts, commands and environments."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from populi_peer.core.fencing import FencingToken
from populi_peer.core.hlc import Hlc
from populi_peer.core.wire import (
    MAX_ATTEMPT,
    FieldsRecord,
    check_attempt,
    check_command,
    check_count,
    check_env,
    check_id,
    json_record,
    record_json,
    task_attempt,
)
from populi_peer.errors import BadRequest


@pytest.mark.parametrize("value", ["t-1", "a", "A.b_c:d-9", "9" * 128])
def test_ids_accepted(value: str) -> None:
    assert check_id(value, "task_id") == value


@pytest.mark.parametrize(
    "value", ["", ".", "..", ".hidden", "-x", "a/b", "a b", "9" * 129, 7, None]
)
def test_ids_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="task_id"):
        check_id(value, "task_id")


@pytest.mark.parametrize("value", [1, 2, MAX_ATTEMPT])
def test_attempts_accepted(value: int) -> None:
    assert check_attempt(value, "result") == value


@pytest.mark.parametrize("value", [0, -1, MAX_ATTEMPT + 1, True, 1.0, "1", None])
def test_attempts_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="result 'attempt'"):
        check_attempt(value, "result")


def test_counts_accepted_from_their_minimum() -> None:
    assert check_count(0, "gpus_wanted") == 0
    assert check_count(1, "gpu_mem_bytes", 1) == 1


@pytest.mark.parametrize(("value", "minimum"), [(-1, 0), (0, 1), (True, 0), (1.0, 0), ("1", 0)])
def test_counts_refused_naming_the_field(value: object, minimum: int) -> None:
    with pytest.raises(BadRequest) as caught:
        check_count(value, "gpus_wanted", minimum)
    assert str(caught.value) == f"gpus_wanted must be an integer >= {minimum}, got {value!r}"
    assert caught.value.code == "bad_request"
    assert caught.value.details == {"field": "gpus_wanted"}


def test_task_attempt_reads_both() -> None:
    assert task_attempt({"task_id": "t-1", "attempt": 3}, "cancel") == ("t-1", 3)
    with pytest.raises(BadRequest, match="task_id"):
        task_attempt({"attempt": 3}, "cancel")
    with pytest.raises(BadRequest, match="cancel 'attempt'"):
        task_attempt({"task_id": "t-1"}, "cancel")


def test_commands() -> None:
    assert check_command(["true", ""]) == ("true", "")
    for bad in ([], [""], ["a\0b"], "true", [1], None):
        with pytest.raises(BadRequest, match="command"):
            check_command(bad)


def test_envs() -> None:
    assert check_env({"A": "1", "B": ""}) == {"A": "1", "B": ""}
    for bad, code in (
        ({"POPULI_X": "1"}, "bad_env"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "bad_env"),
        ({"A=B": "1"}, "bad_env"),
        ({"": "1"}, "bad_env"),
        ({"A": "a\0"}, "bad_env"),
        ({"A": 1}, "bad_request"),
        (["A"], "bad_request"),
    ):
        with pytest.raises(BadRequest) as caught:
            check_env(bad)
        assert caught.value.code == code, bad


def test_a_json_record_needs_an_object_with_its_fields() -> None:
    assert json_record({"a": 1, "extra": 2}, "thing", ("a",)) == {"a": 1, "extra": 2}
    with pytest.raises(BadRequest, match=r"^thing must be a JSON object, got a list$"):
        json_record([], "thing", ("a",))
    with pytest.raises(BadRequest, match=r"^thing must be a JSON object, got null$"):
        json_record(None, "thing")
    with pytest.raises(BadRequest, match=r"^thing: missing field 'b'$") as caught:
        json_record({"a": 1}, "thing", ("a", "b"))
    assert caught.value.details == {"field": "b"}


def test_record_json_writes_lists_and_records_and_leaves_out_none_and_omitted() -> None:
    @dataclass(frozen=True)
    class Held:
        token: FencingToken
        gpus: tuple[str, ...]
        note: str | None = None
        timer: float = 0.0

    held = Held(FencingToken(3, 7), ("GPU-a", "GPU-b"))
    assert list(record_json(held, omit=("timer",)).items()) == [
        ("token", "3.7"),
        ("gpus", ["GPU-a", "GPU-b"]),
    ]
    assert record_json(Held(FencingToken(0, 1), (), "why"))["note"] == "why"
    assert record_json(Held(FencingToken(0, 1), ()), nulls=True)["note"] is None

    @dataclass(frozen=True)
    class Nested:
        clocks: tuple[Hlc, ...]

    assert record_json(Nested((Hlc(5, 1),))) == {"clocks": [{"wall_ms": 5, "counter": 1}]}

    @dataclass(frozen=True, slots=True)
    class Record(FieldsRecord):
        token: FencingToken
        note: str | None = None

    record = Record(FencingToken(3, 7))
    assert record.to_json() == record_json(record) == {"token": "3.7"}


def test_record_json_writes_a_mapping_as_a_copy_with_its_values_written() -> None:
    """A mapping field (a task's env, read-only or not) is written as a new dict: the JSON
    can be changed (redacted) without changing the record, and a read-only mapping
    becomes something json.dumps takes."""
    from types import MappingProxyType

    @dataclass(frozen=True)
    class WithEnv:
        env: Mapping[str, str]
        stamps: Mapping[str, Hlc]

    env = {"A": "1"}
    record = WithEnv(env, MappingProxyType({"s": Hlc(5, 1)}))
    body = record_json(record)
    assert body == {"env": {"A": "1"}, "stamps": {"s": {"wall_ms": 5, "counter": 1}}}
    body["env"]["A"] = "redacted"
    assert env == {"A": "1"}
    assert json.loads(json.dumps(body))["stamps"]["s"]["counter"] == 1
