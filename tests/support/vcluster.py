"""The virtual cluster as the tests use it: every response any agent produces is checked
against the OpenAPI contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from populi_peer.testing.cluster import VirtualCluster, open_virtual_cluster
from support.contract import validate


@contextlib.asynccontextmanager
async def vcluster(root: Path, **kwargs: Any) -> AsyncIterator[VirtualCluster]:
    kwargs.setdefault("on_response", validate)
    async with open_virtual_cluster(root, **kwargs) as cluster:
        yield cluster
