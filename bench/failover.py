"""The failover figure (issue 14): SIGKILL the leader of three voters again and again, and
time, from the signal, (1) until a survivor names a new leader at a higher term and (2)
until the first grant (or write) through the new leader succeeds. Figures, never pass/fail.
``docs/performance.md`` holds a run's table and how to read it.

    .venv/bin/python bench/failover.py                     # every system, 20 kills each
    .venv/bin/python bench/failover.py --kills 5 --systems etcd --json

Every system runs three real processes on loopback, started here and ended by their PID:

- **populi** (``--populi`` profiles: ``defaults`` — the cluster settings as ``populi init``
  writes them; ``etcd-like`` — heartbeat 0.1 s, leader lease 0.5 s, election timeout
  1.1-2.2 s, the shortest the safety check allows with the default drift and margin;
  ``lan-fast`` — 0.25 s / 1 s / 1.6-2.4 s;
  ``adr0016`` — the timings before ADR 0019: 1 s / 5 s / 8-16 s): three voters ``cp``,
  ``v2``, ``v3`` and a worker ``w1`` (``tests/support/mesh.py`` builds them, as the e2e
  election test does). Each round waits until the three voters are settled under one
  leader and the worker reports to it, SIGKILLs the leader, then every 50 ms asks each
  survivor for its status (a new leader: ``election_role`` leader at a higher term) and
  for a lease on ``w1`` (signed as ``w1``, ``gpus_wanted`` 0; success: a lease whose
  fencing token carries a higher term, released at once). A new leader grants on ``w1``
  only once ``w1``'s full report reached it (ADR 0016 Decision 7), so the grant time
  includes the worker finding the new leader. The killed voter is started again from its
  disk and follows before the next round.
- **etcd** (Debian ``etcd-server``, its defaults: heartbeat 100 ms, election 1000 ms):
  three members; the leader (``/v3/maintenance/status``) is SIGKILLed; a new leader is a
  survivor whose status names itself leader at a higher raft term; the first write is a
  ``/v3/kv/put`` through a survivor that succeeds at a higher term. The killed member
  restarts from its data directory.
- **hashicorp/raft** (its ``DefaultConfig``: heartbeat timeout 1 s, election timeout 1 s,
  leader lease 500 ms): ``bench/raftnode/main.go``, built here from Debian's
  ``golang-github-hashicorp-raft-dev`` (TCP transport, in-memory stores); the first write
  is an ``Apply`` through the new leader. The killed node restarts empty (in-memory
  stores) and is caught up by the leader. Without ``go`` or the library the row prints
  the defaults, marked "not measured".

Polls every 50 ms: a figure is late by up to one poll plus a request. p99 of 20 kills is
the largest value (nearest rank).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from populi_peer.core import settings as cluster_settings  # noqa: E402
from support.mesh import Mesh, free_port  # noqa: E402
from support.waiting import wait_for  # noqa: E402

POLL_S = 0.05
#: After a change of timings, before the first kill: the longest election timeout the
#: cluster ran under, plus this (``warmup_s``).
WARMUP_MARGIN_S = 2.0
GUARD_S = 120.0
VOTER = "worker,submit,voter"
VOTERS = ("cp", "v2", "v3")
LEASES = "/v1/populi/exec/leases"
#: Populi timings profiles, each a list of settings changes applied in order (one record
#: each: ``check_settings_change`` refuses a jump a voter on the old timings and a leader
#: on the new ones could overlap in; lease first when it shrinks, timeouts first when it
#: grows). Remote execution is switched on in the first record.
PROFILES: Mapping[str, Sequence[Mapping[str, object]]] = {
    "defaults": [{}],
    "etcd-like": [
        {"leader_lease_s": 0.5, "election_heartbeat_s": 0.1},
        {"election_timeout_min_s": 1.1, "election_timeout_max_s": 2.2},
    ],
    "lan-fast": [
        {"leader_lease_s": 1.0, "election_heartbeat_s": 0.25},
        {"election_timeout_min_s": 1.6, "election_timeout_max_s": 2.4},
    ],
    "adr0016": [
        {"election_timeout_min_s": 8.0, "election_timeout_max_s": 16.0},
        {"leader_lease_s": 5.0, "election_heartbeat_s": 1.0},
    ],
}
RAFT_DEFAULTS = "hb 1 s, election 1 s, lease 0.5 s"
ETCD_DEFAULTS = "hb 0.1 s, election 1 s"


# -- pure helpers (tests/test_failover_bench.py) -------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in (0, 1]): the smallest value with at least ``q``
    of the values at or below it; of 20 values, p99 is the largest."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """n, min, p50, p99, max of ``values`` (seconds, rounded to ms); only n when empty."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "p50": round(percentile(values, 0.5), 3),
        "p99": round(percentile(values, 0.99), 3),
        "max": round(max(values), 3),
    }


