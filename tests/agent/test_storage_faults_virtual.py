"""A control plane whose storage stops taking writes, in virtual time (issue 10, item 3).

The control plane's database is made read-only with ``PRAGMA query_only`` on the agent's
own connection: a real SQLite condition (every write fails ``SQLITE_READONLY``), no mock.
While it lasts, a lease that expires cannot have its dead state written: the lease
service must stay up, keep the lease holding (nobody is told it is dead — not the lease
listing, not the submitter asking for a fallback), report the node degraded, and answer
writes 503 ``storage_unavailable``. Once writes work again the same expiry is written,
and only then does anybody see the lease dead; the node is healthy again, unrestarted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from agent.sim_support import open_gpu_cluster, stored_lease_state
from api.test_exec_routes import GUARD_S, TTL_S, as_node, gpu_config, set_remote

from populi_peer.agent.agent import Agent
from populi_peer.agent.health import BACKOFF_MAX_S
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import grant_body, vcluster


@pytest.fixture
async def cluster(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[VirtualCluster]:
    async with vcluster(tmp_path) as cluster:
        await cluster.join("w1", config=gpu_config())
        await cluster.join("w2", config=gpu_config())
        cp = cluster.cp
        await cluster.wait_until(
            lambda: all(
                len(cp.gpu.allocatable_gpus(cluster[w].node_id)[0]) == 1 for w in ("w1", "w2")
            ),
            timeout_s=GUARD_S,
        )
        yield cluster


def problems(agent: Agent) -> dict[str, str]:
    return {
        p["component"]: p["code"]
        for p in agent.node_status.answer().to_json()["health"]["problems"]
    }


async def test_a_dead_state_that_cannot_be_written_is_never_announced(
    cluster: VirtualCluster, autojump_clock: trio.testing.MockClock
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    margin = float(cp.records.settings["lease_expiry_margin_s"])
    fallback_body = {"task_id": "t-ro", "attempt": 2, "gpus_wanted": 0, "ttl_s": TTL_S}
    announced_before_durable: list[str] = []

    async def watch(lease_id: str) -> None:
        # Whatever anybody could read of the lease in memory is already on disk.
        while True:
            table = cp.leases.table
            lease = table.find(lease_id) if table else None
            if lease is not None and lease.dead and stored_lease_state(cp, lease_id) != lease.state:
                announced_before_durable.append(f"{lease.state} at {trio.current_time():.2f}")
            await trio.sleep(0.01)

    async with as_node(cluster, w2) as submitter, trio.open_nursery() as nursery:
        granted = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-ro", w1))
        assert granted.status_code == 200, granted.text
        lease = granted.json()["lease"]
        lease_id = lease["lease_id"]
        path = f"/v1/populi/exec/leases/{lease_id}"
        nursery.start_soon(watch, lease_id)
        cp.store.execute("PRAGMA query_only = ON")  # the database takes no write from here
        # Nobody renews the lease: well past its expiry plus margin, it could be dead.
        await trio.sleep(TTL_S + margin + 3 * BACKOFF_MAX_S)
        assert cluster.nodes["cp"].running, "the control plane went down on a failed write"
        shown = (await submitter.get(path)).json()["lease"]
        expired = (
            await submitter.get("/v1/populi/exec/leases", params={"state": "expired"})
        ).json()
        fallback = await submitter.post("/v1/populi/exec/fallback", json=fallback_body)
        async with cluster.operator_client() as operator:
            settings = await operator.post(
                "/v1/populi/admin/settings", json={"changes": {"auto_revoke_stale_leases": True}}
            )
            status = (await operator.get("/v1/populi/status")).json()
        # Still holding: in memory, on disk, to whoever asks.
        assert cp.leases.table is not None and cp.leases.table.get(lease_id).holding
        assert stored_lease_state(cp, lease_id) == "live"
        assert shown["state"] == "live" and shown["expires_in_s"] < 0
        assert expired["leases"] == []
        # The submitter's fallback needs that write: 503 with the reason, not a token.
        assert fallback.status_code == 503, fallback.text
        assert fallback.json()["error"]["code"] == "storage_unavailable"
        assert fallback.json()["error"]["details"]["condition"] == "read_only"
        assert len(cp.store.execute("SELECT * FROM leases").fetchall()) == 1
        assert settings.status_code == 503, settings.text
        assert settings.json()["error"]["code"] == "storage_unavailable"
        assert cp.records.settings["auto_revoke_stale_leases"] is False
        # Degraded, and why: the lease service's retried expiry and the store's writes.
        assert status["health"]["state"] == "degraded"
        assert problems(cp)["leases"] == "storage_unavailable"
        assert problems(cp)["storage"] == "storage_unavailable"
        leases_problem = next(p for p in status["health"]["problems"] if p["component"] == "leases")
        assert leases_problem["failures"] >= 3
        assert "readonly" in leases_problem["message"]

        cp.store.execute("PRAGMA query_only = OFF")  # space is back
        cleared = trio.current_time()
        await cluster.wait_until(
            lambda: stored_lease_state(cp, lease_id) == "expired", timeout_s=GUARD_S
        )
        took = trio.current_time() - cleared
        dead = (await submitter.get(path)).json()["lease"]
        confirmed = await submitter.post("/v1/populi/exec/fallback", json=fallback_body)
        await cluster.wait_until(
            lambda: cp.node_status.answer().to_json()["health"]["state"] == "ok"
        )
        nursery.cancel_scope.cancel()
    assert took <= BACKOFF_MAX_S + 1.5, f"the expiry was written {took:.2f} s after writes worked"
    assert dead["state"] == "expired"
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["prior"]["state"] == "expired"
    assert announced_before_durable == []
    assert cluster.nodes["cp"].running


async def test_a_task_whose_records_cannot_be_written_waits_and_finishes_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The submitter's own storage turns read-only while its local GPU task runs: the task
    ends meanwhile, its result cannot be recorded, and its driver's steps cannot be
    written. Nothing fails and nothing runs twice: the record stays as it was, the node is
    degraded, and once writes work again the task finishes, once."""
    async with open_gpu_cluster(tmp_path) as (cluster, host):
        w1 = cluster["w1"]
        async with cluster.operator_client("w1") as client:
            submitted = await client.post(
                "/v1/populi/tasks", json={"command": ["sim", "5"], "gpus": 1}
            )
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["task"]["task_id"]
        await cluster.wait_until(lambda: bool(host.ledger.for_task(task_id)))
        w1.store.execute("PRAGMA query_only = ON")
        await trio.sleep(15)  # the 5 s task ended meanwhile
        (run,) = host.ledger.for_task(task_id)
        assert run.stopped is not None
        assert cluster.nodes["w1"].running, "the agent went down on a failed write"
        assert w1.submitter.load(task_id).state == "running_local"
        assert problems(w1).get("submitter") == "storage_unavailable", problems(w1)
        async with cluster.operator_client("w1") as client:
            shown = (await client.get(f"/v1/populi/tasks/{task_id}")).json()
            refused = await client.post("/v1/populi/tasks", json={"command": ["sim", "1"]})
        assert shown["task"]["state"] == "running_local"
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "storage_unavailable"

        w1.store.execute("PRAGMA query_only = OFF")
        await cluster.wait_until(lambda: w1.submitter.load(task_id).terminal, timeout_s=60)
        await cluster.wait_until(
            lambda: w1.node_status.answer().to_json()["health"]["state"] == "ok"
        )
        task = w1.submitter.load(task_id)
        assert task.state == "succeeded", task
        assert len(task.attempts) == 1 and len(host.ledger.for_task(task_id)) == 1
        tasks = w1.store.execute("SELECT task_id FROM tasks").fetchall()
        assert [row["task_id"] for row in tasks] == [task_id]  # the refused one left nothing
