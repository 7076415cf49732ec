"""Full reports and per-node grant resumption on the virtual cluster (ADR 0015): the real
agents, a memory network, simulated tasks, trio's mock clock.

- After a control-plane restart, a GPU task submitted at once starts on its worker as soon
  as that worker reported (a heartbeat or two), not after the longest TTL + margin the
  restarted table would wait for a silent node.
- A full report lost on its way is asked for again (``full_report_needed``) and re-sent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from agent.sim_support import sim_config

from populi_peer.testing.cluster import VirtualCluster
from populi_peer.testing.network import MemoryNetwork
from populi_peer.testing.sim import SimHost
from support.contract import validate
from support.vcluster import as_node, change_settings, grant_body, sim_vcluster

HEARTBEAT = "/v1/populi/heartbeat"


class LosesFullReports(MemoryNetwork):
    """A memory network that loses the next heartbeat carrying a full report from each
    node in ``lose_from`` (the request never arrives)."""

    lose_from: set[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lose_from = set()
        self.lost = 0

    async def deliver(self, src: str, request: httpx.Request) -> httpx.Response:
        if src in self.lose_from and request.url.path == HEARTBEAT:
            report = json.loads(request.read() or b"{}").get("report") or {}
            if report.get("type") == "full":
                self.lose_from.discard(src)
                self.lost += 1
                await trio.lowlevel.checkpoint()
                raise httpx.ConnectError("full report lost", request=request)
        return await super().deliver(src, request)


class Answers:
    """Every heartbeat answer's report status, in order (and contract validation)."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.full_reports = 0

    def __call__(self, request: httpx.Request, response: httpx.Response) -> None:
        validate(request, response)
        if request.url.path != HEARTBEAT or response.status_code != 200:
            return
        sent = json.loads(request.content or b"{}").get("report") or {}
        if sent.get("type") == "full":
            self.full_reports += 1
        answer = response.json().get("report_answer")
        if answer is not None:
            self.statuses.append(str(answer["status"]))


async def _enable_remote(cluster: VirtualCluster) -> None:
    # The memory network's nodes advertise no address: every path counts as overlay.
    await change_settings(cluster, remote_exec_enabled=True, policy_gates=["inference:overlay"])


