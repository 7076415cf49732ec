"""A worker cut off from the control plane, in virtual time (safety rules 1-4, 7).

Three nodes on the virtual cluster with simulated tasks (``populi_peer.testing.sim``):
``cp`` (control plane), ``w1`` (the submitter), ``w2`` (the worker). A GPU task submitted
on ``w1`` and pinned to ``w2`` runs there under a lease; then
``network.partition(w2, cp)`` cuts the worker from the control plane alone: ``w2`` can
no longer renew, while ``w1`` still reaches both ``cp`` and ``w2``.

The contract, with exact virtual-time bounds counted from the last renewal the control
plane accepted (at ``r``; there are no delivery delays, so it was sent at ``r`` too):

- the worker's supervisor stops the task at ``r + ttl - stop_margin`` (rule 3), with
  nothing from the agent: the renewals it keeps sending hang across the partition;
- the control plane declares the lease ``expired`` only after ``r + ttl + margin``
  (rule 4), and not long after (its timer);
- the submitter falls back only on that word, with a higher token (rules 1, 2);
- the task ends ``succeeded`` with exactly one accepted result, and no two executions
  overlap (rule 1);
- after healing, the worker's result for the first attempt (``lease_lost``) is recorded
  at the submitter and changes nothing (rule 7).

The seeded simulation's observer (``agent.sim_support.Observer``) checks the whole
contract after every step as well, and ``check_rule_7`` the stores at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from agent.sim_support import (
    EXPIRY_MARGIN_S,
    REMOTE_TASK_S,
    TTL_S,
    WATCH_S,
    Action,
    Observer,
    Scenario,
    check_rule_7,
    open_small_cluster,
    stopped_at_deadline,
    submit_remote,
)

from populi_peer.core.fencing import FencingToken
from populi_peer.testing import Faults
from populi_peer.testing.cluster import VirtualCluster

RENEW_PATH = "/renew"


class Answers:
    """``on_response`` hook: when (virtual time) the control plane answered which renewal
    and which fallback."""

    def __init__(self) -> None:
        self.renewed: list[tuple[float, str]] = []  # (at, lease id), successful only
        self.fallbacks: list[tuple[float, dict[str, Any]]] = []
        self.observer: Observer | None = None

    def __call__(self, request: httpx.Request, response: httpx.Response) -> None:
        path = request.url.path
        if self.observer is not None:
            self.observer.on_answer(request, response)
        if not response.is_success:
            return
        if path.startswith("/v1/populi/exec/leases/") and path.endswith(RENEW_PATH):
            self.renewed.append((trio.current_time(), path.split("/")[-2]))
        elif path == "/v1/populi/exec/fallback":
            self.fallbacks.append((trio.current_time(), response.json()))


class LeaseWatch:
    """Steps the observer and notes, for one lease, the last instant it was seen holding
    and the first it was seen dead on the control plane."""

    def __init__(self, cluster: VirtualCluster, observer: Observer) -> None:
        self.cluster = cluster
        self.observer = observer
        self.lease_id: str | None = None
        self.last_holding: float | None = None
        self.first_dead: float | None = None
        self.state: str | None = None

    async def run(self) -> None:
        while True:
            self.observer.step(self.cluster)
            table = self.cluster.cp.leases.table
            if self.lease_id is not None and table is not None:
                lease = table.leases.get(self.lease_id)
                if lease is not None:
                    self.state = lease.state
                    if lease.holding:
                        self.last_holding = trio.current_time()
                    elif self.first_dead is None:
                        self.first_dead = trio.current_time()
            await trio.sleep(WATCH_S)


@pytest.mark.parametrize("from_submitter", [False, True], ids=["cp-only", "cp-and-submitter"])
async def test_worker_cut_from_the_control_plane_stops_and_the_task_falls_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, from_submitter: bool
) -> None:
    """``cp-only``: w2 still reaches w1, so its ``lease_lost`` result arrives during the
    partition (the task waits in ``fallback_pending`` for the control plane's word);
    ``cp-and-submitter``: w2 is cut from w1 as well, so that result arrives only after
    healing, when the task has long succeeded (``result_late``)."""
    answers = Answers()
    async with (
        open_small_cluster(tmp_path, workers=2, on_response=answers) as (cluster, host),
        trio.open_nursery() as watchers,
    ):
        cp, w1, w2 = (cluster.node_ids[n] for n in ("cp", "w1", "w2"))
        cluster.network.record = True
        scenario = Scenario(
            seed=-1,
            faults=Faults(),
            actions=(
                Action(0.0, "submit", "w1", argv=("sim", f"{REMOTE_TASK_S:g}")),
                Action(0.0, "partition", "w2", other="cp", until=math.inf),
                *([Action(0.0, "partition", "w2", other="w1", until=math.inf)] * from_submitter),
            ),
        )
        observer = Observer(seed=-1, scenario=scenario, ledger=host.ledger)
        answers.observer = observer
        watch = LeaseWatch(cluster, observer)
        watchers.start_soon(watch.run)

        # One periodic renewal lands (the deadline moves), then the cut, half-way to the
        # next one.
        task_id, remote, lease_id = await submit_remote(cluster, host, observer)
        watch.lease_id = lease_id
        await trio.sleep(TTL_S / 6)
        cut_at = trio.current_time()
        cluster.network.partition(w2, cp)
        observer.note("partition w2 <-> cp")
        if from_submitter:
            cluster.network.partition(w2, w1)
            observer.note("partition w2 <-> w1")

        await cluster.wait_until(lambda: not remote.running, timeout_s=TTL_S)
        renewals = [at for at, lease in answers.renewed if lease == lease_id]
        last_renewal = renewals[-1]
        assert last_renewal < cut_at
        assert len(renewals) == len(remote.deadlines_boot) == 2, (renewals, remote.deadlines_boot)
        # The supervisor's deadline is the last accepted renewal's (sent at the same
        # virtual instant, on w2's boot clock, which runs with trio's here).
        boot_offset = remote.started_boot - remote.started
        assert remote.deadlines_boot[-1] == last_renewal + boot_offset + TTL_S
        stop_at = stopped_at_deadline(remote, last_renewal)
        assert remote.ticks and remote.ticks[-1] <= stop_at
        # It stopped because it could not renew: renewals were tried across the cut.
        assert any(
            d.outcome == "partitioned"
            and d.src == w2
            and d.dst == cp
            and d.path.endswith(RENEW_PATH)
            for d in cluster.network.log
        )
        print(f"\nremote attempt stopped {remote.stopped - cut_at:.3f} s after the cut")

        # The submitter falls back on the control plane's word, and only then.
        await cluster.wait_until(lambda: len(host.ledger.for_task(task_id)) == 2, timeout_s=30)
        local = host.ledger.for_task(task_id)[1]
        expire_at = last_renewal + TTL_S + EXPIRY_MARGIN_S
        assert watch.state is not None and watch.first_dead is not None
        assert watch.last_holding is not None and watch.last_holding >= expire_at - WATCH_S
        assert expire_at < watch.first_dead <= expire_at + 1.0, (watch.first_dead, expire_at)
        dead = cluster.cp.leases.table.get(lease_id)
        assert dead.state == "expired", dead
        # The control plane's own expiry: from when it received that renewal (docs/design.md         # rule 3: never earlier than the holder's deadline).
        assert dead.expires_mono == last_renewal + TTL_S, dead
        confirmed = [
            (at, body) for at, body in answers.fallbacks if body["lease"]["task_id"] == task_id
        ]
        assert confirmed, "no fallback was confirmed by the control plane"
        fallback_at, body = confirmed[0]
        assert fallback_at > expire_at
        assert (body["prior"] or {}).get("state") == "expired", body
        assert local.started >= fallback_at
        assert (local.node, local.role, local.attempt) == ("w1", "local", 2)
        assert FencingToken.parse(local.token) > FencingToken.parse(remote.token)
        assert local.started >= remote.end()
        print(
            f"lease declared dead {watch.first_dead - last_renewal:.3f} s after the last "
            f"renewal; local attempt began {local.started - cut_at:.3f} s after the cut"
        )

        # The task ends with the local attempt's result, the only one accepted.
        await cluster.wait_until(
            lambda: cluster["w1"].submitter.load(task_id).terminal, timeout_s=REMOTE_TASK_S + 30
        )
        task = cluster["w1"].submitter.load(task_id)
        assert task.state == "succeeded", task
        first, second = task.attempts
        assert (first.where, first.node, first.token) == (
            "remote",
            w2,
            FencingToken.parse(remote.token),
        )
        assert (second.where, second.node, second.token) == (
            "local",
            w1,
            FencingToken.parse(local.token),
        )
        assert second.placement_reasons[0] == "lease_dead_confirmed", second
        accepted = [r for r in task.reasons if r.code == "result"]
        assert len(accepted) == 1 and f"token={local.token} " in accepted[0].detail, accepted
        runs = host.ledger.for_task(task_id)
        assert len(runs) == 2 and not host.ledger.running()
        assert runs[0].end() <= runs[1].started

        # Heal: whatever w2 still has to say about attempt 1 arrives, is recorded, and
        # changes nothing.
        decisions = [r.code for r in task.reasons]
        if from_submitter:
            # Nothing from w2 reached w1: the lease's death alone moved the task on.
            assert "1" not in cluster["w1"].submitter.record(task_id).results
            assert "lease_lost" not in decisions, decisions
        else:
            # w2 said it lost the lease: the task waited for the control plane's word.
            assert "1" in cluster["w1"].submitter.record(task_id).results
            assert decisions.index("lease_lost") < decisions.index("lease_dead_confirmed")
        cluster.network.heal()
        observer.note("healed")

        def delivered() -> bool:
            row = cluster["w2"].runner.row(task_id, 1, "worker")
            return row is not None and row.delivered_ms is not None

        await cluster.wait_until(delivered, timeout_s=60)
        row = cluster["w2"].runner.row(task_id, 1, "worker")
        assert row is not None and row.state == "finished"
        record = cluster["w1"].submitter.record(task_id)
        if from_submitter:
            # Late (the task had long succeeded): recorded apart, never over the accepted
            # results, and ignored.
            late = [r.result for r in record.ignored_results if r.result.attempt == 1]
            assert late and late[-1].outcome == "lease_lost", record
            assert late[-1].token == FencingToken.parse(remote.token)
            assert "1" not in record.results, record.results
        else:
            # Arrived while it was current: the lease_lost that sent the task to wait.
            result = record.results["1"].result
            assert result.outcome == "lease_lost", record.results
            assert result.token == FencingToken.parse(remote.token)
        await trio.sleep(TTL_S)  # anything else w2 might send
        after = cluster["w1"].submitter.load(task_id)
        assert after == task, (after, task)
        assert cluster.cp.leases.table.get(lease_id).state == "expired"
        assert len(host.ledger.for_task(task_id)) == 2
        watchers.cancel_scope.cancel()
    tasks = check_rule_7(observer, {n: tmp_path / n for n in ("cp", "w1", "w2")})
    assert tasks[task_id]["state"] == "succeeded"
