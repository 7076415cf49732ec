"""The machines the overlay runbooks (``runbooks/overlay-*.md``) run on in the lab, for
the test that runs them (``test_overlay_lab.py``) and the WAN benchmark
(``bench/wan.py``): ``cp``, ``wa`` and ``wb`` on an underlay that stands for the
Internet, each a machine of its own (:class:`lab.runbook.Hosts`)."""

from __future__ import annotations

from pathlib import Path

from lab.netns import Lab
from lab.runbook import Hosts

from support.mesh import EXEC_ENV, GPU_FIXTURE

HOSTS = ("cp", "wa", "wb")
#: The hosts' /24 (``open_lab(HOSTS, subnet=UNDERLAY)``): a benchmarking range (RFC 2544),
#: neither a LAN nor anyone's real address.
UNDERLAY = "198.18.0"


def overlay_hosts(lab: Lab, root: Path, *, discovery: bool) -> Hosts:
    """``lab``'s hosts as machines kept under ``root`` (not opened yet): every agent with
    the mesh's short exec timings (``EXEC_ENV``) and LAN discovery on or off; the workers
    ``wa`` and ``wb`` replay a recorded H100 and refresh their inventory every second."""
    worker = {"POPULI_GPU_FIXTURE": GPU_FIXTURE, "POPULI_GPU__REFRESH_S": "1"}
    return Hosts(
        lab,
        root,
        env={**EXEC_ENV, "POPULI_DISCOVERY__ENABLED": "1" if discovery else "0"},
        host_env={"wa": worker, "wb": worker},
    )


__all__ = ["HOSTS", "UNDERLAY", "overlay_hosts"]
