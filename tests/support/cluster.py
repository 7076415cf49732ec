"""A cluster's first data directory, made in process as ``populi init`` makes it."""

from __future__ import annotations

from pathlib import Path

from populi_peer.cluster import InitResult, init_cluster
from populi_peer.testing import VirtualClock


def init_lab_cluster(
    data_dir: Path, *, force: bool = False, now_wall_s: float | None = None
) -> InitResult:
    """``populi init`` of the cluster ``lab`` (node ``cp``, loopback, any port) in
    ``data_dir``, at ``now_wall_s`` (by default the virtual clock's start)."""
    return init_cluster(
        data_dir,
        cluster_name="lab",
        node_name="cp",
        listen="127.0.0.1:0",
        advertise=[],
        force=force,
        now_wall_s=VirtualClock().wall_start_s if now_wall_s is None else now_wall_s,
    )