@contextlib.asynccontextmanager
async def _gpu_cluster(
    root: Path,
    *,
    workers: int,
    on_response: Callable[[httpx.Request, httpx.Response], None] = validate,
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    """``cp`` and ``workers`` nodes with simulated executors and GPUs, remote execution on;
    yields once ``w1``'s GPU is allocatable and verified."""
    async with sim_vcluster(
        root, workers=workers, config=sim_config(), on_response=on_response
    ) as (cluster, host):
        await _enable_remote(cluster)
        await _ready(cluster)
        yield cluster, host


async def _submit(cluster: VirtualCluster, via: str, **body: Any) -> str:
    async with cluster.operator_client(via) as client:
        response = await client.post("/v1/populi/tasks", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["task"]["task_id"])


async def _ready(cluster: VirtualCluster) -> None:
    cp, w1 = cluster.cp, cluster["w1"]
    await cluster.wait_until(
        lambda: bool(cp.gpu.allocatable_gpus(w1.node_id)[0] and w1.gpu.verified_uuids()),
        timeout_s=60,
    )


async def _ran(host: SimHost, cluster: VirtualCluster, task_id: str) -> float:
    await cluster.wait_until(lambda: bool(host.ledger.for_task(task_id)), timeout_s=120)
    return host.ledger.for_task(task_id)[0].started


async def test_after_a_restart_a_gpu_task_starts_once_its_worker_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = Answers()
    async with _gpu_cluster(tmp_path, workers=2, on_response=answers) as (cluster, host):
        w1, w2 = cluster["w1"], cluster["w2"]
        # A lease granted before the restart: the restarted table cannot know it holds
        # everything (a store copy may be older), so it opens the per-node window.
        first = await _submit(cluster, "w2", command=["sim", "1"], gpus=1, node=w1.node_id)
        await cluster.wait_until(lambda: w2.submitter.load(first).terminal, timeout_s=60)
        assert w2.submitter.load(first).state == "succeeded"
        assert [(run.node, run.role) for run in host.ledger.for_task(first)] == [("w1", "worker")]

        await cluster.crash("cp")
        await trio.sleep(1.0)
        await cluster.start("cp")
        restarted = trio.current_time()
        table = cluster.cp.leases.table
        assert table is not None and table.window is not None
        window_s = table.window.silent_until_mono - table.window.started_mono
        task = await _submit(
            cluster, "w2", command=["sim", "1"], gpus=1, node=w1.node_id, queue_timeout_s=120
        )
        started = await _ran(host, cluster, task)
        took = started - restarted
        print(
            f"\nGPU task started {took:.2f} s after the control plane restarted "
            f"(a silent node would have waited {window_s:.1f} s)"
        )
        assert cluster.cp.leases.table is not None
        assert cluster.cp.leases.table.reported(w1.node_id)
        # The control plane's own node reports to its own table, in process.
        assert cluster.cp.leases.table.reported(cluster.cp.node_id)
        assert cluster.cp.reporting.reported
        # A few heartbeats (1 s each on this path), far from the window.
        assert took < 6.0 < window_s
        await cluster.wait_until(lambda: w2.submitter.load(task).terminal, timeout_s=60)
        assert w2.submitter.load(task).state == "succeeded"
        assert "applied" in answers.statuses


async def test_a_lost_full_report_is_asked_for_again_and_resent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = Answers()
    networks: list[LosesFullReports] = []

    def make_network(cluster: VirtualCluster) -> MemoryNetwork:
        network = LosesFullReports(
            seed=cluster.seed, faults=cluster.faults, on_response=cluster.on_response
        )
        networks.append(network)
        return network

    async with sim_vcluster(
        tmp_path, workers=1, config=sim_config(), on_response=answers, make_network=make_network
    ) as (cluster, _host):
        (network,) = networks
        w1 = cluster["w1"]
        await cluster.wait_until(
            lambda: (
                cluster.cp.leases.table is not None and cluster.cp.leases.table.reported(w1.node_id)
            ),
            timeout_s=60,
        )
        await cluster.crash("cp")
        network.lose_from.add(w1.node_id)
        before = answers.full_reports
        await cluster.start("cp")
        await cluster.wait_until(
            lambda: (
                cluster.cp.leases.table is not None and cluster.cp.leases.table.reported(w1.node_id)
            ),
            timeout_s=60,
        )
        assert network.lost == 1
        # The changes that followed the lost report named a base the new control plane
        # never got: it asked for a full report, which came with the next heartbeat.
        assert "full_report_needed" in answers.statuses
        assert answers.full_reports >= before + 1
        assert w1.reporting.reported


async def test_with_the_control_plane_unreachable_a_pinned_gpu_task_claims_and_runs_here(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Local work never waits for an unreachable control plane (rule 1): a GPU task pinned
    to its own node claims that node's GPU and runs, its exit code kept. Once the control
    plane hears the claim (the node's report), a grant on that GPU from another node is
    refused (``no_free_gpu``) until the task ends; then it is granted."""
    async with _gpu_cluster(tmp_path, workers=2) as (cluster, host):
        cp, w1, w2 = cluster.cp, cluster["w1"], cluster["w2"]
        cluster.network.partition(w1.node_id, cp.node_id)
        await cluster.wait_until(lambda: w1.heartbeat_sender.cp_down, timeout_s=60)
        quick = await _submit(cluster, "w1", command=["sim", "1", "7"], gpus=1, node="w1")
        await cluster.wait_until(lambda: w1.submitter.load(quick).terminal, timeout_s=60)
        done = w1.submitter.load(quick)
        assert (done.state, done.exit_code) == ("failed", 7)
        assert "claimed_locally" in [entry.code for entry in done.reasons]
        assert [(run.node, run.token) for run in host.ledger.for_task(quick)] == [("w1", "0.0")]

        long = await _submit(cluster, "w1", command=["sim", "30"], gpus=1, node="w1")
        await cluster.wait_until(lambda: bool(host.ledger.for_task(long)), timeout_s=60)
        assert w1.ledger.claimed_gpus() == frozenset(w1.gpu.verified_uuids())
        cluster.network.heal()
        await cluster.wait_until(
            lambda: bool(cp.leases.table and cp.leases.table.claims_of(w1.node_id)), timeout_s=60
        )

        async def grant(task_id: str) -> httpx.Response:
            async with as_node(cluster, w2) as client:
                return await client.post(
                    "/v1/populi/exec/leases",
                    json=grant_body(task_id, w1, work_class="inference", ttl_s=6),
                )

        refused = await grant("t-other")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["details"]["reasons"] == ["no_free_gpu"]
        await cluster.wait_until(lambda: w1.submitter.load(long).terminal, timeout_s=60)
        await cluster.wait_until(lambda: not cp.leases.table.claims_of(w1.node_id), timeout_s=30)  # type: ignore[union-attr]
        granted = await grant("t-other-2")
        assert granted.status_code == 200, granted.text


async def test_a_local_attempt_whose_renewals_go_unanswered_becomes_a_claim(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A pinned GPU task runs under a ``local`` lease; the control plane becomes
    unreachable: before the lease's deadline the attempt becomes a node-local claim and runs
    to its end instead of being stopped (ADR 0015, the holder's machine). A renewal the
    control plane refuses still stops it."""
    async with _gpu_cluster(tmp_path, workers=1) as (cluster, host):
        cp, w1 = cluster.cp, cluster["w1"]
        task = await _submit(cluster, "w1", command=["sim", "90", "3"], gpus=1, node="w1")
        await cluster.wait_until(lambda: bool(host.ledger.for_task(task)), timeout_s=60)
        (lease,) = [x for x in cp.leases.table.holding() if x.task_id == task]  # type: ignore[union-attr]
        assert lease.kind == "local"
        cluster.network.partition(w1.node_id, cp.node_id)
        await cluster.wait_until(lambda: bool(w1.ledger.claimed_gpus()), timeout_s=2 * lease.ttl_s)
        await cluster.wait_until(lambda: w1.submitter.load(task).terminal, timeout_s=120)
        done = w1.submitter.load(task)
        assert (done.state, done.exit_code) == ("failed", 3)
        (run,) = host.ledger.for_task(task)
        assert run.exit_code == 3  # ran its whole 90 s, far past the lease's deadline
        assert not w1.ledger.claimed_gpus()

        cluster.network.heal()
        await cluster.wait_until(lambda: not cp.heartbeats.stale(w1.node_id), timeout_s=60)
        # The claim's end reaches the control plane with a report after the heal: until
        # then it still counts the GPU as busy (and a pinned task would be refused).
        await cluster.wait_until(
            lambda: not cp.leases.table.claims_of(w1.node_id),  # type: ignore[union-attr]
            timeout_s=60,
            what="the control plane dropped the ended claim",
        )
        # The ended claim's attempt leaves the control plane's view with the worker's next
        # report, which may come a heartbeat after the claim itself was dropped: the task
        # waits for its GPU (a queue timeout) instead of failing at once with no_free_gpu.
        second = await _submit(
            cluster, "w1", command=["sim", "90"], gpus=1, node="w1", queue_timeout_s=60
        )
        try:
            await cluster.wait_until(
                lambda: bool(host.ledger.for_task(second)), timeout_s=60, what="second runs"
            )
        except AssertionError:
            # What the submitter and the control plane hold, for whoever reads a failure.
            leases = [(x.task_id, x.state, x.gpus) for x in cp.leases.table.leases.values()]  # type: ignore[union-attr]
            print("second task:", w1.submitter.load(second).to_json(), "leases:", leases)
            raise
        await cluster.wait_until(
            lambda: (
                bool(host.ledger.for_task(second))
                and cp.leases.table is not None
                and any(x.task_id == second for x in cp.leases.table.holding())
            ),
            timeout_s=60,
        )
        (held,) = [x for x in cp.leases.table.holding() if x.task_id == second]  # type: ignore[union-attr]
        async with cluster.operator_client() as op:
            revoked = await op.post(
                "/v1/populi/admin/exec-lease-revoke",
                json={"lease_id": held.lease_id, "reason": "test"},
            )
        assert revoked.status_code == 200, revoked.text
        await cluster.wait_until(
            lambda: w1.submitter.load(second).state != "running_local", timeout_s=60
        )
        assert not w1.ledger.claimed_gpus()
        (stopped,) = host.ledger.for_task(second)
        assert stopped.exit_code != 0 or stopped.signal is not None
