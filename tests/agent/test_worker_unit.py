"""The worker built alone (no agent): a real store, the virtual clock, the simulated
executor, and fake peers for the control plane and the submitter.

- The fence check is the core's :class:`~populi_peer.core.fencing.FenceBook` (safety
  rule 2): a higher token starts, an equal one is acknowledged and never started twice, a
  lower one is refused, also after a restart (the book is rebuilt from the store).
- Every malformed answer a peer sends the worker — a field missing, a field of the wrong
  type, not JSON, an answer about another lease or message — is an error for that call:
  the worker keeps running, the attempt ends once (one finished row, one result), and the
  result reaches the submitter once it answers properly.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
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
    WORKER,
    FakePeers,
    Gates,
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

from populi_peer.agent import worker as worker_module
from populi_peer.agent.attempts import stored_result
from populi_peer.agent.health import Health
from populi_peer.agent.holdings import NodeLedger
from populi_peer.agent.worker import Worker
from populi_peer.config import ExecConfig
from populi_peer.core.fencing import FenceBook, FencingToken
from populi_peer.core.messages import HandoffMessage
from populi_peer.core.reports import Claim
from populi_peer.errors import Conflict
from populi_peer.store import Store
from populi_peer.store.attempts import AttemptIdentity, Attempts
from populi_peer.testing import VirtualClock
from populi_peer.testing.sim import SimHost, open_sim_host
from populi_peer.testing.waiting import wait_for


@dataclass
class ControlPlane:
    """The control plane as the worker sees it: every lease the submitter was granted.
    ``spoil[route]`` spoils the next answers of ``renew``, ``release``, ``get`` or
    ``deliver`` (a function of the good answer's JSON: what to send instead)."""

    leases: dict[str, dict[str, Any]]
    spoil: dict[str, list[Spoil]]

    def grant(self, lease_id: str, task_id: str, attempt: int, token: str) -> None:
        self.leases[lease_id] = lease_json(
            lease_id=lease_id, task_id=task_id, attempt=attempt, token=token
        )

    def answer(self, route: str, good: dict[str, Any]) -> Any:
        spoils = self.spoil.get(route)
        return spoils.pop(0)(good) if spoils else good

    def install(self, fake: FakePeers) -> None:
        def of_lease(
            handle: Callable[[dict[str, Any], dict[str, Any]], Any],
        ) -> Callable[[httpx.Request, dict[str, Any]], Any]:
            """A route on one lease: ``lease_not_found`` for a lease never granted."""

            def respond(request: httpx.Request, body: dict[str, Any]) -> Any:
                lease = self.leases.get(request.url.path.split("/")[5])
                if lease is None:
                    return error(404, "lease_not_found")
                return handle(lease, body)

            return respond

        @of_lease
        def renew(lease: dict[str, Any], body: dict[str, Any]) -> Any:
            return self.answer("renew", {"lease": lease})

        @of_lease
        def release(lease: dict[str, Any], body: dict[str, Any]) -> Any:
            state = "completed" if body.get("outcome") == "completed" else "released"
            lease = {**lease, "state": state, "expires_in_s": None}
            self.leases[lease["lease_id"]] = lease
            return self.answer("release", {"lease": lease, "replay": False})

        @of_lease
        def get(lease: dict[str, Any], body: dict[str, Any]) -> Any:
            return self.answer("get", {"lease": lease})

        def deliver(request: httpx.Request, body: dict[str, Any]) -> Any:
            good = {
                "message_id": body.get("message_id"),
                "type": body.get("type"),
                "duplicate": False,
                "result": {"accepted": True, "state": "succeeded"},
            }
            return self.answer("deliver", good)

        fake.on("POST", LEASE + "/renew", renew)
        fake.on("POST", LEASE + "/release", release)
        fake.on("GET", LEASE, get)
        fake.on("POST", "/v1/populi/inbox", deliver)


@dataclass
class World:
    worker: Worker
    store: Store
    host: SimHost
    fake: FakePeers
    cp: ControlPlane
    health: Health


def build_worker(
    store: Store, data_dir: Path, fake: FakePeers, host: SimHost, gates: Gates
) -> Worker:
    clock = VirtualClock()
    link = links(store, WORKER, fake, clock)
    health = Health(clock)
    run = runner(store, data_dir, node_id=WORKER, link=link, host=host, clock=clock, health=health)
    return Worker(
        node_id=WORKER,
        runner=run,
        attempts=run.attempts,
        clock=clock,
        config=ExecConfig(),
        control_plane=link.control_plane,
        peers=link.peers,
        gates=gates,
        health=health,
        accept_check=NodeLedger(node_id=WORKER, attempts=run.attempts, clock=clock).accepts,
    )


@contextlib.asynccontextmanager
async def open_worker(tmp_path: Path, gates: Gates | None = None) -> AsyncIterator[World]:
    fake = FakePeers()
    cp = ControlPlane(leases={}, spoil={})
    cp.install(fake)
    data_dir = tmp_path / "worker"
    store = open_store(data_dir, node_id=WORKER)
    try:
        async with open_sim_host() as host:
            worker = build_worker(store, data_dir, fake, host, gates or Gates())
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                yield World(worker, store, host, fake, cp, worker.health)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def handoff(
    task_id: str = "t-1", attempt: int = 1, token: str = "1.5", *, seconds: float = 2.0
) -> HandoffMessage:
    return HandoffMessage(
        task_id=task_id,
        lease_id=f"l-{task_id}-{attempt}-{token}",
        attempt=attempt,
        token=FencingToken.parse(token),
        command=("sim", str(seconds)),
        env={},
        gpus=(),
        ttl_s=30.0,
        work_class="agent",
        settings_serial=1,
    )


async def hand(world: World, message: HandoffMessage) -> str:
    world.cp.grant(message.lease_id, message.task_id, message.attempt, str(message.token))
    answer = await world.worker.on_handoff(principal(SUBMITTER), message)
    return answer.verdict


async def delivered(world: World, task_id: str, attempt: int) -> None:
    def done() -> bool:
        row = world.worker.runner.row(task_id, attempt, "worker")
        return row is not None and row.delivered_ms is not None

    await wait_for(f"{task_id}/{attempt} delivered", done, timeout_s=120)


# -- the fence -------------------------------------------------------------------------------


async def test_the_fence_book_answers_every_handoff_and_survives_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_worker(tmp_path) as world:
        assert await hand(world, handoff(token="1.5")) == "start"
        assert world.worker.fences.highest("t-1") == FencingToken(1, 5)
        # Equal: acknowledged, never started twice.
        assert await hand(world, handoff(token="1.5")) == "duplicate"
        # Lower: refused, naming the highest.
        with pytest.raises(Conflict) as stale:
            await hand(world, handoff(token="1.4"))
        assert stale.value.code == "stale_token" and stale.value.details["highest"] == "1.5"
        await delivered(world, "t-1", 1)
        assert [run.token for run in world.host.ledger.for_task("t-1")] == ["1.5"]
        # Higher: a new attempt starts.
        assert await hand(world, handoff(attempt=2, token="2.1")) == "start"
        await delivered(world, "t-1", 2)
        assert [run.token for run in world.host.ledger.for_task("t-1")] == ["1.5", "2.1"]
        # A worker rebuilt from the same store (a restart) has the same book.
        again = build_worker(world.store, tmp_path / "worker", world.fake, world.host, Gates())
        assert again.fences == FenceBook.from_entries([("t-1", FencingToken(2, 1))])
        with pytest.raises(Conflict):
            await again.on_handoff(principal(SUBMITTER), handoff(attempt=1, token="1.5"))
        answer = await again.on_handoff(principal(SUBMITTER), handoff(attempt=2, token="2.1"))
        assert (answer.verdict, answer.state) == ("duplicate", "finished")


async def test_the_fence_check_is_the_core_book(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where rule 2 lives: every handoff is answered by ``FenceBook.check_handoff``, and
    the worker orders no tokens of its own."""
    calls: list[tuple[str, FencingToken]] = []
    real = FenceBook.check_handoff

    def spy(self: FenceBook, task_id: str, token: FencingToken) -> Any:
        calls.append((task_id, token))
        return real(self, task_id, token)

    monkeypatch.setattr(FenceBook, "check_handoff", spy)
    async with open_worker(tmp_path) as world:
        await hand(world, handoff(token="1.5"))
        await hand(world, handoff(token="1.5"))
        with pytest.raises(Conflict):
            await hand(world, handoff(token="1.4"))
    assert [token for _, token in calls] == [
        FencingToken(1, 5),
        FencingToken(1, 5),
        FencingToken(1, 4),
    ]
    tree = ast.parse(inspect.getsource(worker_module))
    ordering = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ordering) for op in node.ops):
            text = ast.unparse(node)
            assert "token" not in text and "fence" not in text, text


async def test_the_fence_and_the_attempt_are_written_together(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_worker(tmp_path) as world:
        await hand(world, handoff(token="3.4"))
        assert world.worker.attempts.fences() == [("t-1", FencingToken(3, 4))]
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.token == FencingToken(3, 4)


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "code"),
    [
        (Gates(remote=False), "remote_disabled"),
        (Gates(is_leaving=True), "node_leaving"),
        (Gates(is_retired=True), "node_retired"),
    ],
)
async def test_a_refused_handoff_gives_its_lease_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, gates: Gates, code: str
) -> None:
    async with open_worker(tmp_path, gates) as world:
        with pytest.raises(Conflict) as refused:
            await hand(world, handoff())
        assert refused.value.code == code
        (release,) = world.fake.requests("POST", LEASE + "/release")
        assert release.body["outcome"] == "stopped" and "reason" not in release.body
        assert world.worker.fences.highest("t-1") is None  # nothing admitted
        assert not world.host.ledger.runs


async def test_a_handoff_into_a_missing_cwd_is_refused_and_gives_its_lease_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``--cwd``: a worker without that directory refuses the handoff (409 ``cwd_missing``,
    so the submitter falls back) and gives the lease back; one that has it takes it."""
    async with open_worker(tmp_path) as world:
        missing = replace(handoff(), cwd=str(tmp_path / "no-such-dir"))
        with pytest.raises(Conflict) as refused:
            await hand(world, missing)
        assert refused.value.code == "cwd_missing"
        assert "no-such-dir" in str(refused.value)
        (release,) = world.fake.requests("POST", LEASE + "/release")
        assert release.body["outcome"] == "stopped"
        assert not world.host.ledger.runs
        there = replace(handoff(task_id="t-2"), cwd=str(tmp_path))
        assert await hand(world, there) == "start"
        row = world.worker.runner.row("t-2", 1, "worker")
        assert row is not None and row.body["cwd"] == str(tmp_path)


async def test_a_leaving_worker_stops_its_attempts_as_worker_left_and_delivers_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``populi leave``: the attempts it runs for others stop, their leases are released,
    and the results say ``worker_left`` (their submitters fall back, not cancel) and are
    delivered before the worker goes."""
    async with open_worker(tmp_path) as world:
        assert await hand(world, handoff(seconds=600)) == "start"
        await wait_for("running", world.host.ledger.running, timeout_s=30)
        assert await world.worker.stop_all("node_leaving") == 1
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.result is not None and row.delivered_ms is not None
        result = stored_result(row).result
        assert (result.outcome, result.detail) == ("cancelled", "worker_left")
        (release,) = world.fake.requests("POST", LEASE + "/release")
        # The lease says so too: its submitter may read it before the result.
        assert (release.body["outcome"], release.body["reason"]) == ("stopped", "worker_left")


# -- malformed answers ---------------------------------------------------------------------


#: (route, label, how its first answer is spoiled)
MALFORMED: list[tuple[str, str, Spoil]] = [
    ("renew", "missing-field", drop("lease")),
    ("renew", "wrong-type", set_at(3.7, "lease", "token")),
    ("renew", "not-json", NOT_JSON),
    ("renew", "wrong-lease-task", set_at("t-other", "lease", "task_id")),
    ("renew", "wrong-lease-token", set_at("9.9", "lease", "token")),
    ("renew", "wrong-lease-holder", set_at("n-else", "lease", "holder")),
    ("release", "missing-field", drop("lease", "state")),
    ("release", "wrong-type", set_at("yes", "replay")),
    ("release", "not-json", NOT_JSON),
    ("deliver", "missing-field", drop("result")),
    ("deliver", "wrong-type", set_at("no", "duplicate")),
    ("deliver", "not-json", NOT_JSON),
    ("deliver", "wrong-message", set_at("result-t-9-9", "message_id")),
    ("deliver", "wrong-kind", set_at("handoff", "type")),
]


@pytest.mark.parametrize(
    ("route", "label", "spoil"),
    MALFORMED,
    ids=[f"{route}-{label}" for route, label, _ in MALFORMED],
)
async def test_a_malformed_answer_is_an_error_for_that_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, route: str, label: str, spoil: Spoil
) -> None:
    async with open_worker(tmp_path) as world:
        world.cp.spoil[route] = [spoil]
        assert await hand(world, handoff(seconds=2.0)) == "start"
        await delivered(world, "t-1", 1)
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.state == "finished" and row.result is not None
        outcome = row.result["outcome"]
        runs = world.host.ledger.for_task("t-1")
        renewals = world.fake.requests("POST", LEASE + "/renew")
        if route == "renew" and "wrong-lease" in label:
            # An answer about another lease refuses this one: never started (rule 3).
            assert outcome == "lease_lost" and runs == []
        elif route == "renew":
            # An unreadable answer is no answer: the proof is sent again (the holder's
            # machine, ADR 0015) and the task starts only once a renewal proved it.
            assert outcome == "exited" and len(runs) == 1 and len(renewals) >= 2
        else:
            assert outcome == "exited" and len(runs) == 1 and runs[0].exit_code == 0
        deliveries = world.fake.requests("POST", "/v1/populi/inbox")
        assert len(deliveries) == (2 if route == "deliver" else 1)
        assert {d.host for d in deliveries} == {"submitter.test"}
        # The worker goes on: the next handoff runs to its end.
        assert await hand(world, handoff("t-2", token="1.6", seconds=1.0)) == "start"
        await delivered(world, "t-2", 1)
        (next_run,) = world.host.ledger.for_task("t-2")
        assert next_run.exit_code == 0
        assert not world.health.degraded


@pytest.mark.parametrize(
    "spoil",
    [drop("lease"), set_at(3.7, "lease", "token"), NOT_JSON, set_at("n-else", "lease", "holder")],
    ids=["missing-field", "wrong-type", "not-json", "wrong-lease"],
)
async def test_a_malformed_lease_lookup_releases_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, spoil: Spoil
) -> None:
    """A refused handoff releases its lease only on the control plane's word that it is
    this worker's lease of that task: an answer that cannot be read releases nothing."""
    async with open_worker(tmp_path, Gates(remote=False)) as world:
        world.cp.spoil["get"] = [spoil]
        with pytest.raises(Conflict) as refused:
            await hand(world, handoff())
        assert refused.value.code == "remote_disabled"
        assert world.fake.requests("GET", LEASE)
        assert world.fake.requests("POST", LEASE + "/release") == []


# -- what a restarted control plane says (ADR 0015) -------------------------------------------


async def test_a_renewal_answered_lease_unknown_is_never_started(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A lease the control plane neither persisted nor learned from a report: ``lease_unknown``
    is definitive — the worker refuses the attempt, and never runs it."""
    async with open_worker(tmp_path) as world:
        unknown = error(404, "lease_not_found", "no lease", reasons=["lease_unknown"])
        world.cp.spoil["renew"] = [lambda good: unknown]
        assert await hand(world, handoff(seconds=2.0)) == "start"
        await delivered(world, "t-1", 1)
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.result is not None
        assert row.result["outcome"] == "lease_lost"
        assert row.result["detail"] == "lease_not_found"
        assert world.host.ledger.for_task("t-1") == []
        assert len(world.fake.requests("POST", LEASE + "/renew")) == 1


async def test_report_needed_is_asked_again_and_the_report_goes_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``report_needed`` (503) is no refusal: a restarted control plane waits for this
    node's full report. The heartbeat is asked to go at once, the proof is sent again
    (every second) and the attempt starts once a renewal proves its lease."""
    async with open_worker(tmp_path) as world:
        needed = error(503, "report_needed", "report first")
        world.cp.spoil["renew"] = [lambda good: needed, lambda good: needed]
        asked: list[float] = []
        world.worker.runner.report_needed = lambda: asked.append(trio.current_time())
        assert await hand(world, handoff(seconds=2.0)) == "start"
        await delivered(world, "t-1", 1)
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.result is not None
        assert row.result["outcome"] == "exited"
        assert len(world.host.ledger.for_task("t-1")) == 1
        assert len(asked) == 2
        proofs = world.fake.requests("POST", LEASE + "/renew")
        assert len(proofs) >= 3


# -- node-local claims (ADR 0015) --------------------------------------------------------------


def _claim(store: Store, gpu: str) -> None:
    claim = Claim(
        claim_id="c-local-1",
        node=WORKER,
        task_id="t-local",
        attempt=1,
        token=FencingToken(0, 0),
        gpus=(gpu,),
        made_wall_ms=1,
    )
    Attempts(store).save(
        AttemptIdentity("t-local", 1, "local", WORKER, claim.token, None),
        state="running",
        body={"gpus": [gpu], "claim_id": claim.claim_id, "task_id": "t-local"},
        result=None,
        now_ms=1,
        claim=claim,
    )


def _gpu_handoff(task_id: str, gpu: str) -> HandoffMessage:
    return dataclasses.replace(handoff(task_id), gpus=(gpu,))


async def test_a_handoff_on_claimed_gpus_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A lease granted on GPUs this node claimed while no control plane could hear it is
    refused at the handoff (``gpu_claimed``); the other GPU is taken."""
    async with open_worker(tmp_path, Gates(gpus=("GPU-a", "GPU-b"))) as world:
        _claim(world.store, "GPU-a")
        with pytest.raises(Conflict) as refused:
            await hand(world, _gpu_handoff("t-1", "GPU-a"))
        assert refused.value.code == "gpu_claimed"
        assert await hand(world, _gpu_handoff("t-2", "GPU-b")) == "start"
        await delivered(world, "t-2", 1)
        assert world.host.ledger.for_task("t-1") == []


async def test_an_accepted_attempt_whose_gpu_gets_claimed_is_refused_at_its_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The start is one transaction that checks for claims: a claim made between the
    handoff and the start (while the proof is on its way) wins, and the remote attempt
    never runs; its lease is given back."""
    async with open_worker(tmp_path, Gates(gpus=("GPU-a",))) as world:
        assert await hand(world, _gpu_handoff("t-1", "GPU-a")) == "start"
        # Before the driver proved the lease and ran the start transaction.
        _claim(world.store, "GPU-a")
        await delivered(world, "t-1", 1)
        row = world.worker.runner.row("t-1", 1, "worker")
        assert row is not None and row.result is not None
        assert row.result["outcome"] == "lease_lost"
        assert "gpu_claimed" in row.result["detail"].split(",")
        assert world.host.ledger.for_task("t-1") == []
        released = world.fake.requests("POST", LEASE + "/release")
        assert [r.body.get("outcome") for r in released] == ["stopped"]


async def test_a_lease_is_reported_under_its_own_attempt_number(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The grant request's number can run ahead of the task's attempt (refused grants take
    new numbers): the handoff names the lease's, and the worker's reports use it — under
    the task's a control plane would refuse the lease (``lease_mismatch``) and stop it."""
    async with open_worker(tmp_path) as world:
        message = dataclasses.replace(handoff(seconds=30.0), lease_attempt=3)
        assert await hand(world, message) == "start"
        ledger = NodeLedger(node_id=WORKER, attempts=Attempts(world.store), clock=VirtualClock())
        (reported,) = ledger.holdings().leases
        assert (reported.lease_id, reported.attempt) == (message.lease_id, 3)