def warmup_s(steps: Sequence[Mapping[str, object]]) -> float:
    """How long to wait after a profile's settings changes before the first kill: the
    longest ``election_timeout_max_s`` in effect at any point (the cluster's defaults, as
    ``populi init`` writes them, then each step over the last), so that timers armed under
    an earlier timing and the holds of the first election have run out, plus
    :data:`WARMUP_MARGIN_S`."""
    values: dict[str, Any] = cluster_settings.defaults()
    longest = float(values["election_timeout_max_s"])
    for step in steps:
        values.update(step)
        longest = max(longest, float(values["election_timeout_max_s"]))
    return longest + WARMUP_MARGIN_S


def term_moved_between_rounds(previous_grant_term: int, start_term: int) -> bool:
    """Whether a round began at a higher term than the previous round's first grant came
    at (``previous_grant_term``; 0 before the first round): at least one election nobody
    caused ran between the two (a leader that lost its lease, a follower that stood). It
    says nothing of how many, nor whether the leader changed, and cannot see an extra
    election inside a round (a split vote before the first grant)."""
    return start_term > previous_grant_term > 0


def etcd_status(answer: Mapping[str, Any]) -> tuple[bool, int]:
    """Whether an etcd member's ``/v3/maintenance/status`` answer names itself the leader,
    and its raft term (the gateway writes uint64 as strings and omits zero values)."""
    header = answer.get("header") or {}
    member, leader = str(header.get("member_id", "")), str(answer.get("leader", ""))
    term = int(answer.get("raftTerm") or header.get("raft_term") or 0)
    return bool(member) and member == leader, term


def token_term(token: str) -> int:
    """The term of a Populi fencing token (``TERM.SEQ``)."""
    term, sep, seq = token.partition(".")
    if not sep or not term.isdigit() or not seq.isdigit():
        raise ValueError(f"not a fencing token: {token!r}")
    return int(term)


@dataclass
class Row:
    system: str
    timings: str
    to_leader: list[float] = field(default_factory=list)
    to_grant: list[float] = field(default_factory=list)
    #: Rounds that began at a higher term than the previous round's first grant came at
    #: (``term_moved_between_rounds``): each had at least one election nobody caused.
    unplanned: int = 0
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "timings": self.timings,
            "to_leader_s": summary(self.to_leader),
            "to_first_grant_s": summary(self.to_grant),
            "unplanned_elections": self.unplanned,
            "note": self.note,
        }


