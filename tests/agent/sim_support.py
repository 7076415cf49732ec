"""The seeded safety simulation: a scenario drawn from a seed, played on the virtual
cluster with simulated tasks (``populi_peer.testing.sim``), with the safety contract
(docs: safety rules 1, 2, 4, 7) checked after every step.

Replay one seed with its timeline::

    POPULI_SIM_SEED=17 python -m pytest tests/agent/test_safety_simulation.py -s
    python tests/agent/sim_support.py --seed 17

A scenario is a list of timed actions (submissions, partitions, one-way blocks,
isolations, crashes with restarts and power losses, pauses, suspends, wall-clock skews)
over a network whose drop, response-drop, duplicate and delay rates are drawn from the
same seed. Everything random in a run comes from the seed — the scenario, each
delivery's faults (keyed by what the delivery is, see :class:`KeyedFaultNetwork`), trio's
scheduling shuffle and the agents' jitter — and node ids are in a fixed order, so a seed
replays the same story in any process.

The checks (:class:`Observer`), after every step of ``STEP_S`` virtual seconds:

- rule 1: the runs of a task (the ledger of what the simulated tasks did) never overlap,
  so a local attempt starts only after the remote one stopped; a run executes only under
  a lease the control plane holds live (rule 3's promise, seen from outside);
- rule 2: tokens strictly increase with attempts (ledger and lease table); no token runs
  twice;
- rule 4: ``LeaseTable.invariant_violation()``; a lease seen terminal (in the table or in
  any answer) never changes again nor disappears; an answer that tells a lease is dead
  finds it dead in the control plane's store;

and at the end, after healing: every run stopped, and rule 7 — every task found in any
submitter's store (reopened after the agents stopped) is in one terminal state with a
reason, every attempt ended, every fallback says why, and a result agrees with the run
that produced it.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import json
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import trio
import trio.testing

from populi_peer.agent.agent import Agent
from populi_peer.config import ApiConfig, Config, ExecConfig, GpuConfig
from populi_peer.core.fencing import FencingToken
from populi_peer.core.leases import DEAD_STATES, TERMINAL_STATES, Lease
from populi_peer.core.tasks import TERMINAL_STATES as TASK_TERMINAL_STATES
from populi_peer.core.tasks import Task
from populi_peer.store import DB_FILE_NAME, Store
from populi_peer.testing import Faults, MemoryNetwork
from populi_peer.testing.cluster import VirtualCluster, open_virtual_cluster
from populi_peer.testing.sim import Ledger, Run, SimHost, open_sim_host

E = TypeVar("E", bound=BaseException)

SEED_ENV = "POPULI_SIM_SEED"
SEEDS_ENV = "POPULI_SIM_SEEDS"
DEFAULT_SEEDS = 200

NODES = ("cp", "w1", "w2")
GPU_FIXTURE = "h100-80gb-hbm3-idle.json"
STEP_S = 0.25
TTL_S = 6.0
EXPIRY_MARGIN_S = 2.0
QUEUE_TIMEOUT_S = 30.0
#: Faults happen in [0, ACTIVE_S); then everything heals.
ACTIVE_S = 30.0
#: After healing, how long (virtual) every task gets to reach a terminal state.
SETTLE_S = 100.0
LOCAL_ONLY_TOKEN = "0.0"
#: Every this many seeds, every answer is also checked against the OpenAPI contract.
CONTRACT_EVERY = 40


def sim_config() -> Config:
    """Every node: a replayed H100, short kills, short peer timeouts (safety rule 3's
    margin: 2 s >= 1 s grace + 0.5 s kill latency + drift over a 6 s TTL)."""
    return Config(
        gpu=GpuConfig(fixture=GPU_FIXTURE),
        exec=ExecConfig(stop_margin_s=2.0, kill_grace_s=1.0, kill_latency_s=0.5),
        api=ApiConfig(request_timeout_s=3.0, shutdown_grace_s=2.0),
    )


def claimed(cluster: VirtualCluster, name: str, task_id: str) -> bool:
    """Whether node ``name`` holds a node-local claim for a local attempt of this task (its
    store: the agent may be down while its supervisor runs on; a node runs one attempt of
    a task at a time)."""
    node = cluster.nodes.get(name)
    if node is None:
        return False
    path = node.data_dir / DB_FILE_NAME
    if not path.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            row = db.execute("SELECT 1 FROM claims WHERE task_id = ?", (task_id,)).fetchone()
        except sqlite3.OperationalError:
            return False
    return row is not None


def stored_lease_state(agent: Agent, lease_id: str) -> str | None:
    """The state of lease ``lease_id`` in ``agent``'s store (None: not there)."""
    row = agent.store.execute("SELECT state FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
    return None if row is None else str(row["state"])


# -- the scenario ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    at: float
    #: submit | partition | block | isolate | crash | pause | suspend | skew | cancel | revoke
    kind: str
    node: str
    other: str = ""
    until: float | None = None
    argv: tuple[str, ...] = ()
    power_off: bool = False
    seconds: float = 0.0
    #: cancel: which submitted task (in order of submission).
    index: int = 0

    def describe(self) -> str:
        if self.kind == "submit":
            return f"t={self.at:6.2f} submit via {self.node}: {' '.join(self.argv)} --gpus 1"
        if self.kind == "suspend":
            return f"t={self.at:6.2f} suspend {self.node} for {self.seconds:g} s (boot/wall jump)"
        if self.kind == "skew":
            return f"t={self.at:6.2f} skew {self.node}'s wall clock by {self.seconds:+g} s"
        if self.kind == "cancel":
            return f"t={self.at:6.2f} cancel the submitted task #{self.index}"
        if self.kind == "revoke":
            return f"t={self.at:6.2f} revoke the oldest holding lease (operator)"
        what = {
            "partition": f"partition {self.node} <-> {self.other}",
            "block": f"block {self.node} -> {self.other}",
            "isolate": f"isolate {self.node}",
            "crash": f"crash {self.node}"
            + (" (power off: supervisors die)" if self.power_off else ""),
            "pause": f"pause {self.node} (answers nothing, sends nothing)",
        }[self.kind]
        end = {"crash": "restart"}.get(self.kind, "resume" if self.kind == "pause" else "heal")
        return f"t={self.at:6.2f} {what}; {end} at t={self.until:.2f}"


@dataclass(frozen=True)
class Scenario:
    seed: int
    faults: Faults
    actions: tuple[Action, ...]
    #: The cluster setting auto_revoke_stale_leases (off by default, ADR 0006).
    auto_revoke: bool = False

    @property
    def active_s(self) -> float:
        ends = [a.until or a.at for a in self.actions]
        return max([ACTIVE_S, *ends])

    def describe(self) -> str:
        f = self.faults
        lines = [
            f"seed={self.seed}: drop={f.drop:.3f} drop_response={f.drop_response:.3f} "
            f"duplicate={f.duplicate:.3f} delay_s={f.delay_s[0]:g}..{f.delay_s[1]:.3f}"
            f"{' auto_revoke_stale_leases' if self.auto_revoke else ''}",
            *("  " + a.describe() for a in self.actions),
        ]
        return "\n".join(lines)


def draw_scenario(seed: int) -> Scenario:
    rng = random.Random(seed)

    def maybe(p: float, low: float, high: float) -> float:
        return round(rng.uniform(low, high), 3) if rng.random() < p else 0.0

    faults = Faults(
        drop=maybe(0.5, 0.01, 0.15),
        drop_response=maybe(0.5, 0.01, 0.15),
        duplicate=maybe(0.5, 0.01, 0.2),
        delay_s=(0.0, maybe(0.5, 0.05, 0.6)),
    )
    actions: list[Action] = []
    for _ in range(rng.randint(1, 4)):
        duration = round(rng.uniform(0.5, 15.0), 2)
        exit_code = 1 if rng.random() < 0.15 else 0
        term_delay = rng.choice((0.0, 0.0, 0.0, 0.5, 2.0))
        actions.append(
            Action(
                at=round(rng.uniform(0.0, 12.0), 2),
                kind="submit",
                node=rng.choice(NODES),
                argv=("sim", f"{duration:g}", str(exit_code), f"{term_delay:g}"),
            )
        )
    down: dict[str, list[tuple[float, float]]] = {n: [] for n in NODES}
    kinds = (
        "partition",
        "partition",
        "block",
        "isolate",
        "crash",
        "crash",
        "pause",
        "suspend",
        "skew",
        "cancel",
        "revoke",
    )
    for _ in range(rng.randint(0, 4)):
        kind = rng.choice(kinds)
        at = round(rng.uniform(0.0, 25.0), 2)
        until = round(at + rng.uniform(0.5, 15.0), 2)
        node = rng.choice(NODES)
        if kind in ("partition", "block"):
            other = rng.choice([n for n in NODES if n != node])
            actions.append(Action(at, kind, node, other=other, until=until))
        elif kind == "crash":
            until = round(at + rng.uniform(0.0, 10.0), 2)
            if any(a < until and at < b for a, b in down[node]):
                continue  # one crash at a time per node
            down[node].append((at, until))
            actions.append(Action(at, kind, node, until=until, power_off=rng.random() < 0.3))
        elif kind == "suspend":
            actions.append(Action(at, kind, node, seconds=round(rng.uniform(0.1, 3.0), 2)))
        elif kind == "skew":
            # Within the signature skew budget (300 s): wall time is for records only.
            actions.append(Action(at, kind, node, seconds=round(rng.uniform(-120.0, 120.0), 1)))
        elif kind == "cancel":
            actions.append(Action(at, kind, "", index=rng.randint(0, 3)))
        elif kind == "revoke":
            actions.append(Action(at, kind, "cp"))
        else:
            actions.append(Action(at, kind, node, until=until))
    actions.sort(key=lambda a: (a.at, a.kind, a.node))
    return Scenario(seed, faults, tuple(actions), auto_revoke=rng.random() < 0.3)


# -- checks ---------------------------------------------------------------------------------


class Violation(AssertionError):
    """A broken rule, with the seed, the scenario, the ledger and a timeline in its text.
    ``known_bug`` names the entry of :data:`KNOWN_BUGS` whose precise signature it has."""

    def __init__(self, text: str, *, seed: int, rule: str, known_bug: str | None = None):
        super().__init__(text)
        self.seed = seed
        self.rule = rule
        self.known_bug = known_bug


#: Product bugs the simulation found, each reproduced on its own by a strict-xfail test in
#: ``test_safety_simulation.py``. A seed whose violation has exactly one of these
#: signatures is reported as that bug (xfail); any other violation fails.
KNOWN_BUGS: dict[str, str] = {}  # none open: both bugs it found are fixed and guarded


@dataclass
class Observer:
    """Watches the run and raises :class:`Violation` at the first broken rule."""

    seed: int
    scenario: Scenario
    ledger: Ledger
    timeline: list[str] = field(default_factory=list)
    #: lease id -> terminal state first seen (table or answers).
    terminal: dict[str, str] = field(default_factory=dict)
    lease_states: dict[str, str] = field(default_factory=dict)
    task_states: dict[tuple[str, str], str] = field(default_factory=dict)
    runs_seen: int = 0
    runs_stopped: set[int] = field(default_factory=set)
    submitted: list[tuple[str, str]] = field(default_factory=list)
    #: Answers carrying a dead lease, checked against the control plane's store.
    told_dead: list[tuple[str, str]] = field(default_factory=list)
    checks: int = 0

    def note(self, text: str) -> None:
        self.timeline.append(f"t={trio.current_time():7.3f} {text}")

    def violation(self, rule: str, message: str, *, known_bug: str | None = None) -> Violation:
        runs = "\n".join("  " + run.describe() for run in self.ledger.runs) or "  (none)"
        timeline = "\n".join(self.timeline[-60:])
        if known_bug not in KNOWN_BUGS:
            known_bug = None
        known = f"known: {KNOWN_BUGS[known_bug]}\n" if known_bug else ""
        return Violation(
            f"seed={self.seed}: {rule}: {message}\n{known}"
            f"replay: {SEED_ENV}={self.seed} python -m pytest "
            f"tests/agent/test_safety_simulation.py -s\n"
            f"scenario:\n{self.scenario.describe()}\nledger:\n{runs}\n"
            f"timeline (last 60):\n{timeline}",
            seed=self.seed,
            rule=rule,
            known_bug=known_bug,
        )

    def fail(self, rule: str, message: str, *, known_bug: str | None = None) -> NoReturn:
        raise self.violation(rule, message, known_bug=known_bug)

    # -- the ledger: rules 1 and 2 --------------------------------------------------------

    def check_ledger(self) -> None:
        runs = self.ledger.runs
        for index in range(self.runs_seen, len(runs)):
            self.note(f"run started: {runs[index].describe()}")
        self.runs_seen = len(runs)
        for index, run in enumerate(runs):
            if run.stopped is not None and index not in self.runs_stopped:
                self.runs_stopped.add(index)
                self.note(f"run stopped: {run.describe()}")
        by_task: dict[str, list[Run]] = {}
        for run in runs:
            by_task.setdefault(run.task_id, []).append(run)
        tokens: dict[str, Run] = {}
        for run in runs:
            if run.token == LOCAL_ONLY_TOKEN:
                continue
            other = tokens.get(run.token)
            if other is not None:
                self.fail(
                    "rule 2 (fencing)",
                    f"token {run.token} started twice: {other.describe()} and {run.describe()}",
                )
            tokens[run.token] = run
        for task_runs in by_task.values():
            for i, a in enumerate(task_runs):
                for b in task_runs[i + 1 :]:
                    if a.attempt == b.attempt:
                        self.fail(
                            "rule 2 (fencing)",
                            f"attempt {a.attempt} ran twice: {a.describe()} / {b.describe()}",
                        )
                    if a.started < b.end() and b.started < a.end():
                        self.fail(
                            "rule 1 (never in two places at once)",
                            f"{a.describe()} overlaps {b.describe()}",
                        )
            ordered = sorted(task_runs, key=lambda r: r.attempt)
            for a, b in itertools.pairwise(ordered):
                if FencingToken.parse(a.token) >= FencingToken.parse(b.token):
                    self.fail(
                        "rule 2 (fencing)",
                        f"tokens do not increase with attempts: {a.describe()} then {b.describe()}",
                    )
                if b.started < a.end():
                    self.fail(
                        "rule 1 (never in two places at once)",
                        f"attempt {b.attempt} started before attempt {a.attempt} stopped: "
                        f"{a.describe()} / {b.describe()}",
                    )

    # -- the control plane's table: rule 4 (and rules 1/3 against the ledger) -------------

    def check_table(self, cluster: VirtualCluster) -> None:
        node = cluster.nodes["cp"]
        if not node.running or node.agent is None or node.agent.leases.table is None:
            return
        table = node.agent.leases.table
        problem = table.invariant_violation()
        if problem is not None:
            self.fail("rule 4 (GPU / task key exclusive)", problem)
        by_token: dict[tuple[str, str], Any] = {}
        for lease in table.leases.values():
            before = self.lease_states.get(lease.lease_id)
            if before != lease.state:
                self.note(
                    f"lease {lease.lease_id} {lease.task_id} attempt {lease.attempt} "
                    f"token {lease.token} {lease.kind} on {self.name_of(cluster, lease.holder)}: "
                    f"{before or '-'} -> {lease.state}"
                )
                self.lease_states[lease.lease_id] = lease.state
            first = self.terminal.get(lease.lease_id)
            if first is not None and lease.state != first:
                self.fail(
                    "rule 4 (a dead lease stays dead)",
                    f"lease {lease.lease_id} was {first} and is now {lease.state}",
                )
            if lease.state in TERMINAL_STATES:
                self.terminal[lease.lease_id] = lease.state
            by_token[(lease.task_id, str(lease.token))] = lease
        for lease_id, state in self.terminal.items():
            if lease_id not in table.leases:
                # Ended leases may leave memory (compaction); the store must keep them.
                stored = stored_lease_state(node.agent, lease_id)
                if stored != state:
                    self.fail(
                        "rule 4 (a dead lease stays dead)",
                        f"lease {lease_id} was {state}; the control plane now has "
                        f"{stored or 'nothing'}",
                    )
        history: dict[str, list[Any]] = {}
        for lease in table.leases.values():
            history.setdefault(lease.task_id, []).append(lease)
        for leases in history.values():
            leases.sort(key=lambda x: x.attempt)
            for a, b in itertools.pairwise(leases):
                if a.attempt == b.attempt or a.token >= b.token:
                    self.fail(
                        "rule 2 (fencing)",
                        f"leases of task {a.task_id}: attempt {a.attempt} token {a.token}, "
                        f"attempt {b.attempt} token {b.token}",
                    )
        for run in self.ledger.running():
            if run.token == LOCAL_ONLY_TOKEN:
                continue
            if run.role == "local" and claimed(cluster, run.node, run.task_id):
                # ADR 0015: a local attempt whose renewals went unanswered runs on under a
                # node-local claim (its lease may expire); the ledger's own checks (one
                # place at a time, tokens) still hold it.
                continue
            found = by_token.get((run.task_id, run.token))
            if found is None or not found.holding:
                self.fail(
                    "rule 1/3 (executes only under a live lease)",
                    f"{run.describe()} runs while its lease is "
                    f"{'unknown' if found is None else found.state}",
                )

    def check_told(self, cluster: VirtualCluster) -> None:
        """safety rule 4: the control plane writes the dead state durably before it tells
        anyone."""
        node = cluster.nodes["cp"]
        if not self.told_dead or not node.running or node.agent is None:
            return
        pending, self.told_dead = self.told_dead, []
        for lease_id, state in pending:
            stored = stored_lease_state(node.agent, lease_id)
            if stored != state:
                self.fail(
                    "rule 4 (durable before told)",
                    f"an answer said lease {lease_id} is {state}; the store says {stored}",
                )

    def on_answer(self, request: httpx.Request, response: httpx.Response) -> None:
        if not request.url.path.startswith("/v1/populi/exec/") or not response.is_success:
            return
        try:
            body = response.json()
        except ValueError:
            return
        leases = [body.get("lease"), body.get("prior"), *(body.get("leases") or [])]
        for lease in leases:
            if not isinstance(lease, dict):
                continue
            lease_id, state = lease.get("lease_id"), lease.get("state")
            if state in DEAD_STATES or state == "completed":
                self.told_dead.append((str(lease_id), str(state)))
                self.terminal.setdefault(str(lease_id), str(state))
            elif state in ("live", "revoking") and lease_id in self.terminal:
                # Answers are observed in handling order only roughly (an answer read
                # after a later change): the table check decides; this is a note.
                self.note(f"answer shows {lease_id} {state} after it was seen terminal")

    # -- submitters' task states (for the timeline) ----------------------------------------

    def watch_tasks(self, cluster: VirtualCluster) -> None:
        for name in NODES:
            node = cluster.nodes.get(name)
            if node is None or not node.running or node.agent is None:
                continue
            for row in node.agent.store.execute("SELECT task_id, state FROM tasks").fetchall():
                key = (name, row["task_id"])
                if self.task_states.get(key) != row["state"]:
                    self.note(f"task {row['task_id']} at {name}: {row['state']}")
                    self.task_states[key] = row["state"]

    def step(self, cluster: VirtualCluster) -> None:
        self.checks += 1
        self.watch_tasks(cluster)
        self.check_ledger()
        self.check_table(cluster)
        self.check_told(cluster)

    @staticmethod
    def name_of(cluster: VirtualCluster, node_id: str) -> str:
        for name, known in cluster.node_ids.items():
            if known == node_id:
                return name
        return node_id


# -- the run --------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    scenario: Scenario
    tasks: dict[str, dict[str, Any]]
    runs: int
    virtual_s: float
    wall_s: float
    checks: int
    deliveries: dict[str, int]

    def summary(self) -> str:
        states: dict[str, int] = {}
        for task in self.tasks.values():
            states[task["state"]] = states.get(task["state"], 0) + 1
        return (
            f"seed={self.seed}: {len(self.tasks)} tasks {states}, {self.runs} runs, "
            f"{self.checks} checks, {self.virtual_s:.1f} s virtual in {self.wall_s:.2f} s wall, "
            f"network {self.deliveries}"
        )


_DELIVERY: contextvars.ContextVar[random.Random] = contextvars.ContextVar("sim_delivery")
_IDS_IN_PATHS = re.compile(r"\b[tl]-[0-9a-f]{6,}\b")


class _PerDeliveryRandom(random.Random):
    """The network's generator, answering each delivery from that delivery's own
    generator (``uniform`` is built on ``random``)."""

    def random(self) -> float:
        return _DELIVERY.get().random()


class KeyedFaultNetwork(MemoryNetwork):
    """The in-memory network, with the fault draws of each delivery keyed by what it is —
    the seed, sender and receiver names, method, path (task and lease ids masked) and how
    many such deliveries came before — instead of taken in turn from one sequence. Two
    deliveries at the same virtual instant may be handled in either order (trio breaks
    ties between equal deadlines by object address); with keyed draws each still gets the
    same faults, so a seed replays the same story."""

    def __init__(self, *, names: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = names  # node id -> name, as the cluster learns them
        self.rng = _PerDeliveryRandom()
        self._seen: Counter[str] = Counter()

    async def deliver(self, src: str, request: httpx.Request) -> httpx.Response:
        by_id = {node_id: name for name, node_id in self.names.items()}
        path = _IDS_IN_PATHS.sub("*", request.url.path)
        key = f"{self.seed}|{by_id.get(src, src)}|{request.url.host}|{request.method}|{path}"
        self._seen[key] += 1
        token = _DELIVERY.set(random.Random(f"{key}|{self._seen[key]}"))
        try:
            return await super().deliver(src, request)
        finally:
            _DELIVERY.reset(token)


def _seed_scheduling(seed: int) -> None:
    """trio shuffles the order in which runnable tasks run (to shake out races) with a
    module-level generator; seed it, so that a seed replays (see KeyedFaultNetwork for
    what is left)."""
    runner = getattr(getattr(trio, "_core", None), "_run", None)
    generator = getattr(runner, "_r", None)
    if isinstance(generator, random.Random):
        generator.seed(seed)


def _agent_factory(host: SimHost, seed: int) -> Callable[..., Agent]:
    starts: dict[str, int] = {}

    def factory(**kwargs: Any) -> Agent:
        agent = host.agent_factory(**kwargs)
        name = kwargs["data_dir"].name
        starts[name] = starts.get(name, 0) + 1
        # The agents' own jitter (heartbeats, result delivery) from the seed, too.
        agent.worker.rng = random.Random(f"{seed}/{name}/{starts[name]}/worker")
        agent.heartbeat_sender.rng = random.Random(f"{seed}/{name}/{starts[name]}/beat")
        agent.gossip.rng = random.Random(f"{seed}/{name}/{starts[name]}/gossip")
        return agent

    return factory


class Driver:
    """Plays a scenario's actions on the cluster (each in its own task, so the steps go
    on while an action waits)."""

    def __init__(self, scenario: Scenario, cluster: VirtualCluster, host: SimHost, obs: Observer):
        self.scenario = scenario
        self.cluster = cluster
        self.host = host
        self.obs = obs
        self.cuts: dict[int, list[tuple[str, str]]] = {}
        self.down: set[str] = set()
        self.pending = 0

    def node_id(self, name: str) -> str:
        return self.cluster.node_ids[name]

    def apply_cuts(self) -> None:
        network = self.cluster.network
        network.heal()
        for pairs in self.cuts.values():
            for src, dst in pairs:
                network.block(src, dst)

    def cut_pairs(self, action: Action) -> list[tuple[str, str]]:
        a = self.node_id(action.node)
        if action.kind == "block":
            return [(a, self.node_id(action.other))]
        if action.kind == "partition":
            b = self.node_id(action.other)
            return [(a, b), (b, a)]
        others = [self.node_id(n) for n in NODES if n != action.node] + ["operator"]
        if action.kind == "isolate":
            return [pair for o in others for pair in ((a, o), (o, a))]
        return [(a, o) for o in others]  # pause: it sends nothing

    async def play(self, index: int, action: Action) -> None:
        self.pending += 1
        try:
            await self._play(index, action)
        finally:
            self.pending -= 1

    async def _play(self, index: int, action: Action) -> None:
        await trio.sleep_until(action.at)
        self.obs.note("action: " + action.describe())
        if action.kind == "submit":
            await self.submit(action)
        elif action.kind in ("partition", "block", "isolate", "pause"):
            self.cuts[index] = self.cut_pairs(action)
            self.apply_cuts()
            if action.kind == "pause":
                self.cluster.network.pause(self.node_id(action.node))
            assert action.until is not None
            await trio.sleep_until(action.until)
            self.obs.note(f"end of: {action.describe()}")
            self.cuts.pop(index, None)
            self.apply_cuts()
            if action.kind == "pause" and not any(
                a.kind == "pause" and a.node == action.node
                for i, a in enumerate(self.scenario.actions)
                if i in self.cuts
            ):
                self.cluster.network.resume(self.node_id(action.node))
        elif action.kind == "crash":
            self.down.add(action.node)
            await self.cluster.crash(action.node)
            if action.power_off:
                killed = self.host.power_off(action.node)
                self.obs.note(f"power off {action.node}: {killed} supervisors died")
            assert action.until is not None
            await trio.sleep_until(action.until)
            await self.cluster.start(action.node)
            self.down.discard(action.node)
            self.obs.note(f"restarted {action.node}")
        elif action.kind == "skew":
            self.cluster.nodes[action.node].clock.set_skew(action.seconds)
        elif action.kind == "suspend":
            self.host.suspend(action.node, self.cluster.nodes[action.node].clock, action.seconds)
        elif action.kind == "cancel":
            await self.cancel(action)
        elif action.kind == "revoke":
            await self.revoke()

    async def cancel(self, action: Action) -> None:
        if action.index >= len(self.obs.submitted):
            self.obs.note(f"cancel: no task #{action.index}")
            return
        via, task_id = self.obs.submitted[action.index]
        if not self.cluster.nodes[via].running:
            self.obs.note(f"cancel {task_id} skipped: {via} is down")
            return
        async with self.cluster.operator_client(via) as client:
            try:
                response = await client.post(f"/v1/populi/tasks/{task_id}/cancel", json={})
            except httpx.HTTPError as exc:
                self.obs.note(f"cancel {task_id}: {type(exc).__name__}")
                return
        self.obs.note(f"cancel {task_id}: HTTP {response.status_code}")

    async def revoke(self) -> None:
        node = self.cluster.nodes["cp"]
        table = node.agent.leases.table if node.running and node.agent is not None else None
        holding = [x for x in table.holding() if x.kind != "fence"] if table else []
        if not holding:
            self.obs.note("revoke: no holding lease")
            return
        async with self.cluster.operator_client() as client:
            try:
                response = await client.post(
                    "/v1/populi/admin/exec-lease-revoke",
                    json={"lease_id": holding[0].lease_id, "reason": "simulated operator"},
                )
            except httpx.HTTPError as exc:
                self.obs.note(f"revoke {holding[0].lease_id}: {type(exc).__name__}")
                return
        self.obs.note(f"revoke {holding[0].lease_id}: HTTP {response.status_code}")

    async def submit(self, action: Action) -> None:
        if not self.cluster.nodes[action.node].running:
            self.obs.note(f"submit via {action.node} skipped: it is down")
            return
        async with self.cluster.operator_client(action.node) as client:
            try:
                response = await client.post(
                    "/v1/populi/tasks", json=task_body(list(action.argv)), timeout=5.0
                )
            except httpx.HTTPError as exc:
                # Lost on the way or on the way back: the task may exist; the final check
                # reads every submitter's store.
                self.obs.note(f"submit via {action.node}: {type(exc).__name__}")
                return
        if response.status_code != 200:
            self.obs.note(f"submit via {action.node}: HTTP {response.status_code}")
            return
        task_id = response.json()["task"]["task_id"]
        self.obs.submitted.append((action.node, task_id))
        self.obs.note(f"submitted {task_id} via {action.node}")

    async def heal_all(self) -> None:
        self.cuts.clear()
        self.apply_cuts()
        for name in NODES:
            if name in self.cluster.node_ids:
                self.cluster.network.resume(self.node_id(name))
        self.cluster.network.faults = Faults()
        self.obs.note("healed: no cuts, no pauses, no faults")


async def _set_cluster_settings(cluster: VirtualCluster, **more: Any) -> None:
    from support.vcluster import change_settings

    await change_settings(
        cluster,
        remote_exec_enabled=True,
        max_lease_ttl_s=TTL_S,
        lease_expiry_margin_s=EXPIRY_MARGIN_S,
        **more,
    )


async def _setup(cluster: VirtualCluster) -> None:
    """Until every node has the settings, the control plane sees every GPU and every node
    knows every other (settings are pushed at once; membership travels with heartbeats)."""
    await cluster.wait_until(
        lambda: all(
            cluster[n].records.settings["remote_exec_enabled"]
            and cluster[n].records.settings["max_lease_ttl_s"] == TTL_S
            and cluster.cp.gpu.allocatable_gpus(cluster[n].node_id)[0]
            and all(cluster[n].membership.get(cluster[m].node_id) for m in cluster.nodes)
            for n in cluster.nodes
        ),
        timeout_s=30,
    )


# -- small clusters for targeted tests ------------------------------------------------------


class LoseAnswers:
    """An ``on_response`` hook that makes the network lose the answer to chosen requests:
    the request is handled, its answer never arrives (the network's ``drop_response``,
    switched on for exactly that answer)."""

    def __init__(self) -> None:
        self.network: Any = None
        self.rules: list[list[Any]] = []
        self.lost: list[str] = []
        self._restore: float | None = None

    def arm(self, method: str, path: str, count: int = 1) -> None:
        self.rules.append([method, path, count])

    def __call__(self, request: httpx.Request, response: httpx.Response) -> None:
        if self.network is None:  # not attached yet (the cluster is starting)
            return
        faults = self.network.faults
        if self._restore is not None:
            faults.drop_response, self._restore = self._restore, None
        for rule in self.rules:
            method, path, count = rule
            if count > 0 and request.method == method and request.url.path == path:
                rule[2] = count - 1
                # MemoryNetwork draws the response drop right after this hook returns.
                self._restore, faults.drop_response = faults.drop_response, 1.0
                self.lost.append(f"{method} {path}")
                return


@contextlib.asynccontextmanager
async def open_small_cluster(
    root: Path,
    *,
    workers: int = 1,
    on_response: Callable[[httpx.Request, httpx.Response], None] | None = None,
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    """``cp`` and ``workers`` joined nodes with simulated executors, remote execution on
    and the simulation's timings; every answer is checked against the contract, then
    given to ``on_response``."""
    from support.contract import validate
    from support.vcluster import sim_vcluster

    def check(request: httpx.Request, response: httpx.Response) -> None:
        validate(request, response)
        if on_response is not None:
            on_response(request, response)

    async with sim_vcluster(
        root, workers=workers, config=sim_config(), on_response=check, host_changes=True
    ) as (cluster, host):
        await _set_cluster_settings(cluster)
        await _setup(cluster)
        yield cluster, host


@contextlib.asynccontextmanager
async def open_gpu_cluster(
    root: Path, *, workers: int = 1
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    """``cp`` and ``workers`` joined nodes with simulated executors and GPUs, on the
    cluster's default settings (remote execution off); every answer is checked against
    the contract. Yields once the control plane can allocate every worker's GPU, each
    worker has verified its own and every worker knows every other."""
    from support.vcluster import sim_vcluster

    async with sim_vcluster(root, workers=workers, config=sim_config()) as (cluster, host):
        names = [n for n in cluster.nodes if n != "cp"]
        await cluster.wait_until(
            lambda: all(
                cluster.cp.gpu.allocatable_gpus(cluster[n].node_id)[0]
                and cluster[n].gpu.verified_uuids()
                and all(cluster[n].membership.get(cluster[m].node_id) for m in names)
                for n in names
            ),
            timeout_s=60,
        )
        yield cluster, host


def task_body(argv: list[str], *, gpus: int = 1, node: str | None = None) -> dict[str, Any]:
    """A task of the simulation's kind (``agent`` work, queued up to
    :data:`QUEUE_TIMEOUT_S`); with ``node``, pinned there with fallback."""
    body: dict[str, Any] = {
        "command": argv,
        "gpus": gpus,
        "work_class": "agent",
        "queue_timeout_s": QUEUE_TIMEOUT_S,
    }
    if node is not None:
        body.update(node=node, node_fallback=True)
    return body


async def submit(
    cluster: VirtualCluster, via: str, argv: list[str], *, gpus: int = 1, node: str | None = None
) -> str:
    """Submit a task to ``via`` as the operator (see :func:`task_body`); returns its id."""
    async with cluster.operator_client(via) as client:
        response = await client.post("/v1/populi/tasks", json=task_body(argv, gpus=gpus, node=node))
    assert response.status_code == 200, response.text
    return str(response.json()["task"]["task_id"])


# -- one remote attempt that loses its lease (tests/agent/test_*_virtual.py) ----------------

#: How long (virtual seconds) that remote attempt would run if nothing stopped it; the
#: local one after the fallback runs it in full.
REMOTE_TASK_S = 20.0
#: How often the tests' watchers look at the cluster (virtual seconds).
WATCH_S = 0.01


async def submit_remote(
    cluster: VirtualCluster, host: SimHost, observer: Observer
) -> tuple[str, Run, str]:
    """A :data:`REMOTE_TASK_S` task submitted on w1 and pinned to w2: its id, its run
    there (attempt 1) and its lease's id, once one periodic renewal has landed (the
    supervisor's deadline moved)."""
    task_id = await submit(cluster, "w1", ["sim", f"{REMOTE_TASK_S:g}"], node="w2")
    observer.submitted.append(("w1", task_id))
    await cluster.wait_until(lambda: bool(host.ledger.for_task(task_id)), timeout_s=30)
    (remote,) = host.ledger.for_task(task_id)
    assert (remote.node, remote.role, remote.attempt) == ("w2", "worker", 1)
    lease_id = cluster["w1"].submitter.load(task_id).attempts[0].lease_id
    assert lease_id is not None
    await cluster.wait_until(lambda: len(remote.deadlines_boot) >= 2, timeout_s=10)
    return task_id, remote, lease_id


def stopped_at_deadline(remote: Run, last_renewal: float) -> float:
    """The supervisor stopped ``remote`` by the deadline of its last accepted renewal (at
    ``last_renewal``), the stop margin before it; returns that instant."""
    stop_at = last_renewal + TTL_S - sim_config().exec.stop_margin_s
    assert remote.stop_reason == "deadline", remote.describe()
    assert remote.stop_requested == stop_at, (remote.stop_requested, stop_at)
    assert remote.stopped is not None and remote.stopped <= stop_at
    return stop_at


def _all_settled(cluster: VirtualCluster, obs: Observer, driver: Driver) -> bool:
    if driver.down or obs.ledger.running():
        return False
    for name in NODES:
        node = cluster.nodes[name]
        if not node.running or node.agent is None:
            return False
        row = node.agent.store.execute(
            "SELECT COUNT(*) FROM tasks WHERE state NOT IN (?, ?, ?, ?)",
            tuple(sorted(TASK_TERMINAL_STATES)),
        ).fetchone()
        if row[0]:
            return False
    cp = cluster.nodes["cp"].agent
    return cp is not None and cp.leases.table is not None and not cp.leases.table.holding()


def check_rule_7(obs: Observer, data_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Every submitted task is in exactly one terminal state at its submitter, durably
    (read back from a reopened store), with the reason codes of its decisions; and what it
    says agrees with what ran (the ledger)."""
    tasks: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    cp_leases = _stored_leases(data_dirs["cp"])
    for name, data_dir in data_dirs.items():
        store = Store.open(data_dir, readonly=True)
        try:
            rows = store.execute("SELECT task_id, state, body FROM tasks").fetchall()
        finally:
            store.close()
        for row in rows:
            body = json.loads(row["body"])
            task = Task.from_json(body["task"])
            if row["task_id"] in owners:
                obs.fail("rule 7", f"task {row['task_id']} is recorded at two submitters")
            owners[row["task_id"]] = name
            if row["state"] != task.state:
                obs.fail("rule 7", f"task {task.task_id}: column {row['state']} != {task.state}")
            if not task.terminal:
                _fail_unfinished(obs, name, task, cp_leases)
            if task.finished_wall_ms is None or not task.terminal_reason:
                obs.fail("rule 7", f"task {task.task_id} has no finish time or terminal reason")
            if task.reasons[-1].at_wall_ms > task.finished_wall_ms:
                obs.fail(
                    "rule 7", f"task {task.task_id} changed after it ended: {task.reasons[-1]}"
                )
            for attempt in task.attempts:
                if attempt.outcome is None:
                    obs.fail("rule 7", f"task {task.task_id} attempt {attempt.n} never ended")
                if (
                    attempt.n > 1
                    and attempt.where == "local"
                    and (
                        len(attempt.placement_reasons) < 2
                        or attempt.placement_reasons[0] != "lease_dead_confirmed"
                    )
                ):
                    obs.fail(
                        "rule 7 (reason codes)",
                        f"fallback attempt {attempt.n} of {task.task_id} has reasons "
                        f"{attempt.placement_reasons}; {_task_story(task, cp_leases)}",
                        known_bug=_fallback_reason_lost(attempt, task, cp_leases),
                    )
            decisions = [r.code for r in task.reasons]
            starts = sum(
                decisions.count(c)
                for c in ("placed_remote", "placed_local", "lease_dead_confirmed")
            )
            if starts < len(task.attempts):
                obs.fail("rule 7 (reason codes)", _task_story(task, cp_leases))
            _check_result_matches_ledger(obs, task)
            tasks[task.task_id] = {"submitter": name, "state": task.state, "task": task}
    for name, task_id in obs.submitted:
        if owners.get(task_id) != name:
            obs.fail(
                "rule 7 (nothing is lost)", f"submitted {task_id} via {name}; not in its store"
            )
    for run in obs.ledger.runs:
        if run.task_id not in tasks:
            obs.fail("rule 7", f"{run.describe()} belongs to no recorded task")
    return tasks


def _fallback_reason_lost(attempt: Any, task: Task, cp_leases: list[Lease]) -> str | None:
    """The signature of "fallback_replay_drops_reason": the fallback attempt says only
    ``lease_dead_confirmed``, though the lease before its own is dead at the control plane
    (there was a reason to give)."""
    if attempt.placement_reasons != ("lease_dead_confirmed",) or attempt.token is None:
        return None
    before = [x for x in cp_leases if x.task_id == task.task_id and x.token < attempt.token]
    if before and max(before, key=lambda x: x.token).dead:
        return "fallback_replay_drops_reason"
    return None


def _task_story(task: Task, cp_leases: list[Lease]) -> str:
    leases = sorted((x for x in cp_leases if x.task_id == task.task_id), key=lambda x: x.attempt)
    attempts = [(a.n, a.where, str(a.token), a.outcome, a.placement_reasons) for a in task.attempts]
    decisions = [f"{r.code}{'(' + r.detail[:60] + ')' if r.detail else ''}" for r in task.reasons]
    return (
        f"task {task.task_id} {task.state}; attempts {attempts}; the control plane's leases "
        f"{[(x.attempt, str(x.token), x.kind, x.state) for x in leases]}; decisions {decisions}"
    )


def _stored_leases(data_dir: Path) -> list[Lease]:
    store = Store.open(data_dir, readonly=True)
    try:
        rows = store.execute("SELECT body FROM leases").fetchall()
    finally:
        store.close()
    return [Lease.from_json(json.loads(row["body"])) for row in rows]


def _fail_unfinished(obs: Observer, name: str, task: Task, cp_leases: list[Lease]) -> NoReturn:
    obs.fail(
        "rule 7 (nothing is lost)",
        f"task {task.task_id} at {name} ended {task.state}, {SETTLE_S:g} s after healing; "
        + _task_story(task, cp_leases),
    )


def _check_result_matches_ledger(obs: Observer, task: Task) -> None:
    """Rule 2 at the submitter: a result counts only for the current attempt's token."""
    if task.state not in ("succeeded", "failed") or task.exit_code is None:
        return
    current = task.current_attempt
    if current is None:
        obs.fail("rule 2", f"task {task.task_id} {task.state} with an exit code but no attempt")
        return
    runs = [r for r in obs.ledger.for_task(task.task_id) if r.attempt == current.n]
    if len(runs) != 1:
        obs.fail(
            "rule 2",
            f"task {task.task_id} ended by attempt {current.n}, which ran {len(runs)} times",
        )
    run = runs[0]
    if current.token is not None and run.token != str(current.token):
        obs.fail(
            "rule 2", f"task {task.task_id}: result token {current.token}, run {run.describe()}"
        )
    if run.exit_code != task.exit_code:
        obs.fail(
            "rule 2",
            f"task {task.task_id} {task.state} with exit {task.exit_code}; the run: {run.describe()} "
            f"exit {run.exit_code}",
        )


# -- the cluster: built once per process, copied for every seed ---------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str = "populi-sim-") -> Iterator[Path]:
    """A directory that is gone afterwards; on tmpfs (``/dev/shm``) when there is one:
    the agents write with SQLite ``synchronous=FULL``, and an fsync per commit on a disk
    would make each seed several times slower (still real SQLite either way)."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _build_template(root: Path) -> list[str]:
    async with open_virtual_cluster(root, workers=len(NODES) - 1, config=sim_config()) as cluster:
        await _set_cluster_settings(cluster)
        await cluster.wait_until(
            lambda: all(cluster[n].records.settings["max_lease_ttl_s"] == TTL_S for n in NODES),
            timeout_s=30,
        )
        return [cluster[n].node_id for n in NODES]


def build_template(root: Path, *, max_tries: int = 60) -> Path:
    """Data directories of a joined cluster (``cp``, ``w1``, ``w2``) with remote execution
    on, whose node ids are in name order: placement breaks ties by the smallest node id,
    so with ids in a fixed order a seed takes the same course in every process (node ids
    are random, drawn at init and join)."""
    for attempt in range(max_tries):
        candidate = root / f"template-{attempt}"
        ids = trio.run(
            _build_template, candidate, clock=trio.testing.MockClock(autojump_threshold=0)
        )
        if ids == sorted(ids):
            return candidate
        shutil.rmtree(candidate, ignore_errors=True)
    raise RuntimeError(f"no cluster with node ids in name order in {max_tries} tries")


@contextlib.asynccontextmanager
async def open_sim_cluster(
    template: Path,
    root: Path,
    seed: int,
    on_answer: Callable[[httpx.Request, httpx.Response], None],
    *,
    validate: bool,
) -> AsyncIterator[tuple[VirtualCluster, SimHost]]:
    """The template cluster, copied to ``root``, restarted with simulated executors and
    the network's faults seeded by ``seed``; every answer goes through ``on_answer`` (and
    the OpenAPI contract when ``validate``)."""
    checks: list[Callable[[httpx.Request, httpx.Response], None]] = []
    if validate:
        from support.contract import validate as contract

        checks.append(contract)
    checks.append(on_answer)

    def on_response(request: httpx.Request, response: httpx.Response) -> None:
        for check in checks:
            check(request, response)

    def keyed_network(cluster: VirtualCluster) -> KeyedFaultNetwork:
        return KeyedFaultNetwork(
            names=cluster.node_ids, seed=cluster.seed, on_response=cluster.on_response
        )

    async with (
        open_sim_host() as host,
        open_virtual_cluster(
            root,
            workers=len(NODES) - 1,
            template=template,
            seed=seed,
            config=sim_config(),
            agent_factory=_agent_factory(host, seed),
            on_response=on_response,
            make_network=keyed_network,
            changes=host.changes,
        ) as cluster,
    ):
        yield cluster, host


async def run_seed(
    seed: int, template: Path, root: Path, *, validate: bool | None = None
) -> Report:
    """Play the scenario of ``seed`` on a copy of ``template`` (:func:`build_template`) in
    ``root``; raise :class:`Violation` (naming the seed) at the first broken rule, or when
    an agent dies of an exception. Answers are checked against the OpenAPI contract on
    every ``CONTRACT_EVERY``-th seed (or as ``validate`` says): validating costs more
    than the rest of a seed."""
    wall_start = time.perf_counter()
    if validate is None:
        validate = seed % CONTRACT_EVERY == 0
    _seed_scheduling(seed)
    scenario = draw_scenario(seed)
    obs = Observer(seed, scenario, Ledger())
    try:
        virtual_s, deliveries, data_dirs = await _play(scenario, template, root, obs, validate)
    except BaseException as exc:
        violation = _first(exc, Violation)
        if violation is not None:
            raise violation from None
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        inner = exc
        while isinstance(inner, BaseExceptionGroup) and inner.exceptions:
            inner = inner.exceptions[0]
        raise obs.violation(
            "agent crash (an exception escaped an agent)",
            f"{type(inner).__name__}: {inner}",
        ) from exc
    tasks = check_rule_7(obs, data_dirs)
    return Report(
        seed=seed,
        scenario=scenario,
        tasks=tasks,
        runs=len(obs.ledger.runs),
        virtual_s=virtual_s,
        wall_s=time.perf_counter() - wall_start,
        checks=obs.checks,
        deliveries=deliveries,
    )


def _first(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in ``exc`` (which may be an exception group)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None


async def _play(
    scenario: Scenario, template: Path, root: Path, obs: Observer, validate: bool
) -> tuple[float, dict[str, int], dict[str, Path]]:
    async with open_sim_cluster(
        template, root, scenario.seed, obs.on_answer, validate=validate
    ) as (cluster, host):
        obs.ledger = host.ledger
        if scenario.auto_revoke:
            await _set_cluster_settings(cluster, auto_revoke_stale_leases=True)
        await _setup(cluster)
        origin = trio.current_time()
        # Scenario times count from the end of the set-up.
        shifted = tuple(
            dataclasses.replace(
                a, at=a.at + origin, until=None if a.until is None else a.until + origin
            )
            for a in scenario.actions
        )
        cluster.network.faults = dataclasses.replace(scenario.faults)
        driver = Driver(dataclasses.replace(scenario, actions=shifted), cluster, host, obs)
        async with trio.open_nursery() as actions:
            for index, action in enumerate(shifted):
                actions.start_soon(driver.play, index, action)
            active_until = origin + scenario.active_s
            # Step on while actions still wait (a cancel waits for its task to end).
            while trio.current_time() < active_until or driver.pending:
                await trio.sleep(STEP_S)
                obs.step(cluster)
        await driver.heal_all()
        settle_until = trio.current_time() + SETTLE_S
        while not _all_settled(cluster, obs, driver):
            if trio.current_time() >= settle_until:
                break
            await trio.sleep(STEP_S)
            obs.step(cluster)
        obs.step(cluster)
        stuck = obs.ledger.running()
        if stuck:
            obs.fail(
                "rule 3 (stops itself before its lease ends)",
                f"{SETTLE_S:g} s after healing, still running: "
                + "; ".join(run.describe() for run in stuck),
            )
        virtual_s = trio.current_time() - origin
        deliveries = dict(cluster.network.stats)
        data_dirs = {name: cluster.nodes[name].data_dir for name in NODES}
    return virtual_s, deliveries, data_dirs


def seeds_to_run(environ: dict[str, str]) -> list[int]:
    """``POPULI_SIM_SEED`` replays seeds (``17``, ``17,42``, ``200-299``); otherwise
    ``range(POPULI_SIM_SEEDS)`` (default 200)."""
    chosen = environ.get(SEED_ENV, "").strip()
    if chosen:
        seeds: list[int] = []
        for part in chosen.split(","):
            low, _, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high or low) + 1))
        return seeds
    return list(range(int(environ.get(SEEDS_ENV, str(DEFAULT_SEEDS)))))


def main(argv: list[str] | None = None) -> int:
    """Replay seeds outside pytest: ``python tests/agent/sim_support.py --seed 17``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, action="append", required=True)
    parser.add_argument("--contract", action="store_true", help="validate every answer")
    args = parser.parse_args(argv)
    failed = 0
    with scratch_dir() as scratch:
        template = build_template(scratch)
        for seed in args.seed:
            print(draw_scenario(seed).describe())
            root = scratch / f"seed{seed}"
            root.mkdir()
            try:
                report = trio.run(
                    functools.partial(run_seed, seed, template, root, validate=args.contract),
                    clock=trio.testing.MockClock(autojump_threshold=0),
                )
            except Violation as exc:
                print(exc)
                failed += 1
                continue
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(report.summary())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for support.contract
    sys.exit(main())


__all__ = [
    "DEFAULT_SEEDS",
    "SEEDS_ENV",
    "SEED_ENV",
    "Observer",
    "Report",
    "Scenario",
    "Violation",
    "draw_scenario",
    "run_seed",
    "seeds_to_run",
    "sim_config",
]
