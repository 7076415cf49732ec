"""The typed messages and the OpenAPI contract cannot drift apart.

- the catalogue (``OPERATIONS``) names exactly the contract's operations, with a request
  type exactly where the contract documents a request body it reads;
- each type writes exactly the keys its contract schema documents (beside the envelope's
  ``v`` and ``server_time_ms``): a field added on one side only fails here;
- whatever an answer type can hold, what it writes validates against the operation's
  answer schema (drawn from the type alone: a type that takes more than the contract allows
  would let a handler send an answer the contract refuses);
- what a request type writes for a request the contract allows validates too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from populi_peer import PROTOCOL_VERSION
from populi_peer.core.messages import OPERATIONS
from support.messages import (
    answer_schema,
    drift,
    messages,
    operations,
    request_schema,
    validator,
)

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_the_catalogue_names_the_contracts_operations() -> None:
    assert sorted(OPERATIONS) == sorted(operations())


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_request_type_exactly_where_the_contract_reads_a_body(operation: str) -> None:
    documented = request_schema(operation)
    declared = OPERATIONS[operation].request
    assert (declared is None) == (documented is None), operation
    if declared is not None:
        assert not drift(declared, documented, operation)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_an_answer_type_writes_the_documented_keys(operation: str) -> None:
    """The answer and every record in it, down to the leaves."""
    assert not drift(OPERATIONS[operation].answer, answer_schema(operation), operation)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@SETTINGS
@given(data=st.data())
def test_what_an_answer_type_writes_validates_against_the_contract(
    operation: str, data: st.DataObject
) -> None:
    answer = data.draw(messages(OPERATIONS[operation].answer))
    body = {"v": PROTOCOL_VERSION, "server_time_ms": 0, **answer.to_json()}
    errors = sorted(validator(answer_schema(operation)).iter_errors(body), key=str)
    assert not errors, f"{operation}: {errors[0].message} at {list(errors[0].absolute_path)}"


@pytest.mark.parametrize(
    "operation", sorted(name for name, e in OPERATIONS.items() if e.request is not None)
)
@SETTINGS
@given(data=st.data())
def test_what_a_request_type_writes_validates_against_the_contract(
    operation: str, data: st.DataObject
) -> None:
    cls = OPERATIONS[operation].request
    schema = request_schema(operation)
    assert cls is not None and schema is not None
    request = data.draw(messages(cls, schema=schema))
    body = {"v": PROTOCOL_VERSION, **request.to_json()}
    errors = sorted(validator(schema).iter_errors(body), key=str)
    assert not errors, f"{operation}: {errors[0].message} at {list(errors[0].absolute_path)}"
    assert cls.from_json(body) == request