def format_table(rows: Sequence[Row]) -> str:
    """The rows side by side; the ratio column: this row's p50 to the first grant over
    etcd's (when etcd was measured)."""
    etcd = next((r for r in rows if r.system == "etcd" and r.to_grant), None)
    head = (
        f"{'system':<18}{'timings':<54}{'kills':>6}  {'new leader s (p50/p99 min-max)':<32}"
        f"{'first grant s (p50/p99 min-max)':<33}{'x etcd':>7}"
    )
    lines = [head, "-" * len(head)]

    def cell(values: list[float]) -> str:
        if not values:
            return "not measured"
        s = summary(values)
        return f"{s['p50']:.2f} / {s['p99']:.2f}  {s['min']:.2f}-{s['max']:.2f}"

    for row in rows:
        ratio = ""
        if etcd is not None and row.to_grant:
            ratio = f"{percentile(row.to_grant, 0.5) / percentile(etcd.to_grant, 0.5):.1f}"
        kills = str(len(row.to_leader)) if row.to_leader else "-"
        lines.append(
            f"{row.system:<18}{row.timings:<54}{kills:>6}  {cell(row.to_leader):<32}"
            f"{cell(row.to_grant):<33}{ratio:>7}"
        )
        if row.unplanned:
            lines.append(
                f"{'':<18}{row.unplanned} round(s) began at a higher term than the last "
                "first grant: election(s) nobody caused between kills"
            )
        if row.note:
            lines.append(f"{'':<18}note: {row.note}")
    return "\n".join(lines)


# -- one failover loop, whatever the system -------------------------------------------------


@dataclass
class Failover:
    """What one round found: seconds from the SIGKILL; the term of the first grant."""

    to_leader: float
    to_grant: float
    term: int = 0


def measure(
    kill: Callable[[], None],
    new_leader: Callable[[], bool],
    granted: Callable[[], bool],
) -> Failover:
    """SIGKILL (``kill``), then poll ``new_leader`` (until true) and ``granted`` (until
    true) every :data:`POLL_S`; seconds from the signal to each."""
    started = time.monotonic()
    kill()
    leader_at = grant_at = None
    while leader_at is None or grant_at is None:
        if time.monotonic() - started > GUARD_S:
            raise AssertionError(f"no new leader and grant within {GUARD_S:g} s")
        if leader_at is None and new_leader():
            leader_at = time.monotonic() - started
        if grant_at is None and granted():
            grant_at = time.monotonic() - started
            if leader_at is None:  # a grant at a higher term: a leader was there first
                leader_at = grant_at
        time.sleep(POLL_S)
    return Failover(leader_at, grant_at)


def _progress(system: str, index: int, found: Failover) -> None:
    print(
        f"  {system} kill {index + 1}: new leader {found.to_leader:.2f} s, "
        f"first grant {found.to_grant:.2f} s",
        file=sys.stderr,
        flush=True,
    )


# -- Populi ----------------------------------------------------------------------------------


def _describe(steps: Sequence[Mapping[str, object]]) -> str:
    merged: dict[str, object] = {}
    for step in steps:
        merged.update(step)
    values = {**cluster_settings.defaults(), **merged}
    return (
        f"hb {values['election_heartbeat_s']:g} s, lease {values['leader_lease_s']:g} s, "
        f"election {values['election_timeout_min_s']:g}-{values['election_timeout_max_s']:g} s"
    )


