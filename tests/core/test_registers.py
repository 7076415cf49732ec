from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.hlc import ClockSkewError, Hlc
from populi_peer.core.lifecycle import STATES, NodeLifecycle, WriterClass
from populi_peer.core.registers import (
    ATTRIBUTE_WRITERS,
    RegisterSet,
    RegisterWrite,
    Stamp,
    attribute_writers,
)
from populi_peer.errors import BadRequest, Forbidden

NOW = 1_700_000_000_000
SKEW = 300_000


def lifecycle_value(state: str = "cordoned", **kwargs: Any) -> dict[str, Any]:
    return NodeLifecycle(state, NOW, "op:alice", "disk swap", **kwargs).to_json()  # type: ignore[arg-type]


def write(
    *,
    node_id: str = "n1",
    attribute: str = "lifecycle",
    value: dict[str, Any] | None = None,
    term: int = 1,
    wall_ms: int = NOW,
    counter: int = 0,
    writer: str = "leader-1",
    writer_class: WriterClass = "leader",
    actor: str = "op:alice",
    reason: str = "because",
) -> RegisterWrite:
    if value is None and attribute == "lifecycle":
        value = lifecycle_value()
    return RegisterWrite(
        node_id=node_id,
        attribute=attribute,
        value=value,
        stamp=Stamp(term, Hlc(wall_ms, counter), writer),
        writer_class=writer_class,
        actor=actor,
        reason=reason,
        at_wall_ms=NOW,
    )


def tombstone(node_id: str = "n1", *, term: int = 1, wall_ms: int = NOW) -> RegisterWrite:
    return RegisterWrite(
        node_id=node_id,
        attribute="lifecycle",
        value=None,
        stamp=Stamp(term, Hlc(wall_ms, 0), "leader-1"),
        writer_class="operator",
        actor="op:alice",
        reason="forget",
        at_wall_ms=NOW,
    )


def apply_all(writes: list[RegisterWrite], start: RegisterSet | None = None) -> RegisterSet:
    regs = start if start is not None else RegisterSet()
    for w in writes:
        regs, _ = regs.apply(w, now_wall_ms=NOW, max_skew_ms=SKEW)
    return regs


# --- stamps ------------------------------------------------------------------------------


def test_stamp_orders_by_term_then_hlc_then_writer() -> None:
    assert Stamp(1, Hlc(9_999, 9), "z") < Stamp(2, Hlc(0, 0), "a")
    assert Stamp(1, Hlc(5, 0), "z") < Stamp(1, Hlc(5, 1), "a")
    assert Stamp(1, Hlc(5, 1), "a") < Stamp(1, Hlc(5, 1), "b")


def test_stamp_json_round_trip() -> None:
    stamp = Stamp(3, Hlc(NOW, 2), "node-a")
    assert Stamp.from_json(stamp.to_json()) == stamp
    assert Stamp.from_json({**stamp.to_json(), "extra": 1}) == stamp


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"term": 1, "hlc": {"wall_ms": 1, "counter": 0}},
        {"term": -1, "hlc": {"wall_ms": 1, "counter": 0}, "writer": "w"},
    ],
)
def test_stamp_from_json_refuses_malformed(bad: object) -> None:
    with pytest.raises(BadRequest):
        Stamp.from_json(bad)


# --- declared writers --------------------------------------------------------------------


def test_declared_attributes() -> None:
    assert dict(ATTRIBUTE_WRITERS) == {
        "lifecycle": {"operator", "leader", "self"},
        "gpu_quarantine/<uuid>": {"self", "operator", "leader"},
        "addresses": {"self"},
        "labels": {"operator", "self"},
        "member": {"leader", "operator"},
    }
    assert attribute_writers("gpu_quarantine/GPU-8f6b2c1e-aaaa-bbbb") == {
        "self",
        "operator",
        "leader",
    }


@pytest.mark.parametrize(
    "attribute",
    ["hostname", "gpu_quarantine/", "gpu_quarantine/a/b", "Lifecycle", "gpu_quarantine"],
)
def test_undeclared_attribute_is_refused_naming_it(attribute: str) -> None:
    with pytest.raises(BadRequest) as info:
        write(attribute=attribute, value={"x": 1})
    assert info.value.code == "undeclared_attribute"
    assert repr(attribute) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("attribute", "writer_class", "value"),
    [
        ("addresses", "operator", {"addrs": []}),
        ("addresses", "leader", {"addrs": []}),
        ("labels", "leader", {"zone": "desk"}),
    ],
)
def test_undeclared_writer_class_is_forbidden_naming_attribute_and_class(
    attribute: str, writer_class: WriterClass, value: dict[str, Any]
) -> None:
    with pytest.raises(Forbidden) as info:
        write(attribute=attribute, writer_class=writer_class, value=value)
    message = str(info.value)
    assert repr(attribute) in message
    assert repr(writer_class) in message
    assert info.value.code == "writer_not_allowed"


