"""The lab's fixtures (``tests/lab/fixtures.py``) for ``test_mitm_lab.py``, which runs in
network namespaces like the tests in ``tests/lab/``."""

from __future__ import annotations

from lab.fixtures import lab, lab_unavailable, mesh

__all__ = ["lab", "lab_unavailable", "mesh"]
