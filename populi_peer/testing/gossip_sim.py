"""A seeded simulation of hint gossip: how fast does a new hint reach every node?

N nodes run the real gossip core (:class:`~populi_peer.core.gossip.GossipState`,
:func:`~populi_peer.core.gossip.plan_round`) on a discrete-event clock over a lossy,
jittery network. Only the network and the signatures are simulated: a record's text is a
placeholder of the size a signed hint has, and ``verify`` looks it up (the merge rules,
digests, size bounds and fair ordering are the real ones).

The model:

- every node starts a round every ``round_interval_s`` from a random phase (the shell's
  first-round stagger), and runs the three-step exchange of :mod:`~populi_peer.core.gossip`
  with ``fanout`` random peers; exchanges run concurrently and a lost message ends its
  exchange (HTTP over TCP either delivers or times out);
- each message is lost with probability ``loss`` and takes a uniform delay in
  ``[latency_min_s, latency_max_s]``;
- optional background churn: every node republishes its hint at random times, on average
  every ``churn_s`` seconds, so that messages compete for the size bound;
- all nodes start converged; at ``publish_at_s`` one node publishes a new version, and the
  simulation records when each node first holds it.

``python -m populi_peer.testing.gossip_sim`` prints the convergence curves (fraction of
nodes holding the new hint against time) for N=100 and N=1,000 at the default settings.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from populi_peer.core.gossip import (
    DigestReply,
    DigestRequest,
    GossipSettings,
    GossipState,
    plan_round,
)
from populi_peer.core.hints import HintBody, HintRecord
from populi_peer.core.hlc import Hlc

#: A one-GPU node signs a hint of about 1.3 KiB, an eight-GPU node about 5 KiB.
DEFAULT_RECORD_BYTES = 2048
_BODY = HintBody(lifecycle="active")


@dataclass(frozen=True, slots=True)
class NetworkModel:
    loss: float = 0.1
    latency_min_s: float = 0.001
    latency_max_s: float = 0.050


@dataclass(frozen=True, slots=True)
class SimResult:
    nodes: int
    seed: int
    #: Seconds after the publish at which each node first held the new hint (the
    #: publisher at 0); ``None`` for a node that never did within the run.
    reached_s: tuple[float | None, ...]
    exchanges: int
    bytes_sent: int
    duration_s: float
    messages_cut: int = 0

    def fraction_at(self, t_s: float) -> float:
        return sum(1 for r in self.reached_s if r is not None and r <= t_s) / self.nodes

    def time_to(self, fraction: float) -> float | None:
        """Seconds until ``fraction`` of the nodes held the new hint (``None``: never)."""
        need = max(1, -(-round(fraction * self.nodes * 1000) // 1000))
        times = sorted(r for r in self.reached_s if r is not None)
        return times[need - 1] if len(times) >= need else None

    def curve(self, step_s: float, until_s: float) -> list[tuple[float, float]]:
        points = []
        t = 0.0
        while t <= until_s + 1e-9:
            points.append((round(t, 6), self.fraction_at(t)))
            t += step_s
        return points


@dataclass
class _Sim:
    n: int
    settings: GossipSettings
    net: NetworkModel
    rng: random.Random
    record_bytes: int
    churn_s: float | None
    states: list[GossipState] = field(default_factory=list)
    by_text: dict[str, HintRecord] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)
    queue: list[tuple[float, int, Callable[[float], None]]] = field(default_factory=list)
    seq: int = 0
    exchanges: int = 0
    bytes_sent: int = 0
    cut: int = 0
    origin: str = ""
    target: Hlc | None = None
    publish_at_s: float = 0.0
    reached: list[float | None] = field(default_factory=list)

    def merge(self, i: int, records: Sequence[str], t: float) -> None:
        result = self.states[i].merge(records, now_wall_ms=int(t * 1000), verify=self.verify)
        if self.target is not None and self.reached[i] is None and self.origin in result.changed:
            held = self.states[i].get(self.origin)
            if held is not None and held.version >= self.target:
                self.reached[i] = round(t - self.publish_at_s, 6)

    def ids(self, i: int) -> str:
        return f"n-{i:05d}"

    def make_record(self, i: int, now_s: float) -> HintRecord:
        self.versions[i] += 1
        head = f"sim:{self.ids(i)}:{self.versions[i]}:"
        text = head + "x" * max(0, self.record_bytes - len(head))
        record = HintRecord(
            node_id=self.ids(i),
            version=Hlc(self.versions[i], 0),
            issued_ms=int(now_s * 1000),
            body=_BODY,
            text=text,
        )
        self.by_text[text] = record
        return record

    def verify(self, text: str) -> HintRecord:
        return self.by_text[text]

    def at(self, t: float, action: Callable[[float], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, action))

    def send(self, t: float, size: int, action: Callable[[float], None]) -> None:
        """Deliver a message of ``size`` bytes after a random delay, unless it is lost."""
        self.bytes_sent += size
        if self.rng.random() < self.net.loss:
            return
        self.at(t + self.rng.uniform(self.net.latency_min_s, self.net.latency_max_s), action)

    def exchange(self, t: float, a: int, b: int) -> None:
        self.exchanges += 1
        request = DigestRequest(self.states[a].digest())
        size = 40 * len(request.digest)
        limit = self.settings.max_message_bytes

        def at_b(t_b: float) -> None:
            reply = self.states[b].answer(request, max_bytes=limit)
            self.cut += reply.more
            size = sum(len(r) for r in reply.records) + 20 * len(reply.want)
            self.send(t_b, size, lambda t_a: at_a(t_a, reply))

        def at_a(t_a: float, reply: DigestReply) -> None:
            self.merge(a, reply.records, t_a)
            push = self.states[a].push_for(reply, max_bytes=limit)
            if push is not None:
                self.cut += push.more
                records = push.records
                self.send(
                    t_a,
                    sum(len(r) for r in records),
                    lambda t_b: self.merge(b, records, t_b),
                )

        self.send(t, size, at_b)

    def round(self, t: float, i: int) -> None:
        peers = plan_round(
            range_ids(self.n), self_id=self.ids(i), fanout=self.settings.fanout, rng=self.rng
        )
        for peer in peers:
            self.exchange(t, i, int(peer[2:]))
        self.at(t + self.settings.round_interval_s, lambda t2: self.round(t2, i))

    def churn(self, t: float, i: int) -> None:
        assert self.churn_s is not None
        self.states[i].publish(self.make_record(i, t))
        self.at(t + self.rng.expovariate(1 / self.churn_s), lambda t2: self.churn(t2, i))


def _round(sim: _Sim, i: int, t: float) -> None:
    sim.round(t, i)


def _churn(sim: _Sim, i: int, t: float) -> None:
    sim.churn(t, i)


_IDS: dict[int, tuple[str, ...]] = {}


def range_ids(n: int) -> tuple[str, ...]:
    if n not in _IDS:
        _IDS[n] = tuple(f"n-{i:05d}" for i in range(n))
    return _IDS[n]


def simulate(
    n: int,
    *,
    seed: int,
    settings: GossipSettings | None = None,
    network: NetworkModel | None = None,
    record_bytes: int = DEFAULT_RECORD_BYTES,
    churn_s: float | None = None,
    publish_at_s: float = 1.0,
    run_for_s: float = 6.0,
) -> SimResult:
    """Run one seeded simulation; see the module docstring for the model."""
    settings = settings or GossipSettings()
    sim = _Sim(n, settings, network or NetworkModel(), random.Random(seed), record_bytes, churn_s)
    sim.versions = [0] * n
    initial = [sim.make_record(i, 0.0) for i in range(n)]
    for i in range(n):
        state = GossipState(sim.ids(i))
        state.publish(initial[i])
        state.merge(
            [r.text for r in initial if r.node_id != sim.ids(i)], now_wall_ms=0, verify=sim.verify
        )
        sim.states.append(state)
    for i in range(n):
        sim.at(sim.rng.uniform(0, settings.round_interval_s), functools.partial(_round, sim, i))
        if churn_s is not None:
            sim.at(sim.rng.expovariate(1 / churn_s), functools.partial(_churn, sim, i))
    sim.origin = sim.ids(0)
    sim.publish_at_s = publish_at_s
    sim.reached = [None] * n

    def publish(t: float) -> None:
        record = sim.make_record(0, t)
        sim.states[0].publish(record)
        sim.target = record.version
        sim.reached[0] = 0.0

    sim.at(publish_at_s, publish)
    end = publish_at_s + run_for_s
    while sim.queue and sim.queue[0][0] <= end:
        t, _, action = heapq.heappop(sim.queue)
        action(t)
    return SimResult(n, seed, tuple(sim.reached), sim.exchanges, sim.bytes_sent, end, sim.cut)


def _summary(results: Sequence[SimResult]) -> str:
    t99 = [r.time_to(0.99) for r in results]
    shown = ", ".join("never" if t is None else f"{t:.2f}" for t in t99)
    return f"t(99%) per seed [s]: {shown}"


def main(argv: Sequence[str] | None = None) -> None:
    defaults, net_defaults = GossipSettings(), NetworkModel()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--loss", type=float, default=net_defaults.loss)
    parser.add_argument("--churn-s", type=float, default=None)
    parser.add_argument("--interval-s", type=float, default=defaults.round_interval_s)
    parser.add_argument("--fanout", type=int, default=defaults.fanout)
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--record-bytes", type=int, default=DEFAULT_RECORD_BYTES)
    parser.add_argument("--run-for-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    settings = GossipSettings(
        round_interval_s=args.interval_s,
        fanout=args.fanout,
        max_message_bytes=args.max_message_bytes,
    )
    net = NetworkModel(loss=args.loss)
    print(
        f"settings: round_interval_s={settings.round_interval_s} fanout={settings.fanout} "
        f"max_message_bytes={settings.max_message_bytes}; loss={net.loss:.0%} per message, "
        f"latency {net.latency_min_s * 1000:.0f}-{net.latency_max_s * 1000:.0f} ms; "
        f"record {args.record_bytes} B; churn "
        + (f"every {args.churn_s} s per node" if args.churn_s else "off")
    )
    for n in args.nodes:
        results = [
            simulate(
                n,
                seed=seed,
                settings=settings,
                network=net,
                record_bytes=args.record_bytes,
                churn_s=args.churn_s,
                run_for_s=args.run_for_s,
            )
            for seed in range(args.seeds)
        ]
        print(f"\nN={n}: {_summary(results)}")
        step = settings.round_interval_s / 2
        curves = [r.curve(step, args.run_for_s) for r in results]
        print("  t [s]   fraction holding the new hint (min / mean / max over seeds)")
        for k, (t, _) in enumerate(curves[0]):
            values = [c[k][1] for c in curves]
            print(
                f"  {t:5.2f}   {min(values):6.1%} {sum(values) / len(values):6.1%} "
                f"{max(values):6.1%}"
            )
            if min(values) >= 1.0:
                break
        per_node_s = [r.bytes_sent / n / r.duration_s for r in results]
        print(
            f"  traffic: {sum(per_node_s) / len(per_node_s) / 1024:.1f} KiB/s sent per node; "
            f"messages cut by the size bound: {sum(r.messages_cut for r in results)}"
        )


if __name__ == "__main__":
    main()
