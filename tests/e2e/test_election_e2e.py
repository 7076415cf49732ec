"""The control-plane election end to end (issue 13, ADR 0016): real ``populi`` processes on
loopback, real TLS and signed requests.

Three voters (``cp`` from ``populi init``; ``v2`` and ``v3`` joined with voter tokens, each
added by the leader once it runs, each given an issuer signed by the root: ADR 0018) and a
worker ``w1``. The leader — the ``populi init`` node — is SIGKILLed: a survivor leads at a
higher term; while ``cp`` stays down (issue 14: the cluster works with its first node gone)
a token is minted through the new leader, a new node joins with it, an operator command
(cordon) works, ``populi run`` runs a task under the new leader's lease, the new node's
certificate is renewed (signed by the new leader's issuer) and a settings change reaches
every running node; the worker follows the new leader, and the old leader, restarted from
its disk, follows it too; ``populi node resume`` from the old leader's data directory
reaches the new leader.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from enrollment.ca import cert_from_pem, chain_from_pem, issuer_node_id, verify_chain
from support.mesh import Mesh, give_issuers, settled_leader, shipped_election_timings
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

VOTER = "worker,submit,voter"
GUARD_S = 90.0


def status(mesh: Mesh, name: str) -> dict[str, Any] | None:
    """Node ``name``'s own status (``None`` while it does not answer)."""
    try:
        with mesh.client(name, mesh.credential("operator")) as client:
            answer = client.get("/v1/populi/status", timeout=5)
    except Exception:
        return None
    return answer.json() if answer.status_code == 200 else None


def test_three_voters_survive_sigkill_of_the_leader(tmp_path: Path) -> None:
    mesh = Mesh.create(
        tmp_path,
        cpu_nodes=["v2", "v3", "w1"],
        roles={"v2": VOTER, "v3": VOTER},
        remote=False,
    )
    try:
        scenario(mesh)
    finally:
        mesh.close()


def scenario(mesh: Mesh) -> None:
    voters = {mesh[n].node_id: n for n in ("cp", "v2", "v3")}

    def all_voters() -> dict[str, dict[str, Any]] | None:
        seen = {n: status(mesh, n) for n in voters.values()}
        return seen if settled_leader(seen, voters) == "cp" else None  # type: ignore[return-value]

    seen, took = wait_for(
        "three settled voters led by cp", all_voters, guard_s=GUARD_S, every_s=0.3
    )
    print(f"three voters settled after {took:.1f} s")
    give_issuers(mesh, ("v2", "v3"))
    seen, _ = wait_for(
        "three settled voters after the issuers", all_voters, guard_s=GUARD_S, every_s=0.3
    )
    first_term = seen["cp"]["term"]
    assert seen["cp"]["election_role"] == "leader"
    shipped_election_timings(mesh, "cp")
    human = mesh.cli("v2", "status").stdout
    assert "leader         cp (" in human and "[this node: follower]" in human
    assert "voters         " in human and "heard" in human

    # The leader dies without a word.
    mesh.stop("cp", signal.SIGKILL)

    def new_leader() -> tuple[str, dict[str, Any]] | None:
        for name in ("v2", "v3"):
            s = status(mesh, name)
            if s is not None and s["election_role"] == "leader" and s["term"] > first_term:
                return name, s
        return None

    (leader, lead_status), took = wait_for(
        "a survivor leads at a higher term", new_leader, guard_s=GUARD_S, every_s=0.2
    )
    print(f"{leader} leads at term {lead_status['term']} {took:.1f} s after the SIGKILL")
    # An operator command works through it.
    with mesh.operator(leader) as op:
        cordoned = op.post(f"/v1/populi/admin/nodes/{mesh['w1'].node_id}/cordon", json={})
    assert cordoned.status_code == 200, cordoned.text
    # A token minted by the new leader, and a join with it: the token's use and the new
    # member are written through the election, the certificate signed by its issuer.
    with mesh.operator(leader) as op:
        minted = op.post(
            "/v1/populi/admin/tokens", json={"ttl_s": 600, "roles": ["worker", "submit"]}
        )
    assert minted.status_code == 200, minted.text
    w2 = mesh.add("w2", gpu=True)
    mesh.cli("w2", "join", minted.json()["token"], "--listen", w2.listen, "--name", "w2")
    mesh.start("w2")
    # A task through the new leader: a lease of its term on the new node's GPU.
    ran = mesh.cli("w2", "run", "--gpus", "1", after=["--", "echo", "through-the-new-leader"])
    assert "through-the-new-leader" in ran.stdout, ran.stdout
    with mesh.operator(leader) as op:
        listed = op.get("/v1/populi/exec/leases", params={"node": mesh["w2"].node_id})
    assert listed.status_code == 200, listed.text
    tokens = [lease["token"] for lease in listed.json()["leases"]]
    assert tokens and all(int(t.split(".")[0]) == lead_status["term"] for t in tokens), tokens
    # The new node's certificate is renewed by the new leader, signed with its issuer.
    with mesh.client(leader, mesh.credential("w2")) as client:
        renewal = client.post("/v1/populi/certs/renew", json={})
    assert renewal.status_code == 200, renewal.text
    renewed, *chain = chain_from_pem(renewal.json()["certificate"])
    assert issuer_node_id(renewed) == mesh[leader].node_id
    ca = cert_from_pem((mesh["cp"].data_dir / "tls" / "ca.crt").read_bytes())
    verify_chain(renewed, chain, ca, now_wall_s=time.time(), skew_s=0)
    # A settings change through the new leader reaches every running node.
    with mesh.operator(leader) as op:
        changed = op.post("/v1/populi/admin/settings", json={"changes": {"max_lease_ttl_s": 40}})
    assert changed.status_code == 200, changed.text
    mesh.wait_settings(int(changed.json()["settings"]["serial"]))
    # The worker follows the new leader.
    wait_for(
        "the worker follows the new leader",
        lambda: (
            (s := status(mesh, "w1")) is not None
            and s["control_plane"]["node_id"] == mesh[leader].node_id
            and s["control_plane"]["reachable"]
        ),
        guard_s=GUARD_S,
        every_s=0.3,
    )

    # The old leader, restarted from its disk, follows the new one.
    mesh.start("cp")
    wait_for(
        "the old leader follows",
        lambda: (
            (s := status(mesh, "cp")) is not None
            and s["election_role"] == "follower"
            and s["leader"] is not None
            and s["leader"]["id"] == mesh[leader].node_id
            and not s["control_plane"]["is_self"]
        ),
        guard_s=GUARD_S,
        every_s=0.3,
    )
    # The CLI on the old leader's data directory reaches the new leader.
    resumed = mesh.cli("cp", "node", "resume", "w1", "--json", check=False)
    assert resumed.returncode == 0, resumed.stderr
    # So does `populi token create` there: the token is the new leader's.
    token = json.loads(mesh.cli("cp", "token", "create", "--roles", "worker", "--json").stdout)
    assert token["token"].startswith("populi-join-3."), token
    events = json.loads(mesh.cli("v2", "events", "--kind", "election", "--json").stdout)["events"]
    assert any(e["detail"]["role"] == "leader" for e in events) or leader != "v2"
    nodes = {n["name"]: n for n in json.loads(mesh.cli("cp", "nodes", "--json").stdout)["nodes"]}
    assert nodes["w1"]["state"] == "active"
