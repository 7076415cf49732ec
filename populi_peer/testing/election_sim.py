"""A seeded, pure simulation of the election core (a test helper, like ``trio.testing``).

N voters — each an :class:`~populi_peer.core.election.ElectionMachine` behind a tiny
shell that persists exactly what the machine asks it to — talk over a simulated network
that drops, delays (sometimes far beyond the lease), duplicates and reorders messages,
partitions nodes (both ways or one way), while faults crash and restart voters (keeping
only what they persisted), pause them (their clock keeps running, as through a suspend on
``CLOCK_BOOTTIME``) and change their clock rates within the drift bound of the settings.
Clients write records — single-use token consumptions, revocations, settings, register
writes, voter changes — to whoever they believe leads.

After every step :class:`Cluster` asserts the safety properties:

1. at most one leader per term;
2. no two voters hold a leader lease at the same instant of simulation time (each judges
   its lease on its own drifting clock);
3. every write acknowledged to a client (:class:`~populi_peer.core.election.WriteApplied`)
   is present — or beaten by a later write of the same key — on every leader of a later
   term, from the moment it is leader;
4. no single-use token is acknowledged to two different consumers;
5. a voter's persisted term never goes down, it never votes twice in one term, and the
   machine never asks for a send before the persist it depends on.

A failure raises :class:`SimulationFailure` with the seed and the trace of the last
events; ``run_seed(seed)`` replays it exactly. ``scripts/simulate-election`` runs many.

Everything is plain Python and deterministic: one ``random.Random(seed)`` drives the
scenario, each voter's machine gets its own generator drawn from it.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from populi_peer.core.election import (
    Action,
    ClientWrite,
    ElectionMachine,
    ElectionSettings,
    Event,
    Heartbeat,
    HeartbeatAck,
    PersistedVote,
    PersistRecords,
    PersistVote,
    PreVoteAnswer,
    PreVoteRequest,
    RoleChanged,
    Send,
    Started,
    TimerFired,
    VoteAnswer,
    VoteRequest,
    WriteApplied,
    WriteOutcomeUnknown,
    WriteRefused,
    is_message,
    message_from_json,
    message_to_json,
)
from populi_peer.core.hlc import HLC_ZERO, Hlc, hlc_tick
from populi_peer.core.registers import RegisterWrite, Stamp
from populi_peer.core.replication import (
    ClusterRecord,
    Entry,
    Item,
    RecordSet,
    SetElement,
    bootstrap_voters,
    voters_body,
)

#: Timings scaled down for the simulation, with the lease close to its safety limit
#: (0.8 / 0.95 + 0.05 = 0.892 s against 1.0 / 1.05 = 0.952 s) and a 5 % drift bound, so
#: a wrong bound shows up.
SIM_SETTINGS = ElectionSettings(
    election_timeout_min_s=1.0,
    election_timeout_max_s=2.0,
    heartbeat_interval_s=0.15,
    leader_lease_s=0.8,
    lease_margin_s=0.05,
    max_clock_drift_ppm=50_000,
    write_timeout_s=1.5,
    max_skew_ms=2_000,
)


class SimulationFailure(AssertionError):
    """A safety property failed. ``seed`` replays it; ``trace`` is the last events."""

    def __init__(self, seed: int | None, message: str, trace: str) -> None:
        self.seed = seed
        self.trace = trace
        super().__init__(f"seed {seed}: {message}\n--- last events ---\n{trace}")


# -- client operations (what a client asks for; the node's shell turns it into an item) --


@dataclass(frozen=True, slots=True)
class ClientOp:
    """``kind``: ``token`` (key = token, value = consumer), ``revoke`` (key = node),
    ``setting`` (value = a number), ``label`` (key = node, value = a number),
    ``voter_add`` / ``voter_remove`` (key = node)."""

    kind: str
    key: str = ""
    value: str = ""


@dataclass(frozen=True, slots=True)
class ClientRequest:
    client: str
    request_id: str
    op: ClientOp


@dataclass(frozen=True, slots=True)
class ClientReply:
    client: str
    request_id: str
    outcome: str  # applied / refused:<code> / unknown
    leader: str | None


# -- one simulated node ---------------------------------------------------------------------


@dataclass
class SimNode:
    """A node: its machine (``None`` while crashed), what it persisted, its clock."""

    node_id: str
    rng: random.Random
    settings: ElectionSettings
    vote: PersistedVote = field(default_factory=PersistedVote)
    records: RecordSet = field(default_factory=RecordSet)
    machine: ElectionMachine | None = None
    # local clock = anchor_local + (real - anchor_real) * rate
    anchor_real: float = 0.0
    anchor_local: float = 0.0
    rate: float = 1.0
    wall_offset_ms: int = 0
    hlc: Hlc = HLC_ZERO
    paused_until: float = -math.inf
    timer_gen: int = 0
    proposed: dict[str, Item] = field(default_factory=dict)

    def local(self, real: float) -> float:
        return self.anchor_local + (real - self.anchor_real) * self.rate

    def real(self, local: float) -> float:
        return self.anchor_real + (local - self.anchor_local) / self.rate

    def set_rate(self, real: float, rate: float) -> None:
        self.anchor_local = self.local(real)
        self.anchor_real = real
        self.rate = rate

    def wall_ms(self, real: float) -> int:
        return max(0, int(real * 1000) + 1_000_000 + self.wall_offset_ms)


def _short(message: object) -> str:
    if isinstance(message, PreVoteRequest):
        return f"prevote? t{message.term}"
    if isinstance(message, PreVoteAnswer):
        return f"prevote {'yes' if message.granted else 'no'} t{message.term}/{message.voter_term}"
    if isinstance(message, VoteRequest):
        return f"vote? t{message.term}"
    if isinstance(message, VoteAnswer):
        yes = "yes" if message.granted else "no"
        return f"vote {yes} t{message.term} +{len(message.entries)}"
    if isinstance(message, Heartbeat):
        return f"hb t{message.term} r{message.round} +{len(message.entries)}"
    if isinstance(message, HeartbeatAck):
        ok = "ok" if message.success else "stale"
        return f"ack {ok} t{message.term} r{message.round} {message.digest!r}"
    if isinstance(message, ClientRequest):
        return f"client {message.request_id} {message.op.kind} {message.op.key} {message.op.value}"
    if isinstance(message, ClientReply):
        return f"reply {message.request_id} {message.outcome}"
    if isinstance(message, RoleChanged):
        return (
            f"role {message.previous}->{message.role} t{message.term} "
            f"leader={message.leader} ({message.cause})"
        )
    return type(message).__name__


# -- the cluster: nodes, shells and the invariants ---------------------------------------------


class Cluster:
    """Nodes, their shells and the safety checks. It does not decide what happens when:
    a driver (the seeded :class:`Simulation`, or a hypothesis state machine) calls
    :meth:`deliver`, :meth:`fire_timer`, :meth:`crash`, :meth:`restart`, ...; sends go to
    ``on_send(src, dst, message)`` and timers to ``on_timer(node, real_time, gen)``."""

    def __init__(
        self,
        node_ids: Iterable[str],
        voters: Iterable[str],
        *,
        settings: ElectionSettings = SIM_SETTINGS,
        seed: int | None = None,
        rng: random.Random | None = None,
        on_send: Callable[[str, str, object], None] | None = None,
        on_timer: Callable[[str, float, int], None] | None = None,
        trace_len: int = 120,
        wire: bool = False,
    ) -> None:
        self.seed = seed
        #: Pass every election message through its JSON wire form on delivery.
        self.wire = wire
        self.rng = rng if rng is not None else random.Random(seed)
        self.settings = settings
        self.now = 0.0
        self.on_send = on_send or (lambda src, dst, msg: None)
        self.on_timer = on_timer or (lambda node, t, gen: None)
        self.trace: deque[tuple[float, str, str, object]] = deque(maxlen=trace_len)
        voter_ids = list(voters)
        boot = bootstrap_voters(voter_ids, "voters/1")
        self.nodes: dict[str, SimNode] = {}
        for node_id in node_ids:
            node = SimNode(node_id, random.Random(self.rng.getrandbits(64)), settings)
            if node_id in voter_ids:
                node.records, _ = RecordSet().merge([boot])
            self.nodes[node_id] = node
        # Bookkeeping for the invariants.
        self.leaders_by_term: dict[int, str] = {}
        self.acked: list[tuple[Entry, str, float]] = []
        self.token_owner: dict[str, Any] = {}
        self.checked_upto: dict[tuple[str, int], int] = {}
        #: (time, node, term) of every election won, and (time, node, term, cause) of
        #: every step-down, for scripted scenarios to look at.
        self.elected: list[tuple[float, str, int]] = []
        self.stepped_down: list[tuple[float, str, int, str]] = []
        self.stats: dict[str, int] = {
            "events": 0,
            "elections": 0,
            "applied": 0,
            "refused": 0,
            "unknown": 0,
            "voter_changes": 0,
            "crashes": 0,
        }

    # -- tracing and failing ------------------------------------------------------------

    def note(self, who: str, what: str, obj: object = None) -> None:
        self.trace.append((self.now, who, what, obj))

    def trace_text(self) -> str:
        lines = []
        for t, who, what, obj in self.trace:
            detail = _short(obj) if obj is not None else ""
            lines.append(f"{t:10.4f} {who:>8} {what} {detail}".rstrip())
        return "\n".join(lines)

    def fail(self, message: str) -> None:
        raise SimulationFailure(self.seed, message, self.trace_text())

    # -- driving a node -------------------------------------------------------------

    def alive(self, node_id: str) -> bool:
        return self.nodes[node_id].machine is not None

    def paused(self, node_id: str) -> bool:
        return self.now < self.nodes[node_id].paused_until

    def start(self, node_id: str) -> None:
        """Boot (or reboot) a node from what it persisted."""
        node = self.nodes[node_id]
        node.machine = ElectionMachine(node_id, node.settings)
        node.proposed = {}
        self.note(node_id, "start")
        self.handle(node_id, Started(node.vote, node.records))

    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.machine = None
        node.timer_gen += 1
        self.stats["crashes"] += 1
        self.note(node_id, "crash")

    def handle(self, node_id: str, event: Event) -> None:
        node = self.nodes[node_id]
        machine = node.machine
        if machine is None:
            return
        self.stats["events"] += 1
        now_local = node.local(self.now)
        machine, actions = machine.handle(event, now_local, node.rng)
        node.machine = machine
        self.run_actions(node, actions)
        self.arm_timer(node)
        self.check()

    def arm_timer(self, node: SimNode) -> None:
        node.timer_gen += 1
        if node.machine is None:
            return
        deadline = node.machine.next_deadline()
        if deadline is None:
            return
        # A hair late, so that the node's clock reads at least the deadline.
        at = max(self.now, node.real(deadline) + 1e-9)
        self.on_timer(node.node_id, at, node.timer_gen)

    def fire_timer(self, node_id: str, gen: int) -> None:
        node = self.nodes[node_id]
        if gen != node.timer_gen or node.machine is None:
            return
        self.handle(node_id, TimerFired())

    def deliver(self, dst: str, message: object) -> None:
        """A message arrives at ``dst`` (dropped if it is down)."""
        node = self.nodes[dst]
        if node.machine is None:
            return
        self.note(dst, "<-", message)
        if isinstance(message, ClientRequest):
            self.client_request(node, message)
        elif is_message(message):
            if self.wire:
                message = message_from_json(json.loads(json.dumps(message_to_json(message))))  # type: ignore[arg-type]
            self.handle(dst, message)  # type: ignore[arg-type]

    def set_rate(self, node_id: str, rate: float) -> None:
        node = self.nodes[node_id]
        node.set_rate(self.now, rate)
        self.note(node_id, f"clock rate {rate:.4f}")
        self.arm_timer(node)

    # -- the node's shell -------------------------------------------------------------

    def run_actions(self, node: SimNode, actions: tuple[Action, ...]) -> None:
        sent = False
        for action in actions:
            if isinstance(action, PersistVote):
                if sent:
                    self.fail(f"{node.node_id}: PersistVote after a Send in one step")
                old = node.vote
                if action.term < old.term:
                    self.fail(f"{node.node_id}: term went down {old.term} -> {action.term}")
                if (
                    action.term == old.term
                    and old.voted_for is not None
                    and action.voted_for != old.voted_for
                ):
                    self.fail(
                        f"{node.node_id}: voted twice in term {old.term}: "
                        f"{old.voted_for} then {action.voted_for}"
                    )
                node.vote = PersistedVote(action.term, action.voted_for)
            elif isinstance(action, PersistRecords):
                if sent:
                    self.fail(f"{node.node_id}: PersistRecords after a Send in one step")
                assert node.machine is not None
                node.records = node.machine.records
                if node.records.digest != action.digest:
                    self.fail(f"{node.node_id}: persisted digest differs from the machine's")
            elif isinstance(action, Send):
                sent = True
                self.on_send(node.node_id, action.to, action.message)
            elif isinstance(action, RoleChanged):
                self.note(node.node_id, "", action)
                if action.previous == "leader":
                    self.stepped_down.append((self.now, node.node_id, action.term, action.cause))
                if action.role == "leader":
                    self.elected.append((self.now, node.node_id, action.term))
                    self.stats["elections"] += 1
                    other = self.leaders_by_term.setdefault(action.term, node.node_id)
                    if other != node.node_id:
                        self.fail(f"two leaders in term {action.term}: {other} and {node.node_id}")
            elif isinstance(action, WriteApplied):
                item = node.proposed.pop(action.request_id, None)
                if item is None:
                    self.fail(f"{node.node_id}: applied an unknown request {action.request_id}")
                    return
                self.write_applied(node, action, item)
            elif isinstance(action, WriteRefused):
                node.proposed.pop(action.request_id, None)
                self.stats["refused"] += 1
                self.reply(node, action.request_id, f"refused:{action.code}", action.leader)
            elif isinstance(action, WriteOutcomeUnknown):
                node.proposed.pop(action.request_id, None)
                self.stats["unknown"] += 1
                self.reply(node, action.request_id, "unknown", None)

    def write_applied(self, node: SimNode, action: WriteApplied, item: Item) -> None:
        self.stats["applied"] += 1
        entry = Entry(action.write_id, item)
        self.acked.append((entry, node.node_id, self.now))
        self.note(node.node_id, f"applied {action.request_id} {action.write_id}")
        if isinstance(item, SetElement) and item.set_name == "consumed_tokens":
            owner = self.token_owner.setdefault(item.key, item.value)
            if owner != item.value:
                self.fail(f"token {item.key} consumed twice: by {owner} and by {item.value}")
        if isinstance(item, ClusterRecord) and item.kind == "voters":
            self.stats["voter_changes"] += 1
        self.reply(node, action.request_id, "applied", node.node_id)

    def reply(self, node: SimNode, request_id: str, outcome: str, leader: str | None) -> None:
        client = request_id.split("/", 1)[0]
        self.on_send(node.node_id, client, ClientReply(client, request_id, outcome, leader))

    def client_request(self, node: SimNode, request: ClientRequest) -> None:
        machine = node.machine
        assert machine is not None
        if request.request_id in node.proposed:
            return  # a duplicate of a request in flight here: the shell answers once
        wall_ms = node.wall_ms(self.now)
        node.hlc = hlc_tick(node.hlc, wall_ms)
        try:
            item = self.build_item(node, machine, request.op, wall_ms)
        except ValueError as exc:
            self.reply(node, request.request_id, f"refused:{exc}", machine.leader)
            return
        node.proposed[request.request_id] = item
        self.handle(node.node_id, ClientWrite(request.request_id, item, wall_ms))

    def build_item(
        self, node: SimNode, machine: ElectionMachine, op: ClientOp, wall_ms: int
    ) -> Item:
        """What the agent's shell does: stamp the request with the machine's term."""
        stamp = Stamp(machine.term, node.hlc, node.node_id)
        if op.kind == "token":
            return SetElement("consumed_tokens", op.key, {"consumer": op.value}, stamp)
        if op.kind == "revoke":
            return SetElement("revoked_nodes", op.key, {"reason": op.value}, stamp)
        if op.kind == "label":
            return RegisterWrite(
                node_id=op.key,
                attribute="labels",
                value={"n": int(op.value)},
                stamp=stamp,
                writer_class="operator",
                actor="sim",
                reason="sim",
                at_wall_ms=wall_ms,
            )
        if op.kind == "setting":
            serial = machine.records.next_serial("settings")
            return ClusterRecord(
                "settings", serial, machine.term, {"n": int(op.value)}, f"settings/{serial}"
            )
        voters = machine.voter_set
        if voters is None:
            raise ValueError("no_voter_set")
        if op.kind == "voter_add":
            if op.key in voters.voters:
                raise ValueError("already_voter")
            new = voters.voters | {op.key}
        else:
            if op.key not in voters.voters or len(voters.voters) == 1:
                raise ValueError("not_removable")
            new = voters.voters - {op.key}
        serial = machine.records.next_serial("voters")
        return ClusterRecord(
            "voters",
            serial,
            machine.term,
            voters_body(new, voters.voters),
            f"voters/{serial}/{','.join(sorted(new))}",
        )

    # -- the invariants ---------------------------------------------------------------

    def check(self) -> None:
        holders = [
            node.node_id
            for node in self.nodes.values()
            if node.machine is not None and node.machine.can_act(node.local(self.now))
        ]
        if len(holders) > 1:
            detail = ", ".join(
                f"{n} (term {self.nodes[n].machine.term}, lease to "  # type: ignore[union-attr]
                f"{self.nodes[n].real(self.nodes[n].machine.lease_expiry):.4f})"  # type: ignore[union-attr]
                for n in holders
            )
            self.fail(f"two leader leases at once: {detail}")
        for node in self.nodes.values():
            machine = node.machine
            if machine is None or machine.role != "leader":
                continue
            key = (node.node_id, machine.term)
            start = self.checked_upto.get(key, 0)
            for index in range(start, len(self.acked)):
                entry, by, at = self.acked[index]
                if entry.write_id.term < machine.term and not machine.records.covers(entry):
                    self.fail(
                        f"leader {node.node_id} (term {machine.term}) lacks write "
                        f"{entry.write_id} acknowledged by {by} at {at:.4f}: {entry.item!r}"
                    )
            self.checked_upto[key] = len(self.acked)


# -- the seeded driver ------------------------------------------------------------------------


#: The timings of the "edge" scenarios: no margin, the lease at 99.5 % of what the drift
#: bound allows (0.9 / 0.95 = 0.947 s against 1.0 / 1.05 = 0.952 s), and election timeouts
#: barely randomized, so elections happen right when the voters' stickiness ends.
EDGE_SETTINGS = replace(
    SIM_SETTINGS, election_timeout_max_s=1.05, leader_lease_s=0.9, lease_margin_s=0.0
)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One scenario's shape; :func:`config_for_seed` draws one per seed.

    ``edge`` scenarios aim at the timing windows: extreme clock rates, short outages,
    acknowledgements delayed past the lease, the leader cut off one way."""

    voters: int = 3
    spares: int = 1
    duration_s: float = 20.0
    settings: ElectionSettings = SIM_SETTINGS
    drop: float = 0.05
    duplicate: float = 0.03
    delay_min_s: float = 0.001
    delay_max_s: float = 0.05
    long_delay: float = 0.02
    long_delay_max_s: float = 2.5
    fault_every_s: float = 1.5
    restart_after_max_s: float = 4.0
    clients: int = 2
    client_every_s: float = 0.25
    voter_changes: bool = True
    edge: bool = False


