"""``GET /v1/populi/events``: the newest page, newest last; names beside ids; filters that
refuse what they do not know; a follower woken by the next event, not by polling.

On virtual time through the agent's own app (every answer validated against the contract).
"""

from __future__ import annotations

from typing import Any

import trio

from populi_peer.agent.agent import Agent
from support.clients import signed_client


async def events(agent: Agent, **params: Any) -> tuple[int, dict[str, Any]]:
    async with signed_client(agent) as client:
        answer = await client.get("/v1/populi/events", params=params)
    return answer.status_code, answer.json()


def append(agent: Agent, count: int, *, kind: str = "register") -> None:
    for index in range(count):
        agent.events.append(
            at_ms=10_000 + index,
            node_id=agent.node_id,
            kind=kind,  # type: ignore[arg-type]
            actor=agent.node_id,
            detail={"index": index},
        )


async def test_the_page_holds_the_newest_events_with_the_newest_last(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    before = virtual_agent.events.last_seq()
    append(virtual_agent, 250)
    newest = before + 250
    status, page = await events(virtual_agent)
    assert status == 200
    seqs = [e["seq"] for e in page["events"]]
    assert seqs == list(range(newest - 199, newest + 1))  # the newest 200, newest last
    assert page["earlier"] is True and page["next_after"] == newest
    status, small = await events(virtual_agent, limit=3)
    assert [e["seq"] for e in small["events"]] == [newest - 2, newest - 1, newest]
    # With a cursor: what came after it, oldest first.
    status, after = await events(virtual_agent, after=before, limit=2)
    assert [e["seq"] for e in after["events"]] == [before + 1, before + 2]
    assert after["earlier"] is False and after["next_after"] == before + 2


async def test_since_and_kind_narrow_the_page_and_names_stand_beside_ids(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    append(virtual_agent, 5, kind="gpu_resumed")
    status, page = await events(virtual_agent, kind="gpu_resumed", since_ms=10_003)
    assert status == 200
    assert [e["detail"]["index"] for e in page["events"]] == [3, 4]
    assert {e["node_name"] for e in page["events"]} == {"cp"}
    status, created = await events(virtual_agent, kind="cluster_created", node="cp")
    (event,) = created["events"]
    assert event["node_id"] == virtual_agent.node_id and event["node_name"] == "cp"
    operator = virtual_agent.certificates.identity.operator
    assert operator is not None and event["actor"] == operator.principal_id
    assert event["actor_name"] is not None


async def test_unknown_filters_are_refused_not_answered_with_nothing(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    status, answer = await events(virtual_agent, node="w9")
    assert status == 404 and answer["error"]["code"] == "unknown_node"
    assert "w9" in answer["error"]["message"]
    status, answer = await events(virtual_agent, kind="bogus")
    assert status == 400 and answer["error"]["code"] == "unknown_event_kind"
    assert "lifecycle" in answer["error"]["message"]
    # A node the log still mentions (deleted since) stays a valid filter, by its id.
    virtual_agent.events.append(at_ms=1, node_id="n-deletedlongago", kind="node_deleted", actor="x")
    status, answer = await events(virtual_agent, node="n-deletedlongago")
    assert status == 200 and [e["kind"] for e in answer["events"]] == ["node_deleted"]
    assert answer["events"][0]["node_name"] is None


async def test_a_follower_is_woken_by_the_next_event(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    _, page = await events(virtual_agent)
    cursor = page["next_after"]
    got: dict[str, Any] = {}

    async def follow() -> None:
        got["status"], got["page"] = await events(virtual_agent, after=cursor, wait_s=30)
        got["at"] = trio.current_time()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.sleep(7)
        assert "page" not in got  # still waiting: nothing happened yet
        async with signed_client(virtual_agent) as client:
            cordoned = await client.post(
                "/v1/populi/admin/nodes/cp/cordon", json={"reason": "look"}
            )
        assert cordoned.status_code == 200
    assert got["status"] == 200
    assert got["at"] - started == 7  # answered when the event came, not at wait_s
    (event,) = got["page"]["events"]
    assert event["kind"] == "lifecycle" and event["reason"] == "look"
    assert got["page"]["next_after"] == event["seq"]


async def test_a_follower_with_nothing_new_gets_an_empty_page_after_wait_s(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    _, page = await events(virtual_agent)
    started = trio.current_time()
    status, empty = await events(virtual_agent, after=page["next_after"], wait_s=20)
    assert status == 200 and empty["events"] == []
    assert empty["next_after"] == page["next_after"]
    assert trio.current_time() - started == 20
    # An event of another kind does not end a wait filtered by kind.
    got: dict[str, Any] = {}

    async def follow() -> None:
        got["page"] = (
            await events(virtual_agent, after=page["next_after"], kind="gpu_resumed", wait_s=20)
        )[1]

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.sleep(1)
        append(virtual_agent, 1, kind="register")
    assert got["page"]["events"] == [] and trio.current_time() - started == 20


async def test_without_a_cursor_an_empty_page_points_at_now(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    """A follower that asked for a kind nothing has recorded yet starts from the newest
    seq, so that it sees only what comes next."""
    newest = virtual_agent.events.last_seq()
    status, page = await events(virtual_agent, kind="gpu_quarantined")
    assert status == 200 and page["events"] == [] and page["next_after"] == newest
