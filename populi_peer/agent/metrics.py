"""Prometheus metrics on their own plain-HTTP listener (``[metrics]``, default
``127.0.0.1:7432``), served with ``prometheus-client``.

Two kinds of figure:

- **counted as they happen**, from the API app's answers (``ApiApp.observers``): every
  operation this node answered by status and reason code, and from it lease grants,
  renewals and refusals by reason (on the control plane), and confirmed fallbacks by the
  state of the lease they follow (``lease_expired``, ``lease_revoked``...; ``no_lease``
  when the task never held one);
- **read when scraped** (a custom collector, nothing kept twice): nodes by lifecycle
  state and staleness, GPUs by health and allocatability, leases by state, heartbeat age
  per node, the term, hint gossip (rounds, exchanges, refusals by reason, lag of the last
  hint received) and this node's running attempts.

The listener is not authenticated (it says only counts and states, never a command, an
environment or output): keep it on loopback or a monitoring network. A listen address
that cannot be bound makes the node degraded (``metrics``), never stops it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from populi_peer.agent.gossip import HintGossip
from populi_peer.agent.health import Health
from populi_peer.api.server import with_lifespan
from populi_peer.config import MetricsConfig, format_host_port, parse_host_port, reach_host
from populi_peer.core.leases import LEASE_STATES
from populi_peer.core.messages import LeaseFallbackAnswer, Message
from populi_peer.core.tasks import Task
from populi_peer.log import get_logger, log

#: Operations whose answers count as lease decisions (control plane).
_LEASE_OPERATIONS = {
    "lease_grant": "grants",
    "lease_renew": "renewals",
    "lease_release": "releases",
}


@dataclass(frozen=True)
class NodeFigures:
    """What the collector reads of the node when scraped (the composition root binds
    these to the agent's services)."""

    node_id: str
    is_control_plane: Callable[[], bool]
    term: Callable[[], int]
    #: (node id, lifecycle state or "unknown", stale) of every node this node knows.
    nodes: Callable[[], Iterable[tuple[str, str, bool]]]
    #: (node id, health, allocatable) of every GPU this node holds a view of.
    gpus: Callable[[], Iterable[tuple[str, str, bool]]]
    #: Lease states of the control plane's table (empty elsewhere).
    lease_states: Callable[[], Iterable[str]]
    #: (node id, heartbeat age in seconds) on the control plane.
    heartbeat_ages_s: Callable[[], Iterable[tuple[str, float]]]
    running_attempts: Callable[[], int]


@dataclass(kw_only=True, eq=False, repr=False)
class Metrics(Collector):
    config: MetricsConfig
    figures: NodeFigures
    gossip: HintGossip
    health: Health
    logger: ClassVar[logging.Logger] = get_logger("metrics")

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.lease_decisions: Counter[tuple[str, str, str]] = Counter()
        self.fallbacks: Counter[str] = Counter()
        #: Finished tasks submitted here, by end state: per-bucket counts and the sum of
        #: their durations (created to finished), for ``populi_task_duration_seconds``.
        self.task_buckets: dict[str, list[int]] = {}
        self.task_seconds: dict[str, float] = {}
        #: ``http://host:port/metrics`` once bound (``populi status --json``).
        self.url: str | None = None

    # -- counted as they happen -------------------------------------------------------------

    def observe(
        self, operation: str, status: int, answer: Message | None, code: str | None
    ) -> None:
        """``ApiApp.observers``: one answered request. Never raises."""
        self.requests[(operation or "unmatched", str(status), code or "")] += 1
        kind = _LEASE_OPERATIONS.get(operation)
        if kind is not None:
            outcome = "ok" if status == 200 else "refused"
            self.lease_decisions[(kind, outcome, code or "")] += 1
        if operation == "lease_fallback" and isinstance(answer, LeaseFallbackAnswer):
            prior = answer.prior
            self.fallbacks["no_lease" if prior is None else f"lease_{prior.lease.state}"] += 1

    def task_finished(self, task: Task) -> None:
        """``Submitter.finished_listeners``: one task submitted here ended. Never raises."""
        end = task.finished_wall_ms if task.finished_wall_ms is not None else task.created_wall_ms
        seconds = max(0.0, (end - task.created_wall_ms) / 1000)
        buckets = self.task_buckets.setdefault(task.state, [0] * len(TASK_DURATION_BUCKETS_S))
        for i, bound in enumerate(TASK_DURATION_BUCKETS_S):
            if seconds <= bound:
                buckets[i] += 1
        self.task_seconds[task.state] = self.task_seconds.get(task.state, 0.0) + seconds

    # -- read when scraped --------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        yield _labelled(
            CounterMetricFamily,
            "populi_api_requests",
            "Requests this node answered, by operation, HTTP status and reason code",
            ["operation", "status", "code"],
            sorted(self.requests.items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "populi_lease_decisions",
            "Lease grants, renewals and releases this control plane answered, by outcome "
            "and refusal reason",
            ["decision", "outcome", "reason"],
            sorted(self.lease_decisions.items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "populi_fallbacks",
            "Fallbacks to a local attempt this control plane confirmed, by the state of the "
            "lease they follow",
            ["reason"],
            (((reason,), count) for reason, count in sorted(self.fallbacks.items())),
        )
        yield _labelled(
            GaugeMetricFamily,
            "populi_nodes",
            "Nodes this node knows, by lifecycle state and heartbeat staleness",
            ["state", "stale"],
            sorted(Counter((state, str(stale).lower()) for _, state, stale in f.nodes()).items()),
        )
        yield _labelled(
            GaugeMetricFamily,
            "populi_gpus",
            "GPUs this node holds a view of, by health and allocatability",
            ["health", "allocatable"],
            sorted(Counter((h, str(a).lower()) for _, h, a in f.gpus()).items()),
        )
        held = Counter(f.lease_states())
        yield _labelled(
            GaugeMetricFamily,
            "populi_leases",
            "Leases in the control plane's table, by state",
            ["state"],
            (((state,), held.get(state, 0)) for state in LEASE_STATES)
            if f.is_control_plane()
            else (),
        )
        yield _labelled(
            GaugeMetricFamily,
            "populi_heartbeat_age_seconds",
            "Seconds since the control plane last heard each node",
            ["node"],
            (((node,), age_s) for node, age_s in sorted(f.heartbeat_ages_s())),
        )
        yield GaugeMetricFamily("populi_term", "The control-plane term this node is in", f.term())
        yield GaugeMetricFamily(
            "populi_control_plane",
            "1 on the node that is the control plane",
            int(f.is_control_plane()),
        )
        yield GaugeMetricFamily(
            "populi_running_attempts", "Attempts running on this node", f.running_attempts()
        )
        yield from self._gossip()

    def _gossip(self) -> Iterator[Metric]:
        stats = self.gossip.stats
        yield CounterMetricFamily(
            "populi_gossip_rounds", "Hint gossip rounds this node ran", stats.rounds
        )
        yield _labelled(
            CounterMetricFamily,
            "populi_gossip_exchanges",
            "Push-pull exchanges this node started, by outcome",
            ["outcome"],
            [(("ok",), stats.exchanges_ok), (("failed",), stats.exchanges_failed)],
        )
        yield _labelled(
            CounterMetricFamily,
            "populi_gossip_refused",
            "Hint records refused, by reason",
            ["reason"],
            (((reason,), count) for reason, count in sorted(stats.refused.items())),
        )
        durations = HistogramMetricFamily(
            "populi_task_duration_seconds",
            "Tasks submitted on this node, from submission to their end, by end state",
            labels=["state"],
        )
        for state, counts in sorted(self.task_buckets.items()):
            durations.add_metric(
                [state],
                buckets=[
                    (_bound(b), count)
                    for b, count in zip(TASK_DURATION_BUCKETS_S, counts, strict=True)
                ],
                sum_value=self.task_seconds[state],
            )
        yield durations
        yield CounterMetricFamily(
            "populi_gossip_published", "Hints this node signed about itself", stats.published
        )
        yield GaugeMetricFamily(
            "populi_gossip_hints", "Hint records this node holds", len(self.gossip.state.records)
        )
        if stats.last_lag_s is not None:
            yield GaugeMetricFamily(
                "populi_gossip_lag_seconds",
                "Convergence lag: seconds from signing to arrival of the last new hint received",
                stats.last_lag_s,
            )

    # -- the listener -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``/metrics`` until cancelled; a bind failure leaves the node degraded."""
        host, port = parse_host_port(self.config.listen)
        hconfig = HypercornConfig()
        hconfig.bind = [format_host_port(host, port)]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("populi.http")
        hconfig.graceful_timeout = 1.0
        app = with_lifespan(make_asgi_app(self.registry))
        started = False
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    lambda task_status: serve(
                        app, hconfig, shutdown_trigger=trio.sleep_forever, task_status=task_status
                    )
                )
                bound_host, bound_port = parse_host_port(binds[0].removeprefix("http://"))
                self.url = f"http://{format_host_port(reach_host(bound_host), bound_port)}/metrics"
                self.health.ok("metrics")
                log(self.logger, logging.INFO, "metrics listening", url=self.url)
                started = True
                task_status.started()
        except* OSError as group:
            # The port is taken (another agent on this machine), or the address is not this
            # host's: the node runs on without /metrics, degraded, and says why.
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            self.url = None
            self.health.failed("metrics", exc)
            log(
                self.logger,
                logging.ERROR,
                "metrics listener not started",
                listen=self.config.listen,
                error=str(exc),
            )
            if not started:
                task_status.started()


#: Upper bounds of the task-duration buckets, in seconds (the last one is +Inf).
TASK_DURATION_BUCKETS_S: Final = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, math.inf)


def _labelled(
    family: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: list[str],
    samples: Iterable[tuple[tuple[str, ...], float]],
) -> Metric:
    """A counter or gauge family with one sample per ``(label values, value)``."""
    metric = family(name, documentation, labels=labels)
    for values, value in samples:
        metric.add_metric(list(values), value)
    return metric


def _bound(seconds: float) -> str:
    return "+Inf" if math.isinf(seconds) else f"{seconds:g}"


__all__ = ["Metrics", "NodeFigures"]
