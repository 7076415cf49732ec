"""Hypothesis drives three voters: it picks which message arrives next (any order), drops
and duplicates messages, moves time, crashes and restarts voters, changes clock rates
within the drift bound and issues writes. The safety checks of
:class:`~populi_peer.testing.election_sim.Cluster` run after every step (one leader per
term, no overlapping leases, acknowledged writes on every later leader, tokens used once,
persist before send)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from populi_peer.testing.election_sim import (
    EDGE_SETTINGS,
    ClientOp,
    ClientReply,
    ClientRequest,
    Cluster,
)

NODES = ("a", "b", "c")
DRIFT = EDGE_SETTINGS.drift

ops = st.one_of(
    st.builds(ClientOp, st.just("token"), st.just("t1"), st.sampled_from(["x", "y"])),
    st.builds(ClientOp, st.just("label"), st.sampled_from(NODES), st.integers(0, 9).map(str)),
    st.builds(ClientOp, st.just("setting"), st.just(""), st.integers(0, 9).map(str)),
    st.builds(
        ClientOp, st.sampled_from(["voter_add", "voter_remove"]), st.sampled_from([*NODES, "d"])
    ),
)


class ThreeVoters(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.inflight: list[tuple[str, object]] = []
        self.timers: dict[str, tuple[float, int]] = {}
        self.requests = 0
        self.cluster = Cluster(
            [*NODES, "d"],
            NODES,
            settings=EDGE_SETTINGS,
            rng=random.Random(0),
            on_send=self.sent,
            on_timer=self.armed,
            wire=True,
        )

    def sent(self, src: str, dst: str, message: object) -> None:
        if not isinstance(message, ClientReply):
            self.inflight.append((dst, message))

    def armed(self, node: str, at: float, gen: int) -> None:
        self.timers[node] = (at, gen)

    @initialize()
    def boot(self) -> None:
        for node in (*NODES, "d"):
            self.cluster.start(node)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.inflight) - 1))
        dst, message = self.inflight.pop(index)
        self.cluster.deliver(dst, message)

    @precondition(lambda self: self.inflight)
    @rule()
    def deliver_all(self) -> None:
        """A quiet moment: everything in flight arrives, in order (answers too)."""
        for _ in range(200):
            if not self.inflight:
                break
            dst, message = self.inflight.pop(0)
            self.cluster.deliver(dst, message)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.inflight.append(self.inflight[data.draw(st.integers(0, len(self.inflight) - 1))])

    @rule(dt=st.floats(0.001, 1.5))
    def advance(self, dt: float) -> None:
        cluster = self.cluster
        target = cluster.now + dt
        while True:
            due = sorted((at, node, gen) for node, (at, gen) in self.timers.items() if at <= target)
            if not due:
                break
            at, node, gen = due[0]
            del self.timers[node]
            cluster.now = max(cluster.now, at)
            cluster.fire_timer(node, gen)
        cluster.now = target

    @rule(node=st.sampled_from(NODES))
    def crash(self, node: str) -> None:
        if self.cluster.alive(node):
            self.cluster.crash(node)
            self.timers.pop(node, None)

    @rule(node=st.sampled_from(NODES))
    def restart(self, node: str) -> None:
        if not self.cluster.alive(node):
            self.cluster.start(node)

    @rule(node=st.sampled_from(NODES), fast=st.booleans())
    def clock_rate(self, node: str, fast: bool) -> None:
        self.cluster.set_rate(node, 1 + DRIFT if fast else 1 - DRIFT)

    @rule(node=st.sampled_from(NODES), op=ops)
    def write(self, node: str, op: ClientOp) -> None:
        self.requests += 1
        self.cluster.deliver(node, ClientRequest("c0", f"c0/{self.requests}", op))

    @rule(op=ops)
    def write_to_leader(self, op: ClientOp) -> None:
        leaders = [n for n in NODES if self.role(n) == "leader"]
        if leaders:
            self.write(leaders[-1], op)

    @rule(node=st.sampled_from(NODES))
    def isolate(self, node: str) -> None:
        """Everything in flight from or to ``node`` is lost."""
        self.inflight = [
            (dst, m)
            for dst, m in self.inflight
            if dst != node and getattr(m, "sender", None) != node
        ]

    def role(self, node: str) -> str | None:
        machine = self.cluster.nodes[node].machine
        return None if machine is None else machine.role

    @invariant()
    def safe(self) -> None:
        self.cluster.check()

    def teardown(self) -> None:
        # Steer the search toward runs that elect and write (the interesting ones).
        stats = self.cluster.stats
        target(float(stats["elections"]), label="elections")
        target(float(stats["applied"]), label="writes applied")


ThreeVoters.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_three_voters = ThreeVoters.TestCase
