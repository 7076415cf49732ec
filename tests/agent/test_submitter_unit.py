"""The submitter built alone (no agent): a real store, the virtual clock, the simulated
executor for its local attempts, and fake peers for the control plane and the worker.

Every malformed answer a peer sends the submitter — a field missing, a field of the wrong
type, not JSON, an answer about another lease or message — is an error for that call:
for a lease request one that may have happened (the task waits for the control plane's
word, ``fallback_pending``, never runs twice), the submitter keeps running, and the task
still ends in exactly one terminal state. The decisions themselves are the core's
(``core.refusals``, the task machine's request numbers): the submitter carries them out.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from agent.exec_harness import (
    LEASE,
    NOT_JSON,
    SUBMITTER,
    T0_MS,
    WORKER,
    FakePeers,
    Gates,
    Settings,
    Spoil,
    drop,
    error,
    lease_json,
    links,
    open_store,
    principal,
    runner,
    set_at,
)

from populi_peer.agent import submitter as submitter_module
from populi_peer.agent.health import Health
from populi_peer.agent.submitter import Submitter
from populi_peer.core.fencing import FencingToken
from populi_peer.core.messages import (
    AttemptResult,
    GpuSummaryView,
    NodeView,
    ResultMessage,
    TaskSubmitRequest,
)
from populi_peer.core.tasks import TERMINAL_STATES, LeaseRequests, Task
from populi_peer.store import Store
from populi_peer.store.tasks import Tasks
from populi_peer.testing import VirtualClock
from populi_peer.testing.sim import SimHost, open_sim_host
from populi_peer.testing.waiting import wait_for

WORKER_GPU = "GPU-11111111-1111-1111-1111-111111111111"
#: When the control plane declares a lease nobody renews dead (TTL + margin).
EXPIRES_AFTER_S = 35.0


def worker_view() -> dict[str, Any]:
    return NodeView(
        id=WORKER,
        name="worker",
        address="worker.test:443",
        addresses=("worker.test:443",),
        role="worker",
        roles=("worker", "submit"),
        control_plane=False,
        lifecycle=None,
        state="active",
        heartbeat_age_ms=100,
        heartbeat_stale=False,
        stale_after_ms=10_000,
        scope="lan",
        status="running",
        accepts_remote_work=True,
        gpu_summary=GpuSummaryView(
            facts_version="v1",
            backend="nvml",
            count=1,
            allocatable=1,
            quarantined=0,
            healthy=1,
            degraded=0,
            unhealthy=0,
            unknown=0,
        ),
        cert_not_after_ms=None,
        joined_ms=T0_MS,
        eligible=True,
        ineligible_reasons=(),
    ).to_json()


@dataclass
class Peers:
    """The control plane and the worker as the submitter sees them. ``spoil[route]``
    spoils the next answers of ``nodes``, ``grant``, ``fallback``, ``lease`` (the lease
    lookup) or ``handoff`` (the worker's inbox). Nobody renews the worker's leases here:
    each expires :data:`EXPIRES_AFTER_S` after its grant; ``dead`` ones at once."""

    leases: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: dict[str, float] = field(default_factory=dict)
    spoil: dict[str, list[Spoil]] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    seq: int = 0

    def answer(self, route: str, good: Any) -> Any:
        spoils = self.spoil.get(route)
        return spoils.pop(0)(good) if spoils else good

    def issue(self, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        lease = lease_json(lease_id=f"l-{self.seq}", token=f"1.{self.seq}", **fields)
        self.leases[lease["lease_id"]] = lease
        self.issued[lease["lease_id"]] = trio.current_time()
        return lease

    def current(self, lease_id: str) -> dict[str, Any]:
        lease = self.leases[lease_id]
        expired = lease_id in self.dead or (
            lease["kind"] != "fence"
            and trio.current_time() > self.issued[lease_id] + EXPIRES_AFTER_S
        )
        if lease["state"] == "live" and expired:
            lease.update(state="expired", expires_in_s=None)
        return lease

    def install(self, fake: FakePeers) -> None:
        def nodes(request: httpx.Request, body: dict[str, Any]) -> Any:
            return self.answer(
                "nodes", {"term": 1, "membership_version": 1, "nodes": [worker_view()]}
            )

        def grant(request: httpx.Request, body: dict[str, Any]) -> Any:
            lease = self.issue(
                task_id=body["task_id"],
                attempt=body["attempt"],
                holder=body["target"],
                gpus=[WORKER_GPU] if body["gpus_wanted"] else [],
                kind="remote" if body["target"] != SUBMITTER else "local",
            )
            return self.answer("grant", {"lease": lease, "replay": False})

        def fallback(request: httpx.Request, body: dict[str, Any]) -> Any:
            task = [
                self.current(lease_id)
                for lease_id, x in list(self.leases.items())
                if x["task_id"] == body["task_id"]
            ]
            again = [
                x for x in task if x["holder"] == SUBMITTER and x["attempt"] == body["attempt"]
            ]
            if again and again[-1]["state"] == "live":
                # The same request again (its answer was lost): the same lease, a replay.
                prior = task[-2] if len(task) > 1 else None
                return self.answer("fallback", {"lease": again[-1], "prior": prior, "replay": True})
            if any(x["state"] == "live" for x in task):
                return error(409, "lease_refused", reasons=["lease_live"])
            lease = self.issue(
                task_id=body["task_id"],
                attempt=body["attempt"],
                holder=SUBMITTER,
                kind="fence",
                ttl_s=0.0,
                expires_in_s=None,
            )
            prior = task[-1] if task else None
            return self.answer("fallback", {"lease": lease, "prior": prior, "replay": False})

        def get(request: httpx.Request, body: dict[str, Any]) -> Any:
            lease_id = request.url.path.split("/")[5]
            if lease_id not in self.leases:
                return error(404, "lease_not_found")
            return self.answer("lease", {"lease": self.current(lease_id)})

        def release(request: httpx.Request, body: dict[str, Any]) -> Any:
            lease = self.leases[request.url.path.split("/")[5]]
            lease["state"] = "released"
            return {"lease": lease, "replay": False}

        def inbox(request: httpx.Request, body: dict[str, Any]) -> Any:
            kind = body.get("type")
            result: dict[str, Any] = (
                {"verdict": "start"}
                if kind == "handoff"
                else {"cancelled": True, "state": "running"}
            )
            good = {
                "message_id": body.get("message_id"),
                "type": kind,
                "duplicate": False,
                "result": result,
            }
            return self.answer("handoff", good) if kind == "handoff" else good

        fake.on("GET", "/v1/populi/nodes", nodes)
        fake.on("POST", "/v1/populi/exec/leases", grant)
        fake.on("POST", "/v1/populi/exec/fallback", fallback)
        fake.on("GET", LEASE, get)
        fake.on("POST", LEASE + "/release", release)
        fake.on("POST", "/v1/populi/inbox", inbox)


@dataclass
class World:
    submitter: Submitter
    store: Store
    host: SimHost
    fake: FakePeers
    peers: Peers
    gates: Gates
    health: Health


@contextlib.asynccontextmanager
async def open_submitter(tmp_path: Path, gates: Gates | None = None) -> AsyncIterator[World]:
    fake, peers = FakePeers(), Peers()
    peers.install(fake)
    gates = gates or Gates()
    data_dir = tmp_path / "submitter"
    store = open_store(data_dir, node_id=SUBMITTER)
    clock = VirtualClock()
    link = links(store, SUBMITTER, fake, clock)
    health = Health(clock)
    try:
        async with open_sim_host() as host:
            submitter = Submitter(
                node_id=SUBMITTER,
                tasks=Tasks(store),
                runner=runner(
                    store,
                    data_dir,
                    node_id=SUBMITTER,
                    link=link,
                    host=host,
                    clock=clock,
                    health=health,
                ),
                clock=clock,
                control_plane=link.control_plane,
                peers=link.peers,
                records=Settings(),
                node=gates,
                health=health,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(submitter.run)
                yield World(submitter, store, host, fake, peers, gates, health)
                nursery.cancel_scope.cancel()
    finally:
        await link.client.aclose()
        store.close()


def submit(
    world: World, *command: str, gpus: int = 1, node: str | None = None, node_fallback: bool = False
) -> str:
    request = TaskSubmitRequest(
        command=command or ("sim", "1"),
        env={},
        gpus=gpus,
        work_class=None,
        node=node,
        node_fallback=node_fallback,
        no_fallback=False,
        queue_timeout_s=None,
        timeout_s=None,
    )
    return world.submitter.submit(request, caller=SUBMITTER).task_id


async def ended(world: World, task_id: str) -> Task:
    await wait_for(
        f"{task_id} ends",
        lambda: world.submitter.load(task_id).terminal and task_id not in world.submitter.controls,
        timeout_s=600,
    )
    return world.submitter.load(task_id)


def result_of(task: Task, *, exit_code: int = 0) -> ResultMessage:
    attempt = task.current_attempt
    assert attempt is not None
    return ResultMessage(
        result=AttemptResult(
            task_id=task.task_id,
            attempt=attempt.n,
            node="n-anyone",
            token=attempt.token,
            lease_id=attempt.lease_id,
            role="worker",
            outcome="exited",
            exit_code=exit_code,
            signal=None,
            stop_reason="exited",
            detail="",
            gpus=(WORKER_GPU,),
            started_wall_ms=T0_MS,
            stopped_wall_ms=T0_MS + 1,
            stdout_total=0,
            stderr_total=0,
        ),
        stdout_tail_b64="",
        stderr_tail_b64="",
    )


def terminal_transitions(caplog: pytest.LogCaptureFixture, task_id: str) -> list[str]:
    return [
        r.fields["state"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "task transition"
        and r.fields["task_id"] == task_id  # type: ignore[attr-defined]
        and r.fields["state"] in TERMINAL_STATES  # type: ignore[attr-defined]
    ]


async def handed_off(world: World, task_id: str) -> Task:
    """``task_id`` once the submitter has sent its handoff (to the worker's inbox)."""
    await wait_for(
        "handed off", lambda: world.fake.requests("POST", "/v1/populi/inbox"), timeout_s=30
    )
    return world.submitter.load(task_id)


# -- alone -------------------------------------------------------------------------------


async def test_a_remote_task_runs_on_its_worker_and_its_result_is_taken(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_submitter(tmp_path) as world:
        task_id = submit(world)
        task = await handed_off(world, task_id)
        assert task.state == "running_remote" and task.current_attempt is not None
        assert task.current_attempt.token == FencingToken(1, 1)
        (sent,) = world.fake.requests("POST", "/v1/populi/inbox")
        assert (sent.host, sent.body["type"], sent.body["gpus"]) == (
            "worker.test",
            "handoff",
            [WORKER_GPU],
        )
        answer = await world.submitter.on_result(principal(WORKER), result_of(task))
        assert (answer.accepted, answer.state) == (True, "succeeded")
        record = world.submitter.record(task_id)
        assert record.results["1"].result.node == WORKER  # the signer, whatever it said
        assert (await ended(world, task_id)).state == "succeeded"
        assert world.host.ledger.runs == []  # nothing ran here


async def test_a_result_for_another_token_is_kept_apart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_submitter(tmp_path) as world:
        task_id = submit(world)
        task = await handed_off(world, task_id)
        stale = result_of(task)
        stale = ResultMessage(
            result=AttemptResult(**{**_fields(stale.result), "token": FencingToken(1, 0)}),
            stdout_tail_b64="",
            stderr_tail_b64="",
        )
        answer = await world.submitter.on_result(principal(WORKER), stale)
        assert (answer.accepted, answer.state) == (False, "running_remote")
        record = world.submitter.record(task_id)
        assert record.results == {} and len(record.ignored_results) == 1
        await world.submitter.on_result(principal(WORKER), result_of(task))
        assert (await ended(world, task_id)).state == "succeeded"


def _fields(result: AttemptResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in AttemptResult.__dataclass_fields__}


async def test_remote_execution_off_runs_here_without_asking_anyone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_submitter(tmp_path, Gates(remote=False)) as world:
        task = await ended(world, submit(world, "sim", "2", gpus=0))
        assert task.state == "succeeded"
        assert task.attempts[0].placement_reasons == ("remote_disabled",)
        assert world.fake.seen == []
        (run,) = world.host.ledger.runs
        assert run.node == SUBMITTER and run.exit_code == 0


async def test_a_lost_grant_answer_is_asked_again_with_the_same_number(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Request-number replay, in the task record: a grant whose answer was lost leaves
    its number pending (durable); the next request of another kind takes a new one."""
    async with open_submitter(tmp_path) as world:
        world.peers.spoil["grant"] = [lambda good: b"<html>gateway timeout</html>"]
        task_id = submit(world)
        await wait_for(
            "waiting for the word",
            lambda: world.submitter.load(task_id).state in ("fallback_pending", "running_local"),
            timeout_s=30,
        )
        task = await ended(world, task_id)
        assert task.state == "succeeded"
        grants = world.fake.requests("POST", "/v1/populi/exec/leases")
        fallbacks = world.fake.requests("POST", "/v1/populi/exec/fallback")
        assert [g.body["attempt"] for g in grants] == [1]
        assert {f.body["attempt"] for f in fallbacks} == {2}
        assert task.requests == LeaseRequests(highest=2)
        # Nothing ran twice: the local attempt is the task's only run.
        assert [run.attempt for run in world.host.ledger.runs] == [1]
        assert task.attempts[0].n == 1 and task.attempts[0].where == "local"


# -- malformed answers ---------------------------------------------------------------------


#: What the task's decision log says of each route's failed call.
DECISION = {
    "nodes": "control_plane_unreachable",
    "grant": "control_plane_unreachable",
    "handoff": "worker_unreachable",
    "lease": "control_plane_unreachable",
    "fallback": "control_plane_unreachable",
}

#: (route, label, spoil, how the task ends). Every spoiled answer is the first of its
#: route; the answers after it are good.
MALFORMED: list[tuple[str, str, Spoil, str]] = [
    ("nodes", "missing-field", drop("nodes"), "failed"),
    ("nodes", "wrong-type", set_at("yes", "nodes", 0, "eligible"), "failed"),
    ("nodes", "not-json", NOT_JSON, "failed"),
    ("grant", "missing-field", drop("lease"), "succeeded"),
    ("grant", "wrong-type", set_at(3.7, "lease", "token"), "succeeded"),
    ("grant", "not-json", NOT_JSON, "succeeded"),
    ("grant", "wrong-lease-task", set_at("t-other", "lease", "task_id"), "succeeded"),
    ("grant", "wrong-lease-attempt", set_at(7, "lease", "attempt"), "succeeded"),
    ("grant", "wrong-lease-holder", set_at("n-else", "lease", "holder"), "succeeded"),
    ("handoff", "missing-field", drop("result"), "succeeded"),
    ("handoff", "wrong-type", set_at("no", "duplicate"), "succeeded"),
    ("handoff", "not-json", NOT_JSON, "succeeded"),
    ("handoff", "wrong-message", set_at("handoff-t-9-9", "message_id"), "succeeded"),
    ("handoff", "wrong-kind", set_at("cancel", "type"), "succeeded"),
    ("lease", "missing-field", drop("lease", "state"), "succeeded"),
    ("lease", "wrong-type", set_at(["live"], "lease", "state"), "succeeded"),
    ("lease", "not-json", NOT_JSON, "succeeded"),
    ("lease", "wrong-lease", set_at("l-other", "lease", "lease_id"), "succeeded"),
    ("fallback", "missing-field", drop("lease"), "succeeded"),
    ("fallback", "wrong-type", set_at(5, "prior"), "succeeded"),
    ("fallback", "not-json", NOT_JSON, "succeeded"),
    ("fallback", "wrong-lease-holder", set_at(WORKER, "lease", "holder"), "succeeded"),
    ("fallback", "wrong-lease-attempt", set_at(1, "lease", "attempt"), "succeeded"),
]


@pytest.mark.parametrize(
    ("route", "spoil", "end"),
    [(route, spoil, end) for route, _, spoil, end in MALFORMED],
    ids=[f"{route}-{label}" for route, label, _, _ in MALFORMED],
)
async def test_a_malformed_answer_is_an_error_for_that_call(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    route: str,
    spoil: Spoil,
    end: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with open_submitter(tmp_path) as world:
        world.peers.spoil[route] = [spoil]
        if route == "fallback":
            # The worker dies: its lease is dead, and the submitter asks for the word.
            world.peers.dead.add("l-1")
        task_id = submit(world)
        task = await ended(world, task_id)
        codes = [r.code for r in task.reasons]
        assert task.state == end, codes
        assert terminal_transitions(caplog, task_id) == [end]
        assert DECISION[route] in codes, codes
        # Never in two places: at most one local attempt ran here, after the word.
        runs = world.host.ledger.runs
        assert len(runs) == (0 if end == "failed" else 1)
        if runs:
            local = task.attempts[-1]
            assert local.where == "local" and "lease_dead_confirmed" in local.placement_reasons
        # The submitter goes on: the next task runs to its end.
        world.gates.remote = False
        assert (await ended(world, submit(world, gpus=0))).state == "succeeded"


# -- a worker that leaves, a pinned node ---------------------------------------------------


async def test_a_worker_that_leaves_sends_the_task_back_to_fall_back_here(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``populi leave`` on the worker stops the attempt and releases its lease; the result
    it delivers (cancelled, ``worker_left``) is not a cancel of the task: the submitter
    falls back, and says why."""
    async with open_submitter(tmp_path) as world:
        task_id = submit(world)
        task = await handed_off(world, task_id)
        assert task.current_attempt is not None and task.current_attempt.lease_id is not None
        world.peers.leases[task.current_attempt.lease_id]["state"] = "released"
        left = result_of(task)
        left = ResultMessage(
            result=AttemptResult(
                **{
                    **_fields(left.result),
                    "outcome": "cancelled",
                    "detail": "worker_left",
                    "exit_code": None,
                    "stop_reason": "cancelled",
                }
            ),
            stdout_tail_b64="",
            stderr_tail_b64="",
        )
        answer = await world.submitter.on_result(principal(WORKER), left)
        assert answer.state == "fallback_pending"
        done = await ended(world, task_id)
        assert done.state == "succeeded", done.reasons
        first, second = done.attempts
        assert (first.outcome, second.where) == ("lease_lost", "local")
        assert "worker_left" in second.placement_reasons
        assert "cancelled" not in [r.code for r in done.reasons]


async def test_a_lease_released_by_a_leaving_worker_says_so_before_its_result(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The leaving worker's release carries ``worker_left``: a submitter whose lease check
    sees the released lease before the result reaches it falls back for the same reason."""
    async with open_submitter(tmp_path) as world:
        task_id = submit(world)
        task = await handed_off(world, task_id)
        assert task.current_attempt is not None and task.current_attempt.lease_id is not None
        lease = world.peers.leases[task.current_attempt.lease_id]
        lease.update(state="released", reason="worker_left")
        done = await ended(world, task_id)  # no result ever comes
        assert done.state == "succeeded", done.reasons
        first, second = done.attempts
        assert first.where == "remote"
        assert second.where == "local", done.attempts
        assert "worker_left" in second.placement_reasons, second.placement_reasons
        assert "lease_released" not in second.placement_reasons
        assert "cancelled" not in [r.code for r in done.reasons]


def refused_grant(world: World, reason: str) -> Spoil:
    """A grant the control plane refuses (the fake issued it: it never was)."""

    def spoil(good: dict[str, Any]) -> Any:
        world.peers.leases.pop(good["lease"]["lease_id"])
        return error(409, "lease_refused", reasons=[reason])

    return spoil


async def test_a_task_pinned_to_a_node_that_cannot_take_it_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``--node`` means only there: when the node refuses the grant the task fails, exit
    4, with the reason, and takes nothing here."""
    async with open_submitter(tmp_path) as world:
        world.peers.spoil["grant"] = [refused_grant(world, "node_ineligible")]
        task = await ended(world, submit(world, gpus=0, node=WORKER))
        assert (task.state, task.attempts) == ("failed", ())
        assert task.terminal_reason == "node_pinned_unavailable"
        assert "no_node_fallback" in [r.code for r in task.reasons]
        assert submitter_module.exit_status(task) == 4
        assert world.host.ledger.runs == []
        assert world.fake.requests("POST", "/v1/populi/exec/fallback") == []


async def test_node_fallback_lets_a_pinned_task_run_here(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_submitter(tmp_path) as world:
        world.peers.spoil["grant"] = [refused_grant(world, "node_ineligible")]
        task = await ended(world, submit(world, gpus=0, node=WORKER, node_fallback=True))
        assert task.state == "succeeded"
        (attempt,) = task.attempts
        assert attempt.where == "local" and "node_pinned_unavailable" in attempt.placement_reasons


# -- where the rules live ------------------------------------------------------------------


def test_the_submitter_decides_nothing_the_core_decides() -> None:
    """Refusal handling and request numbers are the core's (``core.refusals``,
    ``core.tasks``): the submitter names no refusal reason and keeps no request number
    of its own."""
    source = inspect.getsource(submitter_module)
    for word in (
        "node_not_reported",
        "no_free_gpu",
        "stale_attempt",
        "lease_live",
        "pending_request",
        "max_requested_attempt",
        "extras",
    ):
        assert word not in source, word
