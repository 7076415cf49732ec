"""The execution routes, called directly with signed requests as nodes call them.

A virtual cluster (every answer checked against the OpenAPI contract by
``support.vcluster``) with a control plane ``cp``, a worker ``w1`` and a submitter ``w2``,
both replaying a captured idle H100 (``gpu.fixture``), so the control plane's view of free
GPUs comes from real heartbeats. The tests speak for a node with that node's own
credential, over its own transport, as its agent would; nothing here starts a task
process (a handoff is accepted only for a lease already revoked, so the worker's renewal
before start is refused and the task never starts, safety rule 3).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.config import Config
from populi_peer.core.fencing import FencingToken
from populi_peer.testing.cluster import VirtualCluster
from support.contract import validate_request
from support.vcluster import as_node as signed_as_node
from support.vcluster import change_settings, grant_body, vcluster

FIXTURE = "h100-80gb-hbm3-idle.json"
TOKEN_RE = re.compile(r"^[1-9][0-9]*\.[1-9][0-9]*$")
TTL_S = 30.0
GUARD_S = 120.0


def gpu_config() -> Config:
    base = Config()
    return dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, fixture=FIXTURE))


def as_node(
    cluster: VirtualCluster, sender: Agent, recipient: str = "cp", *, check: bool = True
) -> httpx.AsyncClient:
    """A client that signs with ``sender``'s own node credential and sends over
    ``sender``'s transport to the node named ``recipient``; with ``check``, each request
    must be one the contract documents (pass False for deliberately wrong ones)."""
    return signed_as_node(
        cluster, sender, recipient, event_hooks={"request": [check_request] if check else []}
    )


async def check_request(request: httpx.Request) -> None:
    """Every request these tests send is one the contract documents (the answers are
    checked by the cluster's network)."""
    validate_request(request)


async def set_remote(cluster: VirtualCluster, enabled: bool) -> None:
    answer = await change_settings(cluster, remote_exec_enabled=enabled)
    serial = answer["settings"]["serial"]
    # Pushed to every node before the answer (heartbeat answers carry it too).
    await cluster.wait_until(
        lambda: all(cluster[name].records.settings_serial >= serial for name in ("w1", "w2")),
        timeout_s=GUARD_S,
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[VirtualCluster]:
    """Needs virtual time: the test names ``autojump_clock`` (``NotVirtualTime`` else)."""
    async with vcluster(tmp_path, workers=2, worker_config=gpu_config()) as cluster:
        cp = cluster.cp
        w1, w2 = cluster["w1"], cluster["w2"]
        # The control plane knows each worker's replayed GPU from its heartbeats.
        await cluster.wait_until(
            lambda: all(len(cp.gpu.allocatable_gpus(w.node_id)[0]) == 1 for w in (w1, w2)),
            timeout_s=GUARD_S,
        )
        # ...and the workers know each other (membership travels with heartbeats).
        await cluster.wait_until(
            lambda: (
                w1.membership.get(w2.node_id) is not None
                and w2.membership.get(w1.node_id) is not None
            ),
            timeout_s=GUARD_S,
        )
        yield cluster


async def granted(client: httpx.AsyncClient, task_id: str, target: Agent) -> dict[str, Any]:
    """A lease on one of ``target``'s GPUs for attempt 1 of ``task_id``, asked by
    ``client``'s node: the lease granted."""
    answer = await client.post("/v1/populi/exec/leases", json=grant_body(task_id, target))
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["lease"])


def fallback_body(task_id: str) -> dict[str, Any]:
    """The submitter's ask to run ``task_id``'s second attempt itself (no GPU)."""
    return {"task_id": task_id, "attempt": 2, "gpus_wanted": 0, "ttl_s": TTL_S}


def refusal(response: httpx.Response) -> list[str]:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "lease_refused", error
    return list(error["details"]["reasons"])


async def test_grant_replay_and_task_key(
    autojump_clock: trio.testing.MockClock, cluster: VirtualCluster
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    async with as_node(cluster, w2) as submitter:
        off = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-off", w1))
        assert "remote_disabled" in refusal(off)
        await set_remote(cluster, True)
        granted = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-1", w1))
        assert granted.status_code == 200, granted.text
        lease = granted.json()["lease"]
        replay = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-1", w1))
        second = await submitter.post(
            "/v1/populi/exec/leases", json=grant_body("t-1", w1, attempt=2)
        )
        too_many = await submitter.post(
            "/v1/populi/exec/leases", json=grant_body("t-2", w1, gpus_wanted=2)
        )
        busy = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-3", w1))
        holding = await submitter.get("/v1/populi/exec/leases", params={"state": "holding"})
    assert TOKEN_RE.match(lease["token"])
    assert FencingToken.parse(lease["token"]).term == cp.control_plane.term
    assert lease["state"] == "live" and lease["kind"] == "remote"
    assert lease["holder"] == w1.node_id and lease["submitter"] == w2.node_id
    # The GPU as the worker itself verified it (NVML replay), not as anyone advertised it.
    assert len(lease["gpus"]) == 1 and lease["gpus"] == w1.gpu.verified_uuids()
    assert (
        replay.json()["replay"] is True and replay.json()["lease"]["lease_id"] == lease["lease_id"]
    )
    assert "task_key_taken" in refusal(second)
    assert "no_free_gpu" in refusal(too_many)
    assert refusal(busy) == ["no_free_gpu"]  # w1's only GPU is in t-1's lease
    assert [x["lease_id"] for x in holding.json()["leases"]] == [lease["lease_id"]]
    assert len(cp.store.execute("SELECT * FROM leases").fetchall()) == 1


async def test_only_the_holder_renews_and_a_completed_task_never_falls_back(
    autojump_clock: trio.testing.MockClock,
    cluster: VirtualCluster,
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    async with as_node(cluster, w2) as submitter, as_node(cluster, w1) as holder:
        lease = await granted(submitter, "t-done", w1)
        path = f"/v1/populi/exec/leases/{lease['lease_id']}"
        stranger_renew = await submitter.post(f"{path}/renew", json={})
        stranger_release = await submitter.post(f"{path}/release", json={"outcome": "stopped"})
        renewed = await holder.post(f"{path}/renew", json={})
        early = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-done"))
        done = await holder.post(f"{path}/release", json={"outcome": "completed"})
        again = await holder.post(f"{path}/release", json={"outcome": "completed"})
        stopped_after = await holder.post(f"{path}/release", json={"outcome": "stopped"})
        fallback = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-done"))
        regrant = await submitter.post(
            "/v1/populi/exec/leases", json=grant_body("t-done", w1, attempt=2)
        )
        # Its GPU is free again for another task.
        other = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-next", w1))
        shown = await submitter.get(path)
    assert refusal(stranger_renew) == ["not_holder"]
    assert refusal(stranger_release) == ["not_holder"]
    assert renewed.status_code == 200 and renewed.json()["lease"]["state"] == "live"
    assert "lease_live" in refusal(early)
    assert done.json()["lease"]["state"] == "completed" and done.json()["replay"] is False
    assert again.json()["replay"] is True
    assert stopped_after.status_code == 409
    assert stopped_after.json()["error"]["code"] == "illegal_lease_transition"
    assert "task_completed" in refusal(fallback)
    assert {"task_key_taken", "task_completed"} <= set(refusal(regrant))
    assert other.status_code == 200 and other.json()["lease"]["gpus"] == lease["gpus"]
    assert shown.json()["lease"]["state"] == "completed"
    # No fallback lease was ever written for the completed task.
    rows = cp.store.execute("SELECT state FROM leases WHERE task_id = 't-done'").fetchall()
    assert [row["state"] for row in rows] == ["completed"]


async def test_operator_revoke_is_learned_at_the_next_renewal(
    autojump_clock: trio.testing.MockClock, cluster: VirtualCluster
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    async with as_node(cluster, w2) as submitter, as_node(cluster, w1) as holder:
        lease = await granted(submitter, "t-rev", w1)
        async with cluster.operator_client() as op:
            revoked = await op.post(
                "/v1/populi/admin/exec-lease-revoke",
                json={"lease_id": lease["lease_id"], "reason": "driver update"},
            )
            again = await op.post(
                "/v1/populi/admin/exec-lease-revoke", json={"lease_id": lease["lease_id"]}
            )
        path = f"/v1/populi/exec/leases/{lease['lease_id']}"
        renew = await holder.post(f"{path}/renew", json={})
        # Revoking frees nothing: the GPU and the task key stay taken until the holder
        # releases or the lease expires (safety rule 4).
        busy = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-gpu", w1))
        waiting = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-rev"))
        released = await holder.post(f"{path}/release", json={"outcome": "stopped"})
        fallback = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-rev"))
    body = revoked.json()["lease"]
    assert body["state"] == "revoking" and body["reason"] == "driver update"
    assert body["revoked_by"] == cp.certificates.identity.operator.principal_id
    assert again.json()["replay"] is True
    assert refusal(renew) == ["lease_revoked"]
    assert refusal(busy) == ["no_free_gpu"]
    assert "lease_live" in refusal(waiting)
    assert released.json()["lease"]["state"] == "revoked"
    confirmed = fallback.json()
    assert confirmed["prior"]["lease_id"] == lease["lease_id"]
    assert confirmed["lease"]["kind"] == "fence" and confirmed["lease"]["holder"] == w2.node_id
    assert FencingToken.parse(confirmed["lease"]["token"]) > FencingToken.parse(lease["token"])
    first = cp.store.execute(
        "SELECT actor, reason FROM events WHERE kind = 'lease_revoked' ORDER BY seq"
    ).fetchone()
    assert (first["actor"], first["reason"]) == (
        cp.certificates.identity.operator.principal_id,
        "driver update",
    )


async def test_a_repeated_revoke_adds_no_event(
    autojump_clock: trio.testing.MockClock, cluster: VirtualCluster
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    async with as_node(cluster, w2) as submitter:
        lease = await granted(submitter, "t-rev2", w1)
    async with cluster.operator_client() as op:
        for reason in ("driver update", "something else"):
            answer = await op.post(
                "/v1/populi/admin/exec-lease-revoke",
                json={"lease_id": lease["lease_id"], "reason": reason},
            )
            assert answer.status_code == 200
    assert answer.json()["replay"] is True
    assert answer.json()["lease"]["reason"] == "driver update"
    events = cp.store.execute(
        "SELECT reason FROM events WHERE kind = 'lease_revoked' ORDER BY seq"
    ).fetchall()
    # The event log says what happened: one revoke, for the reason that took effect.
    assert [e["reason"] for e in events] == ["driver update"]


async def test_expiry_in_virtual_time_then_fallback_gets_a_higher_token(
    autojump_clock: trio.testing.MockClock,
    cluster: VirtualCluster,
) -> None:
    cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    margin = float(cp.records.settings["lease_expiry_margin_s"])
    async with as_node(cluster, w2) as submitter:
        granted = trio.current_time()
        answer = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-exp", w1))
        assert answer.status_code == 200, answer.text
        lease = answer.json()["lease"]
        assert trio.current_time() == granted  # the memory network delivers at once
        path = f"/v1/populi/exec/leases/{lease['lease_id']}"
        # Nobody renews it. The control plane declares it dead strictly after its TTL
        # plus the expiry margin: at that very instant it still holds (past its TTL,
        # inside the margin), and the submitter must wait.
        expiry = granted + TTL_S + margin
        await trio.sleep_until(expiry)
        inside = (await submitter.get(path)).json()["lease"]
        waiting = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-exp"))
        assert trio.current_time() == expiry
        # The control plane's lease loop wakes 1 ms past it (agent/leases.py) and
        # declares the lease dead then.
        await trio.sleep_until(expiry + 0.002)
        dead = (await submitter.get(path)).json()["lease"]
        confirmed = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-exp"))
        replay = await submitter.post("/v1/populi/exec/fallback", json=fallback_body("t-exp"))
        freed = await submitter.post("/v1/populi/exec/leases", json=grant_body("t-after", w1))
    assert inside["state"] == "live" and inside["expires_in_s"] == -margin
    assert "lease_live" in refusal(waiting)
    assert dead["state"] == "expired" and dead["expires_in_s"] is None
    answer = confirmed.json()
    assert confirmed.status_code == 200, confirmed.text
    assert answer["prior"]["state"] == "expired"
    assert FencingToken.parse(answer["lease"]["token"]) > FencingToken.parse(lease["token"])
    assert TOKEN_RE.match(answer["lease"]["token"])
    assert answer["lease"]["kind"] == "fence" and answer["lease"]["attempt"] == 2
    assert replay.json()["replay"] is True
    assert replay.json()["lease"]["token"] == answer["lease"]["token"]
    assert freed.status_code == 200  # the expired lease's GPU is free again
    stored = cp.store.execute(
        "SELECT state FROM leases WHERE lease_id = ?", (lease["lease_id"],)
    ).fetchone()
    assert stored["state"] == "expired"  # written durably, not only in memory


def handoff(message_id: str, lease: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "type": "handoff",
        "task_id": lease["task_id"],
        "attempt": lease["attempt"],
        "lease_id": lease["lease_id"],
        "token": lease["token"],
        "command": ["sh", "-c", "exit 3"],
        "env": {"API_KEY": "hunter2"},
        "gpus": lease["gpus"],
        "ttl_s": lease["ttl_s"],
        "work_class": lease["work_class"],
        **changes,
    }


async def test_inbox_fences_handoffs_answers_duplicates_and_pages(
    autojump_clock: trio.testing.MockClock,
    cluster: VirtualCluster,
) -> None:
    w1, w2 = cluster["w1"], cluster["w2"]
    await set_remote(cluster, True)
    async with (
        as_node(cluster, w2) as submitter,
        as_node(cluster, w1) as holder,
        as_node(cluster, w2, "w1") as to_worker,
        as_node(cluster, w1, "w1") as worker_itself,
    ):
        # A lease too short for the worker's stop margin: refused, and handed back at once.
        short = (
            await submitter.post("/v1/populi/exec/leases", json=grant_body("t-short", w1, ttl_s=10))
        ).json()["lease"]
        too_short = await to_worker.post("/v1/populi/inbox", json=handoff("h-short", short))
        short_after = (await submitter.get(f"/v1/populi/exec/leases/{short['lease_id']}")).json()[
            "lease"
        ]

        # Attempt 1 ends; attempt 2 gets a higher token, and the operator revokes it
        # before the handoff arrives, so the worker's renewal before start is refused and
        # nothing runs (safety rule 3).
        first = (
            await submitter.post(
                "/v1/populi/exec/leases", json=grant_body("t-fenced", w1, gpus_wanted=0)
            )
        ).json()["lease"]
        await holder.post(
            f"/v1/populi/exec/leases/{first['lease_id']}/release", json={"outcome": "stopped"}
        )
        second = (
            await submitter.post(
                "/v1/populi/exec/leases",
                json=grant_body("t-fenced", w1, gpus_wanted=0, attempt=2),
            )
        ).json()["lease"]
        async with cluster.operator_client() as op:
            await op.post(
                "/v1/populi/admin/exec-lease-revoke", json={"lease_id": second["lease_id"]}
            )
        accepted = await to_worker.post("/v1/populi/inbox", json=handoff("h-2", second))
        duplicate = await to_worker.post("/v1/populi/inbox", json=handoff("h-2", second))
        # A delayed handoff of the older attempt arrives last: fenced off.
        stale = await to_worker.post("/v1/populi/inbox", json=handoff("h-1", first))
        await cluster.wait_until(
            lambda: getattr(w1.runner.row("t-fenced", 2, "worker"), "state", "") == "finished",
            timeout_s=GUARD_S,
        )
        cancel = await to_worker.post(
            "/v1/populi/inbox",
            json={"message_id": "c-2", "type": "cancel", "task_id": "t-fenced", "attempt": 2},
        )
        pages = []
        cursor = 0
        while True:
            page = await worker_itself.get(
                "/v1/populi/inbox", params={"cursor": cursor, "limit": 1}
            )
            assert page.status_code == 200, page.text
            pages.append(page.json())
            cursor = page.json()["next_cursor"]
            if not page.json()["more"]:
                break
            assert len(pages) < 10
        # Another member may not read this node's inbox.
        stranger = await to_worker.get("/v1/populi/inbox")
        # The attempt's output, as its submitter reads it from the worker.
        output_path = "/v1/populi/exec/attempts/t-fenced/2/output"
        output = await to_worker.get(output_path, params={"stream": "stderr"})
        async with as_node(cluster, w2, "w1", check=False) as unchecked:
            bad_stream = await unchecked.get(output_path, params={"stream": "stdin"})
            bad_offset = await unchecked.get(output_path, params={"offset": -1})
        not_owner = await worker_itself.get(output_path)

    error = too_short.json()["error"]
    assert too_short.status_code == 409 and error["code"] == "ttl_too_short"
    assert short_after["state"] == "released"
    for table in ("fences", "attempts"):  # refused before anything was kept
        assert not w1.store.execute(f"SELECT * FROM {table} WHERE task_id = 't-short'").fetchall()

    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["duplicate"] is False
    assert accepted.json()["result"] == {"verdict": "start"}
    assert duplicate.json()["duplicate"] is True
    assert duplicate.json()["result"] == accepted.json()["result"]
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "stale_token"
    assert stale.json()["error"]["details"]["highest"] == second["token"]
    assert cancel.json()["result"] == {"cancelled": False, "state": "finished"}

    # The attempt was accepted once and never started: its renewal was refused.
    rows = w1.store.execute(
        "SELECT attempt, state, result FROM attempts WHERE task_id = 't-fenced'"
    ).fetchall()
    assert [(row["attempt"], row["state"]) for row in rows] == [(2, "finished")]
    assert '"outcome": "lease_lost"' in rows[0]["result"]
    assert not (
        w1.certificates.identity.paths.tasks / "worker" / "t-fenced"
    ).exists()  # no process dir
    assert not w1.runner.running
    fence = w1.store.execute("SELECT token FROM fences WHERE task_id = 't-fenced'").fetchone()
    assert fence["token"] == second["token"]
    assert output.json()["done"] is True and output.json()["total"] == 0
    assert [(r.status_code, r.json()["error"]["code"]) for r in (bad_stream, bad_offset)] == [
        (400, "bad_request"),
        (400, "bad_request"),
    ]
    assert (not_owner.status_code, not_owner.json()["error"]["code"]) == (403, "not_task_owner")

    messages = [m for page in pages for m in page["messages"]]
    assert [m["message_id"] for m in messages] == ["h-2", "c-2"]  # refusals are not kept
    assert [len(page["messages"]) for page in pages] == [1, 1, 0]
    assert pages[-1]["next_cursor"] == messages[-1]["seq"]
    assert all(m["sender"] == w2.node_id for m in messages)
    assert messages[0]["message"]["env"] == {"API_KEY": "…"}
    assert "hunter2" not in str(pages)
    assert stranger.status_code == 403
    assert stranger.json()["error"]["code"] == "role_required"
