"""The network-namespace lab: tests here need root, ``ip netns`` and ``iptables``, and
skip with the reason when they are missing (``tests/lab/netns.py`` builds the lab)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab.netns import Lab, open_lab, unavailable

HOSTS = ("cp", "wa", "wb")


@pytest.fixture(scope="session")
def lab_unavailable() -> str | None:
    return unavailable()


@pytest.fixture
def lab(lab_unavailable: str | None) -> Iterator[Lab]:
    """Hosts ``cp``, ``wa``, ``wb`` (10.77.0.1-3) on one bridge, torn down afterwards."""
    if lab_unavailable is not None:
        pytest.skip(lab_unavailable)
    with open_lab(HOSTS) as built:
        yield built
