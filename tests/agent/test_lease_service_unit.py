"""The lease service built alone (no agent): a real store, the virtual clock, this node as
the control plane, and :class:`Nodes` — what it knows of the other nodes (their
lifecycle, heartbeats and verified GPUs), as the composition root hands it over.

- Every change is durable before it is answered: a service rebuilt from the same store
  (a restart) has the lease.
- Reconcile passes what it knows of each holder to the core table, which flags stale and
  quarantined holders, revokes with ``auto_revoke_stale_leases``, and revokes the live
  leases of a draining node once its drain deadline has passed (``drain_deadline``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from agent.exec_harness import (
    CP,
    SUBMITTER,
    T0_MS,
    WORKER,
    FakePeers,
    Settings,
    links,
    open_store,
    principal,
)

from populi_peer.agent import leases as leases_module
from populi_peer.agent.health import Health
from populi_peer.agent.leases import LeaseService
from populi_peer.api.app import Request
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import LeaseRefused, TargetView
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import (
    LeaseFallbackRequest,
    LeaseGrantRequest,
    LeaseReleaseRequest,
    LeaseRevokeRequest,
    Message,
    RenewRequest,
)
from populi_peer.core.scope import Scope
from populi_peer.errors import Conflict
from populi_peer.store import Store
from populi_peer.store.events import EventLog
from populi_peer.store.leases import Leases
from populi_peer.testing import VirtualClock

GPU = "GPU-22222222-2222-2222-2222-222222222222"
ACTIVE = NodeLifecycle("active", T0_MS, CP, "joined")


@dataclass
class Nodes:
    """:class:`~populi_peer.agent.leases.NodeFacts`: the control plane's view of the
    other nodes (each has reported; ``stale`` ones stopped)."""

    lifecycles: dict[str, NodeLifecycle] = field(default_factory=dict)
    stale_nodes: set[str] = field(default_factory=set)
    gpus: dict[str, tuple[str, ...]] = field(default_factory=lambda: {WORKER: (GPU,)})

    def is_node(self, node_id: str) -> bool:
        return node_id in (CP, WORKER, SUBMITTER)

    def resolve_node(self, ref: str) -> str:
        return ref

    def lifecycle(self, node_id: str) -> NodeLifecycle | None:
        return self.lifecycles.get(node_id, ACTIVE)

    def heartbeat_age_ms(self, node_id: str) -> int | None:
        return 60_000 if node_id in self.stale_nodes else 100

    def stale_after_ms(self, node_id: str) -> int:
        return 10_000

    def stale(self, node_id: str) -> bool:
        return node_id in self.stale_nodes

    def scope(self, node_id: str) -> Scope | None:
        return "lan"

    def accepts_remote_work(self, node_id: str) -> bool | None:
        return True

    def allocatable_gpus(self, node_id: str) -> tuple[tuple[str, ...], int]:
        return self.gpus.get(node_id, ()), 0

    def gpu_hints(self, node_id: str) -> list[GpuHint]:
        return []


@dataclass
class World:
    service: LeaseService
    store: Store
    nodes: Nodes
    settings: Settings
    clock: VirtualClock


def build(store: Store, nodes: Nodes, settings: Settings) -> LeaseService:
    clock = VirtualClock()
    link = links(store, CP, FakePeers(), clock)
    service = LeaseService(
        leases=Leases(store),
        clock=clock,
        control_plane=link.control_plane,
        records=settings,
        nodes=nodes,
        events=EventLog(store),
        health=Health(clock),
    )
    service.load()
    return service


@contextlib.contextmanager
def open_service(tmp_path: Path) -> Iterator[World]:
    store = open_store(tmp_path / "cp", node_id=CP)
    nodes, settings = Nodes(), Settings()
    try:
        yield World(build(store, nodes, settings), store, nodes, settings, VirtualClock())
    finally:
        store.close()


def request(message: Message | None, *, caller: str = SUBMITTER, **path: str) -> Request:
    roles = ("operator",) if caller == "o-alice" else ("worker", "submit")
    return Request(
        method="POST",
        path="/",
        query="",
        headers={},
        body=b"",
        path_params=dict(path),
        principal=principal(caller, *roles),
        client=None,
        cid="test",
        _message=message,
    )


def grant(task_id: str = "t-1", *, target: str = WORKER, gpus: int = 1) -> LeaseGrantRequest:
    return LeaseGrantRequest(
        task_id=task_id, attempt=1, work_class="agent", target=target, gpus_wanted=gpus, ttl_s=30.0
    )


async def test_a_grant_is_durable_before_it_is_answered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with open_service(tmp_path) as world:
        answer = await world.service._grant(request(grant()))
        lease = answer.lease.lease
        assert (lease.holder, lease.gpus, lease.state, answer.replay) == (
            WORKER,
            (GPU,),
            "live",
            False,
        )
        # A restart: the table is rebuilt from the store.
        again = build(world.store, world.nodes, world.settings)
        assert again.table is not None and again.table.get(lease.lease_id).token == lease.token
        # Renew (the holder), then release: each answered as its typed message.
        renewed = await world.service._renew(
            request(RenewRequest(before_start=True), caller=WORKER, lease_id=lease.lease_id)
        )
        assert renewed.lease.expires_in_s == 30.0
        released = await world.service._release(
            request(
                LeaseReleaseRequest(outcome="completed"), caller=WORKER, lease_id=lease.lease_id
            )
        )
        assert released.lease.lease.state == "completed"
        assert Leases(world.store).get(lease.lease_id).state == "completed"  # type: ignore[union-attr]


async def test_the_book_says_which_gpus_of_a_node_are_busy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """What the GPU view takes ``gpu_leased`` from (ADR 0015 for the window)."""
    with open_service(tmp_path) as world:
        assert world.service.busy_on(WORKER) == frozenset()
        lease = (await world.service._grant(request(grant()))).lease.lease
        assert world.service.busy_on(WORKER) == {GPU}
        assert world.service.busy_on(SUBMITTER) == frozenset()
        await world.service._release(
            request(
                LeaseReleaseRequest(outcome="completed"), caller=WORKER, lease_id=lease.lease_id
            )
        )
        assert world.service.busy_on(WORKER) == frozenset()
        # Restarted with a lease history: until the node reports in full, its report says.
        again = build(world.store, world.nodes, world.settings)
        assert again.table is not None and again.table.window is not None
        assert again.busy_on(WORKER) is None
        again.forget()
        assert again.busy_on(WORKER) is None


async def test_the_target_is_checked_from_the_control_planes_own_view(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with open_service(tmp_path) as world:
        world.nodes.gpus[WORKER] = ()
        view = world.service.target_view(
            WORKER, gpus_wanted=1, work_class="agent", submitter=SUBMITTER
        )
        assert view == TargetView(node_id=WORKER, eligible=True, reasons=(), allocatable_gpus=())
        world.settings.settings["kill_switch"] = True
        view = world.service.target_view(
            WORKER, gpus_wanted=0, work_class="agent", submitter=SUBMITTER
        )
        assert "kill_switch" in view.reasons and not view.eligible
        with pytest.raises(Conflict) as refused:
            await world.service._grant(request(grant()))
        assert "no_free_gpu" in refused.value.details["reasons"]


async def test_a_drain_deadline_revokes_the_holders_live_leases(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with open_service(tmp_path) as world:
        lease = (await world.service._grant(request(grant()))).lease.lease
        now_ms = int(world.clock.wall() * 1000)
        world.nodes.lifecycles[WORKER] = NodeLifecycle(
            "draining", now_ms, "o-alice", "swap", deadline_wall_ms=now_ms + 60_000
        )
        world.service.reconcile_now()
        assert world.service.table is not None
        assert world.service.table.get(lease.lease_id).state == "live"  # not yet
        await trio.sleep(61)
        world.service.reconcile_now()
        revoked = world.service.table.get(lease.lease_id)
        assert (revoked.state, revoked.reason, revoked.revoked_by) == (
            "revoking",
            "drain_deadline",
            CP,
        )
        stored = Leases(world.store).get(lease.lease_id)  # durable (expiry is not stored)
        assert stored is not None and (stored.state, stored.reason) == (
            "revoking",
            "drain_deadline",
        )


@pytest.mark.parametrize("auto_revoke", [False, True])
async def test_a_stale_holder_is_flagged_and_revoked_only_when_the_setting_says_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, auto_revoke: bool
) -> None:
    with open_service(tmp_path) as world:
        world.settings.settings["auto_revoke_stale_leases"] = auto_revoke
        lease = (await world.service._grant(request(grant()))).lease.lease
        world.nodes.stale_nodes.add(WORKER)
        world.service.reconcile_now()
        assert world.service.flags == {lease.lease_id: "stale"}
        assert world.service.view(world.service.table.get(lease.lease_id)).flag == "stale"  # type: ignore[union-attr]
        state = world.service.table.get(lease.lease_id).state  # type: ignore[union-attr]
        assert state == ("revoking" if auto_revoke else "live")


async def test_an_operator_revoke_is_an_event_and_a_fallback_follows_the_dead_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with open_service(tmp_path) as world:
        lease = (await world.service._grant(request(grant(gpus=0)))).lease.lease
        revoked = await world.service._revoke(
            request(LeaseRevokeRequest(lease_id=lease.lease_id, reason=None), caller="o-alice")
        )
        assert revoked.lease.lease.reason == "revoked by operator"
        (event,) = EventLog(world.store).page(after=0, limit=10)
        assert (event.kind, event.node_id) == ("lease_revoked", WORKER)
        await trio.sleep(40)  # the holder never released it: it expires
        world.service.expire_now()
        answer = await world.service._fallback(
            request(
                LeaseFallbackRequest(
                    task_id="t-1", attempt=2, gpus_wanted=0, ttl_s=30.0, work_class=None
                )
            )
        )
        assert answer.lease.lease.kind == "fence" and answer.lease.lease.token > lease.token
        assert answer.prior is not None and answer.prior.lease.state == "expired"


def test_the_drain_rule_lives_in_the_core_table() -> None:
    """The shell passes what it knows; the core decides (``reconcile_holders``)."""
    source = inspect.getsource(leases_module)
    for word in ("draining", "drain_deadline", "deadline_wall_ms", '"quarantined"', '"stale"'):
        assert word not in source, word


async def test_a_control_plane_elected_again_at_a_later_term_grants_under_that_term(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """ADR 0016: a node that led, stepped down and is elected again in the same process
    never grants from its earlier term's table: the table is rebuilt at the new term, with
    the resumption window of a control plane that starts (ADR 0015): the worker that held
    a lease must report before it is granted on again."""
    with open_service(tmp_path) as world:
        first = (await world.service._grant(request(grant("t-1")))).lease.lease
        term = world.service.control_plane.term
        assert first.token.term == term
        world.service.control_plane.leader_elected(term=term + 2, leader_id=CP)
        with pytest.raises(LeaseRefused) as refused:
            await world.service._grant(request(grant("t-2")))
        assert "node_not_reported" in str(refused.value)
        assert world.service.table is not None and world.service.table.term == term + 2