def config_for_seed(seed: int) -> SimConfig:
    rng = random.Random(f"config/{seed}")
    edge = rng.random() < 0.5
    return SimConfig(
        voters=rng.choice((1, 2, 3, 3, 3, 4, 5, 5)),
        spares=rng.choice((0, 1, 2)),
        settings=EDGE_SETTINGS if edge else SIM_SETTINGS,
        drop=rng.choice((0.0, 0.02, 0.1, 0.3)),
        duplicate=rng.choice((0.0, 0.05, 0.2)),
        delay_min_s=0.0005 if edge else 0.001,
        delay_max_s=rng.choice((0.005, 0.01)) if edge else rng.choice((0.01, 0.05, 0.3)),
        long_delay=rng.choice((0.05, 0.2)) if edge else rng.choice((0.0, 0.02, 0.1)),
        long_delay_max_s=1.2 if edge else 2.5,
        fault_every_s=rng.choice((0.3, 0.8)) if edge else rng.choice((0.5, 1.5, 4.0)),
        restart_after_max_s=0.3 if edge else 4.0,
        voter_changes=rng.random() < 0.7,
        edge=edge,
    )


class Simulation:
    """One seeded run: a :class:`Cluster`, a time-ordered event queue, a faulty network,
    faults and clients. :meth:`run` returns the cluster's stats or raises
    :class:`SimulationFailure`."""

    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config if config is not None else config_for_seed(seed)
        self.rng = random.Random(seed)
        cfg = self.config
        self.voter_ids = [f"v{i}" for i in range(cfg.voters)]
        self.spare_ids = [f"s{i}" for i in range(cfg.spares)]
        self.node_ids = self.voter_ids + self.spare_ids
        self.client_ids = [f"c{i}" for i in range(cfg.clients)]
        self.queue: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self.seq = 0
        self.blocks: dict[int, set[tuple[str, str]]] = {}
        self.block_seq = 0
        self.client_leader: dict[str, str] = {
            c: self.rng.choice(self.node_ids) for c in self.client_ids
        }
        self.request_seq = 0
        self.cluster = Cluster(
            self.node_ids,
            self.voter_ids,
            settings=cfg.settings,
            seed=seed,
            rng=random.Random(self.rng.getrandbits(64)),
            on_send=self.send,
            on_timer=self.schedule_timer,
        )
        drift = cfg.settings.drift
        for node in self.cluster.nodes.values():
            node.rate = self.draw_rate(drift)
            node.anchor_local = self.rng.uniform(0, 1000)
            node.wall_offset_ms = self.rng.randint(-500, 500)

    def draw_rate(self, drift: float) -> float:
        if self.config.edge:
            return 1 - drift if self.rng.random() < 0.5 else 1 + drift
        pick = self.rng.random()
        if pick < 0.35:
            return 1 - drift
        if pick < 0.7:
            return 1 + drift
        return self.rng.uniform(1 - drift, 1 + drift)

    # -- the queue ----------------------------------------------------------------------

    def push(self, at: float, kind: str, *data: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, kind, data))

    def at(self, time: float, fn: Callable[[Simulation], None]) -> None:
        """Run ``fn(self)`` at simulation time ``time`` (scripted scenarios)."""
        self.push(time, "call", fn)

    def schedule_timer(self, node_id: str, at: float, gen: int) -> None:
        self.push(at, "timer", node_id, gen)

    def blocked(self, src: str, dst: str) -> bool:
        return any((src, dst) in pairs for pairs in self.blocks.values())

    def send(self, src: str, dst: str, message: object) -> None:
        cfg = self.config
        if self.blocked(src, dst) or self.rng.random() < cfg.drop:
            self.cluster.note(src, f"-x {dst}", message)
            return
        copies = 2 if self.rng.random() < cfg.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < cfg.long_delay:
                delay = self.rng.uniform(cfg.delay_max_s, cfg.long_delay_max_s)
            else:
                delay = self.rng.uniform(cfg.delay_min_s, cfg.delay_max_s)
            self.push(self.cluster.now + delay, "deliver", src, dst, message)

    # -- running ------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        cfg = self.config
        for node_id in self.node_ids:
            self.cluster.start(node_id)
        if math.isfinite(cfg.fault_every_s):
            self.push(self.rng.expovariate(1 / cfg.fault_every_s), "fault")
        for client in self.client_ids:
            self.push(self.rng.uniform(0, cfg.client_every_s), "client", client)
        while self.queue:
            at, _, kind, data = heapq.heappop(self.queue)
            if at > cfg.duration_s:
                break
            self.cluster.now = at
            self.step(kind, data)
        return dict(self.cluster.stats)

    def step(self, kind: str, data: tuple[Any, ...]) -> None:
        cluster = self.cluster
        if kind == "deliver":
            src, dst, message = data
            if dst not in cluster.nodes:
                self.client_reply(message)
                return
            if self.blocked(src, dst):
                cluster.note(dst, f"x- {src}", message)
                return
            if cluster.alive(dst) and cluster.paused(dst):
                self.push(cluster.nodes[dst].paused_until, "deliver", src, dst, message)
                return
            cluster.deliver(dst, message)
        elif kind == "timer":
            node_id, gen = data
            if cluster.alive(node_id) and cluster.paused(node_id):
                self.push(cluster.nodes[node_id].paused_until, "timer", node_id, gen)
                return
            cluster.fire_timer(node_id, gen)
        elif kind == "client":
            (client,) = data
            self.client_request(client)
            self.push(
                cluster.now + self.rng.expovariate(1 / self.config.client_every_s), "client", client
            )
        elif kind == "fault":
            self.fault()
            self.push(cluster.now + self.rng.expovariate(1 / self.config.fault_every_s), "fault")
        elif kind == "restart":
            (node_id,) = data
            if not cluster.alive(node_id):
                cluster.start(node_id)
        elif kind == "call":
            (fn,) = data
            fn(self)
        elif kind == "heal":
            (block_id,) = data
            if self.blocks.pop(block_id, None) is not None:
                cluster.note("net", f"heal #{block_id}")

    # -- clients --------------------------------------------------------------------------

    def client_request(self, client: str) -> None:
        rng = self.rng
        self.request_seq += 1
        request_id = f"{client}/{self.request_seq}"
        pick = rng.random()
        if pick < 0.3:
            op = ClientOp("token", f"tok{rng.randrange(6)}", f"joiner{rng.randrange(3)}")
        elif pick < 0.45:
            op = ClientOp("revoke", rng.choice(self.node_ids), client)
        elif pick < 0.65:
            op = ClientOp("label", rng.choice(self.node_ids), str(self.request_seq))
        elif pick < 0.8 or not self.config.voter_changes:
            op = ClientOp("setting", "", str(self.request_seq))
        else:
            target = rng.choice(self.node_ids)
            op = ClientOp(rng.choice(("voter_add", "voter_remove")), target)
        dst = self.client_leader[client]
        self.send(client, dst, ClientRequest(client, request_id, op))

    def client_reply(self, reply: object) -> None:
        if not isinstance(reply, ClientReply):
            return
        self.cluster.note(reply.client, "<-", reply)
        if reply.outcome == "applied":
            return
        if reply.leader is not None:
            self.client_leader[reply.client] = reply.leader
        else:
            self.client_leader[reply.client] = self.rng.choice(self.node_ids)

    # -- faults ---------------------------------------------------------------------------

    def fault(self) -> None:
        rng = self.rng
        cluster = self.cluster
        now = cluster.now
        alive = [n for n in self.node_ids if cluster.alive(n)]
        leaders = [
            n
            for n in alive
            if cluster.nodes[n].machine is not None and cluster.nodes[n].machine.role == "leader"  # type: ignore[union-attr]
        ]
        pick = rng.random()
        if pick < 0.2 and alive:
            target = rng.choice(leaders if leaders and rng.random() < 0.5 else alive)
            cluster.crash(target)
            self.push(now + rng.uniform(0.01, self.config.restart_after_max_s), "restart", target)
        elif pick < 0.35 and alive:
            target = rng.choice(leaders if leaders and rng.random() < 0.5 else alive)
            node = cluster.nodes[target]
            node.paused_until = now + rng.uniform(0.05, 3.0)
            cluster.note(target, f"paused until {node.paused_until:.4f}")
        elif pick < 0.55:
            nodes = list(self.node_ids)
            rng.shuffle(nodes)
            cut = rng.randrange(1, len(nodes)) if len(nodes) > 1 else 1
            left, right = nodes[:cut], nodes[cut:]
            pairs = {(a, b) for a in left for b in right} | {(b, a) for a in left for b in right}
            self.block(pairs, f"partition {left} | {right}")
        elif pick < 0.7 and len(self.node_ids) > 1:
            a, b = rng.sample(self.node_ids, 2)
            self.block({(a, b)}, f"one-way {a} -> {b}")
        elif pick < 0.8 and leaders:
            target = leaders[0]
            others = [n for n in self.node_ids if n != target]
            if rng.random() < 0.5:
                pairs = {(target, n) for n in others}
                what = f"{target} cannot send"
            else:
                pairs = {(n, target) for n in others}
                what = f"{target} cannot hear"
            self.block(pairs, what)
        elif pick < 0.9:
            target = rng.choice(self.node_ids)
            cluster.set_rate(target, self.draw_rate(self.config.settings.drift))
        else:
            self.blocks.clear()
            cluster.note("net", "heal all")

    def block(
        self, pairs: set[tuple[str, str]], what: str, heal_after_s: float | None = None
    ) -> int:
        """Cut the directed links ``pairs`` until healed (after ``heal_after_s``, drawn
        when ``None``; never when infinite). Returns the block's id."""
        self.block_seq += 1
        self.blocks[self.block_seq] = pairs
        self.cluster.note("net", f"block #{self.block_seq}: {what}")
        if heal_after_s is None:
            heal_after_s = self.rng.uniform(0.2, 5.0)
        if math.isfinite(heal_after_s):
            self.push(self.cluster.now + heal_after_s, "heal", self.block_seq)
        return self.block_seq


def run_seed(seed: int, config: SimConfig | None = None) -> dict[str, int]:
    """Run one seed; raise :class:`SimulationFailure` if a safety property fails."""
    return Simulation(seed, config).run()


__all__ = [
    "SIM_SETTINGS",
    "ClientOp",
    "ClientReply",
    "ClientRequest",
    "Cluster",
    "SimConfig",
    "SimNode",
    "Simulation",
    "SimulationFailure",
    "config_for_seed",
    "run_seed",
]
