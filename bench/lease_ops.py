"""Lease operations of one control plane: grant, renew and release per second, and the
p50/p99 latency of each, over real, signed HTTPS against a real ``populi agent``. Prints
figures; never passes or fails on them.

    python bench/lease_ops.py [--concurrency 1,4,16] [--repeat 1] [--window-s 10]

How it works:

- A fresh single-node cluster in a temporary folder; its ``populi agent`` is the control
  plane (started and enrolled into exactly as ``bench/heartbeat_capacity.py`` does, whose
  helpers this script imports), with ``remote_exec_enabled`` set to true.
- Simulated nodes (roles worker and submit, the token default) enroll the way ``populi
  join`` does. Each concurrent stream has its own submitter and its own target node. A
  node is a placement target only while its heartbeats are fresh, so every simulated node
  heartbeats at 1 Hz from a separate process (``heartbeat_capacity.py``'s generator mode);
  its heartbeat p99 in the same window is printed too ("hb p99").
- The lease load comes from ``--generators`` separate processes (this script in its
  generator mode), so the client is not the thing measured. A stream runs cycles back to
  back, each on a fresh task id: ``POST /v1/populi/exec/leases`` (attempt 1, work class
  ``agent``, ``gpus_wanted`` 0, ``ttl_s`` 30) signed by the submitter, then ``.../renew``
  and ``.../release`` (``completed``) signed by the target, the lease's holder. Each node
  has its own keep-alive HTTP/1.1 connection and signs with its own key.
- A grant and a release each write the lease in one SQLite transaction with
  ``synchronous=FULL`` (an fsync) before the answer; a renewal writes nothing (ADR 0006,
  decision 5). The header prints what one such commit costs on this disk.
- Rates count operations that completed inside the measured window (after the warm-up);
  latencies are from just before the request is sent to the parsed answer (monotonic
  clock) for operations sent in the window. A cycle is grant + renew + release, all three
  successful; its latency is from the grant's send to the release's answer.
- CPU % is from ``/proc/<pid>/stat`` over the window (100 % = one core); "host %" is the
  whole machine's busy share (100 % = every core). "table" is how many leases the control
  plane's table held when the step began: completed leases are kept (they hold their task
  key), so the table grows with every cycle; ``--repeat`` reruns the last step to show
  what that growth costs.
- Last, the pure lease table (``populi_peer.core.leases.LeaseTable``) alone, in this
  process, at ``--table-sizes`` leases: microseconds per grant, renew and release, and per
  pass of what the lease service's loop does after each of them. It shows how a cycle's
  cost grows with the number of leases the control plane has ever granted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# ``python bench/lease_ops.py`` puts bench/ first on sys.path: the heartbeat benchmark's
# control-plane, enrollment and measuring helpers are shared, not copied.
import heartbeat_capacity as hb
import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from populi_peer import __version__
from populi_peer.api.client import SignedAuth, decode_response, encode_body
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.core.leases import GrantRequest, LeaseSettings, LeaseTable, TargetView
from populi_peer.errors import PopuliError
from populi_peer.identity import Credential

LEASES = "/v1/populi/exec/leases"
OPS = ("grant", "renew", "release")
TTL_S = 30
#: Between the heartbeat keeper's start and the first grant: every node has beaten once.
FIRST_BEAT_S = 1.5


# -- generator mode (a separate process) ----------------------------------------------------


@dataclass
class _Stats:
    ops: dict[str, list[tuple[float, float]]]  # op -> (sent, done), successful only
    cycles: list[tuple[float, float]]  # (grant sent, release done)
    errors: Counter[str]
    warmup_errors: Counter[str]
    grants: int = 0  # every successful grant, warm-up included (= leases added to the table)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    if isinstance(exc, PopuliError):
        reasons = exc.details.get("reasons")
        if isinstance(reasons, list) and reasons:
            return f"{exc.code}:{reasons[0]}"
        return exc.code
    raise exc


async def _stream(
    index: int,
    submitter: httpx.AsyncClient,
    holder: httpx.AsyncClient,
    target_id: str,
    prefix: str,
    times: dict[str, float],
    stats: _Stats,
) -> None:
    async def op(name: str, client: httpx.AsyncClient, path: str, payload: dict[str, Any]) -> Any:
        sent = time.monotonic()
        try:
            response = await client.post(
                path, content=encode_body(payload), headers=hb.JSON_HEADERS
            )
            answer = decode_response(response, peer="control plane")
        except (httpx.HTTPError, PopuliError) as exc:
            errors = stats.errors if times["from"] <= sent < times["to"] else stats.warmup_errors
            errors[f"{name} {_failure(exc)}"] += 1
            return None, sent, time.monotonic()
        done = time.monotonic()
        stats.ops[name].append((sent, done))
        return answer, sent, done

    await hb._sleep_until_mono(times["start"])
    cycle = 0
    while time.monotonic() < times["to"]:
        cycle += 1
        grant, began, _ = await op(
            "grant",
            submitter,
            LEASES,
            {
                "task_id": f"{prefix}-{index}-{cycle}",
                "attempt": 1,
                "work_class": "agent",
                "target": target_id,
                "gpus_wanted": 0,
                "ttl_s": TTL_S,
            },
        )
        if grant is None:
            await trio.sleep(0.05)  # a refusal is quick: do not spin on it
            continue
        stats.grants += 1
        lease_id = grant["lease"]["lease_id"]
        renewed, _, _ = await op("renew", holder, f"{LEASES}/{lease_id}/renew", {})
        # Release even after a failed renewal: no lease is left to expire on its own.
        released, _, ended = await op(
            "release", holder, f"{LEASES}/{lease_id}/release", {"outcome": "completed"}
        )
        if renewed is not None and released is not None:
            stats.cycles.append((began, ended))


async def _generate(
    streams: list[dict[str, Any]],
    clients: list[tuple[httpx.AsyncClient, httpx.AsyncClient]],
    times: dict[str, float],
    prefix: str,
) -> _Stats:
    stats = _Stats({name: [] for name in OPS}, [], Counter(), Counter())
    try:
        async with trio.open_nursery() as nursery:
            for stream, (submitter, holder) in zip(streams, clients, strict=True):
                nursery.start_soon(
                    _stream,
                    stream["index"],
                    submitter,
                    holder,
                    stream["target"][0],
                    prefix,
                    times,
                    stats,
                )
    finally:
        with trio.CancelScope(shield=True):
            for pair in clients:
                for client in pair:
                    await client.aclose()
    return stats


def _client(spec: dict[str, Any], node: list[str], context: Any) -> httpx.AsyncClient:
    node_id, key_hex = node[0], node[1]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
    return httpx.AsyncClient(
        base_url=spec["url"],
        transport=httpx.AsyncHTTPTransport(
            verify=context, retries=0, limits=httpx.Limits(max_connections=1)
        ),
        auth=SignedAuth(Credential(node_id, key), spec["cp_node_id"], SystemClock()),
        timeout=spec["timeout_s"],
    )


def generator_main() -> None:
    """Read the spec (one JSON line), say ready, read the times, run cycles, print figures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by pid
    spec = json.loads(sys.stdin.readline())
    context = client_context(Path(spec["ca"]))
    clients = [
        (_client(spec, s["submitter"], context), _client(spec, s["target"], context))
        for s in spec["streams"]
    ]
    print("ready", flush=True)
    times = json.loads(sys.stdin.readline())
    stats = trio.run(_generate, spec["streams"], clients, times, spec["prefix"])
    json.dump(
        {
            "ops": stats.ops,
            "cycles": stats.cycles,
            "errors": dict(stats.errors),
            "warmup_errors": dict(stats.warmup_errors),
            "grants": stats.grants,
        },
        sys.stdout,
    )
    sys.stdout.flush()


