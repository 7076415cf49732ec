"""A seeded, pure simulation of leases across control-plane restarts, full reports and
node-local claims (a test helper, like ``trio.testing``; ADR 0015).

One control plane — a :class:`~populi_peer.core.leases.LeaseTable` behind a tiny shell
that persists exactly the records it is told to — and a few nodes, each with the node's
pure core (:class:`~populi_peer.core.claims.NodeBook`,
:class:`~populi_peer.core.reports.NodeReporter`,
:class:`~populi_peer.core.fencing.FenceBook`, one
:class:`~populi_peer.core.holder.HolderMachine` per attempt) and a simulated supervisor per
task process that stops it by its deadline on the node's own clock (safety rule 3). Nodes
submit tasks: remote ones (grant, handoff, fallback only on the control plane's word) and
local ones (remote execution off or pinned here: a local lease, or a claim when no control
plane answers). The network delays, drops and sometimes holds messages long; faults crash
and restart the control plane (a new incarnation that keeps only its store), cut a node off
from it for a while, lose a node's next full report, and put a submitter to sleep so that
results wait undelivered. A share of the crashes are *failovers*: another voter leads at the
next term, holding none of the old leader's leases (leases are rebuilt from the nodes'
full reports, not replicated; ADR 0011) and numbering its tokens afresh within its term,
while the old leader's last answers (a grant at its last moment) are still in flight. A
node that reported to term T ignores a control-plane answer from a lower term.

After every event :class:`LeaseSimulation` asserts:

1. no GPU runs two attempts at once (task processes, as the supervisors run them);
2. no task runs in two places at once (safety rule 1);
3. fencing (rule 2): the attempts of a task start with strictly increasing tokens, and a
   worker never starts a token below the highest it accepted for the task;
4. a dead lease stays dead (rule 4): once the store holds a lease as terminal it never
   changes, across restarts; and the control plane's table keeps its invariants (no GPU in
   two holding leases, learned ones included).

A failure raises :class:`LeaseSimulationFailure` with the seed and the last events;
``run_seed(seed)`` replays it exactly; ``scripts/simulate-leases`` runs many.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from populi_peer.core.claims import NO_LEASE_TOKEN, AttemptKey, LeaseTerms, NodeAttempt, NodeBook
from populi_peer.core.fencing import FenceBook, FencingToken, accept_result
from populi_peer.core.holder import (
    AttemptEnded,
    BecomeClaim,
    EndOutcome,
    ExtendDeadline,
    HolderAction,
    HolderConfig,
    HolderEvent,
    HolderMachine,
    NotStarted,
    RenewAnswered,
    RenewRefused,
    RenewUnanswered,
    SendRelease,
    SendRenewal,
    StartAttempt,
    StopAttempt,
    TimerFired,
)
from populi_peer.core.leases import (
    RESUMPTION_REASONS,
    TERMINAL_STATES,
    GrantRequest,
    Lease,
    LeaseNotFound,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    ReportNeeded,
    TargetView,
    renew_timeout_s,
)
from populi_peer.core.reports import FullReport, NodeReporter, ReportAnswer, ReportMessage
from populi_peer.testing.election_sim import SimulationFailure

#: Timings scaled down: a 6 s lease, renewed every 2 s, stopped 1.5 s before its deadline.
SIM_LEASES = LeaseSettings(max_lease_ttl_s=6.0, expiry_margin_s=1.0)
TTL_S = 6.0
STOP_MARGIN_S = 1.5
CLAIM_LEAD_S = 0.5
KILL_S = 0.3  # SIGTERM to gone, at worst
HEARTBEAT_S = 0.5
REQUEST_TIMEOUT_S = 1.0
WALL0 = 1_700_000_000_000
#: A seed runs a few thousand events; far more means something spins.
MAX_EVENTS = 1_000_000


class LeaseSimulationFailure(SimulationFailure):
    """A lease rule failed. ``seed`` replays it; ``trace`` is the last events."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    nodes: int = 3
    gpus_per_node: int = 2
    tasks: int = 10
    #: Share of tasks that run on their own node (remote off / pinned here).
    local_share: float = 0.4
    submit_within_s: float = 60.0
    duration_s: tuple[float, float] = (1.0, 15.0)
    run_s: float = 100.0
    drop: float = 0.03
    #: Chance that a message between nodes (a handoff, a result) arrives twice, the copy late.
    duplicate: float = 0.03
    delay_s: tuple[float, float] = (0.002, 0.05)
    long_delay: float = 0.02
    long_delay_s: tuple[float, float] = (0.3, 2.5)
    #: Mean time between control-plane crashes, and how long it stays down.
    crash_every_s: float = 25.0
    down_s: tuple[float, float] = (0.5, 8.0)
    #: Share of crashes that are failovers: another voter leads at the next term, with none
    #: of the old leader's leases (leases are not replicated records, ADR 0011) and a token
    #: counter of its own; the election guarantees the old authority ended first.
    failover: float = 0.35
    #: Mean time between cuts of one node from the control plane, and their length.
    cut_every_s: float = 15.0
    cut_s: tuple[float, float] = (1.0, 12.0)
    #: Chance that a node's next full report is lost, at each fault.
    lose_full_report: float = 0.5
    #: Chance that a restarted control plane's store lacks the leases granted in the last
    #: ``forget_s`` before the crash (a store restored from an older copy; the token
    #: counter survives): it learns them from the reports, or never renews them.
    forget: float = 0.3
    forget_s: float = 4.0
    #: Mean time between a submitter falling asleep (messages to it lost), and how long.
    sleep_every_s: float = 30.0
    sleep_s: tuple[float, float] = (2.0, 15.0)
    #: Clock rates of the nodes (the control plane's is 1).
    rate: tuple[float, float] = (0.998, 1.002)


