"""The network-namespace lab: tests here need root, ``ip netns`` and ``iptables``, and
skip with the reason when they are missing (``tests/lab/netns.py`` builds the lab; the
fixtures are ``tests/lab/fixtures.py``'s)."""

from __future__ import annotations

from lab.fixtures import lab, lab_unavailable, mesh

__all__ = ["lab", "lab_unavailable", "mesh"]
