"""Typed wire messages (populi_peer/core/messages): round trips, the protocol's rule on
unknown fields, one clear error naming the field for anything malformed, and never an
exception other than the error tree's, whatever the bytes."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from populi_peer.core.fencing import FencingToken
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import GrantRequest
from populi_peer.core.messages import (
    GpuDevice,
    HeartbeatAnswer,
    HeartbeatReport,
    InboxDeliverAnswer,
    InboxMessage,
    LeaseGrantRequest,
    LeaseView,
    Message,
    TaskSubmitRequest,
)
from populi_peer.core.messages._codec import Codec, Dict, Int, Num, Seq, Text
from populi_peer.errors import BadRequest, PopuliError
from support.fuzz import json_paths
from support.messages import every_message_type, json_values, messages

TYPES = every_message_type()
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_type_is_a_frozen_message() -> None:
    assert len(TYPES) > 60
    for cls in TYPES:
        assert issubclass(cls, Message)
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", TYPES, ids=lambda cls: cls.__name__)
@SETTINGS
@given(data=st.data())
def test_round_trip_through_json_text(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    wire = json.loads(json.dumps(message.to_json()))
    assert cls.from_json(wire) == message
    # Unknown fields are ignored (version N talks to N-1), and the envelope is not a field.
    assert cls.from_json({**wire, "v": 1, "server_time_ms": 0, "a_later_field": [1]}) == message


def _replaced(value: Any, path: tuple[Any, ...], new: Any, *, drop: bool) -> Any:
    head, *rest = path
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[head] = _replaced(copy[head], tuple(rest), new, drop=drop)
    elif drop and isinstance(copy, dict):
        del copy[head]
    else:
        copy[head] = new
    return copy


@pytest.mark.parametrize("cls", TYPES, ids=lambda cls: cls.__name__)
@SETTINGS
@given(data=st.data())
def test_a_spoiled_body_parses_or_is_one_clear_error(
    cls: type[Message], data: st.DataObject
) -> None:
    """Replace or drop any value anywhere in a valid body: the parser answers a message or
    a PopuliError with one line, never a KeyError, TypeError or AttributeError."""
    wire = data.draw(messages(cls)).to_json()
    paths = json_paths(wire)
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    spoiled = _replaced(wire, path, data.draw(json_values), drop=data.draw(st.booleans()))
    try:
        cls.from_json(spoiled)
    except PopuliError as exc:
        text = str(exc)
        assert text and "\n" not in text
        assert text.startswith(cls.WHAT + ":")


@given(junk=json_values)
@settings(max_examples=200)
def test_any_json_at_all_parses_or_is_a_bad_request(junk: Any) -> None:
    for cls in (HeartbeatAnswer, HeartbeatReport, InboxMessage, InboxDeliverAnswer, LeaseView):
        try:
            cls.from_json(junk)
        except PopuliError:
            pass


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"term": 1}, "control_plane", "bad_request"),
        ({"term": "1"}, "term", "bad_request"),
    ],
)
def test_errors_name_the_field(body: dict[str, Any], field: str, code: str) -> None:
    with pytest.raises(BadRequest) as raised:
        HeartbeatAnswer.from_json(body)
    assert raised.value.code == code and raised.value.details["field"] == field
    assert f"'{field}'" in str(raised.value)


_BOUNDED: list[tuple[Codec[Any], object, bool]] = [
    (Int(1, 3), 1, True),
    (Int(1, 3), 3, True),
    (Int(1, 3), 0, False),
    (Int(1, 3), 4, False),
    (Int(maximum=3), -(2**70), True),
    (Num(0.5, 2.0), 0.5, True),
    (Num(0.5, 2.0), 2.5, False),
    (Num(above=0.0), 0.0, False),
    (Text(min_len=1, max_len=2), "", False),
    (Text(min_len=1, max_len=2), "ab", True),
    (Text(min_len=1, max_len=2), "abc", False),
    (Seq(Int(), min_items=1, max_items=2), [], False),
    (Seq(Int(), min_items=1, max_items=2), [1, 2], True),
    (Seq(Int(), max_items=2), [1, 2, 3], False),
    (Dict(Int(), max_items=1), {"a": 1}, True),
    (Dict(Int(), max_items=1), {"a": 1, "b": 2}, False),
]


@pytest.mark.parametrize(("codec", "value", "ok"), _BOUNDED)
def test_bounds_are_inclusive_and_a_missing_bound_is_none(
    codec: Codec[Any], value: object, ok: bool
) -> None:
    if ok:
        codec.parse(value, "f")
    else:
        with pytest.raises(BadRequest) as caught:
            codec.parse(value, "f")
        assert caught.value.details["field"] == "f"


def test_a_core_records_error_keeps_its_code_under_the_path() -> None:
    """A token is parsed by FencingToken itself: its code stays, the path goes in front."""
    with pytest.raises(BadRequest) as raised:
        HeartbeatReport.from_json(
            {
                "leases": [
                    {
                        "task_id": "t",
                        "attempt": 1,
                        "token": "1.02",
                        "lease_id": None,
                        "state": "running",
                    }
                ]
            }
        )
    assert raised.value.code == "bad_fencing_token"
    assert raised.value.details["field"] == "leases[0].token"
    report = HeartbeatReport.from_json(
        {
            "leases": [
                {
                    "task_id": "t",
                    "attempt": 1,
                    "token": "10.2",
                    "lease_id": None,
                    "state": "running",
                }
            ]
        }
    )
    assert report.leases[0].token == FencingToken(10, 2) > FencingToken(9, 99)


def test_a_grant_request_becomes_the_cores_with_the_signer_as_submitter() -> None:
    body = LeaseGrantRequest.from_json(
        {
            "task_id": "t-1",
            "attempt": 2,
            "work_class": "agent",
            "target": "w1",
            "gpus_wanted": 0,
            "ttl_s": 30,
            "submitter": "forged",
            "previous_node": "w0",
            "gpu_mem_bytes": 2**30,
            "gpu_model": "H100",
        }
    )
    grant = body.grant("s1")
    assert isinstance(grant, GrantRequest) and grant.submitter == "s1"
    # Every field of the wire's request reaches the core's, as it came.
    assert {f.name: getattr(grant, f.name) for f in fields(body)} == {
        f.name: getattr(body, f.name) for f in fields(body)
    }
    assert "submitter" not in body.to_json()


def test_a_gpu_of_a_hint_and_its_device_view_convert_both_ways() -> None:
    hint = GpuHint(
        index=2,
        uuid="GPU-2",
        name="H100",
        memory_total_bytes=80 * 2**30,
        memory_free_bytes=70 * 2**30,
        utilization_gpu_pct=12,
        health="degraded",
        health_reasons=("gpu_ecc_errors",),
        allocatable=False,
        allocation_reasons=("gpu_quarantined",),
        verified=True,
    )
    device = GpuDevice.of(hint)
    assert device.quarantined and device.quarantine_reason is None
    assert device.hint() == hint
    assert GpuDevice.from_json(device.to_json()) == device


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"work_class": "mining"}, "unknown_work_class"),
        ({"work_class": ["agent"]}, "bad_request"),
        ({"command": ["", "x"]}, "bad_request"),
        ({"env": {"POPULI_TASK_ID": "x"}}, "bad_env"),
        ({"gpus": 65}, "bad_request"),
    ],
)
def test_shared_rules_give_their_own_codes(changes: dict[str, Any], code: str) -> None:
    with pytest.raises(BadRequest) as raised:
        TaskSubmitRequest.from_json({"command": ["true"], **changes})
    assert raised.value.code == code


def test_an_empty_body_reads_as_the_defaults_only_where_nothing_is_required() -> None:
    assert not HeartbeatReport.requires_body()
    assert HeartbeatReport.from_json({}).status == "running"
    assert TaskSubmitRequest.requires_body()