@dataclass
class Proc:
    """One task process on a node, as its supervisor runs it (real simulation time)."""

    node: str
    key: AttemptKey
    task_id: str
    token: FencingToken
    gpus: tuple[str, ...]
    started: float
    natural_end: float
    deadline_local: float | None
    stopping_at: float | None = None
    ended_at: float | None = None
    outcome: str = ""

    @property
    def running(self) -> bool:
        return self.ended_at is None


@dataclass
class SimTask:
    task_id: str
    owner: str
    duration_s: float
    local: bool
    target: str | None = None
    state: str = "new"  # new, granting, remote, fallback_pending, local, done
    requests: int = 0
    token: FencingToken | None = None
    lease_id: str | None = None
    last_node: str | None = None
    #: A fallback request whose answer never came: (attempt number, GPUs).
    unanswered: tuple[int, tuple[str, ...]] | None = None
    done_at: float | None = None
    gen: int = 0


@dataclass
class SimNode:
    node_id: str
    gpus: tuple[str, ...]
    rate: float
    offset: float
    book: NodeBook
    reporter: NodeReporter
    fences: FenceBook = field(default_factory=FenceBook)
    holders: dict[AttemptKey, HolderMachine] = field(default_factory=dict)
    holder_gen: dict[AttemptKey, int] = field(default_factory=dict)
    procs: dict[AttemptKey, Proc] = field(default_factory=dict)
    #: Results not yet acknowledged by their submitter: key -> (submitter, token, outcome).
    results: dict[AttemptKey, tuple[str, FencingToken, str]] = field(default_factory=dict)
    cut_until: float = -math.inf
    asleep_until: float = -math.inf
    lose_next_full: bool = False

    def local(self, real: float) -> float:
        return self.offset + real * self.rate

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate


class ControlPlane:
    """The control plane's shell: the table, its store (what survives a crash), its clock."""

    def __init__(self) -> None:
        self.table: LeaseTable | None = LeaseTable.new(SIM_LEASES, incarnation_id="i0")
        self.store: dict[str, dict[str, Any]] = {}
        self.next_seq = 1
        self.incarnations = 0
        #: The election term of the leader that holds the role (a failover raises it).
        self.term = 1
        self.started_at = 0.0
        self.offset = 1000.0
        self.ids = 0
        self.timer_gen = 0

    @property
    def up(self) -> bool:
        return self.table is not None

    def mono(self, real: float) -> float:
        return self.offset + (real - self.started_at)

    def persist(self, records: tuple[Lease, ...] | list[Lease], table: LeaseTable) -> None:
        for lease in records:
            self.store[lease.lease_id] = lease.to_json()
        self.next_seq = table.next_seq
        self.table = table

    def lease_id(self) -> str:
        self.ids += 1
        return f"L{self.incarnations}.{self.ids}"