# -- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpFigures:
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Row:
    concurrency: int
    table: int
    cycles: OpFigures
    ops: dict[str, OpFigures]
    cp_cpu: float
    gen_cpu: float
    hb_rate: float
    hb_p99_ms: float
    host_busy: float
    errors: Counter[str]


def _figures(pairs: list[tuple[float, float]], lo: float, hi: float) -> OpFigures:
    done_in = sum(1 for _, done in pairs if lo <= done < hi)
    latencies = sorted(done - sent for sent, done in pairs if lo <= sent < hi)
    return OpFigures(
        rate=done_in / (hi - lo),
        p50_ms=hb._pct(latencies, 0.50) * 1000,
        p99_ms=hb._pct(latencies, 0.99) * 1000,
    )


class LeaseBench(hb.Bench):
    """The heartbeat benchmark's process and folder ownership, with lease load."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, prefix="populi-lease-bench-")
        self.grants = 0

    def enable_remote_exec(self) -> None:
        subprocess.run(
            [
                *hb.POPULI,
                "settings",
                "set",
                "remote_exec_enabled",
                "true",
                "--data-dir",
                str(self.data_dir),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def _spawn_piped(self, argv: list[str], log_name: str) -> subprocess.Popen[Any]:
        err = (self.root / log_name).open("ab")
        try:
            return self._spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        finally:
            err.close()

    def _await_ready(self, proc: subprocess.Popen[Any], log_name: str) -> None:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            log = (self.root / log_name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{log_name} did not start: {log}")

    def _collect(self, proc: subprocess.Popen[Any], log_name: str) -> dict[str, Any]:
        assert proc.stdout is not None
        raw = proc.stdout.read()
        if proc.wait() != 0 or not raw:
            log = (self.root / log_name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{log_name} failed: {log}")
        self.procs.remove(proc)
        self._stop(proc, grace_s=1.0)
        return dict(json.loads(raw))

    def measure_step(self, concurrency: int, step: int) -> Row:
        assert self.agent is not None
        args = self.args
        self.enroll_up_to(2 * concurrency)
        pairs = [(self.nodes[2 * i], self.nodes[2 * i + 1]) for i in range(concurrency)]
        keeper = self._spawn_piped(
            [sys.executable, hb.__file__, "--generator"], f"keeper-{step}.log"
        )
        hb._write_line(
            keeper.stdin,
            {
                "url": self.url,
                "cp_node_id": self.cp_node_id,
                "ca": str(self.data_dir / "tls" / "ca.crt"),
                "timeout_s": args.timeout_s,
                "seed": secrets.randbits(32),
                "nodes": [[n.node_id, n.key_hex, n.address] for pair in pairs for n in pair],
            },
        )
        count = max(1, min(args.generators, concurrency))
        generators = []
        for g in range(count):
            proc = self._spawn_piped(
                [sys.executable, os.path.abspath(__file__), "--generator"],
                f"generator-{step}-{g}.log",
            )
            hb._write_line(
                proc.stdin,
                {
                    "url": self.url,
                    "cp_node_id": self.cp_node_id,
                    "ca": str(self.data_dir / "tls" / "ca.crt"),
                    "timeout_s": args.timeout_s,
                    "prefix": f"t{step}g{g}",
                    "streams": [
                        {
                            "index": i,
                            "submitter": [s.node_id, s.key_hex],
                            "target": [t.node_id, t.key_hex],
                        }
                        for i, (s, t) in enumerate(pairs)
                        if i % count == g
                    ],
                },
            )
            generators.append(proc)
        self._await_ready(keeper, f"keeper-{step}.log")
        for g, proc in enumerate(generators):
            self._await_ready(proc, f"generator-{step}-{g}.log")
        beat_start = time.monotonic() + 0.2
        start = beat_start + FIRST_BEAT_S
        times = {"start": start, "from": start + args.warmup_s}
        times["to"] = times["from"] + args.window_s
        hb._write_line(keeper.stdin, {**times, "start": beat_start})
        for proc in generators:
            hb._write_line(proc.stdin, times)
        pids = [p.pid for p in generators]
        hb._sleep_until(times["from"])
        start_cpu = hb.CpuWindow.take(self.agent.pid, [*pids, keeper.pid])
        hb._sleep_until(times["to"])
        cp_cpu, gen_cpu, host_busy = hb.CpuWindow.take(self.agent.pid, [*pids, keeper.pid]).since(
            start_cpu
        )
        table = self.grants
        ops: dict[str, list[tuple[float, float]]] = {name: [] for name in OPS}
        cycles: list[tuple[float, float]] = []
        errors: Counter[str] = Counter()
        for g, proc in enumerate(generators):
            result = self._collect(proc, f"generator-{step}-{g}.log")
            for name in OPS:
                ops[name] += [tuple(p) for p in result["ops"][name]]
            cycles += [tuple(p) for p in result["cycles"]]
            errors.update(result["errors"])
            self.warmup_errors.update(result["warmup_errors"])
            self.grants += int(result["grants"])
        beats = self._collect(keeper, f"keeper-{step}.log")
        for code, n in beats["errors"].items():
            errors[f"heartbeat {code}"] += n
        if self.agent.poll() is not None:
            raise RuntimeError(f"the agent exited under load: {self.agent_log_tail()}")
        lo, hi = times["from"], times["to"]
        return Row(
            concurrency=concurrency,
            table=table,
            cycles=_figures(cycles, lo, hi),
            ops={name: _figures(ops[name], lo, hi) for name in OPS},
            cp_cpu=cp_cpu,
            gen_cpu=gen_cpu,
            hb_rate=len(beats["latencies_s"]) / args.window_s,
            hb_p99_ms=hb._pct(sorted(beats["latencies_s"]), 0.99) * 1000,
            host_busy=host_busy,
            errors=errors,
        )


def _commit_cost_ms(folder: Path, commits: int = 40) -> tuple[float, float]:
    """p50/p99 of one small SQLite commit in WAL mode with ``synchronous=FULL`` in
    ``folder`` (the file system the control plane writes to): the disk's floor under
    every grant and release."""
    db = folder / "commit-probe.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        took = []
        for k in range(commits):
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, "x" * 600))
            conn.execute("COMMIT")
            took.append(time.perf_counter() - began)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    took.sort()
    return statistics.median(took) * 1000, hb._pct(took, 0.99) * 1000


# -- the control plane's lease table alone, in this process ------------------------------------


@dataclass(frozen=True, slots=True)
class TableRow:
    size: int
    cycles: int
    grant_us: float
    renew_us: float
    release_us: float
    wake_us: float


def _table_of(size: int) -> tuple[LeaseTable, LeaseSettings]:
    """A table holding ``size`` completed leases (what ``size`` finished cycles leave)."""
    settings = LeaseSettings()
    table = LeaseTable.new(settings)
    target = TargetView(node_id="n-target", eligible=True)
    table, _ = table.grant(
        GrantRequest("t-0", 1, "agent", "n-target", 0, TTL_S, "n-submitter"),
        now_mono=0.0,
        now_wall_ms=1,
        lease_id="l-0",
        target=target,
    )
    _, done = table.release("l-0", "n-target", outcome="completed", now_mono=0.0, now_wall_ms=1)
    template = done.lease
    leases = [
        replace(template, lease_id=f"l-{i}", task_id=f"t-{i}", token=replace(template.token, seq=i))
        for i in range(1, size + 1)
    ]
    restored = LeaseTable.restore(
        leases,
        term=1,
        next_seq=size + 1,
        settings=settings,
        now_mono=0.0,
        incarnation_id="bench",
        resume=False,  # every lease is finished: no node can hold GPUs it must report
    )
    return restored, settings


def table_costs(size: int, budget_s: float = 0.6) -> TableRow:
    """Per-cycle cost of the pure lease table at ``size`` leases: the grant, renew and
    release the routes call, and the work ``LeaseService.run`` does each time a commit
    wakes it (``expire_due``, the reconcile pass over holding leases, ``next_deadline``)."""
    table, _ = _table_of(size)
    target = TargetView(node_id="n-target", eligible=True)
    took = {"grant": 0.0, "renew": 0.0, "release": 0.0, "wake": 0.0}
    clock = time.perf_counter
    began = clock()
    cycles = 0
    while cycles < 5 or (clock() - began < budget_s and cycles < 2000):
        cycles += 1
        now = 1.0 + cycles * 1e-3
        lease_id = f"l-bench-{cycles}"
        t0 = clock()
        table, _ = table.grant(
            GrantRequest(f"t-bench-{cycles}", 1, "agent", "n-target", 0, TTL_S, "n-submitter"),
            now_mono=now,
            now_wall_ms=2,
            lease_id=lease_id,
            target=target,
        )
        t1 = clock()
        table, _ = table.renew(lease_id, "n-target", now_mono=now, now_wall_ms=2)
        t2 = clock()
        table, _ = table.release(
            lease_id, "n-target", outcome="completed", now_mono=now, now_wall_ms=2
        )
        t3 = clock()
        table, _ = table.expire_due(now_mono=now, now_wall_ms=2)
        statuses = {lease.holder: "ok" for lease in table.holding()}
        table, _ = table.reconcile(statuses, auto_revoke=False, now_mono=now, now_wall_ms=2)  # type: ignore[arg-type]
        table.next_deadline()
        t4 = clock()
        for name, spent in zip(took, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            took[name] += spent
    per = {name: 1e6 * spent / cycles for name, spent in took.items()}
    return TableRow(size, cycles, per["grant"], per["renew"], per["release"], per["wake"])


def print_table_costs(sizes: list[int]) -> None:
    print()
    print(
        "the lease table alone (pure core, in this process, no HTTP or SQLite): microseconds "
        "per operation at a table of N leases; 'wake' = what the lease service's loop does "
        "after every commit (expire_due, reconcile over holding leases, next_deadline)"
    )
    print(
        f"{'N':>7} {'cycles':>6} {'grant':>9} {'renew':>9} {'release':>9} {'wake':>9} {'cycle':>9}"
    )
    rows = [table_costs(size) for size in sizes]
    for row in rows:
        total = row.grant_us + row.renew_us + row.release_us + 3 * row.wake_us
        print(
            f"{row.size:>7} {row.cycles:>6} {row.grant_us:>9.0f} {row.renew_us:>9.0f} "
            f"{row.release_us:>9.0f} {row.wake_us:>9.0f} {total:>9.0f}"
        )
    if len(rows) >= 2 and rows[-1].size > rows[0].size:
        first, last = rows[0], rows[-1]
        slope = (
            (last.grant_us + last.renew_us + last.release_us + 3 * last.wake_us)
            - (first.grant_us + first.renew_us + first.release_us + 3 * first.wake_us)
        ) / (last.size - first.size)
        print(
            "'cycle' = grant + renew + release + one wake per operation (every commit and "
            "every renewal kicks the loop; under load several share one wake). From "
            f"N={first.size} to N={last.size}: +{slope * 1000:.0f} us per cycle per 1000 "
            "leases. Completed leases are never removed (they keep their task key), so N is "
            "every task the cluster has ever run remotely or with a token"
        )


COLUMNS = (
    f"{'conc':>4} {'table':>6} {'cyc/s':>6} {'grant/s':>7} {'renew/s':>7} {'rel/s':>6}  "
    f"{'grant p50/p99':>13} {'renew p50/p99':>13} {'rel p50/p99':>13} {'cycle p50/p99':>13}  "
    f"{'CP CPU%':>7} {'CP ms/cyc':>9} {'gen CPU%':>8} {'hb/s':>4} {'hb p99':>6} {'host %':>6}  errors"
)


def _lat(f: OpFigures) -> str:
    return f"{f.p50_ms:>6.1f}/{f.p99_ms:<6.1f}"


def _format(row: Row) -> str:
    per_cycle = row.cp_cpu * 10.0 / row.cycles.rate if row.cycles.rate else float("nan")
    errors = ", ".join(f"{k}={v}" for k, v in sorted(row.errors.items())) or "0"
    grant, renew, release = (row.ops[name] for name in OPS)
    return (
        f"{row.concurrency:>4} {row.table:>6} {row.cycles.rate:>6.1f} {grant.rate:>7.1f} "
        f"{renew.rate:>7.1f} {release.rate:>6.1f}  {_lat(grant):>13} {_lat(renew):>13} "
        f"{_lat(release):>13} {_lat(row.cycles):>13}  {row.cp_cpu:>7.1f} {per_cycle:>9.2f} "
        f"{row.gen_cpu:>8.1f} {row.hb_rate:>4.0f} {row.hb_p99_ms:>6.1f} {row.host_busy:>6.1f}  {errors}"
    )


def run(args: argparse.Namespace) -> None:
    bench = LeaseBench(args)
    try:
        background = hb._background_busy()
        commit_p50, commit_p99 = _commit_cost_ms(bench.root)
        bench.start_control_plane()
        bench.enable_remote_exec()
        print(
            f"lease operations: one control plane (populi agent {__version__}, {bench.url}), "
            f"{os.cpu_count()} CPU cores shared by it, up to {args.generators} lease-generator "
            "processes and one heartbeat process"
        )
        print(
            f"python {sys.version.split()[0]}, trio {trio.__version__}, httpx {httpx.__version__}; "
            "signed HTTPS, HTTP/1.1 keep-alive, one connection per simulated node; a cycle = "
            f"grant (gpus_wanted 0, ttl {TTL_S} s, work class agent) + renew + release "
            f"(completed); warm-up {args.warmup_s:g} s, window {args.window_s:g} s per step; "
            "control plane logs at warning level"
        )
        print(
            "durability: every grant and every release is one SQLite commit with "
            "synchronous=FULL (WAL, fsync) before the answer; renewals write nothing. "
            f"One such commit on this disk: p50 {commit_p50:.2f} ms, p99 {commit_p99:.2f} ms "
            f"(the commit runs on the agent's event loop: at most ~{1000 / commit_p50 / 2:.0f} "
            "cycles/s from the disk alone)"
        )
        print(
            f"other load on this machine before the start: {background:.0f} % of all cores "
            "(it competes with the control plane and the generators)"
        )
        print(
            "rates: operations/s completed in the window; latencies in ms; CPU % of one core; "
            "host % of all cores; gen CPU% = the lease generators and the heartbeat process; "
            "hb/s and hb p99 = the simulated nodes' heartbeats in the same "
            "window (the control plane's CPU, and CP ms/cyc, include serving them)"
        )
        print(COLUMNS, flush=True)
        steps = [*args.concurrency, *([args.concurrency[-1]] * args.repeat)]
        rows = []
        for step, concurrency in enumerate(steps):
            row = bench.measure_step(concurrency, step)
            rows.append(row)
            print(_format(row), flush=True)
        print()
        print(f"leases in the control plane's table at the end: {bench.grants}")
        hb.print_setup_summary(bench)
        best = max(rows, key=lambda r: r.cycles.rate)
        print(
            f"best: {best.cycles.rate:.1f} cycles/s at concurrency {best.concurrency} "
            f"({best.ops['grant'].rate + best.ops['renew'].rate + best.ops['release'].rate:.0f} "
            f"lease requests/s), control plane at {best.cp_cpu:.0f} % of a core"
        )
        hb._print_agent_log(bench)
    finally:
        bench.close()
    if args.table_sizes:
        print_table_costs(args.table_sizes)


def _numbers(text: str, low: int, example: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers, e.g. {example}") from None
    if values and min(values) < low:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers >= {low}, e.g. {example}")
    return values


def _concurrency(text: str) -> list[int]:
    values = _numbers(text, 1, "1,4,16")
    if not values:
        raise argparse.ArgumentTypeError("give at least one concurrency, e.g. 1,4,16")
    return values


def _sizes(text: str) -> list[int]:
    return _numbers(text, 0, "0,1000,10000")


def main() -> None:
    if "--generator" in sys.argv[1:]:
        generator_main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=[1, 4, 16],
        help="concurrent cycle streams per step, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rerun the last step this many times (default 1)"
    )
    parser.add_argument("--window-s", type=float, default=10.0, help="measured window per step")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="warm-up before each window")
    parser.add_argument(
        "--generators", type=int, default=2, help="lease-generator processes (default 2)"
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, help="request timeout")
    parser.add_argument(
        "--table-sizes",
        type=_sizes,
        default=[0, 1000, 10000, 50000],
        help="table sizes for the in-process table costs (default 0,1000,10000,50000; "
        "'' skips them)",
    )
    args = parser.parse_args()
    if args.generators < 1 or args.repeat < 0 or args.window_s <= 0 or args.warmup_s < 0:
        parser.error("need --generators >= 1, --repeat >= 0, --window-s > 0, --warmup-s >= 0")
    hb.run_interruptible(run, args)


if __name__ == "__main__":
    main()