class PopuliCluster:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.operator = mesh.credential("operator")
        self.worker = mesh.credential("w1")

    def _get(self, name: str, path: str) -> dict[str, Any] | None:
        try:
            with self.mesh.client(name, self.operator, validate=False) as client:
                answer = client.get(path, timeout=2)
        except httpx.HTTPError:
            return None
        return answer.json() if answer.status_code == 200 else None

    def status(self, name: str) -> dict[str, Any] | None:
        return self._get(name, "/v1/populi/status")

    def steady(self) -> tuple[str, int] | None:
        """(leader's name, term) once every voter is settled under one leader and the
        worker reports to it; ``None`` before."""
        seen = {name: self.status(name) for name in VOTERS}
        ids = {self.mesh[name].node_id: name for name in VOTERS}
        leaders = set()
        for s in seen.values():
            if s is None or not s.get("voters_settled") or s.get("leader") is None:
                return None
            leaders.add((s["leader"]["id"], s["term"]))
        if len(leaders) != 1:
            return None
        leader_id, term = leaders.pop()
        if leader_id not in ids or seen[ids[leader_id]]["election_role"] != "leader":
            return None
        worker = self.status("w1")
        if worker is None:
            return None
        link = worker["control_plane"]
        if link.get("node_id") != leader_id or not link.get("reachable"):
            return None
        return ids[leader_id], int(term)

    def grant(self, name: str, task_id: str, above_term: int) -> int:
        """A lease on ``w1`` through ``name`` at a term above ``above_term`` (released):
        its term (0: none)."""
        body = {
            "task_id": task_id,
            "attempt": 1,
            "work_class": "agent",
            "target": self.mesh["w1"].node_id,
            "gpus_wanted": 0,
            "ttl_s": 10,
        }
        try:
            with self.mesh.client(name, self.worker, validate=False) as client:
                answer = client.post(LEASES, json=body, timeout=2)
                if answer.status_code != 200:
                    return 0
                lease = answer.json()["lease"]
                client.post(
                    f"{LEASES}/{lease['lease_id']}/release",
                    json={"outcome": "completed"},
                    timeout=5,
                )
        except httpx.HTTPError:
            return 0
        term = token_term(str(lease["token"]))
        return term if term > above_term else 0

    def round(self, index: int) -> tuple[Failover, int]:
        """One kill; and the term it started from."""
        (leader, term), _ = wait_for("a steady leader", self.steady, guard_s=GUARD_S, every_s=0.2)
        survivors = [name for name in VOTERS if name != leader]
        tries = iter(range(1_000_000))
        granted_term = [0]

        def new_leader() -> bool:
            for name in survivors:
                s = self.status(name)
                if s is not None and s["election_role"] == "leader" and s["term"] > term:
                    return True
            return False

        def granted() -> bool:
            for name in survivors:
                granted_term[0] = self.grant(name, f"fo-{index}-{next(tries)}", term)
                if granted_term[0]:
                    return True
            return False

        found = measure(lambda: self.mesh.stop(leader, signal.SIGKILL), new_leader, granted)
        found.term = granted_term[0]
        self.mesh.start(leader)
        return found, term


def run_populi(profile: str, kills: int) -> Row:
    steps = PROFILES[profile]
    row = Row(f"populi {profile}", _describe(steps))
    with tempfile.TemporaryDirectory(prefix="populi-failover-") as tmp:
        first = {"remote_exec_enabled": True, **steps[0]}
        mesh = Mesh.create(
            Path(tmp),
            gpu_nodes=["w1"],
            cpu_nodes=["v2", "v3"],
            roles={"v2": VOTER, "v3": VOTER},
            remote=False,
            settings=first,
        )
        try:
            for step in steps[1:]:
                mesh.settings(**step)
            if len(steps) > 1:
                # Timers armed under the earlier timings (and the holds of the first
                # election) run out before the first kill.
                time.sleep(warmup_s(steps))
            cluster = PopuliCluster(mesh)
            last_term = 0
            for index in range(kills):
                found, started_at = cluster.round(index)
                row.unplanned += term_moved_between_rounds(last_term, started_at)
                last_term = found.term
                _progress(row.system, index, found)
                row.to_leader.append(found.to_leader)
                row.to_grant.append(found.to_grant)
        finally:
            mesh.close()
    return row


# -- etcd --------------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    data_dir: Path
    argv: list[str]
    client_url: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.data_dir.parent / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log)
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def _members(members: Sequence[Member]) -> Iterator[None]:
    try:
        for member in members:
            member.start()
        yield
    finally:
        for member in members:
            member.stop()