class LeaseSimulation:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or SimConfig()
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.trace: deque[str] = deque(maxlen=120)
        self.cp = ControlPlane()
        self.nodes: dict[str, SimNode] = {}
        self.tasks: dict[str, SimTask] = {}
        self.procs: list[Proc] = []
        self.terminal_seen: dict[tuple[int, str], str] = {}
        self.started_tokens: dict[str, list[FencingToken]] = {}
        self.stats: dict[str, int] = {}
        self.claim_ids = 0
        self.durations: dict[tuple[AttemptKey, str], float] = {}
        self.restarts: list[float] = []
        self.healed = False
        c = self.config
        for i in range(c.nodes):
            node_id = f"n{i}"
            self.nodes[node_id] = SimNode(
                node_id,
                tuple(f"{node_id}-g{k}" for k in range(c.gpus_per_node)),
                self.rng.uniform(*c.rate),
                self.rng.uniform(0, 5000),
                NodeBook(node_id),
                NodeReporter(node_id, epoch=1),
            )
        for i in range(c.tasks):
            self.add_task(
                f"t{i}",
                self.rng.choice(sorted(self.nodes)),
                duration_s=self.rng.uniform(*c.duration_s),
                local=self.rng.random() < c.local_share,
                at=self.rng.uniform(0.0, c.submit_within_s),
            )
        for node in self.nodes.values():
            self.at(self.rng.uniform(0, HEARTBEAT_S), partial(self.heartbeat, node))
        self.at(self._exp(c.crash_every_s), self._random_crash)
        self.at(self._exp(c.cut_every_s), self._random_cut)
        self.at(self._exp(c.sleep_every_s), self._random_sleep)

    def add_task(
        self,
        task_id: str,
        owner: str,
        *,
        duration_s: float,
        local: bool,
        at: float,
        target: str | None = None,
    ) -> SimTask:
        """Submit a task on ``owner`` at ``at``: ``local`` runs it on its own node (remote
        execution off / pinned here); otherwise on ``target`` (default: a random other
        node, each placement)."""
        task = SimTask(task_id, owner, duration_s, local, target=target)
        self.tasks[task_id] = task
        self.at(at, partial(self.submit, task))
        return task

    # -- plumbing -----------------------------------------------------------------------------

    def _exp(self, mean: float) -> float:
        return self.rng.expovariate(1 / mean) if math.isfinite(mean) else math.inf

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def at(self, when: float, fn: Callable[[], None]) -> None:
        if math.isfinite(when):
            self.seq += 1
            heapq.heappush(self.queue, (max(when, self.now), self.seq, fn))

    def note(self, text: str) -> None:
        self.trace.append(f"{self.now:9.3f} {text}")

    def fail(self, message: str) -> None:
        raise LeaseSimulationFailure(self.seed, message, "\n".join(self.trace))

    def delay(self) -> float:
        c = self.config
        if self.rng.random() < c.long_delay:
            return self.rng.uniform(*c.long_delay_s)
        return self.rng.uniform(*c.delay_s)

    def linked(self, node: SimNode) -> bool:
        return self.now >= node.cut_until

    def to_cp(
        self, node: SimNode, what: str, handle: Callable[[], Any], reply: Callable[[Any], None]
    ) -> None:
        """A request from ``node`` to the control plane; ``reply`` gets its answer (not
        called when the request or the answer is lost)."""
        if not self.linked(node) or self.rng.random() < self.config.drop:
            self.note(f"{node.node_id} -> cp {what}: lost")
            return

        def arrive() -> None:
            if not self.cp.up or not self.linked(node):
                self.note(f"{node.node_id} -> cp {what}: nobody there")
                return
            answer = handle()
            term = self.cp.term
            if not self.linked(node) or self.rng.random() < self.config.drop:
                self.note(f"cp -> {node.node_id} {what}: answer lost")
                return

            def deliver() -> None:
                # A node that reported to term T takes no control-plane answer from a lower
                # term (a deposed leader's): as if it never came.
                if term < node.reporter.highest_term:
                    self.count("stale_term_answers")
                    self.note(f"{node.node_id} ignores {what} from term {term}")
                    return
                reply(answer)

            self.at(self.now + self.delay(), deliver)

        self.at(self.now + self.delay(), arrive)

    def to_node(self, src: SimNode, dst: SimNode, what: str, fn: Callable[[], None]) -> None:
        if self.rng.random() < self.config.drop or self.now < dst.asleep_until:
            self.note(f"{src.node_id} -> {dst.node_id} {what}: lost")
            return

        def arrive() -> None:
            if self.now < dst.asleep_until:
                return
            fn()

        self.at(self.now + self.delay(), arrive)
        if self.rng.random() < self.config.duplicate:
            self.at(self.now + self.rng.uniform(*self.config.long_delay_s) * 4, arrive)

    # -- faults -------------------------------------------------------------------------------

    def _random_crash(self) -> None:
        c = self.config
        if self.now < c.run_s:
            self.at(self.now + self._exp(c.crash_every_s), self._random_crash)
        if self.cp.up:
            failover = self.rng.random() < c.failover
            forget = not failover and self.rng.random() < c.forget
            self.crash_cp(self.rng.uniform(*c.down_s), forget=forget, failover=failover)
            self._random_lost_report()

    def crash_cp(self, down_s: float, *, forget: bool = False, failover: bool = False) -> None:
        """The control plane dies and restarts ``down_s`` later (a new incarnation that
        keeps its store; with ``forget``, a store without the leases granted in the last
        ``forget_s``). With ``failover`` another voter leads instead, at the next term:
        it holds none of the old leader's leases and numbers its tokens from 1 in its own
        term. The election makes ``down_s`` at least the old authority's remaining lease
        (ADR 0011); answers the old leader gave before it went stay in flight."""
        if not self.cp.up:
            return
        self.cp.table = None
        self.count("cp_crashes")
        self.note("CONTROL PLANE CRASHED")
        if failover:
            self.count("failovers")
            self.cp.store = {}
            self.cp.next_seq = 1
            self.cp.term += 1
            self.note(f"a new leader is elected at term {self.cp.term}; it holds no lease")
            self.at(self.now + down_s, self.restart_cp)
            return
        if forget:
            cutoff = int((self.now - self.config.forget_s) * 1000) + WALL0
            lost = [
                lease_id
                for lease_id, body in self.cp.store.items()
                if body["state"] in ("live", "revoking") and int(body["granted_wall_ms"]) > cutoff
            ]
            for lease_id in lost:
                del self.cp.store[lease_id]
            if lost:
                self.count("leases_forgotten", len(lost))
                self.note(f"the store forgets {lost}")
        self.at(self.now + down_s, self.restart_cp)

    def restart_cp(self) -> None:
        cp = self.cp
        if cp.up:
            return
        cp.incarnations += 1
        cp.started_at = self.now
        cp.offset = self.rng.uniform(0, 5000)  # a new process: another clock origin
        leases = [Lease.from_json(body) for body in cp.store.values()]
        cp.table = LeaseTable.restore(
            leases,
            term=cp.term,
            next_seq=cp.next_seq,
            settings=SIM_LEASES,
            now_mono=cp.mono(self.now),
            incarnation_id=f"i{cp.incarnations}",
            # A new leader cannot know that no lease exists: it always resumes per node.
            resume=cp.next_seq > 1 or cp.term > 1,
        )
        self.restarts.append(self.now)
        self.note(f"CONTROL PLANE RESTARTED as {cp.table.incarnation} with {len(leases)} leases")
        self.cp_timer()

    def _random_cut(self) -> None:
        c = self.config
        if self.now < c.run_s:
            self.at(self.now + self._exp(c.cut_every_s), self._random_cut)
        self.cut(self.rng.choice(sorted(self.nodes)), self.rng.uniform(*c.cut_s))
        self._random_lost_report()

    def cut(self, node_id: str, seconds: float) -> None:
        """``node_id`` and the control plane cannot reach each other for ``seconds``."""
        node = self.nodes[node_id]
        node.cut_until = max(node.cut_until, self.now + seconds)
        self.count("cuts")
        self.note(f"{node_id} cut off from the control plane until {node.cut_until:.3f}")

    def _random_sleep(self) -> None:
        c = self.config
        if self.now < c.run_s:
            self.at(self.now + self._exp(c.sleep_every_s), self._random_sleep)
        self.sleep(self.rng.choice(sorted(self.nodes)), self.rng.uniform(*c.sleep_s))

    def sleep(self, node_id: str, seconds: float) -> None:
        """Nothing from other nodes reaches ``node_id`` for ``seconds`` (results wait)."""
        node = self.nodes[node_id]
        node.asleep_until = max(node.asleep_until, self.now + seconds)
        self.note(f"{node_id} asleep until {node.asleep_until:.3f}")

    def _random_lost_report(self) -> None:
        if self.rng.random() < self.config.lose_full_report:
            self.lose_next_full_report(self.rng.choice(sorted(self.nodes)))

    def lose_next_full_report(self, node_id: str) -> None:
        self.nodes[node_id].lose_next_full = True

    # -- the control plane ----------------------------------------------------------------------

    def cp_call(self, fn: Callable[[LeaseTable, float, int], tuple[LeaseTable, Any]]) -> Any:
        """Run one table operation on the control plane, persist its records, and return
        ``("ok", result)`` or ``("refused", reasons)`` / ``("wait", reasons)``."""
        table = self.cp.table
        assert table is not None
        now_mono = self.cp.mono(self.now)
        wall = int(self.now * 1000) + WALL0
        try:
            new, result = fn(table, now_mono, wall)
        except ReportNeeded:
            return ("wait", ("report_needed",))
        except LeaseNotFound as exc:
            return ("refused", tuple(exc.details.get("reasons") or ("lease_not_found",)))
        except LeaseRefused as exc:
            kind = "wait" if set(exc.reasons) & RESUMPTION_REASONS else "refused"
            return (kind, exc.reasons)
        records = getattr(result, "records", ())
        self.cp.persist(records, new)
        self.check_store()
        self.cp_timer()
        return ("ok", result)

    def cp_timer(self) -> None:
        table = self.cp.table
        if table is None:
            return
        due = table.next_deadline()
        if due is None:
            return
        self.cp.timer_gen += 1
        gen = self.cp.timer_gen
        when = self.cp.started_at + (due - self.cp.offset)

        def fire() -> None:
            table = self.cp.table
            if table is None or self.cp.timer_gen != gen:
                return
            wall = int(self.now * 1000) + WALL0
            # The timer fired: the clock reads at least what it was set for (no float
            # round trip through simulation time can make it early).
            now_mono = max(self.cp.mono(self.now), due)
            new, expired = table.expire_due(now_mono=now_mono, now_wall_ms=wall)
            if expired:
                self.note(f"cp expired {[x.lease_id for x in expired]}")
                self.count("expired", len(expired))
            self.cp.persist(expired, new)
            self.check_store()
            self.cp_timer()

        self.at(when, fire)

    def view(self, node_id: str) -> TargetView:
        return TargetView(node_id, eligible=True, allocatable_gpus=self.nodes[node_id].gpus)

    # -- submitting --------------------------------------------------------------------------

    def submit(self, task: SimTask) -> None:
        self.note(f"submit {task.task_id} on {task.owner} ({'local' if task.local else 'remote'})")
        if task.local:
            self.place_local(task)
        else:
            self.place_remote(task)

    def retry(self, task: SimTask, after: float, fn: Callable[[SimTask], None]) -> None:
        task.gen += 1
        gen = task.gen

        def again() -> None:
            if task.gen == gen and task.state != "done":
                fn(task)

        self.at(self.now + after, again)

    def ask_grant(
        self,
        node: SimNode,
        task: SimTask,
        what: str,
        handle: Callable[[], Any],
        *,
        granted: Callable[[Lease], None],
        refused: Callable[[str, Any], None],
        unanswered: Callable[[], None],
    ) -> None:
        """``task``'s current grant request from ``node`` (:meth:`to_cp`): its answer goes to
        ``granted`` (the lease) or ``refused`` (the answer's kind and body), or, with none
        by :data:`REQUEST_TIMEOUT_S`, ``unanswered`` is called; each only while the task
        still waits for this very request."""
        attempt = task.requests
        answered = False

        def current() -> bool:
            return task.state == "granting" and task.requests == attempt

        def reply(answer: Any) -> None:
            nonlocal answered
            answered = True
            if not current():
                return
            kind, body = answer
            if kind == "ok":
                granted(body.lease)
            else:
                refused(kind, body)

        def timeout() -> None:
            if not answered and current():
                unanswered()

        self.to_cp(node, what, handle, reply)
        self.at(self.now + REQUEST_TIMEOUT_S, timeout)

    def place_remote(self, task: SimTask) -> None:
        owner = self.nodes[task.owner]
        others = sorted(n for n in self.nodes if n != task.owner)
        target = task.target or self.rng.choice(others)
        task.requests += 1
        attempt = task.requests
        task.state = "granting"
        request = GrantRequest(
            task_id=task.task_id,
            attempt=attempt,
            work_class="agent",
            target=target,
            gpus_wanted=1,
            ttl_s=TTL_S,
            submitter=task.owner,
            previous_node=task.last_node,
        )
        lease_id = self.cp.lease_id()

        def handle() -> Any:
            return self.cp_call(
                lambda t, m, w: t.grant(
                    request, now_mono=m, now_wall_ms=w, lease_id=lease_id, target=self.view(target)
                )
            )

        def granted(lease: Lease) -> None:
            task.state, task.token, task.lease_id = "remote", lease.token, lease.lease_id
            task.last_node = target
            self.note(f"{task.task_id} granted {lease.lease_id} {lease.token} on {target}")
            self.handoff(task, lease)
            self.retry(task, 3.0, self.ask_fallback)

        def refused(kind: str, body: Any) -> None:
            if kind == "wait" or "no_free_gpu" in body:
                self.retry(task, 0.5, self.place_remote)
            else:
                task.last_node = target
                task.state = "fallback_pending"
                self.retry(task, 0.5, self.ask_fallback)

        def unanswered() -> None:
            # It may have been granted: only the control plane's word frees the task.
            task.last_node = target
            task.state = "fallback_pending"
            self.ask_fallback(task)

        self.ask_grant(
            owner,
            task,
            f"grant {task.task_id}#{attempt}",
            handle,
            granted=granted,
            refused=refused,
            unanswered=unanswered,
        )

    def handoff(self, task: SimTask, lease: Lease) -> None:
        owner, worker = self.nodes[task.owner], self.nodes[lease.holder]
        attempt = NodeAttempt(
            "worker",
            task.task_id,
            lease.attempt,
            lease.token,
            lease.gpus,
            "accepted",
            lease=LeaseTerms(lease.lease_id, "remote", task.owner, lease.ttl_s, "agent"),
        )
        self.to_node(
            owner,
            worker,
            f"handoff {task.task_id}",
            lambda: self.on_handoff(worker, attempt, task.duration_s),
        )

    def ask_fallback(self, task: SimTask) -> None:
        """Is the remote attempt dead? The control plane's word, with a higher token."""
        if task.state not in ("remote", "fallback_pending"):
            return
        owner = self.nodes[task.owner]
        if task.unanswered is not None:
            # The answer to the last one was lost: the same request again, answered as a
            # replay if it took effect (ADR 0007) — a new number would find its fence.
            attempt, gpus = task.unanswered
        else:
            free = [g for g in owner.gpus if g not in owner.book.gpus_in_use()]
            gpus = (free[0],) if free else ()
            task.requests += 1
            attempt = task.requests
            task.unanswered = (attempt, gpus)
        lease_id = self.cp.lease_id()

        def handle() -> Any:
            return self.cp_call(
                lambda t, m, w: t.confirm_dead_for_fallback(
                    task.task_id,
                    submitter=task.owner,
                    attempt=attempt,
                    gpus=gpus,
                    local_node=task.owner,
                    ttl_s=TTL_S,
                    lease_id=lease_id,
                    now_mono=m,
                    now_wall_ms=w,
                    work_class="agent",
                    previous_node=task.last_node,
                )
            )

        def reply(answer: Any) -> None:
            kind, body = answer
            if task.unanswered is not None and task.unanswered[0] == attempt:
                task.unanswered = None
            if task.state not in ("remote", "fallback_pending") or kind != "ok":
                return
            lease = body.lease
            self.note(f"{task.task_id} fallback confirmed: {lease.lease_id} {lease.token}")
            self.count("fallbacks")
            self.run_local(task, lease, may_claim=True)

        self.to_cp(owner, f"fallback {task.task_id}#{attempt}", handle, reply)
        self.retry(task, 1.0 if task.state == "fallback_pending" else 3.0, self.ask_fallback)

    def place_local(self, task: SimTask) -> None:
        """A task that runs on its own node: a local lease, or a claim if no control plane
        answers (local work never waits for an unreachable one)."""
        owner = self.nodes[task.owner]
        task.requests += 1
        attempt = task.requests
        task.state = "granting"
        lease_id = self.cp.lease_id()

        def handle() -> Any:
            return self.cp_call(
                lambda t, m, w: t.local_grant(
                    task.task_id,
                    submitter=task.owner,
                    attempt=attempt,
                    work_class="agent",
                    gpus_wanted=1,
                    ttl_s=TTL_S,
                    target=self.view(task.owner),
                    lease_id=lease_id,
                    now_mono=m,
                    now_wall_ms=w,
                    previous_node=task.last_node,
                )
            )

        def granted(lease: Lease) -> None:
            self.run_local(task, lease, may_claim=True)

        def refused(kind: str, body: Any) -> None:
            self.retry(task, 0.5, self.place_local)

        self.ask_grant(
            owner,
            task,
            f"local grant {task.task_id}#{attempt}",
            handle,
            granted=granted,
            refused=refused,
            unanswered=partial(self.claim_and_run, task),
        )

    def claim_and_run(self, task: SimTask) -> None:
        owner = self.nodes[task.owner]
        self.claim_ids += 1
        owner.book, decision = owner.book.claim_free_gpus(
            task_id=task.task_id,
            attempt=task.requests,
            gpus_wanted=1,
            verified=owner.gpus,
            claim_id=f"C{self.claim_ids}",
            made_wall_ms=int(self.now * 1000),
        )
        attempt = owner.book.get(("local", task.task_id, task.requests))
        if not decision.ok or attempt is None:
            task.state = "new"
            self.retry(task, 0.5, self.place_local)
            return
        self.count("claims")
        self.note(f"{owner.node_id} claims {attempt.gpus} for {task.task_id} (no control plane)")
        task.state, task.token, task.lease_id = "local", attempt.token, None
        task.last_node = task.owner
        self.spawn(owner, attempt, task.duration_s, deadline_local=None)

    def run_local(self, task: SimTask, lease: Lease, *, may_claim: bool) -> None:
        """``task`` runs on its own node under the local ``lease`` it was granted."""
        task.state, task.token, task.lease_id = "local", lease.token, lease.lease_id
        task.last_node = task.owner
        owner = self.nodes[task.owner]
        attempt = NodeAttempt(
            "local",
            task.task_id,
            lease.attempt,
            lease.token,
            lease.gpus,
            "accepted",
            lease=LeaseTerms(lease.lease_id, lease.kind, task.owner, lease.ttl_s, "agent"),
        )
        owner.book, decision = owner.book.accept(attempt)
        if not decision.ok:
            task.state = "fallback_pending"
            self.retry(task, 0.5, self.ask_fallback)
            return
        if lease.kind == "fence":
            owner.book, started = owner.book.start(attempt.key)
            if started.ok:
                self.spawn(owner, attempt, task.duration_s, deadline_local=None)
            return
        config = HolderConfig(TTL_S, STOP_MARGIN_S, may_claim=may_claim, claim_lead_s=CLAIM_LEAD_S)
        machine, actions = HolderMachine.begin(config, owner.local(self.now))
        owner.holders[attempt.key] = machine
        self.holder_actions(owner, attempt.key, actions)

    # -- the worker ------------------------------------------------------------------------

    def on_handoff(self, worker: SimNode, attempt: NodeAttempt, duration_s: float) -> None:
        fences, verdict = worker.fences.check_handoff(attempt.task_id, attempt.token)
        if verdict != "start":
            return
        worker.fences = fences
        worker.book, decision = worker.book.accept(attempt)
        if not decision.ok:
            self.count("handoffs_refused_claimed")
            self.note(
                f"{worker.node_id} refuses {attempt.task_id} {attempt.token}: {decision.reasons}"
            )
            return
        self.durations[attempt.key, worker.node_id] = duration_s
        config = HolderConfig(TTL_S, STOP_MARGIN_S)
        machine, actions = HolderMachine.begin(config, worker.local(self.now))
        worker.holders[attempt.key] = machine
        self.holder_actions(worker, attempt.key, actions)

    def holder_event(
        self, node: SimNode, key: AttemptKey, event: HolderEvent, *, at_least: float = -math.inf
    ) -> None:
        machine = node.holders.get(key)
        if machine is None:
            return
        machine, actions = machine.handle(event, max(node.local(self.now), at_least))
        node.holders[key] = machine
        self.holder_actions(node, key, actions)

    def holder_actions(
        self, node: SimNode, key: AttemptKey, actions: tuple[HolderAction, ...]
    ) -> None:
        attempt = node.book.get(key)
        for action in actions:
            self.note(f"{node.node_id} {key[1]}#{key[2]} {type(action).__name__} {action}")
            if isinstance(action, SendRenewal):
                self.send_renewal(node, key, action)
            elif isinstance(action, StartAttempt):
                if action.deadline is None:
                    continue  # started under the claim BecomeClaim made
                node.book, decision = node.book.start(key)
                attempt = node.book.get(key)
                if decision.ok and attempt is not None:
                    self.spawn(node, attempt, self.duration_of(node, key), action.deadline)
                else:
                    self.count("starts_refused")
                    self.note(f"{node.node_id} refuses to start {key}: {decision.reasons}")
                    self.holder_event(node, key, AttemptEnded("stopped"))
                    self.attempt_over(node, key, "not_started")
            elif isinstance(action, ExtendDeadline):
                proc = node.procs.get(key)
                if proc is not None and proc.deadline_local is not None:
                    proc.deadline_local = action.deadline
                    self.supervise(node, proc)
            elif isinstance(action, BecomeClaim):
                self.become_claim(node, key)
            elif isinstance(action, StopAttempt):
                proc = node.procs.get(key)
                if proc is not None:
                    self.stop(node, proc, action.reason)
            elif isinstance(action, NotStarted):
                node.book = node.book.end(key, "stopped")
                self.attempt_over(node, key, "not_started")
            elif isinstance(action, SendRelease):
                self.send_release(node, key, action.outcome)
        self.holder_timer(node, key)

    def become_claim(self, node: SimNode, key: AttemptKey) -> None:
        attempt = node.book.get(key)
        if attempt is None:
            return
        self.claim_ids += 1
        claim_id = f"C{self.claim_ids}"
        if attempt.phase == "accepted":
            # Its proof went unanswered: it starts under a claim instead of waiting.
            node.book, decision = node.book.claim_before_start(
                key, claim_id=claim_id, made_wall_ms=int(self.now * 1000)
            )
            started = node.book.get(key)
            if not decision.ok or started is None:
                node.book = node.book.end(key, "stopped")
                self.holder_event(node, key, AttemptEnded("stopped"))
                self.attempt_over(node, key, "not_started")
                return
            self.count("claims")
            self.spawn(node, started, self.duration_of(node, key), deadline_local=None)
            return
        node.book, decision = node.book.convert_to_claim(
            key, claim_id=claim_id, made_wall_ms=int(self.now * 1000)
        )
        proc = node.procs.get(key)
        if decision.ok and proc is not None and proc.stopping_at is None:
            self.count("claims_converted")
            proc.deadline_local = None  # the supervisor's lease deadline is lifted

    def duration_of(self, node: SimNode, key: AttemptKey) -> float:
        if key[0] == "worker":
            return self.durations.get((key, node.node_id), 1.0)
        return self.tasks[key[1]].duration_s

    def holder_timer(self, node: SimNode, key: AttemptKey) -> None:
        machine = node.holders.get(key)
        if machine is None:
            return
        due = machine.next_deadline()
        gen = node.holder_gen.get(key, 0) + 1
        node.holder_gen[key] = gen
        if due is None:
            return

        def fire() -> None:
            if node.holder_gen.get(key) == gen:
                # A timer fires when the clock reads at least what it was set for (as
                # trio.move_on_at does): no float round trip can make it early and spin.
                self.holder_event(node, key, TimerFired(), at_least=due)

        self.at(node.real(due), fire)

    def send_renewal(self, node: SimNode, key: AttemptKey, action: SendRenewal) -> None:
        attempt = node.book.get(key)
        if attempt is None or attempt.lease is None:
            return
        lease_id = attempt.lease.lease_id
        sent_at = action.sent_at
        done = [False]

        def handle() -> Any:
            return self.cp_call(
                lambda t, m, w: t.renew(
                    lease_id,
                    node.node_id,
                    now_mono=m,
                    now_wall_ms=w,
                    before_start=action.before_start,
                )
            ), self.cp.table.incarnation if self.cp.table else None

        def reply(answer: Any) -> None:
            (kind, body), incarnation = answer
            if done[0]:
                return
            done[0] = True
            if incarnation is not None:
                node.reporter, _ = node.reporter.observe(incarnation)
            if kind == "ok":
                self.holder_event(node, key, RenewAnswered(sent_at, body.lease.ttl_s))
            elif kind == "refused":
                self.holder_event(node, key, RenewRefused(sent_at, body[0]))
            else:
                self.holder_event(node, key, RenewUnanswered(sent_at))

        def timeout() -> None:
            if not done[0]:
                done[0] = True
                self.holder_event(node, key, RenewUnanswered(sent_at))

        self.to_cp(node, f"renew {lease_id}", handle, reply)
        self.at(self.now + renew_timeout_s(TTL_S), timeout)

    def send_release(self, node: SimNode, key: AttemptKey, outcome: EndOutcome) -> None:
        attempt = node.book.get(key)
        if attempt is None or attempt.lease is None:
            return
        lease_id = attempt.lease.lease_id

        def handle() -> Any:
            return self.cp_call(
                lambda t, m, w: t.release(
                    lease_id, node.node_id, outcome=outcome, now_mono=m, now_wall_ms=w
                )
            )

        def reply(answer: Any) -> None:
            kind, body = answer
            if kind == "ok" or (kind == "refused" and body and str(body[0]).startswith("lease_")):
                node.book = node.book.release_acknowledged(lease_id)

        self.to_cp(node, f"release {lease_id} {outcome}", handle, reply)

    # -- task processes (the supervisors) ------------------------------------------------------

    def spawn(
        self, node: SimNode, attempt: NodeAttempt, duration_s: float, deadline_local: float | None
    ) -> None:
        if deadline_local is not None and node.local(self.now) >= deadline_local - STOP_MARGIN_S:
            # Too close to its deadline: the supervisor never starts it.
            node.book = node.book.end(attempt.key, "stopped")
            self.holder_event(node, attempt.key, AttemptEnded("stopped"))
            self.attempt_over(node, attempt.key, "not_started")
            return
        proc = Proc(
            node.node_id, attempt.key, attempt.task_id, attempt.token, attempt.gpus, self.now,
            self.now + duration_s, deadline_local,
        )  # fmt: skip
        self.check_start(node, proc)
        node.procs[attempt.key] = proc
        self.procs.append(proc)
        self.count("starts")
        self.note(
            f"START {attempt.task_id}#{attempt.attempt} {attempt.token} on {node.node_id} {attempt.gpus}"
        )
        self.at(proc.natural_end, lambda: self.natural_end(node, proc))
        self.supervise(node, proc)

    def supervise(self, node: SimNode, proc: Proc) -> None:
        if proc.deadline_local is None:
            return
        stop_local = proc.deadline_local - STOP_MARGIN_S
        deadline = proc.deadline_local

        def check() -> None:
            if proc.running and proc.stopping_at is None and proc.deadline_local == deadline:
                self.stop(node, proc, "deadline")

        self.at(node.real(stop_local), check)

    def natural_end(self, node: SimNode, proc: Proc) -> None:
        if proc.running and proc.stopping_at is None:
            self.end_proc(node, proc, "completed")

    def stop(self, node: SimNode, proc: Proc, reason: str) -> None:
        if not proc.running or proc.stopping_at is not None:
            return
        proc.stopping_at = self.now
        self.note(f"stopping {proc.task_id} {proc.token} on {node.node_id}: {reason}")
        self.at(
            self.now + self.rng.uniform(0.0, KILL_S), lambda: self.end_proc(node, proc, "stopped")
        )

    def end_proc(self, node: SimNode, proc: Proc, outcome: str) -> None:
        if not proc.running:
            return
        proc.ended_at, proc.outcome = self.now, outcome
        self.note(f"END {proc.task_id} {proc.token} on {node.node_id}: {outcome}")
        node.procs.pop(proc.key, None)
        node.book = node.book.end(proc.key, "completed" if outcome == "completed" else "stopped")
        if proc.key in node.holders:
            self.holder_event(
                node, proc.key, AttemptEnded("completed" if outcome == "completed" else "stopped")
            )
        self.attempt_over(node, proc.key, outcome)

    def attempt_over(self, node: SimNode, key: AttemptKey, outcome: str) -> None:
        role, task_id, _ = key
        task = self.tasks[task_id]
        attempt = node.book.get(key)
        token = attempt.token if attempt is not None else None
        if role == "worker":
            if token is None:
                token = node.fences.highest(task_id) or NO_LEASE_TOKEN
            node.results[key] = (task.owner, token, outcome)
            self.deliver(node, key)
            return
        if task.state != "local" or (token is not None and task.token != token):
            return
        if outcome == "completed":
            self.task_done(task)
        else:
            task.state = "fallback_pending"
            self.retry(task, 0.5, self.ask_fallback if task.last_node else self.place_local)

    def deliver(self, node: SimNode, key: AttemptKey) -> None:
        if key not in node.results:
            return
        owner_id, token, outcome = node.results[key]
        owner = self.nodes[owner_id]

        def arrive() -> None:
            task = self.tasks[key[1]]
            if task.state != "done" and accept_result(task.token, token):
                if outcome == "completed":
                    self.task_done(task)
                elif task.state == "remote":
                    task.state = "fallback_pending"
                    self.retry(task, 0.2, self.ask_fallback)
            self.to_node(owner, node, "result ack", lambda: node.results.pop(key, None) and None)

        self.to_node(node, owner, f"result {key[1]} {outcome}", arrive)
        self.at(self.now + 1.0, lambda: self.deliver(node, key))

    def task_done(self, task: SimTask) -> None:
        if task.state == "done":
            return
        task.state, task.done_at = "done", self.now
        task.gen += 1
        self.count("tasks_done")
        self.note(f"TASK {task.task_id} DONE")

    # -- heartbeats and reports ------------------------------------------------------------------

    def heartbeat(self, node: SimNode) -> None:
        if self.now < self.config.run_s + 60:
            self.at(self.now + HEARTBEAT_S, lambda: self.heartbeat(node))
        node.reporter, message = node.reporter.outgoing(node.book.holdings())
        if isinstance(message, FullReport):
            self.count("full_reports")
            if node.lose_next_full:
                node.lose_next_full = False
                self.count("full_reports_lost")
                self.note(f"{node.node_id} full report #{message.seq} LOST on purpose")
                return
        sent: ReportMessage | None = message

        def handle() -> Any:
            table = self.cp.table
            assert table is not None
            if sent is None:
                return None, table.incarnation
            kind, result = self.cp_call(lambda t, m, w: t.receive(sent, now_mono=m, now_wall_ms=w))
            assert kind == "ok", result
            answer: ReportAnswer = result.answer
            if answer.status == "full_report_needed":
                self.count("gaps")
            self.count("learned", len(result.learned.adopted))
            self.count("ends_recorded", len(result.learned.recorded))
            return answer, table.incarnation

        def reply(body: Any) -> None:
            answer, incarnation = body
            node.reporter, accepted = node.reporter.observe(incarnation)
            if answer is None or not accepted:
                return
            node.reporter, effect = node.reporter.answer(answer)
            for lease_id in effect.ended_acknowledged:
                node.book = node.book.release_acknowledged(lease_id)
            for refused in effect.refused:
                node.book, stop = node.book.refused_by_control_plane(refused.lease_id)
                attempt = node.book.by_lease(refused.lease_id)
                if stop and attempt is not None and attempt.key in node.procs:
                    self.stop(node, node.procs[attempt.key], refused.reason)

        self.to_cp(node, "heartbeat", handle, reply)

    # -- the invariants ----------------------------------------------------------------------------

    def check_start(self, node: SimNode, proc: Proc) -> None:
        tokens = self.started_tokens.setdefault(proc.task_id, [])
        if tokens and not (proc.token > tokens[-1]):
            self.fail(f"rule 2: {proc.task_id} starts {proc.token} after {tokens}")
        highest = node.fences.highest(proc.task_id)
        if proc.key[0] == "worker" and highest is not None and proc.token < highest:
            self.fail(f"rule 2: {node.node_id} starts {proc.token} below its fence {highest}")
        tokens.append(proc.token)

    def check_store(self) -> None:
        # Per leader's store: a new leader never saw what the old one ended, and may learn
        # a lease from a node's report that the old one expired (a claim's attempt still
        # running on its own node); rules 1-3, checked on the processes, still hold.
        for lease_id, body in self.cp.store.items():
            state = str(body["state"])
            key = (self.cp.term, lease_id)
            seen = self.terminal_seen.get(key)
            if seen is not None and seen != state:
                self.fail(f"rule 4: lease {lease_id} was {seen}, now {state}")
            if state in TERMINAL_STATES:
                self.terminal_seen[key] = state

    def check(self) -> None:
        gpus: dict[tuple[str, str], Proc] = {}
        tasks: dict[str, Proc] = {}
        for node in self.nodes.values():
            for proc in node.procs.values():
                for gpu in proc.gpus:
                    other = gpus.get((node.node_id, gpu))
                    if other is not None:
                        self.fail(
                            f"GPU {node.node_id}/{gpu} runs {other.task_id} and {proc.task_id}"
                        )
                    gpus[(node.node_id, gpu)] = proc
                other = tasks.get(proc.task_id)
                if other is not None:
                    self.fail(f"rule 1: {proc.task_id} runs on {other.node} and {proc.node}")
                tasks[proc.task_id] = proc
            problem = node.book.invariant_violation()
            if problem is not None:
                self.fail(f"{node.node_id}'s book: {problem}")
        table = self.cp.table
        if table is not None:
            problem = table.invariant_violation()
            if problem is not None:
                self.fail(f"lease table: {problem}")

    # -- running -------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        end = self.config.run_s + 60.0
        events = 0
        while self.queue:
            when, _, fn = heapq.heappop(self.queue)
            if when > end:
                break
            events += 1
            if events > MAX_EVENTS:
                # A machine asked for a timer it then did nothing with, again and again.
                self.fail(f"event storm: {events} events by t={when:.3f}")
            self.now = when
            if self.now > self.config.run_s and not self.healed:
                # The tail: the network heals so that every task can finish.
                self.healed = True
                if not self.cp.up:
                    self.restart_cp()
                self.config = replace(self.config, drop=0.0, long_delay=0.0, duplicate=0.0)
            fn()
            self.check()
        self.count("tasks", len(self.tasks))
        self.count("events", events)
        self.count(
            "reruns_after_completion",
            sum(
                1
                for task_id in self.tasks
                if any(
                    later.started > done.ended_at
                    for done in self.procs
                    if done.task_id == task_id and done.outcome == "completed" and done.ended_at
                    for later in self.procs
                    if later.task_id == task_id
                )
            ),
        )
        return dict(self.stats)


def config_for(seed: int) -> SimConfig:
    """A third of the seeds each: the default mix; contended (one GPU per node, mostly
    local work, nodes often cut off: claims race grants); heavy faults (frequent
    restarts, stores that forget, lossy and slow links)."""
    kind = seed % 3
    if kind == 1:
        return SimConfig(
            nodes=2 + seed % 2, gpus_per_node=1, local_share=0.6, cut_every_s=8.0, tasks=10
        )
    if kind == 2:
        return SimConfig(crash_every_s=12.0, forget=0.6, drop=0.08, long_delay=0.05)
    return SimConfig()


def run_seed(seed: int, config: SimConfig | None = None) -> dict[str, int]:
    """Run one seeded scenario; raises :class:`LeaseSimulationFailure` if a rule broke."""
    return LeaseSimulation(seed, config or config_for(seed)).run()


__all__ = [
    "SIM_LEASES",
    "LeaseSimulation",
    "LeaseSimulationFailure",
    "SimConfig",
    "config_for",
    "run_seed",
]
