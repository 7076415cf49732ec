"""The overlay runbooks, run step by step in the lab (root; skipped otherwise).

``runbooks/overlay-wireguard.md`` and ``runbooks/overlay-nebula.md`` are executed as
written (``tests/lab/runbook.py`` runs their annotated shell blocks): three namespaces
``cp``, ``wa``, ``wb`` whose ``eth0`` stands for the Internet (``198.18.0.1-3``, on one
bridge), each with its own ``/etc``-style directories; ``cp`` and ``wa`` also share a home
LAN (``lan0``, ``192.168.50.1-2``, a veth pair), ``wb`` is the rented box. Between the
page's steps the test looks at what the page promises:

- every node advertises its overlay address first without an address flag (an overlay
  cluster), never its public one; ``wa`` also its LAN address;
- a node with two interfaces picks the right one per scope: ``cp`` reaches ``wa`` over
  the home LAN (scope ``lan``) and ``wb`` over the overlay (scope ``overlay``), and ``wa``
  reaches ``wb`` over the overlay;
- a remote task's exit code comes back; with ``wb``'s tunnel down the task falls back to
  ``wa`` with a higher token, after the lease died on ``cp``; ``wb`` is retired.

Two lab-only additions, said on the page: the workers replay a recorded H100
(``POPULI_GPU_FIXTURE``) and leases are short (``max_lease_ttl_s 6``) so that the
fallback takes seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab.netns import Lab, open_lab, sh
from lab.overlay import HOSTS, UNDERLAY, overlay_hosts
from lab.runbook import Hosts, Runbook, parse_runbook

from support.mesh import EXPIRY_MARGIN_S, LEASE_TTL_S

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"
HOME_LAN = {"cp": "192.168.50.1", "wa": "192.168.50.2"}


def tools_missing(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (.ci/run installs the lab's Debian packages)"
    return None


@pytest.fixture
def overlay_lab(lab_unavailable: str | None, tmp_path: Path) -> Iterator[tuple[Lab, Hosts]]:
    if lab_unavailable is not None:
        pytest.skip(lab_unavailable)
    with open_lab(HOSTS, subnet=UNDERLAY) as lab:
        # The home LAN that cp and wa share: one cable between them.
        sh(
            "ip",
            "link",
            "add",
            "lan0",
            "netns",
            lab.ns("cp"),
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            lab.ns("wa"),
        )
        for name, address in HOME_LAN.items():
            lab.run(name, "ip", "addr", "add", f"{address}/24", "dev", "lan0")
            lab.run(name, "ip", "link", "set", "lan0", "up")
        hosts = overlay_hosts(lab, tmp_path / "hosts", discovery=True)
        try:
            hosts.open()
            yield lab, hosts
        except BaseException:
            for host in HOSTS:
                log = hosts.dir(host, "/var/log/populi/agent.log")
                if log.exists():
                    print(
                        f"--- {host}'s agent log (tail)\n{log.read_text(errors='replace')[-3000:]}"
                    )
            raise
        finally:
            hosts.close()


def as_json(output: str) -> Any:
    return json.loads(output[output.index("{") :])


def check_addresses_and_scopes(hosts: Hosts, overlay: dict[str, str]) -> None:
    """No address flag anywhere: each node advertises its overlay address first (an overlay
    cluster), never its public one; wa, on the home LAN too, also its LAN address. cp
    hears wa over the LAN and wb over the overlay: each picked the nearest path."""
    status = {h: as_json(hosts.run(h, "populi status --json")) for h in HOSTS}
    for host in HOSTS:
        plan = status[host]["addresses"]
        assert plan["overlay_cluster"] is True, (host, plan)
        assert plan["addresses"][0] == f"{overlay[host]}:7431", (host, plan)
        assert not any(a.startswith(UNDERLAY) for a in plan["addresses"]), (host, plan)
        assert status[host]["url"] == f"https://{overlay[host]}:7431", status[host]
    assert status["wa"]["addresses"]["by_scope"] == {
        "overlay": [f"{overlay['wa']}:7431"],
        "lan": [f"{HOME_LAN['wa']}:7431"],
    }
    # Joined where it reached cp, the nearest of cp's addresses from each machine.
    assert status["wa"]["control_plane"]["url"] == f"https://{HOME_LAN['cp']}:7431"
    assert status["wb"]["control_plane"]["url"] == f"https://{overlay['cp']}:7431"
    nodes = {n["name"]: n for n in as_json(hosts.run("cp", "populi nodes --json"))["nodes"]}
    assert nodes["wa"]["scope"] == "lan", nodes["wa"]
    assert nodes["wb"]["scope"] == "overlay", nodes["wb"]
    # Site detection inside a namespace, as the agent does it: wg0/nebula1 is a tunnel.
    detected = as_json(
        hosts.run(
            "wa",
            "python3 -c 'import json; from populi_peer.discovery.site import Site; "
            's = Site.detect(); print(json.dumps({"tunnels": list(s.tunnel_networks()), '
            '"lan": s.lan_ips()}))\'',
        )
    )
    assert f"{overlay['wa'].rsplit('.', 1)[0]}.0/24" in detected["tunnels"], detected
    assert HOME_LAN["wa"] in detected["lan"], detected


def check_fallback(hosts: Hosts) -> None:
    """The task of the 'overlay down' step: attempt 1 on wb under a lease that died on
    cp, attempt 2 local on wa with a higher token, exit code 5."""
    task_id = hosts.run("wa", 'echo "$TASK"').strip()
    task = as_json(hosts.run("wa", f"populi task show {task_id} --json"))
    first, second = task["attempts"]
    assert first["where"] == "remote" and first["outcome"] in ("lease_dead", "lease_lost"), first
    assert second["where"] == "local", second
    assert task["exit_status"] == 5, task
    assert [int(x) for x in second["token"].split(".")] > [
        int(x) for x in first["token"].split(".")
    ]
    lease = as_json(hosts.run("cp", f"populi leases --json --task={task_id}"))["leases"]
    assert {x["lease_id"]: x["state"] for x in lease}[first["lease_id"]] == "expired", lease


def run_overlay_runbook(page: str, hosts: Hosts, overlay: dict[str, str]) -> Runbook:
    book = Runbook(RUNBOOKS / page, hosts)
    started = time.monotonic()
    book.run_through("nodes")
    print(f"\n{page}: overlay up, cluster joined over it in {time.monotonic() - started:.1f} s")
    check_addresses_and_scopes(hosts, overlay)
    book.run("remote-on")
    # Lab only (said on the page): short leases, so that the fallback takes seconds.
    hosts.run("cp", f"populi settings set max_lease_ttl_s {LEASE_TTL_S}")
    hosts.run("cp", f"populi settings set lease_expiry_margin_s {EXPIRY_MARGIN_S}")
    book.run("run-task")
    book.run_through("overlay-down")
    cut = time.monotonic()
    book.run("fallback")
    print(f"{page}: fell back {time.monotonic() - cut:.1f} s after the overlay went down")
    check_fallback(hosts)
    book.run_through("retired")
    book.check_all_run()
    print(f"{page}: every step in {time.monotonic() - started:.1f} s")
    for step, took in book.timings.items():
        print(f"  {step:<16} {took:6.1f} s")
    return book


@pytest.mark.parametrize(
    ("page", "tools", "overlay"),
    [
        pytest.param(
            "overlay-wireguard.md",
            ("wg", "wireguard-go"),
            {"cp": "10.8.0.1", "wa": "10.8.0.2", "wb": "10.8.0.3"},
            id="wireguard",
        ),
        pytest.param(
            "overlay-nebula.md",
            ("nebula", "nebula-cert"),
            {"cp": "10.42.0.1", "wa": "10.42.0.2", "wb": "10.42.0.3"},
            id="nebula",
        ),
    ],
)
def test_the_overlay_runbook_runs_end_to_end(
    overlay_lab: tuple[Lab, Hosts], page: str, tools: tuple[str, ...], overlay: dict[str, str]
) -> None:
    missing = tools_missing(*tools, "iptables", "ping")
    if missing:
        pytest.skip(missing)
    _, hosts = overlay_lab
    run_overlay_runbook(page, hosts, overlay)


@pytest.mark.parametrize(
    "page", ["overlay-wireguard.md", "overlay-nebula.md", "overlay-tailscale.md"]
)
def test_every_shell_block_of_the_overlay_runbooks_is_a_lab_step(page: str) -> None:
    """No root needed: the pages parse, and each block is annotated (run, copied or
    skipped with a reason), so a new command cannot slip past the lab."""
    steps = parse_runbook(RUNBOOKS / page)
    assert steps
    if page == "overlay-tailscale.md":
        assert all(s.skip for s in steps), "the Tailscale page cannot be run here"
