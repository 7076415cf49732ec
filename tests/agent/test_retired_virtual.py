"""A retired node knows it: its status says so (since when, by whom, why, how to re-join),
its worker refuses handoffs and its submitter places nothing remotely."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from agent.sim_support import open_gpu_cluster

from support.vcluster import as_node, change_settings, node_action

GUARD_S = 60.0


async def test_a_retired_node_says_so_and_takes_no_work(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_gpu_cluster(tmp_path, workers=2) as (cluster, host):
        cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
        await change_settings(cluster, remote_exec_enabled=True)
        assert w2.remote_work.enabled()
        assert w2.standing.json()["state"] == "member"
        await node_action(cluster, "w2", "retire", reason="stolen laptop")
        operator_id = cp.certificates.identity.operator.principal_id
        # Its next heartbeat is refused as node_retired, with who, when and why.
        took = await cluster.wait_until(lambda: w2.standing.retired, timeout_s=GUARD_S)
        assert took <= 2 * w2.heartbeat_sender.interval_s() + 1
        assert w2.heartbeat_sender.expelled
        # The signed list came with the refusal: the node sees itself on it.
        assert w2.standing.revoked_entry() is not None
        lifecycle = cp.registry.lifecycle(w2.node_id)
        assert lifecycle is not None
        async with as_node(cluster, w2, "w2") as own:  # its own CLI still reads its status
            status = (await own.get("/v1/populi/status")).json()
        standing = status["standing"]
        assert standing["state"] == "retired"
        assert standing["by"] == operator_id
        assert standing["since_ms"] == lifecycle.since_wall_ms
        assert standing["reason"] == "stolen laptop"
        assert standing["source"] == "revocation_list"
        assert any("populi node unretire w2" in step for step in standing["rejoin"])
        assert any("populi join TOKEN --force" in step for step in standing["rejoin"])
        assert status["lifecycle"]["state"] == "retired"
        assert not w2.remote_work.enabled()

        # Its worker refuses a handoff (from a submitter that has not heard yet).
        message = {
            "message_id": "h-retired",
            "type": "handoff",
            "task_id": "t-retired",
            "attempt": 1,
            "lease_id": "l-0000000000000002",
            "token": "1.77",
            "command": ["sim", "1"],
            "gpus": w2.gpu.verified_uuids(),
            "ttl_s": 30,
            "work_class": "agent",
        }
        async with as_node(cluster, w1, "w2") as to_retired:
            refused = await to_retired.post("/v1/populi/inbox", json=message)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "node_retired"
        assert not host.ledger.for_task("t-retired")

        # Its submitter places nothing remotely (and the control plane grants it nothing).
        async with as_node(cluster, w2, "w2") as own:
            submitted = await own.post(
                "/v1/populi/tasks",
                json={"command": ["sim", "1"], "gpus": 1, "work_class": "agent"},
            )
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["task"]["task_id"]
        await cluster.wait_until(lambda: w2.submitter.load(task_id).terminal, timeout_s=GUARD_S)
        task = w2.submitter.load(task_id)
        # Nothing left the node; the control plane refused the local lease too, so the task
        # ends at once with the reason (it cannot wait for a cluster it is out of).
        assert not task.attempts and not host.ledger.for_task(task_id)
        assert (task.state, task.terminal_reason) == ("failed", "node_retired")
