"""LAN discovery in the namespace lab, checked by a second mDNS implementation (avahi),
and what a sighting may and may not do (root; skipped otherwise).

Hosts on one bridge (10.77.0.0/24): ``cp`` and ``wa`` (cluster ``lab``), ``xf`` (a
foreign cluster ``other``), ``wb`` (joins later), ``obs`` (avahi-daemon on a private
D-Bus). Every agent listens on ``0.0.0.0:7431`` with no address flag: what it advertises
and announces comes from its interfaces (populi_peer/discovery/site.py).

1. cp, wa and xf announce ``_populi._tcp``; ``avahi-browse -rtp`` on obs sees the three,
   with the node ids and cluster digests their TXT records carry;
2. ``populi discover --json`` on cp sees them too: cp and wa as ``ours``, xf as
   ``foreign``; on obs, with no node there, every one is ``unknown``;
3. the foreign cluster changes nothing: cp's members stay cp and wa, xf's stay xf;
4. cp stops and an impostor on xf announces cp's node id and cluster digest at xf's
   address: ``populi join`` on wb finds the token's address dead, tries the sighting,
   meets a CA that does not match the token's pin, and joins nothing;
5. cp comes back at a new address (10.77.0.11): the same token joins wb through cp's
   sighting (its node id is the token's recipient, TLS proves it), and wa, whose
   control-plane URL is now dead, finds cp again by its sighting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab.agents import PORT, LabHost
from lab.avahi import avahi_unavailable, open_avahi
from lab.netns import Lab, open_lab

from populi_peer.discovery import cluster_digest
from support.mesh import Mesh
from support.procs import POPULI
from support.waiting import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

GUARD_S = 60.0
HOSTS = ("cp", "wa", "wb", "xf", "obs")
DISCOVERY_ON = {"POPULI_DISCOVERY__ENABLED": "1"}


class WildcardLabHost(LabHost):
    """Each node in its namespace, listening on every interface (no address flags)."""

    def listen(self, name: str) -> str:
        return f"0.0.0.0:{PORT}"


@pytest.fixture
def lab(lab_unavailable: str | None) -> Iterator[Lab]:
    if lab_unavailable is not None:
        pytest.skip(lab_unavailable)
    missing = avahi_unavailable()
    if missing is not None:
        pytest.skip(missing)
    with open_lab(HOSTS) as built:
        yield built


@pytest.fixture
def mesh(lab: Lab, tmp_path: Path) -> Iterator[Mesh]:
    built = Mesh(tmp_path, host=WildcardLabHost(lab), remote=False)
    try:
        yield built
    finally:
        built.close()


def add(mesh: Mesh, name: str) -> None:
    node = mesh.add(name, gpu=False)
    node.env.update(DISCOVERY_ON)


def discover(lab: Lab, host: str, data_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        lab.argv(
            host, *POPULI, "discover", "--json", "--timeout", "3", "--data-dir", str(data_dir)
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **DISCOVERY_ON},
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def cluster_id(mesh: Mesh, name: str) -> str:
    return str(mesh[name].query("SELECT value FROM meta WHERE key = 'cluster_id'")[0][0])


def test_two_agents_announce_avahi_sees_them_and_a_foreign_cluster_joins_nothing(
    lab: Lab, mesh: Mesh, tmp_path: Path
) -> None:
    with mesh.logs_on_failure():
        scenario(lab, mesh, tmp_path)


def scenario(lab: Lab, mesh: Mesh, tmp_path: Path) -> None:
    started = time.monotonic()
    for name in ("cp", "wa", "xf", "wb"):
        add(mesh, name)
    init = mesh.cli(
        "cp",
        "init",
        "--cluster-name",
        "lab",
        "--listen",
        f"0.0.0.0:{PORT}",
        "--name",
        "cp",
        "--json",
    )
    mesh["cp"].node_id = json.loads(init.stdout)["node"]["id"]
    mesh.start("cp")
    token = json.loads(mesh.cli("cp", "token", "create", "--json").stdout)["token"]
    joined = json.loads(
        mesh.cli(
            "wa", "join", token, "--listen", f"0.0.0.0:{PORT}", "--name", "wa", "--json"
        ).stdout
    )
    assert joined["control_plane_url"] == f"https://{lab.ip('cp')}:{PORT}", joined
    mesh.start("wa")
    mesh.cli("xf", "init", "--cluster-name", "other", "--listen", f"0.0.0.0:{PORT}", "--name", "xf")
    mesh.start("xf")
    cp, wa, xf = mesh["cp"], mesh["wa"], mesh["xf"]
    ours, theirs = cluster_digest(cluster_id(mesh, "cp")), cluster_digest(cluster_id(mesh, "xf"))
    assert cluster_digest(cluster_id(mesh, "wa")) == ours != theirs
    print(f"\ncp, wa (lab) and xf (other) up in {time.monotonic() - started:.1f} s")

    # 1. A second, independent mDNS implementation sees the three announcements.
    with open_avahi(lab, "obs", tmp_path / "avahi") as avahi:
        expected = {cp.node_id: ours, wa.node_id: ours, xf.node_id: theirs}

        def avahi_sees_all() -> Any:
            services, _raw = avahi.browse("_populi._tcp")
            by_node = {s.txt.get("node"): s for s in services}
            return by_node if set(expected) <= set(by_node) else None

        by_node, took = wait_for(
            "avahi-browse sees cp, wa and xf", avahi_sees_all, guard_s=GUARD_S, every_s=1.0
        )
        print(f"avahi-browse saw the three after {took:.1f} s")
        for node_id, digest in expected.items():
            service = by_node[node_id]
            assert service.txt["cluster"] == digest, service
            assert service.txt["txtvers"] == "1" and service.txt["proto"] == "1", service
            assert service.port == PORT and service.name == f"populi-{node_id}", service
            assert set(service.txt) == {"txtvers", "proto", "cluster", "node", "roles"}
        assert by_node[cp.node_id].address == lab.ip("cp")
        assert by_node[wa.node_id].address == lab.ip("wa")

    # 2. populi discover: ours and foreign from cp; unknown from a machine with no node.
    def discover_sees_all() -> Any:
        answer = discover(lab, "cp", cp.data_dir)
        by_node = {s["node_id"]: s for s in answer["sightings"]}
        return answer if set(expected) <= set(by_node) else None

    answer, took = wait_for(
        "populi discover on cp sees all three", discover_sees_all, guard_s=GUARD_S, every_s=0.5
    )
    assert answer["cluster_digest"] == ours
    by_node = {s["node_id"]: s for s in answer["sightings"]}
    assert by_node[wa.node_id]["cluster"] == "ours"
    assert by_node[wa.node_id]["cluster_digest"] == ours
    assert by_node[wa.node_id]["addresses"] == [f"{lab.ip('wa')}:{PORT}"]
    assert by_node[cp.node_id]["cluster"] == "ours"
    assert by_node[xf.node_id]["cluster"] == "foreign"
    assert by_node[xf.node_id]["cluster_digest"] == theirs
    stranger = discover(lab, "obs", tmp_path / "no-node-here")
    assert stranger["cluster_digest"] is None
    assert {s["cluster"] for s in stranger["sightings"]} <= {"unknown"}

    # 3. A foreign sighting changes nothing: each cluster keeps its own members.
    assert set(mesh.nodes_view()) == {"cp", "wa"}
    xf_view = json.loads(mesh.cli("xf", "nodes", "--json").stdout)
    assert {n["name"] for n in xf_view["nodes"]} == {"xf"}
    status = json.loads(mesh.cli("wa", "status", "--json").stdout)
    assert status["discovery"]["mdns"] == "on", status["discovery"]
    assert status["addresses"]["addresses"] == [f"{lab.ip('wa')}:{PORT}"], status["addresses"]

    # 4. cp stops; an impostor on xf announces cp's node id and our digest at xf's
    # address. The join finds the token's address refusing, tries the sighting, meets a
    # CA that does not match the pin, and joins nothing.
    token = json.loads(mesh.cli("cp", "token", "create", "--json").stdout)["token"]
    os.kill(cp.pid, signal.SIGTERM)
    cp.agent.proc.wait(timeout=30)  # type: ignore[union-attr]
    impostor = start_impostor(lab, "xf", node_id=cp.node_id, digest=ours, tmp_path=tmp_path)
    try:
        refused = mesh.cli(
            "wb", "join", token, "--listen", f"0.0.0.0:{PORT}", "--name", "wb", check=False
        )
    finally:
        impostor.send_signal(signal.SIGTERM)
        impostor.wait(timeout=30)
        assert impostor.stdout is not None
        impostor.stdout.close()
    assert refused.returncode != 0, refused.stdout
    assert "seen on the LAN" in refused.stderr and "pin" in refused.stderr, refused.stderr
    assert not (mesh["wb"].data_dir / "populi.db").exists()
    xf_view = json.loads(mesh.cli("xf", "nodes", "--json").stdout)
    assert {n["name"] for n in xf_view["nodes"]} == {"xf"}

    # 5. cp comes back at a new address. The same token joins wb through cp's sighting;
    # wa finds cp again by it.
    lab.run("cp", "ip", "addr", "del", f"{lab.ip('cp')}/24", "dev", "eth0")
    lab.run("cp", "ip", "addr", "add", "10.77.0.11/24", "dev", "eth0")
    mesh.start("cp")
    moved = time.monotonic()
    print("cp serves again at 10.77.0.11")
    joined = json.loads(
        mesh.cli(
            "wb", "join", token, "--listen", f"0.0.0.0:{PORT}", "--name", "wb", "--json"
        ).stdout
    )
    print(f"wb joined through cp's sighting {time.monotonic() - moved:.1f} s after cp moved")
    assert joined["control_plane_url"] == f"https://10.77.0.11:{PORT}", joined
    mesh.start("wb")

    def fresh(name: str) -> Any:
        view = mesh.nodes_view()
        return view if name in view and not view[name]["heartbeat_stale"] else None

    view, took = wait_for("cp hears wb", lambda: fresh("wb"), guard_s=GUARD_S, every_s=0.5)
    view, took = wait_for(
        "cp hears wa at its new address", lambda: fresh("wa"), guard_s=GUARD_S, every_s=0.5
    )
    print(f"wa found cp again {time.monotonic() - moved:.1f} s after it moved")
    wa_status = json.loads(mesh.cli("wa", "status", "--json").stdout)
    assert wa_status["control_plane"]["url"] == f"https://10.77.0.11:{PORT}", wa_status[
        "control_plane"
    ]
    assert set(view) == {"cp", "wa", "wb"}


IMPOSTOR = """
import sys, trio
from populi_peer.discovery import Announcement, MdnsBridge
ip, node_id, digest = sys.argv[1:4]
announcement = Announcement(node_id=node_id, cluster_digest=digest, port=7431, addresses=(ip,))
async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(MdnsBridge(interfaces=[ip], on_event=lambda e: None, announcement=announcement).run)
        print("announcing", flush=True)
trio.run(main)
"""


def start_impostor(
    lab: Lab, host: str, *, node_id: str, digest: str, tmp_path: Path
) -> subprocess.Popen[str]:
    """Someone on the LAN announcing another cluster's node at its own address."""
    with (tmp_path / "impostor.log").open("w") as log:
        proc = subprocess.Popen(
            lab.argv(host, sys.executable, "-c", IMPOSTOR, lab.ip(host), node_id, digest),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "announcing", (tmp_path / "impostor.log").read_text()
    return proc