def test_unknown_writer_class_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="unknown writer class 'root'"):
        write(writer_class="root")  # type: ignore[arg-type]


def test_self_write_must_be_stamped_by_the_node_itself() -> None:
    write(attribute="addresses", value={"a": ["10.0.0.2"]}, writer="n1", writer_class="self")
    with pytest.raises(Forbidden, match="stamped by that node, not 'n2'"):
        write(attribute="addresses", value={"a": ["10.0.0.2"]}, writer="n2", writer_class="self")


def test_a_node_may_write_only_left_about_its_own_lifecycle() -> None:
    write(value=lifecycle_value("left"), writer="n1", writer_class="self")
    for state in STATES:
        if state == "left":
            continue
        with pytest.raises(Forbidden, match=f"not '{state}'"):
            write(value=lifecycle_value(state), writer="n1", writer_class="self")


def test_a_node_may_quarantine_its_gpu_but_not_release_it() -> None:
    attr = "gpu_quarantine/GPU-1"
    write(attribute=attr, value={"quarantined": True}, writer="n1", writer_class="self")
    write(attribute=attr, value={"quarantined": False}, writer_class="operator")
    with pytest.raises(Forbidden, match="may not release its own GPU quarantine"):
        write(attribute=attr, value={"quarantined": False}, writer="n1", writer_class="self")
    with pytest.raises(BadRequest, match="'quarantined' must be true or false"):
        write(attribute=attr, value={"quarantined": "yes"}, writer_class="operator")


def test_lifecycle_value_must_be_a_lifecycle_record() -> None:
    with pytest.raises(BadRequest):
        write(value={"state": "sleeping", "since_wall_ms": 1, "actor": "a", "reason": ""})


def test_only_operator_or_leader_write_tombstones_and_only_on_lifecycle() -> None:
    tombstone()
    with pytest.raises(Forbidden):
        RegisterWrite("n1", "lifecycle", None, Stamp(1, Hlc(NOW, 0), "n1"), "self", "n1", "", NOW)
    with pytest.raises(BadRequest, match="only lifecycle has tombstones"):
        RegisterWrite("n1", "labels", None, Stamp(1, Hlc(NOW, 0), "op"), "operator", "op", "", NOW)


@pytest.mark.parametrize(
    "value", [{"x": 1.5}, {"x": float("nan")}, {"x": {1: 2}}, {"x": object()}, [1, 2]]
)
def test_values_must_be_json_objects_without_floats(value: Any) -> None:
    with pytest.raises(BadRequest):
        write(attribute="labels", value=value, writer_class="operator")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": [0, 1.5]}, "register value: float at value.x[1]; use an integer (ms, bytes)"),
        ({"x": {"y": {1: 2}}}, "register value: non-string key 1 at value.x.y"),
        ({"x": (1, {2})}, "register value: set at value.x[1] is not JSON"),
    ],
)
def test_a_value_canonical_json_cannot_carry_is_refused_naming_where(
    value: dict[str, Any], message: str
) -> None:
    """The rule is canonical JSON's (enrollment.canonical.unsignable); the words are the
    register's."""
    with pytest.raises(BadRequest) as refused:
        write(attribute="labels", value=value, writer_class="operator")
    assert str(refused.value) == message


def test_value_is_copied_so_the_caller_cannot_change_a_stored_write() -> None:
    value = {"zone": ["desk"]}
    w = write(attribute="labels", value=value, writer_class="operator")
    value["zone"].append("attic")
    assert w.value == {"zone": ["desk"]}


# --- apply -------------------------------------------------------------------------------


