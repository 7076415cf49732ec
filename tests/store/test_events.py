"""The event log: appended with the caller's time, paged by seq either way, filtered."""

from __future__ import annotations

import json

from populi_peer.store import Store
from populi_peer.store.events import Event, EventLog


def fill(log: EventLog) -> None:
    for at_ms, node_id, kind in [
        (100, "n-a", "joined"),
        (200, "n-b", "joined"),
        (300, "n-a", "cordoned"),
        (400, "n-a", "drained"),
        (500, "n-b", "left"),
    ]:
        log.append(at_ms=at_ms, node_id=node_id, kind=kind, actor="o-x")


def test_an_event_reads_back_with_the_time_it_was_given(store: Store) -> None:
    log = EventLog(store)
    log.append(
        at_ms=1_234,
        node_id="n-a",
        kind="settings_changed",
        actor="o-x",
        reason="because",
        detail={"b": 1, "a": "x"},
    )
    (event,) = log.page()
    assert event == Event(
        seq=1,
        at_ms=1_234,
        node_id="n-a",
        kind="settings_changed",
        actor="o-x",
        reason="because",
        detail={"a": "x", "b": 1},
    )
    # The wire form: every field in order, the detail as it is (events route, CLI --json).
    assert json.dumps(event.to_json()) == (
        '{"seq": 1, "at_ms": 1234, "node_id": "n-a", "kind": "settings_changed", '
        '"actor": "o-x", "reason": "because", "detail": {"a": "x", "b": 1}}'
    )


def test_detail_is_stored_sorted_and_anything_else_as_text(store: Store) -> None:
    log = EventLog(store)
    log.append(at_ms=1, node_id="n-a", kind="k", actor="a", detail={"z": 1, "a": 3})
    log.append(at_ms=2, node_id="n-a", kind="k", actor="a", detail={"when": b"x"})
    raw = [row[0] for row in store.execute("SELECT detail FROM events ORDER BY seq")]
    assert raw == ['{"a": 3, "z": 1}', '{"when": "b\'x\'"}']
    log.append(at_ms=3, node_id="n-a", kind="k", actor="a")
    assert log.page(after=2)[0].detail == {}


def test_pages_oldest_first_after_a_cursor(store: Store) -> None:
    log = EventLog(store)
    fill(log)
    assert [e.seq for e in log.page(limit=2)] == [1, 2]
    assert [e.seq for e in log.page(after=2, limit=2)] == [3, 4]
    assert [e.seq for e in log.page(after=5)] == []


def test_pages_newest_first_before_a_cursor(store: Store) -> None:
    log = EventLog(store)
    fill(log)
    assert [e.seq for e in log.page(newest_first=True, limit=2)] == [5, 4]
    assert [e.seq for e in log.page(newest_first=True, before=4, limit=2)] == [3, 2]
    assert [e.seq for e in log.page(newest_first=True, before=1)] == []


def test_filters_by_node_and_kind(store: Store) -> None:
    log = EventLog(store)
    fill(log)
    assert [e.kind for e in log.page(node_id="n-a")] == ["joined", "cordoned", "drained"]
    assert [e.seq for e in log.page(node_id="n-a", after=1, limit=1)] == [3]
    assert [e.node_id for e in log.page(kind="joined")] == ["n-a", "n-b"]
    assert [e.seq for e in log.page(node_id="n-b", newest_first=True)] == [5, 2]
    assert log.page(node_id="n-gone") == []


def test_filters_by_time_and_knows_its_newest_seq(store: Store) -> None:
    log = EventLog(store)
    assert log.last_seq() == 0
    fill(log)
    assert [e.seq for e in log.page(since_ms=300)] == [3, 4, 5]
    assert [e.seq for e in log.page(since_ms=300, node_id="n-b")] == [5]
    assert [e.seq for e in log.page(since_ms=300, newest_first=True, limit=2)] == [5, 4]
    assert log.last_seq() == 5
    assert log.mentions_node("n-b") and not log.mentions_node("n-gone")
    assert log.has_kind("left") and not log.has_kind("bogus")


def test_listeners_hear_every_append(store: Store) -> None:
    log = EventLog(store)
    heard: list[int] = []
    log.listeners.append(lambda: heard.append(log.last_seq()))
    fill(log)
    assert heard == [1, 2, 3, 4, 5]