def _post(url: str, body: Mapping[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        answer = httpx.post(url, json=body, timeout=timeout)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    data = answer.json()
    return data if isinstance(data, dict) else None


def _etcd_members(tmp: Path) -> list[Member]:
    etcd = shutil.which("etcd")
    assert etcd is not None
    names = ("e1", "e2", "e3")
    peers = {n: f"http://127.0.0.1:{free_port()}" for n in names}
    clients = {n: f"http://127.0.0.1:{free_port()}" for n in names}
    cluster = ",".join(f"{n}={peers[n]}" for n in names)
    return [
        Member(
            n,
            tmp / n,
            [
                etcd,
                "--name",
                n,
                "--data-dir",
                str(tmp / n),
                "--listen-peer-urls",
                peers[n],
                "--initial-advertise-peer-urls",
                peers[n],
                "--listen-client-urls",
                clients[n],
                "--advertise-client-urls",
                clients[n],
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                f"failover-{os.getpid()}",
                "--logger",
                "zap",
            ],
            clients[n],
        )
        for n in names
    ]


def _etcd_steady(members: Sequence[Member]) -> tuple[Member, int] | None:
    leaders = []
    terms = set()
    for member in members:
        answer = _post(member.client_url + "/v3/maintenance/status", {})
        if answer is None:
            return None
        is_leader, term = etcd_status(answer)
        terms.add(term)
        if is_leader:
            leaders.append(member)
    if len(leaders) != 1 or len(terms) != 1:
        return None
    if _post(leaders[0].client_url + "/v3/kv/put", _put_body()) is None:
        return None
    return leaders[0], terms.pop()


def _put_body() -> dict[str, str]:
    return {
        "key": base64.b64encode(b"failover").decode(),
        "value": base64.b64encode(str(time.time()).encode()).decode(),
    }


def run_etcd(kills: int) -> Row:
    row = Row("etcd", f"{ETCD_DEFAULTS} (defaults)")
    if shutil.which("etcd") is None:
        row.note = "not measured: no etcd on PATH (apt-get install etcd-server)"
        return row
    with tempfile.TemporaryDirectory(prefix="etcd-failover-") as tmp:
        members = _etcd_members(Path(tmp))
        with _members(members):
            for index in range(kills):
                (leader, term), _ = wait_for(
                    "a steady etcd leader", lambda: _etcd_steady(members), guard_s=GUARD_S
                )
                survivors = [m for m in members if m is not leader]

                def new_leader(survivors: list[Member] = survivors, term: int = term) -> bool:
                    for member in survivors:
                        answer = _post(member.client_url + "/v3/maintenance/status", {}, 0.5)
                        if answer is not None:
                            is_leader, seen = etcd_status(answer)
                            if is_leader and seen > term:
                                return True
                    return False

                def written(survivors: list[Member] = survivors, term: int = term) -> bool:
                    for member in survivors:
                        answer = _post(member.client_url + "/v3/kv/put", _put_body(), 0.5)
                        if answer is not None:
                            return int(answer.get("header", {}).get("raft_term") or 0) > term
                    return False

                found = measure(leader.kill, new_leader, written)
                _progress("etcd", index, found)
                row.to_leader.append(found.to_leader)
                row.to_grant.append(found.to_grant)
                # Back from its data directory, as a member of the existing cluster.
                leader.argv[leader.argv.index("--initial-cluster-state") + 1] = "existing"
                leader.start()
    return row


# -- hashicorp/raft ------------------------------------------------------------------------


def build_raftnode(out: Path) -> str | None:
    """Build ``bench/raftnode`` against Debian's hashicorp/raft; why not, if it fails."""
    go = shutil.which("go")
    gopath = Path("/usr/share/gocode")
    if go is None or not (gopath / "src/github.com/hashicorp/raft").is_dir():
        return "no go or no hashicorp/raft (apt-get install golang-go golang-github-hashicorp-raft-dev)"
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "GO111MODULE": "off",
        "GOCACHE": str(out.parent / "gocache"),
    }
    built = subprocess.run(
        [go, "build", "-o", str(out), "main.go"],
        cwd=ROOT / "bench" / "raftnode",
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        return f"go build failed: {built.stderr.strip()[-300:]}"
    return None


def _get(url: str, timeout: float = 0.5) -> dict[str, Any] | None:
    try:
        answer = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 200 else None


def run_raft(kills: int) -> Row:
    row = Row("hashicorp/raft", f"{RAFT_DEFAULTS} (defaults)")
    with tempfile.TemporaryDirectory(prefix="raft-failover-") as tmp:
        binary = Path(tmp) / "raftnode"
        why = build_raftnode(binary)
        if why is not None:
            row.note = f"not measured: {why}"
            return row
        names = ("r1", "r2", "r3")
        raft_addr = {n: f"127.0.0.1:{free_port()}" for n in names}
        http_url = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        peers = ",".join(f"{n}={raft_addr[n]}" for n in names)
        members = []
        for n in names:
            (Path(tmp) / n).mkdir()
            argv = [str(binary), "-id", n, "-raft", raft_addr[n], "-peers", peers]
            argv += ["-http", http_url[n].removeprefix("http://"), "-bootstrap"]
            members.append(Member(n, Path(tmp) / n, argv, http_url[n]))

        def steady() -> tuple[Member, int] | None:
            seen = [_get(m.client_url + "/status") for m in members]
            if any(s is None for s in seen):
                return None
            leaders = [
                m for m, s in zip(members, seen, strict=True) if s and s["state"] == "Leader"
            ]
            known = {s["leader"] for s in seen if s}
            if len(leaders) != 1 or len(known) != 1 or "" in known:
                return None
            if _post_raw(leaders[0].client_url + "/apply") is False:
                return None
            return leaders[0], max(int(s["term"]) for s in seen if s)

        with _members(members):
            for index in range(kills):
                (leader, term), _ = wait_for("a steady raft leader", steady, guard_s=GUARD_S)
                survivors = [m for m in members if m is not leader]

                def new_leader(survivors: list[Member] = survivors, term: int = term) -> bool:
                    for member in survivors:
                        s = _get(member.client_url + "/status")
                        if s is not None and s["state"] == "Leader" and int(s["term"]) > term:
                            return True
                    return False

                def applied(survivors: list[Member] = survivors, term: int = term) -> bool:
                    for member in survivors:
                        s = _get(member.client_url + "/status")
                        if s is None or s["state"] != "Leader" or int(s["term"]) <= term:
                            continue
                        if _post_raw(member.client_url + "/apply"):
                            return True
                    return False

                found = measure(leader.kill, new_leader, applied)
                _progress("raft", index, found)
                row.to_leader.append(found.to_leader)
                row.to_grant.append(found.to_grant)
                # In-memory stores: it comes back empty, without bootstrapping, and the
                # leader (whose configuration still holds it) catches it up.
                leader.argv = [a for a in leader.argv if a != "-bootstrap"]
                leader.start()
    return row


def _post_raw(url: str) -> bool:
    try:
        return httpx.post(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--kills", type=int, default=20, help="leader kills per system (20)")
    parser.add_argument(
        "--systems",
        default="populi,etcd,raft",
        help="comma-separated: populi, etcd, raft (default: all)",
    )
    parser.add_argument(
        "--populi",
        default="defaults,etcd-like",
        help=f"comma-separated Populi timings profiles: {', '.join(PROFILES)}",
    )
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    profiles = [p.strip() for p in args.populi.split(",") if p.strip()]
    unknown = [s for s in systems if s not in ("populi", "etcd", "raft")]
    unknown += [p for p in profiles if p not in PROFILES]
    if unknown:
        parser.error(f"unknown system or profile: {', '.join(unknown)}")
    started = time.monotonic()
    load_before = os.getloadavg()
    rows: list[Row] = []
    if "populi" in systems:
        rows += [run_populi(profile, args.kills) for profile in profiles]
    if "etcd" in systems:
        rows.append(run_etcd(args.kills))
    if "raft" in systems:
        rows.append(run_raft(args.kills))
    took = time.monotonic() - started
    load = [round(x, 1) for x in (*load_before, *os.getloadavg())]
    if args.json:
        out = {"rows": [r.as_json() for r in rows], "took_s": round(took, 1), "loadavg": load}
        print(json.dumps(out, indent=2))
        return
    print(format_table(rows))
    print(
        f"\n{args.kills} leader kills each; polled every {POLL_S * 1000:.0f} ms; {took:.0f} s "
        f"in all; load average (1/5/15 min) {load[:3]} before, {load[3:]} after "
        f"on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
