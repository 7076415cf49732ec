"""The lab's pytest fixtures, for the tests in ``tests/lab/`` (``conftest.py``) and those
elsewhere that run in the lab (``tests/security/conftest.py``): ``lab`` builds the hosts
that the test's module names in ``HOSTS`` (``cp``, ``wa``, ``wb`` where it names none),
``mesh`` an empty mesh of real agents on them (:func:`lab.agents.open_lab_mesh`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lab.agents import open_lab_mesh
from lab.netns import Lab, open_lab, unavailable

from support.mesh import Mesh

#: The hosts of a module that names no ``HOSTS``.
HOSTS = ("cp", "wa", "wb")


@pytest.fixture(scope="session")
def lab_unavailable() -> str | None:
    return unavailable()


@pytest.fixture
def lab(lab_unavailable: str | None, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The module's ``HOSTS`` (10.77.0.1, .2, ... in that order) on one bridge, torn down
    afterwards; the test skips with the reason where no lab can be built."""
    if lab_unavailable is not None:
        pytest.skip(lab_unavailable)
    with open_lab(getattr(request.module, "HOSTS", HOSTS)) as built:
        yield built


@pytest.fixture
def mesh(lab: Lab, tmp_path: Path) -> Iterator[Mesh]:
    with open_lab_mesh(lab, tmp_path) as built:
        yield built


__all__ = ["HOSTS", "lab", "lab_unavailable", "mesh"]
