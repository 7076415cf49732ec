"""Canonical JSON (enrollment/canonical.py): what a signature can cover, and how an error
names the JSON type of a value — one table for enrollment's field problems and Populi's
message codec."""

from __future__ import annotations

from typing import Any

import pytest

from enrollment._sealed import _check_int, _FieldProblem
from enrollment.canonical import Unsignable, canonical_json, json_type, unsignable
from populi_peer.core.messages._codec import bad_field


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "null"),
        (True, "a boolean"),
        (3, "an integer"),
        (1.5, "a number"),
        ("x", "a string"),
        ([1], "a list"),
        ({"a": 1}, "an object"),
        ({1, 2}, "set"),
    ],
)
def test_errors_name_a_json_type_alike_in_enrollment_and_in_populi(
    value: object, name: str
) -> None:
    assert json_type(value) == name
    if name != "an integer":
        with pytest.raises(_FieldProblem) as problem:
            _check_int("n", value, 0, 10)
        assert problem.value.problem == f"must be an integer, got {name}"
    assert str(bad_field("n", "an integer", value)) == f"field 'n' must be an integer, got {name}"


@pytest.mark.parametrize(
    ("value", "problem", "message"),
    [
        (
            {"a": [1, 2.0]},
            Unsignable("float", ".a[1]", 2.0),
            "float at .a[1] cannot be signed; use an integer",
        ),
        (0.5, Unsignable("float", "", 0.5), "float at <root> cannot be signed; use an integer"),
        ({"a": {3: 1}}, Unsignable("key", ".a", 3), "non-string key at .a"),
        ([{"b": b"x"}], Unsignable("type", "[0].b", b"x"), "bytes at [0].b is not JSON"),
    ],
)
def test_what_canonical_json_cannot_carry_is_named_where_it_stands(
    value: Any, problem: Unsignable, message: str
) -> None:
    assert unsignable(value) == problem
    with pytest.raises(ValueError) as refused:
        canonical_json(value)
    assert str(refused.value) == message


def test_json_values_all_the_way_down_are_signable() -> None:
    value = {"a": [None, True, 1, "x", {"b": ()}]}
    assert unsignable(value) is None and unsignable(value, "value") is None
    assert canonical_json(value) == b'{"a":[null,true,1,"x",{"b":[]}]}'