def test_greatest_stamp_wins_whatever_the_arrival_order() -> None:
    older = write(value=lifecycle_value("cordoned"), wall_ms=NOW - 10)
    newer = write(value=lifecycle_value("draining"), wall_ms=NOW - 5)
    regs, changed = RegisterSet().apply(older, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert changed
    regs2, changed = regs.apply(newer, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert changed
    regs3, changed = regs2.apply(older, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert not changed
    assert regs3 is regs2
    assert regs3.get("n1", "lifecycle") == newer
    # The originals are untouched: sets are immutable.
    assert regs.get("n1", "lifecycle") == older


def test_higher_term_beats_a_later_clock() -> None:
    deposed = write(value=lifecycle_value("active"), term=1, wall_ms=NOW)
    current = write(value=lifecycle_value("cordoned"), term=2, wall_ms=NOW - 60_000)
    assert apply_all([current, deposed]).get("n1", "lifecycle") == current


def test_duplicate_write_changes_nothing() -> None:
    w = write()
    regs = apply_all([w])
    again, changed = regs.apply(w, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert not changed
    assert again == regs


def test_equal_stamps_with_different_content_resolve_the_same_everywhere() -> None:
    a = write(value=lifecycle_value("cordoned"))
    b = write(value=lifecycle_value("draining"))
    assert a.stamp == b.stamp
    assert apply_all([a, b]) == apply_all([b, a])


def test_write_beyond_the_skew_budget_is_refused_and_changes_nothing() -> None:
    regs = apply_all([write(attribute="labels", value={"z": "a"}, writer_class="operator")])
    at_limit = write(
        attribute="labels", value={"z": "b"}, writer_class="operator", wall_ms=NOW + SKEW
    )
    beyond = write(
        attribute="labels", value={"z": "c"}, writer_class="operator", wall_ms=NOW + SKEW + 1
    )
    with pytest.raises(ClockSkewError) as info:
        regs.apply(beyond, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert "300.001 s ahead" in str(info.value)
    assert regs.value("n1", "labels") == {"z": "a"}
    after, changed = regs.apply(at_limit, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert changed
    assert after.value("n1", "labels") == {"z": "b"}


def test_registers_are_per_node_and_attribute() -> None:
    regs = apply_all(
        [
            write(node_id="n1"),
            write(node_id="n2", value=lifecycle_value("draining")),
            write(node_id="n1", attribute="labels", value={"z": "a"}, writer_class="operator"),
            write(node_id="n1", attribute="gpu_quarantine/GPU-1", value={"quarantined": True}),
            write(node_id="n1", attribute="gpu_quarantine/GPU-2", value={"quarantined": False}),
        ]
    )
    assert len(regs) == 5
    assert regs.node_ids() == ("n1", "n2")
    assert set(regs.node("n1")) == {
        "lifecycle",
        "labels",
        "gpu_quarantine/GPU-1",
        "gpu_quarantine/GPU-2",
    }
    lc = regs.lifecycle("n2")
    assert lc is not None
    assert lc.state == "draining"
    assert regs.lifecycle("n3") is None
    assert [w.key for w in regs.writes()] == sorted(w.key for w in regs.writes())


def test_tombstone_forgets_the_node_and_no_late_write_brings_it_back() -> None:
    labels = write(attribute="labels", value={"z": "a"}, writer_class="operator")
    regs = apply_all([write(), labels])
    # Tombstone with a smaller stamp than the live write: it still wins.
    gone = apply_all([tombstone(wall_ms=NOW - 10**6)], regs)
    assert gone.is_deleted("n1")
    assert gone.node_ids() == ()
    assert gone.lifecycle("n1") is None
    assert gone.value("n1", "labels") is None
    assert dict(gone.node("n1")) == {}
    late = write(value=lifecycle_value("active"), term=9, wall_ms=NOW)
    late_labels = write(attribute="labels", value={"z": "b"}, writer_class="operator", term=9)
    again, changed = gone.apply(late, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert not changed
    again, changed = again.apply(late_labels, now_wall_ms=NOW, max_skew_ms=SKEW)
    assert not changed
    assert again == gone
    assert len(again) == 1


def test_apply_refuses_something_that_is_not_a_write() -> None:
    with pytest.raises(BadRequest):
        RegisterSet().apply({"node_id": "n1"}, now_wall_ms=NOW, max_skew_ms=SKEW)  # type: ignore[arg-type]


def test_register_set_is_immutable_and_unhashable() -> None:
    regs = RegisterSet()
    with pytest.raises(AttributeError):
        regs._by_key = {}
    with pytest.raises(TypeError):
        hash(regs)


# --- JSON --------------------------------------------------------------------------------


def test_write_json_round_trip_ignores_unknown_fields() -> None:
    for w in (
        write(),
        tombstone(),
        write(
            attribute="addresses", value={"a": ["10.0.0.2:7443"]}, writer="n1", writer_class="self"
        ),
    ):
        data = w.to_json()
        assert data["v"] == 1
        assert RegisterWrite.from_json(json.loads(json.dumps(data))) == w
        assert RegisterWrite.from_json({**data, "signature": "..."}) == w


@pytest.mark.parametrize(
    "missing",
    ["node_id", "attribute", "value", "stamp", "writer_class", "actor", "reason", "at_wall_ms"],
)
def test_write_from_json_refuses_a_missing_field_naming_it(missing: str) -> None:
    data = write().to_json()
    del data[missing]
    with pytest.raises(BadRequest, match=repr(missing)):
        RegisterWrite.from_json(data)


def test_set_json_round_trip_ignores_unknown_fields() -> None:
    regs = apply_all(
        [
            write(),
            tombstone("n2"),
            write(
                node_id="n3", attribute="labels", value={"a": "b"}, writer_class="self", writer="n3"
            ),
        ]
    )
    data = json.loads(json.dumps(regs.to_json()))
    assert RegisterSet.from_json(data) == regs
    assert RegisterSet.from_json({**data, "generation": 7}) == regs


@pytest.mark.parametrize("bad", [None, [], {"registers": {}}, {"registers": [{"node_id": "n1"}]}])
def test_set_from_json_refuses_malformed(bad: object) -> None:
    with pytest.raises(BadRequest):
        RegisterSet.from_json(bad)


# --- merge laws (hypothesis) ---------------------------------------------------------------

NODES = ("n1", "n2")
ATTRIBUTES = ("lifecycle", "labels", "addresses", "gpu_quarantine/GPU-1")


@st.composite
def writes(draw: st.DrawFn) -> RegisterWrite:
    node_id = draw(st.sampled_from(NODES))
    attribute = draw(st.sampled_from(ATTRIBUTES))
    writer_class: WriterClass = draw(st.sampled_from(sorted(attribute_writers(attribute))))
    writer = node_id if writer_class == "self" else draw(st.sampled_from(("leader-1", "op")))
    value: dict[str, Any] | None
    if attribute == "lifecycle":
        if writer_class == "self":
            value = lifecycle_value("left")
        elif draw(st.integers(0, 9)) == 0:
            value = None
        else:
            value = lifecycle_value(draw(st.sampled_from(("active", "cordoned", "quarantined"))))
    elif attribute.startswith("gpu_quarantine/"):
        value = {"quarantined": writer_class == "self" or draw(st.booleans())}
    else:
        value = {"v": draw(st.integers(0, 3))}
    # Small stamp space so that ties and equal stamps with different content happen.
    return RegisterWrite(
        node_id=node_id,
        attribute=attribute,
        value=value,
        stamp=Stamp(
            draw(st.integers(1, 2)),
            Hlc(NOW - draw(st.integers(0, 2)), draw(st.integers(0, 1))),
            writer,
        ),
        writer_class=writer_class,
        actor=draw(st.sampled_from(("op:alice", "op:bob"))),
        reason="r",
        at_wall_ms=NOW,
    )


write_lists = st.lists(writes(), max_size=25)


@given(ws=write_lists, data=st.data())
def test_any_permutation_or_duplication_of_writes_gives_one_state(
    ws: list[RegisterWrite], data: st.DataObject
) -> None:
    reordered = data.draw(st.permutations(ws))
    duplicated = reordered + data.draw(st.lists(st.sampled_from(ws), max_size=10)) if ws else []
    duplicated = data.draw(st.permutations(duplicated))
    assert apply_all(ws) == apply_all(reordered) == apply_all(duplicated)


@given(ws=write_lists)
def test_the_winner_of_each_register_is_its_greatest_write(ws: list[RegisterWrite]) -> None:
    regs = apply_all(ws)
    deleted = {w.node_id for w in ws if w.attribute == "lifecycle" and w.value is None}
    for node_id in NODES:
        for attribute in ATTRIBUTES:
            candidates = [w for w in ws if w.key == (node_id, attribute)]
            got = regs.get(node_id, attribute)
            if (node_id in deleted and attribute != "lifecycle") or not candidates:
                assert got is None
            else:
                assert got is not None
                assert got in candidates
                tombstones = [w for w in candidates if w.value is None]
                pool = tombstones or candidates
                assert got.stamp == max(w.stamp for w in pool)


@given(a=write_lists, b=write_lists)
def test_merge_is_commutative(a: list[RegisterWrite], b: list[RegisterWrite]) -> None:
    x, y = apply_all(a), apply_all(b)
    assert x.merge(y) == y.merge(x)


@given(a=write_lists, b=write_lists, c=write_lists)
def test_merge_is_associative(
    a: list[RegisterWrite], b: list[RegisterWrite], c: list[RegisterWrite]
) -> None:
    x, y, z = apply_all(a), apply_all(b), apply_all(c)
    assert x.merge(y).merge(z) == x.merge(y.merge(z))


@given(a=write_lists)
def test_merge_is_idempotent(a: list[RegisterWrite]) -> None:
    x = apply_all(a)
    assert x.merge(x) == x
    assert x.merge(RegisterSet()) == x
    assert RegisterSet().merge(x) == x


@given(a=write_lists, b=write_lists)
def test_merge_equals_applying_all_writes(a: list[RegisterWrite], b: list[RegisterWrite]) -> None:
    assert apply_all(a).merge(apply_all(b)) == apply_all(a + b)


@given(a=write_lists)
def test_set_survives_json(a: list[RegisterWrite]) -> None:
    regs = apply_all(a)
    assert RegisterSet.from_json(json.loads(json.dumps(regs.to_json()))) == regs
