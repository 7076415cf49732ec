"""Heartbeat capacity of one control plane: N simulated nodes heartbeat at 1 Hz over real,
signed HTTPS against a real ``populi agent``. Prints, for each N, the heartbeats/s achieved,
p50/p99 latency and the CPU % of the control plane and of the load generator, then the
largest N at 1 Hz with p99 < 100 ms. Prints figures; never passes or fails on them.

    python bench/heartbeat_capacity.py [--max-n 800] [--window-s 15] [--generators 2]

How it works:

- A fresh single-node cluster in a temporary folder; its ``populi agent`` is the control
  plane (join rate limit lifted, log at warning level, captured and summarised at the end).
- Simulated nodes enroll the way ``populi join`` does (challenge, proof of key possession,
  enroll), but keep their key and node id in memory: no data directory per node. They
  enroll as the sweep grows, so membership holds at least N nodes at every step.
- The load comes from ``--generators`` separate processes (this script in its generator
  mode), so the client is not the thing measured. Each simulated node has its own
  keep-alive HTTP/1.1 connection, signs every request with its own key, beats every 1 s
  from a random phase and, like a real node, adopts the serials the answer carries.
  Membership pulls a real node would make when the version moves are not simulated.
- Latency is from just before the request is sent to the parsed answer (monotonic clock),
  for beats sent in the measured window after the warm-up (connection set-up and the first
  answer, which carries the settings record, fall in the warm-up). "lag p99" is how late
  the generator sent beats against their schedule: when it grows, the generator is behind.
- CPU % is from ``/proc/<pid>/stat`` over the window (100 % = one core); "host %" is the
  whole machine's busy share (100 % = every core).

The sweep doubles N from ``--start-n`` up to ``--max-n`` and stops at the first N whose p99
reaches ``--p99-ms``, whose rate falls under 95 % of N or that sees any error; then it
bisects between the last good and the first bad N ``--refine`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from enrollment.keys import generate_key, node_id_for, public_to_text
from enrollment.tokens import JoinClaim, open_token, prove_join
from populi_peer import __version__
from populi_peer.api.client import SignedAuth, decode_response, encode_body
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.errors import PopuliError
from populi_peer.identity import Credential

POPULI = [sys.executable, "-m", "populi_peer"]
TICKS = os.sysconf("SC_CLK_TCK")
HEARTBEAT = "/v1/populi/heartbeat"
JSON_HEADERS = {"content-type": "application/json"}
TOKEN_MAX_USES = 1000
INTERVAL_S = 1.0
MIN_RATE_SHARE = 0.95


@dataclass(frozen=True, slots=True)
class SimNode:
    node_id: str
    key_hex: str  # raw Ed25519 private key
    address: str  # stable, so heartbeats never bump membership


@dataclass(frozen=True, slots=True)
class Row:
    n: int
    members: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float
    cp_cpu: float
    gen_cpu: float
    host_busy: float
    errors: Counter[str]

    def passes(self, p99_bound_ms: float) -> bool:
        return (
            not self.errors and self.rate >= MIN_RATE_SHARE * self.n and self.p99_ms < p99_bound_ms
        )


# -- measuring helpers ---------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


@dataclass(frozen=True)
class CpuWindow:
    """CPU use over a measured window: the control plane's and the load processes' ticks,
    and the whole host's, at its start and its end."""

    cp: int
    load: int
    host: tuple[int, int]
    at: float

    @classmethod
    def take(cls, cp_pid: int, load_pids: list[int]) -> CpuWindow:
        return cls(
            _cpu_ticks(cp_pid), sum(map(_cpu_ticks, load_pids)), _host_ticks(), time.monotonic()
        )

    def since(self, start: CpuWindow) -> tuple[float, float, float]:
        """(control plane % of one core, load processes % of one core, host % of all cores)."""
        wall = self.at - start.at
        return (
            100.0 * (self.cp - start.cp) / TICKS / wall,
            100.0 * (self.load - start.load) / TICKS / wall,
            100.0 * (self.host[0] - start.host[0]) / max(1, self.host[1] - start.host[1]),
        )


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _sleep_until(deadline_mono: float) -> None:
    delay = deadline_mono - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- generator mode (a separate process) ----------------------------------------------------


async def _sleep_until_mono(deadline: float) -> None:
    # trio's clock has its own offset; time.monotonic() is the clock shared by processes.
    await trio.sleep(max(0.0, deadline - time.monotonic()))


