"""A retired node in the middle of the path to the control plane: real agents in network
namespaces, real TLS and SQLite, a DNAT rule (root; skipped otherwise).
docs/adr/0009-peer-identity-of-answers.md.

The lab (``tests/lab/netns.py``, agents on ``tests/lab/agents.py``'s ``LabHost``): ``cp``
(10.77.0.1, control plane), ``wa`` (10.77.0.2, the submitter), ``wb`` (10.77.0.3, the
worker) and ``im`` (10.77.0.4), a node that joined, was retired (node id and certificate
serial revoked) and whose agent stopped. Its certificate is still valid and still chains
to the cluster CA: ``im`` runs ``tests/security/impostor.py`` with it, a server that
answers renewals of the lease it was told about (state ``live``), node lists and grants
as an attacker would.

1. **Renewals.** ``populi run --node wb`` on ``wa`` runs a ticking task (the tick
   protocol of ``tests/e2e/exec_support.py``) on ``wb``. Then, inside ``wb``'s namespace,
   a DNAT rule sends every new connection for ``cp``'s address to ``im``, and a REJECT
   rule resets the connections already open to ``cp`` (NAT applies to new connections
   only). Every renewal ``wb`` sends now reaches the impostor — and is refused by the TLS
   handshake, since ``im``'s certificate does not name ``cp``. The contract: the impostor
   receives no request at all; ``wb``'s supervisor stops the task by its deadline (the
   last genuine renewal's); ``cp`` expires the lease on its own clock; ``wa`` falls back
   on ``cp``'s word and the task succeeds; no tick of the remote attempt comes after the
   first tick of the local one (never in two places at once).
2. **Grants.** The same rules inside ``wa``'s namespace: a second task pinned to ``wb``
   finds no control plane (``control_plane_unreachable``, the impostor's refusal in the
   detail) and fails when its queue timeout runs out, never runs anywhere, and the
   impostor still received nothing. The CLI on ``wa`` asking the control plane
   (``populi nodes``) exits 4 with one line that says who answered.

Without the check (every peer call before ADR 0009), the impostor's renewals extend the
remote attempt's deadline while ``cp`` declares the lease dead and ``wa`` starts the
local attempt: the tick order check fails, and the impostor's log is not empty.

Not covered here: the joiner's side (a join token sent to an impostor), which belongs to
the join handshake.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e.exec_support import read_ticks, tick_command, wait_ticks
from lab.agents import GUARD_S, PORT, fell_back_on_the_control_planes_word
from lab.netns import Lab

from support.mesh import Mesh
from support.waiting import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("cp", "wa", "wb", "im")
IMPOSTOR = Path(__file__).with_name("impostor.py")
#: Attempt 1 would tick for a minute (it is stopped long before); attempt 2 for 2 s.
N1, N2 = 600, 20


class Impostor:
    """``tests/security/impostor.py`` inside ``im``'s namespace, with ``im``'s own
    certificate and key; ended by its PID."""

    def __init__(self, lab: Lab, mesh: Mesh, root: Path, *, started: list[Impostor]) -> None:
        node = mesh["im"]
        self.forge = root / "forge.json"
        self.log = root / "impostor.requests"
        self.out = root / "impostor.out"
        ready = root / "impostor.ready"
        self.forge.write_text("{}")
        self.log.touch()
        with self.out.open("ab") as handle:
            self.proc = subprocess.Popen(
                lab.argv(
                    "im",
                    sys.executable,
                    str(IMPOSTOR),
                    "--listen",
                    node.listen,
                    "--cert",
                    str(node.data_dir / "tls" / "node.crt"),
                    "--key",
                    str(node.data_dir / "keys" / "node.key"),
                    "--forge",
                    str(self.forge),
                    "--log",
                    str(self.log),
                    "--ready",
                    str(ready),
                ),
                stdout=handle,
                stderr=handle,
            )
        started.append(self)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the impostor exited: {self.out.read_text()[-2000:]}")
            return ready.exists()

        wait_for("the impostor listens", up, guard_s=GUARD_S, every_s=0.05)

    def received(self) -> list[str]:
        return self.log.read_text().splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def redirect_to_impostor(lab: Lab, name: str) -> None:
    """Inside ``name``'s namespace: new connections for ``cp``'s API go to ``im``
    (DNAT), and the ones already open to ``cp`` are reset (REJECT after NAT sees the
    original destination only on packets it did not rewrite)."""
    cp, im = lab.ip("cp"), lab.ip("im")
    lab.run(
        name,
        *("iptables", "-t", "nat", "-A", "OUTPUT", "-d", cp, "-p", "tcp"),
        *("--dport", str(PORT), "-j", "DNAT", "--to-destination", f"{im}:{PORT}"),
    )
    lab.run(
        name,
        *("iptables", "-A", "OUTPUT", "-d", cp, "-p", "tcp"),
        *("-j", "REJECT", "--reject-with", "tcp-reset"),
    )


def dnat_packets(lab: Lab, name: str) -> int:
    out = lab.run(name, "iptables", "-t", "nat", "-L", "OUTPUT", "-v", "-n", "-x").stdout
    return sum(
        int(line.split()[0])
        for line in out.splitlines()
        if "DNAT" in line and line.split()[0].isdigit()
    )


def test_a_retired_node_in_the_middle_can_neither_extend_a_lease_nor_answer_a_grant(
    lab: Lab, mesh: Mesh, tmp_path: Path
) -> None:
    impostors: list[Impostor] = []
    try:
        scenario(lab, mesh, tmp_path, impostors)
    except BaseException:
        print(mesh.logs())
        for impostor in impostors:
            print("--- the impostor received:", impostor.received())
        raise
    finally:
        for impostor in impostors:
            impostor.close()


def scenario(lab: Lab, mesh: Mesh, tmp_path: Path, impostors: list[Impostor]) -> None:
    started = time.monotonic()
    mesh.build(["wa", "wb", "im"])
    print(f"\nthe lab's cluster up in {time.monotonic() - started:.1f} s")
    wb = mesh["wb"]

    # im is retired (its node id and certificate serial revoked) and its agent stops;
    # its certificate stays valid and chains to the cluster CA.
    mesh.cli("cp", "node", "retire", "im", "--reason", "decommissioned")
    mesh.stop("im")
    impostor = Impostor(lab, mesh, tmp_path, started=impostors)

    # 1. Renewals.
    ticks = tmp_path / "ticks"
    task_id = mesh.run_detached(
        "wa",
        *("--node", "wb", "--node-fallback", "--gpus", "1", "--queue-timeout", "60s"),
        *tick_command(ticks, n1=N1, n2=N2),
    )
    took = wait_ticks(ticks, 1, guard_s=GUARD_S)
    print(f"\nremote attempt ticking {took:.1f} s after submission")
    remote = mesh.task_record("wa", task_id)["task"]["attempts"][0]
    assert (remote["where"], remote["node"]) == ("remote", wb.node_id), remote
    lease = mesh.lease_record(remote["lease_id"])
    assert lease["state"] == "live", lease
    nodes = json.loads(mesh.cli("cp", "nodes", "--json").stdout)["nodes"]
    # The impostor knows everything about the lease (a stronger attacker than one who
    # reads it off the worker's heartbeats) and the cluster's nodes.
    impostor.forge.write_text(
        json.dumps(
            {
                "leases": {remote["lease_id"]: lease},
                "nodes": nodes,
                "grant": {**lease, "lease_id": "l-forged", "token": "99.1"},
            }
        )
    )
    task_dir = wb.data_dir / "tasks" / "worker" / task_id / "1"

    redirect_to_impostor(lab, "wb")
    redirected_ns = time.time_ns()
    task, took = mesh.wait_task_ended("wa", task_id, guard_s=GUARD_S)
    print(f"task ended {took:.1f} s after the redirect")

    # Never in two places at once; the remote attempt stopped by its own deadline; cp
    # declared the lease dead on its own clock, after the last tick; wa fell back on that
    # word with a higher token; exactly one result was accepted.
    by_attempt, _, _, _ = fell_back_on_the_control_planes_word(
        mesh, task, ticks, task_dir, remote="wb", local="wa"
    )

    # The redirect worked: wb's connections for cp went to im...
    assert dnat_packets(lab, "wb") > 0
    # ...and were refused at the handshake: not one request reached the impostor.
    assert impostor.received() == []
    assert "peer_identity_mismatch" in wb.log()[-200_000:], wb.log()[-3000:]
    last_remote_ns = max(t.time_ns for t in by_attempt[1])
    first_local_ns = min(t.time_ns for t in by_attempt[2])
    print(
        f"remote attempt's last tick {(last_remote_ns - redirected_ns) / 1e9:.2f} s after "
        f"the redirect, local attempt's first {(first_local_ns - redirected_ns) / 1e9:.2f} s"
    )

    # 2. Grants: the submitter's path to the control plane goes to the impostor too.
    redirect_to_impostor(lab, "wa")
    ticks2 = tmp_path / "ticks2"
    task2_id = mesh.run_detached(
        "wa",
        *("--node", "wb", "--node-fallback", "--gpus", "1", "--queue-timeout", "10s"),
        *tick_command(ticks2, n1=N2, n2=N2),
    )
    task2, took = mesh.wait_task_ended("wa", task2_id, guard_s=GUARD_S)
    print(f"second task ended {took:.1f} s after submission: {task2['state']}")
    assert task2["state"] == "failed", task2
    assert task2["attempts"] == [], task2["attempts"]
    # The decision log: [at_ms, code, detail] rows.
    assert any(
        code == "control_plane_unreachable" and "did not prove to be" in detail
        for _, code, detail in task2["reasons"]
    ), task2["reasons"]
    assert not read_ticks(ticks2)
    assert dnat_packets(lab, "wa") > 0
    assert impostor.received() == []

    # The CLI on wa, asking the control plane: one line, exit 4.
    cli = mesh.cli("wa", "nodes", check=False, timeout=60)
    assert cli.returncode == 4, (cli.returncode, cli.stderr)
    line = cli.stderr.strip()
    assert "\n" not in line and "did not prove to be" in line, line
    assert impostor.received() == []
