"""Operator commands that may be repeated say when the repeat changed nothing: retiring a
retired node, revoking a revoked token, setting a setting to the value it has. Nothing is
written the second time (no event, no new record, nothing pushed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.cluster import InitResult
from populi_peer.testing.cluster import open_virtual_agent
from support.clients import signed_client
from support.vcluster import vcluster


@pytest.fixture
async def agent(cluster_dir: tuple[Path, InitResult]) -> AsyncIterator[Agent]:
    """The control plane alone, with a port in its URL (join tokens name it)."""
    async with open_virtual_agent(cluster_dir[0], url="https://cp.virtual:443") as agent:
        yield agent


def event_count(agent: Agent) -> int:
    return int(agent.store.execute("SELECT COUNT(*) FROM events").fetchone()[0])


async def test_retiring_twice_changes_nothing_the_second_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        async with cluster.operator_client() as op:
            first = await op.post(f"/v1/populi/admin/nodes/{w1.node_id}/retire", json={})
            assert first.status_code == 200, first.text
            assert first.json()["changed"] is True
            events, serial = event_count(cp), cp.revocations.serial
            second = await op.post(f"/v1/populi/admin/nodes/{w1.node_id}/retire", json={})
        assert second.status_code == 200, second.text
        assert second.json()["changed"] is False
        assert second.json()["revocation_serial"] == serial == first.json()["revocation_serial"]
        assert event_count(cp) == events


async def test_revoking_a_revoked_token_changes_nothing(
    agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    async with signed_client(agent) as client:
        created = await client.post("/v1/populi/admin/tokens", json={"ttl_s": 600})
        assert created.status_code == 200, created.text
        token_id = created.json()["summary"]["token_id"]
        first = await client.post(f"/v1/populi/admin/tokens/{token_id}/revoke", json={})
        events = event_count(agent)
        second = await client.post(f"/v1/populi/admin/tokens/{token_id}/revoke", json={})
    assert first.json()["changed"] is True and first.json()["summary"]["state"] == "revoked"
    assert second.json()["changed"] is False and second.json()["summary"]["state"] == "revoked"
    assert event_count(agent) == events


async def test_setting_a_value_it_already_has_signs_and_pushes_nothing(
    virtual_agent: Agent, autojump_clock: trio.testing.MockClock
) -> None:
    async with signed_client(virtual_agent) as client:
        first = await client.post(
            "/v1/populi/admin/settings", json={"changes": {"max_lease_ttl_s": 40}}
        )
        assert first.status_code == 200, first.text
        serial, events = first.json()["settings"]["serial"], event_count(virtual_agent)
        # The same value, written another way (a float): still no change.
        second = await client.post(
            "/v1/populi/admin/settings", json={"changes": {"max_lease_ttl_s": 40.0}}
        )
    assert first.json()["changed"] is True
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["changed"] is False
    assert answer["settings"]["serial"] == serial
    assert answer["push"]["confirmed"] == [] and answer["push"]["unconfirmed"] == []
    assert event_count(virtual_agent) == events