@dataclass
class _Stats:
    latencies_s: list[float]
    lags_s: list[float]
    errors: Counter[str]
    warmup_errors: Counter[str]


async def _beat_loop(
    client: httpx.AsyncClient,
    node: SimNode,
    times: dict[str, float],
    phase_s: float,
    stats: _Stats,
) -> None:
    serials = {"revocation_serial": -1, "membership_version": -1, "settings_serial": -1}
    born = time.monotonic()
    due = times["start"] + phase_s
    while due < times["to"]:
        await _sleep_until_mono(due)
        sent = time.monotonic()
        body = encode_body(
            {
                "status": "running",
                "addresses": [node.address],
                **serials,
                "registers": [],
                "version": __version__,
                "uptime_s": round(sent - born, 3),
            }
        )
        failure = None
        try:
            response = await client.post(HEARTBEAT, content=body, headers=JSON_HEADERS)
            answer = decode_response(response, peer="control plane")
        except httpx.TimeoutException:
            failure = "timeout"
        except httpx.HTTPError as exc:
            failure = type(exc).__name__
        except PopuliError as exc:
            failure = exc.code
        else:
            for name in serials:
                if isinstance(answer.get(name), int):
                    serials[name] = answer[name]
        done = time.monotonic()
        if times["from"] <= sent < times["to"]:
            stats.lags_s.append(sent - due)
            if failure is None:
                stats.latencies_s.append(done - sent)
            else:
                stats.errors[failure] += 1
        elif failure is not None:
            stats.warmup_errors[failure] += 1
        # A fixed 1 Hz schedule; an answer later than the next beat's time delays that beat.
        due = max(due + INTERVAL_S, done)


async def _generate(
    nodes: list[SimNode], clients: list[httpx.AsyncClient], times: dict[str, float], seed: int
) -> _Stats:
    rng = random.Random(seed)
    stats = _Stats([], [], Counter(), Counter())
    try:
        async with trio.open_nursery() as nursery:
            for node, client in zip(nodes, clients, strict=True):
                nursery.start_soon(
                    _beat_loop, client, node, times, rng.random() * INTERVAL_S, stats
                )
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()
    return stats


def generator_main() -> None:
    """Read the spec (one JSON line), say ready, read the times, beat, print the figures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by pid
    spec = json.loads(sys.stdin.readline())
    nodes = [SimNode(*row) for row in spec["nodes"]]
    context = client_context(Path(spec["ca"]))
    clock = SystemClock()
    clients = []
    for node in nodes:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(node.key_hex))
        clients.append(
            httpx.AsyncClient(
                base_url=spec["url"],
                transport=httpx.AsyncHTTPTransport(
                    verify=context, retries=0, limits=httpx.Limits(max_connections=1)
                ),
                auth=SignedAuth(Credential(node.node_id, key), spec["cp_node_id"], clock),
                timeout=spec["timeout_s"],
            )
        )
    print("ready", flush=True)
    times = json.loads(sys.stdin.readline())
    stats = trio.run(_generate, nodes, clients, times, spec["seed"])
    json.dump(
        {
            "latencies_s": stats.latencies_s,
            "lags_s": stats.lags_s,
            "errors": dict(stats.errors),
            "warmup_errors": dict(stats.warmup_errors),
        },
        sys.stdout,
    )
    sys.stdout.flush()


# -- the control plane and enrollment -------------------------------------------------------


class Bench:
    """Owns every process and folder it makes (its folder named after the benchmark by
    ``prefix``); ``close()`` removes them all."""

    def __init__(self, args: argparse.Namespace, prefix: str = "populi-hb-bench-") -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data_dir = self.root / "cp"
        self.procs: list[subprocess.Popen[Any]] = []
        self.agent: subprocess.Popen[Any] | None = None
        self.url = ""
        self.cp_node_id = ""
        self.tokens: list[tuple[str, str]] = []  # (text, token_id)
        self.nodes: list[SimNode] = []
        self.enroll_s = 0.0
        self.warmup_errors: Counter[str] = Counter()

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def _stop(self, proc: subprocess.Popen[Any], grace_s: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self._stop(proc, grace_s=10.0)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def start_control_plane(self) -> None:
        subprocess.run(
            [
                *POPULI,
                "init",
                "--cluster-name",
                "bench",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
            ],
            check=True,
            capture_output=True,
        )
        env = {
            **os.environ,
            "POPULI_SECURITY__JOIN_RATE_PER_MIN": "0",
            "POPULI_LOG__LEVEL": "warning",
            "POPULI_API__SHUTDOWN_GRACE_S": "2",
        }
        log = (self.root / "agent.log").open("wb")
        self.agent = self._spawn(
            [*POPULI, "agent", "--data-dir", str(self.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        runtime = self.data_dir / "run" / "agent.json"
        deadline = time.monotonic() + 60
        context = client_context(self.data_dir / "tls" / "ca.crt")
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.agent_log_tail()}")
            with contextlib.suppress(OSError, ValueError, KeyError, httpx.HTTPError):
                info = json.loads(runtime.read_text())
                self.url, self.cp_node_id = info["url"], info["node_id"]
                if httpx.get(self.url + "/v1/populi/health", verify=context, timeout=1).is_success:
                    return
            time.sleep(0.05)
        raise RuntimeError("the agent did not answer health within 60 s")

    def agent_log_tail(self, lines: int = 20) -> str:
        path = self.root / "agent.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def _token(self, index: int) -> tuple[str, str]:
        while len(self.tokens) <= index:
            out = subprocess.run(
                [
                    *POPULI,
                    "token",
                    "create",
                    "--data-dir",
                    str(self.data_dir),
                    "--uses",
                    str(TOKEN_MAX_USES),
                    "--json",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            answer = json.loads(out.stdout)
            self.tokens.append((answer["token"], answer["summary"]["token_id"]))
        return self.tokens[index]

    def enroll_up_to(self, n: int) -> None:
        first = len(self.nodes)
        if n <= first:
            return
        tokens = [self._token(i // TOKEN_MAX_USES) for i in range(first, n)]
        started = time.monotonic()
        self.nodes.extend(trio.run(self._enroll, first, tokens))
        self.enroll_s += time.monotonic() - started

    async def _enroll(self, first: int, tokens: list[tuple[str, str]]) -> list[SimNode]:
        transport = httpx.AsyncHTTPTransport(
            verify=client_context(self.data_dir / "tls" / "ca.crt"), retries=0
        )
        enrolled: dict[int, SimNode] = {}
        limiter = trio.CapacityLimiter(4)
        async with httpx.AsyncClient(base_url=self.url, transport=transport, timeout=60) as client:

            async def post(path: str, payload: dict[str, Any]) -> dict[str, Any]:
                response = await client.post(
                    path, content=encode_body(payload), headers=JSON_HEADERS
                )
                return decode_response(response, peer="control plane")

            async def one(index: int, token: tuple[str, str]) -> None:
                async with limiter:
                    key = generate_key()
                    public = public_to_text(key.public_key())
                    name = f"sim-{index:05d}"
                    address = f"127.0.0.1:{20000 + index}"
                    challenge = await post("/v1/populi/join/challenge", {})
                    held = open_token(token[0], now_ms=int(time.time() * 1000), skew_ms=300_000)
                    claim = JoinClaim(
                        # A benchmark on loopback: the recipient is the node the challenge
                        # names (populi join takes it from the TLS handshake instead).
                        recipient=challenge["node_id"],
                        challenge=challenge["challenge"],
                        public_key=public,
                        cluster_id=challenge["cluster_id"],
                        name=name,
                        token_id=token[1],
                        addresses=(address,),
                    )
                    proofs = prove_join(claim, node_key=key, token_key=held.token_key)
                    answer = await post(
                        "/v1/populi/join/enroll",
                        {
                            "token": held.envelope,
                            "public_key": public,
                            "name": name,
                            "addresses": [address],
                            "challenge": claim.challenge,
                            "proof": proofs.proof,
                            "token_proof": proofs.token_proof,
                        },
                    )
                    if answer["node_id"] != node_id_for(key.public_key()):
                        raise RuntimeError("the control plane enrolled another key than ours")
                    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                    enrolled[index] = SimNode(answer["node_id"], raw.hex(), address)

            async with trio.open_nursery() as nursery:
                for offset, token in enumerate(tokens):
                    nursery.start_soon(one, first + offset, token)
        return [enrolled[i] for i in sorted(enrolled)]

    # -- one step of the sweep ----------------------------------------------------------

    def _start_generators(self, n: int) -> list[subprocess.Popen[Any]]:
        count = max(1, min(self.args.generators, n))
        generators = []
        for g in range(count):
            share = self.nodes[:n][g::count]
            err = (self.root / f"generator-{g}.log").open("ab")
            proc = self._spawn(
                [sys.executable, os.path.abspath(__file__), "--generator"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            err.close()
            spec = {
                "url": self.url,
                "cp_node_id": self.cp_node_id,
                "ca": str(self.data_dir / "tls" / "ca.crt"),
                "timeout_s": self.args.timeout_s,
                "seed": secrets.randbits(32),
                "nodes": [[s.node_id, s.key_hex, s.address] for s in share],
            }
            _write_line(proc.stdin, spec)
            generators.append(proc)
        for g, proc in enumerate(generators):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"generator {g} did not start: {self._generator_log(g)}")
        return generators

    def _generator_log(self, g: int) -> str:
        return (self.root / f"generator-{g}.log").read_text(errors="replace")[-2000:]

    def measure(self, n: int) -> Row:
        assert self.agent is not None
        self.enroll_up_to(n)
        generators = self._start_generators(n)
        start = time.monotonic() + 0.2
        times = {
            "start": start,
            "from": start + self.args.warmup_s,
            "to": start + self.args.warmup_s + self.args.window_s,
        }
        for proc in generators:
            _write_line(proc.stdin, times)
        pids = [p.pid for p in generators]
        _sleep_until(times["from"])
        start_cpu = CpuWindow.take(self.agent.pid, pids)
        _sleep_until(times["to"])
        cp_cpu, gen_cpu, host_busy = CpuWindow.take(self.agent.pid, pids).since(start_cpu)
        latencies: list[float] = []
        lags: list[float] = []
        errors: Counter[str] = Counter()
        for g, proc in enumerate(generators):
            assert proc.stdout is not None
            raw = proc.stdout.read()
            if proc.wait() != 0 or not raw:
                raise RuntimeError(f"generator {g} failed: {self._generator_log(g)}")
            result = json.loads(raw)
            latencies += result["latencies_s"]
            lags += result["lags_s"]
            errors.update(result["errors"])
            self.warmup_errors.update(result["warmup_errors"])
            self.procs.remove(proc)
            self._stop(proc, grace_s=1.0)
        if self.agent.poll() is not None:
            raise RuntimeError(f"the agent exited under load: {self.agent_log_tail()}")
        latencies.sort()
        lags.sort()
        return Row(
            n=n,
            members=len(self.nodes),
            rate=len(latencies) / self.args.window_s,
            p50_ms=_pct(latencies, 0.50) * 1000,
            p99_ms=_pct(latencies, 0.99) * 1000,
            max_ms=(latencies[-1] if latencies else math.nan) * 1000,
            lag_p99_ms=_pct(lags, 0.99) * 1000,
            cp_cpu=cp_cpu,
            gen_cpu=gen_cpu,
            host_busy=host_busy,
            errors=errors,
        )


def _write_line(stream: IO[bytes] | None, value: Any) -> None:
    assert stream is not None
    stream.write(json.dumps(value).encode() + b"\n")
    stream.flush()


# -- the sweep and its report ----------------------------------------------------------------

COLUMNS = (
    f"{'N':>5} {'members':>7} {'hb/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
    f"{'lag p99':>7} {'CP CPU%':>7} {'CP ms/hb':>8} {'gen CPU%':>8} {'host %':>6}  errors"
)


def _format(row: Row) -> str:
    per_beat = row.cp_cpu * 10.0 / row.rate if row.rate else math.nan
    errors = ", ".join(f"{k}={v}" for k, v in sorted(row.errors.items())) or "0"
    return (
        f"{row.n:>5} {row.members:>7} {row.rate:>7.1f} {row.p50_ms:>7.1f} {row.p99_ms:>7.1f} "
        f"{row.max_ms:>7.1f} {row.lag_p99_ms:>7.1f} {row.cp_cpu:>7.1f} {per_beat:>8.2f} "
        f"{row.gen_cpu:>8.1f} {row.host_busy:>6.1f}  {errors}"
    )


def _sweep_sizes(start_n: int, max_n: int) -> list[int]:
    sizes = []
    n = start_n
    while n < max_n:
        sizes.append(n)
        n *= 2
    return [*sizes, max_n]


def _background_busy(seconds: float = 2.0) -> float:
    """How busy the machine is before the benchmark starts anything (% of all cores)."""
    busy0, total0 = _host_ticks()
    time.sleep(seconds)
    busy1, total1 = _host_ticks()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    try:
        background = _background_busy()
        bench.start_control_plane()
        print(
            f"heartbeat capacity: one control plane (populi agent {__version__}, {bench.url}), "
            f"{os.cpu_count()} CPU cores shared by it and {args.generators} load-generator "
            f"processes"
        )
        print(
            f"python {sys.version.split()[0]}, trio {trio.__version__}, httpx {httpx.__version__}; "
            f"1 heartbeat/s per node over signed HTTPS (HTTP/1.1 keep-alive, one connection per "
            f"node), warm-up {args.warmup_s:g} s, window {args.window_s:g} s, timeout "
            f"{args.timeout_s:g} s; a step is good when p99 < {args.p99_ms:g} ms, rate >= "
            f"{MIN_RATE_SHARE:.0%} of N and no errors"
        )
        print(
            f"other load on this machine before the start: {background:.0f} % of all cores "
            "(it competes with the control plane and the generator)"
        )
        print("CPU % is of one core; host % is of all cores; lag p99 = generator lateness (ms)")
        print(COLUMNS, flush=True)
        rows: dict[int, Row] = {}

        def step(n: int) -> bool:
            row = bench.measure(n)
            rows[n] = row
            print(_format(row), flush=True)
            return row.passes(args.p99_ms)

        best: int | None = None
        bad: int | None = None
        for n in _sweep_sizes(args.start_n, args.max_n):
            if step(n):
                best = n
            else:
                bad = n
                break
        low = best if best is not None else 0
        for _ in range(args.refine if bad is not None else 0):
            mid = (low + bad) // 2 if bad is not None else low
            if mid <= low or mid in rows:
                break
            if step(mid):
                best = low = mid
            else:
                bad = mid
        print()
        print_setup_summary(bench)
        good = sorted(r.cp_cpu * 10.0 / r.rate for r in rows.values() if r.passes(args.p99_ms))
        if good:
            per_beat = good[len(good) // 2]
            print(
                f"control plane CPU per heartbeat (median of good steps): {per_beat:.2f} ms, "
                f"so one core to itself would serve at most ~{1000 / per_beat:.0f} heartbeats/s"
            )
        _print_agent_log(bench)
        if best is None:
            print(
                f"largest N at 1 Hz with p99 < {args.p99_ms:g} ms: none (not even {args.start_n})"
            )
        else:
            bound = "" if bad is not None else " (the largest tried; raise --max-n to go further)"
            print(f"largest N at 1 Hz with p99 < {args.p99_ms:g} ms: {best}{bound}")
    finally:
        bench.close()


def _print_agent_log(bench: Bench) -> None:
    path = bench.root / "agent.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if not lines:
        print("agent log: no warnings or errors")
        return
    events: Counter[str] = Counter()
    for line in lines:
        try:
            record = json.loads(line)
            events[
                f"{record.get('level', '?')}: {record.get('event') or record.get('msg') or line}"
            ] += 1
        except ValueError:
            events[line[:160]] += 1
    print(f"agent log: {len(lines)} lines at warning level or above")
    for text, count in events.most_common(8):
        print(f"  {count:>6} x {text[:160]}")


def print_setup_summary(bench: Bench) -> None:
    """The enrollment rate and the warm-up errors, after the rows (every benchmark that
    drives a ``Bench``)."""
    if bench.nodes:
        print(
            f"enrollment: {len(bench.nodes)} nodes in {bench.enroll_s:.1f} s "
            f"({len(bench.nodes) / max(bench.enroll_s, 1e-9):.1f} joins/s)"
        )
    if bench.warmup_errors:
        print(
            "errors during warm-ups (not in the rows): "
            + ", ".join(f"{k}={v}" for k, v in sorted(bench.warmup_errors.items()))
        )


def run_interruptible(run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a benchmark so that Ctrl-C and SIGTERM both unwind through its cleanup."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; every process this benchmark started is stopped", file=sys.stderr)
        raise SystemExit(130) from None


def main() -> None:
    if "--generator" in sys.argv[1:]:
        generator_main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=800, help="largest N tried (default 800)")
    parser.add_argument("--start-n", type=int, default=25, help="first N; doubled each step")
    parser.add_argument("--window-s", type=float, default=15.0, help="measured window per N")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="warm-up before each window")
    parser.add_argument(
        "--generators", type=int, default=2, help="load-generator processes (default 2)"
    )
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the sweep")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="p99 latency bound")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="heartbeat timeout")
    args = parser.parse_args()
    if args.start_n < 1 or args.max_n < args.start_n or args.generators < 1:
        parser.error("need 1 <= --start-n <= --max-n and --generators >= 1")
    run_interruptible(run, args)


if __name__ == "__main__":
    main()
